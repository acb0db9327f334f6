-- tollgate SQLite schema, version 3: each key's usage totals kept on its
-- row, added to by the same UPDATE that charges a settlement, so that
-- `GET /me` reads one row instead of summing every ledger row the key ever
-- had. Existing ledgers are summed once, here. Totals stop at the largest
-- 64-bit integer, as each ledger count does (TOTAL sums as a float, exact
-- up to 2^53, where SUM would fail the upgrade on overflow).

ALTER TABLE api_keys ADD COLUMN used_requests          BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN used_prompt_tokens     BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN used_completion_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN used_credits           BIGINT NOT NULL DEFAULT 0;

UPDATE api_keys SET
    used_requests          = t.requests,
    used_prompt_tokens     = t.prompt_tokens,
    used_completion_tokens = t.completion_tokens,
    used_credits           = t.credits
FROM (SELECT key_id, COUNT(*) AS requests,
             CAST(MIN(TOTAL(prompt_tokens), 9223372036854775807.0) AS INTEGER) AS prompt_tokens,
             CAST(MIN(TOTAL(completion_tokens), 9223372036854775807.0) AS INTEGER)
                 AS completion_tokens,
             CAST(MIN(TOTAL(credits), 9223372036854775807.0) AS INTEGER) AS credits
      FROM usage GROUP BY key_id) AS t
WHERE api_keys.id = t.key_id;
