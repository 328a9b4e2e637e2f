-- 0001: the mappings table (SPEC.md §2).
-- Applied by the store inside its own transaction, so no BEGIN/COMMIT here.
-- The CHECKs repeat the API's range rules so a bad row cannot reach the
-- database even through a bug above it.
CREATE TABLE mappings (
    id          INTEGER PRIMARY KEY,
    port        INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
    target_ip   TEXT    NOT NULL DEFAULT '',
    target_port INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
    use_tunnel  INTEGER NOT NULL,
    client      TEXT    NOT NULL DEFAULT 'default',
    name        TEXT    NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
