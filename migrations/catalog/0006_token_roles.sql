-- What an admin token may do: `admin` everything, `operator` everything but managing admin
-- tokens, `viewer` only read (and never a tenant's credentials). Tokens made before roles
-- existed keep the power they had.
ALTER TABLE admin_tokens ADD COLUMN role text NOT NULL DEFAULT 'admin'
    CHECK (role IN ('admin', 'operator', 'viewer'));
