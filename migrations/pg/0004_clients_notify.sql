-- 0004 (PostgreSQL): tunnel clients created, rotated or removed on one node reach the
-- others (SPEC §7: "client records and tokens live in the shared store too"). Same
-- channel as the mappings: a node answers any notice by reading both tables. last_seen,
-- written at every session start and end, notifies nobody.
CREATE FUNCTION portmux_clients_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('portmux_mappings', 'C ' || COALESCE(NEW.name, OLD.name));
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER clients_notify_rows AFTER INSERT OR DELETE ON clients
    FOR EACH ROW EXECUTE FUNCTION portmux_clients_notify();
CREATE TRIGGER clients_notify_tokens AFTER UPDATE ON clients
    FOR EACH ROW
    WHEN (OLD.token_hash IS DISTINCT FROM NEW.token_hash OR
          OLD.prev_hash IS DISTINCT FROM NEW.prev_hash OR
          OLD.prev_valid_until IS DISTINCT FROM NEW.prev_valid_until)
    EXECUTE FUNCTION portmux_clients_notify();
