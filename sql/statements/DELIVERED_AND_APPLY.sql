-- name: DELIVERED_AND_APPLY
-- An accepted generate: lock the job when it is still at the seq its claim read
-- (claimed_seq), settle the outbox row, and apply the job's event (APPLY) only when this
-- settled it. Returns whether the job was locked and the row settled, and the new seq.
-- Composed in gateway.store.outbox; rendered by `python -m gateway.store.statements`.
-- $1: job_id
-- $2: status
-- $3: progress
-- $4: message
-- $5: error_message
-- $6: model_name
-- $7: generation_time_seconds
-- $8: from_webhook
-- $9: finished
-- $10: source
-- $11: claimed_seq
-- $12: outbox_id
WITH
async_commit AS (SELECT set_config('synchronous_commit', 'off', true)), job AS (
    SELECT id FROM jobs, async_commit
    WHERE id = $1 AND seq = $11
    FOR UPDATE OF jobs
), settled AS (
    UPDATE outbox
    SET delivered_at = now(), payload = NULL, leased_until = NULL,
    lease_owner = NULL, last_error = NULL
    WHERE id = $12 AND delivered_at IS NULL
      AND failed_at IS NULL AND EXISTS (SELECT 1 FROM job)
    RETURNING id
), flags AS (
    SELECT EXISTS (SELECT 1 FROM job) AS locked, EXISTS (SELECT 1 FROM settled) AS settled
),
updated AS (
    UPDATE jobs SET
        status = $2,
        progress = $3,
        message = COALESCE($4, message),
        error_message = COALESCE($5, error_message),
        model_name = COALESCE($6, model_name),
        generation_time_seconds = COALESCE($7, generation_time_seconds),
        first_webhook_at = CASE WHEN $8 THEN COALESCE(first_webhook_at, now())
                                ELSE first_webhook_at END,
        finished_at = CASE WHEN $9 THEN now() ELSE finished_at END,
        seq = seq + 1,
        updated_at = now()
    WHERE id = $1 AND (SELECT settled FROM flags)
    RETURNING id, seq, status, progress, message, user_id
), event AS (
    INSERT INTO job_events (job_id, seq, status, progress, message, source)
    SELECT id, seq, status, progress, message, $10 FROM updated
)
SELECT (SELECT locked FROM flags) AS locked, (SELECT settled FROM flags) AS settled, (SELECT seq FROM updated) AS seq,
       (SELECT pg_notify('sorami_job_events', id || ':' || seq) FROM updated) AS notified,
       NULL::bigint AS notification_id
