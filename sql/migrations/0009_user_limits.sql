-- Per-user limits on creating jobs: the overrides an operator sets without a restart, the
-- record of who changed them, and the index that counts a user's active jobs of a kind.

-- NULL in a limit column: the setting's default applies; 0: that limit is off for the user.
CREATE TABLE user_limits (
    user_id          text PRIMARY KEY,
    active_images    integer CHECK (active_images >= 0),
    active_videos    integer CHECK (active_videos >= 0),
    images_per_hour  integer CHECK (images_per_hour >= 0),
    videos_per_hour  integer CHECK (videos_per_hour >= 0),
    set_by           text NOT NULL,
    set_at           timestamptz NOT NULL DEFAULT now()
);

-- every set and reset, kept after a reset removes the override
CREATE TABLE user_limit_changes (
    id          bigserial PRIMARY KEY,
    user_id     text NOT NULL,
    action      text NOT NULL CHECK (action IN ('set', 'reset')),
    -- the override as it stood after the change (NULL after a reset)
    limits      jsonb,
    changed_by  text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX user_limit_changes_user ON user_limit_changes (user_id, id);

-- a user's active jobs of a kind, counted under the create's lock
CREATE INDEX jobs_user_active ON jobs (user_id, kind)
    WHERE status NOT IN ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMED_OUT');

-- Admission toward the backend: a generate call of a kind with BACKEND_MAX_IN_FLIGHT_*
-- waits with due_at 'infinity' until a dispatcher admits it (makes it due now); a backend
-- 429 with Retry-After pauses admissions of that kind until paused_until.
CREATE TABLE backend_pauses (
    kind          job_kind PRIMARY KEY,
    paused_until  timestamptz NOT NULL
);
CREATE INDEX outbox_waiting ON outbox (created_at, id)
    WHERE due_at = 'infinity' AND delivered_at IS NULL AND failed_at IS NULL;
