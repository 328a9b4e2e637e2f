"""Tunnel under load (issue 4): 200 concurrent streams byte-exact through one tunnel, and
fairness -- one stream stalled on a backend that does not read must not slow another
stream on the same tunnel, nor grow either process's memory. Both run over the plain
tunnel and over TLS, whose socket side has its own buffering (src/common/tls_bev.c).

PORTMUX_SANITIZED=1 (the ASan run) scales the stalled volume down and skips the RSS
bound (ASan's shadow memory is not ours)."""
import hashlib
import os
import selectors
import socket
import threading
import time

import pytest

from conftest import Worker, connect, recv_hash_n, send_stream, stream_sha256, wait_until
from tunnel_helpers import client_info, map_tunnel, pid_rss_kb, tunnel_env_over, wait_streams_drained

SANITIZED = os.environ.get("PORTMUX_SANITIZED") == "1"
MIB = 1 << 20


@pytest.fixture(params=["plain", "tls"])
def tunnel(request, pki, server_factory, tmp_path, logs):
    """A server and a connected client, the tunnel between them plain or TLS."""
    return tunnel_env_over(request.param, pki, server_factory, tmp_path, logs)


def _pump(socks, payloads, deadline_s):
    """With one selector, sends each non-blocking socket its payload (SHUT_WR after it)
    while reading to EOF. Returns per socket (bytes received, sha256 hex); raises
    AssertionError past the deadline."""
    sel = selectors.DefaultSelector()
    st = []
    for i, s in enumerate(socks):
        st.append({"i": i, "off": 0, "n": 0, "h": hashlib.sha256(), "eof": False,
                   "shut": False})
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, st[i])
    live = len(socks)
    deadline = time.monotonic() + deadline_s
    while live:
        if time.monotonic() > deadline:
            stuck = [(x["i"], x["off"], x["n"]) for x in st if not x["eof"]][:10]
            raise AssertionError(f"{live} streams unfinished after {deadline_s}s "
                                 f"(index, sent, received): {stuck}")
        for key, ev in sel.select(0.2):
            x, s = key.data, key.fileobj
            data = payloads[x["i"]]
            if ev & selectors.EVENT_WRITE and x["off"] < len(data):
                try:
                    x["off"] += s.send(data[x["off"]:x["off"] + 256 * 1024])
                except BlockingIOError:
                    pass
            if x["off"] == len(data) and not x["shut"]:
                s.shutdown(socket.SHUT_WR)
                x["shut"] = True
            if ev & selectors.EVENT_READ:
                try:
                    d = s.recv(256 * 1024)
                except BlockingIOError:
                    d = None
                if d:
                    x["h"].update(d)
                    x["n"] += len(d)
                elif d == b"":
                    x["eof"] = True
                    live -= 1
                    sel.unregister(s)
                    continue
            sel.modify(s, selectors.EVENT_READ | (0 if x["shut"] else selectors.EVENT_WRITE),
                       x)
    sel.close()
    return [(x["n"], x["h"].hexdigest()) for x in st]


def test_200_concurrent_streams_byte_exact(tunnel, echo_backend):
    srv, _ = tunnel
    port = map_tunnel(srv, echo_backend.port)
    n = 200
    base = os.urandom(MIB + n * 4099)
    mv = memoryview(base)
    # Every stream carries different bytes, so a mix-up between streams shows.
    payloads = [mv[i * 4099:i * 4099 + MIB] for i in range(n)]
    want = [hashlib.sha256(p).hexdigest() for p in payloads]

    socks = [connect(port) for _ in range(n)]
    try:
        # All 200 are open on the tunnel at once before a byte is sent.
        wait_until(lambda: (client_info(srv) or {}).get("streams") == n, timeout=15,
                   desc=f"{n} streams open on the tunnel")
        wait_until(lambda: echo_backend.active == n, timeout=10,
                   desc=f"{n} connections at the echo backend")
        for s in socks:
            s.setblocking(False)
        got = _pump(socks, payloads, deadline_s=90)
    finally:
        for s in socks:
            s.close()
    bad = [i for i in range(n) if got[i] != (MIB, want[i])]
    assert not bad, f"{len(bad)} streams differ, e.g. {[(i, got[i][0]) for i in bad[:5]]}"
    assert not echo_backend.errors, echo_backend.errors
    wait_streams_drained(srv, port)
    m = srv.mapping(port)
    assert m["total_connections"] == n and m["failed_connections"] == 0, m
    assert m["bytes_in"] == n * MIB and m["bytes_out"] == n * MIB, m


