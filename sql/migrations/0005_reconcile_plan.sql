-- The reconciler's working set and the indexes its set-based passes need.

-- One row per orphan a reconcile run looks at: the decision computed in SQL, before it is
-- applied orphan by orphan. Scratch space of the one run holding the reconcile lock:
-- unlogged (nothing to replay after a crash) and emptied at the start and end of a run.
CREATE UNLOGGED TABLE reconcile_plan (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          bigint NOT NULL,
    kind            job_kind NOT NULL,
    backend_job_id  text NOT NULL,
    job_id          text,
    rule            text NOT NULL,
    outcome         text NOT NULL
                    CHECK (outcome IN ('matched', 'waiting', 'ambiguous', 'no_candidate',
                                       'expired')),
    first_seen_at   timestamptz NOT NULL,
    evidence        jsonb NOT NULL DEFAULT '{}',
    -- its reconcile_decisions row is written (in the transaction that applied a match)
    decided         boolean NOT NULL DEFAULT false
);
-- an orphan is looked at once per run
CREATE UNIQUE INDEX reconcile_plan_orphan ON reconcile_plan (run_id, kind, backend_job_id);
-- and a job is planned for at most one orphan: a planning mistake fails instead of linking
CREATE UNIQUE INDEX reconcile_plan_job ON reconcile_plan (run_id, job_id)
    WHERE outcome = 'matched';

-- Retention prunes delivered outbox rows by age in batches.
CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE delivered_at IS NOT NULL;
