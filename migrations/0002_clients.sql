-- 0002: tunnel clients as stored objects (SPEC.md §4a).
-- Applied by the store inside its own transaction, so no BEGIN/COMMIT here.
-- Only hashes of tokens are kept (64 hex digits of SHA-256); prev_hash is the
-- token before the last rotation, accepted until prev_valid_until (unix seconds).
-- Clients from the config file are not stored: the file stays their owner.
CREATE TABLE clients (
    id               INTEGER PRIMARY KEY,
    name             TEXT    NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    token_hash       TEXT    NOT NULL CHECK (length(token_hash) = 64),
    prev_hash        TEXT    NOT NULL DEFAULT '',
    prev_valid_until INTEGER NOT NULL DEFAULT 0,
    source           TEXT    NOT NULL DEFAULT 'api',
    created_at       INTEGER NOT NULL,
    last_seen        INTEGER NOT NULL DEFAULT 0
);
