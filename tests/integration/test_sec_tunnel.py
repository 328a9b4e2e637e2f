"""Issue 14, the tunnel half: abuse limits before Hello (tunnel.max_pending, the 4 KiB
Hello header), session buffering (tunnel.session_buffer_limit), the client's pending-dial
cap and --allow warning, and peer strings in log lines. Each test reproduces the attack
from the issue on the real binaries over 127.0.0.1 and shows it now fails."""
import json
import os
import re
import select
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import CLIENT_BIN, connect, free_port, limit_descriptors, wait_until
from sec_helpers import T_HELLO_RESPONSE, env_int, frame, hello, read_frame
from tunnel_helpers import client_count, map_tunnel, start_client, tunnel_server

TOKEN = "tok-default-0123456789"
CLIENTS = [{"name": "default", "token": TOKEN}]

T_CONNECT_REQUEST = 0x01
T_CONNECT_RESPONSE = 0x02
T_DATA = 0x03
T_CLOSE = 0x04
T_HELLO = 0x06
T_HELLO_RESPONSE = 0x07
T_WINDOW_UPDATE = 0x08


def closed_by_peer(sock, timeout=5.0):
    """True when the peer closes (EOF or reset) within timeout; bytes it sends first
    (a HelloResponse) are skipped."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


# ---------------------------------------------------------------------------
# The client: pending dials are capped, and it warns without --allow


class FakeServer:
    """A tunnel server written by hand: answers the client's Hello with ok, then lets the
    test send frames and collects the ConnectResponses."""

    def __init__(self):
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.sock = None

    def accept_hello(self, timeout=10.0):
        self.lsock.settimeout(timeout)
        self.sock, _ = self.lsock.accept()
        f = read_frame(self.sock, timeout)
        assert f is not None and f[0] == T_HELLO, f
        body = json.dumps({"ok": True, "message": "welcome"}).encode()
        self.sock.sendall(frame(T_HELLO_RESPONSE, body))

    def responses(self, want, timeout):
        """ConnectResponse statuses by conn_id, until want arrived or timeout passed."""
        got = {}
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            f = read_frame(self.sock, max(0.05, deadline - time.monotonic()))
            if f is None:
                break
            if f[0] == T_CONNECT_RESPONSE:
                conn_id, status = struct.unpack(">IB", f[1][:5])
                got[conn_id] = status
        return got

    def close(self):
        if self.sock:
            self.sock.close()
        self.lsock.close()


def _blackhole():
    """A listener whose accept queue is full, so it drops further SYNs and connects to it
    hang: returns (listener, port, the connections that fill the queue)."""
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    bh_port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", bh_port))
        fillers.append(s)
    return blackhole, bh_port, fillers


def test_client_caps_pending_dials(proc_factory):
    """A server floods ConnectRequests at a target that never answers the SYN: the client
    dials at most --max-pending-dials (default 1024; 64 here) at once and answers the rest
    with status 1 (refused) at once, rather than holding a descriptor and a timer for each
    until connect_timeout."""
    blackhole, bh_port, fillers = _blackhole()
    fake = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                               TOKEN, "--no-reconnect", "--connect-timeout", "60",
                               "--max-pending-dials", "64",
                               "--allow", f"127.0.0.1:{bh_port}"], "client")
        fake.accept_hello()
        n, cap = 200, 64
        host = b"127.0.0.1"
        burst = b"".join(frame(T_CONNECT_REQUEST, struct.pack(">IHB", i + 1, bh_port, len(host))
                               + host) for i in range(n))
        fake.sock.sendall(burst)
        # Before the cap every one of them waited for connect_timeout (60 s): none came
        # back within the 10 s we wait here.
        got = fake.responses(n - cap, timeout=10)
        refused = [cid for cid, status in got.items() if status == 1]
        assert len(refused) >= n - cap, (len(got), sorted(got.items())[:10])
        # The first ones are dialled; the refusals are the later ones.
        assert min(refused) > cap - len(fillers) - 2, min(refused)
        assert client.running(), client.log_tail()
        log = client.log_text()
        assert "dials already pending" in log
        # One line per second at most, not one per refusal.
        assert log.count("dials already pending") <= 12, log.count("dials already pending")
    finally:
        fake.close()
        for s in fillers:
            s.close()
        blackhole.close()


def test_client_warns_without_allow(proc_factory):
    fake = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                               TOKEN, "--no-reconnect"], "client")
        fake.accept_hello()
        client.wait_log(r"WARN client no --allow given", timeout=10)
        allowed = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                                TOKEN, "--no-reconnect", "--allow", "127.0.0.1:22"],
                               "client-allow")
        fake.sock.close()
        fake.accept_hello()
        allowed.wait_log(r"connected to", timeout=10)
        assert "no --allow given" not in allowed.log_text()
    finally:
        fake.close()


# ---------------------------------------------------------------------------
# Before Hello: the 4 KiB limit on the header, tunnel.max_pending


def test_partial_hellos_refused_at_header(server_factory):
    """400 connections each announce a 64 KiB Hello and send 4 KiB of it: each is a
    protocol error from its header alone (closed at once), and server RSS does not grow
    by what they would have held (the issue saw 24 MiB)."""
    srv = tunnel_server(server_factory, clients=CLIENTS, hello_timeout=60, max_pending=1000)
    base_rss = srv.rss_kb()
    socks = []
    try:
        for i in range(400):
            s = connect(srv.tunnel_port)
            s.sendall(frame(T_HELLO, b"{" + b" " * 4095, length=65536))
            socks.append(s)
        for s in socks:
            assert closed_by_peer(s, timeout=5), "a partial Hello was not refused"
        grown = srv.rss_kb() - base_rss
        if not srv.sanitized():
            assert grown < 8 * 1024, f"server RSS grew {grown} KiB"
        assert "before Hello" in srv.log_text()
        srv.health()
    finally:
        for s in socks:
            s.close()


def _connect_from(src, port):
    """A connection to the tunnel port from source address src (another 127.x host)."""
    return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(src, 0))


def _closed_at_accept(socks, why):
    for s in socks:
        assert closed_by_peer(s, timeout=5), why
        s.close()


def _still_waiting(socks):
    """Each of socks is still open, waiting for its Hello."""
    for s in socks:
        s.settimeout(0.1)
        with pytest.raises(socket.timeout):
            s.recv(1)


def test_max_pending(server_factory, tmp_path, logs):
    """More than tunnel.max_pending connections waiting for their Hello: the extra ones
    are closed at accept; a real client still logs in once the idle ones go."""
    srv = tunnel_server(server_factory, clients=CLIENTS, max_pending=8, hello_timeout=60)
    idle = []
    try:
        # One per source: an eighth of max_pending (here 1) is all one address may hold.
        for i in range(8):
            idle.append(_connect_from(f"127.0.8.{i + 1}", srv.tunnel_port))
        # The listener accepts in arrival order: these eight come first.
        extra = [_connect_from(f"127.0.9.{i + 1}", srv.tunnel_port) for i in range(5)]
        for s in extra:
            assert closed_by_peer(s, timeout=5), "a connection beyond max_pending stayed"
        for s in idle:
            s.settimeout(0.2)
            with pytest.raises(socket.timeout):
                s.recv(1)
        srv.wait_log(r"max_pending", timeout=5)
        for s in idle + extra:
            s.close()
        idle = []
        start_client(tmp_path, logs, srv, TOKEN)
        assert client_count(srv, "default") == 1
    finally:
        for s in idle:
            s.close()


def test_max_pending_default_is_128(server_factory):
    srv = tunnel_server(server_factory, clients=CLIENTS, hello_timeout=60)
    idle = [_connect_from(f"127.0.10.{1 + i // 16}", srv.tunnel_port) for i in range(128)]
    try:
        extra = [_connect_from("127.0.11.1", srv.tunnel_port) for _ in range(4)]
        _closed_at_accept(extra, "a connection beyond 128 pending stayed")
        _still_waiting(idle[:8] + idle[-8:])
    finally:
        for s in idle:
            s.close()


def test_one_source_cannot_hold_every_pending_place(server_factory, tmp_path, logs):
    """One address that keeps idle connections open without a Hello gets at most an
    eighth of tunnel.max_pending (16 of 128); a client from elsewhere still logs in."""
    srv = tunnel_server(server_factory, clients=CLIENTS, hello_timeout=60)
    idle = [_connect_from("127.0.12.1", srv.tunnel_port) for _ in range(16)]
    try:
        extra = [_connect_from("127.0.12.1", srv.tunnel_port) for _ in range(40)]
        _closed_at_accept(extra, "a 17th idle connection of one source stayed")
        _still_waiting(idle[:4] + idle[-4:])
        srv.wait_log(r"16 of them from its address \(at most 16\)", timeout=5)
        # Another source is not refused: a real client (from 127.0.0.1) logs in.
        start_client(tmp_path, logs, srv, TOKEN)
        assert client_count(srv, "default") == 1
        # The place of one that goes is free again for its source.
        idle.pop().close()
        again = wait_until(lambda: _stays_open(srv.tunnel_port, "127.0.12.1"), timeout=5,
                           desc="a place for 127.0.12.1 again")
        again.close()
    finally:
        for s in idle:
            s.close()


def _stays_open(port, src):
    s = _connect_from(src, port)
    s.settimeout(0.3)
    try:
        if s.recv(1) == b"":
            s.close()
            return None
    except socket.timeout:
        return s
    except OSError:
        s.close()
        return None
    return s


# ---------------------------------------------------------------------------
# Peer strings in log lines


def test_hello_name_with_newline_not_logged_raw(server_factory):
    srv = tunnel_server(server_factory, clients=CLIENTS)
    s = connect(srv.tunnel_port)
    try:
        forged = "x\n2026-01-01T00:00:00Z INFO tunnel client \"default\" connected"
        s.sendall(hello(forged, "wrong-token-wrong-token"))
        assert closed_by_peer(s, timeout=5)
    finally:
        s.close()
    # The name is refused as malformed (SPEC §4 names) or the token as wrong: either way
    # the line is written, and nothing of the name may start a line of its own.
    wait_until(lambda: "refused" in srv.log_text() or "malformed Hello" in srv.log_text(),
               timeout=5, desc="the refusal line")
    for line in srv.log_text().splitlines():
        assert not line.startswith("2026-01-01T00:00:00Z"), line


# ---------------------------------------------------------------------------
# Session buffering: tunnel.session_buffer_limit and the growth rule


class PushBackend:
    """Accepts on 127.0.0.1 and writes to every connection as fast as it takes bytes,
    from one selector thread; counts what the kernel accepted."""

    CHUNK = b"\x5a" * 65536

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.sent = 0
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import selectors
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        try:
                            c, _ = self.sock.accept()
                        except OSError:
                            continue
                        c.setblocking(False)
                        self.accepted += 1
                        sel.register(c, selectors.EVENT_WRITE, "conn")
                        continue
                    try:
                        self.sent += key.fileobj.send(self.CHUNK)
                    except BlockingIOError:
                        pass
                    except OSError:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
        finally:
            for key in list(sel.get_map().values()):
                key.fileobj.close()
            sel.close()

    def stop(self):
        self._stop.set()
        self._thread.join(5)


def settled(read, quiet=1.0, timeout=60.0):
    """Waits until read() stops changing for `quiet` seconds (sampled, bounded)."""
    last = [read(), time.monotonic()]

    def still():
        v = read()
        now = time.monotonic()
        if v != last[0]:
            last[0], last[1] = v, now
            return False
        return now - last[1] >= quiet
    wait_until(still, timeout=timeout, interval=0.1, desc="the flow to settle")
    return last[0]


def test_session_buffer_bounded(server_factory, tmp_path, logs):
    """N public connections through one tunnel with a tiny receive buffer that never read,
    while the backend sends as fast as it can: server RSS grows by at most the initial
    windows (256 KiB each) plus tunnel.session_buffer_limit, plus slack (see below). The
    issue measured ~1 MiB per connection (60 of them: 38 -> 103 MiB)."""
    n = env_int("PORTMUX_SEC_STREAMS", 200)       # the figure: 1000
    limit = env_int("PORTMUX_SEC_BUFFER_LIMIT", 16 << 20)
    srv = tunnel_server(server_factory, clients=CLIENTS, session_buffer_limit=limit)
    start_client(tmp_path, logs, srv, TOKEN)
    backend = PushBackend()
    socks = []
    try:
        port = map_tunnel(srv, backend.port)
        base_rss = srv.rss_kb()
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        wait_until(lambda: backend.accepted == n, timeout=30, desc="every stream dialled")
        # Settled: the backend can push no more and the server's heap stopped growing.
        sent, _ = settled(lambda: (backend.sent, srv.rss_kb() >> 10), quiet=2.0)
        grown = srv.rss_kb() - base_rss
        print(f"backend sent {sent >> 20} MiB for {n} stalled readers; server RSS +{grown} KiB")
        # Slack: 16 KiB per connection for its bufferevent, bridge, stream, socket buffers
        # and evbuffer chain headers (measured: ~7 KiB), plus 8 MiB for the allocator's
        # kept free heap (heap_tune.c) and the tunnel's own input and output buffers.
        bound = n * 256 + (limit >> 10) + n * 16 + 8 * 1024
        if not srv.sanitized():
            assert grown <= bound, f"server RSS grew {grown} KiB, bound {bound} KiB"
        srv.health()
    finally:
        for s in socks:
            s.close()
        backend.stop()


def test_connect_request_host_with_newline_not_logged_raw(proc_factory):
    """The client logs the host a ConnectRequest names when --allow refuses it; a host
    with a newline must not start a forged line of its own."""
    fake = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                               TOKEN, "--no-reconnect", "--allow", "127.0.0.1:22"], "client")
        fake.accept_hello()
        host = b"evil\n2026-01-01T00:00:00Z INFO client forged\x1b[2J"
        fake.sock.sendall(frame(T_CONNECT_REQUEST, struct.pack(">IHB", 7, 22, len(host)) + host))
        assert fake.responses(1, timeout=10) == {7: 2}
        client.wait_log(r"refused: not an IP address or host name", timeout=10)
        log = client.log_text()
        assert "evil\\x0a2026-01-01T00:00:00Z INFO client forged\\x1b[2J" in log, log
        for line in log.splitlines():
            assert not line.startswith("2026-01-01T00:00:00Z"), line
        assert "\x1b" not in log
    finally:
        fake.close()


def window_peak(proc_factory, stream_backend_factory, extra, total=16 << 20, timeout=60.0):
    """The largest send window a real client grants one stream while a hand-written server
    pushes `total` bytes into it as fast as the window allows (the target reads and
    discards): the initial 256 KiB, plus what auto-tuning added within
    --session-buffer-limit."""
    sink = stream_backend_factory()
    fake = FakeServer()
    try:
        proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token", TOKEN,
                      "--no-reconnect", "--allow", f"127.0.0.1:{sink.port}", *extra], "client")
        fake.accept_hello()
        host = b"127.0.0.1"
        fake.sock.sendall(frame(T_CONNECT_REQUEST,
                                struct.pack(">IHB", 1, sink.port, len(host)) + host))
        assert fake.responses(1, timeout=10) == {1: 0}
        window = peak = 256 * 1024
        sent = 0
        chunk = b"\x00" * 65536
        deadline = time.monotonic() + timeout
        while sent < total:
            while window > 0 and sent < total:
                n = min(len(chunk), window, total - sent)
                fake.sock.sendall(frame(T_DATA, struct.pack(">I", 1) + chunk[:n]))
                window -= n
                sent += n
            left = deadline - time.monotonic()
            assert left > 0, f"only {sent} of {total} bytes sent in {timeout} s"
            f = read_frame(fake.sock, timeout=left)
            assert f is not None, "the client closed the tunnel"
            if f[0] == T_WINDOW_UPDATE:
                conn_id, increment = struct.unpack(">II", f[1][:8])
                assert conn_id == 1, conn_id
                window += increment
                peak = max(peak, window)
        wait_until(lambda: sink.progress == total, timeout=timeout, desc="the target to get all")
        return peak
    finally:
        fake.close()


def test_client_session_buffer_limit(proc_factory, stream_backend_factory):
    """--session-buffer-limit bounds the window growth of the client's session as
    tunnel.session_buffer_limit does the server's: with 0 a stream keeps its 256 KiB,
    with 256 KiB it may reach 512 KiB, and by default (64 MiB) it grows past both while
    its target drains. A long fat path needs it raised (one stream moves about the limit
    per round trip)."""
    grown = window_peak(proc_factory, stream_backend_factory, [], total=64 << 20)
    none = window_peak(proc_factory, stream_backend_factory, ["--session-buffer-limit", "0"])
    small = window_peak(proc_factory, stream_backend_factory,
                        ["--session-buffer-limit", str(256 * 1024)])
    print(f"window peaks: default {grown}, 0 -> {none}, 256 KiB -> {small}")
    assert none == 256 * 1024, none
    assert 256 * 1024 < small <= 512 * 1024, small
    assert grown > 512 * 1024, grown


def test_client_session_buffer_limit_rejects_bad_values():
    for bad in ("-1", "x", "2147483648", ""):
        r = subprocess.run([str(CLIENT_BIN), "--server", "127.0.0.1:1", "--token", TOKEN,
                            "--session-buffer-limit", bad], capture_output=True, timeout=10)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert b"--session-buffer-limit: expected bytes" in r.stderr, r.stderr


# ---------------------------------------------------------------------------
# What the server (or anyone answering in its place) can make the client do


def _fake_server_with_nodes(listener, nodes, done):
    """Answers one client's Hello with a HelloResponse that lists nodes, then holds the
    session until done is set."""
    c, _ = listener.accept()
    with c:
        assert read_frame(c) is not None
        c.sendall(frame(T_HELLO_RESPONSE, json.dumps(
            {"ok": True, "message": "hello", "mappings": [], "nodes": nodes}).encode()))
        done.wait(20)


@pytest.mark.parametrize("flags,reached", [
    (["--allow", "127.0.0.1:22"], False),
    (["--allow", "127.0.0.1:22", "--allow-nodes", "127.0.0.1:1-65535"], True),
    ([], True),
])
def test_node_list_bounded_by_allow(proc_factory, flags, reached):
    """A node list is the server's word: with --allow (and no --allow-nodes) a listed node
    outside it is not connected (no Hello, no token sent there); --allow-nodes admits
    cluster nodes; without either, the client follows the list as SPEC §7 says."""
    fake = socket.create_server(("127.0.0.1", 0))
    victim = socket.create_server(("127.0.0.1", 0))
    fake.settimeout(10)
    done = threading.Event()
    port = fake.getsockname()[1]
    nodes = [f"127.0.0.1:{port}", f"127.0.0.1:{victim.getsockname()[1]}"]
    server = threading.Thread(target=_fake_server_with_nodes, args=(fake, nodes, done),
                              daemon=True)
    server.start()
    cli = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{port}", "--token", "tok-x",
                        "--log-level", "debug", *flags], name="client")
    try:
        victim.settimeout(3 if reached else 2)
        try:
            c, _ = victim.accept()
        except socket.timeout:
            c = None
        if reached:
            assert c is not None, "the listed node was not connected"
            with c:
                fr = read_frame(c)
            assert fr is not None and fr[0] == 0x06, fr  # its Hello
        else:
            assert c is None, "a node outside --allow was connected"
            cli.wait_log(r"node 127\.0\.0\.1:\d+ not connected: not in --allow", timeout=5)
    finally:
        done.set()
        cli.kill()
        server.join(10)
        fake.close()
        victim.close()


def test_client_log_lines_per_public_connection_are_bounded(server_factory, tmp_path, logs):
    """Each public connection through a tunnel mapping whose target the client refuses
    (not in --allow) or cannot reach makes a line in the client's log; hundreds of them in
    a burst make one line of each kind, with the count held back in the next one."""
    srv = tunnel_server(server_factory, clients=CLIENTS)
    dead = free_port()  # nothing listens there
    cli = start_client(tmp_path, logs, srv, TOKEN, "--allow", f"127.0.0.1:{dead}")
    refused = map_tunnel(srv, 9)         # 127.0.0.1:9: not in --allow
    failing = map_tunnel(srv, dead)      # allowed, but connection refused
    for port in (refused, failing):
        for _ in range(150):
            with connect(port) as s:
                s.settimeout(5)
                try:
                    s.recv(1)
                except OSError:
                    pass
    wait_until(lambda: srv.mapping(failing)["failed_connections"] >= 150, timeout=10,
               desc="every dial to fail")
    text = cli.log_text()
    assert 1 <= text.count("not in --allow") <= 2, text[-3000:]
    assert 1 <= len(re.findall(r"Connection refused", text)) <= 2, text[-3000:]
    # A tunnel that never leaves this machine is not warned about as plaintext.
    assert "no TLS" not in text, text[:2000]


def test_a_bracketed_literal_is_dialled_as_the_literal_it_was_allowed_as(proc_factory,
                                                                         echo_backend):
    """--allow reads "[127.0.0.1]" as the literal 127.0.0.1; the dial used to hand the
    bracketed text to the resolver instead (a name whose answer anyone controlling DNS
    picks, past --allow). Now it dials the literal; a host that is neither an address nor
    a name is refused without a lookup. (No DNS query is made here: both hosts are
    refused or dialled without the resolver.)"""
    fake = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                               TOKEN, "--no-reconnect", "--allow",
                               f"127.0.0.1:{echo_backend.port}"], "client")
        fake.accept_hello()
        for conn_id, host in ((7, b"[127.0.0.1]"), (9, b"bad host!")):
            fake.sock.sendall(frame(T_CONNECT_REQUEST, struct.pack(
                ">IHB", conn_id, echo_backend.port, len(host)) + host))
        assert fake.responses(2, timeout=10) == {7: 0, 9: 2}
        client.wait_log(r"bad host!:\d+ refused: not an IP address or host name", timeout=5)
    finally:
        fake.close()


T_NOTICE = 0x0A


def test_node_list_lines_are_bounded(proc_factory):
    """A server sending node lists full of malformed entries, or nodes that come and go,
    as fast as it likes: the client's log grows by a few lines, not one per entry."""
    fake = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                               TOKEN, "--no-reconnect", "--allow",
                               "127.0.0.1:22", "--allow-nodes", "127.0.0.9:9"], "client")
        fake.sock = None
        fake.lsock.settimeout(10)
        fake.sock, _ = fake.lsock.accept()
        f = read_frame(fake.sock, 10)
        assert f is not None and f[0] == T_HELLO and json.loads(f[1]).get("notices"), f
        fake.sock.sendall(frame(T_HELLO_RESPONSE, json.dumps(
            {"ok": True, "message": "hi", "mappings": []}).encode()))
        bad = ["not an address"] * 40 + ["\u0001x:1"] * 40
        for i in range(200):
            nodes = bad + (["127.0.0.9:9"] if i % 2 else [])
            fake.sock.sendall(frame(T_NOTICE, json.dumps(
                {"event": "nodes", "nodes": nodes}).encode()))
        time.sleep(1.0)
        assert client.running(), client.log_tail()
        lines = client.log_text().splitlines()
        skipped = [ln for ln in lines if "node list: skipping" in ln]
        churn = [ln for ln in lines if "joined the cluster" in ln or "left the cluster" in ln]
        assert 1 <= len(skipped) <= 2, skipped[:5]
        assert len(churn) <= 4 * 32, len(churn)
    finally:
        fake.close()


