"""SPEC §7: nodes on one PostgreSQL (database.url / PORTMUX_DATABASE_URL).

Every test starts its own PostgreSQL 15 (pg_helpers.PgServer) and real portmux-server
nodes pointed at it; relays go through real sockets on 127.0.0.0/8."""
import os
import re
import signal
import socket
import threading
import time

from conftest import (SERVER_BIN, PortHolder, Proc, Worker, connect, connect_refused, free_port,
                      free_range, recv_exact, wait_until)
from pg_helpers import OpenTransaction, pg  # noqa: F401  (fixture)


def pg_node(server_factory, pg, name=None, start=True, **config):  # noqa: F811
    """A node whose store is pg: the default config without database.path, with url."""
    srv = server_factory(config=config or None, start=False, name=name)
    srv.config["database"] = {"url": pg.url}
    srv.write_config()
    if start:
        srv.start(timeout=20)
    return srv


def healthy(node):
    assert node.running(), node.log_tail()
    try:
        return node.api("GET", "/health", timeout=2)[0] == 200
    except OSError:
        return False


def echo_ok(port, host="127.0.0.1", payload=b"ping"):
    with connect(port, host=host) as s:
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload


def test_mappings_and_clients_live_in_postgres(pg, server_factory, echo_backend):  # noqa: F811
    node = pg_node(server_factory, pg)
    assert node.wait_log(r"applied \d+ migration\(s\), schema version \d+")
    migrations = pg.psql("SELECT version, name FROM schema_migrations ORDER BY version")
    assert [r[0] for r in migrations] == [str(i + 1) for i in range(len(migrations))]
    assert migrations[0] == ["1", "0001_init.sql"]
    port = free_port()
    m = node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port, name="pg")
    echo_ok(port)
    rows = pg.psql(f"SELECT id, port, target_port, name, use_tunnel, enabled FROM mappings")
    assert rows == [[str(m["id"]), str(port), str(echo_backend.port), "pg", "f", "t"]]
    # Tunnel clients and their token hashes are in the shared store too.
    status, _, body = node.api("POST", "/api/client/create", body={"name": "edge1"})
    assert status == 201, body
    rows = pg.psql("SELECT name, length(token_hash), source FROM clients")
    assert rows == [["edge1", "64", "api"]]
    # Update and remove go to the database as well; a removed id is never handed out again.
    status, _, body = node.api("POST", "/api/mapping/update",
                               body={"port": port, "name": "renamed"})
    assert status == 200, body
    assert pg.psql(f"SELECT name FROM mappings WHERE port = {port}") == [["renamed"]]
    # A restart reads everything back from PostgreSQL and applies no migration again.
    mark = node.log_mark()
    node.restart()
    node.wait_log(rf"schema version {len(migrations)}, applied 0 migrations", after=mark)
    got = node.mapping(port)
    assert got and got["status"] == "listening" and got["name"] == "renamed", got
    echo_ok(port)
    status, _, body = node.api("GET", "/api/clients")
    assert status == 200 and "edge1" in str(body), body
    assert node.remove(port)[0] == 200
    assert pg.psql("SELECT count(*) FROM mappings") == [["0"]]
    m2 = node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert m2["id"] > m["id"]
    assert pg.psql("SELECT version, name FROM schema_migrations ORDER BY version") == migrations


def test_path_and_url_together_is_a_config_error(pg, server_factory):  # noqa: F811
    srv = server_factory(start=False)
    srv.config["database"] = {"path": str(srv.dir / "m.db"), "url": pg.url}
    srv.write_config()
    srv.proc.start()
    assert srv.proc.wait(10) == 2
    assert "database.url" in srv.log_text() and "both set" in srv.log_text()
    srv.config["database"] = {"url": "mysql://x@127.0.0.1/db"}
    srv.write_config()
    srv.proc.start()
    assert srv.proc.wait(10) == 2
    assert "must be a postgres:// or postgresql:// URL" in srv.log_text()


def test_env_url_overrides_the_file(pg, server_factory, tmp_path, echo_backend):  # noqa: F811
    # The file says SQLite; PORTMUX_DATABASE_URL puts the node on PostgreSQL anyway.
    srv = server_factory(start=False)
    srv.proc = Proc([SERVER_BIN, "--config", srv.config_path], srv.log_path, name=srv.name,
                    env=dict(os.environ, PORTMUX_DATABASE_URL=pg.url))
    srv.start(timeout=20)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert pg.psql(f"SELECT port FROM mappings") == [[str(port)]]
    assert not srv.db_path.exists()
    bad = Proc([SERVER_BIN, "--config", srv.config_path], tmp_path / "bad.log",
               env=dict(os.environ, PORTMUX_DATABASE_URL="file:///tmp/x.db")).start()
    assert bad.wait(10) == 2
    assert "PORTMUX_DATABASE_URL must be a postgres:// or postgresql:// URL" in bad.log_text()
    # One libpq cannot parse is refused the same way, and its password never reaches the
    # log (libpq's own message quotes the whole URL).
    for url in ("postgres://u:SECRETPW@[zz/x", "postgres://u:SEC%zzRETPW@127.0.0.1/db"):
        bad = Proc([SERVER_BIN, "--config", srv.config_path], tmp_path / "bad2.log",
                   env=dict(os.environ, PORTMUX_DATABASE_URL=url)).start()
        assert bad.wait(10) == 2, bad.log_text()
        assert "PORTMUX_DATABASE_URL must be a postgres:// or postgresql:// URL" in \
            bad.log_text()
        assert "SECRETPW" not in bad.log_text() and "RETPW" not in bad.log_text()


