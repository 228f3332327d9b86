//! `silo-tenant-app`: serves one tenant database directly (see `silo_tenant_app::standalone`).

use std::process::ExitCode;

use clap::Parser as _;
use silo_tenant_app::standalone::{error_line, run, Args};

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("silo-tenant-app: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}
