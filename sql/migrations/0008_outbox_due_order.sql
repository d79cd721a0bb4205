-- The outbox claim reads due rows in (due_at, id) order and stops after a batch: an index
-- in exactly that order lets it stop early, where one on due_at alone made it sort every
-- pending row on each claim.
CREATE INDEX outbox_due_order ON outbox (due_at, id)
    WHERE delivered_at IS NULL AND failed_at IS NULL;
DROP INDEX outbox_due;
