-- sorami-gateway schema: jobs of both kinds, their files and events, notifications,
-- webhook dedupe, orphans, aliases, the delivery outbox and the reconciler's audit trail.

CREATE TYPE job_kind AS ENUM ('image', 'video');

CREATE TYPE job_status AS ENUM (
    'PENDING', 'QUEUED', 'INITIALIZING', 'GENERATING', 'SAVING',
    'COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT'
);

-- One table for both kinds: every query (status, gallery, reconcile) is the same shape,
-- and kind-specific request fields live in params.
CREATE TABLE jobs (
    id                      text PRIMARY KEY,
    kind                    job_kind NOT NULL,
    user_id                 text NOT NULL,
    org_id                  text,
    prompt                  text NOT NULL,
    -- NFKC + casefold + collapsed whitespace, computed by gateway.jobs.prompts
    prompt_norm             text NOT NULL,
    params                  jsonb NOT NULL DEFAULT '{}',
    status                  job_status NOT NULL DEFAULT 'PENDING',
    progress                smallint NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    message                 text,
    error_message           text,
    model_name              text,
    generation_time_seconds double precision,
    -- bumped on every visible change; the SSE event id
    seq                     integer NOT NULL DEFAULT 1,
    idempotency_key         text,
    request_hash            text,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    first_webhook_at        timestamptz,
    finished_at             timestamptz,
    CONSTRAINT jobs_idempotency_requires_hash
        CHECK (idempotency_key IS NULL OR request_hash IS NOT NULL)
);

-- a user's gallery, newest first, keyset-paginated on (created_at, id)
CREATE INDEX jobs_gallery ON jobs (user_id, kind, created_at DESC, id DESC);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (user_id, kind, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- non-terminal jobs: timeouts (by updated_at) and reconcile candidates (by prompt)
CREATE INDEX jobs_active_updated ON jobs (kind, updated_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT');
CREATE INDEX jobs_candidates ON jobs (kind, prompt_norm, created_at)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED');
CREATE INDEX jobs_status_kind ON jobs (kind, status);

-- Every visible change of a job, in order: SSE replay after Last-Event-ID, and history.
CREATE TABLE job_events (
    job_id      text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq         integer NOT NULL,
    status      job_status NOT NULL,
    progress    smallint NOT NULL,
    message     text,
    source      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE job_files (
    job_id           text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    position         smallint NOT NULL,
    url              text NOT NULL,
    storage_key      text,
    filename         text,
    format           text,
    size_bytes       bigint,
    width            integer,
    height           integer,
    duration_seconds double precision,
    description      text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, position)
);

CREATE TABLE notifications (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text NOT NULL,
    job_id      text REFERENCES jobs (id) ON DELETE CASCADE,
    type        text NOT NULL,
    title       text NOT NULL,
    message     text NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    read_at     timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- one notification of a type per job, however many times the event is delivered
    CONSTRAINT notifications_once UNIQUE (job_id, type)
);
CREATE INDEX notifications_user ON notifications (user_id, id DESC);
CREATE INDEX notifications_unread ON notifications (user_id, id DESC) WHERE read_at IS NULL;

-- Backend job id -> our job. Written by delivery (the backend answered its own id),
-- the reconciler and operators. A job has at most one alias.
CREATE TABLE job_aliases (
    kind            job_kind NOT NULL,
    backend_job_id  text NOT NULL,
    job_id          text NOT NULL UNIQUE REFERENCES jobs (id) ON DELETE CASCADE,
    source          text NOT NULL CHECK (source IN ('delivery', 'reconciler', 'operator')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, backend_job_id)
);

-- Dedupe of verified webhook deliveries: one row per delivery key, written in the same
-- transaction as the delivery's effect.
CREATE TABLE webhook_deliveries (
    dedupe_key      text PRIMARY KEY,
    kind            job_kind NOT NULL,
    backend_job_id  text NOT NULL,
    job_id          text,
    event_status    text NOT NULL,
    outcome         text NOT NULL CHECK (outcome IN ('applied', 'stale', 'orphaned')),
    received_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id) WHERE job_id IS NOT NULL;

-- Orphans: verified webhooks whose job id is neither a job nor a known alias.
-- One row per (kind, backend id), its events kept whole, in received order.
CREATE TABLE orphans (
    kind            job_kind NOT NULL,
    backend_job_id  text NOT NULL,
    state           text NOT NULL DEFAULT 'unresolved'
                    CHECK (state IN ('unresolved', 'matched', 'assigned', 'dismissed', 'unmatched')),
    user_id         text,
    prompt          text,
    prompt_norm     text,
    file_count      integer NOT NULL DEFAULT 0,
    event_count     integer NOT NULL DEFAULT 0,
    first_seen_at   timestamptz NOT NULL DEFAULT now(),
    last_seen_at    timestamptz NOT NULL DEFAULT now(),
    job_id          text REFERENCES jobs (id) ON DELETE SET NULL,
    resolved_at     timestamptz,
    PRIMARY KEY (kind, backend_job_id)
);
CREATE INDEX orphans_open ON orphans (kind, prompt_norm, first_seen_at)
    WHERE state IN ('unresolved', 'unmatched');

CREATE TABLE orphan_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            job_kind NOT NULL,
    backend_job_id  text NOT NULL,
    dedupe_key      text NOT NULL UNIQUE,
    event_status    text NOT NULL,
    payload         jsonb NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    applied_at      timestamptz,
    FOREIGN KEY (kind, backend_job_id) REFERENCES orphans (kind, backend_job_id)
);
CREATE INDEX orphan_events_by_orphan ON orphan_events (kind, backend_job_id, id);

-- Durable outbox of calls to the generator backend, claimed with FOR UPDATE SKIP LOCKED
-- and a lease so several server processes share it.
CREATE TABLE outbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id          text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    action          text NOT NULL CHECK (action IN ('generate', 'cancel')),
    -- the request body; cleared once delivered (it may hold a large input image)
    payload         jsonb,
    attempts        integer NOT NULL DEFAULT 0,
    due_at          timestamptz NOT NULL DEFAULT now(),
    leased_until    timestamptz,
    lease_owner     text,
    last_error      text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    failed_at       timestamptz,
    CONSTRAINT outbox_once UNIQUE (job_id, action)
);
CREATE INDEX outbox_due ON outbox (due_at) WHERE delivered_at IS NULL AND failed_at IS NULL;

CREATE TABLE reconcile_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    dry_run     boolean NOT NULL DEFAULT false,
    state       text NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'succeeded', 'failed')),
    counts      jsonb NOT NULL DEFAULT '{}',
    error       text
);
CREATE INDEX reconcile_runs_succeeded ON reconcile_runs (finished_at DESC) WHERE state = 'succeeded';

CREATE TABLE reconcile_decisions (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          bigint REFERENCES reconcile_runs (id) ON DELETE CASCADE,
    kind            job_kind NOT NULL,
    backend_job_id  text NOT NULL,
    job_id          text,
    rule            text NOT NULL,
    outcome         text NOT NULL
                    CHECK (outcome IN ('matched', 'waiting', 'ambiguous', 'no_candidate',
                                       'expired', 'assigned', 'dismissed')),
    evidence        jsonb NOT NULL DEFAULT '{}',
    actor           text NOT NULL DEFAULT 'reconciler',
    reason          text,
    score           real,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX reconcile_decisions_orphan ON reconcile_decisions (kind, backend_job_id, id);
CREATE INDEX reconcile_decisions_run ON reconcile_decisions (run_id);
