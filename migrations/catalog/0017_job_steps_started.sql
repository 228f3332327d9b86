-- Every step any run of a job has started, so a resumed run can tell what an earlier run may
-- have done (a provisioning that finds the tenant's database there made it itself, or found
-- it: a disaster recovery adopting a database the restored catalog does not know).
ALTER TABLE jobs ADD COLUMN steps_started text[] NOT NULL DEFAULT '{}';
