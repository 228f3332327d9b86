//! The client commands: each turns its arguments into admin API calls and prints the result.

use anyhow::bail;
use clap::ValueEnum;
use serde_json::{json, Map, Value};

use super::args::{
    AuditArgs, AuditCommand, Command, GlobalArgs, JobsCommand, KeyCommand, MigrateArgs, MigrateCommand, Output,
    RotateArgs, ServerCommand, TenantCommand, TokenCommand,
};
use super::client::{segment, ApiClient};
use super::output::{self, field, items, print_json, print_table};
use super::wait::{self, wait_job};
use super::{context, drain, usage};
use crate::names::TenantSlug;

/// Runs a client command (anything but `dev`).
pub(crate) async fn run(global: GlobalArgs, command: Command) -> anyhow::Result<()> {
    // Usage problems the parser cannot see are caught before anything is resolved or sent.
    if let Command::Tenant(TenantCommand::Delete { slug, yes: false, .. }) = &command {
        return Err(usage(format!(
            "deleting tenant {slug} destroys its database: pass --yes to confirm"
        )));
    }
    if let Command::Tenant(TenantCommand::Backups {
        delete: Some(file),
        yes: false,
        ..
    }) = &command
    {
        return Err(usage(format!(
            "deleting backup {file} erases it for good: pass --yes to confirm"
        )));
    }
    if let Command::Tenant(TenantCommand::Restore { slug, yes: false, .. }) = &command {
        return Err(usage(format!(
            "restoring tenant {slug} replaces its data with the backup's (a backup of it is taken first): pass --yes to confirm"
        )));
    }
    let client = ApiClient::new(context::resolve(&global)?)?;
    let out = global.output;
    match command {
        Command::Dev(_) => bail!("`dev` is not a client command"),
        Command::Tenant(cmd) => tenant(&client, out, cmd).await,
        Command::Rotate(args) => rotate(&client, out, args).await,
        Command::Migrate(args) => migrate(&client, out, args).await,
        Command::Jobs(cmd) => jobs(&client, out, cmd).await,
        Command::Server(ServerCommand::List) => servers(&client, out).await,
        Command::Server(ServerCommand::Check { logins }) => check_servers(&client, out, logins).await,
        Command::Server(ServerCommand::Drain {
            name,
            to,
            concurrency,
            allow_region_change,
            online,
        }) => {
            let flags = drain::MoveFlags {
                allow_region_change,
                online,
            };
            drain::drain(&client, out, &name, &to, concurrency.into(), flags).await
        }
        Command::Token(cmd) => token(&client, out, cmd).await,
        Command::Audit(args) => audit(&client, out, args).await,
    }
}

fn tenant_path(slug: &TenantSlug) -> String {
    format!("/v1/tenants/{}", segment(slug.as_str()))
}

