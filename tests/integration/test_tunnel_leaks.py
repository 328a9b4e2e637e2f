"""No leaked streams (issue 4): after every stream closes, /api/clients shows streams 0
and the mapping active_connections 0 -- also when a backend or the public side goes
away with unread data (RST), the pattern iperf3 produced: server-side public sockets
parked in FIN-WAIT-2 with unread bytes, and the streams never freed.

Only 127.0.0.1, free ports, every wait bounded by a deadline."""
import json
import os
import signal
import socket
import subprocess
import threading

from conftest import (Worker, connect, connect_refused, free_port, send_stream, wait_until)
from tunnel_helpers import (ScriptBackend, map_tunnel, tunnel_env, wait_queue_full,
                            wait_streams_drained)

MIB = 1 << 20


def test_backend_reset_with_unread_data_leaves_no_stream(server_factory, tmp_path, logs):
    """Public clients send a lot; the backend reads a little and closes with unread
    data (its kernel answers with a RST, no FIN); the public side closes too. Every
    stream must be gone within a few seconds -- none parked in FIN-WAIT-2 with
    unread bytes."""
    n = 4

    def handler(c):
        got = 0
        while got < 64 * 1024:
            d = c.recv(64 * 1024 - got)
            if not d:
                break
            got += len(d)
        return got  # close() with unread data queued: RST

    b = ScriptBackend(handler)
    try:
        srv, _ = tunnel_env(server_factory, tmp_path, logs)
        port = map_tunnel(srv, b.port)
        socks = [connect(port, timeout=30) for _ in range(n)]

        def blast(s):
            s.settimeout(2)  # no progress for 2 s ends the blast
            try:
                send_stream(s, 64 * MIB, chunk=64 * 1024, shut=False)
            except OSError as e:  # reset, broken pipe, or stalled
                return repr(e)
            return "sent all"

        senders = [Worker(blast, s) for s in socks]
        for w in senders:
            w.start()
        b.wait_finished(n, timeout=20)
        assert not b.errors, b.errors
        outcomes = [w.join_result(60) for w in senders]
        for s in socks:
            s.close()
        wait_streams_drained(srv, port, timeout=5)
        m = srv.mapping(port)
        assert m["total_connections"] == n, (m, outcomes)
    finally:
        b.stop()


def test_public_close_with_unread_answer_leaves_no_stream(server_factory, tmp_path, logs):
    """The mirror image: the backend sends a lot, the public client reads a little and
    closes with unread data (its kernel resets)."""
    n = 4

    def handler(c):
        c.settimeout(5)
        try:
            send_stream(c, 64 * MIB, chunk=64 * 1024)
        except OSError as e:
            return repr(e)
        return "sent all"

    b = ScriptBackend(handler)
    try:
        srv, _ = tunnel_env(server_factory, tmp_path, logs)
        port = map_tunnel(srv, b.port)
        for _ in range(n):
            s = connect(port, timeout=10)
            got = 0
            while got < 64 * 1024:
                d = s.recv(65536)
                assert d
                got += len(d)
            s.close()
        b.wait_finished(n, timeout=30)
        wait_streams_drained(srv, port, timeout=5)
    finally:
        b.stop()


def test_backend_fin_then_reset_leaves_no_stream(server_factory, tmp_path, logs):
    """What iperf3 left behind, made deterministic: the backend stops reading, so the
    client holds bytes it cannot write; then the backend shuts its write side and closes
    with unread data -- a FIN and a RST back to back. When the client sees both in one
    wake-up (a busy client; here: frozen by SIGSTOP while they arrive), it must still
    notice the reset and close the stream, not only pass the FIN on."""
    ready, go = threading.Event(), threading.Event()

    def handler(c):
        got = 0
        while got < 64 * 1024:
            d = c.recv(64 * 1024 - got)
            if not d:
                return got
            got += len(d)
        wait_queue_full(c)
        ready.set()
        assert go.wait(20)
        c.shutdown(socket.SHUT_WR)  # FIN
        return got  # close() with unread data right after: RST

    b = ScriptBackend(handler)
    try:
        srv, cli = tunnel_env(server_factory, tmp_path, logs)
        port = map_tunnel(srv, b.port)
        s = connect(port, timeout=30)

        def blast():
            s.settimeout(2)  # no progress for 2 s ends the blast
            try:
                send_stream(s, 256 * MIB, chunk=64 * 1024, shut=False)
            except OSError as e:
                return repr(e)
            return "sent all"

        sender = Worker(blast)
        sender.start()
        assert ready.wait(20), "the backend never filled up"
        cli.send_signal(signal.SIGSTOP)
        try:
            go.set()
            b.wait_finished(1, timeout=10)
            # FIN and RST both reached the client's socket (reset: the kernel dropped it).
            wait_until(lambda: not sockets_to(b.port), timeout=5,
                       desc="the client's backend socket to be reset")
        finally:
            cli.send_signal(signal.SIGCONT)
        assert not b.errors, b.errors
        sender.join_result(30)
        s.close()
        wait_streams_drained(srv, port, timeout=5)
    finally:
        b.stop()


def sockets_to(port):
    """Lines of `ss` for TCP sockets (any state the kernel still lists) whose peer is
    127.0.0.1:port."""
    out = subprocess.run(["ss", "-Htan", f"dst 127.0.0.1:{port}"], capture_output=True,
                         text=True, timeout=10).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_iperf3_through_tunnel_leaves_no_stream(server_factory, tmp_path, logs,
                                                proc_factory):
    """The real peer that showed the leak: iperf3 runs forward, reverse and parallel;
    after each, no stream is left on the tunnel."""
    iport = free_port()
    iperf = proc_factory(["iperf3", "-s", "-p", str(iport), "-B", "127.0.0.1"], "iperf3-s")
    wait_until(lambda: iperf.poll() is not None or not connect_refused(iport), timeout=10,
               desc="iperf3 -s to listen")
    srv, _ = tunnel_env(server_factory, tmp_path, logs)
    port = map_tunnel(srv, iport)
    for extra in ([], ["-R"], ["-P", "2"], []):
        # iperf3 -s closes and reopens its listening socket between tests; a dial that
        # lands in that gap is refused (the run fails before any data moves). Such a run
        # is repeated, at most three times; each attempt must still leave no stream.
        for attempt in range(3):
            r = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", "1",
                                "-J", *extra], capture_output=True, timeout=30)
            if r.returncode == 0:
                break
            wait_streams_drained(srv, port, timeout=5)
        assert r.returncode == 0, (extra, r.stdout[-2000:], r.stderr[-2000:])
        res = json.loads(r.stdout)
        assert res["end"]["sum_received"]["bytes"] > 0, extra
        wait_streams_drained(srv, port, timeout=5)
