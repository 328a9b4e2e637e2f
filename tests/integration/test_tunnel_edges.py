"""Tunnel edges (issue 4): half-close carried across the tunnel in both directions, and
garbage on the tunnel port while a well-behaved client keeps working.

Only 127.0.0.1, free ports, every wait bounded by a deadline."""
import hashlib
import json
import os
import random
import socket
import struct
import threading
import time

from conftest import (Worker, connect, recv_exact, recv_hash, send_stream, stream_sha256,
                      wait_until)
from tunnel_helpers import (ScriptBackend, client_info, echo_roundtrip, map_tunnel, metric,
                            start_client, tunnel_env, tunnel_server, wait_streams_drained)

MIB = 1 << 20


# ---------------------------------------------------------------------------
# 9. Half-close

def test_public_half_close_then_answer(server_factory, tmp_path, logs):
    """Request, SHUT_WR; the backend reads to EOF, only then answers 4 MiB and closes."""
    answer = 4 * MIB

    def handler(c):
        n, sha = recv_hash(c)  # to EOF: the public FIN must arrive through the tunnel
        send_stream(c, answer)
        return n, sha

    b = ScriptBackend(handler)
    try:
        srv, _ = tunnel_env(server_factory, tmp_path, logs)
        port = map_tunnel(srv, b.port)
        with connect(port, timeout=30) as s:
            s.settimeout(30)
            req_sha = send_stream(s, 1 * MIB + 17)  # ends with shutdown(SHUT_WR)
            got = recv_hash(s)
        b.wait_finished()
        assert not b.errors, b.errors
        assert b.results == [(1 * MIB + 17, req_sha)]
        assert got == (answer, stream_sha256(answer))
        wait_streams_drained(srv, port)
    finally:
        b.stop()


def test_backend_half_close_while_public_keeps_sending(server_factory, tmp_path, logs):
    """The backend answers 3 MiB and shuts its write side first; the public side reads
    that to EOF, then keeps sending; the backend still gets every byte."""
    answer = 3 * MIB
    first = os.urandom(64 * 1024)
    later = os.urandom(512 * 1024)

    def handler(c):
        send_stream(c, answer)  # then shutdown(SHUT_WR)
        return recv_hash(c)

    b = ScriptBackend(handler)
    try:
        srv, _ = tunnel_env(server_factory, tmp_path, logs)
        port = map_tunnel(srv, b.port)
        with connect(port, timeout=30) as s:
            s.settimeout(30)
            s.sendall(first)
            got = recv_hash(s)  # EOF from the backend's SHUT_WR
            assert got == (answer, stream_sha256(answer))
            s.sendall(later)  # the other direction is still open
            s.shutdown(socket.SHUT_WR)
            b.wait_finished()
            assert s.recv(1) == b""
        assert not b.errors, b.errors
        assert b.results == [(len(first) + len(later), hashlib.sha256(first + later).hexdigest())]
        wait_streams_drained(srv, port)
    finally:
        b.stop()


def test_backend_answers_and_closes_at_once(server_factory, tmp_path, logs):
    """The backend writes its whole answer and closes straight after, so its FIN is
    usually queued behind the bytes when the client reads them, and the client ends the
    stream with that same read (EPOLLRDHUP). Sizes from 1 byte to past a stream's window
    (where a read stops at the window with the FIN still behind more bytes), one at a time
    and eight at once: every byte, then EOF, each time."""
    sizes = [1, 100, 4095, 4096, 65536 + 3, 256 * 1024, 256 * 1024 + 1, 1 * MIB + 7]

    def handler(c):
        n = struct.unpack(">I", recv_exact(c, 4))[0]
        send_stream(c, n, shut=False)  # the close follows at once (ScriptBackend)
        return n

    def fetch(port, n):
        with connect(port, timeout=30) as s:
            s.settimeout(30)
            s.sendall(struct.pack(">I", n))
            return recv_hash(s)

    b = ScriptBackend(handler)
    try:
        srv, _ = tunnel_env(server_factory, tmp_path, logs)
        port = map_tunnel(srv, b.port)
        for n in sizes:
            assert fetch(port, n) == (n, stream_sha256(n)), f"answer of {n} bytes"
        workers = [Worker(fetch, port, n) for n in sizes]
        for w in workers:
            w.start()
        for n, w in zip(sizes, workers):
            assert w.join_result(60) == (n, stream_sha256(n)), f"answer of {n} bytes (together)"
        b.wait_finished(2 * len(sizes))
        assert not b.errors, b.errors
        wait_streams_drained(srv, port)
    finally:
        b.stop()


# ---------------------------------------------------------------------------
# 10. Garbage on the tunnel port