async fn tenant(client: &ApiClient, out: Output, cmd: TenantCommand) -> anyhow::Result<()> {
    match cmd {
        TenantCommand::Create {
            slug,
            name,
            plan,
            domains,
            server,
            region,
            restore_from,
            no_wait,
        } => {
            let mut body = Map::new();
            body.insert("slug".into(), json!(slug.as_str()));
            if let Some(name) = name {
                body.insert("name".into(), json!(name));
            }
            if let Some(plan) = plan {
                body.insert("plan".into(), json!(plan));
            }
            if !domains.is_empty() {
                body.insert("domains".into(), json!(domains));
            }
            if let Some(server) = server {
                body.insert("server".into(), json!(server));
            }
            if let Some(region) = region {
                body.insert("region".into(), json!(region));
            }
            if let Some(backup) = restore_from {
                // The control plane looks the name up among this tenant's own backups.
                let name = backup.file_name().map(|n| n.to_string_lossy().into_owned());
                body.insert("restore_from".into(), json!(name.unwrap_or_default()));
            }
            let created = client.post("/v1/tenants", &Value::Object(body)).await?;
            let api_key = created.get("api_key").cloned().unwrap_or(Value::Null);
            if no_wait {
                match out {
                    Output::Json => print_json(&created),
                    Output::Table => {
                        let job = created.get("job").unwrap_or(&Value::Null);
                        say!("tenant {slug} is being created by job {}", field(job, "id"));
                        print_api_key(&api_key);
                    }
                }
                return Ok(());
            }
            let tenant = create_and_wait(client, &slug, &created).await?;
            match out {
                Output::Json => print_json(&json!({"tenant": tenant, "api_key": api_key})),
                Output::Table => {
                    output::print_tenant(&tenant);
                    say!();
                    print_api_key(&api_key);
                }
            }
            Ok(())
        }
        TenantCommand::List {
            status,
            server,
            plan,
            region,
        } => {
            let filters = query([
                ("status", status),
                ("server", server),
                ("plan", plan),
                ("region", region),
            ]);
            let list = client.get(&format!("/v1/tenants{filters}")).await?;
            match out {
                Output::Json => print_json(&list),
                Output::Table => output::print_tenants(items(&list)),
            }
            Ok(())
        }
        TenantCommand::Show { slug } => show(out, &client.get(&tenant_path(&slug)).await?),
        TenantCommand::Update {
            slug,
            name,
            plan,
            add_domains,
            remove_domains,
        } => {
            if name.is_none() && plan.is_none() && add_domains.is_empty() && remove_domains.is_empty() {
                return Err(usage(
                    "nothing to change: pass --name, --plan, --add-domain or --remove-domain",
                ));
            }
            let body = json!({
                "name": name,
                "plan": plan,
                "add_domains": add_domains,
                "remove_domains": remove_domains,
            });
            show(out, &client.patch(&tenant_path(&slug), &body).await?)
        }
        TenantCommand::Suspend { slug } => show(
            out,
            &client
                .post(&format!("{}/suspend", tenant_path(&slug)), &json!({}))
                .await?,
        ),
        TenantCommand::Resume { slug } => show(
            out,
            &client
                .post(&format!("{}/resume", tenant_path(&slug)), &json!({}))
                .await?,
        ),
        TenantCommand::Delete {
            slug,
            yes: _,
            backup,
            no_wait,
        } => {
            let resp = client
                .delete(&format!("{}?backup={backup}", tenant_path(&slug)))
                .await?;
            finish_jobs(client, out, resp, no_wait, &format!("deleting {slug}")).await
        }
        TenantCommand::Backup { slug, no_wait } => {
            let resp = client
                .post(&format!("{}/backup", tenant_path(&slug)), &json!({}))
                .await?;
            finish_jobs(client, out, resp, no_wait, &format!("backing up {slug}")).await
        }
        TenantCommand::Backups {
            slug,
            delete: Some(file),
            ..
        } => {
            client
                .delete(&format!("{}/backups/{}", tenant_path(&slug), segment(&file)))
                .await?;
            match out {
                Output::Json => print_json(&json!({ "deleted": file })),
                Output::Table => say!("backup {file} of tenant {slug} deleted"),
            }
            Ok(())
        }
        TenantCommand::Backups {
            slug,
            download: Some(file),
            to: Some(output),
            ..
        } => {
            let path = format!("{}/backups/{}/content", tenant_path(&slug), segment(&file));
            let bytes = client.download(&path, &output).await?;
            match out {
                Output::Json => print_json(&json!({ "file": file, "to": output, "bytes": bytes })),
                Output::Table => say!(
                    "backup {file} of tenant {slug}: {bytes} bytes of pg_dump output written to {} (restore it with pg_restore)",
                    output.display()
                ),
            }
            Ok(())
        }
        TenantCommand::Backups { slug, .. } => {
            let list = client.get(&format!("{}/backups", tenant_path(&slug))).await?;
            match out {
                Output::Json => print_json(&list),
                Output::Table => output::print_backups(items(&list), slug.as_str()),
            }
            Ok(())
        }
        TenantCommand::Sizes { server, limit } => {
            let filters = query([("server", server), ("limit", Some(limit.to_string()))]);
            let sizes = client.get(&format!("/v1/database-sizes{filters}")).await?;
            match out {
                Output::Json => print_json(&sizes),
                Output::Table => output::print_sizes(&sizes),
            }
            Ok(())
        }
        TenantCommand::Restore {
            slug, from, no_wait, ..
        } => {
            // The control plane looks the name up among this tenant's own backups.
            let name = from.file_name().map(|n| n.to_string_lossy().into_owned());
            let resp = client
                .post(
                    &format!("{}/restore", tenant_path(&slug)),
                    &json!({ "backup": name.unwrap_or_default() }),
                )
                .await?;
            finish_jobs(client, out, resp, no_wait, &format!("restoring {slug}")).await
        }
        TenantCommand::Hold { slug, reason, .. } => {
            let path = format!("{}/hold", tenant_path(&slug));
            let tenant = match &reason {
                Some(reason) => client.post(&path, &json!({ "reason": reason })).await?,
                None => client.delete(&path).await?,
            };
            match out {
                Output::Json => print_json(&tenant),
                Output::Table => output::print_tenant(&tenant),
            }
            Ok(())
        }
        TenantCommand::VerifyBackup { slug, from, no_wait } => {
            let body = match from {
                Some(from) => json!({ "backup": from.file_name().map(|n| n.to_string_lossy()).unwrap_or_default() }),
                None => json!({}),
            };
            let resp = client
                .post(&format!("{}/backups/verify", tenant_path(&slug)), &body)
                .await?;
            finish_jobs(client, out, resp, no_wait, &format!("verifying a backup of {slug}")).await
        }
        TenantCommand::Move {
            slug,
            to,
            allow_region_change,
            online,
            no_wait,
        } => {
            let body = json!({ "server": to, "allow_region_change": allow_region_change, "online": online });
            let resp = client.post(&format!("{}/move", tenant_path(&slug)), &body).await?;
            finish_jobs(client, out, resp, no_wait, &format!("moving {slug} to {to}")).await
        }
        TenantCommand::Key(KeyCommand::Create { slug, name }) => {
            let resp = client
                .post(&format!("{}/keys", tenant_path(&slug)), &json!({ "name": name }))
                .await?;
            match out {
                Output::Json => print_json(&resp),
                Output::Table => {
                    say!("key {:?} created for tenant {slug}", field(&resp, "name"));
                    print_api_key(resp.get("api_key").unwrap_or(&Value::Null));
                }
            }
            Ok(())
        }
        TenantCommand::Key(KeyCommand::List { slug }) => {
            let list = client.get(&format!("{}/keys", tenant_path(&slug))).await?;
            match out {
                Output::Json => print_json(&list),
                Output::Table => {
                    let rows: Vec<Vec<String>> = items(&list)
                        .iter()
                        .map(|k| vec![field(k, "name"), field(k, "created_at")])
                        .collect();
                    print_table(&["NAME", "CREATED"], &rows, &format!("tenant {slug} has no API keys"));
                }
            }
            Ok(())
        }
        TenantCommand::Key(KeyCommand::Revoke { slug, name }) => {
            client
                .delete(&format!("{}/keys/{}", tenant_path(&slug), segment(&name)))
                .await?;
            match out {
                Output::Json => print_json(&json!({ "revoked": name })),
                Output::Table => say!("key {name:?} of tenant {slug} revoked"),
            }
            Ok(())
        }
        TenantCommand::Credentials { slug } => {
            // Break-glass: the secret JSON in both output modes; the server audits the read.
            print_json(&client.get(&format!("{}/credentials", tenant_path(&slug))).await?);
            Ok(())
        }
    }
}

