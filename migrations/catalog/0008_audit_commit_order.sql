-- The transaction that wrote each entry, so that entries can be read in commit-safe order
-- (`GET /v1/audit?after=`): an entry is handed out only once every transaction that could
-- still add an entry before it has ended, so a follower never skips one committed late.
-- Entries written before this migration all get its transaction id; their ids order them.
ALTER TABLE audit_log ADD COLUMN txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX audit_log_commit_order ON audit_log (txid, id);
