-- name: APPLY_FINISHED
-- APPLY of a terminal event, with the job's files and its owner's notification, in the
-- same single statement. Returns the new seq and the notification's id.
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
SELECT seq, pg_notify('sorami_job_events', id || ':' || seq), (SELECT id FROM notification) AS notification_id
FROM updated
