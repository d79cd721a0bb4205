-- The review console lists open orphans oldest first, page by page (keyset on this order).
CREATE INDEX orphans_review_age ON orphans (first_seen_at, kind, backend_job_id)
    WHERE state IN ('unresolved', 'unmatched');
