"""portmux-client's live status (issue 7). On a terminal -- a pseudo-terminal from
script(1) of a known size -- the client keeps a block at the bottom of the screen
(scroll region above it for the log lines): the server, the session state, RTT, and
`Forwarding  tcp://HOST:PUBLIC_PORT → TARGET` with active streams and bytes; on SIGTERM
the block goes and a summary line stays. With stdout on a pipe (or TERM=dumb) nothing
but the summary is printed on stdout. Real server, real client, real bytes."""
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import CLIENT_BIN, connect, free_port, wait_until
from tunnel_helpers import client_count, echo_roundtrip, tunnel_server, wait_status

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

TOKEN = "tok-" + os.urandom(6).hex()
CLIENTS = [{"name": "default", "token": TOKEN}]
ROWS, COLS = 30, 150

# Escape sequences the block uses: CSI ... letter, DECSC (ESC 7), DECRC (ESC 8).
ANSI = re.compile(rb"\x1b(?:\[[0-9;?]*[A-Za-z]|[78])")
# One row of the block: cursor to ROW;1, erase the line, then the row's text.
ROW = re.compile(rb"\x1b\[(\d+);1H\x1b\[2K([^\x1b]*)")
SUMMARY = (r"portmux-client: up \d+s, (\d+) streams? served, (\d+) bytes in(?: \([^)]*\))?, "
           r"(\d+) bytes out(?: \([^)]*\))?")


class TtyClient:
    """portmux-client on a ROWS x COLS pseudo-terminal (script -q -e -c ... /dev/null).
    Everything written to the terminal lands in out_path; the client's own pid is written
    by the shell before it execs the client."""

    def __init__(self, proc_factory, tmp_path, srv, *extra, term="xterm", name="tty"):
        self.pid_path = Path(tmp_path) / f"{name}.pid"
        args = [str(CLIENT_BIN), "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", TOKEN,
                "--heartbeat-interval", "1", *extra]
        cmd = (f"stty rows {ROWS} cols {COLS}; echo $$ > {shlex.quote(str(self.pid_path))}; "
               f"exec {shlex.join(args)}")
        env = dict(os.environ, TERM=term, LC_ALL="C.UTF-8")
        self.proc = proc_factory(["script", "-q", "-e", "-c", cmd, "/dev/null"], name, env=env)

    def raw(self):
        data = self.proc.log_path.read_bytes()
        return data[data.index(b"\n") + 1:]  # past Proc's "==== start" line

    def rows(self):
        """The block as last drawn: {row number: text}."""
        screen = {}
        for row, text in ROW.findall(self.raw()):
            screen[int(row)] = text.decode("utf-8", errors="replace")
        return screen

    def wait_row(self, pattern, timeout=10.0):
        rx = re.compile(pattern)

        def found():
            return next((t for t in self.rows().values() if rx.search(t)), None)
        return wait_until(found, timeout=timeout, desc=f"a status row matching {pattern!r}")

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        pid = int(wait_until(lambda: self.pid_path.exists() and self.pid_path.read_text()
                             .strip(), desc="the client's pid"))
        os.kill(pid, sig)
        return self.proc.wait(timeout)


def test_block_on_a_terminal(server_factory, echo_backend, proc_factory, tmp_path):
    srv = tunnel_server(server_factory, CLIENTS, heartbeat_interval=1)
    port = free_port()
    # Created before the client connects: the HelloResponse announces it.
    srv.create_ok(port=port, target_port=echo_backend.port)
    tty = TtyClient(proc_factory, tmp_path, srv)
    wait_until(lambda: client_count(srv) == 1, desc="the client to connect")

    forwarding = tty.wait_row(
        rf"^Forwarding  tcp://127\.0\.0\.1:{port} → 127\.0\.0\.1:{echo_backend.port} ")
    assert "active 0  total 0  in 0 B  out 0 B" in forwarding, forwarding
    tty.wait_row(r"^Session     connected for \d+s, RTT \d+\.\d\d ms$")
    header = tty.wait_row(r"portmux-client")
    assert f"server 127.0.0.1:{srv.tunnel_port} as \"default\"" in header, header
    # What the server says about this client (issue 15): its source and counts.
    assert '"default" (source config, takeovers 0, refused 0)' in header, header

    # The block sits on the last rows; the rows above scroll (the log lines go there).
    raw = tty.raw()
    assert f"\x1b[1;{ROWS - 3}r".encode() in raw, raw[:400]
    assert set(tty.rows()) == {ROWS - 2, ROWS - 1, ROWS}, tty.rows()
    log_part = ANSI.sub(b"", raw).decode(errors="replace")
    assert re.search(r'INFO client connected to 127\.0\.0\.1:\d+ as "default"', log_part), \
        log_part

    payload = os.urandom(2048)
    assert echo_roundtrip(port, payload) == payload
    tty.wait_row(rf"→ 127\.0\.0\.1:{echo_backend.port} +active 0  total 1  "
                 r"in 2\.0 KiB  out 2\.0 KiB$")

    # A mapping created after the session began: the server's Notice announces its public
    # port (issue 17); a target that refuses is counted as failed.
    dead = free_port()
    late = free_port()
    srv.create_ok(port=late, target_port=dead)
    wait_status(srv, late, "listening")
    with connect(late) as s:
        s.settimeout(5)
        assert s.recv(1) == b""
    tty.wait_row(rf"^Forwarding  tcp://127\.0\.0\.1:{late} → 127\.0\.0\.1:{dead} +active 0  total 0  "
                 r"in 0 B  out 0 B  failed 1 \(Connection refused\)$")
    assert set(tty.rows()) >= {ROWS - 3, ROWS - 2, ROWS - 1, ROWS}

    assert tty.stop() == 0
    raw = tty.raw()
    text = ANSI.sub(b"", raw).decode(errors="replace")
    m = re.search(SUMMARY, text)
    assert m, text[-600:]
    assert m.groups() == ("1", "2048", "2048"), m.group(0)
    # The block was taken down (scroll region reset, its rows erased) before the summary.
    assert raw.rfind(b"\x1b[r") < raw.rfind(b"portmux-client: up"), raw[-400:]
    assert re.search(rb"\x1b\[r(\x1b\[\d+;1H\x1b\[2K)+\x1b8portmux-client: up", raw), raw[-300:]


