-- How many attempts a job had made when an operator last queued it again
-- (`siloctl jobs retry`): the automatic retries of a transient failure count from there,
-- so every queueing gets all of them, while `attempts` keeps counting every run.
ALTER TABLE jobs ADD COLUMN attempts_before_requeue integer NOT NULL DEFAULT 0;
