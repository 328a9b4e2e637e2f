"""portmux-client keeps a session to every cluster node (SPEC §7, issue 18).

Two portmux-server nodes on one real PostgreSQL (pg_helpers), each on its own loopback
address (127.0.0.2 / 127.0.0.3: mappings.bind_addr, tunnel.listen_addr,
cluster.advertise). A client started against node A learns node B from A's HelloResponse
(or from A's "nodes" Notice when B joins later), connects to it with the same options,
so a tunnel mapping answers on B's public port too; when B stops, that session is
dropped and the client keeps serving through A. The client runs on a pseudo-terminal
(script(1)) so its status block -- one "Node" row per extra node -- can be read."""
import os
import re
import shlex
import signal
import time
from pathlib import Path

import pytest

from conftest import CLIENT_BIN, connect, free_port, recv_exact, wait_until
from pg_helpers import TableLock, pg  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

TOKEN = "edge-" + os.urandom(6).hex()
ROW = re.compile(rb"\x1b\[(\d+);1H\x1b\[2K([^\x1b]*)")


def node(server_factory, pg, name, addr, start=True):  # noqa: F811
    tport = free_port()
    srv = server_factory(config={
        "tunnel": {"enabled": True, "listen_addr": addr, "listen_port": tport,
                   "heartbeat_interval": 1, "heartbeat_timeout": 5,
                   "clients": [{"name": "edge", "token": TOKEN}]},
        "mappings": {"bind_addr": addr},
        "cluster": {"node_name": f"node-{name}", "advertise": f"{addr}:{tport}"},
    }, start=False, name=name)
    srv.config["database"] = {"url": pg.url}
    srv.write_config()
    if start:
        srv.start(timeout=20)
    return srv


def connected(srv):
    status, _, body = srv.api("GET", "/api/clients")
    assert status == 200, body
    return any(c["name"] == "edge" and c["connected"] for c in body["data"]["clients"])


def echo_ok(port, host, payload=b"through the tunnel"):
    with connect(port, host=host) as s:
        s.sendall(payload)
        assert recv_exact(s, len(payload)) == payload


class TtyClient:
    """portmux-client on a 40x160 pseudo-terminal; everything it draws lands in its log."""

    def __init__(self, proc_factory, tmp_path, server):
        self.pid_path = Path(tmp_path) / "client.pid"
        args = [str(CLIENT_BIN), "--server", server, "--token", TOKEN, "--name", "edge",
                "--heartbeat-interval", "1", "--heartbeat-timeout", "5"]
        cmd = (f"stty rows 40 cols 160; echo $$ > {shlex.quote(str(self.pid_path))}; "
               f"exec {shlex.join(args)}")
        env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
        self.proc = proc_factory(["script", "-q", "-e", "-c", cmd, "/dev/null"], "client",
                                 env=env)

    def stop(self):
        """SIGTERM to the client itself; its exit status (script -e passes it on)."""
        pid = int(wait_until(lambda: self.pid_path.exists() and self.pid_path.read_text()
                             .strip(), desc="the client's pid"))
        os.kill(pid, signal.SIGTERM)
        return self.proc.wait(10)

    def text(self):
        return self.proc.log_path.read_bytes().decode("utf-8", errors="replace")

    def wait_log(self, pattern, timeout=10.0):
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.text()), timeout=timeout,
                          desc=f"client output matching {pattern!r}")

    def last_rows(self):
        screen = {}
        for row, text in ROW.findall(self.proc.log_path.read_bytes()):
            screen[int(row)] = text.decode("utf-8", errors="replace")
        return screen

    def last_block(self):
        """The rows of the last full redraw: from the last rule ("── portmux-client") on."""
        rows = [t.decode("utf-8", errors="replace")
                for _, t in ROW.findall(self.proc.log_path.read_bytes())]
        starts = [i for i, t in enumerate(rows) if " portmux-client " in t]
        return rows[starts[-1]:] if starts else []

    def wait_row(self, pattern, timeout=10.0):
        rx = re.compile(pattern)
        return wait_until(lambda: next((t for t in self.last_rows().values() if rx.search(t)),
                                       None),
                          timeout=timeout, desc=f"a status row matching {pattern!r}")


