-- name: APPLY
-- One applied event of a job locked by the caller: its new state, its event row, the
-- NOTIFY. Returns the job's new seq.
-- Composed in gateway.store.jobs; rendered by `python -m gateway.store.statements`.
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
WITH
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
    WHERE id = $1
    RETURNING id, seq, status, progress, message, user_id
), event AS (
    INSERT INTO job_events (job_id, seq, status, progress, message, source)
    SELECT id, seq, status, progress, message, $10 FROM updated
)
SELECT seq, pg_notify('sorami_job_events', id || ':' || seq) FROM updated
