//! Printing results: the API's JSON as is (`-o json`), or aligned tables for people.

use serde_json::Value;

/// Prints `value` as pretty JSON on stdout.
pub(crate) fn print_json(value: &Value) {
    say!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
    );
}

/// A field of a JSON object as display text: strings as they are, lists joined with ",",
/// null or missing as "-".
pub(crate) fn field(v: &Value, key: &str) -> String {
    text(v.get(key).unwrap_or(&Value::Null))
}

/// A JSON value as display text.
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// The `items` array of a list response.
pub(crate) fn items(v: &Value) -> &[Value] {
    v.get("items").and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// Renders rows under headers with columns padded to their widest cell.
pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints `table(headers, rows)`, or a note when there are no rows.
pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        say!("{empty}");
    } else {
        say!("{}", table(headers, rows).trim_end());
    }
}

/// Prints `key: value` lines with the values aligned.
pub(crate) fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in fields {
        say!("{k:<width$}  {v}", k = format!("{k}:"), width = width + 1);
    }
}

/// A tenant as `key: value` lines.
pub(crate) fn print_tenant(t: &Value) {
    let moving_to = t.get("moving_to").map(|_| ("moving to", field(t, "moving_to")));
    let restoring_from = t
        .get("restoring_from")
        .map(|_| ("restoring from", field(t, "restoring_from")));
    let legal_hold = t.get("legal_hold").map(|_| ("legal hold", field(t, "legal_hold")));
    let region = t.get("region").map(|_| ("region", field(t, "region")));
    let fields: Vec<(&str, String)> = [
        ("slug", field(t, "slug")),
        ("name", field(t, "name")),
        ("status", field(t, "status")),
        ("plan", field(t, "plan")),
        ("server", field(t, "server")),
        ("database", field(t, "database")),
        ("domains", field(t, "domains")),
        ("schema version", field(t, "schema_version")),
        ("credentials rotated", field(t, "credentials_rotated_at")),
        ("created", field(t, "created_at")),
    ]
    .into_iter()
    .chain(region)
    .chain(moving_to)
    .chain(restoring_from)
    .chain(legal_hold)
    .collect();
    print_fields(&fields);
}

/// A tenant's backups as a table.
pub(crate) fn print_backups(backups: &[Value], slug: &str) {
    let rows: Vec<Vec<String>> = backups
        .iter()
        .map(|b| {
            vec![
                field(b, "file"),
                field(b, "bytes"),
                field(b, "created_at"),
                field(b, "job"),
                match b["encrypted"].as_bool() {
                    Some(true) => "yes",
                    Some(false) => "no",
                    None => "-",
                }
                .to_owned(),
                stored_in(b),
                field(b, "verified_at"),
            ]
        })
        .collect();
    print_table(
        &["FILE", "BYTES", "CREATED", "JOB", "ENCRYPTED", "STORED IN", "VERIFIED"],
        &rows,
        &format!("no backups of {slug}"),
    );
}

/// Where a backup's copies are: `local`, `s3` or `local+s3`.
fn stored_in(backup: &Value) -> String {
    let places: Vec<&str> = [("local", "local"), ("s3", "s3")]
        .into_iter()
        .filter(|(key, _)| backup[*key] == true)
        .map(|(_, place)| place)
        .collect();
    let places = places.join("+");
    if backup["archived"] == true {
        format!("{places} (archived)")
    } else {
        places
    }
}

/// Tenants' database sizes, largest first, then each server's total; servers that could not
/// be asked are named on stderr.
pub(crate) fn print_sizes(sizes: &Value) {
    let bytes = |v: &Value| v.get("bytes").and_then(Value::as_u64);
    let size = |v: &Value| bytes(v).map_or_else(|| "-".to_owned(), human_bytes);
    let rows: Vec<Vec<String>> = items(sizes)
        .iter()
        .map(|t| vec![field(t, "slug"), field(t, "server"), size(t), field(t, "bytes")])
        .collect();
    print_table(&["TENANT", "SERVER", "SIZE", "BYTES"], &rows, "no tenant databases");
    let servers = sizes
        .get("servers")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let totals: Vec<Vec<String>> = servers
        .iter()
        .filter(|s| bytes(s).is_some())
        .map(|s| vec![field(s, "name"), field(s, "tenants"), size(s)])
        .collect();
    if !totals.is_empty() {
        say!();
        print_table(&["SERVER", "TENANTS", "TOTAL"], &totals, "");
    }
    for server in servers.iter().filter(|s| bytes(s).is_none()) {
        eprintln!("warning: server {}: {}", field(server, "name"), field(server, "error"));
    }
}

