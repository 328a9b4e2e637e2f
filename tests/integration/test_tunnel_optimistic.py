"""Optimistic data on the tunnel (issue 19 item 2, docs/PROTOCOL.md): a client whose Hello
says "optimistic": true gets a stream's first Data right after its ConnectRequest (the
PROXY header first), holds it until its dial completes and drops it if the dial fails; a
client that does not say so (an older one) gets no Data before its ConnectResponse.

The server side is driven by a raw-socket client speaking the protocol by hand, the
client side by a raw-socket tunnel server, and the whole path by the real binaries.
Only 127.0.0.1, free ports, every wait bounded by a deadline."""
import json
import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import CLIENT_BIN, Proc, connect, recv_exact, wait_until
from test_policy import parse_proxy_header
from tunnel_helpers import (client_info, echo_roundtrip, map_tunnel, start_client,
                            tunnel_server, wait_streams_drained)

TOKEN = "tok-default-0123456789"
CONNECT_REQUEST, CONNECT_RESPONSE, DATA, CLOSE, KEEPALIVE = 1, 2, 3, 4, 5
HELLO, HELLO_RESPONSE, WINDOW_UPDATE, SHUT_WRITE, NOTICE = 6, 7, 8, 9, 10
REQUEST = b"GET /early HTTP/1.0\r\nHost: portmux\r\n\r\n"


def frame(ftype, payload=b""):
    return struct.pack(">BBI", 1, ftype, len(payload)) + payload


def data_frame(conn_id, payload):
    return frame(DATA, struct.pack(">I", conn_id) + payload)


class FrameReader:
    """Frames off one socket, each read bounded by the deadline given."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n, deadline):
        while len(self.buf) < n:
            left = deadline - time.monotonic()
            assert left > 0, f"no frame in time (have {bytes(self.buf[:40])!r})"
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            assert chunk, "the peer closed the tunnel"
            self.buf += chunk

    def next_stream(self, timeout=10.0):
        """The next frame that is not a KeepAlive (the peer's heartbeat, answered)."""
        while True:
            ftype, payload = self.next(timeout)
            if ftype != KEEPALIVE:
                return ftype, payload
            if len(payload) == 8:
                self.sock.sendall(frame(KEEPALIVE, payload))

    def next(self, timeout=10.0):
        """(type, payload) of the next frame."""
        deadline = time.monotonic() + timeout
        self._fill(6, deadline)
        version, ftype, n = struct.unpack(">BBI", bytes(self.buf[:6]))
        assert version == 1 and n <= 65536 + 8, (version, ftype, n)
        self._fill(6 + n, deadline)
        payload = bytes(self.buf[6:6 + n])
        del self.buf[:6 + n]
        return ftype, payload


# ---------------------------------------------------------------------------
# The server's side: a raw-socket tunnel client

def raw_client(srv, optimistic):
    """A hand-written tunnel client, authenticated; returns (socket, FrameReader)."""
    s = connect(srv.tunnel_port)
    hello = {"name": "default", "token": TOKEN, "version": "0.0.1"}
    if optimistic:
        hello["optimistic"] = True
    s.sendall(frame(HELLO, json.dumps(hello).encode()))
    r = FrameReader(s)
    ftype, payload = r.next()
    assert ftype == HELLO_RESPONSE and json.loads(payload)["ok"] is True, payload
    return s, r


def frames_until_echo(s, r, token):
    """Sends a KeepAlive with token; returns the frames that came before its echo (other
    KeepAlives from the server are answered and left out)."""
    s.sendall(frame(KEEPALIVE, token))
    seen = []
    while True:
        ftype, payload = r.next()
        if ftype == KEEPALIVE:
            if payload == token:
                return seen
            if len(payload) == 8:
                s.sendall(frame(KEEPALIVE, payload))
            continue
        seen.append((ftype, payload))


def stream_bytes(frames, conn_id):
    """The Data payload of conn_id in frames, in order; asserts nothing else is there."""
    out = b""
    for ftype, payload in frames:
        assert ftype == DATA, (ftype, payload)
        assert struct.unpack(">I", payload[:4])[0] == conn_id, payload
        out += payload[4:]
    return out


@pytest.mark.parametrize("optimistic", [False, True], ids=["old-client", "optimistic-client"])
def test_data_before_connect_response_only_when_announced(server_factory, optimistic):
    """The public client speaks first. An older client (no "optimistic" in its Hello) sees
    nothing but its ConnectRequest until it answers, then the PROXY header and the request;
    one that announced it gets both right after the ConnectRequest, header first."""
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}])
    s, r = raw_client(srv, optimistic)
    with s:
        port = map_tunnel(srv, 9, proxy_protocol="v1")
        with connect(port) as pub:
            pub.sendall(REQUEST)
            ftype, payload = r.next_stream()
            assert ftype == CONNECT_REQUEST, (ftype, payload)
            conn_id, target_port = struct.unpack(">IH", payload[:6])
            assert target_port == 9
            # Two echo round trips: the request was in the server's socket before the
            # first KeepAlive left, so Data sent ahead is queued before the second echo.
            before = frames_until_echo(s, r, b"probe--1")
            before += frames_until_echo(s, r, b"probe--2")
            early = stream_bytes(before, conn_id)
            s.sendall(frame(CONNECT_RESPONSE, struct.pack(">IB", conn_id, 0)))
            if optimistic:
                hdr = parse_proxy_header(early)
                assert hdr and hdr[1] == "TCP4" and hdr[5] == port, early
                assert early[hdr[-1]:] == REQUEST, early
            else:
                assert early == b"", f"Data before the ConnectResponse: {early!r}"
                late = b""
                while True:
                    got = stream_bytes([r.next_stream()], conn_id)
                    late += got
                    hdr = parse_proxy_header(late)
                    if hdr and len(late) >= hdr[-1] + len(REQUEST):
                        break
                assert hdr[1] == "TCP4" and late[hdr[-1]:] == REQUEST, late
            # The answer goes back as before.
            s.sendall(data_frame(conn_id, b"HTTP/1.0 200 OK\r\n\r\nearly"))
            s.sendall(frame(CLOSE, struct.pack(">I", conn_id)))
            pub.settimeout(10)
            got = b""
            while True:
                chunk = pub.recv(4096)
                if not chunk:
                    break
                got += chunk
            assert got == b"HTTP/1.0 200 OK\r\n\r\nearly"
    assert srv.running()


