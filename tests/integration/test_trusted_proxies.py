"""trusted_proxies: a real haproxy in front of the server sends a PROXY protocol header
(send-proxy / send-proxy-v2) from 127.0.0.3, as the cluster compose's balancer does. The
server takes the client's address from it on the tunnel port, the mapping ports and the
API, so allow_from, the per-source Hello limit, api.allowed_ips and the logs see the
client (127.0.0.5, 127.0.0.6 …) instead of the one balancer. Without it every client
behind a balancer shared one address: ten bad Hellos from anyone blocked them all."""
import re
import shutil
import socket
import struct
import time

import pytest

from conftest import (SERVER_BIN, SOURCE_DIR, connect, free_port, recv_exact, run_once, tcp_socket_inodes,
                      to_yaml, wait_until)
from test_clients import CFG_TOKEN, hello_answer
from test_reload import reload
from tunnel_helpers import client_count, client_info, client_proc, map_tunnel

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
BALANCER = "127.0.0.3"

pytestmark = pytest.mark.skipif(not shutil.which("haproxy") and
                                not __import__("os").path.exists(HAPROXY),
                                reason="haproxy not installed")


def haproxy_config(routes):
    """routes: [(front_port, back_port, send)] with send "send-proxy" or "send-proxy-v2"."""
    parts = ["""global
    maxconn 500
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s"""]
    for i, (front, back, send) in enumerate(routes):
        parts.append(f"""listen r{i}
    bind 127.0.0.1:{front}
    server s 127.0.0.1:{back} source {BALANCER} {send}""")
    return "\n".join(parts) + "\n"


def start_haproxy(proc_factory, tmp_path, routes):
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(haproxy_config(routes))
    p = proc_factory([HAPROXY, "-db", "-f", cfg], "haproxy")
    for front, _, _ in routes:
        wait_until(lambda: _listening(front), timeout=10, desc=f"haproxy on {front}")
    return p


def _listening(port):
    # Read off /proc rather than probed with a connection: a probe would go through
    # haproxy to the server at a moment of haproxy's choosing and upset the counts of the
    # test that follows (a mapping with max_connections 1 met the probe's late connection).
    return (port, 0) in tcp_socket_inodes()


def echo_once(port, payload, source, timeout=5.0):
    """Connects from source, sends payload, returns what comes back until EOF or timeout
    (b"" when the connection is refused or reset)."""
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                      source_address=(source, 0)) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
    except OSError:
        pass
    return got


def api_list_from(port, source):
    """GET /api/mapping/list (with the token) from source; returns the raw reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        s.sendall(b"GET /api/mapping/list HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                  b"Authorization: Bearer " + API_TOKEN.encode() + b"\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


def metric(srv, name):
    text = srv.api("GET", "/metrics")[2]
    m = re.search(r"^%s (\d+)$" % re.escape(name), text, re.M)
    assert m, name
    return int(m.group(1))


def client_through(tmp_path, logs, srv, front, *extra):
    """Starts portmux-client "edge" with --server the balancer's front port; returns once
    the server lists it, from the address the balancer's header names."""
    cli = client_proc(tmp_path, srv, CFG_TOKEN, *extra, name="edge",
                      server=f"127.0.0.1:{front}")
    logs.append(cli)
    cli.start()
    wait_until(lambda: client_count(srv, "edge") == 1, timeout=15,
               desc="the client in through the balancer")
    assert client_info(srv, "edge")["remote_addr"].startswith("127.0.0.1:")
    return cli


API_TOKEN = "trusted-proxies-api-token-0123"


def with_token(srv):
    """srv.api (and what calls it) sends the API token."""
    plain = srv.api

    def api(method, path, body=None, raw=None, headers=None, timeout=10.0):
        h = dict(headers or {})
        h.setdefault("Authorization", f"Bearer {API_TOKEN}")
        return plain(method, path, body=body, raw=raw, headers=h, timeout=timeout)
    srv.api = api
    return srv


def trusted_server(server_factory, extra=None):
    """A server trusting the balancer at 127.0.0.3. A balancer on this host brings others
    to the API on loopback, so the API has a token (the server refuses to start without
    one: test_a_balancer_on_this_host_needs_an_api_token)."""
    cfg = {"trusted_proxies": [f"{BALANCER}/32"],
           "tunnel": {"enabled": True, "clients": [{"name": "edge", "token": CFG_TOKEN}]},
           "api": {"allowed_ips": ["127.0.0.1/32", "127.0.0.5/32"], "token": API_TOKEN}}
    for k, v in (extra or {}).items():
        cfg[k] = v
    return with_token(server_factory(config=cfg))


