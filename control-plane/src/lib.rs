//! silo's control plane: the catalog of tenants, the secret store, provisioning and the
//! other durable jobs, the admin API and the `siloctl` operator CLI.
//!
//! Data path: admin API (`api`) → job row (`jobs`) → worker (`worker`) → idempotent steps
//! (`provision`, on `servers` and `secrets`) → `catalog`. The router reads the catalog and
//! the secret store through this library.

pub mod api;
pub mod audit;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod cp_main;
pub mod jobs;
pub mod localpg;
pub mod names;
pub mod provision;
pub mod rollout;
pub mod rotation;
pub mod schedule;
pub mod secrets;
pub mod server;
pub mod servers;
pub mod template;
pub mod tenant_schema;
pub mod worker;
