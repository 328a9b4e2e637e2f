#!/usr/bin/env python3
"""Control-plane benchmark of portmux-server (127.0.0.1 only, every step bounded in time).

  control.py bench --server BIN --work DIR [--mappings 1000] [--clients 1000] [--reps 3]
                   [--api-port 19110] [--tunnel-port 19111] [--port-base 16000] --out FILE.tsv
  control.py clients --port PORT --n N --ready FILE [--hold 120]

bench:
  1. starts a server (fresh database, tunnel.clients = c0..c{N-1} with tokens
     bench-token-0000.. (config tokens are 16+ characters),
     log level warn) and creates --mappings direct mappings one by one through the API
     (one keep-alive HTTP connection): latency per create, p50/p99/max;
  2. GET /api/mapping/list with all of them, --reps x 10 times: p50/max;
  3. stops the server (SIGTERM) and starts it again --reps times on the same database: time
     from exec until /health answers with mappings=N and the list shows all N "listening"
     (and, checked after the clock stops, the kernel shows every port listening);
  4. connects --clients tunnel clients (the `clients` mode below, a separate process), each
     its own session, and measures the server's RSS/PSS before and with all of them in.
clients:
  N tunnel sessions speaking the wire protocol (SPEC §4): Hello {"name":"cI","token":"bench-token-000I",
  "version":"bench"} -> HelloResponse {"ok":true}; then they hold, echo every KeepAlive the
  server sends and send an empty KeepAlive every 10 s. Writes the number of accepted sessions
  to --ready, holds until SIGTERM or --hold seconds.
Results: "key<TAB>value" lines in --out. Exit status 1 when something did not work (a create
failed, the list or the restore is incomplete, clients were refused), 0 otherwise."""
import argparse, asyncio, http.client, json, os, resource, signal, struct, subprocess, sys, time


def bench_token(i):
    """Client cI's token: config tokens must be at least 16 characters (SPEC §4a)."""
    return f"bench-token-{i:04d}"


def raise_nofile(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, want), hard), hard))


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------- tunnel clients driver

FRAME = struct.Struct(">BBI")
T_KEEPALIVE, T_HELLO, T_HELLO_RESP = 0x05, 0x06, 0x07


async def one_client(port, i, sem, state):
    async with sem:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        hello = json.dumps({"name": f"c{i}", "token": bench_token(i), "version": "bench"}).encode()
        w.write(FRAME.pack(1, T_HELLO, len(hello)) + hello)
        await w.drain()
        ver, typ, n = FRAME.unpack(await asyncio.wait_for(r.readexactly(6), 10))
        body = await asyncio.wait_for(r.readexactly(n), 10)
        if ver != 1 or typ != T_HELLO_RESP or not json.loads(body).get("ok"):
            w.close()
            raise RuntimeError(f"c{i}: refused: type {typ} {body[:200]!r}")
    state["ok"] += 1
    return r, w


async def serve_client(r, w, state):
    """Echo KeepAlives; count a session that the server closes."""
    try:
        while True:
            hdr = await r.readexactly(6)
            ver, typ, n = FRAME.unpack(hdr)
            payload = await r.readexactly(n) if n else b""
            if typ == T_KEEPALIVE and n in (0, 8):
                w.write(hdr + payload)
    except (asyncio.IncompleteReadError, ConnectionError):
        state["lost"] += 1
    except asyncio.CancelledError:
        pass


async def ticker(writers):
    while True:
        await asyncio.sleep(10)
        for w in writers:
            if not w.is_closing():
                w.write(FRAME.pack(1, T_KEEPALIVE, 0))


