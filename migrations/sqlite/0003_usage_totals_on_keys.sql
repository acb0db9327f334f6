-- tollgate SQLite schema, version 3: each key's usage totals kept on its
-- row, added to by the same UPDATE that charges a settlement, so that
-- `GET /me` reads one row instead of summing every ledger row the key ever
-- had. Existing ledgers are summed once, here.

ALTER TABLE api_keys ADD COLUMN used_requests          BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN used_prompt_tokens     BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN used_completion_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE api_keys ADD COLUMN used_credits           BIGINT NOT NULL DEFAULT 0;

UPDATE api_keys SET
    used_requests          = t.requests,
    used_prompt_tokens     = t.prompt_tokens,
    used_completion_tokens = t.completion_tokens,
    used_credits           = t.credits
FROM (SELECT key_id, COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens,
             SUM(completion_tokens) AS completion_tokens, SUM(credits) AS credits
      FROM usage GROUP BY key_id) AS t
WHERE api_keys.id = t.key_id;
