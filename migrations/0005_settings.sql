-- 0005: facts about this database itself, one row each (key, value).
-- Applied by the store inside its own transaction, so no BEGIN/COMMIT here.
-- first_client: the first start has made its client "default" (SPEC §4a), so a later start
-- that finds no clients (the operator removed them all) leaves it so.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 64),
    value TEXT NOT NULL
);
