-- The key new tenants' database and role names are derived from (an HMAC of the slug):
-- every role on a PostgreSQL server can list its databases and roles, so their names must
-- not say which customer they belong to. Made once per catalog and never changed; tenants
-- keep the database name recorded in `tenants.database` (created before: `tenant_<slug>`).
CREATE TABLE naming_key (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    key bytea NOT NULL CHECK (length(key) = 32)
);

-- 32 bytes from two version-4 UUIDs (PostgreSQL's strong random source; 244 random bits).
INSERT INTO naming_key (key)
SELECT decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex');
