//! Logical replication of a tenant's database to another server: how an online move copies
//! it while the tenant is served from its old server, so that the tenant is unavailable only
//! for the cutover.
//!
//! The old server publishes every table of the tenant's database (`FOR ALL TABLES`) to a
//! subscription in the new database, which has the same schema (copied with `pg_dump
//! --schema-only`) and no rows. The subscription logs in to the old server as a role made for
//! the move (`REPLICATION`, a member of the tenant's owner role so that it may read the
//! tables), with a random password that lives only in the new server's `pg_subscription`
//! (readable by superusers) until the move drops subscription, slot, publication and role. The
//! statement that holds the password is not logged by PostgreSQL or by sqlx.
//!
//! What logical replication does not carry is refused before anything is made (a table
//! without a replica identity, whose updates a publication would refuse while the tenant is
//! served; large objects) or copied at the cutover (sequences). Both servers need a superuser
//! admin role, and the old one `wal_level = logical`: see [`unavailable`].

use std::time::{Duration, Instant};

use secrecy::ExposeSecret;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tracing::info;

use crate::names::{quote_ident, quote_literal, TenantNames};
use crate::provision::{ddl, ProvisionError, StepContext};
use crate::secrets;
use crate::servers::{Server, ADMIN_CONNECT_TIMEOUT};

/// How long the cutover waits for the new server to have applied the last change.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the copy may go on without a replication worker running on the new server.
const NO_WORKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How often replication is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// Why the tenant's database `database` cannot move online from `from` to `to`; None when it
/// can.
pub(crate) async fn unavailable(from: &Server, to: &Server, database: &str) -> Result<Option<String>, ProvisionError> {
    let mut reasons = Vec::new();
    for server in [from, to] {
        let superuser: bool = sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            .fetch_one(&server.admin)
            .await
            .step("look up the admin role")?;
        if !superuser {
            reasons.push(format!(
                "the admin role of {} is not a superuser (logical replication needs one)",
                server.config.name
            ));
        }
    }
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')")
        .fetch_one(&from.admin)
        .await
        .step("read wal_level")?;
    if wal_level != "logical" {
        reasons.push(format!(
            "{} has wal_level = {wal_level}, not logical (a restart of its PostgreSQL changes it)",
            from.config.name
        ));
    }
    let mut conn = from.connect(database).await.step("connect to tenant database")?;
    let unidentified: Vec<String> = sqlx::query_scalar(
        "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE c.relkind IN ('r', 'p') AND c.relpersistence = 'p' \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%' \
           AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS \
                (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))) \
         ORDER BY 1",
    )
    .fetch_all(&mut conn)
    .await
    .step("look for tables without a replica identity")?;
    if !unidentified.is_empty() {
        reasons.push(format!(
            "table(s) {} have no primary key or replica identity, so their updates could not be replicated",
            unidentified.join(", ")
        ));
    }
    let large_objects: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_largeobject_metadata)")
        .fetch_one(&mut conn)
        .await
        .step("look for large objects")?;
    let _ = conn.close().await;
    if large_objects {
        reasons.push("the database has large objects, which logical replication does not copy".into());
    }
    Ok((!reasons.is_empty()).then(|| reasons.join("; ")))
}

/// The replication of one move: publication, slot, subscription and role are all named
/// `silo_move_{job id}`.
pub(crate) struct Replication<'a> {
    from: &'a Server,
    to: &'a Server,
    names: &'a TenantNames,
    name: String,
}

impl<'a> Replication<'a> {
    /// The replication of move job `job_id` of the tenant of `names`.
    pub(crate) fn new(from: &'a Server, to: &'a Server, names: &'a TenantNames, job_id: i64) -> Self {
        Self {
            from,
            to,
            names,
            name: format!("silo_move_{job_id}"),
        }
    }

