-- Taking over from the existing app: which legacy rows an import has written, and where.

-- One row per legacy generation imported: as a job (same id) or as an orphan (its id is
-- the backend's). Keyed on the legacy id, so importing again adds only what is new, and
-- `updated_at` (the legacy row's) tells a row that changed since.
CREATE TABLE legacy_generations (
    kind        job_kind NOT NULL,
    legacy_id   text NOT NULL,
    target      text NOT NULL CHECK (target IN ('job', 'orphan')),
    updated_at  timestamptz NOT NULL,
    -- the Clerk id of the user the row sat on (for a repaired row: whom it is taken from)
    author_id   text,
    imported_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, legacy_id)
);

-- A legacy notification is imported once, whatever its job and type.
ALTER TABLE notifications ADD COLUMN legacy_id text;
CREATE UNIQUE INDEX notifications_legacy ON notifications (legacy_id) WHERE legacy_id IS NOT NULL;
