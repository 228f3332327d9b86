//! The router's own counters over a measured window, read from its `/metrics`: how many pools
//! a phase built and evicted says how much of its time went to connecting.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::Context;

/// Every series of a `/metrics` scrape, by its name with labels.
pub(crate) struct RouterCounters(BTreeMap<String, f64>);

impl RouterCounters {
    pub(crate) async fn read(ops: SocketAddr) -> anyhow::Result<RouterCounters> {
        let text = reqwest::get(format!("http://{ops}/metrics"))
            .await?
            .error_for_status()?
            .text()
            .await?;
        let mut series = BTreeMap::new();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            if let Some((name, value)) = line.rsplit_once(' ') {
                let value = value.parse().with_context(|| format!("metrics line {line:?}"))?;
                series.insert(name.to_owned(), value);
            }
        }
        Ok(RouterCounters(series))
    }

    /// The series of `metric` (all label sets) and how much each grew since `before`.
    fn growth<'a>(&'a self, before: &'a RouterCounters, metric: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
        self.0
            .iter()
            .filter(move |(name, _)| {
                name.strip_prefix(metric)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(name, value)| (name.as_str(), value - before.0.get(name).copied().unwrap_or(0.0)))
    }

    fn total(&self, before: &RouterCounters, metric: &str) -> f64 {
        self.growth(before, metric).map(|(_, grew)| grew).sum()
    }

    /// The mean time pool builds since `before` spent on `step` (`budget`, `secret`,
    /// `connect`), if there were any.
    pub(crate) fn mean_build_ms(&self, before: &RouterCounters, step: &str) -> Option<f64> {
        let series = format!("{{step=\"{step}\"}}");
        let sum = self.total(before, &format!("silo_router_pool_build_seconds_sum{series}"));
        let count = self.total(before, &format!("silo_router_pool_build_seconds_count{series}"));
        (count > 0.0).then(|| 1000.0 * sum / count)
    }

    /// Prints what the router counted between `before` and now.
    pub(crate) fn print_since(&self, before: &RouterCounters, label: &str) {
        let requests = self.total(before, "silo_router_requests_total");
        let builds = self.total(before, "silo_router_pool_creations_total");
        println!(
            "  {label}: {requests:.0} requests, {builds:.0} pools built ({:.1} per 100 requests)",
            100.0 * builds / requests.max(1.0)
        );
        for step in ["budget", "secret", "connect"] {
            if let Some(mean) = self.mean_build_ms(before, step) {
                println!("      pool builds, {step}: {mean:.1} ms on average");
            }
        }
        for metric in [
            "silo_router_pool_evictions_total",
            "silo_router_spare_connections_closed_total",
            "silo_router_budget_exhausted_total",
            "silo_router_secret_reads_total",
            "silo_router_pool_lookups_total",
        ] {
            for (series, grew) in self.growth(before, metric).filter(|(_, grew)| *grew > 0.0) {
                println!("      {series} +{grew:.0}");
            }
        }
    }
}