def test_early_data_within_the_window(server_factory):
    """A public client sends more than a stream's window before the client answers: the
    server sends exactly one window (256 KiB) ahead, the rest once the answer and the
    client's WindowUpdate come; every byte arrives, in order."""
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}])
    s, r = raw_client(srv, True)
    blob = os.urandom(600 * 1024)
    with s:
        port = map_tunnel(srv, 9)
        with connect(port) as pub:
            sender = threading.Thread(target=pub.sendall, args=(blob,), daemon=True)
            sender.start()
            ftype, payload = r.next_stream()
            assert ftype == CONNECT_REQUEST
            conn_id = struct.unpack(">I", payload[:4])[0]
            early = b""
            while len(early) < 256 * 1024:
                early += stream_bytes([r.next_stream()], conn_id)
            assert early == blob[:256 * 1024]
            # Nothing beyond the window until the answer.
            assert stream_bytes(frames_until_echo(s, r, b"window-1"), conn_id) == b""
            s.sendall(frame(CONNECT_RESPONSE, struct.pack(">IB", conn_id, 0)) +
                      frame(WINDOW_UPDATE, struct.pack(">II", conn_id, len(blob))))
            rest = b""
            while len(early) + len(rest) < len(blob):
                rest += stream_bytes([r.next_stream()], conn_id)
            assert early + rest == blob
            sender.join(10)
    assert srv.running()


# ---------------------------------------------------------------------------
# The whole path: portmux-server, portmux-client, a target

