"""Forwarding loops (SPEC §2 "No forwarding loops", issue 14 item 4).

A direct mapping whose target is this server itself -- a local address on a port it
listens on -- is refused at create (400 invalid_field naming target_ip) and, when one is
in the store anyway or a name means this host, at dial time. A loop the server cannot see
(through a tunnel client on its own host) is survived: /health keeps answering within 1 s,
the log stays bounded, and everything is freed once the first connection closes."""
import os
import re
import socket
import subprocess
import time

import pytest

from conftest import connect, free_port, free_ports, limit_descriptors, wait_until
from sec_helpers import env_int, metric
from tunnel_helpers import client_info, start_client, tunnel_server

TOKEN = "tok-default-0123456789"


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def host_addresses():
    """This host's non-loopback interface addresses (IPv4 and IPv6, link-local left out)."""
    try:
        out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    addrs = []
    for m in re.finditer(r"\binet6? ([0-9a-f.:]+)/\d+ .*?scope (\w+)", out):
        addr, scope = m.groups()
        if scope == "global":
            addrs.append(addr)
    return addrs


def refused_as_loop(srv, **fields):
    status, body = srv.create(**fields)
    assert status == 400, (fields, status, body)
    assert body["error"] == "invalid_field", body
    assert "target_ip" in body["message"], body
    assert "loop" in body["message"], body
    assert srv.mapping(fields["port"]) is None, "a refused mapping must not be stored"


def closed_at_once(port, timeout=5.0):
    """Connects and sends a byte; True when the server closes the connection in time."""
    with connect(port) as s:
        s.settimeout(timeout)
        try:
            s.sendall(b"x")
            return s.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


@pytest.mark.parametrize("target", ["127.0.0.1", "127.0.0.2", "127.255.255.254", "LOCALHOST",
                                    "localhost", "app.localhost", "::1", "::ffff:127.0.0.1",
                                    "0.0.0.0", "::", "::ffff:0.0.0.0"])
def test_create_refuses_self_target(server_factory, target):
    """The addresses and names of the issue (and their relatives) on the mapping's own
    port, another mapping's port, the API port and the tunnel port."""
    srv = tunnel_server(server_factory, clients=[{"name": "default", "token": TOKEN}])
    own, other = free_ports(2)
    srv.create_ok(port=other, target_ip="192.0.2.55", target_port=80)
    for target_port in (own, other, srv.api_port, srv.tunnel_port):
        refused_as_loop(srv, port=own, target_ip=target, target_port=target_port)
    # The same address on a port the server does not listen on is an ordinary target.
    free = free_port()
    srv.create_ok(port=own, target_ip=target, target_port=free)
    srv.health()


@pytest.mark.parametrize("target", ["127.0.0.2", "LOCALHOST", "::1", "0.0.0.0"])
def test_create_without_ports_refuses_self_target(server_factory, target):
    """port and target_port omitted: the target is whichever port the server picks, the
    mapping's own listener."""
    srv = server_factory()
    status, body = srv.create(target_ip=target)
    assert status == 400 and body["error"] == "invalid_field", (status, body)
    assert "loop" in body["message"] or "target_port is required" in body["message"], body
    assert srv.list() == []


def test_update_refuses_self_target(server_factory):
    """An update cannot make a direct mapping a loop that a create would refuse."""
    srv = tunnel_server(server_factory, clients=[{"name": "default", "token": TOKEN}])
    port, other = free_ports(2)
    srv.create_ok(port=other, target_ip="192.0.2.55", target_port=80)
    srv.create_ok(port=port, target_ip="192.0.2.55", target_port=80)
    for target in ("127.0.0.2", "localhost", "::1"):
        for target_port in (port, other, srv.api_port, srv.tunnel_port):
            status, body = srv.api("POST", "/api/mapping/update",
                                   body={"port": port, "target_ip": target,
                                         "target_port": target_port})[::2]
            assert status == 400 and body["error"] == "invalid_field", (status, body)
            assert "loop" in body["message"], body
    m = srv.mapping(port)
    assert (m["target_ip"], m["target_port"]) == ("192.0.2.55", 80), m
    # An ordinary target is still fine.
    status, body = srv.api("POST", "/api/mapping/update",
                           body={"port": port, "target_ip": "127.0.0.2",
                                 "target_port": free_port()})[::2]
    assert status == 200, body