/// Waits for the create job of `created` and returns the tenant as it is afterwards.
pub(crate) async fn create_and_wait(client: &ApiClient, slug: &TenantSlug, created: &Value) -> anyhow::Result<Value> {
    let job = created.get("job").cloned().unwrap_or(Value::Null);
    let job = wait_job(client, &job, &format!("creating {slug}")).await?;
    if wait::state(&job) == "failed" {
        bail!("{}", wait::failure(&job));
    }
    Ok(client.get(&tenant_path(slug)).await?)
}

fn print_api_key(key: &Value) {
    say!("API key: {}", output::text(key));
    say!("(shown once: store it now; `siloctl tenant key create` mints another)");
}

fn show(out: Output, tenant: &Value) -> anyhow::Result<()> {
    match out {
        Output::Json => print_json(tenant),
        Output::Table => output::print_tenant(tenant),
    }
    Ok(())
}

async fn rotate(client: &ApiClient, out: Output, args: RotateArgs) -> anyhow::Result<()> {
    let strategy = args.strategy.map(|s| s.as_str());
    let mut body = Map::new();
    if let Some(s) = strategy {
        body.insert("strategy".into(), json!(s));
    }
    let resp = if args.slugs.is_empty() {
        body.insert("all".into(), json!(args.all));
        body.insert("due".into(), json!(args.due));
        client.post("/v1/rotations", &Value::Object(body)).await?
    } else {
        let mut jobs = Vec::with_capacity(args.slugs.len());
        for slug in &args.slugs {
            let resp = client
                .post(&format!("{}/rotate", tenant_path(slug)), &Value::Object(body.clone()))
                .await?;
            jobs.push(resp.get("job").cloned().unwrap_or(Value::Null));
        }
        json!({ "jobs": jobs })
    };
    finish_jobs(client, out, resp, args.no_wait, "rotating").await
}

