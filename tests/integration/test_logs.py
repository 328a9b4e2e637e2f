"""Log lines (issue 7): every line on stderr is `2026-01-01T12:00:00Z LEVEL module message`
in UTC; creates, client connects and refused connections each say so; debug adds each
connection's open/close with bytes and duration; log.level from the config file (and
--log-level over it) decides what is printed. Server and client alike."""
import calendar
import os
import re
import signal
import time

import pytest

from conftest import CLIENT_BIN, PortHolder, connect, free_port, wait_until
from tunnel_helpers import (client_proc, closed_within, echo_roundtrip, map_tunnel,
                            run_client, start_client, tunnel_server)

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

TOKEN = "tok-" + os.urandom(6).hex()
CLIENTS = [{"name": "default", "token": TOKEN}, {"name": "office", "token": TOKEN + "-o"}]

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"
LINE = re.compile(rf"^({TS}) (DEBUG|INFO|WARN|ERROR) ([a-z]+) (\S.*)$")
SERVER_MODULES = {"server", "store", "tunnel", "api", "mapping", "forward"}


def log_lines(proc):
    """The log's lines, without the '==== start' header Proc writes, and without the
    client's lines that are not log lines: its exit summary (stdout, which Proc logs too)
    and a fatal refusal, both "portmux-client: ..."."""
    return [ln for ln in proc.log_text().splitlines()
            if not ln.startswith(("==== start", "portmux-client: "))]


def parsed(proc):
    """(unix time, level, module, message) per line; fails on any malformed line."""
    out = []
    for ln in log_lines(proc):
        m = LINE.match(ln)
        assert m, f"{proc.name}: malformed log line {ln!r}"
        t = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ"))
        out.append((t, m.group(2), m.group(3), m.group(4)))
    return out


def wait_line(proc, level, module, message_rx, timeout=10.0, after=0):
    """Waits for a whole line LEVEL module <message matching message_rx>; returns the match."""
    return proc.wait_log(rf"(?m)^{TS} {level} {module} {message_rx}$", timeout, after)


def test_every_line_is_utc_level_module_message(server_factory, echo_backend, tmp_path, logs,
                                                monkeypatch):
    # A zone far from UTC: a local-time stamp would be 9 hours off.
    monkeypatch.setenv("TZ", "JST-9")
    t0 = time.time()
    srv = tunnel_server(server_factory, CLIENTS)
    cli = start_client(tmp_path, logs, srv, TOKEN)
    port = map_tunnel(srv, echo_backend.port)
    assert echo_roundtrip(port, b"ping") == b"ping"
    srv.create(port="bad")
    srv.remove(port)
    cli.send_signal(signal.SIGTERM)
    assert cli.wait(10) == 0
    assert srv.stop() == 0
    t1 = time.time()

    lines = parsed(srv.proc)
    assert len(lines) >= 8, lines
    for t, level, module, msg in lines:
        assert t0 - 2 <= t <= t1 + 2, f"timestamp not UTC or not now: {t} {level} {msg}"
        assert module in SERVER_MODULES, (module, msg)
    levels = {lv for _, lv, _, _ in lines}
    assert {"DEBUG", "INFO"} <= levels, levels
    for t, level, module, msg in parsed(cli):
        assert t0 - 2 <= t <= t1 + 2 and module == "client", (t, level, module, msg)


