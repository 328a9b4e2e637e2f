"""Helpers for the tunnel tests: a server with the tunnel on, a portmux-client process,
and a few socket one-liners. Built on conftest.py's Server/Proc/wait_until; only
127.0.0.1, free ports, and every wait bounded by a deadline."""
import fcntl
import socket
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

from conftest import CLIENT_BIN, Proc, connect, wait_until


def tunnel_config(clients=None, **tunnel):
    """The config overrides for a server with the tunnel on (listen port chosen free)."""
    cfg = {"enabled": True,
           "clients": clients or [{"name": "default", "token": "tok-default-0123456789"}]}
    cfg.update(tunnel)
    return {"tunnel": cfg}


def tunnel_server(server_factory, clients=None, **tunnel):
    """A started server with the tunnel on 127.0.0.1 and the given clients."""
    return server_factory(config=tunnel_config(clients, **tunnel))


def client_proc(log_dir, srv, token, *extra, name="default", log_name=None, server=None):
    """A portmux-client Proc (not started) for srv's tunnel port, or for server
    ("host:port": a balancer in front of it, another address of it)."""
    server = server or f"127.0.0.1:{srv.tunnel_port}"
    args = [CLIENT_BIN, "--server", server, "--token", token,
            "--name", name, "--log-level", "debug", *extra]
    return Proc(args, Path(log_dir) / f"{log_name or 'client-' + name}.log",
                name=log_name or f"client-{name}")


def client_count(srv, name=None):
    status, _, body = srv.api("GET", "/api/clients")
    assert status == 200, (status, body)
    clients = body["data"]["clients"]
    return len([c for c in clients if c["connected"] and (name is None or c["name"] == name)])


def start_client(log_dir, logs, srv, token, *extra, name="default", timeout=10.0,
                 log_name=None):
    """Starts a client and waits until the server lists it; returns the Proc."""
    c = client_proc(log_dir, srv, token, *extra, name=name, log_name=log_name)
    logs.append(c)
    c.start()
    wait_until(lambda: c.poll() is not None or client_count(srv, name) == 1, timeout=timeout,
               desc=f"client {name} to connect")
    assert c.running(), f"client exited {c.poll()}:\n{c.log_tail()}"
    return c


def run_client(srv, token, *extra, name="default", timeout=20.0):
    """Runs a client to its exit (for refusals); returns the CompletedProcess."""
    args = [str(CLIENT_BIN), "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
            "--name", name, "--no-reconnect", *extra]
    return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout)


def closed_within(port, timeout, send=b""):
    """Connects to port and returns the seconds until the server closes it (EOF or
    reset), or None when it is still open at timeout."""
    t0 = time.monotonic()
    with connect(port, timeout=timeout) as s:
        if send:
            try:
                s.sendall(send)
            except OSError:
                return time.monotonic() - t0
        s.settimeout(max(0.05, timeout - (time.monotonic() - t0)))
        try:
            while True:
                if not s.recv(65536):
                    break
        except socket.timeout:
            return None
        except OSError:
            pass
    return time.monotonic() - t0


def http_get(port, path, timeout=10.0):
    """GET path on 127.0.0.1:port with curl; returns (status, body bytes)."""
    r = subprocess.run(["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time",
                        str(int(timeout)), f"http://127.0.0.1:{port}{path}"],
                       capture_output=True, timeout=timeout + 5)
    body, _, code = r.stdout.rpartition(b"\n")
    return int(code or 0), body


def wait_status(srv, port, status, timeout=10.0):
    return wait_until(lambda: (srv.mapping(port) or {}).get("status") == status,
                      timeout=timeout, desc=f"mapping {port} status {status}")


# ---------------------------------------------------------------------------
# Used by test_tunnel_*.py (real peers, load, failures, protocol edges).

def tunnel_env(server_factory, tmp_path, logs, token="tok-default-0123456789", client_args=(),
               **tunnel):
    """A started server with the tunnel on and one connected client named "default";
    returns (server, client Proc)."""
    srv = tunnel_server(server_factory, [{"name": "default", "token": token}], **tunnel)
    cli = start_client(tmp_path, logs, srv, token, *client_args)
    return srv, cli


