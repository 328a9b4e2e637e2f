-- 0003: mapping policy (SPEC.md §2): who may connect, PROXY protocol, limits, on/off.
-- Every column has a default that keeps an existing mapping behaving as before:
-- anyone may connect, no header, the config's connection limit, no rate limit, enabled.
-- allow_from holds the CIDRs joined by ',' ('' = anyone); max_connections 0 means
-- limits.max_connections_per_mapping from the config.
ALTER TABLE mappings ADD COLUMN allow_from TEXT NOT NULL DEFAULT '';
ALTER TABLE mappings ADD COLUMN proxy_protocol TEXT NOT NULL DEFAULT 'none'
    CHECK (proxy_protocol IN ('none', 'v1', 'v2'));
ALTER TABLE mappings ADD COLUMN max_connections INTEGER NOT NULL DEFAULT 0
    CHECK (max_connections BETWEEN 0 AND 1000000);
ALTER TABLE mappings ADD COLUMN rate_limit INTEGER NOT NULL DEFAULT 0
    CHECK (rate_limit BETWEEN 0 AND 1000000000000);
ALTER TABLE mappings ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1
    CHECK (enabled IN (0, 1));
