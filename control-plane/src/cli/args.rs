//! The command line, declared with clap derive: `///` comments are the help text.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};

use crate::api::TokenRole;
use crate::names::{is_admin_token_name, TenantSlug, ADMIN_TOKEN_NAME_RULE};

/// siloctl: operate silo, one PostgreSQL database per tenant.
///
/// Talks to the control plane's admin API. Without --endpoint/--token (or SILO_ENDPOINT/
/// SILO_TOKEN) it uses ./.silo/env, then the context the last `siloctl dev` wrote.
#[derive(Debug, Parser)]
#[command(name = "siloctl", version)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct GlobalArgs {
    /// Admin API URL, e.g. http://127.0.0.1:7070.
    #[arg(long, env = "SILO_ENDPOINT", global = true, value_name = "URL")]
    pub(crate) endpoint: Option<String>,
    /// Admin API bearer token.
    #[arg(long, env = "SILO_TOKEN", global = true, value_name = "T", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    /// PEM file of the CA(s) to trust for an https:// endpoint, besides the system's.
    #[arg(long, env = "SILO_CACERT", global = true, value_name = "FILE")]
    pub(crate) cacert: Option<PathBuf>,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned columns for people.
    Table,
    /// The admin API's JSON, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a complete local stack (PostgreSQL, control plane, router) in the foreground.
    Dev(DevArgs),
    /// Create, inspect, suspend, back up, move and delete tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Rotate tenant database credentials.
    Rotate(RotateArgs),
    /// Roll tenant schema migrations out, or show where each tenant stands.
    Migrate(MigrateArgs),
    /// Inspect and retry control-plane jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// PostgreSQL servers that hold tenant databases.
    #[command(subcommand)]
    Server(ServerCommand),
    /// Admin tokens: one per operator or automation, so the audit log names who did what.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Read the audit log, newest first; `siloctl audit verify` checks its seals.
    Audit(AuditArgs),
}

/// Arguments of `siloctl dev`.
#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Directory for the clusters, config, keys and logs (reused on later runs).
    #[arg(long, value_name = "DIR", default_value = ".silo")]
    pub(crate) data_dir: PathBuf,
    /// Router HTTP port (0 picks a free one).
    #[arg(long, value_name = "N", default_value_t = 8080)]
    pub(crate) http_port: u16,
    /// Router HTTPS port (0 picks a free one).
    #[arg(long, value_name = "N", default_value_t = 8443)]
    pub(crate) https_port: u16,
    /// Number of local PostgreSQL servers for tenant databases.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub(crate) servers: u16,
    /// Where tenant credentials are kept.
    #[arg(long, value_enum, default_value_t = SecretsKind::Local)]
    pub(crate) secrets: SecretsKind,
    /// AWS Secrets Manager endpoint (moto, LocalStack) for --secrets aws.
    #[arg(long, value_name = "URL")]
    pub(crate) aws_endpoint_url: Option<String>,
    /// Also create tenant `demo` and print its API key.
    #[arg(long)]
    pub(crate) demo: bool,
    /// Read tenant migrations from this directory at run time (`tenant_migrations_dir`), so
    /// a new file is rolled out by `siloctl migrate` without a rebuild; scripts/dev passes
    /// migrations/tenant. Default: the migrations built into the binaries.
    #[arg(long, value_name = "DIR")]
    pub(crate) tenant_migrations_dir: Option<PathBuf>,
    /// Admin API port [default: 7070, or a free one while 7070 is taken] (0 picks a free one).
    #[arg(long, value_name = "N")]
    pub(crate) api_port: Option<u16>,
    /// Router operations port: /healthz, /readyz, /metrics [default: 9090, or a free one while
    /// 9090 is taken] (0 picks a free one).
    #[arg(long, value_name = "N")]
    pub(crate) metrics_port: Option<u16>,
}

/// The secret store `siloctl dev` configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum SecretsKind {
    /// Encrypted in the catalog under {data-dir}/master.key.
    Local,
    /// AWS Secrets Manager (set --aws-endpoint-url for moto).
    Aws,
}

