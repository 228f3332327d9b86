//! `siloctl`, the operator CLI: an HTTP client of the admin API ([`client`]), plus
//! `siloctl dev`, which runs a complete local stack in the foreground ([`dev`]).
//!
//! Exit codes: 0 success, 1 the operation failed (API error, failed job, server unreachable),
//! 2 usage error (bad arguments, invalid slug, missing `--yes`, no endpoint configured).
//! Every error is one line on stderr, `error: <message>`; the admin token is never printed.

/// `println!` that cannot panic: a closed stdout (`siloctl tenant list | head -1`) is not
/// worth a crash, and the command's outcome is still reported by its exit code.
macro_rules! say {
    () => {
        say!("")
    };
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod args;
mod client;
mod commands;
mod context;
mod dev;
mod drain;
mod output;
mod wait;

use std::fmt;

use clap::Parser;

use args::{Cli, Command};

/// A usage error: the command line (not the operation) is wrong. Exit code 2.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Returns a usage error (exit code 2) as an `anyhow::Error`.
pub(crate) fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError(message.into()))
}

/// Runs `siloctl` with the process arguments and returns its exit code.
pub fn run() -> i32 {
    // Never a backtrace: even a bug ends as one `error:` line and exit code 1.
    std::panic::set_hook(Box::new(|info| {
        use std::io::Write as _;
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let _ = writeln!(std::io::stderr(), "error: internal error: {}", one_line(&message));
    }));
    crate::install_crypto_provider();
    std::panic::catch_unwind(run_cli).unwrap_or(1)
}

fn run_cli() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return clap_error(&e),
    };
    let result = match cli.command {
        // `dev` prepares its files and its own environment before any thread starts.
        Command::Dev(args) => dev::run(args),
        command => runtime().and_then(|rt| rt.block_on(commands::run(cli.global, command))),
    };
    match result {
        Ok(()) => 0,
        Err(e) => report(&e),
    }
}

/// A single-threaded runtime: the CLI does one thing at a time.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// Prints `e` as one line and returns its exit code: 2 for a usage error, which includes an
/// argument the admin API refused as invalid (400), else 1.
fn report(e: &anyhow::Error) -> i32 {
    let refused_as_invalid = e
        .downcast_ref::<client::ApiError>()
        .is_some_and(client::ApiError::is_invalid_input);
    let code = if e.downcast_ref::<UsageError>().is_some() || refused_as_invalid {
        2
    } else {
        1
    };
    eprintln!("error: {}", one_line(&format!("{e:#}")));
    code
}

/// Help and version go to stdout with exit 0; any other clap error becomes one line, exit 2.
fn clap_error(e: &clap::Error) -> i32 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("error: a command is required (see `siloctl --help`)");
            2
        }
        _ => {
            let text = e.render().to_string();
            // Drop the usage block and the "--help" hint; keep the message (and any tip).
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("error: {message} (see `siloctl --help`)");
            2
        }
    }
}

/// Collapses a multi-line message to one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