def test_eight_sources_cannot_keep_every_client_out(server_factory, tmp_path, logs):
    """Eight addresses each holding their share (16) of idle connections fill
    tunnel.max_pending (128); renewed every hello_timeout they kept every client out. Now
    a connection that finds the table full takes the place of the one that has waited
    longest, once that one has waited a tenth of hello_timeout (here 1 s). The client must
    be in well before the idle ones' hello_timeout (10 s) would have freed their places."""
    srv = tunnel_server(server_factory, clients=CLIENTS, hello_timeout=10)
    idle = [_connect_from(f"127.0.13.{1 + i // 16}", srv.tunnel_port) for i in range(128)]
    try:
        time.sleep(1.2)
        start_client(tmp_path, logs, srv, TOKEN, timeout=5)
        assert client_count(srv, "default") == 1
        # The oldest idle connection gave its place; the newest ones still wait.
        assert closed_by_peer(idle[0], timeout=5)
        _still_waiting(idle[-8:])
    finally:
        for s in idle:
            s.close()


def test_idle_tunnel_connections_leave_the_api_its_descriptors(server_factory):
    """With 400 descriptors, idle connections to the tunnel port from many sources (each
    within its share of max_pending, which is large here) stop short of the last 64, as
    public mapping connections do: /health keeps answering."""
    srv = tunnel_server(server_factory, clients=CLIENTS, max_pending=2000, hello_timeout=60)
    limit_descriptors(srv, 400)
    idle = []
    try:
        for i in range(420):
            try:
                idle.append(_connect_from(f"127.0.14.{1 + i // 200}", srv.tunnel_port))
            except OSError:
                break
        time.sleep(0.5)
        for _ in range(5):
            t0 = time.monotonic()
            srv.health()
            assert time.monotonic() - t0 < 1.0
        open_fds = len(os.listdir(f"/proc/{srv.pid}/fd"))
        assert open_fds <= 400 - 32, open_fds
        text = srv.api("GET", "/metrics")[2]
        m = re.search(r'portmux_limit_refused_total\{limit="descriptor_reserve"\} (\d+)', text)
        assert m and int(m.group(1)) > 0, m and m.group(0)
    finally:
        for s in idle:
            s.close()


