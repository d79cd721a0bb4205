-- name: INGEST_FINISHED
-- INGEST of a terminal event: APPLY_FINISHED's files and notification too.
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
-- $11: file_positions
-- $12: file_urls
-- $13: file_storage_keys
-- $14: file_filenames
-- $15: file_formats
-- $16: file_size_bytes
-- $17: file_widths
-- $18: file_heights
-- $19: file_durations
-- $20: file_descriptions
-- $21: note_type
-- $22: note_title
-- $23: note_message
-- $24: note_metadata
-- $25: always
-- $26: if_advances
-- $27: dedupe_key
-- $28: kind
-- $29: event_status
WITH
found AS (
SELECT j.id, j.kind, j.user_id, j.status, j.progress, j.seq, j.created_at, j.first_webhook_at
FROM jobs j
WHERE j.kind = $28
  AND (j.id = $1 OR j.id = (SELECT a.job_id FROM job_aliases a
                            WHERE a.kind = $28 AND a.backend_job_id = $1))
ORDER BY j.id = $1 DESC
LIMIT 1
), seen AS (
    SELECT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.dedupe_key = $27) AS dup
), job AS (
    SELECT j.id, j.kind, j.user_id, j.status, j.progress, j.seq, j.created_at, j.first_webhook_at FROM jobs j
    WHERE j.id = (SELECT id FROM found) AND NOT (SELECT dup FROM seen)
    FOR UPDATE
), step AS (
    SELECT job.id, job.status::text = ANY($25::text[])
                   OR (job.status::text = ANY($26::text[]) AND job.progress < $3)
                   AS applies
    FROM job
), claim AS (
    INSERT INTO webhook_deliveries (dedupe_key, kind, backend_job_id, job_id, event_status,
                                    outcome)
    SELECT $27, $28, $1, step.id, $29,
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
), files AS (
    INSERT INTO job_files (job_id, position, url, storage_key, filename, format, size_bytes,
                           width, height, duration_seconds, description)
    SELECT updated.id, f.*
    FROM updated, unnest($11::smallint[], $12::text[],
                         $13::text[], $14::text[],
                         $15::text[], $16::bigint[],
                         $17::int[], $18::int[], $19::float8[],
                         $20::text[]) AS f
    ON CONFLICT (job_id, position) DO NOTHING
), notification AS (
    INSERT INTO notifications (user_id, job_id, type, title, message, metadata)
    SELECT updated.user_id, updated.id, $21::text, $22, $23,
           $24::jsonb || jsonb_build_object('job_id', updated.id)
    FROM updated WHERE $21::text IS NOT NULL
    ON CONFLICT ON CONSTRAINT notifications_once DO NOTHING
    RETURNING id
)
SELECT j.*, (SELECT dup FROM seen) AS seen, (SELECT locked FROM flags) AS locked, (SELECT claimed FROM flags) AS claimed, (SELECT applies FROM flags) AS applies, $27 AS delivery_key, $1 AS delivery_for, (SELECT seq FROM updated) AS seq,
       (SELECT pg_notify('sorami_job_events', id || ':' || seq) FROM updated) AS notified,
       (SELECT id FROM notification) AS notification_id
FROM (SELECT * FROM job UNION ALL SELECT * FROM found WHERE NOT EXISTS (SELECT 1 FROM job)) AS j
