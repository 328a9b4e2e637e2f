"""Crash safety: creates and removes (300 by default, PORTMUX_CRASH_OPS) while the server
is killed with SIGKILL at random moments (sometimes with a request in flight), then
restarted. Whatever the API confirmed
must hold after every restart; an answer lost to the kill may go either way; SQLite's
integrity check passes at the end. The seed is in every failure message
(PORTMUX_CRASH_SEED reproduces a run)."""
import http.client
import json
import os
import random
import socket
import threading
import time

import pytest

from conftest import Worker, free_ports, sqlite

PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


class Ledger:
    """What the API confirmed per port: present, absent, or unknown (answer lost)."""

    def __init__(self, ports, seed):
        self.state = {p: ABSENT for p in ports}
        self.seed = seed
        self.log = []

    def record(self, op, port, outcome):
        """outcome: an HTTP status, or None when the answer was lost."""
        self.log.append((op, port, outcome, self.state[port]))
        before = self.state[port]
        if outcome is None:
            self.state[port] = UNKNOWN
            return
        if op == "create":
            if outcome == 201:
                assert before != PRESENT, self.why(f"create {port} -> 201 but it existed")
                self.state[port] = PRESENT
            elif outcome == 409:
                assert before != ABSENT, self.why(f"create {port} -> 409 but it was removed")
                self.state[port] = PRESENT
            else:
                raise AssertionError(self.why(f"create {port} -> {outcome}"))
        else:
            if outcome == 200:
                assert before != ABSENT, self.why(f"remove {port} -> 200 but it was absent")
                self.state[port] = ABSENT
            elif outcome == 404:
                assert before != PRESENT, self.why(f"remove {port} -> 404 but it was created")
                self.state[port] = ABSENT
            else:
                raise AssertionError(self.why(f"remove {port} -> {outcome}"))

    def check(self, listed, where):
        """listed: {port: mapping} from the API. Settles the unknowns from it."""
        for port, st in self.state.items():
            if st == PRESENT:
                assert port in listed, self.why(f"{where}: confirmed mapping {port} is gone")
            elif st == ABSENT:
                assert port not in listed, self.why(f"{where}: removed/never-created {port} "
                                                    f"is back")
            else:
                self.state[port] = PRESENT if port in listed else ABSENT
        extra = set(listed) - set(self.state)
        assert not extra, self.why(f"{where}: mappings nobody asked for: {sorted(extra)}")

    def why(self, msg):
        tail = "\n".join(f"  {op} {port} -> {out} (was {was})" for op, port, out, was in
                         self.log[-12:])
        return f"{msg} [seed {self.seed}]\nlast operations:\n{tail}"


def one_op(srv, op, port, target_port, sent=None):
    """The status of one create/remove, or None when the connection died first.

    sent (a threading.Event) is set once the whole request is written."""
    if op == "create":
        path, body = "/api/mapping/create", {"port": port, "target_ip": "127.0.0.1",
                                             "target_port": target_port}
    else:
        path, body = "/api/mapping/remove", {"port": port}
    conn = http.client.HTTPConnection("127.0.0.1", srv.api_port, timeout=10)
    try:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        if sent is not None:
            sent.set()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        if sent is not None:
            sent.set()
        conn.close()


def listed_now(srv, ledger):
    maps = srv.list()
    by_port = {m["port"]: m for m in maps}
    assert len(by_port) == len(maps), ledger.why(f"a port is listed twice: {maps}")
    return by_port