def test_mappings_and_the_api_see_the_client_behind_the_balancer(server_factory, proc_factory,
                                                                  echo_backend, tmp_path):
    srv = trusted_server(server_factory)
    port = free_port()
    # The echo target receives our own v1 header first: it says whom the server saw.
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port,
                  proxy_protocol="v1", allow_from=["127.0.0.5"])
    front_map, front_api = free_port(), free_port()
    start_haproxy(proc_factory, tmp_path, [(front_map, port, "send-proxy"),
                                           (front_api, srv.api_port, "send-proxy-v2")])

    got = echo_once(front_map, b"hello", "127.0.0.5")
    assert re.match(rb"PROXY TCP4 127\.0\.0\.5 127\.0\.0\.1 \d+ %d\r\nhello$" % port, got), got
    # Another client behind the same balancer is not in allow_from: reset at accept.
    assert echo_once(front_map, b"hello", "127.0.0.6") == b""
    wait_until(lambda: srv.mapping(port)["refused_connections"] >= 1, timeout=5,
               desc="the refusal counted")

    # The API through the balancer: api.allowed_ips sees each client.
    assert api_list_from(front_api, "127.0.0.5").startswith(b"HTTP/1.1 200"), \
        api_list_from(front_api, "127.0.0.5")[:200]
    assert api_list_from(front_api, "127.0.0.6").startswith(b"HTTP/1.1 403")

    # A connection from the balancer's address without a header: closed, counted, logged
    # once; the header is never taken from anyone else.
    before = metric(srv, "portmux_proxy_header_refused_total")
    assert echo_once(port, b"GET / HTTP/1.0\r\n\r\n", BALANCER) == b""
    wait_until(lambda: metric(srv, "portmux_proxy_header_refused_total") == before + 1,
               timeout=5, desc="the headerless connection counted")
    srv.wait_log(r"port %d: connection from balancer 127\.0\.0\.3:\d+ closed: no valid PROXY "
                 r"protocol header" % port, timeout=5)
    forged = b"PROXY TCP4 127.0.0.5 127.0.0.1 1111 %d\r\nhello" % port
    assert echo_once(port, forged, "127.0.0.1") == b"", "a forged header let 127.0.0.1 in"
    # A health check (connect, close, no byte) is no refusal.
    before = metric(srv, "portmux_proxy_header_refused_total")
    socket.create_connection(("127.0.0.1", port), source_address=(BALANCER, 0)).close()
    time.sleep(0.3)
    assert metric(srv, "portmux_proxy_header_refused_total") == before
    assert srv.running()


def test_a_balancer_that_stalls_in_its_header_is_closed(server_factory):
    srv = trusted_server(server_factory)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(BALANCER, 0)) as s:
        s.sendall(b"PROXY TCP4 127.0.0.5 ")
        t0 = time.monotonic()
        s.settimeout(10)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
        waited = time.monotonic() - t0
    assert 4 <= waited <= 8, waited
    srv.wait_log(r"port %d: connection from balancer .* no PROXY header within 5 s" % port,
                 timeout=5)


def test_tunnel_clients_behind_the_balancer_are_told_apart(server_factory, proc_factory,
                                                           echo_backend, tmp_path, logs):
    srv = trusted_server(server_factory)
    front = free_port()
    start_haproxy(proc_factory, tmp_path, [(front, srv.tunnel_port, "send-proxy-v2")])
    # Ten bad Hellos from 127.0.0.7 through the balancer block 127.0.0.7 ...
    for i in range(10):
        assert hello_answer(front, "edge", f"wrong-token-{i:08d}",
                            source="127.0.0.7")["error"] == "auth_failed"
    assert hello_answer(front, "edge", CFG_TOKEN, source="127.0.0.7")["error"] == \
        "rate_limited"
    # ... and nobody else behind it: the real client from 127.0.0.1 gets in at once.
    client_through(tmp_path, logs, srv, front)
    port = map_tunnel(srv, echo_backend.port, client="edge")
    with connect(port) as s:
        s.sendall(b"through")
        assert recv_exact(s, 7) == b"through"
    log = srv.log_text()
    assert "127.0.0.7" in log
    assert not re.search(r"Hello.*from 127\.0\.0\.3", log), "the balancer was blamed"


