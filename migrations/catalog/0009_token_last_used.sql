-- When each admin token was last used (to within a minute; NULL: never since this column
-- exists), so that tokens nobody uses any more can be found and revoked.
ALTER TABLE admin_tokens ADD COLUMN last_used_at timestamptz;