def test_reconnecting_and_refused_states(server_factory, proc_factory, tmp_path):
    srv = tunnel_server(server_factory, CLIENTS)
    tty = TtyClient(proc_factory, tmp_path, srv)
    tty.wait_row(r"^Session     connected for")
    tty.wait_row(r'^Forwarding  nothing yet: no tunnel mapping for "default"')
    assert srv.stop() == 0
    tty.wait_row(r"^Session     reconnecting in \d+\.\d s \(attempt \d+\)")
    srv.start()
    wait_until(lambda: client_count(srv) == 1, timeout=20, desc="the client to come back")
    tty.wait_row(r"^Session     connected for")
    assert tty.stop(signal.SIGINT) == 0

    refused = TtyClient(proc_factory, tmp_path, srv, "--name", "nobody", name="refused")
    assert refused.proc.wait(20) == 2
    rows = [t for _, t in ROW.findall(refused.raw())]
    assert any(t.decode().startswith('Session     refused: server refused: authentication '
                                     'failed for client "nobody"') for t in rows), rows
    assert re.search(SUMMARY, ANSI.sub(b"", refused.raw()).decode()), refused.raw()[-300:]


def test_no_block_when_stdout_is_a_pipe(server_factory, echo_backend, tmp_path):
    srv = tunnel_server(server_factory, CLIENTS)
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port)
    args = [str(CLIENT_BIN), "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", TOKEN]
    env = dict(os.environ, TERM="xterm", LC_ALL="C.UTF-8")
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        wait_until(lambda: p.poll() is not None or client_count(srv) == 1,
                   desc="the client to connect")
        payload = os.urandom(5000)
        assert echo_roundtrip(port, payload) == payload
        wait_until(lambda: srv.mapping(port)["active_connections"] == 0,
                   desc="the stream to end")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=10)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert b"\x1b" not in out and b"\x1b" not in err, (out, err)
    lines = out.decode().splitlines()
    assert len(lines) == 1 and re.fullmatch(SUMMARY, lines[0]), out
    assert re.fullmatch(SUMMARY, lines[0]).groups() == ("1", "5000", "5000"), lines[0]
    assert re.search(rb'INFO client connected to 127\.0\.0\.1:\d+ as "default"', err), err


def test_no_block_on_a_dumb_terminal(server_factory, proc_factory, tmp_path):
    srv = tunnel_server(server_factory, CLIENTS)
    tty = TtyClient(proc_factory, tmp_path, srv, term="dumb")
    wait_until(lambda: client_count(srv) == 1, desc="the client to connect")
    tty.proc.wait_log(r"INFO client connected to")
    assert tty.stop() == 0
    raw = tty.raw()
    assert b"\x1b" not in raw, raw
    assert re.search(SUMMARY, raw.decode()), raw


def test_block_follows_mapping_changes(server_factory, echo_backend, proc_factory, tmp_path):
    """The server sends a Notice when the client's mappings change (create, update,
    disable/enable, remove): the block adds, changes and drops rows without a reconnect."""
    srv = tunnel_server(server_factory, CLIENTS)
    tty = TtyClient(proc_factory, tmp_path, srv)
    wait_until(lambda: client_count(srv) == 1, desc="the client to connect")
    tty.wait_row(r'^Forwarding  nothing yet: no tunnel mapping for "default"')
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port)
    row = rf"^Forwarding  tcp://127\.0\.0\.1:{port} → 127\.0\.0\.1:{echo_backend.port} "
    tty.wait_row(row)
    payload = os.urandom(1000)
    assert echo_roundtrip(port, payload) == payload
    tty.wait_row(row + r"+active 0  total 1 ")

    def update(**fields):
        status, _, body = srv.api("POST", "/api/mapping/update", body={"port": port, **fields})
        assert status == 200, body

    other = free_port()
    update(target_port=other)
    tty.wait_row(rf"^Forwarding  tcp://127\.0\.0\.1:{port} → 127\.0\.0\.1:{other} ")
    # The old target's row went with the change (nothing uses it any more).
    wait_until(lambda: not any(f":{echo_backend.port} " in t for t in tty.rows().values()),
               desc="the old target's row to go")
    update(enabled=False)
    tty.wait_row(r'^Forwarding  nothing yet: no tunnel mapping for "default"')
    update(enabled=True)
    tty.wait_row(rf"^Forwarding  tcp://127\.0\.0\.1:{port} → 127\.0\.0\.1:{other} ")
    assert srv.remove(port)[0] == 200
    tty.wait_row(r'^Forwarding  nothing yet: no tunnel mapping for "default"')
    assert client_count(srv) == 1, "a Notice must not cost the session"
    assert tty.stop() == 0
    text = ANSI.sub(b"", tty.raw()).decode(errors="replace")
    m = re.search(SUMMARY, text)
    # The hidden row's stream still counts in the exit summary.
    assert m and m.groups() == ("1", "1000", "1000"), text[-600:]
