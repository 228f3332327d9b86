//! silo's control plane: the catalog of tenants, the secret store, provisioning and the
//! other durable jobs, the admin API and the `siloctl` operator CLI.
//!
//! Data path: admin API (`api`) → job row (`jobs`) → worker (`worker`) → idempotent steps
//! (`provision`, on `servers` and `secrets`) → `catalog`. The router reads the catalog and
//! the secret store through this library.

pub mod api;
pub mod audit;
pub mod backup;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod cp_main;
pub mod gauges;
pub mod jobs;
pub mod keyfile;
pub mod localpg;
pub mod moves;
pub mod names;
pub mod pooling;
pub mod provision;
pub(crate) mod replication;
pub mod response_headers;
pub mod restores;
pub mod role_limits;
pub mod rollout;
pub mod rotation;
pub mod schedule;
mod scram;
pub mod secrets;
pub mod server;
pub mod servers;
pub mod spares;
pub mod template;
pub mod tenant_schema;
pub mod tls;
pub mod verify;
pub mod worker;

/// Makes aws-lc-rs the process's default rustls crypto provider (idempotent).
///
/// The workspace builds one provider (aws-lc-rs, as sqlx and the AWS SDK use) and never ring,
/// so reqwest's rustls backend has none of its own: every process must call this before it
/// builds a `reqwest::Client`, or the build panics with "No provider set".
pub fn install_crypto_provider() {
    // Err means a provider is installed already, which is as good.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
