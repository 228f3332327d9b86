//! silo's end-to-end tests: real PostgreSQL clusters, real HTTP over sockets, the real
//! binaries. One test binary (linking is the slow part on 2 cores); a module per capability.

#![allow(clippy::unwrap_used)]

mod admin_api;
mod admin_tls;
mod alert_rules;
mod audit;
mod backup_drills;
mod backup_encryption;
mod backups;
mod contract;
mod crash_safety;
mod harness;
mod isolation;
mod legal_hold;
mod managed_server;
mod moves;
mod online_moves;
mod openapi_documents;
mod regions;
mod restores;
mod role_limits;
mod rollout;
mod rotation;
mod router;
mod router_limits;
mod s3_backups;
mod secrets;
mod server_check;
mod server_tls;
mod shutdown;
mod siloctl;
mod siloctl_session;
mod tenant_app;
mod tenant_migrations;
mod tenants;
mod tls;
