-- When an admin token stops working (NULL: never), for tokens given to contractors, CI jobs
-- and anyone whose access must end on a date.
ALTER TABLE admin_tokens ADD COLUMN expires_at timestamptz;
