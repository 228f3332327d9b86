//! What the benchmarks (`src/bin/bench-*.rs`) share.

/// The `p` quantile (0..=1) of `sorted`, nearest rank; NaN when empty.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// The 1-minute load average (Linux), to tell a quiet run from one that shared the machine.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Waits until the kernel has written dirty pages back to disk, and prints how long that took.
/// Creating databases dirties gigabytes of page cache; measuring while the kernel writes them
/// back would measure the disk.
pub async fn wait_for_write_back() -> anyhow::Result<()> {
    let flushing = std::time::Instant::now();
    tokio::task::spawn_blocking(nix::unistd::sync).await?;
    println!(
        "page cache written back in {:.1} s; load average {}",
        flushing.elapsed().as_secs_f64(),
        load_average()
    );
    Ok(())
}