def test_nodes_starting_together_migrate_once(pg, server_factory):  # noqa: F811
    # The tunnel on and no client anywhere: each node would create "default" at its
    # first start; together, one does and the others take its row.
    nodes = [pg_node(server_factory, pg, name=f"n{i}", start=False,
                     tunnel={"enabled": True}) for i in range(3)]
    for n in nodes:
        n.proc.start()
    for n in nodes:
        wait_until(lambda n=n: healthy(n), timeout=30, desc=f"{n.name} up")
    applied = [n for n in nodes if re.search(r"applied [1-9]\d* migration", n.log_text())]
    assert len(applied) == 1, [n.log_tail() for n in nodes]
    created = [n for n in nodes if 'created tunnel client "default"' in n.log_text()]
    assert len(created) == 1, [n.log_tail() for n in nodes]
    assert pg.psql("SELECT name FROM clients") == [["default"]]
    # Each migration once: a second apply would have failed on CREATE TABLE anyway.
    versions = pg.psql("SELECT version FROM schema_migrations ORDER BY version")
    assert len(versions) >= 2 and len({v[0] for v in versions}) == len(versions)
    # Removed, "default" stays removed: a node's next start is no first start.
    assert pg.psql("SELECT value FROM settings WHERE key = 'first_client'") == [["1"]]
    status, _, body = nodes[0].api("POST", "/api/client/remove", body={"name": "default"})
    assert status == 200, body
    mark = nodes[1].log_mark()
    assert nodes[1].stop() == 0
    nodes[1].start()
    assert 'created tunnel client "default"' not in nodes[1].log_text()[mark:]
    assert pg.psql("SELECT count(*) FROM clients") == [["0"]]


def test_same_port_on_two_nodes_one_201_one_409(pg, server_factory, echo_backend):  # noqa: F811
    a = pg_node(server_factory, pg, name="a", mappings={"bind_addr": "127.0.0.2"})
    b = pg_node(server_factory, pg, name="b", mappings={"bind_addr": "127.0.0.3"})
    for _ in range(5):
        port = free_port()
        results = {}
        go = threading.Event()

        def create(node):
            go.wait(10)
            results[node.name] = node.create(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)

        threads = [threading.Thread(target=create, args=(n,)) for n in (a, b)]
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(20)
        codes = sorted(r[0] for r in results.values())
        assert codes == [201, 409], results
        loser = a if results["a"][0] == 409 else b
        winner = b if loser is a else a
        assert results[loser.name][1]["error"] == "port_in_use", results
        # One row; the loser then serves the winner's mapping (propagation), not its own.
        host = "127.0.0.2" if winner is a else "127.0.0.3"
        echo_ok(port, host=host)
        won = results[winner.name][1]["data"]
        wait_until(lambda: (loser.mapping(port) or {}).get("id") == won["id"], timeout=5,
                   desc="the loser serves the winner's mapping")
        assert pg.psql(f"SELECT count(*) FROM mappings WHERE port = {port}") == [["1"]]


def test_frozen_database_writes_503_reads_and_relays_go_on(pg, server_factory,  # noqa: F811
                                                           echo_backend):
    node = pg_node(server_factory, pg)
    port = free_port()
    node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    relay = connect(port)
    relay.sendall(b"before")
    assert recv_exact(relay, 6) == b"before"
    mark = len(node.log_text())
    pg.freeze()
    try:
        for method, path, body in (
                ("POST", "/api/mapping/create", {"port": free_port(),
                                                 "target_ip": "127.0.0.1", "target_port": echo_backend.port}),
                ("POST", "/api/mapping/update", {"port": port, "name": "x"}),
                ("POST", "/api/mapping/remove", {"port": port}),
                ("POST", "/api/client/create", {"name": "edge2"})):
            t0 = time.monotonic()
            status, _, reply = node.api(method, path, body=body, timeout=10)
            took = time.monotonic() - t0
            assert status == 503 and reply["error"] == "store_unavailable", (path, reply)
            assert took < 2.0, f"{path} answered after {took:.2f} s"
        # Only a write finds out by waiting; the next ones answer at once (backoff, and
        # the change feed's stalled heartbeat), so the loop is not held once per write.
        waited = node.log_text()[mark:].count("no answer within")
        assert 1 <= waited <= 2, node.log_tail()
        # Reads answer from memory; the open relay and new connections are served.
        got = node.mapping(port)
        assert got and got["status"] == "listening" and got["name"] == "", got
        relay.sendall(b"during")
        assert recv_exact(relay, 6) == b"during"
        echo_ok(port)
    finally:
        pg.thaw()
    # After SIGCONT the node reconnects by itself (backoff) and writes succeed again.
    new = free_port()
    wait_until(lambda: node.create(port=new, target_ip="127.0.0.1", target_port=echo_backend.port)[0] == 201,
               timeout=45, interval=0.5, desc="create succeeds after the database is back")
    assert pg.psql(f"SELECT count(*) FROM mappings WHERE port IN ({port}, {new})") == [["2"]]
    relay.sendall(b"after")
    assert recv_exact(relay, 5) == b"after"
    relay.close()