async fn migrate(client: &ApiClient, out: Output, args: MigrateArgs) -> anyhow::Result<()> {
    if let Some(MigrateCommand::Status) = args.command {
        let status = client.get("/v1/migrations/status").await?;
        match out {
            Output::Json => print_json(&status),
            Output::Table => {
                say!("target version: {}", field(&status, "target_version"));
                let rows: Vec<Vec<String>> = items(&status)
                    .iter()
                    .map(|t| {
                        ["slug", "server", "schema_version", "status"]
                            .iter()
                            .map(|k| field(t, k))
                            .collect()
                    })
                    .collect();
                print_table(&["SLUG", "SERVER", "VERSION", "STATUS"], &rows, "no tenants");
            }
        }
        return Ok(());
    }
    let mut body = Map::new();
    if !args.all {
        let slugs: Vec<&str> = args.slugs.iter().map(TenantSlug::as_str).collect();
        body.insert("tenants".into(), json!(slugs));
    }
    if let Some(n) = args.concurrency {
        body.insert("concurrency".into(), json!(n));
    }
    if let Some(n) = args.canary {
        body.insert("canary".into(), json!(n));
    }
    let resp = client.post("/v1/migrations", &Value::Object(body)).await?;
    finish_jobs(client, out, resp, args.no_wait, "migrating").await
}

async fn jobs(client: &ApiClient, out: Output, cmd: JobsCommand) -> anyhow::Result<()> {
    match cmd {
        JobsCommand::List(args) => {
            let state = args
                .state
                .and_then(|s| s.to_possible_value())
                .map(|v| v.get_name().to_owned());
            let filters = query([
                ("limit", Some(args.limit.to_string())),
                ("state", state),
                ("kind", args.kind),
                ("tenant", args.tenant.map(|t| t.as_str().to_owned())),
                ("before", args.before.map(|id| id.to_string())),
            ]);
            let list = client.get(&format!("/v1/jobs{filters}")).await?;
            match out {
                Output::Json => print_json(&list),
                Output::Table => output::print_jobs(items(&list)),
            }
            Ok(())
        }
        JobsCommand::Show { id } => {
            let job = client.get(&format!("/v1/jobs/{}", segment(&id))).await?;
            match out {
                Output::Json => print_json(&job),
                Output::Table => output::print_job(&job),
            }
            Ok(())
        }
        JobsCommand::Retry { id, no_wait } => {
            let resp = client
                .post(&format!("/v1/jobs/{}/retry", segment(&id)), &json!({}))
                .await?;
            finish_jobs(client, out, resp, no_wait, "retrying").await
        }
        JobsCommand::Cancel { id, no_wait } => {
            let resp = client
                .post(&format!("/v1/jobs/{}/cancel", segment(&id)), &json!({}))
                .await?;
            let job = match &resp["job"] {
                job if wait::state(job) == "running" && !no_wait => {
                    let ended = wait_job(client, job, "stopping the rollout").await?;
                    if wait::state(&ended) == "succeeded" {
                        eprintln!(
                            "job {id}: every tenant had been launched when the stop was asked; the rollout finished"
                        );
                    }
                    ended
                }
                job => job.clone(),
            };
            match out {
                Output::Json => print_json(&json!({ "job": job })),
                Output::Table => output::print_job(&job),
            }
            Ok(())
        }
    }
}

async fn servers(client: &ApiClient, out: Output) -> anyhow::Result<()> {
    let list = client.get("/v1/servers").await?;
    match out {
        Output::Json => print_json(&list),
        Output::Table => {
            let rows: Vec<Vec<String>> = items(&list)
                .iter()
                .map(|s| {
                    ["name", "region", "host", "port", "tenants", "max_tenants", "sslmode"]
                        .iter()
                        .map(|k| field(s, k))
                        .collect()
                })
                .collect();
            print_table(
                &["NAME", "REGION", "HOST", "PORT", "TENANTS", "MAX", "SSLMODE"],
                &rows,
                "no servers",
            );
        }
    }
    Ok(())
}