def test_create_refuses_host_address(server_factory):
    addrs = host_addresses()
    if not addrs:
        pytest.skip("this machine has no non-loopback interface address")
    srv = server_factory()
    for addr in addrs:
        port = free_port()
        refused_as_loop(srv, port=port, target_ip=addr, target_port=port)
        refused_as_loop(srv, port=port, target_ip=addr, target_port=srv.api_port)


def test_create_refuses_host_name(server_factory):
    """The host's own name, any case, is this host."""
    srv = server_factory()
    port = free_port()
    refused_as_loop(srv, port=port, target_ip=socket.gethostname().upper(), target_port=port)


def test_pair_refused_at_create(server_factory):
    """The issue's pair 31020 -> 31021 -> 31020, on free ports: the second half is the
    loop and is refused."""
    srv = server_factory()
    a, b = free_ports(2)
    srv.create_ok(port=a, target_ip="127.0.0.1", target_port=b)
    refused_as_loop(srv, port=b, target_ip="127.0.0.1", target_port=a)


def test_stored_loops_refused_at_dial(server_factory):
    """Mappings stored before this check (written into the database by hand): a pair and a
    self-loop by name. Every connection is refused before any connect, counted as failed;
    the server stays responsive and its log bounded."""
    srv = server_factory(config={"log": {"level": "info"}})
    a, b, c = free_ports(3)
    srv.create_ok(port=a, target_ip="127.0.0.1", target_port=b)
    srv.stop()
    now = int(time.time())
    srv.sqlite(f"INSERT INTO mappings (port, target_ip, target_port, use_tunnel, client, name,"
               f" created_at) VALUES ({b}, '127.0.0.1', {a}, 0, '', 'b', {now}),"
               f" ({c}, 'LocalHost', {c}, 0, '', 'c', {now})", readonly=False)
    srv.start()
    wait_until(lambda: all((srv.mapping(p) or {}).get("status") == "listening"
                           for p in (a, b, c)), timeout=10, desc="all three restored")
    log_before = len(srv.log_text())
    for i in range(100):
        for p in (a, b, c):
            assert closed_at_once(p), f"connection {i} to {p} was not refused"
    t0 = time.monotonic()
    srv.health()
    assert time.monotonic() - t0 < 1.0
    for p in (b, c):
        m = srv.mapping(p)
        assert m["failed_connections"] >= 100, m
    # a -> b is a chain into a loop: its dial to b's port is refused as well.
    assert srv.mapping(a)["failed_connections"] >= 100
    grown = srv.log_text()[log_before:]
    assert "forwarding loop" in grown
    assert grown.count("\n") < 20, f"log grew by {grown.count(chr(10))} lines:\n{grown[:2000]}"


def test_stored_loop_by_hosts_name_refused_at_dial(server_factory):
    """A name that /etc/hosts maps to a loopback address (not localhost, not the host
    name) resolves only when dialled: refused then."""
    names = []
    try:
        with open("/etc/hosts") as f:
            for line in f:
                parts = line.split("#")[0].split()
                if len(parts) >= 2 and parts[0].startswith("127."):
                    names += [n for n in parts[1:] if n.lower() != "localhost"
                              and n.lower() != socket.gethostname().lower()
                              and not n.lower().endswith(".localhost")]
    except OSError:
        pass
    if not names:
        pytest.skip("/etc/hosts maps no extra name to a loopback address")
    srv = server_factory(config={"log": {"level": "info"}})
    port = free_port()
    # Refused at create too: /etc/hosts answers without a DNS query.
    refused_as_loop(srv, port=port, target_ip=names[0], target_port=port)
    srv.stop()
    srv.sqlite(f"INSERT INTO mappings (port, target_ip, target_port, use_tunnel, client, name,"
               f" created_at) VALUES ({port}, '{names[0]}', {port}, 0, '', '', 0)",
               readonly=False)
    srv.start()
    for _ in range(20):
        assert closed_at_once(port)
    assert srv.mapping(port)["failed_connections"] >= 20
    assert "forwarding loop" in srv.log_text()


