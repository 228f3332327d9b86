-- Tamper evidence for the audit log: every entry, in the order followers read them, is
-- sealed with SHA-256(previous seal || entry). An entry changed after it was sealed no longer
-- matches its seal; a removed one breaks the link after it. Append-only like the log.
CREATE TABLE audit_seals (
    entry     bigint      PRIMARY KEY REFERENCES audit_log (id),
    seq       bigint      NOT NULL UNIQUE CHECK (seq > 0),
    hash      bytea       NOT NULL CHECK (length(hash) = 32),
    sealed_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION audit_seals_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_seals is append-only';
END $$;
CREATE TRIGGER audit_seals_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_seals
    FOR EACH STATEMENT EXECUTE FUNCTION audit_seals_append_only();