class SlowAcceptTarget:
    """A target whose accept queue is full when the tunnel client dials: the kernel drops
    the dial's SYN and the client's TCP retries it about a second later, so whatever the
    server sends ahead is certainly held by the client first. Records what each
    connection sent up to the end of the HTTP request, and answers it."""

    ANSWER = b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nfirst\n"

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        wait_until(lambda: self._queued() >= 1, timeout=5, desc="the accept queue to fill")
        self.received = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _queued(self):
        out = subprocess.run(["ss", "-Hltn", f"sport = :{self.port}"], capture_output=True,
                             text=True, timeout=10).stdout.split()
        return int(out[1]) if len(out) > 1 else 0

    def start_after_dial(self):
        """Starts accepting once the client's dial waits in SYN-SENT: its first SYN met
        the full queue (on loopback the SYN is handled inside connect())."""
        def syn_sent():
            out = subprocess.run(["ss", "-Htn", "state", "syn-sent",
                                  f"dport = :{self.port}"], capture_output=True, text=True,
                                 timeout=10).stdout
            return out.strip() != ""
        wait_until(syn_sent, timeout=10, desc="the client's dial to wait in SYN-SENT")
        self.thread.start()

    def _run(self):
        self.sock.settimeout(20)
        filler, _ = self.sock.accept()  # the queue has room again: the retried SYN gets in
        filler.close()
        c, _ = self.sock.accept()
        with c:
            c.settimeout(10)
            got = b""
            while b"\r\n\r\n" not in got:
                chunk = c.recv(4096)
                if not chunk:
                    break
                got += chunk
            self.received.append(got)
            c.sendall(self.ANSWER)

    def close(self):
        self.filler.close()
        self.sock.close()


def test_early_data_reaches_the_target_byte_exact(server_factory, tmp_path, logs):
    """An HTTP GET through the tunnel while the client's dial is slow: the PROXY header and
    the request the server sent ahead are held by the client and written to the target
    first, byte for byte; the answer comes back whole."""
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}])
    cli = start_client(tmp_path, logs, srv, TOKEN)
    target = SlowAcceptTarget()
    try:
        port = map_tunnel(srv, target.port, proxy_protocol="v1")
        mark = cli.log_mark()
        with connect(port) as pub:
            pub.sendall(REQUEST)
            target.start_after_dial()
            got = recv_exact(pub, len(SlowAcceptTarget.ANSWER), timeout=20)
            assert got == SlowAcceptTarget.ANSWER
        target.thread.join(10)
        sent = target.received[0]
        hdr = parse_proxy_header(sent)
        assert hdr and hdr[1] == "TCP4" and hdr[4:6] == ("127.0.0.1", port), sent
        assert sent[hdr[-1]:] == REQUEST, sent
        # All of it was held while the dial waited for the SYN's retry.
        m = cli.wait_log(r"stream (\d+): connected to 127\.0\.0\.1:%d\n.*stream \1: (\d+) "
                         r"bytes sent ahead written first" % target.port, after=mark)
        assert int(m.group(2)) == len(sent), cli.log_tail()
        wait_streams_drained(srv, port)
    finally:
        target.close()
    assert (srv.mapping(port) or {}).get("failed_connections") == 0


@pytest.mark.parametrize("size", [18, 1 << 20])
def test_client_speaks_first_echo_byte_exact(server_factory, tmp_path, logs, echo_backend,
                                              size):
    """Client-speaks-first traffic of every size (a request, then more than the window)
    through a real client to an echo target: byte-exact both ways, the stream closed."""
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}])
    start_client(tmp_path, logs, srv, TOKEN)
    port = map_tunnel(srv, echo_backend.port)
    blob = os.urandom(size)
    for _ in range(3):
        assert echo_roundtrip(port, blob, timeout=20) == blob
    wait_streams_drained(srv, port)
    m = srv.mapping(port)
    assert m["failed_connections"] == 0 and m["total_connections"] == 3, m


