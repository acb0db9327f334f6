-- tollgate PostgreSQL schema, version 4: an adjustment (top-up, set) made
-- through the admin API or the CLI carries an id its gateway chose, so that
-- one sent again after its answer was lost (the connection broke after the
-- commit) is found and not applied twice. Grants and earlier rows have
-- none.

ALTER TABLE adjustments ADD COLUMN request_id TEXT;

CREATE UNIQUE INDEX adjustments_request_id ON adjustments (request_id)
    WHERE request_id IS NOT NULL;
