-- tollgate SQLite schema, version 4: settlements are made durable in a
-- journal next to the database (`<database>-settlements`, see
-- src/store/sqlite/journal.rs) and applied to it later. This row holds the
-- number of the last journal entry applied, written in the transaction
-- that applies it, so that an entry is applied exactly once however often
-- the journal is read.

CREATE TABLE settlement_journal (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    applied BIGINT NOT NULL
);
INSERT INTO settlement_journal (id, applied) VALUES (1, 0);
