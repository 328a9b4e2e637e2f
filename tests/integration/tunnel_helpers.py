"""Helpers for the tunnel tests: a server with the tunnel on, a portmux-client process,
and a few socket one-liners. Built on conftest.py's Server/Proc/wait_until; only
127.0.0.1, free ports, and every wait bounded by a deadline."""
import socket
import subprocess
import time
from pathlib import Path

from conftest import CLIENT_BIN, Proc, connect, wait_until


def tunnel_config(clients=None, **tunnel):
    """The config overrides for a server with the tunnel on (listen port chosen free)."""
    cfg = {"enabled": True,
           "clients": clients or [{"name": "default", "token": "tok-default"}]}
    cfg.update(tunnel)
    return {"tunnel": cfg}


def tunnel_server(server_factory, clients=None, **tunnel):
    """A started server with the tunnel on 127.0.0.1 and the given clients."""
    return server_factory(config=tunnel_config(clients, **tunnel))


def client_proc(log_dir, srv, token, *extra, name="default", log_name=None):
    """A portmux-client Proc (not started) for srv's tunnel port."""
    args = [CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
            "--name", name, "--log-level", "debug", *extra]
    return Proc(args, Path(log_dir) / f"{log_name or 'client-' + name}.log",
                name=log_name or f"client-{name}")


def client_count(srv, name=None):
    status, _, body = srv.api("GET", "/api/clients")
    assert status == 200, (status, body)
    clients = body["data"]["clients"]
    return len([c for c in clients if name is None or c["name"] == name])


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
