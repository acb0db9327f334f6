-- tollgate PostgreSQL schema, version 3: each key's usage totals kept on
-- its row, so that `GET /me` reads one row instead of summing every ledger
-- row the key ever had. A statement trigger adds each insert's rows to
-- their keys' totals (one UPDATE per key per settlement batch), so that
-- instances of an earlier version still running during an upgrade are
-- counted too. Existing ledgers are summed once, here.

ALTER TABLE api_keys
    ADD COLUMN used_requests          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_completion_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_credits           BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION add_usage_totals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE api_keys a SET
        used_requests          = a.used_requests + t.requests,
        used_prompt_tokens     = a.used_prompt_tokens + t.prompt_tokens,
        used_completion_tokens = a.used_completion_tokens + t.completion_tokens,
        used_credits           = a.used_credits + t.credits
    FROM (SELECT key_id, COUNT(*) AS requests,
                 SUM(prompt_tokens)::BIGINT AS prompt_tokens,
                 SUM(completion_tokens)::BIGINT AS completion_tokens,
                 SUM(credits)::BIGINT AS credits
          FROM new_rows GROUP BY key_id) AS t
    WHERE a.id = t.key_id;
    RETURN NULL;
END
$$;

-- The ledger is summed and the trigger created in one transaction (the
-- migrator's), with the table locked against inserts in between.
LOCK TABLE usage IN SHARE MODE;

UPDATE api_keys a SET
    used_requests          = t.requests,
    used_prompt_tokens     = t.prompt_tokens,
    used_completion_tokens = t.completion_tokens,
    used_credits           = t.credits
FROM (SELECT key_id, COUNT(*) AS requests, SUM(prompt_tokens)::BIGINT AS prompt_tokens,
             SUM(completion_tokens)::BIGINT AS completion_tokens,
             SUM(credits)::BIGINT AS credits
      FROM usage GROUP BY key_id) AS t
WHERE a.id = t.key_id;

CREATE TRIGGER usage_totals AFTER INSERT ON usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION add_usage_totals();
