-- 0001 (PostgreSQL): the schema the SQLite migrations 0001-0004 reach, in one step (SPEC §7).
-- Applied by the store inside its own transaction under pg_advisory_lock, so no
-- BEGIN/COMMIT here. Same columns, meanings and CHECKs as the SQLite tables; ids come
-- from a sequence, so they are never reused after a remove (issue 17) on any node.
CREATE TABLE mappings (
    id              BIGSERIAL PRIMARY KEY,
    port            INTEGER NOT NULL UNIQUE CHECK (port BETWEEN 1 AND 65535),
    target_ip       TEXT    NOT NULL DEFAULT '',
    target_port     INTEGER NOT NULL CHECK (target_port BETWEEN 1 AND 65535),
    use_tunnel      BOOLEAN NOT NULL,
    client          TEXT    NOT NULL DEFAULT '',
    name            TEXT    NOT NULL DEFAULT '',
    created_at      BIGINT  NOT NULL,
    allow_from      TEXT    NOT NULL DEFAULT '',
    proxy_protocol  TEXT    NOT NULL DEFAULT 'none' CHECK (proxy_protocol IN ('none', 'v1', 'v2')),
    max_connections INTEGER NOT NULL DEFAULT 0 CHECK (max_connections BETWEEN 0 AND 1000000),
    rate_limit      BIGINT  NOT NULL DEFAULT 0 CHECK (rate_limit BETWEEN 0 AND 1000000000000),
    enabled         BOOLEAN NOT NULL DEFAULT TRUE
);

-- Tunnel clients created through the API (SPEC §4a): only hashes of tokens.
CREATE TABLE clients (
    id               BIGSERIAL PRIMARY KEY,
    name             TEXT   NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),
    token_hash       TEXT   NOT NULL CHECK (length(token_hash) = 64),
    prev_hash        TEXT   NOT NULL DEFAULT '',
    prev_valid_until BIGINT NOT NULL DEFAULT 0,
    source           TEXT   NOT NULL DEFAULT 'api',
    created_at       BIGINT NOT NULL,
    last_seen        BIGINT NOT NULL DEFAULT 0
);
