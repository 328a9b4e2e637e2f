"""Process behaviour (SPEC §5): SIGTERM/SIGINT stop the server with exit 0 within 2 s even
with live connections, leaving a clean database; --version and --help."""
import re
import signal
import socket
import time

import pytest

from conftest import (SERVER_BIN, Worker, connect, free_port, run_once, send_stream,
                      sqlite, wait_until)

MiB = 1 << 20


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_live_connections(server, stream_backend_factory, echo_backend, sig):
    # One connection mid-transfer: the target stops reading, so bytes are in flight.
    stuck = stream_backend_factory(paused=True)
    port_stuck = free_port()
    server.create_ok(port=port_stuck, target_ip="127.0.0.1", target_port=stuck.port)
    # One idle connection through an echo mapping.
    port_echo = free_port()
    server.create_ok(port=port_echo, target_ip="127.0.0.1", target_port=echo_backend.port)

    pushing = connect(port_stuck, timeout=30)
    sent = [0]
    sender = Worker(send_stream, pushing, 512 * MiB, 256 * 1024,
                    lambda n: sent.__setitem__(0, n))
    sender.start()
    idle = connect(port_echo)
    idle.sendall(b"hi")
    assert idle.recv(2) == b"hi"
    api_idle = socket.create_connection(("127.0.0.1", server.api_port))  # no request sent
    try:
        wait_until(lambda: sent[0] >= 4 * MiB, timeout=10, desc="transfer under way")
        wait_until(lambda: server.mapping(port_stuck)["active_connections"] == 1, timeout=5,
                   desc="live connection counted")

        t0 = time.monotonic()
        server.proc.send_signal(sig)
        rc = server.proc.wait(5)
        took = time.monotonic() - t0
        assert rc == 0, f"exit status {rc} on {sig.name}"
        assert took < 2.0, f"took {took:.2f}s to exit on {sig.name}"
        assert "received" in server.log_text(), "no log line for the signal"
        sender.join(5)
    finally:
        for s in (pushing, idle, api_idle):
            s.close()
    # Database closed cleanly: intact, WAL folded back in.
    assert sqlite(server.db_path, "PRAGMA integrity_check") == [["ok"]]
    wal = server.db_path.with_name(server.db_path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, "WAL left behind after clean exit"
    # And the mappings are all there on the next start.
    server.start()
    assert sorted(m["port"] for m in server.list()) == sorted([port_stuck, port_echo])


def test_sigterm_idle_is_quick(server):
    t0 = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 2.0


def test_version():
    r = run_once([SERVER_BIN, "--version"])
    assert r.returncode == 0, r
    out = r.stdout.decode()
    m = re.search(r"\b(\d+\.\d+\.\d+)\b", out)
    assert m, f"no version in {out!r}"
    assert len(out.strip().splitlines()) == 1, out


def test_version_matches_health(server):
    out = run_once([SERVER_BIN, "--version"]).stdout.decode()
    assert server.health()["version"] in out


def test_help():
    r = run_once([SERVER_BIN, "--help"])
    assert r.returncode == 0, r
    out = r.stdout.decode() + r.stderr.decode()
    assert "--config" in out and "usage" in out.lower(), out
