-- 0003 (PostgreSQL): the nodes of a cluster (SPEC §7). Each node upserts its row every
-- 5 s; heartbeat_at is the database's clock (not the node's), so nodes with skewed
-- clocks still agree who is alive (silent for 15 s = gone). statuses is the node's own
-- view of every mapping, a JSON object {"<port>": "<status>"}.
CREATE TABLE nodes (
    name               TEXT    PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 64),
    advertise          TEXT    NOT NULL DEFAULT '',
    started_at         BIGINT  NOT NULL,
    heartbeat_at       BIGINT  NOT NULL,
    clients            INTEGER NOT NULL DEFAULT 0,
    mappings_listening INTEGER NOT NULL DEFAULT 0,
    statuses           TEXT    NOT NULL DEFAULT '{}'
);
