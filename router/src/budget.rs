//! The connection budget: how many connections this router may open to each PostgreSQL
//! server (`router.connection_budget_per_server`), whatever the number of tenants.
//!
//! One tokio semaphore per server with `budget` permits. Every connection of a tenant pool
//! holds a [`ConnectionPermit`] from its server, taken before it connects and given back
//! when it is closed, so the connections of all pools on a server never exceed the budget,
//! by construction, and a pool costs the budget only the connections it has open. Making
//! room when the budget is spent (evicting idle pools) is the pool map's job; this module
//! only counts.

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

    /// A permit for one connection to `server` if one is free right now.
    pub(crate) fn try_take(&self, server: &str) -> Option<ConnectionPermit> {
        let permit = self.semaphore(server).try_acquire_owned().ok()?;
        Some(self.counted(server, permit))
    }

    /// Waits for a permit for one connection to `server` (the caller bounds the wait).
    pub(crate) async fn take(&self, server: &str) -> ConnectionPermit {
        // Never closed: the budgets live as long as the router.
        let permit = self
            .semaphore(server)
            .acquire_owned()
            .await
            .expect("budget semaphores are never closed");
        self.counted(server, permit)
    }

    fn counted(&self, server: &str, permit: OwnedSemaphorePermit) -> ConnectionPermit {
        self.metrics.budget_taken(server, 1.0);
        ConnectionPermit {
            _permit: permit,
            server: server.to_owned(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Room for one connection to a server; back in the server's budget when dropped.
pub(crate) struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
    server: String,
    metrics: Arc<Metrics>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.metrics.budget_taken(&self.server, -1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn permits_never_exceed_the_budget() {
        let budgets = Budgets::new(3, Arc::new(Metrics::new().unwrap()));
        let held: Vec<ConnectionPermit> = (0..3).map(|_| budgets.try_take("pg-1").unwrap()).collect();
        assert!(budgets.try_take("pg-1").is_none());
        assert!(budgets.try_take("pg-2").is_some(), "budgets are per server");
        let waiting = tokio::spawn({
            let budgets = Arc::new(budgets);
            async move { budgets.take("pg-1").await.server.clone() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "waits while the budget is spent");
        drop(held);
        assert_eq!(waiting.await.unwrap(), "pg-1");
    }
}
