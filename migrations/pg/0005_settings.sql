-- 0005 (PostgreSQL): facts about this database itself, as SQLite's 0005.
-- Applied by the store inside its own transaction under pg_advisory_lock, so no
-- BEGIN/COMMIT here. first_client: the first start has made client "default" (SPEC §4a).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY CHECK (length(key) BETWEEN 1 AND 64),
    value TEXT NOT NULL
);