async def clients_main(a):
    state = {"ok": 0, "lost": 0}
    sem = asyncio.Semaphore(64)
    t0 = time.time()
    res = await asyncio.gather(*[one_client(a.port, i, sem, state) for i in range(a.n)],
                               return_exceptions=True)
    ok = [x for x in res if not isinstance(x, BaseException)]
    errs = [repr(x) for x in res if isinstance(x, BaseException)]
    print(f"clients: {len(ok)}/{a.n} sessions up in {time.time() - t0:.2f}s"
          + (f"; first error {errs[0]}" if errs else ""), flush=True)
    tasks = [asyncio.create_task(serve_client(r, w, state)) for r, w in ok]
    tick = asyncio.create_task(ticker([w for _, w in ok]))
    with open(a.ready, "w") as f:
        f.write(f"{len(ok)}\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), a.hold)
    except asyncio.TimeoutError:
        pass
    tick.cancel()
    for t in tasks:
        t.cancel()
    for _, w in ok:
        w.close()
    if state["lost"]:
        print(f"clients: {state['lost']} sessions were closed by the server while held", flush=True)


# ---------------------------------------------------------------- server benchmark

class Api:
    def __init__(self, port):
        self.port = port
        self.c = None

    def req(self, method, path, body=None, timeout=10):
        for attempt in (0, 1):  # one retry on a connection the server closed meanwhile
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                hdrs = {"Content-Type": "application/json"} if body is not None else {}
                self.c.request(method, path, body=body, headers=hdrs)
                resp = self.c.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                return resp.status, data
            except (ConnectionError, http.client.HTTPException, OSError):
                self.close()
                if attempt:
                    raise

    def close(self):
        if self.c:
            self.c.close()
        self.c = None


def mem_kb(pid):
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def listening_ports():
    """Local ports in LISTEN state on IPv4/IPv6 (from /proc, no ss fork)."""
    ports = set()
    for fn in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(fn) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[3] == "0A":
                        ports.add(int(p[1].rsplit(":", 1)[1], 16))
        except OSError:
            pass
    return ports


class Bench:
    def __init__(self, a):
        self.a = a
        self.res = {}
        self.broken = []
        self.proc = None
        self.d = os.path.join(a.work, "run", "control")
        os.makedirs(self.d, exist_ok=True)
        self.log = open(os.path.join(self.d, "server.log"), "ab")
        self.api = Api(a.api_port)

    def put(self, k, v):
        self.res[k] = v
        print(f"  {k} = {v}", flush=True)

    def fail(self, what):
        self.broken.append(what)
        print(f"  BROKEN: {what}", flush=True)

    def write_config(self):
        a = self.a
        busy = listening_ports()
        # N free ports from port_base on (skip any another program holds)
        self.ports, p = [], a.port_base
        while len(self.ports) < a.mappings and p < 65536:
            if p not in busy:
                self.ports.append(p)
            p += 1
        lines = [
            f"port_range: {{from: {a.port_base}, end: {min(65535, p + 10)}}}",
            "tunnel:",
            "  enabled: true",
            "  listen_addr: 127.0.0.1",
            f"  listen_port: {a.tunnel_port}",
            # The bench's clients all come from 127.0.0.1, 64 handshakes at a time; one
            # source may hold an eighth of max_pending waiting for their Hello (16 of the
            # default 128), which refused all but 256 of them. An eighth of 1024 is 128.
            "  max_pending: 1024",
            "  clients:",
        ]
        for i in range(max(1, a.clients)):
            lines.append(f"    - {{name: c{i}, token: {bench_token(i)}}}")
        lines += ["api:", "  listen_addr: 127.0.0.1", f"  listen_port: {a.api_port}",
                  "  max_connections: 1024",
                  "database:", f"  path: {self.d}/mappings.db",
                  "log:", "  level: warn", ""]
        self.cfg = os.path.join(self.d, "config.yaml")
        with open(self.cfg, "w") as f:
            f.write("\n".join(lines))
        for ext in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.d}/mappings.db{ext}")
            except FileNotFoundError:
                pass

    def start(self):
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([self.a.server, "--config", self.cfg], stdout=self.log,
                                     stderr=self.log, stdin=subprocess.DEVNULL)
        return t0

    def stop(self):
        if not self.proc:
            return
        self.api.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.fail("server did not exit within 5 s of SIGTERM")
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def health(self, timeout=0.5):
        c = http.client.HTTPConnection("127.0.0.1", self.a.api_port, timeout=timeout)
        try:
            c.request("GET", "/health")
            r = c.getresponse()
            return json.loads(r.read()) if r.status == 200 else None
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            c.close()

    def wait_health(self, cond, limit):
        end = time.perf_counter() + limit
        while time.perf_counter() < end:
            if self.proc.poll() is not None:
                return None
            h = self.health()
            if h and cond(h):
                return h
            time.sleep(0.002)
        return None

    def all_listening(self):
        st, body = self.api.req("GET", "/api/mapping/list")
        if st != 200:
            return False
        ms = json.loads(body)["data"]["mappings"]
        return len(ms) == len(self.ports) and all(m["status"] == "listening" for m in ms)

    def run(self):
        a = self.a
        self.write_config()
        n = len(self.ports)
        self.put("mappings", n)
        self.start()
        if not self.wait_health(lambda h: True, 15):
            self.fail("server did not start")
            return
        self.put("rss_empty_kb", mem_kb(self.proc.pid)[0])

        # 1. create
        lat, bad = [], 0
        t_all = time.perf_counter()
        for p in self.ports:
            body = json.dumps({"port": p, "target_ip": "127.0.0.1", "target_port": a.target_port})
            t0 = time.perf_counter()
            st, data = self.api.req("POST", "/api/mapping/create", body)
            lat.append((time.perf_counter() - t0) * 1e3)
            if st != 201:
                bad += 1
                if bad == 1:
                    print(f"  create {p}: {st} {data[:200]!r}", flush=True)
        self.put("create_total_s", round(time.perf_counter() - t_all, 3))
        self.put("create_failed", bad)
        self.put("create_p50_ms", round(pct(lat, 50), 3))
        self.put("create_p99_ms", round(pct(lat, 99), 3))
        self.put("create_max_ms", round(max(lat), 3))
        if bad:
            self.fail(f"{bad} of {n} creates failed")
        self.put("rss_mappings_kb", mem_kb(self.proc.pid)[0])

        # 2. list
        lt, cnt = [], None
        for _ in range(a.reps * 10):
            t0 = time.perf_counter()
            st, body = self.api.req("GET", "/api/mapping/list")
            lt.append((time.perf_counter() - t0) * 1e3)
            cnt = json.loads(body)["data"]["count"] if st == 200 else None
        self.put("list_p50_ms", round(pct(lt, 50), 3))
        self.put("list_max_ms", round(max(lt), 3))
        self.put("list_bytes", len(body))
        if cnt != n - bad:
            self.fail(f"list counted {cnt} mappings, expected {n - bad}")

        # 3. restore
        rt, rh = [], []
        for i in range(a.reps):
            self.stop()
            t0 = self.start()
            h = self.wait_health(lambda h: h.get("mappings") == n, 15)
            th = time.perf_counter()
            ok = h is not None
            while ok and not self.all_listening():
                if time.perf_counter() - t0 > 15:
                    ok = False
                time.sleep(0.002)
            t1 = time.perf_counter()
            if not ok:
                self.fail(f"restart {i + 1}: not all {n} mappings restored and listening within 15 s")
                break
            missing = set(self.ports) - listening_ports()
            if missing:
                self.fail(f"restart {i + 1}: {len(missing)} ports not listening per the kernel")
            rt.append(t1 - t0)
            rh.append(th - t0)
            print(f"  restore {i + 1}: health {th - t0:.3f}s, all listening {t1 - t0:.3f}s", flush=True)
        if rt:
            self.put("restore_s", round(pct(rt, 50), 3))
            self.put("restore_max_s", round(max(rt), 3))
            self.put("restore_health_s", round(pct(rh, 50), 3))
        if not self.proc or self.proc.poll() is not None:
            return
        self.put("rss_restored_kb", mem_kb(self.proc.pid)[0])

        # 4. tunnel clients
        if a.clients <= 0:
            return
        # a fresh server (restored, no list calls before) so the delta is the clients' own
        self.stop()
        self.start()
        if not self.wait_health(lambda h: h.get("mappings") == n, 15):
            self.fail("server did not come back for the clients test")
            return
        time.sleep(0.5)
        r0, p0 = mem_kb(self.proc.pid)
        ready = os.path.join(self.d, "clients.ready")
        try:
            os.unlink(ready)
        except FileNotFoundError:
            pass
        drv = subprocess.Popen([sys.executable, os.path.abspath(__file__), "clients", "--port",
                                str(a.tunnel_port), "--n", str(a.clients), "--ready", ready,
                                "--hold", "120"])
        try:
            end = time.time() + 60 + a.clients / 50
            while time.time() < end and not os.path.exists(ready) and drv.poll() is None:
                time.sleep(0.05)
            got = int(open(ready).read() or 0) if os.path.exists(ready) else 0
            h = self.wait_health(lambda h: h.get("clients") == a.clients, 10) if got else None
            time.sleep(1)
            r1, p1 = mem_kb(self.proc.pid)
            t0 = time.perf_counter()
            st, body = self.api.req("GET", "/api/clients")
            self.put("clients_list_ms", round((time.perf_counter() - t0) * 1e3, 3))
            self.put("clients", a.clients)
            self.put("clients_ok", got)
            self.put("clients_health", (self.health() or {}).get("clients"))
            self.put("rss_clients_base_kb", r0)
            self.put("rss_clients_kb", r1)
            if got:
                self.put("kb_per_client_rss", round((r1 - r0) / got, 2))
                self.put("kb_per_client_pss", round((p1 - p0) / got, 2))
            if got != a.clients or h is None:
                self.fail(f"only {got} of {a.clients} tunnel clients were accepted")
        finally:
            drv.send_signal(signal.SIGTERM)
            try:
                drv.wait(10)
            except subprocess.TimeoutExpired:
                drv.kill()
                drv.wait()


