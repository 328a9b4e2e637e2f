"""SPEC §7: a node that (re)starts listening for changes misses none.

A node's sync connection sends its LISTEN and its full read of the shared tables in one
Query message. PostgreSQL runs such a message as one transaction, and a LISTEN takes
effect when its transaction commits: a change another node committed after the read's
snapshot but before that commit was in neither the rows read nor the notifications, and
the node learnt of it only at its next resync, 30 s later (the once-seen flake of
test_cluster_haproxy: "b serves the mapping a created" within 5 s). The LISTEN is now
committed first.

The test makes the window wide on purpose: it holds a lock on the clients table (the
read's second SELECT), makes b's sync connection reconnect (found by its
application_name, portmux-sync), waits until b's read hangs on the lock after its
mappings SELECT, has node a create a mapping then, and releases the lock. Only a
PostgreSQL started by the test, 127.0.0.0/8, every wait bounded."""

from conftest import free_port, socket_owner, tcp_socket_inodes, wait_until
from pg_helpers import TableLock, pg  # noqa: F401  (fixture)
from test_cluster_pg import echo_ok, pg_node


def sync_backends(pg, where=""):  # noqa: F811
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE "
                       f"application_name = 'portmux-sync' {where}")[0][0])


def test_change_during_listen_start_is_not_missed(pg, server_factory, echo_backend):  # noqa: F811
    a = pg_node(server_factory, pg, name="a", mappings={"bind_addr": "127.0.0.2"})
    b = pg_node(server_factory, pg, name="b", mappings={"bind_addr": "127.0.0.3"})
    for n in (a, b):
        n.wait_log("listening for changes from other nodes", timeout=10)
    # Each node names its connections: two sync connections now, and store ones.
    assert sync_backends(pg) == 2
    assert int(pg.psql("SELECT count(*) FROM pg_stat_activity "
                       "WHERE application_name = 'portmux-store'")[0][0]) >= 2

    with TableLock(pg, "clients"):
        # b's sync connection goes; b reconnects, listens, reads mappings, then waits for
        # the lock in its clients SELECT.
        rows = pg.psql("SELECT pid, client_port FROM pg_stat_activity "
                       "WHERE application_name = 'portmux-sync'")
        socks = tcp_socket_inodes()
        mine = [pid for pid, cport in rows
                if (int(cport), pg.port) in socks and
                socket_owner(b.pid, socks[(int(cport), pg.port)]) is not None]
        assert len(mine) == 1, (rows, mine)
        pg.psql(f"SELECT pg_terminate_backend({mine[0]})")
        wait_until(lambda: sync_backends(pg, "AND wait_event_type = 'Lock'") == 1,
                   timeout=30, desc="b's new sync connection waiting on the clients lock")
        # Another node's change commits now, inside b's window.
        port = free_port()
        a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    # SPEC: within 1 s; the deadline leaves room for a loaded machine, and is far below
    # the 30 s resync that would have healed the miss.
    wait_until(lambda: (b.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="b listens on the mapping a created while b's LISTEN was starting")
    echo_ok(port, host="127.0.0.3")
