"""Tunnel failures (issue 4): the client killed, frozen or restarted, the server
restarted, refused Hellos, and targets the client cannot or may not dial. Each must
close the public connection at once, count it as failed, and recover by itself.

Only 127.0.0.1, free ports, every wait bounded by a deadline."""
import os
import re
import signal
import socket
import struct
import subprocess
import time

import pytest

from conftest import CLIENT_BIN, free_port, recv_exact, wait_until
from sec_helpers import T_HELLO_RESPONSE, frame, hello, read_frame
from tunnel_helpers import (client_count, client_info, closed_within, echo_roundtrip,
                            map_tunnel, metric, start_client, tunnel_env, tunnel_env_over,
                            tunnel_server,
                            wait_status, wait_streams_drained)

HB = {"heartbeat_interval": 1, "heartbeat_timeout": 3}


def assert_echo(port, tag):
    msg = os.urandom(64 * 1024)
    got = echo_roundtrip(port, msg, timeout=10)
    assert got == msg, f"{tag}: echo returned {len(got)} of {len(msg)} bytes"


def assert_closed_and_failed(srv, port, tag):
    """A public connection is closed within 1 s, and failed_connections grows by one."""
    before = srv.mapping(port)["failed_connections"]
    t = closed_within(port, 1.0)
    assert t is not None and t <= 1.0, f"{tag}: public connection still open after 1 s"
    wait_until(lambda: srv.mapping(port)["failed_connections"] == before + 1, timeout=2,
               desc=f"{tag}: failed_connections {before} -> {before + 1}")
    wait_until(lambda: srv.mapping(port)["active_connections"] == 0, timeout=2,
               desc=f"{tag}: active_connections back to 0")


def test_client_killed_then_back_and_server_restart(server_factory, tmp_path, logs,
                                                    echo_backend):
    srv, cli = tunnel_env(server_factory, tmp_path, logs, **HB)
    port = map_tunnel(srv, echo_backend.port)
    assert_echo(port, "before kill")

    cli.kill()  # SIGKILL
    t0 = time.monotonic()
    wait_status(srv, port, "waiting_for_client", timeout=HB["heartbeat_timeout"] + 0.5)
    assert time.monotonic() - t0 <= HB["heartbeat_timeout"] + 0.5
    h = srv.health()
    assert h["tunnel_connected"] is False and h["clients"] == 0, h
    assert client_count(srv) == 0
    assert_closed_and_failed(srv, port, "client gone")

    cli.start()
    wait_until(lambda: client_count(srv) == 1, timeout=10, desc="client back")
    wait_status(srv, port, "listening", timeout=5)
    assert_echo(port, "client restarted")

    # Server restart with the same database: the client reconnects by itself and the
    # restored mapping carries traffic without any API call.
    mark = cli.log_mark()
    srv.restart()
    wait_until(lambda: client_count(srv) == 1, timeout=15, desc="client to reconnect")
    cli.wait_log(r"reconnecting in \d", timeout=1, after=mark)
    assert cli.running()
    wait_status(srv, port, "listening", timeout=5)
    assert_echo(port, "after server restart")
    wait_streams_drained(srv, port)


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_frozen_client_dropped_by_heartbeat(server_factory, tmp_path, logs, echo_backend, pki,
                                            transport):
    """SIGSTOP keeps the client's socket open but silent: only the heartbeat can tell. Over
    TLS the timeouts live on the OpenSSL filter, not on the socket (src/common/tls_bev.c)."""
    srv, cli = tunnel_env_over(transport, pki, server_factory, tmp_path, logs, **HB)
    port = map_tunnel(srv, echo_backend.port)
    assert_echo(port, "before freeze")
    # Heartbeats flow while idle: the tunnel outlives heartbeat_timeout with no traffic.
    idle_until = time.monotonic() + HB["heartbeat_timeout"] + 1.5
    while time.monotonic() < idle_until:
        assert (srv.mapping(port) or {}).get("status") == "listening", srv.mapping(port)
        time.sleep(0.2)
    rtt = client_info(srv)["rtt_ms"]
    assert isinstance(rtt, (int, float)) and rtt >= 0, rtt

    cli.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        wait_status(srv, port, "waiting_for_client",
                    timeout=HB["heartbeat_timeout"] + HB["heartbeat_interval"] + 1)
        took = time.monotonic() - t0
        # It went for silence, not at once: at least heartbeat_timeout minus one interval.
        assert took >= HB["heartbeat_timeout"] - HB["heartbeat_interval"] - 0.5, took
        srv.wait_log(r'client "default" disconnected', timeout=2)
        assert_closed_and_failed(srv, port, "client frozen")
    finally:
        cli.send_signal(signal.SIGCONT)
    # Thawed, the client finds its tunnel gone and reconnects on its own.
    wait_until(lambda: client_count(srv) == 1, timeout=15, desc="client to reconnect")
    wait_status(srv, port, "listening", timeout=5)
    assert_echo(port, "after thaw")


