"""Helpers for the security, TLS and crash-safety integration tests.

Built on conftest (Server, Proc, free_port, wait_until); nothing here changes the shared
fixtures. Contents:

* ``raw_exchange``      -- bytes in, bytes out over one TCP connection, bounded in time;
                           tells a reply from a close and a reset.
* ``start_server``      -- starts a Server whose /health is not 200 from 127.0.0.1 (token
                           irrelevant, but allowed_ips or an IPv6 API), waiting on a
                           predicate instead.
* ``metric``            -- one sample out of Prometheus text.
* ``make_pki``          -- a CA, a server certificate for 127.0.0.1/localhost, a client CA
                           and a client certificate, another CA, made with the openssl CLI.
* ``frame``/``hello``   -- tunnel frames (SPEC §4) written by hand.
* ``client_proc``       -- a ``portmux-client`` Proc.
* ``flood``             -- many connections sending random bytes, a bounded pool at a time,
                           driven by one selector (no thread per socket).
"""
import http.client
import json
import os
import random
import re
import selectors
import socket
import struct
import subprocess
import time
from pathlib import Path

from conftest import CLIENT_BIN, Proc, wait_until

# ---------------------------------------------------------------------------
# HTTP


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def assert_envelope_failure(status, headers, body, want_status, want_error):
    """The failure envelope of SPEC §3: JSON, success false, the error code, no data."""
    assert status == want_status, f"status {status} (want {want_status}): {body!r}"
    ctype = headers.get("Content-Type", "")
    assert ctype.split(";")[0].strip() == "application/json", f"Content-Type {ctype!r}"
    assert isinstance(body, dict), f"body is not a JSON object: {body!r}"
    assert body.get("success") is False, body
    assert body.get("error") == want_error, body
    assert isinstance(body.get("message"), str) and body["message"].strip(), body
    assert "data" not in body, body


class RawResult:
    """What one raw exchange saw: the bytes, and how it ended.

    ended: "eof" (peer closed), "reset" (RST), "timeout" (still open at the deadline),
    "refused" (connect refused)."""

    def __init__(self, data, ended, elapsed):
        self.data = data
        self.ended = ended
        self.elapsed = elapsed

    @property
    def status(self):
        """The HTTP status of the first response line, or None."""
        m = re.match(rb"HTTP/1\.[01] (\d{3}) ", self.data)
        return int(m.group(1)) if m else None

    def json_body(self):
        head, _, body = self.data.partition(b"\r\n\r\n")
        try:
            return json.loads(body.decode("utf-8", errors="replace"))
        except ValueError:
            return None

    def __repr__(self):
        return f"RawResult(ended={self.ended}, {self.elapsed:.2f}s, {self.data[:200]!r})"


def raw_exchange(port, data, host="127.0.0.1", timeout=5.0, shut_wr=False, until=None):
    """Connects, sends data (as far as the peer takes it), reads until EOF, reset, the
    deadline, or until(bytes_so_far) is true. Never raises for network errors."""
    t0 = time.monotonic()
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(timeout)
    got = bytearray()
    try:
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return RawResult(b"", "refused", time.monotonic() - t0)
        try:
            if data:
                s.sendall(data)
            if shut_wr:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the peer gave up on us early; what it sent is still readable
        except socket.timeout:
            pass  # the peer stopped reading; see what it answered
        deadline = t0 + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return RawResult(bytes(got), "timeout", time.monotonic() - t0)
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                return RawResult(bytes(got), "timeout", time.monotonic() - t0)
            except ConnectionResetError:
                return RawResult(bytes(got), "reset", time.monotonic() - t0)
            if not chunk:
                return RawResult(bytes(got), "eof", time.monotonic() - t0)
            got += chunk
            if until is not None and until(bytes(got)):
                return RawResult(bytes(got), "until", time.monotonic() - t0)
    finally:
        s.close()


def http_complete(buf):
    """until= predicate: one whole HTTP response (Content-Length framed) has arrived."""
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return m is not None and len(body) >= int(m.group(1))


# ---------------------------------------------------------------------------
# Servers the stock Server.start() cannot wait for


