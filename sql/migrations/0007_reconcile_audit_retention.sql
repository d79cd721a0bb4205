-- Retention of the reconciler's audit trail (gateway.store.reconcile.prune_audit).

-- The decisions retention may delete (the per-pass outcomes that change nothing), oldest
-- first: each batch continues where the previous one stopped, in (created_at, id) order,
-- and never reads a decision that is kept forever (matched, assigned, dismissed, expired).
CREATE INDEX reconcile_decisions_prunable ON reconcile_decisions (created_at, id)
    WHERE outcome IN ('waiting', 'ambiguous', 'no_candidate');

-- Finished runs, oldest first, for the same batched walk.
CREATE INDEX reconcile_runs_finished ON reconcile_runs (finished_at, id)
    WHERE finished_at IS NOT NULL;