def two_nodes(server_factory, pg):  # noqa: F811
    a = pg_node(server_factory, pg, name="a", mappings={"bind_addr": "127.0.0.2"})
    b = pg_node(server_factory, pg, name="b", mappings={"bind_addr": "127.0.0.3"})
    for n in (a, b):
        n.wait_log("listening for changes from other nodes", timeout=10)
    return a, b


def test_changes_reach_every_node(pg, server_factory, echo_backend):  # noqa: F811
    a, b = two_nodes(server_factory, pg)
    port = free_port()
    a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port, name="one")
    # SPEC: within 1 s; the deadline here leaves room for a loaded test machine.
    wait_until(lambda: (b.mapping(port) or {}).get("status") == "listening", timeout=5,
               desc="b listens on the mapping a created")
    echo_ok(port, host="127.0.0.3")
    echo_ok(port, host="127.0.0.2")
    # An update on b reaches a; disabling closes a's listener too.
    status, _, body = b.api("POST", "/api/mapping/update", body={"port": port, "name": "two"})
    assert status == 200, body
    wait_until(lambda: a.mapping(port)["name"] == "two", timeout=5, desc="update reaches a")
    status, _, body = a.api("POST", "/api/mapping/update", body={"port": port, "enabled": False})
    assert status == 200, body
    wait_until(lambda: b.mapping(port)["status"] == "disabled", timeout=5,
               desc="disable reaches b")
    wait_until(lambda: connect_refused(port, host="127.0.0.3"), timeout=5,
               desc="b's listener closed")
    status, _, body = b.api("POST", "/api/mapping/update", body={"port": port, "enabled": True})
    assert status == 200, body
    wait_until(lambda: a.mapping(port)["status"] == "listening", timeout=5,
               desc="enable reaches a")
    echo_ok(port, host="127.0.0.2")
    # A remove on a closes b's listener.
    assert a.remove(port)[0] == 200
    wait_until(lambda: b.mapping(port) is None, timeout=5, desc="remove reaches b")
    wait_until(lambda: connect_refused(port, host="127.0.0.3"), timeout=5,
               desc="b's listener closed after the remove")


def test_reconnect_resync_heals_a_missed_change(pg, server_factory, echo_backend):  # noqa: F811
    a, b = two_nodes(server_factory, pg)
    port = free_port()
    # A row written with triggers off sends no notification: the nodes miss it ...
    pg.psql("SET session_replication_role = replica; "
            "INSERT INTO mappings (port, target_ip, target_port, use_tunnel, created_at) "
            f"VALUES ({port}, '127.0.0.1', {echo_backend.port}, false, 1)")
    # ... until their connections drop and the full read after the reconnect finds it.
    marks = [n.log_mark() for n in (a, b)]
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = 'portmux' AND pid <> pg_backend_pid()")
    for n, mark in zip((a, b), marks):
        n.wait_log("listening for changes from other nodes", timeout=15, after=mark)
        wait_until(lambda n=n: (n.mapping(port) or {}).get("status") == "listening",
                   timeout=5, desc=f"{n.name} picked up the missed row")
    echo_ok(port, host="127.0.0.2")
    echo_ok(port, host="127.0.0.3")
    # The store's own connection was dropped too: the next write reconnects by itself.
    status, _, body = a.api("POST", "/api/mapping/update", body={"port": port, "name": "x"})
    assert status == 200, body


def cluster(node):
    status, _, body = node.api("GET", "/api/cluster")
    assert status == 200, body
    return {n["name"]: n for n in body["data"]["nodes"]}


