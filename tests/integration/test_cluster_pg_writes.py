"""SPEC §7: an API write answered 503 while PostgreSQL was frozen leaves nothing behind.

The statement the node sent before giving up sits in the frozen backend's socket; on
SIGCONT the backend reads it. The node writes inside a transaction it commits only after
the statement answered, so the dropped connection rolls the write back."""
from conftest import free_port, wait_until
from pg_helpers import pg  # noqa: F401  (fixture)
from test_cluster_pg import pg_node


def store_backends(pg):  # noqa: F811
    """Backend pids of the node's store connection: its last statement was a mapping
    write (the change feed only LISTENs, SELECTs and writes the nodes table)."""
    rows = pg.psql("SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                   "datname = current_database() AND "
                   "(query = 'COMMIT' OR query LIKE 'INSERT INTO mappings%')")
    return {r[0] for r in rows}


def test_create_answered_503_is_not_stored_after_thaw(pg, server_factory,  # noqa: F811
                                                      echo_backend):
    node = pg_node(server_factory, pg)
    node.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=echo_backend.port)
    before = store_backends(pg)
    assert len(before) == 1, before
    lost = free_port()
    pg.freeze()
    try:
        status, _, reply = node.api("POST", "/api/mapping/create",
                                    body={"port": lost, "target_ip": "127.0.0.1",
                                          "target_port": echo_backend.port}, timeout=10)
        assert status == 503 and reply["error"] == "store_unavailable", reply
    finally:
        pg.thaw()
    # The dropped backend exits once it has read all the node sent: by then whatever it
    # was going to store is stored.
    wait_until(lambda: not (store_backends(pg) & before), timeout=30, interval=0.2,
               desc="the dropped store connection's backend exits")
    assert pg.psql(f"SELECT count(*) FROM mappings WHERE port = {lost}") == [["0"]]
    # The node reconnects and writes again; the refused port is not on the node either.
    new = free_port()
    wait_until(lambda: node.create(port=new, target_ip="127.0.0.1",
                                   target_port=echo_backend.port)[0] == 201,
               timeout=45, interval=0.5, desc="create succeeds after the database is back")
    assert node.mapping(lost) is None
    assert pg.psql(f"SELECT count(*) FROM mappings WHERE port IN ({lost}, {new})") == [["1"]]
    # A clean exit after the dropped connection (under ASan also leak-free).
    rc = node.stop()
    assert rc == 0, node.log_tail()
