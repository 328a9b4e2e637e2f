"""The database's host name is looked up without holding the event loop (SPEC §7).

database.url names PostgreSQL by a host name. The node's loop reconnects the write
connection and the cluster sync connection on its own; before, each reconnect called
libpq's PQconnectStart, whose getaddrinfo() blocked the whole process for as long as DNS
took: every relay, tunnel and API request stopped. Now the names go through evdns first
(src/server/pg_dial.c) and libpq gets the addresses.

The test runs the node in a mount namespace of its own (unshare -m) whose
/etc/resolv.conf points at a small DNS server the test runs on 127.x.y.z:53, which can
hold its answers. While it holds them and both connections are reconnecting, a relay keeps
relaying, /health answers, and a write answers 503 store_unavailable at its deadline; once
the answers come, both reconnect and a write is stored. Needs root (the namespace, port 53),
as the PostgreSQL tests already do."""
import os
import random
import shutil
import socket
import struct
import threading
import time

import pytest

from conftest import SERVER_BIN, connect, free_port, wait_until
from pg_helpers import PG_USER, pg  # noqa: F401  (fixture)
from test_cluster_pg import pg_node
from test_cluster_pg_async import MAX_GAP_S, PingPong

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare(1) for a private /etc/resolv.conf")


class FakeDns(threading.Thread):
    """A DNS server on addr:53 (UDP) that knows `names` (name -> IPv4 address): A queries get
    the address, AAAA an empty answer, anything else NXDOMAIN. While held, queries are kept
    unanswered until release()."""

    def __init__(self, addr, names):
        super().__init__(daemon=True)
        self.names = {n.lower(): ip for n, ip in names.items()}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((addr, 53))
        self.sock.settimeout(0.1)
        self.lock = threading.Lock()
        self.held = None          # None: answering; a list: queries waiting
        self.queries = []         # (qname, qtype) of every query seen
        self.stop_flag = threading.Event()

    def run(self):
        while not self.stop_flag.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            parsed = self._parse(data)
            if parsed is None:
                continue
            with self.lock:
                self.queries.append(parsed[1:3])
                if self.held is not None:
                    self.held.append((data, peer))
                    continue
            self._answer(data, peer)

    @staticmethod
    def _parse(data):
        if len(data) < 12:
            return None
        labels, i = [], 12
        while i < len(data) and data[i] != 0:
            n = data[i]
            labels.append(data[i + 1:i + 1 + n].decode("ascii", "replace"))
            i += 1 + n
        if i + 5 > len(data):
            return None
        qtype = struct.unpack("!H", data[i + 1:i + 3])[0]
        return i + 5, ".".join(labels).lower(), qtype

    def _answer(self, data, peer):
        end, name, qtype = self._parse(data)
        ip = self.names.get(name)
        answers = b""
        rcode = 0 if ip else 3
        if ip and qtype == 1:
            answers = (b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4)
                       + socket.inet_aton(ip))
        flags = 0x8180 | rcode
        head = data[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
        try:
            self.sock.sendto(head + data[12:end] + answers, peer)
        except OSError:
            pass

    def hold(self):
        with self.lock:
            self.held = []

    def release(self):
        with self.lock:
            waiting, self.held = self.held or [], None
        for data, peer in waiting:
            self._answer(data, peer)

    def seen(self, name):
        with self.lock:
            return sum(1 for n, _ in self.queries if n == name.lower())

    def stop(self):
        self.stop_flag.set()
        self.join(5)
        self.sock.close()


@pytest.fixture
def fake_dns(tmp_path):
    # An address of its own on the loopback net, so port 53 is free whatever else runs.
    for _ in range(20):
        addr = f"127.53.{random.randint(1, 254)}.{random.randint(2, 254)}"
        try:
            dns = FakeDns(addr, {})
            break
        except OSError:
            continue
    else:
        pytest.fail("no free 127.53.x.y:53 for the test's DNS server")
    dns.start()
    dns.resolv_conf = tmp_path / "resolv.conf"
    # Short timeouts: the old blocking lookup would stall the node ~2 s per try.
    dns.resolv_conf.write_text(f"nameserver {addr}\noptions timeout:2 attempts:2\n")
    yield dns
    dns.release()
    dns.stop()


def in_private_resolv_conf(node, resolv_conf):
    """The node's command run in a mount namespace where /etc/resolv.conf is ours."""
    node.proc.args = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                      'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv_conf),
                      str(SERVER_BIN), "--config", str(node.config_path)]


