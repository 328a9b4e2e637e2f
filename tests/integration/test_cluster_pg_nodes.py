"""SPEC §7, the nodes table and the database's side of a node's life, from a review of the
cluster: rows of nodes long gone, two nodes under one name, a migration lock held
elsewhere, and a table an operator keeps locked.

Every test starts its own PostgreSQL 15 and real portmux-server nodes pointed at it."""
import signal
import time

from conftest import wait_until
from pg_helpers import OpenTransaction, TableLock, pg  # noqa: F401  (fixture)
from test_cluster_pg import pg_node

MIGRATION_LOCK_KEY = 0x706f72746d7578  # store_pg.c: PG_MIGRATION_LOCK_KEY ("portmux")


def cluster(node):
    status, _, body = node.api("GET", "/api/cluster")
    assert status == 200, body
    return body.get("data", body)


def alive_names(node):
    return sorted(n["name"] for n in cluster(node)["nodes"] if n["alive"])


def test_rows_of_gone_nodes_never_hide_a_live_one(pg, server_factory):  # noqa: F811
    """Every name ever used kept its row; past 256 rows, a live node whose name sorted
    after them was not read at all: not listed, not advertised to tunnel clients."""
    a = pg_node(server_factory, pg, name="a",
                cluster={"node_name": "zz-a", "advertise": "127.0.0.2:9000"})
    b = pg_node(server_factory, pg, name="b",
                cluster={"node_name": "zz-b", "advertise": "127.0.0.3:9000"})
    wait_until(lambda: alive_names(a) == ["zz-a", "zz-b"], timeout=15, desc="both nodes")
    # 300 nodes that left a minute ago (containers recreated under new host names), and
    # 50 that left two days ago.
    pg.psql("INSERT INTO nodes (name, advertise, started_at, heartbeat_at) "
            "SELECT 'gone-' || lpad(g::text, 4, '0'), '10.0.0.1:9000', 0, "
            "extract(epoch FROM now())::bigint - 60 FROM generate_series(1, 300) g")
    pg.psql("INSERT INTO nodes (name, advertise, started_at, heartbeat_at) "
            "SELECT 'old-' || lpad(g::text, 4, '0'), '10.0.0.1:9000', 0, "
            "extract(epoch FROM now())::bigint - 172800 FROM generate_series(1, 50) g")
    # Two heartbeats of each node later, both still see both.
    wait_until(lambda: pg.psql("SELECT count(*) FROM nodes WHERE name LIKE 'old-%'") == [["0"]],
               timeout=15, desc="rows silent for two days deleted")
    time.sleep(6)
    for node in (a, b):
        view = cluster(node)
        names = [n["name"] for n in view["nodes"]]
        assert alive_names(node) == ["zz-a", "zz-b"], (node.name, names[-5:], view["count"])
        assert names == sorted(names)
        assert view["count"] <= 256
    # The rows of the last minute stay listed as gone (up to the cap) until a day passes.
    assert pg.psql("SELECT count(*) FROM nodes WHERE name LIKE 'gone-%'") == [["300"]]
    assert any(n["name"].startswith("gone-") and not n["alive"] for n in cluster(a)["nodes"])


def test_two_live_nodes_under_one_name_are_told_apart(pg, server_factory):  # noqa: F811
    """Two nodes on one host without cluster.node_name took turns in one row: each listed
    only itself, and neither said a word."""
    a = pg_node(server_factory, pg, name="a",
                cluster={"node_name": "same", "advertise": "127.0.0.2:9000"})
    wait_until(lambda: pg.psql("SELECT advertise FROM nodes WHERE name = 'same'")
               == [["127.0.0.2:9000"]], timeout=15, desc="a registered")
    mark = 0
    b = pg_node(server_factory, pg, name="b",
                cluster={"node_name": "same", "advertise": "127.0.0.3:9000"})
    b.wait_log(r'node name "same" is in use by another live node.*cluster\.node_name',
               timeout=15, after=mark)
    # The row stays a's through several heartbeats of both, and b says it once a minute,
    # not once a heartbeat.
    for _ in range(4):
        time.sleep(3)
        assert pg.psql("SELECT advertise FROM nodes WHERE name = 'same'") == [["127.0.0.2:9000"]]
    assert b.log_text().count("is in use by another live node") == 1
    assert "is in use by another live node" not in a.log_text()
    # When a stops, b takes the name over once a's row has been silent for 15 s.
    assert a.stop() == 0
    wait_until(lambda: pg.psql("SELECT advertise FROM nodes WHERE name = 'same'")
               == [["127.0.0.3:9000"]], timeout=30, desc="b took the name over")
    b.wait_log(r'node name "same" registered', timeout=5)
    # A node that restarts under its own name and address is not refused its own row.
    mark = b.log_mark()
    assert b.stop() == 0
    b.start(timeout=20)
    time.sleep(6)
    assert "is in use by another live node" not in b.log_text()[mark:]


def test_a_start_waiting_on_the_migration_lock_says_so_and_stops_on_sigterm(
        pg, server_factory):  # noqa: F811
    """A session holding the migration lock (a node stuck mid-migration) held a start for
    ever without a line, and SIGTERM did nothing until the lock was released."""
    holder = OpenTransaction(
        pg, f"SELECT 1 FROM (SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})) AS taken")
    try:
        node = pg_node(server_factory, pg, name="n", start=False, cluster={"node_name": "n1"})
        node.proc.start()
        node.wait_log(r"waiting for the migration lock: another session holds it", timeout=20)
        assert node.running()
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(2) == 0, node.log_tail()
    finally:
        holder.rollback()
    # Released, a start goes through and says nothing about waiting.
    node = pg_node(server_factory, pg, name="n2", cluster={"node_name": "n2"})
    assert "waiting for the migration lock" not in node.log_text()


def test_a_locked_table_leaves_no_backends_behind(pg, server_factory):  # noqa: F811
    """A node gives up on its change feed after 20 s of silence and opens another; the
    backend it left kept waiting on the lock, one more every ~25 s, until PostgreSQL ran
    out of connections. Statements now end at the server after 15 s."""
    node = pg_node(server_factory, pg, name="a", cluster={"node_name": "a"})
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity "
                               "WHERE application_name = 'portmux-sync'") == [["1"]],
               timeout=15, desc="the change feed connected")
    query = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'portmux-sync' "
             "AND wait_event_type = 'Lock'")
    most = 0
    lock = TableLock(pg, "mappings")
    try:
        deadline = time.monotonic() + 65
        while time.monotonic() < deadline:
            most = max(most, int(pg.psql(query)[0][0]))
            time.sleep(1)
    finally:
        lock.release()
    # The old code had two waiting by 60 s, four by 106 s.
    assert most <= 1, most
    assert node.wait_log(r"canceling statement due to statement timeout", timeout=1)
    wait_until(lambda: pg.psql(query) == [["0"]], timeout=10, desc="nothing waits any more")
    assert node.running()
