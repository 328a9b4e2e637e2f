"""SPEC §7 / issue 18: an API write never holds the event loop while PostgreSQL stalls.

Writes go to a connection of their own, driven by the node's libevent loop: the API
request waits (its HTTP connection suspended), the loop does not. So while a write waits
for a frozen database, an open relay keeps relaying and reads answer at once; the write
answers 503 store_unavailable at its deadline and is not stored after SIGCONT.

A row lock taken by a psql session holds one write in flight for as long as a test needs:
meanwhile an update or remove of that mapping answers 503 store_unavailable at once (SPEC
§3's code for a write the database cannot take now), a client that hangs up
does no harm, and a shutdown answers the waiting request 503."""
import hashlib
import socket
import subprocess
import threading
import time

from conftest import connect, free_port, recv_exact, wait_until
from pg_helpers import _as_pg, pg  # noqa: F401  (fixture)
from test_cluster_pg import pg_node

# The relay must never pause this long; a write held on the loop would pause it for its
# whole deadline (1.5 s).
MAX_GAP_S = 0.5


class PingPong(threading.Thread):
    """Round trips of 8 bytes through a relay, back to back; max_gap is the longest time
    between two answers (or from the start to the first)."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.stop_flag = threading.Event()
        self.max_gap = 0.0
        self.trips = 0
        self.error = None

    def run(self):
        last = time.monotonic()
        try:
            while not self.stop_flag.is_set():
                self.sock.sendall(b"pingpong")
                assert recv_exact(self.sock, 8) == b"pingpong"
                now = time.monotonic()
                self.max_gap = max(self.max_gap, now - last)
                last = now
                self.trips += 1
        except Exception as e:  # reported by finish()
            self.error = e

    def finish(self):
        self.stop_flag.set()
        self.join(10)
        assert not self.is_alive(), "the ping-pong did not end"
        assert self.error is None, repr(self.error)
        return self.max_gap


def timed_reply(node, path, body):
    """(status, headers, reply, seconds) of one POST."""
    t0 = time.monotonic()
    status, headers, reply = node.api("POST", path, body=body, timeout=10)
    return status, headers, reply, time.monotonic() - t0


def timed(node, method, path, body):
    t0 = time.monotonic()
    status, _, reply = node.api(method, path, body=body, timeout=10)
    return status, reply, time.monotonic() - t0


def test_frozen_database_writes_never_hold_the_loop(pg, server_factory,  # noqa: F811
                                                    echo_backend):
    node = pg_node(server_factory, pg, tunnel={"enabled": True})
    kept, doomed, lost = free_port(), free_port(), free_port()
    for port in (kept, doomed):
        node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    status, _, reply = node.api("POST", "/api/client/create", body={"name": "edge"})
    assert status == 201, reply
    edge_hash = pg.psql("SELECT token_hash FROM clients WHERE name = 'edge'")
    relay = connect(kept)
    pinger = PingPong(relay)
    pinger.start()
    wait_until(lambda: pinger.trips > 10, timeout=10, desc="the relay is relaying")
    # The last write before the freeze succeeds, so nothing knows the database is away:
    # the first write below meets the frozen socket and must wait out its deadline.
    status, _, reply = node.api("POST", "/api/mapping/update", body={"port": kept, "name": ""})
    assert status == 200, reply
    mark = node.log_mark()
    pg.freeze()
    try:
        writes = {
            "create": ("/api/mapping/create", {"port": lost, "target_ip": "127.0.0.1",
                                               "target_port": echo_backend.port}),
            "update": ("/api/mapping/update", {"port": kept, "name": "frozen"}),
            "remove": ("/api/mapping/remove", {"port": doomed}),
            "client create": ("/api/client/create", {"name": "edge2"}),
            "client rotate": ("/api/client/rotate", {"name": "edge"}),
        }
        results = {}

        def send(what, path, body):
            results[what] = timed(node, "POST", path, body)

        threads = [threading.Thread(target=send, args=(w, p, b), daemon=True)
                   for w, (p, b) in writes.items()]
        for t in threads:
            t.start()
        # While the writes wait, reads answer from memory, and quickly.
        reads = []
        while any(t.is_alive() for t in threads):
            t0 = time.monotonic()
            listed = {m["port"]: m for m in node.list()}
            reads.append(time.monotonic() - t0)
            assert listed[kept]["name"] == "" and doomed in listed and lost not in listed
        for t in threads:
            t.join(10)
        for what, (status, reply, took) in results.items():
            assert status == 503 and reply["error"] == "store_unavailable", (what, reply)
            assert took < 2.0, f"{what} answered after {took:.2f} s"
        assert len(results) == len(writes), results
        assert reads and max(reads) < MAX_GAP_S, reads
        # At least the first write found the database away by waiting for it.
        assert "no answer within" in node.log_text()[mark:], node.log_tail()
        gap = pinger.finish()
        assert gap < MAX_GAP_S, f"the relay paused {gap:.3f} s while writes waited"
    finally:
        pg.thaw()
        pinger.stop_flag.set()
    # Nothing answered 503 is stored, on the database or on the node.
    # (psql prints an empty name as nothing: '=' keeps the column visible.)
    assert pg.psql(f"SELECT port, '=' || name FROM mappings WHERE port IN "
                   f"({kept}, {doomed}, {lost}) ORDER BY port") == \
        sorted([[str(kept), "="], [str(doomed), "="]], key=lambda r: int(r[0]))
    assert pg.psql("SELECT name FROM clients WHERE name LIKE 'edge%'") == [["edge"]]
    assert pg.psql("SELECT token_hash FROM clients WHERE name = 'edge'") == edge_hash
    assert node.mapping(lost) is None and node.mapping(doomed) is not None
    # After SIGCONT the node writes again by itself.
    new = free_port()
    wait_until(lambda: node.create(port=new, target_ip="127.0.0.1",
                                   target_port=echo_backend.port)[0] == 201,
               timeout=45, interval=0.5, desc="create succeeds after the database is back")
    assert pg.psql(f"SELECT count(*) FROM mappings WHERE port = {new}") == [["1"]]
    relay.sendall(b"after")
    assert recv_exact(relay, 5) == b"after"
    relay.close()
    assert node.stop() == 0, node.log_tail()


class RowLock:
    """A psql session holding a row locked (FOR UPDATE) until release: the mapping on
    port, or the client named client."""

    def __init__(self, pg, port=None, client=None):  # noqa: F811
        self.pg = pg
        where = f"mappings WHERE port = {port}" if client is None else \
            f"clients WHERE name = '{client}'"
        self.tag = f"portmux-test-lock-{port}-{client}"
        sql = (f"BEGIN; SELECT 1 FROM {where} FOR UPDATE; "
               f"SELECT pg_sleep(120), '{self.tag}'")
        self.proc = subprocess.Popen(
            _as_pg([pg.bindir / "psql", "-X", "-q", "-h", pg.sockdir, "-p", pg.port, "-U",
                    "postgres", "-d", pg.dbname, "-c", sql]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._sleeping(), timeout=20, desc="the row lock is held")

    def _sleeping(self):
        return self.pg.psql("SELECT count(*) FROM pg_stat_activity WHERE "
                            f"query LIKE '%{self.tag}%' AND wait_event = 'PgSleep' "
                            "AND pid <> pg_backend_pid()") == [["1"]]

    def release(self):
        self.pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                     f"query LIKE '%{self.tag}%' AND pid <> pg_backend_pid()")
        self.proc.wait(30)


def write_waits_on_lock(pg, table="mappings"):  # noqa: F811
    """The node's write connection waits on a lock in a statement that changes table."""
    return pg.psql("SELECT count(*) FROM pg_stat_activity WHERE "
                   "application_name = 'portmux-store' AND wait_event_type = 'Lock' AND "
                   f"query ~ '(UPDATE|DELETE FROM) {table} '") == [["1"]]


