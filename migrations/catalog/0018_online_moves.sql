-- An online move copies a tenant's database by logical replication while the tenant is
-- served: routers keep serving it (moving_to set, moving_online true) until the cutover
-- clears the flag.
ALTER TABLE tenants ADD COLUMN moving_online boolean NOT NULL DEFAULT false;