def test_stalled_stream_does_not_block_another(tunnel, echo_backend, stream_backend_factory):
    total = (64 if SANITIZED else 512) * MIB
    srv, cli = tunnel
    sink = stream_backend_factory(paused=True)  # accepts, does not read
    bulk_port = map_tunnel(srv, sink.port)
    echo_port = map_tunnel(srv, echo_backend.port)

    rss = {"server": 0, "client": 0}
    sampling = threading.Event()

    def sample():
        while not sampling.is_set():
            rss["server"] = max(rss["server"], pid_rss_kb(srv.pid))
            rss["client"] = max(rss["client"], pid_rss_kb(cli.pid))
            sampling.wait(0.05)

    sampler = Worker(sample)
    sampler.start()

    progress = {"sent": 0}
    bulk = connect(bulk_port, timeout=120)

    def push():
        sha = send_stream(bulk, total, on_progress=lambda n: progress.__setitem__("sent", n))
        bulk.settimeout(120)
        assert bulk.recv(1) == b"", "the backend sends nothing"
        return sha

    pusher = Worker(push)
    pusher.start()
    try:
        # Wait for the pipeline to fill: the sender makes no progress for 0.5 s.
        seen = {"v": -1, "t": time.monotonic()}

        def stalled():
            v = progress["sent"]
            now = time.monotonic()
            if v != seen["v"]:
                seen["v"], seen["t"] = v, now
                return False
            return v > 0 and now - seen["t"] >= 0.5
        wait_until(stalled, timeout=30, desc="the bulk sender to stall")
        assert progress["sent"] < total, "the backend was not reading, yet all bytes went"
        assert sink.progress == 0

        with connect(echo_port, timeout=5) as s:
            s.settimeout(5)
            for i in range(20):
                msg = f"ping {i} ".encode() * 100
                t0 = time.monotonic()
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    d = s.recv(65536)
                    assert d, f"echo stream closed at round trip {i}"
                    got += d
                dt = time.monotonic() - t0
                assert got == msg, i
                assert dt < 1.0, f"round trip {i} took {dt:.2f}s behind a stalled stream"
        assert pusher.is_alive(), "the bulk stream finished although its reader is paused"

        sink.paused.clear()
        sent_sha = pusher.join_result(120)
        assert sink.done.wait(30), "the backend never saw EOF"
    finally:
        sampling.set()
        sink.paused.clear()
    sampler.join_result(5)
    res = sink.results[0]
    assert res["error"] is None, res
    assert res["recv_count"] == total, res
    assert res["recv_sha"] == sent_sha == stream_sha256(total)
    bulk.close()
    if not SANITIZED:
        assert rss["server"] < 64 * 1024, f"server peak RSS {rss['server']} KiB"
        assert rss["client"] < 64 * 1024, f"client peak RSS {rss['client']} KiB"
    wait_streams_drained(srv, bulk_port)
    wait_streams_drained(srv, echo_port)


def test_bulk_streams_beside_chatty_ones_byte_exact(tunnel, echo_backend):
    """Bulk streams past the 256 KiB after which a plaintext tunnel sends them with
    splice(2), while thirty streams trade small messages on the same tunnel: the small
    frames in the tunnel's output must neither be overtaken by a zero-copy frame (every
    byte arrives in order) nor starve the bulk streams (they finish)."""
    srv, _ = tunnel
    port = map_tunnel(srv, echo_backend.port)
    total = (8 if SANITIZED else 48) * MIB
    bulk_socks = [connect(port, timeout=60) for _ in range(3)]

    def bulk(s):
        reader = Worker(recv_hash_n, s, total)
        reader.start()
        sent = send_stream(s, total, shut=False)
        return sent, reader.join_result(90)

    stop = threading.Event()

    def chatty(i):
        rounds = 0
        with connect(port, timeout=30) as s:
            while not stop.is_set() or rounds < 20:
                # Eight messages at once: their frames queue in the tunnel's output.
                msg = b"".join(b"%d:%d:%d:" % (i, rounds, k) + os.urandom(64 + (rounds + k) % 300)
                               for k in range(8))
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    c = s.recv(len(msg) - len(got))
                    assert c, f"chatty stream {i}: EOF after {rounds} rounds"
                    got += c
                assert got == msg, f"chatty stream {i}: round {rounds} came back changed"
                rounds += 1
        return rounds

    talkers = [Worker(chatty, i) for i in range(30)]
    for w in talkers:
        w.start()
    movers = [Worker(bulk, s) for s in bulk_socks]
    for w in movers:
        w.start()
    try:
        results = [w.join_result(120) for w in movers]
    finally:
        stop.set()
        rounds = [w.join_result(60) for w in talkers]
        for s in bulk_socks:
            s.close()
    for sent, (n, got) in results:
        assert (n, got) == (total, sent), "a bulk stream's bytes were lost, reordered or changed"
    assert min(rounds) >= 20, rounds
    assert not echo_backend.errors, echo_backend.errors

