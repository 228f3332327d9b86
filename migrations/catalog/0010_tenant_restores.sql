-- The backup a `restore` job is putting back into the tenant's database (NULL: none). Like
-- moving_to, it makes routers stop serving the tenant until the job is done.
ALTER TABLE tenants ADD COLUMN restoring_from text;