def test_trusted_proxies_follow_a_reload(server_factory, echo_backend):
    srv = trusted_server(server_factory)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    assert echo_once(port, b"plain", BALANCER) == b""
    cfg = dict(srv.config)
    cfg["trusted_proxies"] = []
    log = reload(srv, cfg)
    assert "trusted_proxies" in log, log
    assert echo_once(port, b"plain", BALANCER) == b"plain"
    cfg["trusted_proxies"] = ["127.0.0.0/29"]
    reload(srv, cfg)
    assert echo_once(port, b"PROXY TCP4 127.0.0.9 127.0.0.1 1 2\r\nv1", BALANCER) == b"v1"
    assert echo_once(port, b"plain", BALANCER) == b""


@pytest.mark.parametrize("value,message", [
    (["0.0.0.0/0"], r"trusts too many addresses"),
    (["::/0"], r"trusts too many addresses"),
    (["10.0.0.0/8", "0.0.0.0/1"], r"trusts too many addresses"),
    (["::ffff:0.0.0.0/96"], r"trusts too many addresses"),
    (["2001::/15"], r"trusts too many addresses"),
    (["balancer.example"], r"invalid CIDR"),
    ("10.0.0.1", r"expected a sequence|expected a list"),
])
def test_bad_trusted_proxies_stop_the_start(tmp_path, value, message):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(to_yaml({"trusted_proxies": value,
                            "database": {"path": str(tmp_path / "db")}}) + "\n")
    r = run_once([SERVER_BIN, "--config", cfg])
    assert r.returncode == 2, r
    assert re.search(message, r.stderr.decode() + r.stdout.decode()), r
    assert "trusted_proxies" in r.stderr.decode() + r.stdout.decode()


