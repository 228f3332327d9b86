-- Jobs can be scheduled for later (rotation jitter spreads scheduled rotations over time).
ALTER TABLE jobs ADD COLUMN run_after timestamptz NOT NULL DEFAULT now();
DROP INDEX jobs_claimable;
CREATE INDEX jobs_claimable ON jobs (run_after, id) WHERE state IN ('queued','running');
-- One unfinished job per tenant at a time is the rule the API enforces; this index makes the
-- check cheap.
CREATE INDEX jobs_tenant_active ON jobs (tenant) WHERE state IN ('queued','running');
