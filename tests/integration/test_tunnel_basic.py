"""Tunnel mode end to end (issue 4): portmux-server with the tunnel on, a real
portmux-client, backends on 127.0.0.1, traffic through public ports with curl and
sockets. Every wait has a deadline; ports are free ones; only 127.0.0.1."""
import hashlib
import os
import re
import signal
import struct
import time

import pytest

from conftest import (CLIENT_BIN, Worker, connect, free_port, recv_all, send_stream,
                      stream_sha256, wait_until)
from tunnel_helpers import (client_count, closed_within, http_get, run_client, start_client,
                            tunnel_server, wait_status)

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

TOKEN = "tok-" + os.urandom(6).hex()
CLIENTS = [{"name": "default", "token": TOKEN}, {"name": "office", "token": TOKEN + "-o"}]


def frame(ftype, payload=b"", version=1, length=None):
    n = len(payload) if length is None else length
    return bytes([version, ftype]) + struct.pack(">I", n) + payload


def test_http_through_tunnel(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    m = srv.create_ok(port=port, target_port=http_backend.port, use_tunnel=True)
    assert m["use_tunnel"] is True and m["status"] == "listening", m

    status, body = http_get(port, "/hello.txt")
    assert status == 200 and body == http_backend.files["hello.txt"], (status, body[:200])
    status, body = http_get(port, "/blob.bin")
    assert status == 200 and body == http_backend.files["blob.bin"], (status, len(body))

    h = srv.health()
    assert h["tunnel_enabled"] is True and h["tunnel_connected"] is True, h
    assert h["clients"] == 1, h

    status, _, resp = srv.api("GET", "/api/clients")
    assert status == 200, resp
    data = resp["data"]
    # Every known client is listed (SPEC §4a), connected or not.
    assert data["count"] == 2, data
    by_name = {c["name"]: c for c in data["clients"]}
    assert by_name["office"]["connected"] is False and by_name["office"]["source"] == "config"
    assert by_name["office"]["remote_addr"] is None and by_name["office"]["streams"] == 0
    c = by_name["default"]
    assert c["connected"] is True and c["source"] == "config", c
    assert re.fullmatch(r"127\.0\.0\.1:\d+", c["remote_addr"]), c
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", c["connected_at"]), c
    assert isinstance(c["streams"], int) and isinstance(c["rtt_ms"], (int, float)), c
    assert c["bytes_in"] >= len(http_backend.files["blob.bin"]), c
    assert c["bytes_out"] > 0, c

    m = wait_until(lambda: (lambda x: x if x["active_connections"] == 0 else None)(
        srv.mapping(port)), timeout=10, desc="connections to finish")
    assert m["total_connections"] == 2 and m["failed_connections"] == 0, m
    assert m["bytes_out"] >= len(http_backend.files["blob.bin"]), m
    assert m["bytes_in"] > 0, m

    # Without target_ip a mapping is a tunnel mapping to 127.0.0.1 on the client side.
    port2 = free_port()
    m2 = srv.create_ok(port=port2, target_port=http_backend.port)
    assert m2["use_tunnel"] is True, m2
    assert http_get(port2, "/hello.txt")[0] == 200


def test_rtt_measured(server_factory, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS, heartbeat_interval=1, heartbeat_timeout=5)
    start_client(tmp_path, logs, srv, TOKEN, "--heartbeat-interval", "1")

    def rtt():
        c = srv.api("GET", "/api/clients")[2]["data"]["clients"]
        return c and c[0]["rtt_ms"] > 0
    wait_until(rtt, timeout=5, desc="rtt_ms from the KeepAlive echo")


def test_client_absent_closes_at_once(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port, use_tunnel=True, client="office")
    assert srv.mapping(port)["status"] == "waiting_for_client"
    assert srv.health()["tunnel_connected"] is False
    for i in range(3):
        took = closed_within(port, 2.0)
        assert took is not None and took < 1.0, f"public connection left hanging ({took})"
    m = srv.mapping(port)
    assert m["failed_connections"] == 3 and m["active_connections"] == 0, m

    # The right client comes: the mapping serves.
    start_client(tmp_path, logs, srv, TOKEN + "-o", name="office")
    wait_status(srv, port, "listening")
    assert http_get(port, "/hello.txt") == (200, http_backend.files["hello.txt"])


@pytest.mark.parametrize("name,token,message", [
    ("default", "wrong-token", "authentication failed"),
    ("nobody", TOKEN, "authentication failed"),
])
def test_refused_hello_exits_2(server_factory, name, token, message):
    srv = tunnel_server(server_factory, CLIENTS)
    t0 = time.monotonic()
    r = run_client(srv, token, name=name)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (r.returncode, err)
    assert f"portmux-client: server refused: {message}" in err, err
    assert time.monotonic() - t0 < 10, "a refused client should not retry"
    assert token not in srv.log_text(), "a token reached the server log"
    assert srv.health()["clients"] == 0


def test_second_client_same_name_refused(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    first = start_client(tmp_path, logs, srv, TOKEN)
    r = run_client(srv, TOKEN)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (r.returncode, err)
    assert 'client "default" is already connected' in err, err
    assert first.running()
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port)
    assert http_get(port, "/hello.txt")[0] == 200


def test_garbage_on_tunnel_port(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS, hello_timeout=2)
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port)
    junk = {
        "random bytes": os.urandom(4096),
        "wrong version": frame(0x06, b"{}", version=2),
        "unknown type": frame(0x7f, b""),
        "length over limit": frame(0x06, length=65536 + 9),
        "data before hello": frame(0x03, b"\x00\x00\x00\x01abc"),
        "hello not json": frame(0x06, b"not json"),
    }
    for what, data in junk.items():
        took = closed_within(srv.tunnel_port, 5.0, send=data)
        assert took is not None, f"{what}: connection not closed"
        assert http_get(port, "/hello.txt")[0] == 200, f"tunnel broken after {what}"
    # A Hello that never comes: closed after hello_timeout.
    took = closed_within(srv.tunnel_port, 6.0)
    assert took is not None and 1.5 < took < 5, took
    assert srv.running() and srv.health()["clients"] == 1
    assert http_get(port, "/hello.txt") == (200, http_backend.files["hello.txt"])