def raw_update(node, port, name):
    """An update sent on a socket of our own, not read: the caller may hang up."""
    body = f'{{"port": {port}, "name": "{name}"}}'
    s = socket.create_connection(("127.0.0.1", node.api_port), timeout=10)
    s.sendall((f"POST /api/mapping/update HTTP/1.1\r\nHost: 127.0.0.1:{node.api_port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}")
              .encode())
    return s


def test_write_in_flight_busy_and_a_client_that_hangs_up(pg, server_factory,  # noqa: F811
                                                         echo_backend):
    node = pg_node(server_factory, pg)
    port = free_port()
    node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    lock = RowLock(pg, port)
    try:
        s = raw_update(node, port, "slow")
        wait_until(lambda: write_waits_on_lock(pg), timeout=10, interval=0.05,
                   desc="the update waits on the row lock")
        # A second change of the same mapping does not queue behind it: 503, at once.
        for path, body in (("/api/mapping/update", {"port": port, "name": "other"}),
                           ("/api/mapping/remove", {"port": port})):
            status, _, reply, took = timed_reply(node, path, body)
            assert status == 503 and reply["error"] == "store_unavailable", (path, reply)
            assert "being stored" in reply["message"], reply
            assert took < 1.0, f"{path} waited {took:.2f} s instead of answering at once"
        # The client gives up while its answer is pending.
        s.close()
    finally:
        lock.release()
    # The write ends (stored, or refused at its deadline); node and database agree.
    wait_until(lambda: not write_waits_on_lock(pg), timeout=10, desc="the update is over")
    wait_until(lambda: [["=" + (node.mapping(port) or {}).get("name", "?")]] ==
               pg.psql(f"SELECT '=' || name FROM mappings WHERE port = {port}"),
               timeout=10, desc="the node shows what the database holds")
    assert node.health()["status"] == "ok"
    status, _, reply = node.api("POST", "/api/mapping/update", body={"port": port, "name": "z"})
    assert status == 200 and reply["data"]["name"] == "z", reply
    assert node.stop() == 0, node.log_tail()