def bench_main(a):
    raise_nofile(8192 + 2 * (a.mappings + a.clients))
    b = Bench(a)
    print(f"control.py: {a.mappings} mappings, {a.clients} tunnel clients, {a.reps} reps", flush=True)
    try:
        b.run()
    except Exception as e:  # noqa: BLE001 - report and mark broken, never hang
        b.fail(f"{type(e).__name__}: {e}")
    finally:
        try:
            b.stop()
        except Exception as e:  # noqa: BLE001
            b.fail(f"stop: {e}")
    with open(a.out, "w") as f:
        for k, v in b.res.items():
            f.write(f"{k}\t{v}\n")
        f.write(f"broken\t{'; '.join(b.broken)}\n")
    return 1 if b.broken else 0


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench")
    b.add_argument("--server", required=True)
    b.add_argument("--work", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--mappings", type=int, default=1000)
    b.add_argument("--clients", type=int, default=1000)
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--api-port", type=int, default=19110)
    b.add_argument("--tunnel-port", type=int, default=19111)
    b.add_argument("--port-base", type=int, default=16000)
    b.add_argument("--target-port", type=int, default=19090)
    c = sub.add_parser("clients")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--ready", required=True)
    c.add_argument("--hold", type=float, default=120)
    a = ap.parse_args()
    if a.cmd == "clients":
        raise_nofile(a.n + 1024)
        asyncio.run(asyncio.wait_for(clients_main(a), a.hold + 120))
        return 0
    return bench_main(a)


if __name__ == "__main__":
    sys.exit(main())
