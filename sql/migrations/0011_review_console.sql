-- The review console lists open orphans oldest first, page by page (keyset on this order).
CREATE INDEX orphans_review_age ON orphans (first_seen_at, kind, backend_job_id)
    WHERE state IN ('unresolved', 'unmatched');

-- Why an orphan waits: the outcome of its latest decision, kept on the orphan so that the
-- console counts open orphans by reason without reading every orphan's decisions.
ALTER TABLE orphans ADD COLUMN review_reason text;

UPDATE orphans o SET review_reason = last.outcome
FROM (SELECT DISTINCT ON (kind, backend_job_id) kind, backend_job_id, outcome
      FROM reconcile_decisions ORDER BY kind, backend_job_id, id DESC) AS last
WHERE o.kind = last.kind AND o.backend_job_id = last.backend_job_id;

-- one statement-level trigger: a reconcile pass inserting thousands of decisions at once
-- updates each orphan once
CREATE FUNCTION orphans_review_reason() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE orphans o SET review_reason = last.outcome
    FROM (SELECT DISTINCT ON (kind, backend_job_id) kind, backend_job_id, outcome
          FROM inserted ORDER BY kind, backend_job_id, id DESC) AS last
    WHERE o.kind = last.kind AND o.backend_job_id = last.backend_job_id
      AND o.review_reason IS DISTINCT FROM last.outcome;
    RETURN NULL;
END $$;

CREATE TRIGGER reconcile_decisions_review_reason
    AFTER INSERT ON reconcile_decisions REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION orphans_review_reason();

-- counting open orphans by reason, and filtering them by hinted user, from indexes alone
CREATE INDEX orphans_review_reason ON orphans (review_reason, kind)
    WHERE state IN ('unresolved', 'unmatched');
CREATE INDEX orphans_review_user ON orphans (user_id, first_seen_at, kind, backend_job_id)
    WHERE state IN ('unresolved', 'unmatched');