def test_client_write_in_flight_is_busy(pg, server_factory):  # noqa: F811
    node = pg_node(server_factory, pg, tunnel={"enabled": True})
    status, _, reply = node.api("POST", "/api/client/create", body={"name": "edge"})
    assert status == 201, reply
    lock = RowLock(pg, client="edge")
    try:
        result = {}

        def rotate():
            result["r"] = timed(node, "POST", "/api/client/rotate", {"name": "edge"})

        t = threading.Thread(target=rotate, daemon=True)
        t.start()
        wait_until(lambda: write_waits_on_lock(pg, "clients"), timeout=10, interval=0.05,
                   desc="the rotate waits on the row lock")
        for path in ("/api/client/rotate", "/api/client/remove"):
            status, _, reply, took = timed_reply(node, path, {"name": "edge"})
            assert status == 503 and reply["error"] == "store_unavailable", (path, reply)
            assert "being stored" in reply["message"], reply
            assert took < 1.0, f"{path} waited {took:.2f} s instead of answering at once"
    finally:
        lock.release()
    t.join(10)
    status, reply, _ = result["r"]
    assert status in (200, 503), reply
    # Whatever the answer, the node and the database agree on the token.
    stored = pg.psql("SELECT token_hash FROM clients WHERE name = 'edge'")[0][0]
    if status == 200:
        assert hashlib.sha256(reply["data"]["token"].encode()).hexdigest() == stored
    # No longer busy: once the node writes again (after its backoff) the remove goes through.
    wait_until(lambda: node.api("POST", "/api/client/remove", body={"name": "edge"})[0] == 200,
               timeout=45, interval=0.5, desc="the client can be removed")
    assert pg.psql("SELECT count(*) FROM clients WHERE name = 'edge'") == [["0"]]
    assert node.stop() == 0, node.log_tail()


def test_shutdown_answers_a_waiting_write(pg, server_factory, echo_backend):  # noqa: F811
    node = pg_node(server_factory, pg)
    port = free_port()
    node.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    lock = RowLock(pg, port)
    try:
        result = {}

        def send():
            result["r"] = timed(node, "POST", "/api/mapping/update",
                                {"port": port, "name": "late"})

        t = threading.Thread(target=send, daemon=True)
        t.start()
        wait_until(lambda: write_waits_on_lock(pg), timeout=10, interval=0.05,
                   desc="the update waits on the row lock")
        assert node.stop(timeout=5.0) == 0, node.log_tail()
        t.join(10)
        status, reply, _ = result["r"]
        assert status == 503 and reply["error"] == "store_unavailable", reply
    finally:
        lock.release()
    assert pg.psql(f"SELECT '=' || name FROM mappings WHERE port = {port}") == [["="]]
