-- A create in one round trip, limits included: sorami_create_job_v1 takes the user's lock
-- for the kind (when a limit applies), reads the Idempotency-Key's earlier job and the
-- user's usage after it, and inserts the job with its outbox row and the dispatcher's
-- wake-up unless a limit refuses it. Each statement of a plpgsql function reads a fresh
-- snapshot, so what it reads after the lock includes every create of this user and kind
-- that committed before, on any replica; one statement could not (its snapshot predates the
-- wait for the lock).
--
-- The usage is a counter row per user and kind (job_usage), so that a create costs the same
-- whatever the user made before. Triggers on jobs append every change that moves it to
-- job_usage_changes (insert-only: a webhook ending a job takes no lock for it); a create
-- under a limit folds the user's changes into the row, under its lock, and counts its own
-- job there directly. The hourly window moves forward with the row: the creations that left
-- it since the last create are counted from the jobs themselves (each leaves once). A
-- user's first create under a limit counts the row from the jobs.
--
-- The rule applied is gateway.jobs.limits.check's (the gateway computes the answer's
-- Retry-After and RateLimit fields from the usage returned); the terminal statuses are the
-- state machine's (tests create and change jobs in each status and check which count); the
-- window is gateway.jobs.limits.WINDOW, one hour (the function refuses another).

CREATE TABLE job_usage (
    user_id      text NOT NULL,
    kind         job_kind NOT NULL,
    -- jobs not yet terminal
    active       integer NOT NULL,
    -- jobs created after window_from
    in_window    integer NOT NULL,
    window_from  timestamptz NOT NULL,
    PRIMARY KEY (user_id, kind)
);

-- what moved a user's usage since the last fold: an inserted job (active 1 unless terminal,
-- with its created_at), a job that ended (-1) or came back (1)
CREATE TABLE job_usage_changes (
    user_id     text NOT NULL,
    kind        job_kind NOT NULL,
    active      smallint NOT NULL,
    created_at  timestamptz
);
CREATE INDEX job_usage_changes_user ON job_usage_changes (user_id, kind);
-- rows live from a job's end to its user's next create: vacuumed often, like a queue, so
-- that a fold never reads through the dead rows of the folds before it
ALTER TABLE job_usage_changes SET (autovacuum_vacuum_scale_factor = 0,
                                   autovacuum_vacuum_threshold = 1000,
                                   autovacuum_vacuum_insert_scale_factor = 0,
                                   autovacuum_vacuum_insert_threshold = 1000);

-- Set-based, so that an import inserting thousands of jobs at once writes one statement.
-- A terminal job created before the user's window (or, for a user with no row yet, more
-- than a day ago: no create's snapshot stays open that long) can never count again; every
-- other insert is recorded, since a fold counts as leaving the window every job created
-- between its window's old and new start.
CREATE FUNCTION job_usage_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_usage_changes (user_id, kind, active, created_at)
    SELECT n.user_id, n.kind,
           CASE WHEN n.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT') THEN 0
                ELSE 1 END,
           n.created_at
    FROM inserted n
    LEFT JOIN job_usage u ON u.user_id = n.user_id AND u.kind = n.kind
    WHERE (n.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT')
           OR n.created_at > coalesce(u.window_from, now() - interval '1 day'))
      -- a create under a limit counts its job itself
      AND n.id IS DISTINCT FROM current_setting('sorami.usage_counted', true);
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_usage_inserted
    AFTER INSERT ON jobs REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION job_usage_inserted();

CREATE FUNCTION job_usage_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT') THEN
        INSERT INTO job_usage_changes (user_id, kind, active) VALUES (OLD.user_id, OLD.kind, -1);
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT')
    THEN
        INSERT INTO job_usage_changes (user_id, kind, active) VALUES (NEW.user_id, NEW.kind, 1);
    END IF;
    RETURN NULL;
END $$;