def tunnel_env_over(transport, pki, server_factory, tmp_path, logs, **tunnel):
    """tunnel_env with the tunnel plain ("plain") or TLS ("tls", certificates from the pki
    fixture, the client verifying the server)."""
    if transport == "plain":
        return tunnel_env(server_factory, tmp_path, logs, **tunnel)
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"])}
    return tunnel_env(server_factory, tmp_path, logs, tls=tls,
                      client_args=("--tls", "--ca", str(pki["ca"])), **tunnel)


def map_tunnel(srv, target_port, timeout=10.0, **fields):
    """Creates a tunnel mapping (public port chosen free) to target_port on the client's
    side and waits until it is listening; returns the public port."""
    from conftest import free_port
    port = fields.pop("port", None) or free_port()
    data = srv.create_ok(port=port, target_port=target_port, **fields)
    assert data["use_tunnel"] is True, data
    wait_status(srv, port, "listening", timeout=timeout)
    return port


def client_info(srv, name="default"):
    """The /api/clients entry of name while it is connected, or None."""
    c = client_entry(srv, name)
    return c if c and c["connected"] else None


def client_entry(srv, name="default"):
    """The /api/clients entry of name, connected or not, or None when it is unknown."""
    status, _, body = srv.api("GET", "/api/clients")
    assert status == 200, (status, body)
    for c in body["data"]["clients"]:
        if c["name"] == name:
            return c
    return None


def metric(srv, name):
    """The value of an unlabelled sample in /metrics (float), or None when absent."""
    status, _, text = srv.api("GET", "/metrics")
    assert status == 200, (status, text)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == name:
            return float(parts[1])
    return None


def pid_rss_kb(pid):
    """VmRSS of any process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_streams_drained(srv, port, timeout=5.0, name="default"):
    """Waits until the client's streams and the mapping's active_connections are both 0;
    on timeout the message carries both and the kernel's view of port's sockets."""
    def drained():
        c = client_info(srv, name) or {}
        m = srv.mapping(port) or {}
        return (c.get("streams"), m.get("active_connections")) == (0, 0)
    try:
        wait_until(drained, timeout=timeout, interval=0.05,
                   desc=f"streams of {name} and active_connections of {port} to reach 0")
    except AssertionError as e:
        ss = subprocess.run(["ss", "-tanoe", f"( sport = :{port} or dport = :{port} )"],
                            capture_output=True, text=True, timeout=10).stdout
        raise AssertionError(f"{e}\nclient: {client_info(srv, name)}\n"
                             f"mapping: {srv.mapping(port)}\nss:\n{ss}") from None


def closed_promptly(port, timeout):
    """Connects to port; True when the peer closes it (EOF or reset) within timeout."""
    t = closed_within(port, timeout)
    return t is not None and t <= timeout


def echo_roundtrip(port, payload, timeout=5.0):
    """One connection: sends payload, SHUT_WR, reads to EOF; returns what came back."""
    with connect(port, timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        parts = []
        while True:
            d = s.recv(65536)
            if not d:
                return b"".join(parts)
            parts.append(d)


class ScriptBackend:
    """A listening socket on 127.0.0.1; each accepted connection runs handler(sock) in
    its own thread. Handler results/exceptions land in .results / .errors."""

    def __init__(self, handler):
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.results = []
        self.errors = []
        self.finished = threading.Semaphore(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            c.settimeout(30)
            self.accepted += 1
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c):
        try:
            self.results.append(self.handler(c))
        except Exception as e:  # noqa: BLE001 -- reported through errors
            self.errors.append(repr(e))
        finally:
            c.close()
            self.finished.release()

    def wait_finished(self, n=1, timeout=30):
        for _ in range(n):
            assert self.finished.acquire(timeout=timeout), "backend handler did not finish"

    def stop(self):
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def unread_bytes(sock):
    """Bytes waiting in sock's receive queue (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return struct.unpack("i", raw)[0]


def wait_queue_full(sock, timeout=10.0):
    """Waits until sock's receive queue is non-empty and has stopped growing for 50 ms:
    everything upstream (relay buffers, stream window) is full too."""
    seen = {"q": -1, "t": time.monotonic()}

    def stable():
        q, now = unread_bytes(sock), time.monotonic()
        if q != seen["q"]:
            seen["q"], seen["t"] = q, now
            return False
        return q > 0 and now - seen["t"] >= 0.05
    wait_until(stable, timeout=timeout, interval=0.005, desc="the backend queue to fill")