def test_loop_through_tunnel_client_is_survived(server_factory, tmp_path, logs):
    """A tunnel mapping whose client (on this host) dials the mapping's own public port:
    the server cannot see it at create. One connection starts the loop; it is bounded by
    limits.max_connections_per_mapping, /health answers within 1 s all along, the log
    stays bounded, and once the first connection closes every descriptor and stream is
    freed and RSS comes back near where it was."""
    # The default limit (10000) behaves the same, only slower on a loaded test machine.
    limit = env_int("PORTMUX_SEC_LOOP_LIMIT", 2000)
    srv = tunnel_server(server_factory, clients=[{"name": "default", "token": TOKEN}])
    srv.stop()
    srv.config["log"] = {"level": "info"}
    srv.config["limits"] = {"max_connections_per_mapping": limit}
    srv.write_config()
    srv.start()
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=port, use_tunnel=True)
    wait_until(lambda: srv.mapping(port)["status"] == "listening", timeout=10)
    base_fds = fd_count(srv.pid)
    base_rss = srv.rss_kb()
    log_before = len(srv.log_text())

    first = connect(port)
    first.sendall(b"hello loop")
    worst = 0.0
    last_active = -1
    stable_since = time.monotonic()
    deadline = time.monotonic() + 120
    # While the loop grows: /health within 1 s every time, until the chain stops growing.
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        status, _, _ = srv.api("GET", "/health", timeout=5)
        worst = max(worst, time.monotonic() - t0)
        assert status == 200
        active = srv.mapping(port)["active_connections"]
        if active != last_active:
            last_active, stable_since = active, time.monotonic()
        elif time.monotonic() - stable_since > 2.0:
            break
        time.sleep(0.1)
    assert worst < 1.0, f"/health took {worst:.2f} s while the loop ran"
    assert last_active > 1, "the loop did not run (is the client dialling?)"
    assert last_active <= limit + 5, last_active
    print(f"loop held {last_active} connections; worst /health {worst:.3f} s")

    first.close()

    def freed():
        m = srv.mapping(port)
        c = client_info(srv) or {}
        return m["active_connections"] == 0 and c.get("streams") == 0
    wait_until(freed, timeout=60, interval=0.1, desc="the loop to unwind")
    wait_until(lambda: fd_count(srv.pid) <= base_fds + 4, timeout=10,
               desc=f"descriptors back near {base_fds}")
    rss = srv.rss_kb()
    if not srv.sanitized():
        assert rss - base_rss < 32 * 1024, f"RSS {base_rss} -> {rss} KiB after the loop"
    grown = srv.log_text()[log_before:]
    assert grown.count("\n") < 50, f"log grew by {grown.count(chr(10))} lines:\n{grown[:2000]}"
    srv.health()


def test_loop_with_few_descriptors_keeps_api(server_factory, tmp_path, logs):
    """The same loop with only 400 descriptors (hard limit too, so nothing can raise
    it): public connections stop short of the last 64, so the API keeps answering, and
    the loop unwinds once the first connection closes."""
    srv = tunnel_server(server_factory, clients=[{"name": "default", "token": TOKEN}])
    srv.stop()
    srv.config["log"] = {"level": "info"}
    srv.write_config()
    srv.start()
    limit_descriptors(srv, 400)
    start_client(tmp_path, logs, srv, TOKEN)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=port, use_tunnel=True)
    wait_until(lambda: srv.mapping(port)["status"] == "listening", timeout=10)
    base_fds = fd_count(srv.pid)
    log_before = len(srv.log_text())
    first = connect(port)
    first.sendall(b"x")
    # The loop reaches the reserve: refusals are counted, descriptors stay below 400.
    def reserve_refusals():
        _, _, text = srv.api("GET", "/metrics")
        return metric(text, "portmux_limit_refused_total", limit="descriptor_reserve") or 0
    wait_until(lambda: reserve_refusals() > 0, timeout=60,
               desc="the descriptor reserve to refuse")
    for _ in range(20):
        t0 = time.monotonic()
        srv.health()
        assert time.monotonic() - t0 < 1.0
        assert fd_count(srv.pid) <= 400 - 32
    first.close()
    wait_until(lambda: srv.mapping(port)["active_connections"] == 0, timeout=60,
               desc="the loop to unwind")
    wait_until(lambda: fd_count(srv.pid) <= base_fds + 4, timeout=10,
               desc=f"descriptors back near {base_fds}")
    grown = srv.log_text()[log_before:]
    assert grown.count("\n") < 50, f"log grew by {grown.count(chr(10))} lines:\n{grown[:2000]}"
    srv.health()
