//! `deploy/prometheus/silo-alerts.yaml`, the alerting rules silo ships: every rule is
//! complete, and every metric it names is one silo exports, so that renaming a metric cannot
//! leave an alert that never fires.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The text of every Rust source file under `dir`.
fn sources(dir: &Path, text: &mut String) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, text);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            text.push_str(&std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The `silo_*` metric names in `text`, histogram series (`_bucket`, `_sum`, `_count`)
/// under their histogram's name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("silo_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let histogram = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix));
        names.insert(histogram.unwrap_or(&name).to_owned());
    }
    names
}

#[test]
fn every_shipped_alert_is_complete_and_queries_metrics_silo_exports() {
    let rules = std::fs::read_to_string(workspace().join("deploy/prometheus/silo-alerts.yaml")).unwrap();
    let mut exported = String::new();
    sources(&workspace().join("control-plane/src"), &mut exported);
    sources(&workspace().join("router/src"), &mut exported);

    let blocks: Vec<&str> = rules.split("- alert: ").skip(1).collect();
    assert!(blocks.len() >= 10, "{} rules", blocks.len());
    let mut alerts = BTreeSet::new();
    for block in &blocks {
        let name = block.lines().next().unwrap().trim();
        assert!(
            name.starts_with("Silo") && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "{name}"
        );
        assert!(alerts.insert(name), "{name} twice");
        for field in ["expr:", "severity: ", "summary: ", "description: "] {
            assert!(block.contains(field), "{name} has no {field}");
        }
        let severity = block.split("severity: ").nth(1).unwrap().lines().next().unwrap();
        assert!(["page", "ticket"].contains(&severity), "{name}: severity {severity}");
        let metrics = metric_names(block);
        assert!(!metrics.is_empty(), "{name} queries no silo metric");
        for metric in metrics {
            assert!(
                exported.contains(&format!("\"{metric}\"")),
                "{name} names {metric}, which silo does not export"
            );
        }
    }
}