def run_refused(srv, token, name, timeout=10.0):
    """Runs the client (reconnect left on) to its exit; returns (rc, stderr, seconds)."""
    t0 = time.monotonic()
    r = subprocess.run([str(CLIENT_BIN), "--server", f"127.0.0.1:{srv.tunnel_port}",
                        "--token", token, "--name", name], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=timeout)
    return r.returncode, r.stderr.decode(errors="replace"), time.monotonic() - t0


def test_refused_hello_exits_2_without_retrying(server_factory, tmp_path, logs):
    srv = tunnel_server(server_factory, [{"name": "default", "token": "right-token-0123456"}])
    fails0 = metric(srv, "portmux_tunnel_auth_failures_total")

    for token, name in (("wrong-token-0123456", "default"), ("right-token-0123456", "nobody")):
        rc, err, took = run_refused(srv, token, name)
        assert rc == 2, (token, name, rc, err)
        assert re.search(r"refused|token", err, re.I), err
        assert took < 5, f"{name}/{token}: exit after {took:.1f}s"
    # One attempt each: no retry loop behind the exit.
    assert metric(srv, "portmux_tunnel_auth_failures_total") == fails0 + 2
    assert client_count(srv) == 0
    assert srv.health()["tunnel_connected"] is False

    # A second client with a live one's name replaces nothing.
    first = start_client(tmp_path, logs, srv, "right-token-0123456")
    connected_at = client_info(srv)["connected_at"]
    rc, err, took = run_refused(srv, "right-token-0123456", "default")
    assert rc == 2, (rc, err)
    assert re.search(r"refused|already", err, re.I), err
    assert first.running()
    assert client_info(srv)["connected_at"] == connected_at
    assert client_count(srv) == 1


def test_target_refused_and_not_allowed(server_factory, tmp_path, logs, echo_backend):
    srv = tunnel_server(server_factory, [{"name": "default", "token": "token-one-0123456"},
                                         {"name": "fenced", "token": "token-two-0123456"}], **HB)
    start_client(tmp_path, logs, srv, "token-one-0123456")
    fenced = start_client(tmp_path, logs, srv, "token-two-0123456", "--allow", "127.0.0.1:1-100",
                          name="fenced")

    # Nothing listens on the target: the client's dial is refused.
    dead = free_port()
    port = map_tunnel(srv, dead)
    assert_closed_and_failed(srv, port, "target refused")
    srv.wait_log(rf"port {port}: target 127\.0\.0\.1:{dead} refused", timeout=2)
    wait_streams_drained(srv, port)

    # Outside --allow: status 2, and nothing is dialled.
    assert echo_backend.port > 100
    port2 = map_tunnel(srv, echo_backend.port, client="fenced")
    assert_closed_and_failed(srv, port2, "target not allowed")
    srv.wait_log(rf"port {port2}: target 127\.0\.0\.1:{echo_backend.port} not allowed",
                 timeout=2)
    fenced.wait_log(r"refused: not in --allow", timeout=2)
    assert echo_backend.accepted == 0, "the fenced client dialled a target outside --allow"
    wait_streams_drained(srv, port2, name="fenced")

    # The same backend through the unfenced client works: the refusal was the rule's.
    port3 = map_tunnel(srv, echo_backend.port)
    assert_echo(port3, "unfenced")
    assert echo_backend.accepted == 1


def test_target_failing_inside_connect_is_refused(server_factory, tmp_path, logs):
    """An IP the client's connect() rejects at once (no route to the broadcast address:
    ENETUNREACH before any packet is sent) ends the stream as refused, reported from the
    loop, and the client goes on serving."""
    srv, cli = tunnel_env(server_factory, tmp_path, logs, **HB)
    port = map_tunnel(srv, 9, target_ip="255.255.255.255", use_tunnel=True)
    assert_closed_and_failed(srv, port, "unreachable target")
    cli.wait_log(r"255\.255\.255\.255:9: Network is unreachable", timeout=2)
    wait_streams_drained(srv, port)
    assert_closed_and_failed(srv, port, "unreachable target, again")
    assert cli.popen.poll() is None


def _conn_id(fr, want_type):
    assert fr is not None, "tunnel closed"
    assert fr[0] == want_type, fr
    return struct.unpack(">I", fr[1][:4])[0]


