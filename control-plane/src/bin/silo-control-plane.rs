//! The control plane binary: see `silo_control_plane::cp_main`.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    silo_control_plane::cp_main::run().await
}
