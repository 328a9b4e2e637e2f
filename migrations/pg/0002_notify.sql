-- 0002 (PostgreSQL): every change to mappings notifies the nodes (SPEC §7 propagation).
-- The payload is only the operation and the port: a node answers any notification with
-- one read of the table, so a lost or coalesced notification costs nothing, and no
-- payload can outgrow NOTIFY's 8000-byte limit.
CREATE FUNCTION portmux_mappings_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('portmux_mappings',
                      left(TG_OP, 1) || ' ' || COALESCE(NEW.port, OLD.port)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER mappings_notify AFTER INSERT OR UPDATE OR DELETE ON mappings
    FOR EACH ROW EXECUTE FUNCTION portmux_mappings_notify();
