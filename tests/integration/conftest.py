"""Shared fixtures for the portmux integration tests.

Everything here drives the real binaries over real sockets on 127.0.0.1:

* ``Server``       -- writes a config (dict -> YAML), runs ``portmux-server``, talks to its
                      HTTP API, stops/kills/restarts it, reads its RSS and its database.
* ``Proc``         -- any subprocess with its output captured to a log file (the server,
                      ``python3 -m http.server``, later ``portmux-client``).
* ``HttpBackend``  -- ``python3 -m http.server`` serving a temp dir of known files.
* ``EchoBackend``  -- a selectors-based TCP echo server in a thread (honours half-close,
                      bounded buffers, many connections).
* ``StreamBackend``-- per connection: sends a known N-byte stream and sha256s what it
                      receives, with an optional slow/paused reader (backpressure tests).
* helpers          -- ``free_port``, ``wait_until``, ``send_stream``/``recv_hash``,
                      ``PortHolder``, ``sqlite``, ``connect_refused``.

Fixtures: ``server_factory`` (make as many servers as a test needs), ``server`` (one
started server with the tunnel off), ``proc_factory`` (any other binary, e.g.
portmux-client, with its log in failure reports), ``http_backend``, ``echo_backend``,
``stream_backend_factory``. Every process and thread is stopped at teardown, and when
a test fails the tail of every log it produced is attached to the report.

Rules kept throughout: only 127.0.0.1, every wait is a loop with a deadline, no fixed
sleep stands in for an assertion.
"""
import errno
import hashlib
import http.client
import json
import os
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# ---------------------------------------------------------------------------
# Paths

HERE = Path(__file__).resolve().parent
SOURCE_DIR = Path(os.environ.get("PORTMUX_SOURCE_DIR", HERE.parent.parent)).resolve()


def _default_build_dir():
    for cand in ("build", "build-it"):
        if (SOURCE_DIR / cand / "portmux-server").exists():
            return SOURCE_DIR / cand
    return SOURCE_DIR / "build"


BUILD_DIR = Path(os.environ.get("PORTMUX_BUILD_DIR", _default_build_dir())).resolve()
SERVER_BIN = BUILD_DIR / "portmux-server"
CLIENT_BIN = BUILD_DIR / "portmux-client"
PYTHON = sys.executable or "/usr/bin/python3"

# 500 concurrent relayed connections need ~1000 fds here (client side + echo backend)
# and as many in the server, which inherits this limit.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = 65536 if _hard == resource.RLIM_INFINITY else min(_hard, 65536)
if _soft != resource.RLIM_INFINITY and _soft < _want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _hard))

# Ignore SIGPIPE is Python's default already (sends raise BrokenPipeError).

# ---------------------------------------------------------------------------
# Small helpers

