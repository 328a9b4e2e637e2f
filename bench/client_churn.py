#!/usr/bin/env python3
"""Tunnel client churn (issue 15): connect and drop tunnel clients 10,000 times, half of
them silently, and report the server's RSS and open descriptors before and after.

Not a pass/fail test: it prints the numbers (and exits 1 only when something is broken:
the server dies, a Hello is refused for a reason other than a takeover in progress, or
the run overruns its time limit).

  bench/client_churn.py [--cycles 10000] [--names 50] [--probe-ms 100]

A "clean" drop closes the socket (FIN). A "silent" drop abandons it: the socket stays
open and unread, as when a client's network vanishes, so the next Hello for that name
meets a live-looking session, probes it (tunnel.takeover_probe_ms), and takes over. The
driver speaks the tunnel protocol itself (SPEC §4: Hello, HelloResponse), --names
clients at a time, each its own name created through POST /api/client/create.
"""
import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HELLO, HELLO_RESPONSE = 0x06, 0x07


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def frame(ftype, payload):
    return bytes([1, ftype]) + struct.pack(">I", len(payload)) + payload


def api(port, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid):
    return {"rss_kib": rss_kib(pid), "fds": fds(pid)}


async def read_frame(reader, timeout):
    hdr = await asyncio.wait_for(reader.readexactly(6), timeout)
    n = struct.unpack(">I", hdr[2:6])[0]
    body = await asyncio.wait_for(reader.readexactly(n), timeout)
    return hdr[1], body


async def one_name(tunnel_port, name, token, cycles, stats, deadline):
    """cycles connects of one name; every other one is dropped silently."""
    abandoned = None   # (reader, writer) of the silently dropped session
    hello = frame(HELLO, json.dumps({"name": name, "token": token,
                                     "version": "churn"}).encode())
    i = 0
    while i < cycles:
        if time.monotonic() > deadline:
            raise RuntimeError("time limit")
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel_port)
        writer.write(hello)
        await writer.drain()
        try:
            ftype, body = await read_frame(reader, 30)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            stats["closed_before_answer"] += 1
            await asyncio.sleep(0.01)
            continue
        answer = json.loads(body)
        if ftype != HELLO_RESPONSE:
            raise RuntimeError(f"{name}: frame type {ftype} instead of a HelloResponse")
        if not answer.get("ok"):
            writer.close()
            if answer.get("error") != "already_connected":
                raise RuntimeError(f"{name}: refused: {answer}")
            stats["already_connected"] += 1
            await asyncio.sleep(0.01)
            continue
        if abandoned is not None:
            # The takeover closed the old session on the server: free our end of it.
            abandoned[1].close()
            abandoned = None
            stats["takeovers"] += 1
        if i % 2 == 0:
            writer.close()           # clean: FIN at once
            await writer.wait_closed()
            stats["clean"] += 1
        else:
            abandoned = (reader, writer)  # silent: open, never read again
            stats["silent"] += 1
        i += 1
    if abandoned is not None:
        abandoned[1].close()


async def churn(tunnel_port, tokens, cycles, time_limit):
    stats = {"clean": 0, "silent": 0, "takeovers": 0, "already_connected": 0,
             "closed_before_answer": 0}
    per = cycles // len(tokens)
    deadline = time.monotonic() + time_limit
    await asyncio.gather(*(one_name(tunnel_port, n, t, per, stats, deadline)
                           for n, t in tokens.items()))
    return stats


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=10000)
    ap.add_argument("--names", type=int, default=50)
    ap.add_argument("--probe-ms", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=500, help="cycles before the baseline")
    ap.add_argument("--time-limit", type=float, default=900)
    ap.add_argument("--server", default=str(Path(os.environ.get(
        "PORTMUX_BUILD_DIR", Path(__file__).resolve().parent.parent / "build"))
        / "portmux-server"))
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="portmux-churn-"))
    api_port, tunnel_port = free_port(), free_port()
    (work / "config.yaml").write_text(f"""
tunnel:
  enabled: true
  listen_addr: 127.0.0.1
  listen_port: {tunnel_port}
  takeover_probe_ms: {a.probe_ms}
api:
  listen_addr: 127.0.0.1
  listen_port: {api_port}
database:
  path: {work}/mappings.db
log:
  level: error
""")
    log = open(work / "server.log", "wb")
    srv = subprocess.Popen([a.server, "--config", str(work / "config.yaml")],
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    rc = 1
    try:
        def up():
            try:
                return api(api_port, "GET", "/health")["status"] == "ok"
            except OSError:
                return False
        wait_for(up, 15, "the server")
        fresh = sample(srv.pid)
        tokens = {}
        for i in range(a.names):
            d = api(api_port, "POST", "/api/client/create", {"name": f"churn{i:03d}"})
            tokens[d["data"]["name"]] = d["data"]["token"]

        def idle():
            return api(api_port, "GET", "/health")["clients"] == 0

        t0 = time.monotonic()
        asyncio.run(churn(tunnel_port, tokens, a.warmup, a.time_limit))
        wait_for(idle, 30, "every session gone after the warm-up")
        time.sleep(1)  # the same settling time as after the churn
        before = sample(srv.pid)
        stats = asyncio.run(churn(tunnel_port, tokens, a.cycles, a.time_limit))
        wait_for(idle, 30, "every session gone after the churn")
        time.sleep(1)  # let the last closes and frees run
        after = sample(srv.pid)
        took = time.monotonic() - t0
        if srv.poll() is not None:
            raise RuntimeError(f"server exited {srv.returncode}")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics",
                                         timeout=10).read().decode()
        takeovers = next((ln.split()[-1] for ln in metrics.splitlines()
                          if ln.startswith("portmux_tunnel_takeovers_total ")), "?")
        print(f"# client churn: {a.cycles} connects over {a.names} names "
              f"(+{a.warmup} warm-up), half dropped silently, takeover_probe_ms {a.probe_ms}")
        print(f"driver: {stats}; server takeovers_total {takeovers}; {took:.0f} s")
        print("| | RSS KiB | open fds |")
        print("|---|---|---|")
        print(f"| fresh server | {fresh['rss_kib']} | {fresh['fds']} |")
        print(f"| after warm-up (baseline) | {before['rss_kib']} | {before['fds']} |")
        print(f"| after {a.cycles} connects | {after['rss_kib']} | {after['fds']} |")
        d_rss, d_fds = after["rss_kib"] - before["rss_kib"], after["fds"] - before["fds"]
        print(f"| difference | {d_rss:+d} | {d_fds:+d} |")
        print("within issue 15's bound (±2 MiB, ±0 fds):",
              "yes" if abs(d_rss) <= 2048 and d_fds == 0 else "NO")
        rc = 0
    except Exception as e:  # a broken run: say what, exit 1
        print(f"client_churn: {e}", file=sys.stderr)
        print((work / "server.log").read_text()[-3000:], file=sys.stderr)
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
        log.close()
        if rc == 0:
            shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