/// `siloctl server check [--logins]`: one line per thing a server holds that the catalog
/// does not account for, or lacks, and per tenant whose secret does not log in; exit 1 unless
/// there is none.
async fn check_servers(client: &ApiClient, out: Output, logins: bool) -> anyhow::Result<()> {
    let check = client.get(&format!("/v1/servers/check?logins={logins}")).await?;
    let servers = check["servers"].as_array().map(Vec::as_slice).unwrap_or_default();
    match out {
        Output::Json => print_json(&check),
        Output::Table => {
            for server in servers {
                let name = field(server, "name");
                if let Some(error) = server["error"].as_str() {
                    say!("{name}: not checked: {error}");
                    continue;
                }
                let listed = |key: &str| server[key].as_array().cloned().unwrap_or_default();
                let (databases, roles, missing, refused) = (
                    listed("untracked_databases"),
                    listed("untracked_roles"),
                    listed("missing_databases"),
                    listed("refused_logins"),
                );
                for database in &databases {
                    say!(
                        "{name}: untracked database {} (no tenant of the catalog is there)",
                        output::text(database)
                    );
                }
                for role in &roles {
                    say!("{name}: untracked role {}", output::text(role));
                }
                for tenant in &missing {
                    say!(
                        "{name}: missing database {} of tenant {}",
                        field(tenant, "database"),
                        field(tenant, "slug")
                    );
                }
                for tenant in &refused {
                    say!(
                        "{name}: tenant {} does not log in with its secret: {}",
                        field(tenant, "slug"),
                        field(tenant, "error")
                    );
                }
                if databases.is_empty() && roles.is_empty() && missing.is_empty() && refused.is_empty() {
                    say!("{name}: as the catalog says");
                }
            }
        }
    }
    if check["consistent"] != Value::Bool(true) {
        bail!("the servers do not hold what the catalog says (README: \"Restoring the catalog\")");
    }
    Ok(())
}

async fn token(client: &ApiClient, out: Output, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create { name, role, expires_in } => {
            let body = json!({ "name": name, "role": role.as_str(), "expires_in": expires_in });
            let resp = client.post("/v1/tokens", &body).await?;
            match out {
                Output::Json => print_json(&resp),
                Output::Table => {
                    say!(
                        "{} token {:?} created; it is shown this once:",
                        field(&resp, "role"),
                        field(&resp, "name")
                    );
                    say!("{}", field(&resp, "token"));
                }
            }
        }
        TokenCommand::List => {
            let list = client.get("/v1/tokens").await?;
            match out {
                Output::Json => print_json(&list),
                Output::Table => {
                    let rows: Vec<Vec<String>> = items(&list)
                        .iter()
                        .map(|t| {
                            vec![
                                field(t, "name"),
                                field(t, "role"),
                                field(t, "created_at"),
                                field(t, "expires_at"),
                                field(t, "last_used_at"),
                            ]
                        })
                        .collect();
                    print_table(
                        &["NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"],
                        &rows,
                        "no admin tokens",
                    );
                }
            }
        }
        TokenCommand::Revoke { name } => {
            client.delete(&format!("/v1/tokens/{}", segment(&name))).await?;
            match out {
                Output::Json => print_json(&json!({ "revoked": name })),
                Output::Table => say!("admin token {name:?} revoked"),
            }
        }
    }
    Ok(())
}

/// The query string (`?k=v&...`, or nothing) of the parameters that are set, their values
/// percent-encoded.
fn query<const N: usize>(parameters: [(&str, Option<String>); N]) -> String {
    let set: Vec<String> = parameters
        .into_iter()
        .filter_map(|(key, value)| Some(format!("{key}={}", segment(&value?))))
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("?{}", set.join("&"))
    }
}

async fn audit(client: &ApiClient, out: Output, args: AuditArgs) -> anyhow::Result<()> {
    if let Some(AuditCommand::Verify) = args.command {
        return verify_audit(client, out).await;
    }
    let filters = |limit: u16, after: Option<String>| {
        query([
            ("limit", Some(limit.to_string())),
            ("tenant", args.tenant.as_ref().map(|t| t.as_str().to_owned())),
            ("actor", args.actor.clone()),
            ("action", args.action.clone()),
            ("before", args.before.map(|id| id.to_string())),
            ("after", after),
        ])
    };
    if args.follow {
        let after = args.after.map_or_else(|| "end".to_owned(), |cursor| cursor.to_string());
        return follow_audit(
            client,
            out,
            |after| format!("/v1/audit{}", filters(FOLLOW_PAGE, Some(after))),
            after,
        )
        .await;
    }
    let page = client
        .get(&format!(
            "/v1/audit{}",
            filters(args.limit, args.after.map(|c| c.to_string()))
        ))
        .await?;
    match out {
        Output::Json => print_json(&page),
        Output::Table => {
            output::print_audit(items(&page));
            if let Some(next) = page.get("next").and_then(Value::as_str) {
                eprintln!("next: siloctl audit --after {next}");
            }
        }
    }
    Ok(())
}

