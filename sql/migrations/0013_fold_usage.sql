-- job_usage_changes is folded by the next create under a limit of the same user and kind.
-- Without such a create the changes stay: every job of a deployment with the limits off
-- (two rows in a job's life), the last jobs of a user who stopped creating, a kind whose
-- limits are off. sorami_fold_usage_v1 folds them outside a create; `sorami-reconcile run`
-- calls it in its retention step, one transaction per batch of users.
--
-- For each (user, kind) with changes, after the keyset position (p_after_user, p_after_kind)
-- and at most p_pairs of them, under the user's lock for the kind (the one creates take;
-- tried, not waited for: a user whose create holds it is left to that create's own fold):
-- - with a usage row: the changes are added to it as a create folds them, the window left
--   where it is (the next create moves it, counting out what left it from the jobs);
-- - without one: the changes are deleted; the user's first create under a limit counts the
--   row from the jobs.
-- Each statement after the lock reads a fresh snapshot, so it folds every change committed
-- before; a change committed later stays for the next fold. The locks are held to the end
-- of the transaction: the caller keeps p_pairs small.
CREATE FUNCTION sorami_fold_usage_v1(
    p_after_user text, p_after_kind job_kind, p_pairs integer,
    -- pairs looked at (fewer than p_pairs: the pass is done), changes folded, pairs left
    -- to a create holding their lock, and the keyset position to continue after
    OUT seen integer, OUT folded bigint, OUT busy integer,
    OUT last_user text, OUT last_kind job_kind)
LANGUAGE plpgsql AS $$
DECLARE
    pair record;
    n bigint;
BEGIN
    seen := 0;
    folded := 0;
    busy := 0;
    FOR pair IN
        SELECT DISTINCT c.user_id, c.kind FROM job_usage_changes c
        WHERE p_after_user IS NULL OR (c.user_id, c.kind) > (p_after_user, p_after_kind)
        ORDER BY c.user_id, c.kind
        LIMIT p_pairs
    LOOP
        seen := seen + 1;
        last_user := pair.user_id;
        last_kind := pair.kind;
        IF NOT pg_try_advisory_xact_lock(21324, hashtext(pair.user_id || ':' || pair.kind::text))
        THEN
            busy := busy + 1;
            CONTINUE;
        END IF;
        WITH gone AS (
            DELETE FROM job_usage_changes c
            WHERE c.user_id = pair.user_id AND c.kind = pair.kind
            RETURNING c.active, c.created_at
        ), counted AS (
            UPDATE job_usage AS u
            SET active = u.active + (SELECT coalesce(sum(g.active), 0) FROM gone g),
                in_window = u.in_window + (SELECT count(*) FROM gone g
                                           WHERE g.created_at > u.window_from)
            WHERE u.user_id = pair.user_id AND u.kind = pair.kind
            RETURNING 1
        )
        SELECT count(*) INTO n FROM gone;
        folded := folded + n;
    END LOOP;
END $$;