def test_target_refused_and_allow_list(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    client = start_client(tmp_path, logs, srv, TOKEN, "--allow",
                          f"127.0.0.1:{http_backend.port},10.0.0.0/8:1-65535")
    closed_port = free_port()  # nothing listens there
    p_denied, p_ok = free_port(), free_port()
    srv.create_ok(port=p_denied, target_port=closed_port, use_tunnel=True)
    srv.create_ok(port=p_ok, target_port=http_backend.port, use_tunnel=True)

    mark = client.log_mark()
    took = closed_within(p_denied, 3.0)
    assert took is not None and took < 1.0, took
    client.wait_log(r"not in --allow", after=mark)
    assert srv.mapping(p_denied)["failed_connections"] == 1

    # Allowed by the list, but nothing listens: refused by the target, fails fast.
    srv.remove(p_denied)
    srv.create_ok(port=p_denied, target_port=closed_port, use_tunnel=True)
    client.kill()
    wait_until(lambda: client_count(srv) == 0, timeout=10, desc="server to see the client go")
    client = start_client(tmp_path, logs, srv, TOKEN, log_name="client-2")
    took = closed_within(p_denied, 3.0)
    assert took is not None and took < 1.0, took
    assert srv.mapping(p_denied)["failed_connections"] == 1
    assert http_get(p_ok, "/hello.txt")[0] == 200


def test_half_close_through_tunnel(server_factory, echo_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port)
    total = 3 * (1 << 20) + 11
    with connect(port) as s:
        sender = Worker(send_stream, s, total)  # shuts the write side at the end
        sender.start()
        got = recv_all(s)
        sent_sha = sender.join_result(60)
    assert len(got) == total
    assert hashlib.sha256(got).hexdigest() == sent_sha == stream_sha256(total)


def test_concurrent_streams_byte_exact(server_factory, echo_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port)
    total = 1 << 20

    def one():
        with connect(port, timeout=60) as s:
            sender = Worker(send_stream, s, total)
            sender.start()
            got = recv_all(s)
            return sender.join_result(60), hashlib.sha256(got).hexdigest(), len(got)
    workers = [Worker(one) for _ in range(50)]
    for w in workers:
        w.start()
    want = stream_sha256(total)
    for w in workers:
        sent, got, n = w.join_result(120)
        assert n == total and sent == got == want


def test_client_killed_then_restarted(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS, heartbeat_interval=1, heartbeat_timeout=3)
    client = start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port)
    assert http_get(port, "/hello.txt")[0] == 200
    client.popen.send_signal(signal.SIGKILL)
    client.wait(10)
    wait_status(srv, port, "waiting_for_client", timeout=5)
    took = closed_within(port, 2.0)
    assert took is not None and took < 1.0
    start_client(tmp_path, logs, srv, TOKEN, log_name="client-again")
    wait_status(srv, port, "listening")
    assert http_get(port, "/hello.txt")[0] == 200


