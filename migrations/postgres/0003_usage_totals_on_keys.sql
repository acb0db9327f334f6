-- tollgate PostgreSQL schema, version 3: each key's usage totals kept on
-- its row, so that `GET /me` reads one row instead of summing every ledger
-- row the key ever had. A statement trigger adds each insert's rows to
-- their keys' totals (one UPDATE per key per settlement batch), so that
-- instances of an earlier version still running during an upgrade are
-- counted too. Totals stop at the largest BIGINT, as each ledger count
-- does.
--
-- Existing ledgers are summed once, here. The keys table is locked first,
-- as a settlement locks it before the ledger (the other order could
-- deadlock with one), then the ledger against inserts; both before any
-- query, so that the sum sees every committed row whatever the isolation
-- level. Every instance's reservations and charges wait meanwhile.

LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE;
LOCK TABLE usage IN SHARE MODE;

ALTER TABLE api_keys
    ADD COLUMN used_requests          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_completion_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN used_credits           BIGINT NOT NULL DEFAULT 0;

UPDATE api_keys a SET
    used_requests          = t.requests,
    used_prompt_tokens     = t.prompt_tokens,
    used_completion_tokens = t.completion_tokens,
    used_credits           = t.credits
FROM (SELECT key_id, COUNT(*) AS requests,
             LEAST(SUM(prompt_tokens), 9223372036854775807)::BIGINT AS prompt_tokens,
             LEAST(SUM(completion_tokens), 9223372036854775807)::BIGINT AS completion_tokens,
             LEAST(SUM(credits), 9223372036854775807)::BIGINT AS credits
      FROM usage GROUP BY key_id) AS t
WHERE a.id = t.key_id;

-- `SET search_path FROM CURRENT`: the schema tollgate migrated, whoever
-- inserts the rows.
CREATE FUNCTION add_usage_totals() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE api_keys a SET
        used_requests          = LEAST(a.used_requests::NUMERIC + t.requests,
                                       9223372036854775807),
        used_prompt_tokens     = LEAST(a.used_prompt_tokens + t.prompt_tokens,
                                       9223372036854775807),
        used_completion_tokens = LEAST(a.used_completion_tokens + t.completion_tokens,
                                       9223372036854775807),
        used_credits           = LEAST(a.used_credits + t.credits, 9223372036854775807)
    FROM (SELECT key_id, COUNT(*) AS requests,
                 SUM(prompt_tokens) AS prompt_tokens,
                 SUM(completion_tokens) AS completion_tokens,
                 SUM(credits) AS credits
          FROM new_rows GROUP BY key_id) AS t
    WHERE a.id = t.key_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_totals AFTER INSERT ON usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION add_usage_totals();