/// `bytes` in binary units with one decimal: `7.6 MiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Audit log entries as a table, the details as compact JSON.
pub(crate) fn print_audit(entries: &[Value]) {
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                field(e, "id"),
                field(e, "at"),
                field(e, "actor"),
                field(e, "action"),
                field(e, "tenant"),
                e.get("detail").map_or_else(|| "-".into(), Value::to_string),
            ]
        })
        .collect();
    print_table(
        &["ID", "AT", "ACTOR", "ACTION", "TENANT", "DETAIL"],
        &rows,
        "no audit entries",
    );
}

/// What `GET /v1/audit/verify` found: the counts, the head to compare with a copy kept
/// elsewhere, and each problem on a line.
pub(crate) fn print_audit_verification(v: &Value) {
    println!(
        "{} entries sealed, {} not sealed yet",
        field(v, "sealed"),
        field(v, "unsealed")
    );
    match v.get("head").filter(|head| head.is_object()) {
        Some(head) => println!(
            "head: seal {} of entry {}, {}: {}",
            field(head, "seq"),
            field(head, "entry"),
            field(head, "sealed_at"),
            field(head, "hash")
        ),
        None => println!("head: nothing sealed yet"),
    }
    let problems = v
        .get("problems")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    for problem in problems {
        println!("entry {}: {}", field(problem, "entry"), field(problem, "problem"));
    }
    if problems.is_empty() {
        println!("intact: every sealed entry is as it was sealed");
    }
}

/// One audit log entry on a line: time, actor, action, tenant, details.
pub(crate) fn audit_line(e: &Value) -> String {
    format!(
        "{}  {}  {}  {}  {}",
        field(e, "at"),
        field(e, "actor"),
        field(e, "action"),
        field(e, "tenant"),
        e.get("detail").map_or_else(|| "-".into(), Value::to_string)
    )
}

/// Tenants as a table.
pub(crate) fn print_tenants(tenants: &[Value]) {
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            [
                "slug",
                "name",
                "status",
                "plan",
                "server",
                "database",
                "schema_version",
                "domains",
                "created_at",
            ]
            .iter()
            .map(|k| field(t, k))
            .collect()
        })
        .collect();
    print_table(
        &[
            "SLUG", "NAME", "STATUS", "PLAN", "SERVER", "DATABASE", "SCHEMA", "DOMAINS", "CREATED",
        ],
        &rows,
        "no tenants",
    );
}

/// Jobs as a table.
pub(crate) fn print_jobs(jobs: &[Value]) {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let mut row: Vec<String> = ["id", "kind", "tenant", "state", "step", "attempts", "updated_at"]
                .iter()
                .map(|k| field(j, k))
                .collect();
            row.push(super::one_line(&field(j, "error")));
            row
        })
        .collect();
    print_table(
        &["ID", "KIND", "TENANT", "STATE", "STEP", "ATTEMPTS", "UPDATED", "ERROR"],
        &rows,
        "no jobs",
    );
}

/// A job as `key: value` lines.
pub(crate) fn print_job(j: &Value) {
    let progress = match j.get("progress") {
        Some(p @ Value::Object(m)) if !m.is_empty() => p.to_string(),
        _ => "-".into(),
    };
    print_fields(&[
        ("id", field(j, "id")),
        ("kind", field(j, "kind")),
        ("tenant", field(j, "tenant")),
        ("state", field(j, "state")),
        ("step", field(j, "step")),
        ("attempts", field(j, "attempts")),
        ("progress", progress),
        ("error", field(j, "error")),
        ("created", field(j, "created_at")),
        ("updated", field(j, "updated_at")),
    ]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(
            &["A", "LONG"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]],
        );
        assert_eq!(t, "A    LONG\nxyz  1\nq    22\n");
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(7_959_000), "7.6 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn fields_render_lists_and_nulls() {
        let v = serde_json::json!({"d": ["a.com", "b.com"], "n": null, "e": [], "v": 3});
        assert_eq!(field(&v, "d"), "a.com,b.com");
        assert_eq!(field(&v, "n"), "-");
        assert_eq!(field(&v, "e"), "-");
        assert_eq!(field(&v, "v"), "3");
        assert_eq!(field(&v, "missing"), "-");
    }
}