def client_on_a_and_b(pg, server_factory, proc_factory, tmp_path):  # noqa: F811
    """Nodes a (127.0.0.2) and b (127.0.0.3), b registered first, and a client whose
    --server is a: it learns b from a's HelloResponse and holds a node session to b.
    Returns (a, b, a_addr, b_addr, client)."""
    a = node(server_factory, pg, "a", "127.0.0.2")
    b = node(server_factory, pg, "b", "127.0.0.3")
    a_addr, b_addr = f"127.0.0.2:{a.tunnel_port}", f"127.0.0.3:{b.tunnel_port}"
    # B is registered before the client says Hello to A: A's HelloResponse lists it.
    wait_until(lambda: len(a.api("GET", "/api/cluster")[2]["data"]["nodes"]) == 2,
               timeout=20, desc="a sees b")
    client = TtyClient(proc_factory, tmp_path, a_addr)
    wait_until(lambda: connected(a), timeout=15, desc="the client on a")
    client.wait_log(rf"node {re.escape(b_addr)} joined the cluster: connecting", timeout=15)
    wait_until(lambda: connected(b), timeout=15, desc="the client on b too")
    return a, b, a_addr, b_addr, client


def tunnel_mapping_on_both(a, b, echo_backend):
    """A tunnel mapping to the echo backend created on a; returns its port once b listens
    on it too."""
    port = free_port()
    a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port,
                use_tunnel=True, client="edge")
    wait_until(lambda: (b.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="b listens for the mapping")
    return port


def test_client_serves_through_every_node(pg, server_factory, echo_backend,  # noqa: F811
                                          proc_factory, tmp_path):
    a, b, a_addr, b_addr, client = client_on_a_and_b(pg, server_factory, proc_factory, tmp_path)
    # One session per node: A's own address gets no second one.
    assert f"node {a_addr} joined" not in client.text()
    client.wait_row(rf"^Node        {re.escape(b_addr)}  connected for \d+s", timeout=15)
    client.wait_row(rf"^Node        {re.escape(b_addr)}  connected for \d+s, RTT \d+\.\d\d ms$",
                    timeout=15)
    # The node row sits between the Session line and the forwarding rows.
    block = wait_until(lambda: (lambda b: b if any(t.startswith("Node ") for t in b) else None)(
        client.last_block()), timeout=5, desc="a block with the node row")
    assert block[1].startswith("Session     connected") and block[2].startswith("Node "), block

    port = tunnel_mapping_on_both(a, b, echo_backend)
    echo_ok(port, "127.0.0.2")
    # B's public port: B asks its own session to the client, which dials the backend.
    echo_ok(port, "127.0.0.3")
    status, _, body = b.api("GET", "/api/clients")
    edge = next(c for c in body["data"]["clients"] if c["name"] == "edge")
    assert edge["bytes_in"] > 0 and edge["bytes_out"] > 0, edge

    # B stops: its session ends, and once A no longer lists B the client drops it.
    b.stop()
    client.wait_log(rf"disconnected from node {re.escape(b_addr)}", timeout=15)
    client.wait_log(rf"node {re.escape(b_addr)} left the cluster: session closed", timeout=60)
    wait_until(lambda: (lambda rows: rows and not any(t.startswith("Node ") for t in rows))(
        client.last_block()), timeout=10, desc="a block drawn without the node row")
    assert client.proc.running(), client.text()[-2000:]
    assert connected(a)
    echo_ok(port, "127.0.0.2")
    # A clean stop with the node set emptied and refilled on the way (sanitizer builds
    # report leaks or bad accesses here).
    assert client.stop() == 0, client.text()[-2000:]
    assert "Sanitizer" not in client.text() and "runtime error" not in client.text()


def test_a_node_that_joins_later_is_connected(pg, server_factory, echo_backend,  # noqa: F811
                                               proc_factory, tmp_path):
    a = node(server_factory, pg, "a", "127.0.0.2")
    client = TtyClient(proc_factory, tmp_path, f"127.0.0.2:{a.tunnel_port}")
    wait_until(lambda: connected(a), timeout=15, desc="the client on a")
    # Alone: the HelloResponse lists A only, and nothing else is dialled.
    assert "joined the cluster" not in client.text()
    b = node(server_factory, pg, "b", "127.0.0.3")
    b_addr = f"127.0.0.3:{b.tunnel_port}"
    # A learns B from B's heartbeat and tells the client in a "nodes" Notice.
    client.wait_log(rf"node {re.escape(b_addr)} joined the cluster: connecting", timeout=30)
    wait_until(lambda: connected(b), timeout=15, desc="the client on b")
    port = free_port()
    b.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port,
                use_tunnel=True, client="edge")
    wait_until(lambda: (a.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="a listens for the mapping")
    echo_ok(port, "127.0.0.3")
    echo_ok(port, "127.0.0.2")
    # Stopped with a node session up: it is closed with the rest.
    assert client.stop() == 0, client.text()[-2000:]
    assert "Sanitizer" not in client.text() and "runtime error" not in client.text()


def test_server_behind_a_balancer_that_moves(pg, server_factory, echo_backend,  # noqa: F811
                                             proc_factory, tmp_path):
    """--server is a balancer (here a portmux direct mapping, retargeted by the test). The
    node the --server session reached (A) goes away and comes back while the balancer
    now sends everyone to B, where this client has a node session already: B refuses
    the --server session (already_connected), which stands by instead of retrying, and A
    gets a node session of its own, so A's public ports still reach the client. When
    no node session is left up, --server reconnects."""
    a = node(server_factory, pg, "a", "127.0.0.2")
    b = node(server_factory, pg, "b", "127.0.0.3")
    a_addr = f"127.0.0.2:{a.tunnel_port}"
    wait_until(lambda: len(a.api("GET", "/api/cluster")[2]["data"]["nodes"]) == 2,
               timeout=20, desc="a sees b")
    lb = server_factory(name="lb")
    lb_port = free_port()
    lb.create_ok(port=lb_port, target_ip="127.0.0.2", target_port=a.tunnel_port)
    client = TtyClient(proc_factory, tmp_path, f"127.0.0.1:{lb_port}")
    wait_until(lambda: connected(a), timeout=15, desc="the client on a, through the balancer")
    wait_until(lambda: connected(b), timeout=15, desc="the client's node session on b")
    port = free_port()
    a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port,
                use_tunnel=True, client="edge")
    wait_until(lambda: (b.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="b listens for the mapping")

    status, _, body = lb.api("POST", "/api/mapping/update",
                             body={"port": lb_port, "target_ip": "127.0.0.3",
                                   "target_port": b.tunnel_port})
    assert status == 200, body
    a.stop()
    client.wait_log(r"standing by while 1 node session is up", timeout=30)
    a.start(timeout=20)
    client.wait_log(rf"node {re.escape(a_addr)} joined the cluster: connecting", timeout=45)
    wait_until(lambda: connected(a), timeout=15, desc="a node session on a")
    wait_until(lambda: (a.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="a listens for the mapping again")
    echo_ok(port, "127.0.0.2")
    echo_ok(port, "127.0.0.3")
    # Standing by means no Hello every few seconds: b refused the --server session once.
    refusals = len(re.findall(r"standing by while", client.text()))
    assert refusals == 1, client.text()[-3000:]

    # Both node sessions end: the --server session comes back through the balancer (to b).
    a.stop()
    b.stop()
    client.wait_log(r"no node session is up: --server reconnects", timeout=30)
    b.start(timeout=20)
    wait_until(lambda: connected(b), timeout=30, desc="the client back on b through --server")
    echo_ok(port, "127.0.0.3")
    assert client.stop() == 0, client.text()[-2000:]
    assert "Sanitizer" not in client.text() and "runtime error" not in client.text()



def test_a_node_that_knows_only_itself_lists_no_nodes(pg, server_factory, echo_backend,  # noqa: F811
                                                      proc_factory, tmp_path):
    """A node that has just started and not yet read the nodes table knows only itself.
    It must not give a client that list of one: the client would take it for the whole
    cluster and close its working sessions to the other nodes (the once-seen flake of
    test_server_behind_a_balancer_that_moves: B's public port refused while B was up).
    The test holds the nodes table locked while A restarts, so A cannot read it, and lets
    the client's --server session come back to A then: its session to B stays, and B's
    public port keeps answering. Once A reads the table, its list names B."""
    a, b, a_addr, b_addr, client = client_on_a_and_b(pg, server_factory, proc_factory, tmp_path)
    port = tunnel_mapping_on_both(a, b, echo_backend)
    echo_ok(port, "127.0.0.3")

    a.stop()
    hellos = len(re.findall(rf"connected to {re.escape(a_addr)} as", client.text()))
    with TableLock(pg, "nodes"):
        a.start(timeout=20)
        wait_until(lambda: len(re.findall(rf"connected to {re.escape(a_addr)} as",
                                          client.text())) > hellos,
                   timeout=45, desc="the client's --server session back on a")
        wait_until(lambda: connected(a), timeout=15, desc="the client back on a")
        # A list in A's HelloResponse acts in the same loop turn; give it a moment anyway.
        time.sleep(1.0)
        assert f"node {b_addr} left the cluster" not in client.text(), client.text()[-3000:]
        assert connected(b)
        echo_ok(port, "127.0.0.3")
    # A reads the table now: its list names B, and nothing is dropped.
    wait_until(lambda: len(a.api("GET", "/api/cluster")[2]["data"]["nodes"]) == 2,
               timeout=20, desc="a sees b again")
    wait_until(lambda: (a.mapping(port) or {}).get("status") == "listening", timeout=10,
               desc="a listens for the mapping")
    echo_ok(port, "127.0.0.2")
    echo_ok(port, "127.0.0.3")
    assert f"node {b_addr} left the cluster" not in client.text(), client.text()[-3000:]
    assert client.stop() == 0, client.text()[-2000:]
    assert "Sanitizer" not in client.text() and "runtime error" not in client.text()


def test_hello_response_fits_one_frame_with_many_nodes_and_mappings(pg, server_factory,  # noqa: F811
                                                                    echo_backend):
    """Many live nodes with long advertise names and many tunnel mappings: the
    HelloResponse still fits one 4 KiB JSON frame (the node list has its share, the
    mappings the rest), so the client gets an answer; it used to get none and wait
    forever while the server counted it as connected."""
    import json
    import socket
    from sec_helpers import T_HELLO_RESPONSE, frame, read_frame
    a = node(server_factory, pg, "a", "127.0.0.2")
    long_name = "node-with-a-rather-long-dns-name-" + "x" * 24
    rows = ",".join(f"('fake-{i}', '{long_name}-{i}.example.internal:{20000 + i}', 1, "
                    f"extract(epoch from now())::bigint + 100000)" for i in range(150))
    pg.psql(f"INSERT INTO nodes (name, advertise, started_at, heartbeat_at) VALUES {rows}")
    for _ in range(80):
        a.create_ok(port=free_port(), target_port=echo_backend.port, use_tunnel=True,
                    client="edge")
    wait_until(lambda: len(a.api("GET", "/api/cluster")[2]["data"]["nodes"]) >= 151,
               timeout=20, desc="a reads the nodes table")
    with socket.create_connection(("127.0.0.2", a.tunnel_port), timeout=5) as t:
        t.sendall(frame(0x06, json.dumps({"name": "edge", "token": TOKEN, "version": "t",
                                          "notices": True}).encode()))
        fr = read_frame(t, timeout=5)
    assert fr is not None and fr[0] == T_HELLO_RESPONSE, "no HelloResponse"
    assert len(fr[1]) <= 4096, len(fr[1])
    hello = json.loads(fr[1])
    assert hello["ok"] is True, hello
    assert hello["nodes"][0] == a.config["cluster"]["advertise"], hello["nodes"][:2]
    assert 1 < len(hello["nodes"]) <= 33, len(hello["nodes"])
    assert len(hello["mappings"]) > 0, hello


def test_a_node_behind_on_a_rotation_never_writes_the_old_token_back(pg, server_factory):  # noqa: F811
    """Node a rotates a client's token (grace 0) while node b has not read the change
    yet, and a session with the old token starts on b meanwhile. b records that session
    (last_seen) and must write nothing else: the row keeps the new hash, so the new token
    works on both nodes and the old one on neither once b catches up. b used to write its
    whole copy back, old hash included, and undo the rotation for the cluster."""
    import json
    import socket
    from sec_helpers import hello, read_frame
    a = node(server_factory, pg, "a", "127.0.0.2")
    b = node(server_factory, pg, "b", "127.0.0.3")
    for srv in (a, b):
        srv.wait_log("listening for changes from other nodes", timeout=10)

    def hello_ok(srv, addr, token, keep=False):
        s = socket.create_connection((addr, srv.tunnel_port), timeout=10)
        s.sendall(hello("api-edge", token))
        fr = read_frame(s, 10)
        ok = fr is not None and json.loads(fr[1]).get("ok") is True
        if keep:
            return ok, s
        s.close()
        return ok

    def names(srv):
        return {c["name"] for c in srv.api("GET", "/api/clients")[2]["data"]["clients"]}

    status, _, body = a.api("POST", "/api/client/create", body={"name": "api-edge"})
    assert status == 201, body
    old = body["data"]["token"]
    wait_until(lambda: "api-edge" in names(b), timeout=10, desc="b knows api-edge")
    with TableLock(pg, "mappings"):  # b's read of the change waits behind the lock
        status, _, body = a.api("POST", "/api/client/rotate",
                                body={"name": "api-edge", "grace_s": 0})
        assert status == 200, body
        new = body["data"]["token"]
        rotated = pg.psql("SELECT token_hash FROM clients WHERE name='api-edge'")
        ok, s = hello_ok(b, "127.0.0.3", old, keep=True)
        assert ok, "b had not caught up: the old token was still good there"
        time.sleep(0.5)  # b's last_seen write goes out now
    s.close()
    wait_until(lambda: hello_ok(b, "127.0.0.3", new), timeout=10,
               desc="the new token works on b once it caught up")
    assert pg.psql("SELECT token_hash FROM clients WHERE name='api-edge'") == rotated
    assert hello_ok(a, "127.0.0.2", new)
    assert not hello_ok(a, "127.0.0.2", old)
    assert not hello_ok(b, "127.0.0.3", old)


def test_a_client_removed_and_created_again_elsewhere_loses_its_sessions(
        pg, server_factory):  # noqa: F811
    """Another node removes a client and creates one of the same name in one
    transaction (as a node whose change feed was down sees a remove and a create between
    two reads): the old client's session ends, as a remove ends it, and only the new
    token works. It used to be taken for a rotation, and the old session went on."""
    import hashlib
    import json
    import socket
    from sec_helpers import hello, read_frame
    a = node(server_factory, pg, "a", "127.0.0.2")
    a.wait_log("listening for changes from other nodes", timeout=10)
    status, _, body = a.api("POST", "/api/client/create", body={"name": "api-edge"})
    assert status == 201, body
    old = body["data"]["token"]
    s = socket.create_connection(("127.0.0.2", a.tunnel_port), timeout=10)
    try:
        s.sendall(hello("api-edge", old))
        fr = read_frame(s, 10)
        assert fr is not None and json.loads(fr[1]).get("ok") is True, fr
        new = "new-" + os.urandom(16).hex()
        digest = hashlib.sha256(new.encode()).hexdigest()
        pg.psql("BEGIN; DELETE FROM clients WHERE name = 'api-edge'; "
                "INSERT INTO clients (name, token_hash, created_at) "
                f"VALUES ('api-edge', '{digest}', 1); COMMIT")
        assert a.wait_log('tunnel client "api-edge" removed and created anew by another node')
        # The session ends: whatever frames come first, then the end of the stream.
        s.settimeout(10)
        deadline = time.monotonic() + 10
        ended = False
        while time.monotonic() < deadline:
            try:
                if not s.recv(65536):
                    ended = True
                    break
            except ConnectionResetError:
                ended = True
                break
        assert ended, "the old client's session outlived it"
        # Ended for that reason, not by the heartbeat this hand-spoken client never answers.
        assert a.wait_log('client "api-edge" disconnected: client removed')
    finally:
        s.close()

    def hello_ok(token):
        with socket.create_connection(("127.0.0.2", a.tunnel_port), timeout=10) as c:
            c.sendall(hello("api-edge", token))
            fr = read_frame(c, 10)
            return fr is not None and json.loads(fr[1]).get("ok") is True
    assert hello_ok(new)
    assert not hello_ok(old)


def test_rotate_and_remove_on_a_node_behind_a_re_creation_change_nothing(
        pg, server_factory):  # noqa: F811
    """Another node removed a client and created another of the same name; this node has
    not read that yet when it is asked to rotate or remove the client. Both answer 503
    ("created anew ... meanwhile") and write nothing: the rotate used to make the removed
    client's token the new client's previous one (accepted for the grace period) and
    replace the new client's token, and the remove to delete the new client. A rotate of
    a client simply removed elsewhere is 404 (it was 500)."""
    import hashlib
    import json
    import socket
    from sec_helpers import hello, read_frame
    a = node(server_factory, pg, "a", "127.0.0.2")
    a.wait_log("listening for changes from other nodes", timeout=10)

    def hello_ok(name, token):
        with socket.create_connection(("127.0.0.2", a.tunnel_port), timeout=10) as c:
            c.sendall(hello(name, token))
            fr = read_frame(c, 10)
            return fr is not None and json.loads(fr[1]).get("ok") is True

    tokens = {}
    for name in ("api-edge", "gone-edge"):
        status, _, body = a.api("POST", "/api/client/create", body={"name": name})
        assert status == 201, body
        tokens[name] = body["data"]["token"]
    new = "new-" + os.urandom(16).hex()
    digest = hashlib.sha256(new.encode()).hexdigest()
    with TableLock(pg, "mappings"):  # a's read of the changes waits behind the lock
        pg.psql("BEGIN; DELETE FROM clients WHERE name = 'api-edge'; "
                "INSERT INTO clients (name, token_hash, created_at) "
                f"VALUES ('api-edge', '{digest}', 1); "
                "DELETE FROM clients WHERE name = 'gone-edge'; COMMIT")
        for path, body in (("/api/client/rotate", {"name": "api-edge", "grace_s": 300}),
                           ("/api/client/remove", {"name": "api-edge"})):
            status, _, reply = a.api("POST", path, body=body)
            assert status == 503 and reply["error"] == "store_unavailable", (path, reply)
            assert "created anew by another node meanwhile" in reply["message"], reply
        assert pg.psql("SELECT token_hash, prev_hash FROM clients WHERE name = 'api-edge'") \
            == [[digest, ""]]
        status, _, reply = a.api("POST", "/api/client/rotate", body={"name": "gone-edge"})
        assert status == 404 and reply["error"] == "not_found", reply
    wait_until(lambda: hello_ok("api-edge", new), timeout=10,
               desc="the new client's token works on a")
    assert not hello_ok("api-edge", tokens["api-edge"])