def node_by_name(server_factory, pg, fake_dns):  # noqa: F811
    """A started node whose database.url names PostgreSQL by a name only fake_dns knows,
    and the name."""
    name = f"pg-{random.randint(0, 10**9)}.portmux.test"
    fake_dns.names[name] = "127.0.0.1"
    node = pg_node(server_factory, pg, start=False)
    node.config["database"] = {"url": f"postgresql://{PG_USER}@{name}:{pg.port}/{pg.dbname}"}
    node.write_config()
    in_private_resolv_conf(node, fake_dns.resolv_conf)
    node.start(timeout=30)
    return node, name


def test_held_dns_answers_never_hold_the_loop(pg, server_factory, fake_dns,  # noqa: F811
                                              echo_backend):
    node, name = node_by_name(server_factory, pg, fake_dns)
    assert fake_dns.seen(name) > 0, "the node did not look the name up through the test's DNS"
    node.wait_log(r"listening for changes from other nodes", timeout=20)

    kept = free_port()
    node.create_ok(port=kept, target_ip="127.0.0.1", target_port=echo_backend.port)
    relay = connect(kept)
    pinger = PingPong(relay)
    pinger.start()
    wait_until(lambda: pinger.trips > 10, timeout=10, desc="the relay is relaying")

    # Both of the node's connections go; their reconnects meet a DNS that does not answer.
    fake_dns.hold()
    asked = fake_dns.seen(name)
    mark = node.log_mark()
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'portmux-%'")
    node.wait_log(r"dropping the write connection", timeout=10, after=mark)
    wait_until(lambda: fake_dns.seen(name) > asked, timeout=15,
               desc="the sync connection's reconnect asks DNS")
    pinger.max_gap = 0.0  # from here on: while a lookup is held

    # Past the write connection's 1 s backoff: this write reconnects, and waits for DNS.
    time.sleep(1.2)
    t0 = time.monotonic()
    status, _, reply = node.api("POST", "/api/mapping/create",
                                body={"port": free_port(), "target_ip": "127.0.0.1",
                                      "target_port": echo_backend.port}, timeout=10)
    took = time.monotonic() - t0
    assert status == 503 and reply["error"] == "store_unavailable", reply
    assert took < 5, f"the write answered after {took:.1f} s"
    for _ in range(5):
        t0 = time.monotonic()
        assert node.api("GET", "/health", timeout=5)[0] == 200
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.3)
    gap = pinger.max_gap
    assert gap < MAX_GAP_S, f"the relay paused {gap:.2f} s while DNS held its answers"
    assert node.running(), node.log_tail()

    # DNS answers again: both connections come back, and a write is stored.
    fake_dns.release()
    node.wait_log(r"listening for changes from other nodes", timeout=30, after=mark)
    stored = free_port()

    def write_ok():
        status, _, _ = node.api("POST", "/api/mapping/create",
                                body={"port": stored, "target_ip": "127.0.0.1",
                                      "target_port": echo_backend.port}, timeout=10)
        return status == 201

    wait_until(write_ok, timeout=40, interval=0.5, desc="a write after DNS answered")
    assert pg.psql(f"SELECT port FROM mappings WHERE port = {stored}") == [[str(stored)]]
    assert pinger.finish() < MAX_GAP_S
    relay.close()


def test_a_name_that_does_not_resolve_is_named_in_the_log(pg, server_factory,  # noqa: F811
                                                          fake_dns):
    """A reconnect to a name DNS does not know fails with the name in the log line (and
    tries again later), the node still serving."""
    node, name = node_by_name(server_factory, pg, fake_dns)
    node.wait_log(r"listening for changes from other nodes", timeout=20)
    mark = node.log_mark()
    del fake_dns.names[name]  # NXDOMAIN from now on
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'portmux-sync'")
    node.wait_log(r"connecting to the database: cannot resolve database host "
                  + name.replace(".", r"\."), timeout=20, after=mark)
    assert node.api("GET", "/health", timeout=5)[0] == 200
    fake_dns.names[name] = "127.0.0.1"
    node.wait_log(r"listening for changes from other nodes", timeout=40, after=mark)
