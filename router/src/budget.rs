//! The connection budget: how many connections this router may open to each PostgreSQL
//! server (`router.connection_budget_per_server`), whatever the number of tenants.
//!
//! One tokio semaphore per server with `budget` permits. A tenant pool is built only with a
//! [`Reservation`] of permits from its server, and its sqlx `max_connections` is the size of
//! that reservation; the reservation is released only after the pool has been closed (every
//! connection gone). So the connections of all pools on a server never exceed the budget, by
//! construction. Making room when the budget is spent (evicting idle pools) is the pool
//! map's job; this module only counts.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ops::Metrics;

/// The per-server budgets of one router.
pub(crate) struct Budgets {
    per_server: u32,
    servers: DashMap<String, Arc<Semaphore>>,
    metrics: Arc<Metrics>,
}

impl Budgets {
    /// Budgets of `per_server` connections for every server (created on first use).
    pub(crate) fn new(per_server: u32, metrics: Arc<Metrics>) -> Self {
        Self {
            per_server,
            servers: DashMap::new(),
            metrics,
        }
    }

    fn semaphore(&self, server: &str) -> Arc<Semaphore> {
        if let Some(semaphore) = self.servers.get(server) {
            return semaphore.clone();
        }
        let permits = self.per_server as usize;
        self.servers
            .entry(server.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(permits)))
            .clone()
    }

    /// Up to `want` permits on `server` if at least one is free right now.
    pub(crate) fn try_reserve(&self, server: &str, want: u32) -> Option<Reservation> {
        let semaphore = self.semaphore(server);
        let first = semaphore.clone().try_acquire_owned().ok()?;
        Some(self.grow(server, &semaphore, first, want))
    }

    /// Waits for one permit on `server` (the caller bounds the wait), then takes up to
    /// `want` if they are free.
    pub(crate) async fn reserve(&self, server: &str, want: u32) -> Reservation {
        let semaphore = self.semaphore(server);
        // Never closed: the budgets live as long as the router.
        let first = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("budget semaphores are never closed");
        self.grow(server, &semaphore, first, want)
    }

    fn grow(
        &self,
        server: &str,
        semaphore: &Arc<Semaphore>,
        mut permit: OwnedSemaphorePermit,
        want: u32,
    ) -> Reservation {
        for _ in 1..want {
            match semaphore.clone().try_acquire_owned() {
                Ok(more) => permit.merge(more),
                Err(_) => break,
            }
        }
        let reservation = Reservation {
            permit,
            server: server.to_owned(),
            metrics: self.metrics.clone(),
        };
        self.metrics
            .budget_reserved(&reservation.server, reservation.size() as f64);
        reservation
    }
}

/// Permits for the connections of one tenant pool; returned to the server's budget on drop.
pub(crate) struct Reservation {
    permit: OwnedSemaphorePermit,
    server: String,
    metrics: Arc<Metrics>,
}

impl Reservation {
    /// How many connections the pool may open.
    pub(crate) fn size(&self) -> u32 {
        u32::try_from(self.permit.num_permits()).unwrap_or(u32::MAX)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.metrics.budget_reserved(&self.server, -(self.size() as f64));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reservations_never_exceed_the_budget() {
        let budgets = Budgets::new(5, Arc::new(Metrics::new().unwrap()));
        let a = budgets.try_reserve("pg-1", 3).unwrap();
        assert_eq!(a.size(), 3);
        let b = budgets.try_reserve("pg-1", 3).unwrap();
        assert_eq!(b.size(), 2, "takes what is left");
        assert!(budgets.try_reserve("pg-1", 1).is_none());
        assert_eq!(
            budgets.try_reserve("pg-2", 5).unwrap().size(),
            5,
            "budgets are per server"
        );
        drop(a);
        assert_eq!(budgets.reserve("pg-1", 5).await.size(), 3);
    }
}