#[derive(Debug, Subcommand)]
pub(crate) enum TenantCommand {
    /// Create a tenant: its database, login role, secret and first API key.
    Create {
        /// The tenant's slug: 3-32 of a-z, 0-9 and '-'.
        slug: TenantSlug,
        /// Display name.
        #[arg(long, value_name = "TEXT")]
        name: Option<String>,
        /// Plan.
        #[arg(long)]
        plan: Option<String>,
        /// A custom domain routed to this tenant (repeatable).
        #[arg(long = "domain", value_name = "HOST")]
        domains: Vec<String>,
        /// Place the tenant on this server instead of the least loaded one.
        #[arg(long, value_name = "NAME")]
        server: Option<String>,
        /// Place the tenant on a server in this region (`siloctl server list` shows them).
        #[arg(long, value_name = "REGION")]
        region: Option<String>,
        /// Restore the new database from this backup of the same slug (a file in
        /// [backups] dir/SLUG/, as `siloctl tenant backups SLUG` lists them).
        #[arg(long, value_name = "FILE")]
        restore_from: Option<std::path::PathBuf>,
        /// Return once the job is queued instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List tenants (deleted ones with --status deleted).
    List {
        /// Only tenants in this status.
        #[arg(long, value_parser = ["provisioning", "active", "suspended", "deleting", "deleted", "failed"])]
        status: Option<String>,
        /// Only tenants on this server.
        #[arg(long, value_name = "NAME")]
        server: Option<String>,
        /// Only tenants on this plan.
        #[arg(long)]
        plan: Option<String>,
        /// Only tenants on servers in this region.
        #[arg(long, value_name = "REGION")]
        region: Option<String>,
    },
    /// Show one tenant.
    Show {
        /// The tenant's slug.
        slug: TenantSlug,
    },
    /// Change a tenant's name, plan or custom domains (routers apply it within a second).
    Update {
        /// The tenant's slug.
        slug: TenantSlug,
        /// New display name.
        #[arg(long, value_name = "TEXT")]
        name: Option<String>,
        /// New plan (its limits apply from the next request).
        #[arg(long)]
        plan: Option<String>,
        /// A custom domain to route to this tenant (repeatable).
        #[arg(long = "add-domain", value_name = "HOST")]
        add_domains: Vec<String>,
        /// A custom domain to stop routing to it (repeatable).
        #[arg(long = "remove-domain", value_name = "HOST")]
        remove_domains: Vec<String>,
    },
    /// Suspend a tenant: the router answers 403 until it is resumed.
    Suspend {
        /// The tenant's slug.
        slug: TenantSlug,
    },
    /// Resume a suspended tenant.
    Resume {
        /// The tenant's slug.
        slug: TenantSlug,
    },
    /// Delete a tenant, its database, roles and secret.
    Delete {
        /// The tenant's slug.
        slug: TenantSlug,
        /// Confirm the deletion.
        #[arg(long)]
        yes: bool,
        /// Take a backup of the database first.
        #[arg(long)]
        backup: bool,
        /// Return once the job is queued instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Back up a tenant's database into [backups] dir while it keeps serving.
    Backup {
        /// The tenant's slug.
        slug: TenantSlug,
        /// Return once the job is queued instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List a tenant's backups, newest first (a deleted tenant's too): the files
    /// `tenant create SLUG --restore-from FILE` restores.
    Backups {
        /// The tenant's slug.
        slug: TenantSlug,
        /// Erase this backup instead of listing (e.g. a deleted tenant's data); needs --yes.
        #[arg(long, value_name = "FILE", conflicts_with = "download")]
        delete: Option<String>,
        /// Download this backup instead of listing, as the pg_dump file it was taken as
        /// (decrypted), to --to: a tenant's data handed back, or a restore outside silo.
        #[arg(long, value_name = "FILE", requires = "to")]
        download: Option<String>,
        /// Where --download writes (a new file, mode 0600).
        #[arg(long, value_name = "PATH", requires = "download")]
        to: Option<PathBuf>,
        /// Confirm --delete.
        #[arg(long)]
        yes: bool,
    },
    /// Put a tenant's data back as one of its backups holds it (a backup of the data as it is
    /// now is taken first; the tenant answers 503 meanwhile). Needs --yes.
    Restore {
        /// The tenant's slug.
        slug: TenantSlug,
        /// One of the tenant's backups (a file name as `tenant backups SLUG` lists them).
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Confirm: the tenant's current data is replaced.
        #[arg(long)]
        yes: bool,
        /// Return once the job is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// Put a tenant's data under legal hold (it cannot be deleted, and none of its backups is
    /// erased, by hand or by retention), or release it. A deleted tenant can be held too.
    Hold {
        /// The tenant's slug.
        slug: TenantSlug,
        /// Why: a case or ticket reference.
        #[arg(
            long,
            value_name = "TEXT",
            required_unless_present = "release",
            conflicts_with = "release"
        )]
        reason: Option<String>,
        /// Release the hold instead.
        #[arg(long)]
        release: bool,
    },
    /// Prove a backup restores: restore it into a scratch database on the tenant's server, count
    /// what it holds, drop it (the tenant keeps serving).
    VerifyBackup {
        /// The tenant's slug.
        slug: TenantSlug,
        /// One of the tenant's backups (a file name as `tenant backups SLUG` lists them);
        /// default: its newest.
        #[arg(long, value_name = "FILE")]
        from: Option<PathBuf>,
        /// Return once the job is queued.
        #[arg(long)]
        no_wait: bool,
    },
    /// List tenants' databases by the disk they take, largest first, with each server's total.
    Sizes {
        /// Only the tenants on this server.
        #[arg(long, value_name = "NAME")]
        server: Option<String>,
        /// How many tenants to list.
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=1000))]
        limit: u16,
    },
    /// Move a tenant's database to another server (the tenant answers 503 meanwhile, or with
    /// --online only for the cutover; needs [backups] dir, where the copy's dump is kept).
    Move {
        /// The tenant's slug.
        slug: TenantSlug,
        /// The server to move it to (see `siloctl server list`).
        #[arg(long, value_name = "SERVER")]
        to: String,
        /// Move it even though the server is in another region than the tenant's.
        #[arg(long)]
        allow_region_change: bool,
        /// Copy it by logical replication while it is served (superuser admin roles, and
        /// wal_level = logical on its server).
        #[arg(long)]
        online: bool,
        /// Return once the job is queued instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Tenant API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Break-glass: print the tenant's current database secret (audited).
    Credentials {
        /// The tenant's slug.
        slug: TenantSlug,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Mint a new API key for a tenant (shown once).
    Create {
        /// The tenant's slug.
        slug: TenantSlug,
        /// A name for the key.
        #[arg(long)]
        name: String,
    },
    /// List a tenant's API keys by name (never the keys).
    List {
        /// The tenant's slug.
        slug: TenantSlug,
    },
    /// Revoke a tenant's API key: refused by the router within 5 seconds.
    Revoke {
        /// The tenant's slug.
        slug: TenantSlug,
        /// The key's name.
        #[arg(long)]
        name: String,
    },
}

/// A rotation strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Strategy {
    /// One login role; its password changes.
    Single,
    /// Two login roles take turns.
    Alternating,
}

