-- tollgate SQLite schema, version 1.
-- Amounts of credits are integer thousandths (BIGINT millis); times are
-- milliseconds since the Unix epoch.

CREATE TABLE api_keys (
    id             INTEGER PRIMARY KEY,
    key_hash       TEXT    NOT NULL UNIQUE,
    name           TEXT    NOT NULL,
    role           TEXT    NOT NULL CHECK (role IN ('user', 'admin')),
    balance        BIGINT  NOT NULL,
    models         TEXT,              -- JSON array of model names; NULL: all
    rate_limit_rpm INTEGER,
    max_concurrent INTEGER,
    created_at     BIGINT  NOT NULL,
    revoked_at     BIGINT,
    expires_at     BIGINT,
    granted        INTEGER NOT NULL DEFAULT 0,
    disabled       INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE usage (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
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

CREATE INDEX usage_key_id_id ON usage (key_id, id);

CREATE TABLE adjustments (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    time   BIGINT  NOT NULL,
    key_id INTEGER NOT NULL REFERENCES api_keys (id),
    delta  BIGINT  NOT NULL,
    actor  TEXT    NOT NULL,
    reason TEXT    NOT NULL
);

CREATE INDEX adjustments_key_id_id ON adjustments (key_id, id);
