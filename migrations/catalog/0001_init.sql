-- The control plane's own database: which tenants exist, where they live, what work is
-- pending, and who changed what.

CREATE TABLE servers (
    name        text PRIMARY KEY,
    host        text        NOT NULL,
    port        integer     NOT NULL,
    max_tenants integer     NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tenants (
    slug                   text PRIMARY KEY,
    name                   text        NOT NULL,
    plan                   text        NOT NULL,
    status                 text        NOT NULL CHECK (status IN
                               ('provisioning','active','suspended','deleting','deleted','failed')),
    server                 text        NOT NULL REFERENCES servers (name),
    database               text        NOT NULL,
    schema_version         bigint      NOT NULL DEFAULT 0,
    credentials_rotated_at timestamptz,
    error                  text,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    deleted_at             timestamptz
);
CREATE INDEX tenants_server_live ON tenants (server) WHERE status <> 'deleted';

-- Custom domains. Lower-case, without port; the router matches them exactly.
CREATE TABLE tenant_domains (
    domain text PRIMARY KEY,
    slug   text NOT NULL REFERENCES tenants (slug) ON DELETE CASCADE
);
CREATE INDEX tenant_domains_slug ON tenant_domains (slug);

-- Durable jobs. A worker claims a job by taking its lease (locked_by, locked_until) with
-- FOR UPDATE SKIP LOCKED; a job whose lease expired (crashed worker) is claimed again and
-- resumes from `step`, since every step is idempotent.
CREATE TABLE jobs (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         text        NOT NULL,
    tenant       text,
    state        text        NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued','running','succeeded','failed')),
    step         text,
    attempts     integer     NOT NULL DEFAULT 0,
    error        text,
    progress     jsonb       NOT NULL DEFAULT '{}',
    params       jsonb       NOT NULL DEFAULT '{}',
    locked_by    text,
    locked_until timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
CREATE INDEX jobs_claimable ON jobs (id) WHERE state IN ('queued','running');
CREATE INDEX jobs_tenant ON jobs (tenant);

-- Append-only: the trigger below refuses UPDATE and DELETE.
CREATE TABLE audit_log (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text        NOT NULL,
    action  text        NOT NULL,
    tenant  text,
    detail  jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_tenant ON audit_log (tenant, at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END;
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();

-- Admin tokens, stored as SHA-256 hashes only.
CREATE TABLE admin_tokens (
    name       text PRIMARY KEY,
    token_hash bytea       NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The local secret store: every version encrypted with AES-256-GCM under the master key file,
-- with the secret name and version id as associated data. Never a value in clear.
CREATE TABLE secrets (
    name       text PRIMARY KEY,
    tags       jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE secret_versions (
    name       text        NOT NULL REFERENCES secrets (name) ON DELETE CASCADE,
    version_id text        NOT NULL,
    stages     text[]      NOT NULL DEFAULT '{}',
    nonce      bytea       NOT NULL,
    ciphertext bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version_id)
);
