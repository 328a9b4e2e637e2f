-- 0006 (PostgreSQL): which process heartbeats a node's row. Two live nodes under one
-- name (two on one host without cluster.node_name) took turns in one row; a heartbeat
-- now updates the row only when it is this process's own (same instance), a restart at
-- the same advertise address, or its holder has been silent for 15 s (cluster_sync.c).
-- Applied inside the store's transaction under pg_advisory_lock: no BEGIN/COMMIT here.
ALTER TABLE nodes ADD COLUMN instance TEXT NOT NULL DEFAULT '';