def test_nodes_register_heartbeat_and_go(pg, server_factory, echo_backend):  # noqa: F811
    a = pg_node(server_factory, pg, name="a", mappings={"bind_addr": "127.0.0.2"},
                cluster={"node_name": "node-a", "advertise": "127.0.0.2:9000"})
    b = pg_node(server_factory, pg, name="b", mappings={"bind_addr": "127.0.0.3"},
                cluster={"node_name": "node-b", "advertise": "127.0.0.3:9000"})
    wait_until(lambda: set(cluster(a)) == {"node-a", "node-b"}, timeout=15,
               desc="a sees both nodes")
    c = cluster(a)
    assert c["node-b"]["alive"] is True and c["node-b"]["advertise"] == "127.0.0.3:9000", c
    assert c["node-a"]["alive"] is True and c["node-a"]["advertise"] == "127.0.0.2:9000", c
    assert pg.psql("SELECT name FROM nodes ORDER BY name") == [["node-a"], ["node-b"]]
    port = free_port()
    a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    # Each node's own view of the mapping reaches the others with its heartbeat (5 s).
    wait_until(lambda: (a.mapping(port) or {}).get("nodes") ==
               {"node-a": "listening", "node-b": "listening"}, timeout=15,
               desc="a's list shows both nodes listening")
    wait_until(lambda: cluster(a)["node-b"]["mappings_listening"] == 1, timeout=15,
               desc="b's heartbeat counts the mapping")
    status, _, text = a.api("GET", "/metrics")
    assert status == 200 and 'portmux_cluster_nodes{state="alive"} 2' in text, text
    assert "portmux_cluster_database_up 1" in text
    # A node that stops heartbeating is gone after 15 s, and leaves the mapping's nodes.
    b.kill9()
    wait_until(lambda: cluster(a)["node-b"]["alive"] is False, timeout=40, interval=0.5,
               desc="b marked gone")
    assert a.mapping(port)["nodes"] == {"node-a": "listening"}
    status, _, text = a.api("GET", "/metrics")
    assert 'portmux_cluster_nodes{state="gone"} 1' in text, text


def test_cluster_config_and_sqlite(server_factory):
    srv = server_factory()
    status, _, body = srv.api("GET", "/api/cluster")
    assert status == 404 and body["error"] == "not_found", body
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    assert "nodes" not in srv.mapping(port)  # a single server has no cluster view
    bad = server_factory(start=False, name="bad")
    bad.config["cluster"] = {"node_name": "no spaces"}
    bad.write_config()
    bad.proc.start()
    assert bad.proc.wait(10) == 2
    assert "cluster.node_name" in bad.log_text()


def test_hello_response_lists_the_live_nodes(pg, server_factory):  # noqa: F811
    import json as _json
    from sec_helpers import hello, read_frame
    tunnel = {"enabled": True, "clients": [{"name": "edge", "token": "edge-token-0123456789"}]}
    a = pg_node(server_factory, pg, name="a", tunnel=tunnel,
                cluster={"node_name": "node-a", "advertise": "127.0.0.2:19000"})
    b = pg_node(server_factory, pg, name="b", tunnel=tunnel,
                cluster={"node_name": "node-b", "advertise": "127.0.0.3:19000"})
    wait_until(lambda: cluster(a).get("node-b", {}).get("alive"), timeout=15,
               desc="a sees b alive")
    with socket.create_connection(("127.0.0.1", a.tunnel_port), timeout=10) as s:
        s.sendall(hello("edge", "edge-token-0123456789"))
        fr = read_frame(s, 10)
    assert fr is not None and fr[0] == 0x07, fr
    answer = _json.loads(fr[1])
    assert answer["ok"] is True, answer
    assert answer["nodes"] == ["127.0.0.2:19000", "127.0.0.3:19000"], answer
    # A node that is gone is no longer offered.
    b.kill9()
    wait_until(lambda: cluster(a)["node-b"]["alive"] is False, timeout=40, interval=0.5,
               desc="b marked gone")
    with socket.create_connection(("127.0.0.1", a.tunnel_port), timeout=10) as s:
        s.sendall(hello("edge", "edge-token-0123456789"))
        fr = read_frame(s, 10)
    assert _json.loads(fr[1]).get("nodes") == ["127.0.0.2:19000"], fr


def test_tunnel_clients_reach_every_node(pg, server_factory):  # noqa: F811
    import json as _json
    from sec_helpers import hello, read_frame

    def hello_ok(node, name, token):
        with socket.create_connection(("127.0.0.1", node.tunnel_port), timeout=10) as s:
            s.sendall(hello(name, token))
            fr = read_frame(s, 10)
        return fr is not None and _json.loads(fr[1]).get("ok") is True

    def names(node):
        status, _, body = node.api("GET", "/api/clients")
        assert status == 200, body
        return {c["name"] for c in body["data"]["clients"]}

    tunnel = {"enabled": True,
              "clients": [{"name": "cfg", "token": "config-token-0123456789"}]}
    a = pg_node(server_factory, pg, name="a", tunnel=tunnel)
    b = pg_node(server_factory, pg, name="b", tunnel=tunnel)
    for n in (a, b):
        n.wait_log("listening for changes from other nodes", timeout=10)
    status, _, body = a.api("POST", "/api/client/create", body={"name": "edge"})
    assert status == 201, body
    token = body["data"]["token"]
    wait_until(lambda: "edge" in names(b), timeout=5, desc="b knows the client a created")
    assert hello_ok(b, "edge", token)
    status, _, body = b.api("POST", "/api/client/rotate", body={"name": "edge", "grace_s": 0})
    assert status == 200, body
    new = body["data"]["token"]
    wait_until(lambda: hello_ok(a, "edge", new), timeout=5, desc="a takes the rotated token")
    assert not hello_ok(a, "edge", token)
    assert a.api("POST", "/api/client/remove", body={"name": "edge"})[0] == 200
    wait_until(lambda: "edge" not in names(b), timeout=5, desc="b forgets the removed client")
    assert not hello_ok(b, "edge", new)
    assert "cfg" in names(b)  # the config's clients are the file's, never synced away


