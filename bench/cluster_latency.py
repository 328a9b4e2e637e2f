#!/usr/bin/python3
"""SPEC §7 benchmark: create -> listening on every node, and relay throughput of a node
on PostgreSQL against one on SQLite, in the same run.

Starts its own PostgreSQL 15 (tests/integration/pg_helpers.py: initdb + pg_ctl in a temp
dir, as the postgres user), two nodes on 127.0.0.2 and 127.0.0.3, and an SQLite server
on 127.0.0.1. For each of N creates on node A (through its API) it measures the time
until the port accepts a TCP connection on node B (polled every 0.5 ms): p50/p90/p99/max.
Then it streams MB megabytes through a mapping of the PostgreSQL node and one of the
SQLite server to the same sink, REPS times each, interleaved, and reports the medians.

    PORTMUX_BUILD_DIR=$PWD/build /usr/bin/python3 bench/cluster_latency.py [N] [MB] [REPS]

Defaults: N=1000, MB=512, REPS=3. Only loopback addresses are used.
"""
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

from conftest import Server, free_port, wait_until  # noqa: E402
from pg_helpers import PgServer, pg_available  # noqa: E402


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Sink(threading.Thread):
    """Reads and drops everything on 127.0.0.1, one connection at a time."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with c:
                while c.recv(1 << 20):
                    pass


def stream(host, port, mb):
    chunk = b"\0" * (1 << 20)
    t0 = time.monotonic()
    with socket.create_connection((host, port)) as s:
        for _ in range(mb):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)
    return mb / (time.monotonic() - t0)


def node(workdir, name, pg, bind):
    srv = Server(Path(workdir) / name, name=name,
                 config={"mappings": {"bind_addr": bind}, "log": {"level": "warn"},
                         "cluster": {"node_name": name}})
    if pg:
        srv.config["database"] = {"url": pg.url}
        srv.write_config()
    return srv.start(timeout=30)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    mb = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    reps = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    if not pg_available():
        sys.exit("PostgreSQL server binaries not installed (apt-get install postgresql)")
    work = tempfile.mkdtemp(prefix="portmux-cluster-bench-")
    os.chmod(work, 0o755)  # initdb runs as the postgres user and must reach its dir
    pg = PgServer(work).start()
    servers = []
    try:
        a = node(work, "a", pg, "127.0.0.2")
        b = node(work, "b", pg, "127.0.0.3")
        lite = node(work, "lite", None, "127.0.0.1")
        servers = [a, b, lite]
        sink = Sink()
        sink.start()
        lat = []
        for i in range(n):
            port = free_port()
            t0 = time.monotonic()
            st, body = a.create(port=port, target_ip="127.0.0.1", target_port=sink.port)
            if st != 201:
                sys.exit(f"create {port}: {st} {body}")
            wait_until(lambda: accepts("127.0.0.3", port), timeout=30, interval=0.0005,
                       desc=f"port {port} on node b")
            lat.append((time.monotonic() - t0) * 1000)
        print(f"create -> listening on every node, {n} creates (ms): "
              f"p50 {pct(lat, 50):.1f}  p90 {pct(lat, 90):.1f}  p99 {pct(lat, 99):.1f}  "
              f"max {max(lat):.1f}")
        pg_port = free_port()
        a.create(port=pg_port, target_ip="127.0.0.1", target_port=sink.port)
        lite_port = free_port()
        lite.create(port=lite_port, target_ip="127.0.0.1", target_port=sink.port)
        res = {"postgres": [], "sqlite": []}
        for _ in range(reps):
            res["postgres"].append(stream("127.0.0.2", pg_port, mb))
            res["sqlite"].append(stream("127.0.0.1", lite_port, mb))
        for k, v in res.items():
            print(f"relay throughput, {k} node ({n + 1} mappings stored): "
                  f"median {statistics.median(v):.0f} MB/s over {reps} x {mb} MB "
                  f"({', '.join(f'{x:.0f}' for x in v)})")
    finally:
        for s in servers:
            s.stop()
        pg.cleanup()


if __name__ == "__main__":
    main()