def test_create_connect_and_refusals_are_logged(server_factory, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    direct, tunneled, absent = free_port(), free_port(), free_port()
    srv.create_ok(port=direct, target_ip="127.0.0.1", target_port=9)
    wait_line(srv, "INFO", "api", rf"mapping created: port {direct} -> 127\.0\.0\.1:9")
    srv.create_ok(port=tunneled, target_port=22)
    wait_line(srv, "INFO", "api", rf"mapping created: port {tunneled} -> tunnel 127\.0\.0\.1:22")

    cli = start_client(tmp_path, logs, srv, TOKEN)
    wait_line(srv, "INFO", "tunnel", r'client "default" connected from 127\.0\.0\.1:\d+')
    wait_line(cli, "INFO", "client",
              rf'connected to 127\.0\.0\.1:{srv.tunnel_port} as "default"')

    # A connection to a mapping whose client is absent: refused, with the reason.
    srv.create_ok(port=absent, target_port=22, use_tunnel=True, client="office")
    mark = srv.log_mark()
    assert closed_within(absent, 5) is not None
    wait_line(srv, "DEBUG", "tunnel", rf'port {absent}: client "office" not connected',
              after=mark)
    wait_line(srv, "DEBUG", "mapping", rf"port {absent}: connection failed after \d+\.\d{{3}} s, "
              r"0 bytes in, 0 bytes out", after=mark)

    # A Hello with a wrong token.
    r = run_client(srv, "wrong-token", name="office")
    assert r.returncode == 2
    wait_line(srv, "WARN", "tunnel", r'tunnel from 127\.0\.0\.1:\d+: client "office" refused: '
              r"unknown name or wrong token")
    assert "wrong-token" not in srv.log_text()

    # Creating a port the OS will not bind.
    with PortHolder(free_port()) as held:
        assert srv.create(port=held.port, target_ip="127.0.0.1", target_port=9)[0] == 409
        wait_line(srv, "WARN", "api", rf"create port {held.port} refused: .*Address already in use")


def test_refused_writes_log_one_line_per_10_s(server):
    """A client that loops on a taken port decides how often "create port N refused" would
    be written: one line per 10 s, each refusal still answered."""
    with PortHolder(free_port()) as held:
        mark = server.log_mark()
        for _ in range(50):
            assert server.create(port=held.port, target_ip="127.0.0.1", target_port=9)[0] == 409
        wait_line(server, "WARN", "api", rf"create port {held.port} refused: .*", after=mark)
        time.sleep(0.3)
        lines = [ln for ln in server.log_text()[mark:].splitlines() if " refused: " in ln]
        assert len(lines) == 1, lines

def test_limit_refusal_is_logged(server_factory, echo_backend):
    srv = server_factory(config={"limits": {"max_connections_per_mapping": 1}})
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    with connect(port) as held:
        held.sendall(b"x")
        held.settimeout(5)
        assert held.recv(1) == b"x"
        mark = srv.log_mark()
        assert closed_within(port, 5) is not None
        wait_line(srv, "DEBUG", "mapping",
                  rf"port {port}: connection refused, 1 connections open \(limit\)", after=mark)


def test_debug_shows_each_connection_with_bytes_and_duration(server, echo_backend):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    mark = server.log_mark()
    payload = os.urandom(1000)
    assert echo_roundtrip(port, payload) == payload
    wait_line(server, "DEBUG", "mapping", rf"port {port}: connection opened \(1 active\)",
              after=mark)
    m = wait_line(server, "DEBUG", "mapping",
                  rf"port {port}: connection closed after (\d+\.\d{{3}}) s, "
                  r"1000 bytes in, 1000 bytes out", after=mark)
    assert 0 <= float(m.group(1)) < 10, m.group(0)


def test_log_level_from_config_file(server_factory, echo_backend):
    srv = server_factory(config={"log": {"level": "warn"}})
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert echo_roundtrip(port, b"quiet") == b"quiet"
    with PortHolder(free_port()) as held:
        assert srv.create(port=held.port, target_ip="127.0.0.1", target_port=9)[0] == 409
        wait_line(srv, "WARN", "api", rf"create port {held.port} refused: .*")
    levels = {lv for _, lv, _, _ in parsed(srv.proc)}
    assert levels == {"WARN"}, f"log.level warn printed {levels}:\n{srv.log_tail()}"

    info = server_factory(config={"log": {"level": "info"}})
    port = free_port()
    info.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert echo_roundtrip(port, b"info") == b"info"
    wait_line(info, "INFO", "api", rf"mapping created: port {port} -> .*")
    # The connection is over (its debug close line would be written by now).
    wait_until(lambda: (info.mapping(port) or {}).get("active_connections") == 0,
               desc="the connection to end")
    assert "DEBUG" not in {lv for _, lv, _, _ in parsed(info.proc)}, info.log_tail()


def test_log_level_flag_overrides_config(server_factory, echo_backend):
    srv = server_factory(config={"log": {"level": "error"}}, start=False)
    srv.proc.args += ["--log-level", "debug"]
    srv.start()
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert echo_roundtrip(port, b"loud") == b"loud"
    wait_line(srv, "DEBUG", "mapping", rf"port {port}: connection closed after .*")


def test_client_levels(server_factory, echo_backend, tmp_path, logs):
    srv = tunnel_server(server_factory, CLIENTS)
    # client_proc passes --log-level debug: each stream is logged.
    debug = start_client(tmp_path, logs, srv, TOKEN)
    port = map_tunnel(srv, echo_backend.port)
    assert echo_roundtrip(port, b"hi") == b"hi"
    wait_line(debug, "DEBUG", "client", rf"stream \d+: connected to 127\.0\.0\.1:{echo_backend.port}")

    # The default (info) prints no DEBUG line for the same traffic.
    quiet = client_proc(tmp_path, srv, TOKEN + "-o", name="office", log_name="quiet")
    quiet.args.remove("--log-level")
    quiet.args.remove("debug")
    logs.append(quiet)
    quiet.start()
    wait_line(quiet, "INFO", "client", r'connected to .* as "office"')
    port2 = map_tunnel(srv, echo_backend.port, client="office")
    assert echo_roundtrip(port2, b"hi") == b"hi"
    quiet.send_signal(signal.SIGTERM)
    assert quiet.wait(10) == 0
    assert "DEBUG" not in {lv for _, lv, _, _ in parsed(quiet)}, quiet.log_tail()
