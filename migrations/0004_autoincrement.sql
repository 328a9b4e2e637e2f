-- 0004: mapping ids are never reused after a remove (issue 17).
-- SQLite hands out max(id)+1 to a plain INTEGER PRIMARY KEY, so removing the newest
-- mapping gave its id to the next one, and a script holding the old id saw another
-- mapping. AUTOINCREMENT keeps the high-water mark in sqlite_sequence; SQLite cannot add
-- it to an existing table, hence the rebuild (https://www.sqlite.org/lang_altertable.html,
-- "other kinds of table schema changes"). Every row, id and CHECK is kept; the store runs
-- this inside its own transaction.
-- When a migration adds columns to mappings before this one (0003), they are listed here
-- too, in the same order: this table must have every column of mappings at this version.
CREATE TABLE mappings_new (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    port            INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
    target_ip       TEXT    NOT NULL DEFAULT '',
    target_port     INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
    use_tunnel      INTEGER NOT NULL,
    client          TEXT    NOT NULL DEFAULT 'default',
    name            TEXT    NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    allow_from      TEXT    NOT NULL DEFAULT '',
    proxy_protocol  TEXT    NOT NULL DEFAULT 'none' CHECK (proxy_protocol IN ('none', 'v1', 'v2')),
    max_connections INTEGER NOT NULL DEFAULT 0 CHECK (max_connections BETWEEN 0 AND 1000000),
    rate_limit      INTEGER NOT NULL DEFAULT 0 CHECK (rate_limit BETWEEN 0 AND 1000000000000),
    enabled         INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1))
);
-- SELECT * on purpose: a column added before this migration and missing above makes
-- the copy fail (and the whole migration roll back) instead of being dropped silently.
INSERT INTO mappings_new SELECT * FROM mappings;
DROP TABLE mappings;
ALTER TABLE mappings_new RENAME TO mappings;
-- Direct mappings have no client (SPEC §2); rows written before said 'default'.
UPDATE mappings SET client = '' WHERE use_tunnel = 0;