def _accept_with_a_node(primary, node):
    """The client's Hello on primary is answered with a node list naming node too, and
    the client's session to node is accepted."""
    primary.lsock.settimeout(10)
    primary.sock, _ = primary.lsock.accept()
    assert read_frame(primary.sock, 10)[0] == T_HELLO
    primary.sock.sendall(frame(T_HELLO_RESPONSE, json.dumps(
        {"ok": True, "message": "hi", "mappings": [],
         "nodes": [f"127.0.0.1:{primary.port}", f"127.0.0.1:{node.port}"]}).encode()))
    node.accept_hello()


def _requests(first, n, port, host=b"127.0.0.1"):
    """ConnectRequests for conn_ids first .. first + n - 1, to host:port."""
    return b"".join(frame(T_CONNECT_REQUEST, struct.pack(">IHB", first + i, port, len(host))
                          + host) for i in range(n))


def test_pending_dials_are_capped_across_node_sessions(proc_factory):
    """--max-pending-dials bounds the dials of the --server session and every cluster node
    session together: each pending dial may hold a window of early data, and a server that
    lists itself as 32 nodes multiplied the bound by 33."""
    blackhole, bh_port, fillers = _blackhole()
    primary, node = FakeServer(), FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{primary.port}", "--token",
                               TOKEN, "--no-reconnect", "--connect-timeout", "60",
                               "--max-pending-dials", "10", "--allow", f"127.0.0.1:{bh_port}",
                               "--allow-nodes", "127.0.0.1:1-65535"], "client")
        _accept_with_a_node(primary, node)
        primary.sock.sendall(_requests(1, 10, bh_port))
        time.sleep(0.5)
        node.sock.sendall(_requests(1, 5, bh_port))
        got = node.responses(5, timeout=10)
        assert got == {i: 1 for i in range(1, 6)}, got
        assert primary.responses(1, timeout=0.5) == {}, "the primary's dials still wait"
        assert client.running(), client.log_tail()
    finally:
        primary.close()
        node.close()
        for s in fillers:
            s.close()
        blackhole.close()


