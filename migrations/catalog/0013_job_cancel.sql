-- Who asked a running migration rollout to stop (`POST /v1/jobs/{id}/cancel`): it migrates no
-- further tenant and ends failed. An operator's retry clears it, and the rollout resumes.
ALTER TABLE jobs ADD COLUMN cancel_requested_by text;