def test_reload_names_cluster_keys_for_a_restart(pg, server_factory):  # noqa: F811
    node = pg_node(server_factory, pg, cluster={"node_name": "one"})
    node.config["cluster"] = {"node_name": "two", "advertise": "127.0.0.2:9000"}
    node.config["database"] = {"url": pg.url + "?application_name=x"}
    node.write_config()
    mark = node.log_mark()
    node.proc.send_signal(signal.SIGHUP)
    node.wait_log(r"reload: .*database\.url, cluster\.node_name, cluster\.advertise changed",
                  after=mark)
    assert cluster(node).keys() == {"one"}  # the running name stays until a restart


def test_sigterm_with_the_database_stalled(pg, server_factory, echo_backend):  # noqa: F811
    node = pg_node(server_factory, pg)
    port = free_port()
    node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    relay = connect(port)
    pg.freeze()
    try:
        # SPEC §5: exit 0 within 2 s (the deadline here leaves room for a loaded machine);
        # nothing on the way out may wait for the database, which would hang here.
        assert node.stop(timeout=5.0) == 0, node.log_tail()
    finally:
        pg.thaw()
        relay.close()


def test_database_gone_and_back(pg, server_factory, echo_backend):  # noqa: F811
    a, b = two_nodes(server_factory, pg)
    port = free_port()
    a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    wait_until(lambda: b.mapping(port) is not None, timeout=5, desc="b has the mapping")
    pg.stop()
    # Gone: writes are refused with 503 (connection refused, no wait); relays go on.
    new = free_port()
    status, body = a.create(port=new, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert status == 503 and body["error"] == "store_unavailable", body
    assert a.mapping(new) is None
    echo_ok(port, host="127.0.0.2")
    echo_ok(port, host="127.0.0.3")
    pg.start()
    # Back: both reconnect by themselves (backoff); a write on a reaches b.
    wait_until(lambda: a.create(port=new, target_ip="127.0.0.1",
                                target_port=echo_backend.port)[0] == 201,
               timeout=60, interval=0.5, desc="a writes again")
    wait_until(lambda: (b.mapping(new) or {}).get("status") == "listening", timeout=60,
               interval=0.5, desc="b catches up after the database came back")
    echo_ok(new, host="127.0.0.3")


def test_long_stall_reconnects_and_resyncs(pg, server_factory, echo_backend):  # noqa: F811
    a, b = two_nodes(server_factory, pg)
    mark = a.log_mark()
    pg.freeze()
    try:
        # A query unanswered for 20 s: the feed gives the connection up (and, the database
        # still stopped, its reconnects too) instead of waiting for TCP.
        a.wait_log("the database stopped answering", timeout=40, after=mark)
    finally:
        pg.thaw()
    a.wait_log("listening for changes from other nodes", timeout=60, after=mark)
    port = free_port()
    wait_until(lambda: b.create(port=port, target_ip="127.0.0.1",
                                target_port=echo_backend.port)[0] == 201,
               timeout=60, interval=0.5, desc="b writes again")
    wait_until(lambda: (a.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="a applies b's change on its new connection")
    echo_ok(port, host="127.0.0.2")


def node_with_a_mapping(server_factory, pg, **fields):  # noqa: F811
    """Node a, listening for changes, with one mapping (fields); returns (a, port)."""
    a = pg_node(server_factory, pg, name="a")
    a.wait_log("listening for changes from other nodes", timeout=10)
    port = free_port()
    a.create_ok(port=port, **fields)
    return a, port


def update_behind(node, pg, other_sql, body):  # noqa: F811
    """node's update (body) waits on the mapping's row while another writer's open
    transaction (other_sql) holds it; the other commits first. Returns (status, reply)."""
    other = OpenTransaction(pg, other_sql)
    try:
        update = Worker(lambda: node.api("POST", "/api/mapping/update", body=body))
        update.start()
        time.sleep(0.4)  # the node's statement is waiting on the row by now
        other.commit()
        status, _, reply = update.join_result(10)
    finally:
        other.rollback()
    return status, reply


def test_update_of_a_mapping_removed_elsewhere_is_404(pg, server_factory):  # noqa: F811
    """Another node's remove commits while this node's update of the same mapping waits on
    the row: the update answers 404 not_found, not a 500 internal_error."""
    a, port = node_with_a_mapping(server_factory, pg, target_ip="192.0.2.1", target_port=80)
    status, body = update_behind(a, pg, f"DELETE FROM mappings WHERE port = {port}",
                                 {"port": port, "name": "x"})
    assert status == 404 and body["error"] == "not_found", (status, body)
    wait_until(lambda: a.mapping(port) is None, timeout=15, desc="a forgets the mapping")
    assert healthy(a)


def test_updates_of_different_fields_on_two_nodes_both_stay(pg, server_factory):  # noqa: F811
    """Two nodes update different fields of one mapping at the same moment: both answer
    200 and both changes stay, in the row and on both nodes. Each node used to write its
    whole copy of the mapping, so the later write undid the earlier one."""
    nodes = []
    for name, addr in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        n = pg_node(server_factory, pg, name=name, mappings={"bind_addr": addr},
                    cluster={"node_name": f"node-{name}"})
        n.wait_log("listening for changes from other nodes", timeout=10)
        nodes.append(n)
    a, b = nodes
    port = free_port()
    a.create_ok(port=port, target_ip="192.0.2.1", target_port=80)
    wait_until(lambda: b.mapping(port) is not None, timeout=10, desc="b has the mapping")
    # Both updates wait on the row, each made from the same copy, then go one after the
    # other in whatever order PostgreSQL picks.
    hold = OpenTransaction(pg, f"SELECT 1 FROM mappings WHERE port = {port} FOR UPDATE")
    try:
        wa = Worker(lambda: a.api("POST", "/api/mapping/update",
                                  body={"port": port, "target_port": 8080}))
        wb = Worker(lambda: b.api("POST", "/api/mapping/update",
                                  body={"port": port, "rate_limit": 5000, "name": "web"}))
        wa.start()
        wb.start()
        time.sleep(0.5)
        hold.commit()
        got = [wa.join_result(10), wb.join_result(10)]
    finally:
        hold.rollback()
    assert [g[0] for g in got] == [200, 200], [(g[0], g[2]) for g in got]
    row = pg.psql(f"SELECT target_port, rate_limit, name FROM mappings WHERE port = {port}")
    assert row == [["8080", "5000", "web"]], row
    # The later answer shows both changes; each node ends with both.
    later = [g[2]["data"] for g in got]
    assert any(d["target_port"] == 8080 and d["rate_limit"] == 5000 for d in later), later
    for n in nodes:
        wait_until(lambda: (lambda m: m and m["target_port"] == 8080 and
                            m["rate_limit"] == 5000 and m["name"] == "web")(n.mapping(port)),
                   timeout=10, desc=f"{n.name} has both changes")
    assert healthy(a) and healthy(b)


def test_an_update_stores_what_it_names_where_the_node_is_behind(pg, server_factory):  # noqa: F811
    """Another node disables a mapping while this node, which still has it enabled, is
    asked to enable it: this node's write comes later and the mapping ends enabled, as
    the request said. A write of only what differed from this node's copy stored nothing
    and left the mapping disabled behind a 200 that said enabled."""
    a, port = node_with_a_mapping(server_factory, pg, target_ip="192.0.2.1", target_port=80)
    status, body = update_behind(a, pg, "UPDATE mappings SET enabled = false "
                                 f"WHERE port = {port}", {"port": port, "enabled": True})
    assert status == 200 and body["data"]["enabled"] is True, (status, body)
    assert pg.psql(f"SELECT enabled FROM mappings WHERE port = {port}") == [["t"]]
    time.sleep(1)  # a reads the table again after its write: it must stay enabled
    assert a.mapping(port)["status"] == "listening", a.mapping(port)
    with connect(port):
        pass


def test_a_destination_changed_meanwhile_is_503_and_nothing_changes(pg, server_factory):  # noqa: F811
    """The destination (target_ip, target_port, use_tunnel, client) is checked as one:
    this node changes target_port while another node changes target_ip. Writing this
    node's whole destination would undo the other change; half of it could pair fields
    nobody checked together. So the later write answers 503 store_unavailable ("changed
    by another node meanwhile"), stores nothing, and this node catches up."""
    a, port = node_with_a_mapping(server_factory, pg, target_ip="192.0.2.1", target_port=80)
    status, body = update_behind(a, pg, "UPDATE mappings SET target_ip = '192.0.2.7' "
                                 f"WHERE port = {port}", {"port": port, "target_port": 8080})
    assert status == 503 and body["error"] == "store_unavailable", (status, body)
    assert "changed by another node meanwhile" in body["message"], body
    assert pg.psql(f"SELECT target_ip, target_port FROM mappings WHERE port = {port}") == \
        [["192.0.2.7", "80"]]
    wait_until(lambda: a.mapping(port)["target_ip"] == "192.0.2.7", timeout=10,
               desc="a catches up with the other change")
    # Tried again, the update applies to what is stored now.
    status, _, body = a.api("POST", "/api/mapping/update",
                            body={"port": port, "target_port": 8080})
    assert status == 200, body
    assert pg.psql(f"SELECT target_ip, target_port FROM mappings WHERE port = {port}") == \
        [["192.0.2.7", "8080"]]


def test_update_made_on_a_disabled_copy_binds_when_another_node_enabled(
        pg, server_factory):  # noqa: F811
    """A node renames a mapping it knows as disabled while another node enables it: the
    row comes back enabled, and the renaming node binds the port at once rather than
    waiting for a resync that would see nothing to change."""
    a, port = node_with_a_mapping(server_factory, pg, target_ip="192.0.2.1", target_port=80, enabled=False)
    connect_refused(port)
    # Another node's enable, straight into the row: a's update runs on the enabled row.
    status, body = update_behind(a, pg, "UPDATE mappings SET enabled = true "
                                 f"WHERE port = {port}", {"port": port, "name": "renamed"})
    assert status == 200, body
    assert body["data"]["enabled"] is True and body["data"]["name"] == "renamed", body
    assert body["data"]["status"] == "listening", body
    with connect(port):
        pass


def test_remove_and_create_again_elsewhere_ends_the_old_connections(
        pg, server_factory, echo_backend):  # noqa: F811
    """Another node removes a mapping and creates the port anew in one transaction (as a
    node whose change feed was down sees a remove and a create between two reads): the
    old mapping's connections end, as a remove ends them, and the port serves the new
    mapping. It used to be taken for an update, and the old connections went on."""
    a = pg_node(server_factory, pg, name="a")
    a.wait_log("listening for changes from other nodes", timeout=10)
    port = free_port()
    old = a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    s = connect(port)
    try:
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        pg.psql(f"BEGIN; DELETE FROM mappings WHERE port = {port}; "
                f"INSERT INTO mappings (port, target_ip, target_port, use_tunnel, created_at) "
                f"VALUES ({port}, '127.0.0.1', {echo_backend.port}, false, 1); COMMIT")
        wait_until(lambda: (a.mapping(port) or {}).get("id") not in (None, old["id"]),
                   timeout=10, desc="a has the new mapping")
        s.settimeout(10)
        try:
            end = s.recv(16)
        except ConnectionResetError:
            end = b""
        assert end == b"", end
    finally:
        s.close()
    echo_ok(port)
    assert a.wait_log(f"port {port} removed and created anew by another node")


def node_with_a_slow_commit(server_factory, pg, seconds):  # noqa: F811
    """A node, and a port whose create waits `seconds` at COMMIT (a deferred trigger that
    sleeps, as a synchronous standby that is gone or a stalled server would)."""
    a = pg_node(server_factory, pg, name="a")
    a.wait_log("listening for changes from other nodes", timeout=10)
    port = free_port()
    pg.psql("CREATE FUNCTION slow_commit() RETURNS trigger AS $$ BEGIN "
            f"PERFORM pg_sleep({seconds}); RETURN NULL; END $$ LANGUAGE plpgsql")
    pg.psql("CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON mappings "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            f"WHEN (NEW.port = {port}) EXECUTE FUNCTION slow_commit()")
    return a, port


COMMITTING = ("FROM pg_stat_activity WHERE application_name = 'portmux-store' "
              "AND state = 'active' AND query = 'COMMIT'")


def create_until_committing(a, pg, port):  # noqa: F811
    """Starts a create of port on a (a Worker) and returns once its COMMIT waits."""
    create = Worker(a.api, "POST", "/api/mapping/create",
                    body={"port": port, "target_ip": "192.0.2.1", "target_port": 80})
    create.start()
    wait_until(lambda: pg.psql("SELECT pid " + COMMITTING), timeout=5, interval=0.01,
               desc="the node's COMMIT waiting on the trigger")
    return create


def test_a_commit_left_unanswered_says_the_write_may_be_stored(pg, server_factory):  # noqa: F811
    """The COMMIT of a create gets no answer within the node's deadline (here a deferred
    trigger that sleeps 3 s at commit; in life a synchronous standby that is gone, or a
    stalled server): the answer is 503 store_unavailable within 2 s, and it says the
    mapping may be stored, because dropping the connection cannot take a COMMIT back.
    It was: the node then reads it back and listens. The old answer, "database error",
    said nothing of the kind."""
    a, port = node_with_a_slow_commit(server_factory, pg, 3)
    t0 = time.monotonic()
    status, _, body = a.api("POST", "/api/mapping/create",
                            body={"port": port, "target_ip": "192.0.2.1", "target_port": 80})
    took = time.monotonic() - t0
    assert status == 503 and body["error"] == "store_unavailable", (status, body)
    assert "may be stored" in body["message"], body
    assert took < 2.5, took
    wait_until(lambda: (a.mapping(port) or {}).get("status") == "listening", timeout=20,
               desc="a reads the stored mapping back and listens")
    assert pg.psql(f"SELECT count(*) FROM mappings WHERE port = {port}") == [["1"]]
    with connect(port):
        pass
    assert healthy(a)


def test_a_connection_lost_during_commit_says_the_write_may_be_stored(pg, server_factory):  # noqa: F811,E501
    """The write connection breaks while the COMMIT of a create is on its way (here the
    backend is terminated while a deferred trigger holds the commit; in life the server
    crashes or the network drops): whether the commit happened is unknown, so the 503
    says the mapping may be stored, not that it is unchanged. (Here it was not: the
    trigger ran before the commit, so the node lists nothing once it has read back.)"""
    a, port = node_with_a_slow_commit(server_factory, pg, 1.2)
    create = create_until_committing(a, pg, port)
    pg.psql("SELECT pg_terminate_backend(pid) " + COMMITTING)
    status, _, body = create.join_result(10)
    assert status == 503 and body["error"] == "store_unavailable", (status, body)
    assert "may be stored" in body["message"], body
    a.wait_log(r"COMMIT was on its way: that write may be stored", timeout=5)
    assert pg.psql(f"SELECT count(*) FROM mappings WHERE port = {port}") == [["0"]]
    # The next write works on a new connection, and nothing of the lost one is listed.
    wait_until(lambda: a.api("POST", "/api/mapping/create",
                             body={"port": free_port(), "target_ip": "192.0.2.1",
                                   "target_port": 80})[0] == 201, timeout=10,
               desc="the next create stored")
    assert a.mapping(port) is None
    assert healthy(a)


def test_a_shutdown_during_commit_says_the_write_may_be_stored(pg, server_factory):  # noqa: F811
    """SIGTERM while the COMMIT of a create waits (a deferred trigger sleeping 3 s): the
    node still stops within 2 s, and the answer it gives the waiting request says the
    mapping may be stored. It is: PostgreSQL finishes the commit after the node is gone,
    and the next start lists it."""
    a, port = node_with_a_slow_commit(server_factory, pg, 3)
    create = create_until_committing(a, pg, port)
    t0 = time.monotonic()
    assert a.stop(timeout=5) == 0
    assert time.monotonic() - t0 < 2.5
    status, _, body = create.join_result(10)
    assert status == 503 and "may be stored" in body["message"], (status, body)
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM mappings WHERE port = {port}") ==
               [["1"]], timeout=10, desc="the commit finished without the node")
    a.start()
    wait_until(lambda: (a.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="the restarted node lists and binds it")


def test_port0_creates_on_two_nodes_at_once_both_succeed(pg, server_factory):  # noqa: F811
    """Two nodes create a mapping without a port at the same moment: they pick the same
    lowest free port, one stores it first, and the other takes the next free one rather
    than answering 409 port_in_use. Ten rounds, both 201 each time, the nodes agree."""
    lo = free_range(40)
    nodes = []
    for name, addr in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        n = pg_node(server_factory, pg, name=name, mappings={"bind_addr": addr},
                    port_range={"from": lo, "end": lo + 39, "blacklist": []},
                    cluster={"node_name": f"node-{name}"})
        n.wait_log("listening for changes from other nodes", timeout=10)
        nodes.append(n)
    for i in range(10):
        go = threading.Event()

        def create(n):
            go.wait(5)
            return n.api("POST", "/api/mapping/create",
                         body={"target_ip": "192.0.2.1", "target_port": 80})
        workers = [Worker(create, n) for n in nodes]
        for w in workers:
            w.start()
        go.set()
        got = [w.join_result(15) for w in workers]
        assert [g[0] for g in got] == [201, 201], (i, [(g[0], g[2]) for g in got])
        ports = {g[2]["data"]["port"] for g in got}
        assert len(ports) == 2, ports
    rows = len(pg.psql("SELECT port FROM mappings"))
    assert rows == 20
    for n in nodes:
        wait_until(lambda: len(n.list()) == 20, timeout=10, desc=f"{n.name} lists 20")


def test_create_on_a_node_where_the_port_is_in_error_is_409(pg, server_factory):  # noqa: F811
    """A node that could not bind a stored mapping shows it in status error; a create of
    that port sent to that node answers 409 port_in_use and leaves the cluster's mapping
    as it is (it used to replace it, for every node)."""
    nodes = {}
    for name, addr in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
        nodes[name] = pg_node(server_factory, pg, name=name, mappings={"bind_addr": addr},
                              cluster={"node_name": f"node-{name}"})
        nodes[name].wait_log("listening for changes from other nodes", timeout=10)
    a, b = nodes["a"], nodes["b"]
    port = free_port()
    with PortHolder(port, "127.0.0.3"):
        a.create_ok(port=port, target_ip="192.0.2.1", target_port=80)
        wait_until(lambda: (b.mapping(port) or {}).get("status") == "error", timeout=10,
                   desc="b cannot bind the port")
    status, body = b.create(port=port, target_ip="192.0.2.9", target_port=9)
    assert status == 409 and body["error"] == "port_in_use", (status, body)
    assert pg.psql(f"SELECT target_ip, target_port FROM mappings WHERE port = {port}") == \
        [["192.0.2.1", "80"]]
    assert (a.mapping(port)["target_ip"], a.mapping(port)["target_port"]) == ("192.0.2.1", 80)