def test_server_restart_client_reconnects(server_factory, http_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    client = start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port)
    mark = client.log_mark()
    srv.restart()
    client.wait_log(r"reconnecting in \d+\.\d s \(attempt 1\)", after=mark, timeout=10)
    wait_until(lambda: client_count(srv) == 1, timeout=20, desc="client to reconnect")
    assert http_get(port, "/hello.txt") == (200, http_backend.files["hello.txt"])
    assert client.running()


def test_client_exits_0_on_sigterm(server_factory, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    client = start_client(tmp_path, logs, srv, TOKEN)
    client.send_signal(signal.SIGTERM)
    assert client.wait(5) == 0
    wait_until(lambda: srv.health()["clients"] == 0, timeout=5, desc="server to see it go")


def test_silent_peers_dropped_after_heartbeat_timeout(server_factory, http_backend, tmp_path,
                                                      logs):
    """A frozen client is dropped by the server, a frozen server by the client, each after
    its heartbeat_timeout; then the client reconnects by itself."""
    srv = tunnel_server(server_factory, CLIENTS, heartbeat_interval=1, heartbeat_timeout=3)
    client = start_client(tmp_path, logs, srv, TOKEN, "--heartbeat-interval", "1",
                          "--heartbeat-timeout", "3")
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port)
    mark = client.log_mark()
    client.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_status(srv, port, "waiting_for_client", timeout=8)
        assert time.monotonic() - t0 > 1.5
        srv.wait_log(r'client "default" disconnected: no data for 3 s')
    finally:
        client.send_signal(signal.SIGCONT)
    wait_until(lambda: client_count(srv) == 1, timeout=15, desc="client to come back")
    # The server counts the client at its Hello, before the client logs the answer: the
    # mark below must come after that line, or the wait for the next session finds it.
    client.wait_log(r"connected to 127\.0\.0\.1:\d+ as", after=mark, timeout=15)

    mark = client.log_mark()
    srv.proc.send_signal(signal.SIGSTOP)
    try:
        client.wait_log(r"disconnected from server: server silent for 3 s", after=mark,
                        timeout=10)
    finally:
        srv.proc.send_signal(signal.SIGCONT)
    # The server may still count the session the client gave up until it reads that
    # socket's end: wait for the client's new session, not only for a count of one.
    client.wait_log(r"connected to 127\.0\.0\.1:\d+ as", after=mark, timeout=15)
    wait_until(lambda: client_count(srv) == 1, timeout=15, desc="client to reconnect")
    assert http_get(port, "/hello.txt")[0] == 200


def test_max_streams_per_client(server_factory, echo_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS, max_streams_per_client=2)
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port)
    held = [connect(port), connect(port)]
    try:
        for s in held:  # both streams really open: they echo
            s.sendall(b"hi")
            assert s.recv(2) == b"hi"
        took = closed_within(port, 3.0)
        assert took is not None and took < 1.0, took
        m = srv.mapping(port)
        assert m["failed_connections"] == 1 and m["active_connections"] == 2, m
        text = srv.api("GET", "/metrics")[2]
        assert re.search(r'limit="max_streams_per_client"\} 1\b', text), text
    finally:
        for s in held:
            s.close()
    wait_until(lambda: srv.mapping(port)["active_connections"] == 0, timeout=10,
               desc="streams to close")
    with connect(port) as s:
        s.sendall(b"again")
        assert s.recv(5) == b"again"