def test_the_cluster_compose_trusts_its_own_balancer(server_factory):
    """docker/: haproxy sends send-proxy-v2 to every node, from the fixed address the
    nodes' config trusts, and that config starts."""
    docker = SOURCE_DIR / "docker"
    haproxy = (docker / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server .*$", haproxy, re.M)
    assert servers and all("send-proxy-v2" in s for s in servers), servers
    compose = (docker / "docker-compose.cluster.yml").read_text()
    addr = re.search(r"ipv4_address: ([0-9.]+)", compose).group(1)
    assert "./cluster-node.yaml:/etc/portmux/config.yaml" in compose
    text = (docker / "cluster-node.yaml").read_text()
    assert re.search(r"^trusted_proxies: \[%s\]" % re.escape(addr), text, re.M), text
    api_port = free_port()
    text = text.replace("/var/lib/portmux/mappings.db", str(SOURCE_DIR / "nonexistent"))
    text = text.replace("listen_addr: 0.0.0.0", "listen_addr: 127.0.0.1")
    text = text.replace("listen_port: 8080", f"listen_port: {api_port}")
    text = text.replace("listen_port: 9000", f"listen_port: {free_port()}")
    srv = server_factory(config_text=text, api_port=api_port, start=False)
    text = text.replace(str(SOURCE_DIR / "nonexistent"), str(srv.dir / "m.db"))
    srv.config_text = text
    srv.write_config()
    srv.start()
    assert srv.health()["status"] == "ok"


def test_a_tls_tunnel_through_the_balancer(server_factory, proc_factory, pki, echo_backend,
                                           tmp_path, logs):
    """The header comes before the TLS handshake: the server reads it off the raw socket,
    then TLS starts on the bytes after it."""
    srv = trusted_server(server_factory, {"tunnel": {
        "enabled": True, "clients": [{"name": "edge", "token": CFG_TOKEN}],
        "tls": {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"])}}})
    front = free_port()
    start_haproxy(proc_factory, tmp_path, [(front, srv.tunnel_port, "send-proxy-v2")])
    client_through(tmp_path, logs, srv, front, "--tls", "--ca", str(pki["ca"]),
                   "--server-name", "localhost")
    port = map_tunnel(srv, echo_backend.port, client="edge")
    with connect(port) as s:
        s.sendall(b"over tls")
        assert recv_exact(s, 8) == b"over tls"


def test_a_balancer_on_this_host_needs_an_api_token(tmp_path, server_factory, echo_backend):
    """A balancer on loopback in trusted_proxies brings requests from elsewhere to an API
    that listens on loopback, as api.allowed_hosts does: no start without a token of 16+
    characters, and a reload cannot add such a balancer to a server that has none."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(to_yaml({"trusted_proxies": ["127.0.0.3"], "api": {"listen_port": 0},
                            "database": {"path": str(tmp_path / "db")}}) + "\n")
    r = run_once([SERVER_BIN, "--config", cfg])
    assert r.returncode == 2, r
    assert b"trusted_proxies lets a balancer on this host" in r.stderr, r.stderr
    # A balancer elsewhere cannot reach the API on loopback: no token needed.
    srv = server_factory(config={"trusted_proxies": ["10.0.0.5"]})
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    log = reload(srv, dict(srv.config, trusted_proxies=["10.0.0.5", "127.0.0.1"]))
    assert "trusted_proxies keeps its running value" in log, log
    # Still the old list: 127.0.0.1 is no balancer, so its bytes without a header are
    # relayed (as a trusted balancer's they would be closed).
    assert echo_once(port, b"plain", "127.0.0.1") == b"plain"
    assert srv.running()


def test_the_api_share_applies_to_clients_a_balancer_names(server_factory, proc_factory,
                                                             tmp_path):
    """On loopback the API lets this machine hold any number of connections; a client
    behind a balancer on this host is not this machine and gets an eighth of
    api.max_connections, as it would on any other address."""
    srv = trusted_server(server_factory, {"api": {"token": API_TOKEN, "max_connections": 16,
                                                  "allowed_ips": []}})
    front = free_port()
    start_haproxy(proc_factory, tmp_path, [(front, srv.api_port, "send-proxy-v2")])
    held = []
    try:
        for _ in range(4):
            # Half a request (haproxy may dial the server only once bytes come).
            s = socket.create_connection(("127.0.0.1", front), timeout=5,
                                         source_address=("127.0.0.5", 0))
            s.sendall(b"GET /api/mapping/list HTTP/1.1\r\n")
            held.append(s)
        wait_until(lambda: srv.log_text().count("refused: it has 2 open") >= 1, timeout=5,
                   desc="the third and fourth connection from 127.0.0.5 refused")
        # Another client behind the balancer, and this machine directly, still get in.
        assert api_list_from(front, "127.0.0.6").startswith(b"HTTP/1.1 ")
        assert srv.api("GET", "/api/mapping/list")[0] == 200
    finally:
        for s in held:
            s.close()


@pytest.mark.parametrize("header", [
    b"PROXY UNKNOWN\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00",        # v2 LOCAL
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x00"[:16],    # v2 PROXY, UNIX: names no TCP client
])
def test_a_header_naming_no_client_leaves_the_balancer_as_the_source(server_factory,
                                                                    echo_backend, header):
    """As the spec asks: the connection's own addresses then. So a mapping whose allow_from
    does not list the balancer refuses it, and one that lists it admits it (README: do
    not list a balancer in allow_from unless its own connections should pass)."""
    srv = trusted_server(server_factory)
    closed, open_ = free_port(), free_port()
    srv.create_ok(port=closed, target_ip="127.0.0.1", target_port=echo_backend.port,
                  allow_from=["127.0.0.5"])
    srv.create_ok(port=open_, target_ip="127.0.0.1", target_port=echo_backend.port,
                  allow_from=[BALANCER])
    assert echo_once(closed, header + b"x", BALANCER) == b""
    assert echo_once(open_, header + b"x", BALANCER) == b"x"


def test_a_health_check_that_resets_is_no_refusal(server_factory):
    srv = trusted_server(server_factory)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    before = metric(srv, "portmux_proxy_header_refused_total")
    for _ in range(3):
        s = socket.create_connection(("127.0.0.1", port), source_address=(BALANCER, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.3)
    assert metric(srv, "portmux_proxy_header_refused_total") == before
    assert "closed: Connection reset" not in srv.log_text()


def test_a_full_mapping_refuses_a_balancers_connection_as_full(server_factory, proc_factory,
                                                               echo_backend, tmp_path):
    """max_connections counts what waits for a header; once it is reached the refusal is
    the limit's (refused_connections), not a header problem."""
    srv = trusted_server(server_factory)
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port,
                  max_connections=1)
    front = free_port()
    start_haproxy(proc_factory, tmp_path, [(front, port, "send-proxy")])
    assert srv.mapping(port)["total_connections"] == 0
    refused = srv.mapping(port)["refused_connections"]
    before = metric(srv, "portmux_proxy_header_refused_total")
    with socket.create_connection(("127.0.0.1", front), timeout=5) as held:
        held.sendall(b"one")
        assert recv_exact(held, 3) == b"one"
        assert echo_once(front, b"two", "127.0.0.5") == b""
        # (haproxy may try its server again: one refusal or more.)
        wait_until(lambda: srv.mapping(port)["refused_connections"] > refused, timeout=5,
                   desc="the second connection refused by the limit")
    assert metric(srv, "portmux_proxy_header_refused_total") == before
