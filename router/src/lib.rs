//! silo's router: finds the tenant of each HTTP request, hands the request, with that
//! tenant's connection pool, to the stateless tenant app.
//!
//! Data path, one module per step:
//! `resolve` (Host or `/t/{slug}` → [`resolve::TenantKey`]) → `directory` (key → the
//! tenant's route and status, cached, invalidated by catalog NOTIFY) → `pools` (slug → sqlx
//! pool, built from the secret store within the server's connection `budget`, closed when
//! idle) → `limits` (the tenant's plan: rate and requests in flight) → `forward` (→ the
//! tenant app).
//! `handler` strings those steps together for one request; `errors` is the single mapping of
//! what goes wrong to `{"error","message"}` responses. `server` owns the sockets and the
//! connection lifecycle (`tls` terminates HTTPS on them), `ops` the operations port and
//! metrics, `cli` the binary.

mod budget;
mod cli;
mod credentials;
mod directory;
mod errors;
mod forward;
mod handler;
mod limits;
mod ops;
mod pools;
mod resolve;
mod server;
mod tls;
mod usage;

pub use cli::run_cli;
pub use server::RouterServer;
