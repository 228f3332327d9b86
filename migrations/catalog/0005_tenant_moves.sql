-- A tenant being moved to another server (`move` job): set from the moment its database is
-- fenced until the route points at the new server. Routers answer 503 for it meanwhile, and
-- the target server counts it against its `max_tenants` already.
ALTER TABLE tenants ADD COLUMN moving_to text REFERENCES servers (name);