def test_streams_are_capped_across_node_sessions(proc_factory):
    """--max-streams bounds the streams open at once, dialled or bridged, in the --server
    session and every node session together: the server decides how many it opens, and
    each holds a descriptor and up to a window of bytes on the client's machine. Beyond it
    a ConnectRequest gets status 1; a closed stream gives its place back."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(64)  # never accepted: each dial completes in the backlog and stays open
    tport = target.getsockname()[1]
    primary, node = FakeServer(), FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{primary.port}", "--token",
                               TOKEN, "--no-reconnect", "--max-streams", "4",
                               "--allow", f"127.0.0.1:{tport}",
                               "--allow-nodes", "127.0.0.1:1-65535"], "client")
        _accept_with_a_node(primary, node)
        primary.sock.sendall(_requests(1, 3, tport))
        assert primary.responses(3, timeout=10) == {1: 0, 2: 0, 3: 0}
        node.sock.sendall(_requests(1, 2, tport))
        assert node.responses(2, timeout=10) == {1: 0, 2: 1}
        client.wait_log(r"refused: 4 streams already open or closing \(--max-streams\)",
                        timeout=10)
        # The server ends stream 1 on the primary: one more may open on the node.
        primary.sock.sendall(frame(T_CLOSE, struct.pack(">I", 1)))
        got, cid, deadline = None, 3, time.monotonic() + 10
        while got != 0 and time.monotonic() < deadline:
            node.sock.sendall(_requests(cid, 1, tport))
            got = node.responses(1, timeout=5).get(cid)
            cid += 1
            if got != 0:
                time.sleep(0.1)
        assert got == 0, "a closed stream did not give its place back"
        node.sock.sendall(_requests(cid, 1, tport))
        assert node.responses(1, timeout=10) == {cid: 1}
        assert client.running(), client.log_tail()
    finally:
        primary.close()
        node.close()
        target.close()


T_SHUT_WRITE = 0x09


def _closes(sock, want, timeout):
    """The conn_ids of the Close frames read from sock until want arrived or timeout."""
    got = set()
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        f = read_frame(sock, max(0.05, deadline - time.monotonic()))
        if f is None:
            break
        if f[0] == T_CLOSE:
            got.add(struct.unpack(">I", f[1][:4])[0])
    return got


def test_streams_whose_close_is_unanswered_count_toward_max_streams(proc_factory):
    """A stream the client closed keeps its entry until the server's Close answers it; a
    server that never answers grew the client by about 300 bytes per stream without end,
    --max-streams counting only bridged streams. They count now: beyond the cap a
    ConnectRequest gets status 1, and an answered Close gives the place back."""
    target = socket.socket()
    target.bind(("127.0.0.1", 0))
    target.listen(64)
    tport = target.getsockname()[1]
    stop = threading.Event()

    def accept_and_close():  # a service that hangs up at once
        target.settimeout(0.2)
        while not stop.is_set():
            try:
                target.accept()[0].close()
            except socket.timeout:
                pass
            except OSError:
                return

    threading.Thread(target=accept_and_close, daemon=True).start()
    srv = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{srv.port}", "--token",
                               TOKEN, "--no-reconnect", "--max-streams", "3",
                               "--allow", f"127.0.0.1:{tport}"], "client")
        srv.accept_hello()
        for cid in (1, 2, 3):
            srv.sock.sendall(_requests(cid, 1, tport))
            assert srv.responses(1, timeout=10) == {cid: 0}
            srv.sock.sendall(frame(T_SHUT_WRITE, struct.pack(">I", cid)))
            assert _closes(srv.sock, 1, timeout=10) == {cid}
        # Three closed streams wait for the server's Close: no place for a fourth.
        srv.sock.sendall(_requests(4, 1, tport))
        assert srv.responses(1, timeout=10) == {4: 1}
        client.wait_log(r"refused: 3 streams already open or closing \(--max-streams\)",
                        timeout=10)
        # The server answers one Close: its place is back.
        srv.sock.sendall(frame(T_CLOSE, struct.pack(">I", 1)))
        srv.sock.sendall(_requests(5, 1, tport))
        assert srv.responses(1, timeout=10) == {5: 0}
        assert client.running(), client.log_tail()
    finally:
        stop.set()
        srv.close()
        target.close()


def test_streams_whose_close_the_client_leaves_unanswered_count_toward_the_cap(server_factory):
    """A client that answers every ConnectRequest and never a Close: each stream the server
    closed kept its entry (about 275 bytes) until the session ended, uncounted by
    tunnel.max_streams_per_client, so public connections to its mappings grew the server
    without end. They count now: at the cap a public connection is refused at once."""
    srv = tunnel_server(server_factory, CLIENTS, max_streams_per_client=3)
    with socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5) as tun:
        tun.sendall(hello("default", TOKEN))
        f = read_frame(tun, 5)
        assert f is not None and f[0] == T_HELLO_RESPONSE and json.loads(f[1])["ok"], f
        wait_until(lambda: client_count(srv) == 1, timeout=10, desc="session up")
        port = map_tunnel(srv, 9)
        for _ in range(3):
            pub = connect(port)
            f = read_frame(tun, 5)
            while f is not None and f[0] != T_CONNECT_REQUEST:
                f = read_frame(tun, 5)
            assert f is not None, "no ConnectRequest"
            cid = struct.unpack(">I", f[1][:4])[0]
            tun.sendall(frame(T_CONNECT_RESPONSE, struct.pack(">IB", cid, 0)))
            # The public side resets: the server sends Close, which this client ignores.
            pub.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            pub.close()
            while f is not None and f[0] != T_CLOSE:
                f = read_frame(tun, 5)
            assert f is not None and struct.unpack(">I", f[1][:4])[0] == cid, f
        wait_until(lambda: srv.mapping(port)["active_connections"] == 0, timeout=10,
                   desc="the public connections to end")
        with connect(port) as pub:
            pub.settimeout(5)
            try:
                assert pub.recv(1) == b"", "a 4th stream was opened"
            except ConnectionResetError:
                pass
        assert read_frame(tun, 0.5) is None, "a ConnectRequest beyond the cap"
        assert srv.mapping(port)["failed_connections"] >= 1


def test_a_client_reconnecting_in_a_loop_writes_a_bounded_number_of_lines(server_factory):
    """A client with the token decides how often its sessions start and end: a reconnect
    loop wrote two lines per session, thousands a second. Each client's session lines are
    bounded (6 per 10 s), every session is still served."""
    srv = tunnel_server(server_factory, CLIENTS)
    mark = srv.log_mark()
    for i in range(30):
        with socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5) as tun:
            tun.sendall(hello("default", TOKEN))
            f = read_frame(tun, 5)
            assert f is not None and f[0] == T_HELLO_RESPONSE and json.loads(f[1])["ok"], (i, f)
            if i % 2:
                tun.sendall(frame(0x7F, b""))  # an unknown frame: a protocol error
                closed_by_peer(tun, 5)
    wait_until(lambda: client_count(srv) == 0, timeout=10, desc="the last session to end")
    time.sleep(0.3)
    lines = [ln for ln in srv.log_text()[mark:].splitlines() if 'client "default"' in ln]
    assert 1 <= len(lines) <= 6, lines
    assert srv.api("GET", "/health")[0] == 200


def test_a_churning_node_list_cannot_make_the_client_flood(proc_factory):
    """A server that lists 32 nodes and takes them back every few milliseconds made the
    client connect to each again at once, sending its token each time: 3,000 connections
    and 1,600 log lines a second at the server's will, toward whatever it listed. Node
    connection attempts now come from a bucket (a full list at once, then 32 per 10 s),
    and the node sessions' end and retry lines are bounded."""
    nodes = [socket.create_server(("127.0.0.1", 0), backlog=512) for _ in range(16)]
    closed = free_port()  # nothing listens: "cannot connect" lines
    accepted = [0]
    stop = threading.Event()

    def count():  # accepts and hangs up: each node session ends at once
        while not stop.is_set():
            try:
                readable, _, _ = select.select(nodes, [], [], 0.1)
                for ls in readable:
                    c, _ = ls.accept()
                    accepted[0] += 1
                    c.close()
            except OSError:  # closed at the end
                return

    counter = threading.Thread(target=count, daemon=True)
    counter.start()
    fake = FakeServer()
    try:
        client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token",
                               TOKEN, "--no-reconnect", "--allow", "127.0.0.1:22",
                               "--allow-nodes", "127.0.0.1:1-65535"], "client")
        fake.accept_hello()
        listed = [f"127.0.0.1:{ls.getsockname()[1]}" for ls in nodes] + [f"127.0.0.1:{closed}"]
        deadline = time.monotonic() + 3
        i = 0
        while time.monotonic() < deadline:
            fake.sock.sendall(frame(T_NOTICE, json.dumps(
                {"event": "nodes", "nodes": listed if i % 2 == 0 else []}).encode()))
            i += 1
            time.sleep(0.005)
        time.sleep(0.5)
        assert client.running(), client.log_tail()
        # 32 at once, then 3.2 a second: about 42 in 3 s; the old client made thousands.
        assert accepted[0] <= 60, f"{accepted[0]} node connections in 3 s ({i} lists)"
        lines = client.log_text().splitlines()
        ends = [ln for ln in lines if "cannot connect to" in ln or "disconnected from node" in ln]
        retries = [ln for ln in lines if "reconnecting in" in ln]
        assert len(ends) <= 8 and len(retries) <= 8, (len(ends), len(retries))
    finally:
        stop.set()
        counter.join(5)
        fake.close()
        for ls in nodes:
            ls.close()