/// `siloctl audit verify`: the seals checked by the control plane; exit 1 when the log is not
/// as it was sealed.
async fn verify_audit(client: &ApiClient, out: Output) -> anyhow::Result<()> {
    let verification = client.get("/v1/audit/verify").await?;
    match out {
        Output::Json => print_json(&verification),
        Output::Table => output::print_audit_verification(&verification),
    }
    if verification["intact"] == Value::Bool(true) {
        Ok(())
    } else {
        bail!("the audit log is not as it was sealed")
    }
}

/// Entries asked for at a time by `siloctl audit --follow`.
const FOLLOW_PAGE: u16 = 1000;

/// `siloctl audit --follow`: polls `GET /v1/audit?after=` and prints each entry on a line of
/// its own until interrupted or stdout closes. Only the first request's failure ends it; later
/// ones (a control plane restarting) are retried.
async fn follow_audit(
    client: &ApiClient,
    out: Output,
    path: impl Fn(String) -> String,
    mut after: String,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    const POLL: std::time::Duration = std::time::Duration::from_secs(1);

    let mut first = true;
    loop {
        let page = match client.get(&path(after.clone())).await {
            Ok(page) => page,
            Err(e) if !first => {
                eprintln!("warning: {e}; retrying");
                tokio::select! {
                    () = tokio::time::sleep(POLL * 2) => continue,
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        first = false;
        let entries = items(&page);
        let mut stdout = std::io::stdout().lock();
        for entry in entries {
            let line = match out {
                Output::Json => entry.to_string(),
                Output::Table => output::audit_line(entry),
            };
            if writeln!(stdout, "{line}").and_then(|()| stdout.flush()).is_err() {
                // Whoever read the output is gone.
                return Ok(());
            }
        }
        drop(stdout);
        let Some(next) = page.get("next").and_then(Value::as_str) else {
            bail!("unexpected response from the admin API: no next cursor");
        };
        after = next.to_owned();
        if entries.len() == usize::from(FOLLOW_PAGE) {
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

/// Handles a `{"job"}` or `{"jobs":[...]}` response: print it as is with `--no-wait`, else
/// wait for every job, print the final states and fail if any job failed.
async fn finish_jobs(client: &ApiClient, out: Output, resp: Value, no_wait: bool, label: &str) -> anyhow::Result<()> {
    let single = resp.get("job").is_some();
    let jobs: Vec<Value> = match (resp.get("job"), resp.get("jobs")) {
        (Some(job), _) => vec![job.clone()],
        (None, Some(Value::Array(jobs))) => jobs.clone(),
        _ => bail!("unexpected response from the admin API: no job in it"),
    };
    let finished = if no_wait {
        jobs
    } else {
        let mut finished = Vec::with_capacity(jobs.len());
        let n = jobs.len();
        for (i, job) in jobs.iter().enumerate() {
            let tenant = field(job, "tenant");
            let mut label = label.to_owned();
            if tenant != "-" && !label.contains(&tenant) {
                label = format!("{label} {tenant}");
            }
            if n > 1 {
                label = format!("{label} ({}/{n})", i + 1);
            }
            finished.push(wait_job(client, job, &label).await?);
        }
        finished
    };
    match out {
        Output::Json if single => print_json(&json!({ "job": finished.first() })),
        Output::Json => print_json(&json!({ "jobs": finished })),
        Output::Table if finished.is_empty() => say!("nothing to do"),
        Output::Table if single => {
            if let Some(job) = finished.first() {
                output::print_job(job);
            }
        }
        Output::Table => output::print_jobs(&finished),
    }
    if no_wait {
        return Ok(());
    }
    let failed: Vec<&Value> = finished.iter().filter(|j| wait::state(j) == "failed").collect();
    match failed.as_slice() {
        [] => Ok(()),
        [job] => bail!("{}", wait::failure(job)),
        many => bail!(
            "{} of {} jobs failed (first: {})",
            many.len(),
            finished.len(),
            many.first().map(|j| wait::failure(j)).unwrap_or_default()
        ),
    }
}
