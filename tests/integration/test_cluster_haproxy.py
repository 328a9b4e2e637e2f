"""SPEC §7 deployment picture: a real haproxy as the L4 balancer in front of two nodes
(127.0.0.2, 127.0.0.3) on one PostgreSQL. A mapping created on one node is served
through the balancer by both; when a node dies, the health check moves new connections
to the other and only the dead node's connections are lost."""
import os
import shutil

import pytest

from conftest import connect, free_port, recv_exact, wait_until
from pg_helpers import pg  # noqa: F401  (fixture)
from test_cluster_pg import echo_ok, two_nodes

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_config(front_port, backends):
    # "server n 127.0.0.2" without a port keeps the destination port: one frontend port
    # per mapping port, as an operator would list them. The health check needs a port of
    # its own: the mapping's listener on that node.
    servers = "\n".join(f"    server {name} {addr} check port {front_port} inter 300 fall 2 rise 1"
                        for name, addr in backends)
    return f"""global
    maxconn 2000
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{front_port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
"""


def through(port, payload):
    try:
        echo_ok(port, payload=payload)
        return True
    except (OSError, AssertionError):
        return False


def test_balancer_in_front_of_two_nodes(pg, server_factory, proc_factory,  # noqa: F811
                                        echo_backend, tmp_path):
    if not os.path.exists(HAPROXY):
        pytest.skip("haproxy not installed")
    a, b = two_nodes(server_factory, pg)
    port = free_port()
    a.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    wait_until(lambda: (b.mapping(port) or {}).get("status") == "listening", timeout=5,
               desc="b serves the mapping a created")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, [("n1", "127.0.0.2"), ("n2", "127.0.0.3")]))
    proc_factory([HAPROXY, "-db", "-f", cfg], "haproxy")
    wait_until(lambda: through(port, b"hello"), timeout=10, desc="balancer forwards")
    # Round robin: both nodes carry connections of the one mapping.
    for i in range(10):
        assert through(port, b"x%d" % i)
    wait_until(lambda: a.mapping(port)["total_connections"] > 0 and
               b.mapping(port)["total_connections"] > 0, timeout=5,
               desc="both nodes served connections")
    # A connection open through node b (the one that stays) ...
    held = None
    for _ in range(10):
        s = connect(port)
        s.sendall(b"ping")
        assert recv_exact(s, 4) == b"ping"
        if b.mapping(port)["active_connections"] > 0:
            held = s
            break
        s.close()
    assert held is not None, "no connection landed on b"
    # ... survives a's death; new connections all go to b once the check notices.
    a.kill9()
    wait_until(lambda: all(through(port, b"after%d" % i) for i in range(6)), timeout=15,
               desc="every new connection served after a died")
    held.sendall(b"still")
    assert recv_exact(held, 5) == b"still"
    held.close()
