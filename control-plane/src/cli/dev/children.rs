//! The control plane and router as supervised child processes of `siloctl dev`: found next
//! to our own executable, logs appended to `{data-dir}/logs/`, a parent-death signal so they
//! never outlive us, SIGTERM (then SIGKILL after a deadline) to stop them.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::localpg::{set_parent_death_signal, spawn_supervised};

/// A running child process.
pub(super) struct Child {
    /// What it is, for messages: "control plane", "router".
    pub(super) what: &'static str,
    /// Its log file.
    pub(super) log: PathBuf,
    pid: Pid,
    supervisor: Option<JoinHandle<std::io::Result<ExitStatus>>>,
    status: Option<String>,
}

/// The binary `name` next to the running executable.
pub(super) fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locate the siloctl executable")?;
    let path = exe
        .parent()
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if !path.is_file() {
        bail!(
            "{name} not found next to siloctl (looked for {}): build every binary with `cargo build --bins` \
             (or run `scripts/dev`)",
            path.display()
        );
    }
    Ok(path)
}

impl Child {
    /// Starts `binary --config config`, output appended to `log`.
    pub(super) fn spawn(what: &'static str, binary: &Path, config: &Path, log: PathBuf) -> anyhow::Result<Self> {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("open {}", log.display()))?;
        let _ = writeln!(
            file,
            "--- siloctl dev: starting {what} at {}",
            chrono::Utc::now().to_rfc3339()
        );
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            // The output goes to a file: no terminal colour codes in it.
            .env("NO_COLOR", "1")
            // Own process group: a terminal's Ctrl-C reaches siloctl, which stops the
            // children in order, instead of every process at once.
            .process_group(0);
        set_parent_death_signal(&mut cmd);
        let (pid, supervisor) =
            spawn_supervised(cmd).with_context(|| format!("start {what} ({})", binary.display()))?;
        Ok(Self {
            what,
            log,
            pid,
            supervisor: Some(supervisor),
            status: None,
        })
    }

    /// `Some(exit status)` once the process has exited.
    pub(super) fn exited(&mut self) -> Option<&str> {
        if self.supervisor.as_ref().is_some_and(JoinHandle::is_finished) {
            if let Some(handle) = self.supervisor.take() {
                self.status = Some(match handle.join() {
                    Ok(Ok(status)) => status.to_string(),
                    Ok(Err(e)) => format!("wait failed: {e}"),
                    Err(_) => "supervisor thread panicked".to_owned(),
                });
            }
        }
        self.status.as_deref()
    }

    /// Asks the process to stop (SIGTERM).
    pub(super) fn terminate(&mut self) {
        if self.exited().is_none() {
            let _ = kill(self.pid, Signal::SIGTERM);
        }
    }

    /// Waits until `deadline` for the process to exit, then kills it.
    pub(super) fn wait_or_kill(&mut self, deadline: Instant) {
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.exited().is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
            if let Some(handle) = self.supervisor.take() {
                let _ = handle.join();
            }
        }
    }

    /// The last line of the child's log that is not blank.
    pub(super) fn last_log_line(&self) -> Option<String> {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .map(str::to_owned)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.terminate();
        self.wait_or_kill(Instant::now() + Duration::from_secs(5));
    }
}