def test_ok_crossing_the_servers_close_keeps_the_session(server_factory):
    """The server gives up on a stream (connect_timeout here; a remove or disable alike)
    while the client's ok and the target's first bytes are on their way: they cross the
    server's Close. They go with the stream; the session and its other streams live on."""
    srv = tunnel_server(server_factory, connect_timeout=1)
    t = socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5)
    t.sendall(hello("default", "tok-default-0123456789"))
    assert _frame_type(read_frame(t)) == T_HELLO_RESPONSE
    port_a, port_b = free_port(), free_port()
    srv.create_ok(port=port_a, target_ip="127.0.0.1", target_port=22, use_tunnel=True)
    srv.create_ok(port=port_b, target_ip="127.0.0.1", target_port=7, use_tunnel=True)
    pub_b = socket.create_connection(("127.0.0.1", port_b), timeout=5)
    cid_b = _conn_id(_skip_keepalives(t), 0x01)
    t.sendall(frame(0x02, struct.pack(">IB", cid_b, 0)) +
              frame(0x03, struct.pack(">I", cid_b) + b"hello B"))
    assert recv_exact(pub_b, 7) == b"hello B"

    pub_a = socket.create_connection(("127.0.0.1", port_a), timeout=5)
    cid_a = _conn_id(_skip_keepalives(t), 0x01)
    # No answer within connect_timeout: the server sends Close.
    assert _conn_id(_skip_keepalives(t, timeout=5), 0x04) == cid_a
    # The answer it crossed: ok, an SSH banner and the end, then our Close in reply.
    t.sendall(frame(0x02, struct.pack(">IB", cid_a, 0)) +
              frame(0x03, struct.pack(">I", cid_a) + b"SSH-2.0-OpenSSH_9.2\r\n") +
              frame(0x09, struct.pack(">I", cid_a)) +
              frame(0x04, struct.pack(">I", cid_a)))
    pub_a.settimeout(5)
    assert pub_a.recv(64) == b"", "the given-up connection got the late bytes"
    # Stream B still carries bytes both ways over the same session.
    pub_b.sendall(b"still here")
    fr = _skip_keepalives(t)
    assert _conn_id(fr, 0x03) == cid_b and fr[1][4:] == b"still here", fr
    t.sendall(frame(0x03, struct.pack(">I", cid_b) + b"so am I"))
    assert recv_exact(pub_b, 7) == b"so am I"
    assert client_count(srv) == 1
    assert not re.search(r"protocol error", srv.log_text()), "the session was dropped"
    for s in (pub_a, pub_b, t):
        s.close()


def _frame_type(fr):
    assert fr is not None, "tunnel closed"
    return fr[0]


def _skip_keepalives(t, timeout=5.0):
    """The next frame that is not a KeepAlive (answered as the client would)."""
    deadline = time.monotonic() + timeout
    while True:
        fr = read_frame(t, max(0.1, deadline - time.monotonic()))
        if fr is None or fr[0] != 0x05:
            return fr
        if fr[1]:
            t.sendall(frame(0x05, fr[1]))
        if time.monotonic() >= deadline:
            return None


WINDOW = 256 * 1024


def test_one_byte_of_window_is_one_byte_not_empty_frames(server_factory):
    """A stream whose send window is down to exactly 1 byte, with more to send: the
    server sends that byte and waits for a WindowUpdate. It used to send empty Data
    frames in a loop (about 100,000 per drain of the tunnel's output) at full CPU."""
    srv = tunnel_server(server_factory, connect_timeout=30)
    t = socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5)
    t.sendall(hello("default", "tok-default-0123456789"))
    assert _frame_type(read_frame(t)) == T_HELLO_RESPONSE
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9, use_tunnel=True)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as pub:
        cid = _conn_id(_skip_keepalives(t), 0x01)
        t.sendall(frame(0x02, struct.pack(">IB", cid, 0)))
        pub.sendall(b"a" * (WINDOW - 1))  # read by us, no window given back
        got = 0
        while got < WINDOW - 1:
            fr = _skip_keepalives(t)
            assert fr is not None, f"tunnel closed after {got} bytes"
            if fr[0] == 0x03:
                got += len(fr[1]) - 4
        assert got == WINDOW - 1
        pub.sendall(b"b" * 100)  # the window lets 1 through
        empty = payload = 0
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            fr = read_frame(t, timeout=0.5)
            if fr is None:
                break
            if fr[0] == 0x03:
                empty += len(fr[1]) == 4
                payload += len(fr[1]) - 4
        assert (empty, payload) == (0, 1), (empty, payload)
        # A WindowUpdate lets the rest through.
        t.sendall(frame(0x08, struct.pack(">II", cid, WINDOW)))
        while payload < 100:
            fr = _skip_keepalives(t)
            assert fr is not None and fr[0] in (0x03, 0x08), fr
            if fr[0] == 0x03:
                assert len(fr[1]) > 4, "an empty Data frame"
                payload += len(fr[1]) - 4
        assert payload == 100
    t.close()
