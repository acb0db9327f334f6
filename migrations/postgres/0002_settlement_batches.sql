-- tollgate PostgreSQL schema, version 2.
-- The last settlement batch each gateway instance has committed, so that a
-- batch whose connection broke before its answer arrived can be told
-- applied or not, and retried only if not. Kept for a day after the
-- instance's last batch (a retry never takes that long), then dropped by
-- whichever instance releases stale reservations.

CREATE TABLE settlement_batches (
    instance_id TEXT        PRIMARY KEY,
    last_batch  BIGINT      NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
