#!/usr/bin/env bash
# Run once by the postgres image on a new data volume: the catalog role and database.
set -euo pipefail
: "${SILO_CATALOG_PASSWORD:?set SILO_CATALOG_PASSWORD}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set=pw="$SILO_CATALOG_PASSWORD" <<'SQL'
CREATE ROLE silo LOGIN PASSWORD :'pw';
CREATE DATABASE silo_catalog OWNER silo;
-- Tenant login roles must not reach the catalog.
REVOKE CONNECT, TEMPORARY ON DATABASE silo_catalog FROM PUBLIC;
SQL