    /// The server the database moves from.
    pub(crate) fn from(&self) -> &'a Server {
        self.from
    }

    /// The server the database moves to.
    pub(crate) fn to(&self) -> &'a Server {
        self.to
    }

    /// Whether the subscription exists (in the tenant's database on the new server).
    pub(crate) async fn subscribed(&self) -> Result<bool, ProvisionError> {
        if !database_exists(self.to, self.names.database()).await? {
            return Ok(false);
        }
        let mut conn = self.on_target().await?;
        let exists = subscription_exists(&mut conn, &self.name).await;
        let _ = conn.close().await;
        exists
    }

    /// Publishes the tenant's database on the old server and subscribes the new one to it
    /// (which starts copying every table). The new database must have the schema and no rows.
    pub(crate) async fn start(&self) -> Result<(), ProvisionError> {
        let name = quote_ident(&self.name);
        let mut source = self.on_source().await?;
        let published: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(&self.name)
            .fetch_one(&mut source)
            .await
            .step("look up the publication")?;
        if !published {
            ddl(
                &mut source,
                &format!("CREATE PUBLICATION {name} FOR ALL TABLES"),
                "publish the tenant's tables",
            )
            .await?;
        }
        let _ = source.close().await;

        let password = secrets::generate_password();
        let mut admin = self.from.admin.acquire().await.step("connect to server")?;
        // Slots an interrupted attempt made before its subscription was stored.
        drop_slots(&mut admin, self.names.database()).await?;
        let verifier = quote_literal(&crate::scram::verifier(&password));
        let verb = if crate::provision::role_exists(&mut admin, &self.name).await? {
            "ALTER"
        } else {
            "CREATE"
        };
        ddl(
            &mut admin,
            &format!(
                "{verb} ROLE {name} LOGIN REPLICATION PASSWORD {verifier};\nGRANT {} TO {name}",
                quote_ident(&self.names.owner_role())
            ),
            "make the replication role",
        )
        .await?;
        drop(admin);

        let conninfo = [
            ("host", self.from.config.host.as_str()),
            ("port", &self.from.config.port.to_string()),
            ("dbname", self.names.database()),
            ("user", &self.name),
            ("password", password.expose_secret()),
            ("sslmode", replication_sslmode(self.from.config.tls.mode_name())),
        ]
        .iter()
        .map(|(key, value)| format!("{key}={}", conninfo_value(value)))
        .collect::<Vec<_>>()
        .join(" ");
        // The statement holds the password: neither sqlx nor PostgreSQL may log it.
        let options = self.to.admin_options(self.names.database()).disable_statement_logging();
        let mut target = silo_tenant_app::connect(&options, ADMIN_CONNECT_TIMEOUT)
            .await
            .step("connect to tenant database")?;
        ddl(
            &mut target,
            "SET log_statement = 'none'; SET log_min_duration_statement = -1; SET log_min_error_statement = panic",
            "keep the subscription out of the server log",
        )
        .await?;
        ddl(
            &mut target,
            &format!(
                "CREATE SUBSCRIPTION {name} CONNECTION {} PUBLICATION {name}",
                quote_literal(&conninfo)
            ),
            "subscribe to the tenant's tables",
        )
        .await?;
        let _ = target.close().await;
        info!(replication = %self.name, "logical replication started");
        Ok(())
    }

    /// Waits until every table has been copied and is followed; `progress(copied, tables)`
    /// hears of each change. Fails when replication reports errors, or when no replication
    /// worker runs on the new server for a while (its `max_logical_replication_workers`).
    pub(crate) async fn wait_copied<F, Fut>(&self, mut progress: F) -> Result<(), ProvisionError>
    where
        F: FnMut(i64, i64) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut conn = self.on_target().await?;
        let mut last = None;
        let mut worker_seen = Instant::now();
        loop {
            let (copied, tables, workers, errors): (i64, i64, i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM pg_subscription_rel r WHERE r.srsubid = s.oid AND r.srsubstate = 'r'), \
                        (SELECT count(*) FROM pg_subscription_rel r WHERE r.srsubid = s.oid), \
                        (SELECT count(*) FROM pg_stat_subscription w WHERE w.subid = s.oid AND w.pid IS NOT NULL), \
                        (SELECT coalesce(sum(e.apply_error_count + e.sync_error_count), 0)::bigint \
                           FROM pg_stat_subscription_stats e WHERE e.subid = s.oid) \
                 FROM pg_subscription s WHERE s.subname = $1",
            )
            .bind(&self.name)
            .fetch_one(&mut conn)
            .await
            .step("look at the copy")?;
            if errors > 0 {
                return Err(replication_failed(self.to, errors));
            }
            if last != Some(copied) {
                progress(copied, tables).await;
                last = Some(copied);
            }
            if copied == tables {
                break;
            }
            if workers > 0 {
                worker_seen = Instant::now();
            } else if worker_seen.elapsed() > NO_WORKER_TIMEOUT {
                return Err(ProvisionError::InvalidJob(format!(
                    "no logical replication worker ran on {} for {NO_WORKER_TIMEOUT:?} (is max_logical_replication_workers too low?)",
                    self.to.config.name
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        let _ = conn.close().await;
        Ok(())
    }

    /// Once nothing writes to the old database any more: waits until the new server has
    /// applied every change, then gives its sequences the values they have on the old one.
    pub(crate) async fn catch_up(&self) -> Result<(), ProvisionError> {
        let mut admin = self.from.admin.acquire().await.step("connect to server")?;
        let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut *admin)
            .await
            .step("read the old server's position")?;
        let started = Instant::now();
        loop {
            let flushed: Option<Option<bool>> = sqlx::query_scalar(
                "SELECT confirmed_flush_lsn >= $2::pg_lsn FROM pg_replication_slots WHERE slot_name = $1",
            )
            .bind(&self.name)
            .bind(&end)
            .fetch_optional(&mut *admin)
            .await
            .step("look at the replication slot")?;
            match flushed {
                Some(Some(true)) => break,
                None => {
                    return Err(ProvisionError::InvalidJob(format!(
                        "replication slot {} is gone from {}",
                        self.name, self.from.config.name
                    )))
                }
                _ if started.elapsed() > CATCH_UP_TIMEOUT => {
                    return Err(ProvisionError::InvalidJob(format!(
                        "{} had not applied the last changes after {CATCH_UP_TIMEOUT:?}",
                        self.to.config.name
                    )))
                }
                _ => tokio::time::sleep(POLL).await,
            }
        }
        drop(admin);
        let mut source = self.on_source().await?;
        let sequences: Vec<(String, i64)> = sqlx::query_as(
            "SELECT format('%I.%I', schemaname, sequencename), last_value FROM pg_sequences \
             WHERE last_value IS NOT NULL",
        )
        .fetch_all(&mut source)
        .await
        .step("read the sequences")?;
        let _ = source.close().await;
        let mut target = self.on_target().await?;
        for (sequence, value) in &sequences {
            sqlx::query("SELECT setval($1::regclass, $2, true)")
                .bind(sequence)
                .bind(value)
                .execute(&mut target)
                .await
                .step("set a sequence")?;
        }
        let _ = target.close().await;
        info!(replication = %self.name, sequences = sequences.len(), "the new server has every change");
        Ok(())
    }

    /// Drops subscription, slots, publication and role, whichever exist (idempotent; also
    /// what undoes an abandoned move). The new database keeps its rows.
    pub(crate) async fn stop(&self) -> Result<(), ProvisionError> {
        let name = quote_ident(&self.name);
        if database_exists(self.to, self.names.database()).await? {
            let mut target = self.on_target().await?;
            if subscription_exists(&mut target, &self.name).await? {
                let dropped = ddl(
                    &mut target,
                    &format!("DROP SUBSCRIPTION {name}"),
                    "drop the subscription",
                )
                .await;
                if let Err(e) = dropped {
                    // It could not reach the old server to drop its slots: detached, it
                    // drops without; the slots are dropped below.
                    tracing::warn!(error = %e, "dropping the subscription with its slots failed; detaching it");
                    ddl(
                        &mut target,
                        &format!("ALTER SUBSCRIPTION {name} DISABLE; ALTER SUBSCRIPTION {name} SET (slot_name = NONE)"),
                        "detach the subscription",
                    )
                    .await?;
                    ddl(
                        &mut target,
                        &format!("DROP SUBSCRIPTION {name}"),
                        "drop the subscription",
                    )
                    .await?;
                }
            }
            let _ = target.close().await;
        }
        let mut admin = self.from.admin.acquire().await.step("connect to server")?;
        sqlx::query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = $1")
            .bind(&self.name)
            .execute(&mut *admin)
            .await
            .step("end the replication sessions")?;
        drop_slots(&mut admin, self.names.database()).await?;
        if database_exists(self.from, self.names.database()).await? {
            let mut source = self.on_source().await?;
            ddl(
                &mut source,
                &format!("DROP PUBLICATION IF EXISTS {name}"),
                "drop the publication",
            )
            .await?;
            let _ = source.close().await;
        }
        ddl(
            &mut admin,
            &format!("DROP ROLE IF EXISTS {name}"),
            "drop the replication role",
        )
        .await
    }

    async fn on_source(&self) -> Result<PgConnection, ProvisionError> {
        self.from
            .connect(self.names.database())
            .await
            .step("connect to tenant database")
    }

    async fn on_target(&self) -> Result<PgConnection, ProvisionError> {
        self.to
            .connect(self.names.database())
            .await
            .step("connect to tenant database")
    }
}

async fn subscription_exists(conn: &mut PgConnection, name: &str) -> Result<bool, ProvisionError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_subscription WHERE subname = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
        .step("look up the subscription")
}