@pytest.mark.slow
def test_kill9_during_creates_and_removes(server_factory, echo_backend):
    seed = int(os.environ.get("PORTMUX_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    ports = free_ports(16)
    srv = server_factory()
    ledger = Ledger(ports, seed)
    t_end = time.monotonic() + 50
    ops = 0
    kills = 0
    inflight_kills = 0
    next_kill = rng.randint(5, 15)
    total_ops = int(os.environ.get("PORTMUX_CRASH_OPS", 300))
    latency = 0.002  # running mean of one create/remove, seconds
    while ops < total_ops:
        assert time.monotonic() < t_end, ledger.why(f"too slow: {ops} operations in 50 s")
        port = rng.choice(ports)
        op = "create" if rng.random() < 0.55 else "remove"
        ops += 1
        next_kill -= 1
        if next_kill > 0:
            t0 = time.monotonic()
            ledger.record(op, port, one_op(srv, op, port, echo_backend.port))
            latency = 0.8 * latency + 0.2 * (time.monotonic() - t0)
            continue
        # Kill while this request runs in another thread, at once or a random delay of up to 1.2
        # requests after it was written: before it is read, during the bind and the
        # transaction, or after the answer.
        sent = threading.Event()
        w = Worker(one_op, srv, op, port, echo_backend.port, sent)
        w.start()
        sent.wait(5)
        if rng.random() < 0.5:
            time.sleep(rng.uniform(0, 1.2 * latency))
        srv.kill9()
        kills += 1
        outcome = w.join_result(15)
        if outcome is None:
            inflight_kills += 1
        ledger.record(op, port, outcome)
        srv.start()
        by_port = listed_now(srv, ledger)
        ledger.check(by_port, f"after kill {kills}")
        for p, m in by_port.items():
            assert m["status"] == "listening", ledger.why(f"restored {p} is {m['status']}: {m}")
        next_kill = rng.randint(5, 15)
    # A last kill with nothing in flight, then the final state.
    srv.kill9()
    integrity = sqlite(srv.db_path, "PRAGMA integrity_check")
    assert integrity == [["ok"]], ledger.why(f"integrity_check: {integrity}")
    srv.start()
    by_port = listed_now(srv, ledger)
    ledger.check(by_port, "at the end")
    for p, m in by_port.items():
        assert m["status"] == "listening", ledger.why(f"restored {p} is {m['status']}: {m}")
    rows = {int(r[0]) for r in srv.sqlite("SELECT port FROM mappings")}
    assert rows == set(by_port), ledger.why(f"store {sorted(rows)} != API {sorted(by_port)}")
    assert kills >= total_ops // 15, f"only {kills} kills in {total_ops} operations"
    # The survivors still relay.
    for p in list(by_port)[:3]:
        with socket.create_connection(("127.0.0.1", p), timeout=5) as s:
            s.sendall(b"ping")
            s.settimeout(5)
            assert s.recv(4) == b"ping", ledger.why(f"restored {p} does not relay")
    print(f"seed {seed}: {ops} ops, {kills} kills, {inflight_kills} with the answer lost, "
          f"{len(by_port)} mappings at the end")


@pytest.mark.slow
def test_kill9_under_concurrent_load(server_factory, echo_backend):
    """Four threads create/remove on disjoint ports while the server is killed and
    restarted three times; every confirmed outcome survives, the database stays sound."""
    seed = int(os.environ.get("PORTMUX_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    groups = [free_ports(5) for _ in range(4)]
    srv = server_factory()
    ledger = Ledger([p for g in groups for p in g], seed)
    cond = threading.Condition()
    gate = {"open": True, "stop": False, "inflight": 0, "ops": 0}

    def worker(ports, wseed):
        r = random.Random(wseed)
        while True:
            with cond:
                while not gate["open"] and not gate["stop"]:
                    cond.wait(0.1)
                if gate["stop"]:
                    return
                gate["inflight"] += 1
            port = r.choice(ports)
            op = "create" if r.random() < 0.55 else "remove"
            outcome = one_op(srv, op, port, echo_backend.port)
            with cond:
                gate["inflight"] -= 1
                gate["ops"] += 1
                cond.notify_all()
                ledger.record(op, port, outcome)

    threads = [Worker(worker, g, rng.randrange(1 << 30)) for g in groups]
    for t in threads:
        t.start()
    try:
        for k in range(3):
            time.sleep(rng.uniform(0.2, 0.6))
            with cond:
                gate["open"] = False
            srv.kill9()  # requests in flight now lose their answers
            srv.start()
            with cond:
                assert cond.wait_for(lambda: gate["inflight"] == 0, timeout=20), \
                    "a request is still in flight 20 s after the restart"
                ledger.check(listed_now(srv, ledger), f"after concurrent kill {k + 1}")
                gate["open"] = True
                cond.notify_all()
    finally:
        with cond:
            gate["stop"] = True
            cond.notify_all()
        for t in threads:
            t.join_result(30)
    assert gate["ops"] >= 20, f"only {gate['ops']} operations ran"
    srv.kill9()
    assert sqlite(srv.db_path, "PRAGMA integrity_check") == [["ok"]], ledger.why("integrity")
    srv.start()
    ledger.check(listed_now(srv, ledger), "at the end")