-- row by row, but the WHEN clause (evaluated without calling the function) passes only a
-- job's end (or return): one in a job's life
CREATE TRIGGER jobs_usage_changed
    AFTER UPDATE OF status, user_id, kind ON jobs FOR EACH ROW
    WHEN ((OLD.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT'))
              <> (NEW.status IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT'))
          OR OLD.user_id <> NEW.user_id OR OLD.kind <> NEW.kind)
    EXECUTE FUNCTION job_usage_changed();

CREATE TRIGGER jobs_usage_deleted
    AFTER DELETE ON jobs FOR EACH ROW
    WHEN (OLD.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT'))
    EXECUTE FUNCTION job_usage_changed();

CREATE FUNCTION sorami_create_job_v1(
    p_id text, p_kind job_kind, p_user_id text, p_org_id text, p_prompt text,
    p_prompt_norm text, p_params jsonb, p_message text, p_idempotency_key text,
    p_request_hash text, p_action text, p_payload jsonb, p_wait_for_admission boolean,
    -- the settings' limits for the kind (0: off), unless the user's override says otherwise
    p_max_active integer, p_per_hour integer, p_window interval,
    -- 'created', 'existing' (the key's earlier job) or 'refused' (nothing written)
    OUT outcome text,
    OUT id text, OUT status job_status, OUT message text, OUT created_at timestamptz,
    OUT request_hash text,
    -- the limits in force and the usage they were checked against (NULL: limit off)
    OUT max_active integer, OUT per_hour integer,
    OUT active integer, OUT in_window integer,
    OUT oldest_leaves_at timestamptz, OUT frees_at timestamptz, OUT read_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    o user_limits%ROWTYPE;
    delivery bigint;
    window_start timestamptz;
    counted_from timestamptz;
BEGIN
    IF p_window <> interval '1 hour' THEN
        RAISE EXCEPTION 'job_usage_inserted keeps the creations of the last hour, not %', p_window;
    END IF;
    max_active := p_max_active;
    per_hour := p_per_hour;
    SELECT * INTO o FROM user_limits u WHERE u.user_id = p_user_id;
    IF FOUND THEN
        IF p_kind = 'image' THEN
            max_active := coalesce(o.active_images, max_active);
            per_hour := coalesce(o.images_per_hour, per_hour);
        ELSE
            max_active := coalesce(o.active_videos, max_active);
            per_hour := coalesce(o.videos_per_hour, per_hour);
        END IF;
    END IF;

    IF max_active > 0 OR per_hour > 0 THEN
        -- the user's creates of this kind queue here, on every replica, until each commits
        PERFORM pg_advisory_xact_lock(21324, hashtext(p_user_id || ':' || p_kind::text));
        read_at := clock_timestamp();
        window_start := read_at - p_window;
        IF p_idempotency_key IS NOT NULL THEN
            SELECT j.id, j.status, j.message, j.created_at, j.request_hash
            INTO id, status, message, created_at, request_hash
            FROM jobs j
            WHERE j.user_id = p_user_id AND j.kind = p_kind
              AND j.idempotency_key = p_idempotency_key;
            IF FOUND THEN
                outcome := 'existing';
            END IF;
        END IF;
        SELECT u.window_from INTO counted_from
        FROM job_usage u WHERE u.user_id = p_user_id AND u.kind = p_kind;
        IF NOT FOUND THEN
            -- one statement, one snapshot: the changes it clears are those its counts include
            WITH cleared AS (
                DELETE FROM job_usage_changes c
                WHERE c.user_id = p_user_id AND c.kind = p_kind
            )
            INSERT INTO job_usage AS u (user_id, kind, active, in_window, window_from)
            SELECT p_user_id, p_kind,
                   (SELECT count(*) FROM jobs j
                    WHERE j.user_id = p_user_id AND j.kind = p_kind
                      AND j.status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT')),
                   (SELECT count(*) FROM jobs j
                    WHERE j.user_id = p_user_id AND j.kind = p_kind
                      AND j.created_at > window_start),
                   window_start
            RETURNING u.active, u.in_window INTO active, in_window;
        ELSE
            -- the changes since the last fold, and the creations that left the window since
            -- (each counted when it arrived), from one snapshot
            WITH folded AS (
                DELETE FROM job_usage_changes c
                WHERE c.user_id = p_user_id AND c.kind = p_kind
                RETURNING c.active, c.created_at
            ), change AS (
                SELECT coalesce(sum(f.active), 0) AS active,
                       count(*) FILTER (WHERE f.created_at > counted_from) AS arrived
                FROM folded f
            ), departed AS (
                SELECT count(*) AS n FROM jobs j
                WHERE j.user_id = p_user_id AND j.kind = p_kind
                  AND j.created_at > counted_from AND j.created_at <= window_start
            )
            UPDATE job_usage AS u
            SET active = u.active + change.active,
                in_window = u.in_window + change.arrived - departed.n,
                window_from = greatest(u.window_from, window_start)
            FROM change, departed
            WHERE u.user_id = p_user_id AND u.kind = p_kind
            RETURNING u.active, u.in_window INTO active, in_window;
        END IF;
        IF per_hour > 0 THEN
            SELECT j.created_at + p_window INTO oldest_leaves_at FROM jobs j
            WHERE j.user_id = p_user_id AND j.kind = p_kind AND j.created_at > window_start
            ORDER BY j.created_at
            LIMIT 1;
            IF in_window >= per_hour THEN
                -- the per_hour-th newest creation leaving the window makes room for one more
                SELECT j.created_at + p_window INTO frees_at FROM jobs j
                WHERE j.user_id = p_user_id AND j.kind = p_kind
                  AND j.created_at > window_start
                ORDER BY j.created_at DESC
                OFFSET per_hour - 1
                LIMIT 1;
            END IF;
        END IF;
        IF outcome IS NULL AND ((max_active > 0 AND active >= max_active)
                               OR (per_hour > 0 AND in_window >= per_hour)) THEN
            outcome := 'refused';
            RETURN;
        END IF;
    END IF;

    IF outcome IS NULL THEN
        IF read_at IS NOT NULL THEN
            -- counted below, into the row this create holds: the insert records no change
            PERFORM set_config('sorami.usage_counted', p_id, true);
        END IF;
        INSERT INTO jobs AS j (id, kind, user_id, org_id, prompt, prompt_norm, params, message,
                               idempotency_key, request_hash)
        VALUES (p_id, p_kind, p_user_id, p_org_id, p_prompt, p_prompt_norm, p_params,
                p_message, p_idempotency_key, p_request_hash)
        ON CONFLICT (user_id, kind, idempotency_key) WHERE idempotency_key IS NOT NULL
            DO NOTHING
        RETURNING j.id, j.status, j.message, j.created_at, j.request_hash
        INTO id, status, message, created_at, request_hash;
        IF FOUND THEN
            INSERT INTO outbox AS d (job_id, action, payload, due_at)
            VALUES (p_id, p_action, p_payload,
                    CASE WHEN p_wait_for_admission THEN 'infinity'::timestamptz ELSE now() END)
            RETURNING d.id INTO delivery;
            PERFORM pg_notify('sorami_outbox', delivery::text);
            IF read_at IS NOT NULL THEN
                UPDATE job_usage AS u SET active = u.active + 1, in_window = u.in_window + 1
                WHERE u.user_id = p_user_id AND u.kind = p_kind;
            END IF;
            outcome := 'created';
        ELSE
            -- a create with the same key committed meanwhile (the unique index waited for
            -- it); this statement's fresh snapshot reads it
            SELECT j.id, j.status, j.message, j.created_at, j.request_hash
            INTO id, status, message, created_at, request_hash
            FROM jobs j
            WHERE j.user_id = p_user_id AND j.kind = p_kind
              AND j.idempotency_key = p_idempotency_key;
            outcome := 'existing';
        END IF;
    END IF;
END $$;