_handed_out = set()
_port_lock = threading.Lock()
# Ports handed out by every test process on this machine (ctest -j runs many): one file
# per port holding the owner's pid. Without it two processes could pick the same free
# port, and the one that binds it second fails (a restored mapping "Address already in
# use" after a restart, say). A file whose pid is gone is taken over.
_PORT_CLAIMS = Path(os.environ.get("PORTMUX_TEST_PORT_DIR", "/tmp/portmux-test-ports"))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_port(port):
    """True when port is now this process's (no other live test process claimed it)."""
    _PORT_CLAIMS.mkdir(mode=0o777, parents=True, exist_ok=True)
    path = _PORT_CLAIMS / str(port)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            try:
                owner = int(path.read_text() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner == os.getpid():
                return True
            if owner and _pid_alive(owner):
                return False
            try:
                path.unlink()  # a dead process's claim (or one half written: retried)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _unclaim_port(port):
    path = _PORT_CLAIMS / str(port)
    try:
        if path.read_text() == str(os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass


def _release_claims():
    for port in _handed_out:
        _unclaim_port(port)


import atexit  # noqa: E402  (beside the claims it cleans up)
atexit.register(_release_claims)


def _can_bind(port):
    for addr in ("0.0.0.0", "127.0.0.1"):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((addr, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_port():
    """A TCP port that is free on 127.0.0.1 and 0.0.0.0 right now.

    Drawn at random from 20000-32699, below Linux's ephemeral range (32768+), so it
    cannot be taken meanwhile by the source port of some outgoing connection (the
    relay tests open hundreds). Never hands out the same port twice per process."""
    with _port_lock:
        rng = random.Random(os.getpid() ^ time.monotonic_ns())
        for _ in range(2000):
            port = rng.randrange(20000, 32700)
            if port in _handed_out:
                continue
            if _can_bind(port) and _claim_port(port):
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def free_range(n):
    """n consecutive ports that are free now (for a port_range of its own), each claimed
    as free_port claims one. Drawn from 15000-19999, below free_port's ports, so a run
    meets only other runs: among the single ports every test file holds for its whole
    life, a long run would seldom find a gap."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(500):
        base = rng.randrange(15000, 20000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("0.0.0.0", p))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        with _port_lock:
            claimed = []
            for p in range(base, base + n):
                if p in _handed_out or not _claim_port(p):
                    break
                claimed.append(p)
            if len(claimed) == n:
                _handed_out.update(claimed)
                return base
            for p in claimed:  # another process's port inside: give these back
                _unclaim_port(p)
    raise AssertionError("no run of free ports")


def free_ports(n):
    return [free_port() for _ in range(n)]


def wait_until(pred, timeout=10.0, interval=0.02, desc="condition"):
    """Polls pred() until it returns something truthy; returns that value.

    Raises AssertionError naming desc (and the last value seen) at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {desc} (last: {last!r})")
        time.sleep(interval)


def connect_refused(port, host="127.0.0.1", timeout=2.0):
    """True when a TCP connect to host:port is refused (ECONNREFUSED)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        return True
    except OSError as e:
        return e.errno == errno.ECONNREFUSED
    finally:
        s.close()
    return False


def connect(port, host="127.0.0.1", timeout=10.0):
    return socket.create_connection((host, port), timeout=timeout)


# ---- sockets of a running process, found through /proc ----


def _tcp_rows():
    """(local port, remote port, state as /proc/net/tcp's hex code, inode) of every TCP
    socket on this host."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    yield (int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16),
                           cols[3], int(cols[9]))
        except FileNotFoundError:
            pass


def tcp_socket_inodes():
    """{(local port, remote port): socket inode} of every TCP socket on this host."""
    return {(lport, rport): inode for lport, rport, _, inode in _tcp_rows()}


def closed_by_peer_within(sock, timeout):
    """True when the peer closes sock (EOF or reset) within timeout without sending."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def tcp_state(lport, rport):
    """The state (/proc/net/tcp's hex code, "06" = TIME_WAIT) of the TCP socket
    lport -> rport, or None."""
    return next((st for lp, rp, st, _ in _tcp_rows() if (lp, rp) == (lport, rport)), None)


def _fd_of(pid, inode):
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == f"socket:[{inode}]":
                return int(name)
        except OSError:
            continue
    return None


def _family(pid):
    """pid and its descendants: a wrapper (scripts/valgrind-integration.sh's) runs the
    binary as its child."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out = [pid]
    for p in out:
        out += [c for c, pp in parent.items() if pp == p]
    return out


def socket_owner(pid, inode):
    """(process, descriptor) holding socket inode in pid or a descendant, or None."""
    for p in _family(pid):
        fd = _fd_of(p, inode)
        if fd is not None:
            return p, fd
    return None


class PortHolder:
    """Holds a port with a bound, listening socket (another process's port, as the
    server sees it). Bound on 0.0.0.0 so it conflicts with any bind of the server."""

    def __init__(self, port, addr="0.0.0.0"):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((addr, port))
        self.sock.listen(16)

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- byte streams with checksums ----

_PATTERN = random.Random(0x5EED).randbytes((1 << 20) + 7)  # odd length: chunks never align


def send_stream(sock, total, chunk=256 * 1024, on_progress=None, shut=True):
    """Sends total bytes of a fixed pseudo-random pattern; returns sha256 hex of them.

    on_progress(sent_so_far) is called after every chunk. shutdown(SHUT_WR) at the end
    when shut."""
    h = hashlib.sha256()
    mv = memoryview(_PATTERN)
    plen = len(_PATTERN)
    off = 0
    sent = 0
    while sent < total:
        n = min(chunk, total - sent, plen - off)
        piece = mv[off:off + n]
        sock.sendall(piece)
        h.update(piece)
        sent += n
        off = (off + n) % plen
        if on_progress:
            on_progress(sent)
    if shut:
        sock.shutdown(socket.SHUT_WR)
    return h.hexdigest()


def recv_hash_n(sock, total):
    """Reads exactly total bytes (fewer at an early EOF); returns (byte count, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    while n < total:
        data = sock.recv(min(256 * 1024, total - n))
        if not data:
            break
        h.update(data)
        n += len(data)
    return n, h.hexdigest()


def recv_hash(sock, bufsize=256 * 1024, on_progress=None):
    """Reads to EOF; returns (byte count, sha256 hex)."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = sock.recv(bufsize)
        if not data:
            return n, h.hexdigest()
        h.update(data)
        n += len(data)
        if on_progress:
            on_progress(n)


def http_request(host, port, method, path, body=None, raw=None, headers=None, timeout=10.0):
    """One HTTP request to host:port (``::1`` too). body: JSON-encoded; raw: bytes/str sent
    as is. Returns (status, headers, payload): payload is the parsed JSON when the response
    says application/json and parses, else the text."""
    hdrs = dict(headers or {})
    data = None
    if raw is not None:
        data = raw.encode() if isinstance(raw, str) else raw
    elif body is not None:
        data = json.dumps(body).encode()
    if data is not None:
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", errors="replace")
        parsed = text
        if "json" in resp.getheader("Content-Type", ""):
            try:
                parsed = json.loads(text)
            except ValueError:
                pass
        return resp.status, resp.headers, parsed
    finally:
        conn.close()


def recv_exact(sock, n, timeout=10):
    """Reads exactly n bytes; fails on EOF before them."""
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        c = sock.recv(n - len(buf))
        assert c, f"EOF after {len(buf)} of {n} bytes: {bytes(buf)!r}"
        buf += c
    return bytes(buf)


def recv_all(sock, bufsize=65536):
    parts = []
    while True:
        data = sock.recv(bufsize)
        if not data:
            return b"".join(parts)
        parts.append(data)


def stream_sha256(total):
    """The sha256 that send_stream(total) reports, without a socket."""
    h = hashlib.sha256()
    plen = len(_PATTERN)
    full, rest = divmod(total, plen)
    for _ in range(full):
        h.update(_PATTERN)
    h.update(_PATTERN[:rest])
    return h.hexdigest()


class Worker(threading.Thread):
    """A thread that keeps its target's result or exception for join_result()."""

    def __init__(self, fn, *args, **kwargs):
        super().__init__(daemon=True)
        self._fn, self._args, self._kwargs = fn, args, kwargs
        self.result = None
        self.error = None

    def run(self):
        try:
            self.result = self._fn(*self._args, **self._kwargs)
        except BaseException as e:  # noqa: BLE001 -- re-raised in join_result
            self.error = e

    def join_result(self, timeout):
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"worker {self._fn.__name__} still running after {timeout}s")
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------------
# Config -> YAML

def _yaml_scalar(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)  # JSON is YAML flow style
    return json.dumps(str(v))  # double-quoted scalar


def to_yaml(cfg, indent=0):
    """A dict as block-style YAML; lists (and lists of dicts) in flow style."""
    lines = []
    pad = " " * indent
    for k, v in cfg.items():
        if isinstance(v, dict) and v:
            lines.append(f"{pad}{k}:")
            lines.append(to_yaml(v, indent + 2))
        else:
            lines.append(f"{pad}{k}: {_yaml_scalar(v)}")
    return "\n".join(lines)


def deep_merge(base, over):
    out = dict(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------
# Processes

_LIVE_PROCS = []


class Proc:
    """A subprocess whose stdout+stderr go to a log file.

    Register-on-start: every Proc is killed at the end of the test that made it."""

    def __init__(self, args, log_path, env=None, cwd=None, name=None):
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.name = name or Path(self.args[0]).name
        self.popen = None
        self._log = None

    def start(self):
        assert self.popen is None or self.popen.poll() is not None, "already running"
        self._log = open(self.log_path, "ab")
        self._log.write(f"==== start {' '.join(self.args)}\n".encode())
        self._log.flush()
        self.popen = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self._log,
                                      stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        if self not in _LIVE_PROCS:  # a restart keeps its place (and its owner's scope)
            _LIVE_PROCS.append(self)
        return self

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def poll(self):
        return self.popen.poll() if self.popen else None

    def running(self):
        return self.popen is not None and self.popen.poll() is None

    def wait(self, timeout):
        """Exit status, or raises subprocess.TimeoutExpired."""
        rc = self.popen.wait(timeout=timeout)
        self._close_log()
        return rc

    def send_signal(self, sig):
        """SIGSTOP and SIGCONT go to the process and its descendants: under
        scripts/valgrind-integration.sh the process is a wrapper whose child is the binary,
        and a stop cannot be caught and passed on as the wrapper passes on the rest."""
        if not self.running():
            return
        if sig not in (signal.SIGSTOP, signal.SIGCONT):
            self.popen.send_signal(sig)
            return
        for p in _family(self.popen.pid):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    def kill(self):
        if self.running():
            self.popen.kill()
        if self.popen is not None:
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._close_log()

    def _close_log(self):
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n=60):
        return "\n".join(self.log_text().splitlines()[-n:])

    def log_mark(self):
        """A position in the log, for wait_log(after=...)."""
        return len(self.log_text())

    def wait_log(self, pattern, timeout=10.0, after=0):
        """Waits for a regex to appear in the log (past offset after); returns the match."""
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log_text(), after), timeout=timeout,
                          desc=f"{self.name} log to match {pattern!r}")


def limit_descriptors(srv, n):
    """Sets the running server's open-file limit (soft and hard) to n with prlimit, or
    skips the test where that cannot reach it (a valgrind wrapper) or is not allowed."""
    if not os.path.realpath(f"/proc/{srv.pid}/exe").endswith("portmux-server"):
        pytest.skip("the server runs under a wrapper (valgrind): prlimit would not reach it")
    r = subprocess.run(["prlimit", "--pid", str(srv.pid), f"--nofile={n}:{n}"],
                       capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        pytest.skip(f"prlimit failed: {r.stderr.strip()}")
    # The server reads its limit at most once a second (fd_limit.c): one it read just
    # before (a create checks it too) would stand for the rest of that second.
    time.sleep(1.1)


def run_once(args, timeout=10.0, env=None):
    """Runs a command to completion with separate stdout/stderr; returns CompletedProcess."""
    return subprocess.run([str(a) for a in args], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout, env=env)


# ---------------------------------------------------------------------------
# The server

class ServerStartError(AssertionError):
    pass


class Server:
    """One portmux-server with its own config, database and log in a private directory.

    Defaults: API on a free port of 127.0.0.1 without token, port_range 1024-65535
    (tests pick free ports with free_port()), tunnel off, database in the directory,
    log level debug. ``config`` overrides are deep-merged; ``config_text`` replaces the
    YAML entirely (then api_port must be given if the API is to be reached).
    """

    def __init__(self, workdir, config=None, config_text=None, name="server", api_port=None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.config_path = self.dir / "config.yaml"
        self.log_path = self.dir / "server.log"
        self.db_path = self.dir / "mappings.db"
        self.api_port = api_port or free_port()
        # Ports drawn here (not given by the test) may be redrawn when another test
        # process took one between free_port() and the server's bind (see start).
        given = api_port or (config or {}).get("api", {}).get("listen_port")
        self._auto_ports = set() if given else {"api"}
        base = {
            "port_range": {"from": 1024, "end": 65535, "blacklist": []},
            "tunnel": {"enabled": False},
            "api": {"listen_addr": "127.0.0.1", "listen_port": self.api_port},
            "database": {"path": str(self.db_path)},
            "log": {"level": "debug"},
        }
        self.config = deep_merge(base, config)
        tun = self.config.get("tunnel", {})
        if tun.get("enabled") and "listen_port" not in tun:
            self._auto_ports.add("tunnel")
            tun = dict(tun, listen_port=free_port())
            tun.setdefault("listen_addr", "127.0.0.1")
            self.config["tunnel"] = tun
        self.tunnel_port = self.config.get("tunnel", {}).get("listen_port")
        if "api" in self.config and "listen_port" in self.config["api"]:
            self.api_port = self.config["api"]["listen_port"]
        if "database" in self.config and "path" in self.config["database"]:
            self.db_path = Path(self.config["database"]["path"])
        self.config_text = config_text
        self.write_config()
        self.proc = Proc([SERVER_BIN, "--config", self.config_path], self.log_path,
                         name=name)

    # ---- lifecycle ----

    def write_config(self):
        text = self.config_text if self.config_text is not None else to_yaml(self.config)
        self.config_path.write_text(text + "\n")

    @property
    def pid(self):
        return self.proc.pid

    def running(self):
        return self.proc.running()

    def start(self, timeout=10.0):
        """Starts the binary and waits for GET /health to answer 200. When a port this
        object drew itself was taken meanwhile (by a test running in parallel: free_port
        only knows its own process's ports), draws new ones and tries again."""
        for attempt in range(3):
            try:
                return self._start_once(timeout)
            except ServerStartError as e:
                if (attempt == 2 or "Address already in use" not in str(e)
                        or not self._redraw_ports()):
                    raise

    def _redraw_ports(self):
        if self.config_text is not None or not self._auto_ports:
            return False
        if "api" in self._auto_ports:
            self.api_port = free_port()
            self.config["api"] = dict(self.config["api"], listen_port=self.api_port)
        if "tunnel" in self._auto_ports:
            self.tunnel_port = free_port()
            self.config["tunnel"] = dict(self.config["tunnel"], listen_port=self.tunnel_port)
        self.write_config()
        return True

    def _start_once(self, timeout):
        self.proc.start()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerStartError(f"{self.name} exited with {rc} during start-up:\n"
                                       f"{self.proc.log_tail()}")
            try:
                status, _, _ = self.api("GET", "/health", timeout=1.0)
                if status == 200:
                    return self
                last = f"status {status}"
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.02)
        self.proc.kill()
        raise ServerStartError(f"{self.name}: /health not 200 within {timeout}s ({last}):\n"
                               f"{self.proc.log_tail()}")

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Sends sig and waits for the exit; returns the exit status (kills at timeout)."""
        if not self.proc.running():
            return self.proc.poll()
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"{self.name} did not exit within {timeout}s of {sig!r}:\n"
                                 f"{self.proc.log_tail()}")

    def kill9(self):
        self.proc.kill()
        return self.proc.poll()

    def restart(self, sig=signal.SIGTERM):
        if sig == signal.SIGKILL:
            self.kill9()
        else:
            rc = self.stop(sig)
            assert rc == 0, f"{self.name} exited {rc} on {sig!r}:\n{self.proc.log_tail()}"
        return self.start()

    def log_text(self):
        return self.proc.log_text()

    def log_tail(self, n=60):
        return self.proc.log_tail(n)

    def log_mark(self):
        return self.proc.log_mark()

    def wait_log(self, pattern, timeout=10.0, after=0):
        return self.proc.wait_log(pattern, timeout, after)

    def rss_kb(self):
        """Resident set size of the server process in KiB (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc status")

    # ---- HTTP API ----

    def api(self, method, path, body=None, raw=None, headers=None, timeout=10.0):
        """One request to the API. body: JSON-encoded; raw: bytes/str sent as is.

        Returns (status, headers, payload): payload is the parsed JSON when the response
        says application/json and parses, else the text."""
        return http_request("127.0.0.1", self.api_port, method, path, body=body, raw=raw,
                            headers=headers, timeout=timeout)

    def health(self):
        status, _, body = self.api("GET", "/health")
        assert status == 200, (status, body)
        return body

    def create(self, **fields):
        """POST /api/mapping/create; returns (status, payload)."""
        status, _, body = self.api("POST", "/api/mapping/create", body=fields)
        return status, body

    def create_ok(self, **fields):
        status, body = self.create(**fields)
        assert status == 201, f"create {fields} -> {status} {body}"
        assert body["success"] is True, body
        return body["data"]

    def remove(self, port):
        status, _, body = self.api("POST", "/api/mapping/remove", body={"port": port})
        return status, body

    def list(self):
        """The mappings as GET /api/mapping/list shows them."""
        status, _, body = self.api("GET", "/api/mapping/list")
        assert status == 200, (status, body)
        return body["data"]["mappings"]

    def mapping(self, port):
        for m in self.list():
            if m["port"] == port:
                return m
        return None

    # ---- database ----

    def sqlite(self, sql, readonly=True):
        return sqlite(self.db_path, sql, readonly=readonly)

    def sanitized(self):
        """True when the running binary carries AddressSanitizer (RSS limits do not apply)."""
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                maps = f.read()
        except OSError:
            return False
        return "libasan" in maps or "libtsan" in maps


def sqlite(db_path, sql, readonly=False):
    """Runs sql with the sqlite3 CLI on db_path; returns rows as lists of strings.

    readonly=True is safe beside a running server (it reads the committed state)."""
    opts = ["-readonly"] if readonly else []
    r = subprocess.run(["sqlite3", "-batch", "-bail", *opts, "-separator", "\x1f", "-cmd",
                        ".timeout 5000", str(db_path), sql],
                       capture_output=True, timeout=20)
    assert r.returncode == 0, f"sqlite3 {sql!r}: {r.stderr.decode(errors='replace')}"
    out = r.stdout.decode()
    return [line.split("\x1f") for line in out.splitlines()]


# ---------------------------------------------------------------------------
# Backends

class HttpBackend:
    """python3 -m http.server on a free port of 127.0.0.1, serving known files."""

    def __init__(self, workdir):
        self.dir = Path(workdir) / "www"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files = {
            "hello.txt": b"hello through portmux\n",
            "blob.bin": random.Random(7).randbytes(3 * (1 << 20) + 123),
        }
        for name, data in self.files.items():
            (self.dir / name).write_bytes(data)
        self.port = free_port()
        self.proc = Proc([PYTHON, "-m", "http.server", "--bind", "127.0.0.1", str(self.port),
                          "--directory", str(self.dir)], Path(workdir) / "http_backend.log",
                         name="http.server")

    def start(self):
        self.proc.start()
        wait_until(lambda: self.proc.poll() is not None or not connect_refused(self.port),
                   timeout=10, desc="http.server to listen")
        assert self.proc.running(), self.proc.log_tail()
        return self

    def stop(self):
        self.proc.kill()


class _Backend:
    """Base of the in-process backends: a listening socket and a thread."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self.accepted = 0
        self.errors = []

    def stop(self):
        self._stop.set()


class SerialBackend(_Backend):
    """Runs handle(conn, stopping) for each connection in turn on one thread, then closes
    it; stopping is an Event set by stop(), for a handle that loops. Errors of the
    connection (a peer that went away) end its turn."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            with c:
                try:
                    self.handle(c, self._stop)
                except OSError:
                    pass

    def stop(self):
        super().stop()
        self._thread.join(10)
        self.sock.close()


class EchoBackend(_Backend):
    """TCP echo on 127.0.0.1, one selector thread for every connection.

    Reading stops while 1 MiB is waiting to be written back (bounded memory); on the
    peer's FIN the rest is flushed, then the write side is shut (half-close honoured)."""

    LIMIT = 1 << 20

    def __init__(self):
        super().__init__()
        self.sock.setblocking(False)
        self.active = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, None)
        conns = {}
        try:
            while not self._stop.is_set():
                for key, ev in sel.select(0.05):
                    if key.data is None:
                        self._accept(sel, conns)
                    else:
                        self._service(sel, conns, key.fileobj, ev)
        finally:
            for c in list(conns):
                c.close()
            sel.close()
            self.sock.close()

    def _accept(self, sel, conns):
        while True:
            try:
                c, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            c.setblocking(False)
            st = {"out": bytearray(), "eof": False}
            conns[c] = st
            self.accepted += 1
            self.active += 1
            sel.register(c, selectors.EVENT_READ, st)

    def _close(self, sel, conns, c):
        sel.unregister(c)
        c.close()
        del conns[c]
        self.active -= 1

    def _service(self, sel, conns, c, ev):
        st = conns[c]
        try:
            if ev & selectors.EVENT_READ and not st["eof"]:
                data = c.recv(256 * 1024)
                if data:
                    st["out"] += data
                else:
                    st["eof"] = True
            if st["out"]:
                try:
                    n = c.send(st["out"])
                    del st["out"][:n]
                except BlockingIOError:
                    pass
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.errors.append(repr(e))
            self._close(sel, conns, c)
            return
        if st["eof"] and not st["out"]:
            try:
                c.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._close(sel, conns, c)
            return
        want = 0
        if not st["eof"] and len(st["out"]) < self.LIMIT:
            want |= selectors.EVENT_READ
        if st["out"]:
            want |= selectors.EVENT_WRITE
        sel.modify(c, want or selectors.EVENT_READ, st)

    def stop(self):
        super().stop()
        self._thread.join(5)


class StreamBackend(_Backend):
    """Per connection: sends ``send_total`` bytes of the pattern (then SHUT_WR) while it
    reads to EOF hashing what arrives. Results land in ``self.results`` as dicts
    {sent_sha, recv_count, recv_sha}.

    Reading is throttled while ``slow`` is set (``slow_chunk`` bytes, then
    ``slow_sleep`` seconds) and stops entirely while ``paused`` is set; ``recv_count``
    of the live connection is visible in ``self.progress`` for tests that wait on it."""

    def __init__(self, send_total=0, slow=False, paused=False, slow_chunk=16 * 1024,
                 slow_sleep=0.01):
        super().__init__()
        self.send_total = send_total
        self.slow = threading.Event()
        self.paused = threading.Event()
        if slow:
            self.slow.set()
        if paused:
            self.paused.set()
        self.slow_chunk = slow_chunk
        self.slow_sleep = slow_sleep
        self.results = []
        self.progress = 0
        self.done = threading.Event()
        self._conns = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self):
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.settimeout(None)
            self.accepted += 1
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        res = {"sent_sha": None, "recv_count": 0, "recv_sha": None, "error": None}
        sender = None
        if self.send_total:
            sender = Worker(send_stream, c, self.send_total)
            sender.start()
        try:
            h = hashlib.sha256()
            n = 0
            while True:
                if self._stop.is_set():
                    break
                if self.paused.is_set():
                    time.sleep(0.01)
                    continue
                if self.slow.is_set():
                    data = c.recv(self.slow_chunk)
                else:
                    data = c.recv(1 << 20)
                if not data:
                    break
                h.update(data)
                n += len(data)
                self.progress = n
                if self.slow.is_set():
                    time.sleep(self.slow_sleep)
            res["recv_count"], res["recv_sha"] = n, h.hexdigest()
            if sender is not None:
                res["sent_sha"] = sender.join_result(120)
        except Exception as e:  # noqa: BLE001 -- reported through results
            res["error"] = repr(e)
        finally:
            c.close()
            self.results.append(res)
            self.done.set()

    def stop(self):
        super().stop()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()
        self._thread.join(5)


# ---------------------------------------------------------------------------
# Fixtures

def pytest_configure(config):
    if not SERVER_BIN.exists():
        # Fail loudly rather than skip: a missing binary is a broken build.
        sys.stderr.write(f"portmux-server not found at {SERVER_BIN}; set PORTMUX_BUILD_DIR\n")


@pytest.fixture
def logs(request):
    """List of objects with .name and .log_tail() whose logs a failure report shows."""
    holder = []
    request.node._portmux_logs = holder
    return holder


@pytest.fixture
def server_factory(tmp_path, logs):
    """make(config=None, config_text=None, start=True, name=None) -> Server."""
    made = []

    def make(config=None, config_text=None, start=True, name=None, api_port=None):
        name = name or f"server{len(made)}"
        srv = Server(tmp_path / name, config=config, config_text=config_text, name=name,
                     api_port=api_port)
        made.append(srv)
        logs.append(srv)
        if start:
            srv.start()
        return srv

    yield make
    for srv in made:
        srv.kill9()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """Certificates for TLS tests (sec_helpers.make_pki): the tunnel CA and server leaf,
    a client CA and leaf, an unrelated CA."""
    from sec_helpers import make_pki  # sec_helpers imports this module
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(server_factory):
    """One started server: tunnel off, port_range 1024-65535, no token."""
    return server_factory()


@pytest.fixture
def proc_factory(tmp_path, logs):
    """make(args, name) -> started Proc whose log is shown when the test fails, e.g.
    make([CLIENT_BIN, ...], "client"). Killed at teardown."""
    made = []

    def make(args, name, env=None, start=True):
        p = Proc(args, tmp_path / f"{name}.log", env=env, name=name)
        made.append(p)
        logs.append(p)
        if start:
            p.start()
        return p

    yield make
    for p in made:
        p.kill()


@pytest.fixture
def http_backend(tmp_path, logs):
    b = HttpBackend(tmp_path)
    logs.append(b.proc)
    b.start()
    yield b
    b.stop()


@pytest.fixture
def echo_backend():
    b = EchoBackend()
    yield b
    b.stop()


@pytest.fixture
def stream_backend_factory():
    made = []

    def make(**kw):
        b = StreamBackend(**kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


@pytest.fixture(autouse=True)
def _reap_procs():
    """Safety net: no subprocess outlives its test."""
    start = len(_LIVE_PROCS)
    yield
    while len(_LIVE_PROCS) > start:
        _LIVE_PROCS.pop().kill()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        objs = list(getattr(item, "_portmux_logs", []))
        for v in getattr(item, "funcargs", {}).values():
            if isinstance(v, (Server, Proc)) and v not in objs:
                objs.append(v)
        for obj in objs:
            try:
                tail = obj.log_tail(80)
            except Exception as e:  # noqa: BLE001
                tail = f"(log unavailable: {e!r})"
            rep.sections.append((f"log of {obj.name} ({rep.when})", tail))
