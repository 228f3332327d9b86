//! `siloctl`: the silo operator CLI. Everything lives in `silo_control_plane::cli`.

fn main() {
    std::process::exit(silo_control_plane::cli::run());
}
