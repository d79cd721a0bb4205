-- name: INGEST
-- A webhook for a job we know, in one statement: find the job by our id or an alias,
-- lock it unless the delivery's key is taken, decide with the event's plan (always /
-- if_advances) on the row as locked, claim the key as applied or stale, and apply the
-- event only when the claim succeeded and the plan applies. One row when the job
-- exists: the job (as locked, else as read), the flags, the delivery's key and id,
-- the new seq.
-- Composed in gateway.store.webhooks; rendered by `python -m gateway.store.statements`.
-- $1: backend_job_id
-- $2: status
-- $3: progress
-- $4: message
-- $5: error_message
-- $6: model_name
-- $7: generation_time_seconds
-- $8: from_webhook
-- $9: finished
-- $10: source
-- $11: always
-- $12: if_advances
-- $13: dedupe_key
-- $14: kind
-- $15: event_status
WITH
found AS (
SELECT j.id, j.kind, j.user_id, j.status, j.progress, j.seq, j.created_at, j.first_webhook_at
FROM jobs j
WHERE j.kind = $14
  AND (j.id = $1 OR j.id = (SELECT a.job_id FROM job_aliases a
                            WHERE a.kind = $14 AND a.backend_job_id = $1))
ORDER BY j.id = $1 DESC
LIMIT 1
), seen AS (
    SELECT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.dedupe_key = $13) AS dup
), job AS (
    SELECT j.id, j.kind, j.user_id, j.status, j.progress, j.seq, j.created_at, j.first_webhook_at FROM jobs j
    WHERE j.id = (SELECT id FROM found) AND NOT (SELECT dup FROM seen)
    FOR UPDATE
), step AS (
    SELECT job.id, job.status::text = ANY($11::text[])
                   OR (job.status::text = ANY($12::text[]) AND job.progress < $3)
                   AS applies
    FROM job
), claim AS (
    INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status,
                                    outcome)
    SELECT $13, $14, $1, step.id, $15,
           CASE WHEN step.applies THEN 'applied' ELSE 'stale' END
    FROM step
    ON CONFLICT (dedupe_key) DO NOTHING
    RETURNING dedupe_key
), flags AS (
    SELECT EXISTS (SELECT 1 FROM job) AS locked, EXISTS (SELECT 1 FROM claim) AS claimed,
           COALESCE((SELECT applies FROM step), false) AS applies
),
updated AS (
    UPDATE jobs SET
        status = $2,
        progress = GREATEST($3, progress),
        message = COALESCE($4, message),
        error_message = COALESCE($5, error_message),
        model_name = COALESCE($6, model_name),
        generation_time_seconds = COALESCE($7, generation_time_seconds),
        first_webhook_at = CASE WHEN $8 THEN COALESCE(first_webhook_at, now())
                                ELSE first_webhook_at END,
        finished_at = CASE WHEN $9 THEN now() ELSE finished_at END,
        seq = seq + 1,
        updated_at = now()
    WHERE id = (SELECT id FROM step) AND (SELECT claimed AND applies FROM flags)
    RETURNING id, seq, status, progress, message, user_id
), event AS (
    INSERT INTO job_events (job_id, seq, status, progress, message, source)
    SELECT id, seq, status, progress, message, $10 FROM updated
)
SELECT j.*, (SELECT dup FROM seen) AS seen, (SELECT locked FROM flags) AS locked, (SELECT claimed FROM flags) AS claimed, (SELECT applies FROM flags) AS applies, $13 AS delivery_key, $1 AS delivery_for, (SELECT seq FROM updated) AS seq,
       (SELECT pg_notify('sorami_job_events', id || ':' || seq) FROM updated) AS notified,
       NULL::bigint AS notification_id
FROM (SELECT * FROM job UNION ALL SELECT * FROM found WHERE NOT EXISTS (SELECT 1 FROM job)) AS j
