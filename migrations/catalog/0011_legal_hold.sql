-- Why the tenant's data is under legal hold (NULL: it is not). While set, the tenant cannot
-- be deleted and none of its backups is erased, by hand or by retention; the hold stays on
-- the slug, a deleted tenant's included, until it is released.
ALTER TABLE tenants ADD COLUMN legal_hold text;