def test_a_servers_words_reach_the_terminal_without_c1_controls(proc_factory):
    """A HelloResponse refusal and a ConnectRequest host are the server's text: their C0
    controls were replaced, but UTF-8's C1 controls (CSI U+009B, OSC U+009D, ST U+009C),
    which some terminals act on as on ESC, reached stderr and the status block raw."""
    evil = "nope \u009b2J\u009d0;pwned\u009c \x1b[31m"
    for case in ("refused", "connect"):
        srv = FakeServer()
        try:
            client = proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{srv.port}", "--token",
                                   TOKEN, "--no-reconnect", "--allow", "127.0.0.1:22"], case)
            srv.lsock.settimeout(10)
            srv.sock, _ = srv.lsock.accept()
            assert read_frame(srv.sock, 10)[0] == T_HELLO
            if case == "refused":
                srv.sock.sendall(frame(T_HELLO_RESPONSE, json.dumps(
                    {"ok": False, "message": evil, "error": "auth_failed"}).encode()))
                assert client.wait(10) == 2
            else:
                srv.sock.sendall(frame(T_HELLO_RESPONSE, json.dumps(
                    {"ok": True, "message": "hi"}).encode()))
                host = ("x" + evil).encode()
                srv.sock.sendall(frame(T_CONNECT_REQUEST, struct.pack(">IHB", 1, 22, len(host))
                                       + host))
                assert srv.responses(1, timeout=10) == {1: 2}  # not an address: status 2
                client.wait_log(r"stream 1: .* refused", timeout=10)
            raw = client.log_path.read_bytes()
            assert b"pwned" in raw, raw[-500:]
            for seq in (b"\xc2\x9b", b"\xc2\x9c", b"\xc2\x9d", b"\x1b"):
                assert seq not in raw, (case, raw[-500:])
        finally:
            srv.close()