def start_server(srv, ready, timeout=10.0):
    """Starts srv's process and waits for ready() (instead of /health 200 on 127.0.0.1)."""
    srv.proc.start()

    def up():
        rc = srv.proc.poll()
        assert rc is None, f"{srv.name} exited {rc} at start-up:\n{srv.log_tail()}"
        try:
            return ready()
        except (OSError, http.client.HTTPException):
            return False

    wait_until(up, timeout=timeout, desc=f"{srv.name} to answer")
    return srv


# ---------------------------------------------------------------------------
# Prometheus text

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)\s*$')


def metric(text, name, **labels):
    """The value of the sample name{labels...} (a subset match), or None when absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == str(v) for k, v in labels.items()):
            return float(m.group(3))
    return None


# ---------------------------------------------------------------------------
# Certificates


def _openssl(args, cwd):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr.decode(errors='replace')}"


def _make_ca(d, name, cn):
    _openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "30",
              "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"], d)


def _make_leaf(d, name, cn, ca, ext, days=30):
    """A leaf valid for `days` (the server warns about one that ends within 14)."""
    (d / f"{name}.ext").write_text(ext)
    _openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
              "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}"], d)
    _openssl(["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
              "-set_serial", str(random.getrandbits(63)), "-days", str(days), "-out", f"{name}.pem",
              "-extfile", f"{name}.ext"], d)


def make_pki(d):
    """Writes certificates into directory d; returns a dict name -> Path.

    ca / server: the tunnel's CA and its leaf for IP 127.0.0.1 and DNS localhost.
    client_ca / client: the CA that mutual TLS trusts and a client leaf signed by it.
    other_ca / rogue_client: an unrelated CA and a client leaf it signed.
    """
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    _make_ca(d, "ca", "portmux test CA")
    _make_ca(d, "client_ca", "portmux test client CA")
    _make_ca(d, "other_ca", "some other CA")
    _make_leaf(d, "server", "localhost", "ca",
               "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
               "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _make_leaf(d, "client", "default", "client_ca",
               "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
               "extendedKeyUsage=clientAuth\n")
    _make_leaf(d, "rogue_client", "default", "other_ca",
               "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
               "extendedKeyUsage=clientAuth\n")
    out = {}
    for n in ("ca", "client_ca", "other_ca", "server", "client", "rogue_client"):
        out[n] = d / f"{n}.pem"
        out[n + "_key"] = d / f"{n}.key"
    return out


# ---------------------------------------------------------------------------
# Tunnel frames (SPEC §4), for tests that speak the protocol by hand

T_HELLO = 0x06
T_HELLO_RESPONSE = 0x07


def frame(ftype, payload=b"", version=1, length=None):
    n = len(payload) if length is None else length
    return bytes([version, ftype]) + struct.pack(">I", n) + payload


def hello(name, token, version="test"):
    return frame(T_HELLO, json.dumps({"name": name, "token": token, "version": version}).encode())


def read_frame(sock, timeout=5.0):
    """One frame (type, payload) from sock, or None on EOF/reset/timeout."""
    sock.settimeout(timeout)
    buf = bytearray()
    try:
        while len(buf) < 6:
            c = sock.recv(6 - len(buf))
            if not c:
                return None
            buf += c
        n = struct.unpack(">I", bytes(buf[2:6]))[0]
        if n > 65536 + 8:
            return None
        body = bytearray()
        while len(body) < n:
            c = sock.recv(n - len(body))
            if not c:
                return None
            body += c
        return buf[1], bytes(body)
    except (socket.timeout, ConnectionResetError):
        return None


# ---------------------------------------------------------------------------
# portmux-client


def client_proc(log_dir, server_port, token, *extra, name="client", host="127.0.0.1"):
    """A portmux-client Proc (not started) for --server host:server_port --token token."""
    args = [CLIENT_BIN, "--server", f"{host}:{server_port}", "--token", token, *extra]
    return Proc(args, Path(log_dir) / f"{name}.log", name=name)


# ---------------------------------------------------------------------------
# Flood


class FloodStats:
    def __init__(self):
        self.started = 0
        self.connected = 0
        self.refused = 0
        self.reset = 0
        self.peer_closed = 0
        self.gave_up = 0      # still open after its short wait: we closed it
        self.replies = 0      # connections that got at least one byte back

    def __repr__(self):
        return (f"FloodStats(started={self.started}, connected={self.connected}, "
                f"refused={self.refused}, reset={self.reset}, peer_closed={self.peer_closed}, "
                f"gave_up={self.gave_up}, replies={self.replies})")


def _payload(rng, kind):
    n = rng.randrange(0, 4097)
    if kind == "tunnel" and rng.random() < 0.5:
        # Looks like a frame header (right version, some type, some length) then junk, so
        # the decoder goes past its first check.
        ftype = rng.choice([0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09,
                            rng.randrange(256)])
        length = rng.choice([0, 1, 5, n, 65544, 65545, 0xFFFFFFFF, rng.getrandbits(32)])
        return frame(ftype, rng.randbytes(n), length=length)
    if kind == "http" and rng.random() < 0.3:
        method = rng.choice([b"GET", b"POST", b"PUT", b"\x00\xff", b"G" * 300])
        path = rng.choice([b"/health", b"/api/mapping/create", b"/", b"/%00", b"*"])
        return method + b" " + path + b" HTTP/1.1\r\n" + rng.randbytes(n)
    return rng.randbytes(n)


def flood(targets, total, concurrency=200, seed=1, wait_close=0.3, deadline_s=120.0):
    """Opens total connections spread over targets [(host, port, kind)], at most
    concurrency at once. Each sends 0-4 KiB of random bytes, then one of: close at once,
    close with RST, or half-close and wait up to wait_close seconds for the peer to close.
    Returns FloodStats. kind is "tunnel", "http" or "raw" (shapes the random bytes)."""
    rng = random.Random(seed)
    sel = selectors.DefaultSelector()
    st = FloodStats()
    live = {}
    t_end = time.monotonic() + deadline_s

    def finish(sock, how):
        sel.unregister(sock)
        live.pop(sock, None)
        try:
            if how == "rst":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        sock.close()

    def open_one():
        host, port, kind = targets[st.started % len(targets)]
        st.started += 1
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        # RST on close is most of the mix: it also keeps the flood from filling the
        # ephemeral port range with TIME_WAIT sockets that other tests need.
        r = rng.random()
        ending = "close" if r < 0.2 else "rst" if r < 0.7 else "wait"
        state = {"data": memoryview(_payload(rng, kind)), "ending": ending, "phase": "connect",
                 "until": None}
        err = s.connect_ex((host, port))
        if err not in (0, 115):  # EINPROGRESS
            st.refused += 1
            s.close()
            return
        live[s] = state
        sel.register(s, selectors.EVENT_WRITE, state)

    while (st.started < total or live) and time.monotonic() < t_end:
        while st.started < total and len(live) < concurrency:
            open_one()
        now = time.monotonic()
        for sock, state in list(live.items()):
            if state["until"] is not None and now > state["until"]:
                st.gave_up += 1
                finish(sock, "rst")
        for key, ev in sel.select(0.05):
            sock, state = key.fileobj, key.data
            if sock not in live:
                continue
            try:
                if state["phase"] == "connect":
                    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        st.refused += 1
                        finish(sock, "close")
                        continue
                    st.connected += 1
                    state["phase"] = "send"
                if state["phase"] == "send":
                    if state["data"]:
                        n = sock.send(state["data"])
                        state["data"] = state["data"][n:]
                    if not state["data"]:
                        if state["ending"] != "wait":
                            finish(sock, state["ending"])
                            continue
                        sock.shutdown(socket.SHUT_WR)
                        state["phase"] = "wait"
                        state["until"] = time.monotonic() + wait_close
                        sel.modify(sock, selectors.EVENT_READ, state)
                    continue
                if state["phase"] == "wait":
                    chunk = sock.recv(65536)
                    if chunk:
                        if not state.get("replied"):
                            state["replied"] = True
                            st.replies += 1
                        continue
                    st.peer_closed += 1
                    finish(sock, "close")
            except BlockingIOError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                st.reset += 1
                finish(sock, "close")
            except OSError:
                st.reset += 1
                finish(sock, "close")
    for sock in list(live):
        finish(sock, "rst")
    sel.close()
    assert st.started >= total, f"flood ran out of time: {st}"
    return st


def vmrss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