def frame(ftype, payload, version=1):
    return struct.pack(">BBI", version, ftype, len(payload)) + payload


def hello(name, token):
    return frame(0x06, json.dumps({"name": name, "token": token, "version": "1"}).encode())


def read_frame(s, timeout=5):
    s.settimeout(timeout)
    buf = b""
    while len(buf) < 6:
        d = s.recv(6 - len(buf))
        assert d, "closed before a frame header"
        buf += d
    ver, ftype, n = struct.unpack(">BBI", buf)
    body = b""
    while len(body) < n:
        d = s.recv(n - len(body))
        assert d, "closed inside a frame"
        body += d
    return ver, ftype, body


def server_closes(port, data, timeout, pre=None):
    """Connects to the tunnel port (pre(sock) first, if given), sends data, and returns
    the seconds until the server closes (EOF or reset), or None when still open."""
    t0 = time.monotonic()
    with connect(port, timeout=timeout) as s:
        if pre:
            pre(s)
        try:
            if data:
                s.sendall(data)
        except OSError:
            return time.monotonic() - t0
        s.settimeout(timeout)
        try:
            while s.recv(65536):
                pass
        except socket.timeout:
            return None
        except OSError:
            pass
    return time.monotonic() - t0


def test_garbage_on_tunnel_port_keeps_good_client(server_factory, tmp_path, logs,
                                                  echo_backend):
    srv = tunnel_server(server_factory, [{"name": "default", "token": "good-token-0123456"},
                                         {"name": "raw", "token": "raw-token-0123456"}],
                        hello_timeout=2)
    cli = start_client(tmp_path, logs, srv, "good-token-0123456")
    connected_at = client_info(srv)["connected_at"]
    port = map_tunnel(srv, echo_backend.port)
    perr0 = metric(srv, "portmux_tunnel_protocol_errors_total")
    hto0 = metric(srv, 'portmux_limit_refused_total{limit="hello_timeout"}')
    assert perr0 is not None and hto0 is not None

    stop = threading.Event()
    tally = {"ok": 0, "bad": []}

    def traffic():
        i = 0
        while not stop.is_set():
            msg = f"{i}:".encode() + os.urandom(4096)
            try:
                got = echo_roundtrip(port, msg, timeout=5)
                if got == msg:
                    tally["ok"] += 1
                else:
                    tally["bad"].append((i, len(got)))
            except OSError as e:
                tally["bad"].append((i, repr(e)))
            i += 1
            time.sleep(0.02)

    loop = Worker(traffic)
    loop.start()
    try:
        rnd = bytes([0x7f]) + random.Random(42).randbytes(4095)  # first byte not a version
        cases = [
            ("random bytes", rnd),
            ("wrong version", frame(0x06, b'{"name":"default","token":"good-token-0123456"}', version=2)),
            ("length over limit", bytes.fromhex("010300100000")),
            ("non-Hello first frame", frame(0x05, b"")),
            ("ConnectRequest first", frame(0x01, struct.pack(">IH", 1, 22))),
            ("Hello not JSON", frame(0x06, b"\xff{not json")),
            ("unknown type", frame(0x42, b"")),
        ]
        for what, data in cases:
            t = server_closes(srv.tunnel_port, data, timeout=3)
            assert t is not None, f"{what}: the server kept the connection open 3 s"

        # Authenticated first, then a frame over the size limit: that tunnel goes too.
        def auth(s):
            s.sendall(hello("raw", "raw-token-0123456"))
            ver, ftype, body = read_frame(s)
            assert (ver, ftype) == (1, 0x07) and b'"ok":true' in body.replace(b" ", b""), body
        t = server_closes(srv.tunnel_port, bytes.fromhex("010300100000"), 3, pre=auth)
        assert t is not None, "authenticated tunnel kept open after an oversized frame"
        wait_until(lambda: client_info(srv, "raw") is None, timeout=2,
                   desc="the raw client gone from /api/clients")

        # Says nothing: closed by hello_timeout (2 s), not before, not much after.
        t = server_closes(srv.tunnel_port, b"", timeout=6)
        assert t is not None and 1.5 <= t <= 3.5, f"silent connection closed after {t}"
    finally:
        stop.set()
    loop.join_result(15)

    assert not tally["bad"], tally["bad"][:5]
    assert tally["ok"] >= 5, tally
    assert cli.running()
    assert client_info(srv)["connected_at"] == connected_at, "the good client was dropped"
    assert metric(srv, "portmux_tunnel_protocol_errors_total") == perr0 + len(cases) + 1
    assert metric(srv, 'portmux_limit_refused_total{limit="hello_timeout"}') == hto0 + 1
    assert srv.running()
    wait_streams_drained(srv, port)
