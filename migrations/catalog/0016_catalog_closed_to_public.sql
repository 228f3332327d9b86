-- Tenant login roles may live on the catalog's server (`siloctl dev` puts them there): none
-- of them may open the catalog. The role that owns the catalog database keeps its access; a
-- catalog role that does not own it cannot revoke, and is told to have it done.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
EXCEPTION WHEN insufficient_privilege THEN
    RAISE WARNING 'the catalog database stays open to every role: have its owner run REVOKE ALL ON DATABASE % FROM PUBLIC',
        quote_ident(current_database());
END
$$;
