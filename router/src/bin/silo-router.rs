//! `silo-router --config FILE`: the router binary. Everything lives in the library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    silo_router::run_cli().await
}
