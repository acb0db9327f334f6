-- tollgate SQLite schema, version 2: the ledger tables without
-- AUTOINCREMENT. Ledger rows are never deleted, so a new row's id (the
-- largest so far plus one) still only grows, as paging by cursor needs;
-- and an insert no longer updates `sqlite_sequence`, one page fewer written
-- by every commit of a settlement. Ids of existing rows are kept.

CREATE TABLE usage_v2 (
    id                INTEGER PRIMARY KEY,
    time              BIGINT  NOT NULL,
    key_id            INTEGER NOT NULL REFERENCES api_keys (id),
    endpoint          TEXT    NOT NULL,
    model             TEXT,
    status            INTEGER NOT NULL,
    prompt_tokens     BIGINT  NOT NULL,
    completion_tokens BIGINT  NOT NULL,
    credits           BIGINT  NOT NULL,
    duration_ms       BIGINT  NOT NULL
);
INSERT INTO usage_v2 (id, time, key_id, endpoint, model, status, prompt_tokens,
                      completion_tokens, credits, duration_ms)
    SELECT id, time, key_id, endpoint, model, status, prompt_tokens,
           completion_tokens, credits, duration_ms
    FROM usage ORDER BY id;
DROP TABLE usage;
ALTER TABLE usage_v2 RENAME TO usage;
CREATE INDEX usage_key_id_id ON usage (key_id, id);

CREATE TABLE adjustments_v2 (
    id     INTEGER PRIMARY KEY,
    time   BIGINT  NOT NULL,
    key_id INTEGER NOT NULL REFERENCES api_keys (id),
    delta  BIGINT  NOT NULL,
    actor  TEXT    NOT NULL,
    reason TEXT    NOT NULL
);
INSERT INTO adjustments_v2 (id, time, key_id, delta, actor, reason)
    SELECT id, time, key_id, delta, actor, reason FROM adjustments ORDER BY id;
DROP TABLE adjustments;
ALTER TABLE adjustments_v2 RENAME TO adjustments;
CREATE INDEX adjustments_key_id_id ON adjustments (key_id, id);