def test_failed_dial_drops_early_data(server_factory, tmp_path, logs, echo_backend):
    """The target refuses: the request sent ahead goes with the stream. The public
    connection is closed, the connection counted failed, nothing crashes, and the same
    session carries the next stream."""
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}])
    cli = start_client(tmp_path, logs, srv, TOKEN)
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        port = map_tunnel(srv, dead.getsockname()[1])
        with connect(port) as pub:
            pub.sendall(REQUEST)
            pub.settimeout(10)
            try:
                assert pub.recv(4096) == b""
            except ConnectionResetError:
                pass
        m = wait_until(lambda: (lambda x: x if x["failed_connections"] == 1 else None)(
            srv.mapping(port)), timeout=10, desc="the connection counted failed")
        assert m["active_connections"] == 0 and m["total_connections"] == 1, m
        cli.wait_log(r"stream \d+: 127\.0\.0\.1:%d: Connection refused" %
                     dead.getsockname()[1], timeout=10)
    finally:
        dead.close()
    assert srv.running() and cli.running()
    assert client_info(srv)["streams"] == 0
    ok = map_tunnel(srv, echo_backend.port)
    assert echo_roundtrip(ok, b"still fine") == b"still fine"


# ---------------------------------------------------------------------------
# The client's side: a raw-socket tunnel server

class FakeTunnelServer:
    """Accepts one portmux-client, checks its Hello and welcomes it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]

    def accept(self):
        c, _ = self.sock.accept()
        r = FrameReader(c)
        ftype, payload = r.next()
        assert ftype == HELLO, (ftype, payload)
        self.hello = json.loads(payload)
        c.sendall(frame(HELLO_RESPONSE, b'{"ok":true,"message":"welcome, default"}'))
        return c, r

    def close(self):
        self.sock.close()


def test_client_holds_early_data_and_drops_it_with_a_refusal(tmp_path, logs, echo_backend):
    """portmux-client announces "optimistic": true; Data that comes with the
    ConnectRequest is written to the target first once the dial completes; with a refused
    dial it is dropped, and Data that crossed the refusal is no protocol error."""
    fake = FakeTunnelServer()
    cli = Proc([CLIENT_BIN, "--server", f"127.0.0.1:{fake.port}", "--token", TOKEN,
                "--name", "default", "--log-level", "debug", "--no-reconnect"],
               tmp_path / "client-fake.log", name="client-fake")
    logs.append(cli)
    cli.start()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    try:
        s, r = fake.accept()
        with s:
            assert fake.hello.get("optimistic") is True, fake.hello
            # Refused, with the request already sent: dropped; then Data crossing the
            # refusal, then a KeepAlive whose echo shows the tunnel is still up.
            s.sendall(frame(CONNECT_REQUEST, struct.pack(">IH", 7, dead.getsockname()[1])) +
                      data_frame(7, REQUEST))
            ftype, payload = r.next_stream()
            assert (ftype, payload) == (CONNECT_RESPONSE, struct.pack(">IB", 7, 1)), payload
            s.sendall(data_frame(7, b"crossed the refusal"))
            assert frames_until_echo(s, r, b"alive-01") == []
            cli.wait_log(r"stream 7: 127\.0\.0\.1:%d: Connection refused \(%d bytes sent "
                         r"ahead dropped\)" % (dead.getsockname()[1], len(REQUEST)))
            # Accepted: the bytes held while dialling reach the target first, in order.
            blob = os.urandom(100 * 1024)
            s.sendall(frame(CONNECT_REQUEST, struct.pack(">IH", 8, echo_backend.port)) +
                      data_frame(8, REQUEST) + data_frame(8, blob[:65536]) +
                      data_frame(8, blob[65536:]))
            ftype, payload = r.next_stream()
            assert (ftype, payload) == (CONNECT_RESPONSE, struct.pack(">IB", 8, 0)), payload
            cli.wait_log(r"stream 8: connected to 127\.0\.0\.1:%d\n.*stream 8: \d+ bytes "
                         r"sent ahead written first" % echo_backend.port)
            s.sendall(frame(SHUT_WRITE, struct.pack(">I", 8)))
            back = b""
            while True:
                ftype, payload = r.next()
                if ftype == KEEPALIVE:
                    continue
                if ftype == SHUT_WRITE:
                    break
                if ftype == WINDOW_UPDATE:
                    continue
                assert ftype == DATA, (ftype, payload)
                back += stream_bytes([(ftype, payload)], 8)
            assert back == REQUEST + blob
        assert cli.wait(10) is not None  # the tunnel closed: --no-reconnect ends it
    finally:
        dead.close()
        fake.close()
