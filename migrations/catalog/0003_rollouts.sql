-- One row per tenant touched by a migration rollout job: what it went from and to, and how.
CREATE TABLE migration_runs (
    job_id         bigint      NOT NULL REFERENCES jobs (id),
    slug           text        NOT NULL,
    from_version   bigint      NOT NULL,
    to_version     bigint      NOT NULL,
    target_version bigint      NOT NULL,
    outcome        text        NOT NULL CHECK (outcome IN ('succeeded','failed')),
    error          text,
    duration_ms    bigint      NOT NULL,
    finished_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, slug)
);
CREATE INDEX migration_runs_slug ON migration_runs (slug, finished_at);