async fn database_exists(server: &Server, database: &str) -> Result<bool, ProvisionError> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(database)
        .fetch_one(&server.admin)
        .await
        .step("look up database")
}

/// Drops the logical replication slots of `database` that no session uses: a move's own (the
/// subscription's, and those that copy each table), since no tenant role may make one.
/// Slots hold back the server's WAL for as long as they exist.
async fn drop_slots(conn: &mut PgConnection, database: &str) -> Result<(), ProvisionError> {
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE database = $1 AND slot_type = 'logical' AND NOT active",
    )
    .bind(database)
    .execute(conn)
    .await
    .step("drop the replication slots")?;
    Ok(())
}

fn replication_failed(to: &Server, errors: i64) -> ProvisionError {
    ProvisionError::InvalidJob(format!(
        "logical replication to {} failed {errors} time(s); its server log says why",
        to.config.name
    ))
}

/// The `sslmode` the new server connects to the old one with: the old server's own, but
/// without verification, which would need its CA certificate on the new server's disk.
fn replication_sslmode(mode: &str) -> &'static str {
    match mode {
        "disable" => "disable",
        "allow" | "prefer" => "prefer",
        _ => "require",
    }
}

/// A libpq connection-string value, quoted.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_are_quoted() {
        assert_eq!(conninfo_value("pg 1"), "'pg 1'");
        assert_eq!(conninfo_value(r"a'b\c"), r"'a\'b\\c'");
    }

    #[test]
    fn the_new_server_encrypts_where_the_old_one_is_reached_over_tls() {
        assert_eq!(replication_sslmode("verify-full"), "require");
        assert_eq!(replication_sslmode("require"), "require");
        assert_eq!(replication_sslmode("prefer"), "prefer");
        assert_eq!(replication_sslmode("disable"), "disable");
    }
}