impl Strategy {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Alternating => "alternating",
        }
    }
}

/// Arguments of `siloctl rotate`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["slugs", "all", "due"])))]
pub(crate) struct RotateArgs {
    /// Tenants to rotate.
    pub(crate) slugs: Vec<TenantSlug>,
    /// Rotate every active tenant.
    #[arg(long)]
    pub(crate) all: bool,
    /// Rotate the tenants whose credentials are older than the rotation interval.
    #[arg(long)]
    pub(crate) due: bool,
    /// Rotation strategy (default: the server's configured one).
    #[arg(long, value_enum)]
    pub(crate) strategy: Option<Strategy>,
    /// Return once the jobs are queued instead of waiting for them.
    #[arg(long)]
    pub(crate) no_wait: bool,
}

/// Arguments of `siloctl migrate`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
#[command(group(ArgGroup::new("target").required(true).args(["slugs", "all"])))]
pub(crate) struct MigrateArgs {
    #[command(subcommand)]
    pub(crate) command: Option<MigrateCommand>,
    /// Tenants to migrate.
    pub(crate) slugs: Vec<TenantSlug>,
    /// Migrate every tenant.
    #[arg(long)]
    pub(crate) all: bool,
    /// Tenants migrated at the same time.
    #[arg(long, value_name = "N")]
    pub(crate) concurrency: Option<u32>,
    /// Migrate this many tenants first and stop if any fails.
    #[arg(long, value_name = "N")]
    pub(crate) canary: Option<u32>,
    /// Return once the job is queued instead of waiting for it.
    #[arg(long)]
    pub(crate) no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum MigrateCommand {
    /// Each tenant's schema version against the target version.
    Status,
}

#[derive(Debug, Subcommand)]
pub(crate) enum JobsCommand {
    /// List jobs, newest first.
    List(JobsListArgs),
    /// Show one job.
    Show {
        /// The job id.
        id: String,
    },
    /// Run a failed job again from the step where it stopped.
    Retry {
        /// The job id.
        id: String,
        /// Return once the job is queued instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Cancel a queued backup, drill, rotation or rollout, or stop a running rollout (the
    /// tenants being migrated finish first; `jobs retry` resumes it).
    Cancel {
        /// The job id.
        id: String,
        /// Return once a running rollout is asked to stop instead of waiting for it to stop.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ServerCommand {
    /// List servers with their tenant counts.
    List,
    /// Check that each server holds what the catalog says: no database or role under a
    /// tenant's name that no tenant accounts for, no tenant without its database. Run it after
    /// restoring the catalog from a backup. Changes nothing; exit 1 when anything is found.
    Check {
        /// Also log in to each tenant's database with its secret, as a router would.
        #[arg(long)]
        logins: bool,
    },
    /// Move every active and suspended tenant off a server, a few at a time (each answers 503
    /// while it moves). Set the server's max_tenants to 0 first, so no new tenant lands there;
    /// run again to finish after an interruption or a failure.
    Drain {
        /// The server to empty.
        name: String,
        /// The server the tenants move to.
        #[arg(long, value_name = "SERVER")]
        to: String,
        /// Tenants moved at the same time.
        #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=16))]
        concurrency: u8,
        /// Drain even though --to is in another region than the server drained.
        #[arg(long)]
        allow_region_change: bool,
        /// Move each tenant online: served while its database is copied.
        #[arg(long)]
        online: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create an admin token (printed once; only its hash is kept).
    Create {
        /// Who or what will use it, e.g. alice@example.com or ci-deploy.
        #[arg(value_parser = token_name)]
        name: String,
        /// What it may do.
        #[arg(long, value_enum, default_value_t = TokenRole::Operator)]
        role: TokenRole,
        /// Stop working after this long, e.g. 90d or 12h (default: never).
        #[arg(long, value_name = "DURATION", value_parser = lifetime)]
        expires_in: Option<String>,
    },
    /// List admin tokens by name.
    List,
    /// Revoke an admin token: it stops working at once.
    Revoke {
        /// The token's name.
        #[arg(value_parser = token_name)]
        name: String,
    },
}

fn lifetime(text: &str) -> Result<String, String> {
    humantime::parse_duration(text)
        .map(|_| text.to_owned())
        .map_err(|e| format!("{e} (e.g. 90d, 12h)"))
}

fn token_name(name: &str) -> Result<String, String> {
    if is_admin_token_name(name) {
        Ok(name.to_owned())
    } else {
        Err(ADMIN_TOKEN_NAME_RULE.to_owned())
    }
}

/// What a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum JobState {
    /// Waiting to run (or to be retried).
    Queued,
    /// Running.
    Running,
    /// Done.
    Succeeded,
    /// Stopped; `siloctl jobs retry ID` runs it again.
    Failed,
}

/// Arguments of `siloctl jobs list`.
#[derive(Debug, Args)]
pub(crate) struct JobsListArgs {
    /// Only jobs in this state.
    #[arg(long, value_enum)]
    pub(crate) state: Option<JobState>,
    /// Only jobs of this kind (provision, delete, rotate, migrate, move, backup).
    #[arg(long)]
    pub(crate) kind: Option<String>,
    /// Only this tenant's jobs.
    #[arg(long, value_name = "SLUG")]
    pub(crate) tenant: Option<TenantSlug>,
    /// How many jobs.
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: u16,
    /// Only jobs older than this id (the next page: the last id shown).
    #[arg(long, value_name = "ID")]
    pub(crate) before: Option<i64>,
}

/// Arguments of `siloctl audit`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AuditArgs {
    #[command(subcommand)]
    pub(crate) command: Option<AuditCommand>,
    /// Only entries about this tenant.
    #[arg(long, value_name = "SLUG")]
    pub(crate) tenant: Option<TenantSlug>,
    /// Only entries made with this token (its name; `scheduler` for scheduled rotations).
    #[arg(long, value_name = "NAME")]
    pub(crate) actor: Option<String>,
    /// Only this action, e.g. tenant.delete.
    #[arg(long, value_name = "ACTION")]
    pub(crate) action: Option<String>,
    /// How many entries (newest first).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) limit: u16,
    /// Only entries older than this id (the next page: the last id shown).
    #[arg(long, value_name = "ID", conflicts_with_all = ["after", "follow"])]
    pub(crate) before: Option<i64>,
    /// Entries after this cursor (an entry's `cursor`, or the API's `next`; `0-0`: from the
    /// start), oldest first, in the order they were committed.
    #[arg(long, value_name = "CURSOR", value_parser = parse_cursor)]
    pub(crate) after: Option<crate::audit::Cursor>,
    /// Keep printing entries as they are written, from now on (or from --after), one per
    /// line (JSON Lines with -o json), until interrupted.
    #[arg(long, short = 'f')]
    pub(crate) follow: bool,
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check every sealed entry against its seal; exits 1 if any was changed, removed or
    /// slipped in after it was sealed. Prints the chain's head to compare with a copy kept
    /// elsewhere.
    Verify,
}

fn parse_cursor(s: &str) -> Result<crate::audit::Cursor, String> {
    s.parse().map_err(|e: crate::audit::BadCursor| e.to_string())
}
