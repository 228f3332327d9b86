//! Options of the pools silo keeps on its own databases: the catalog (control plane and
//! router) and each server's `postgres` database (the control plane's DDL).
//!
//! sqlx pings a pooled connection before every checkout by default: one more round trip,
//! and one more backend wake-up, in front of every statement (a provisioning makes about
//! thirty). Here only a connection that sat idle for longer than [`PING_IDLE_AFTER`] is
//! pinged first: that is the one a restarted server or an idle timeout on the way may have
//! cut, and a dead one is replaced before a statement fails on it. (sqlx still checks every
//! connection as it comes back to the pool.)

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;
use sqlx::Connection;

/// How long a connection may sit in the pool and still be handed out without a ping.
pub const PING_IDLE_AFTER: Duration = Duration::from_secs(1);

/// Pool options with the checkout test described above; callers add sizes and timeouts.
pub fn options() -> PgPoolOptions {
    PgPoolOptions::new()
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IDLE_AFTER {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}
