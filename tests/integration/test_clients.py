"""Tunnel clients as stored objects (SPEC §4 "Security", "Abuse limits", §4a; issue 15 and
issue 14 items 3, 7, 8): the first start's random token, the client API, token rotation,
removal, ASCII names, the failed-Hello limit with bounded logging, and the takeover probe.
"""
import hashlib
import json
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import CLIENT_BIN, SERVER_BIN, free_port, wait_until
from sec_helpers import hello, read_frame
from tunnel_helpers import (client_count, client_entry, client_info, client_proc, map_tunnel,
                            metric, run_client, start_client, tunnel_server, wait_status)

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

T_HELLO_RESPONSE = 0x07
CFG_TOKEN = "config-token-0123456789"
FIRST_START = re.compile(r'WARN clients created tunnel client "default" with token (\S+)')


def hello_answer(port, name, token, source="127.0.0.1", host="127.0.0.1", timeout=10.0):
    """Sends one Hello from source; returns the HelloResponse as a dict (None on close)."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(hello(name, token))
        fr = read_frame(s, timeout)
    if fr is None:
        return None
    assert fr[0] == T_HELLO_RESPONSE, fr
    return json.loads(fr[1])


def api_ok(srv, path, body, status=200):
    got, _, payload = srv.api("POST", path, body=body)
    assert got == status and payload["success"] is True, (path, body, got, payload)
    return payload["data"]


def api_err(srv, path, body, status, error):
    got, _, payload = srv.api("POST", path, body=body)
    assert (got, payload.get("error")) == (status, error), (path, body, got, payload)
    assert payload["success"] is False and "data" not in payload, payload


def all_clients(srv):
    status, _, body = srv.api("GET", "/api/clients")
    assert status == 200, body
    assert body["data"]["count"] == len(body["data"]["clients"]), body
    return {c["name"]: c for c in body["data"]["clients"]}


def echo_ok(port, payload=b"ping", timeout=0.5):
    try:
        return echo_roundtrip_short(port, payload, timeout) == payload
    except OSError:
        return False


def echo_roundtrip_short(port, payload, timeout):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        parts = []
        while True:
            d = s.recv(65536)
            if not d:
                return b"".join(parts)
            parts.append(d)


# ---------------------------------------------------------------------------
# First start, config tokens


def test_first_start_creates_default_with_a_random_token(server_factory, tmp_path, logs):
    srv = server_factory(config={"tunnel": {"enabled": True}})
    m = FIRST_START.search(srv.log_text())
    assert m, srv.log_tail()
    token = m.group(1)
    assert len(token) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", token), token
    c = all_clients(srv)["default"]
    assert (c["source"], c["connected"], c["remote_addr"]) == ("api", False, None), c
    # Only the hash is stored; the token is nowhere in the database files.
    rows = srv.sqlite("SELECT name, token_hash, source FROM clients")
    assert rows == [["default", hashlib.sha256(token.encode()).hexdigest(), "api"]], rows
    for f in srv.db_path.parent.glob(srv.db_path.name + "*"):
        assert token.encode() not in f.read_bytes(), f"token stored in {f}"

    # The old built-in token is no more (issue 14 item 3).
    r = run_client(srv, "change-me")
    assert r.returncode == 2, r
    start_client(tmp_path, logs, srv, token)
    assert all_clients(srv)["default"]["connected"] is True

    # A second start prints no token and creates nothing: the stored client stays.
    mark = srv.log_mark()
    assert srv.stop() == 0
    srv.start()
    assert "with token" not in srv.log_text()[mark:]
    assert list(all_clients(srv)) == ["default"]
    wait_until(lambda: client_count(srv, "default") == 1, timeout=15,
               desc="the client back after the restart, same token")
    assert srv.sqlite("SELECT value FROM settings WHERE key = 'first_client'") == [["1"]]

    # Removing it revokes it: the next start is not a first start and makes no new
    # "default" (whose token, in the log, would serve its mappings again).
    api_ok(srv, "/api/client/remove", {"name": "default"})
    assert all_clients(srv) == {}
    mark = srv.log_mark()
    assert srv.stop() == 0
    srv.start()
    assert "with token" not in srv.log_text()[mark:], srv.log_tail()
    assert all_clients(srv) == {}
    assert srv.sqlite("SELECT count(*) FROM clients") == [["0"]]


@pytest.mark.parametrize("client, line, key, why", [
    ({"name": "default", "token": "change-me"}, 4, "tunnel.clients[0].token",
     "must be at least 16 characters"),
    ({"name": "edge", "token": "123456789012345"}, 4, "tunnel.clients[0].token",
     "must be at least 16 characters"),
    ({"name": "b\u00fcro", "token": CFG_TOKEN}, 4, "tunnel.clients[0].name",
     "must be 1-64 characters"),
])
def test_config_client_rules(tmp_path, client, line, key, why):
    cfg = tmp_path / "config.yaml"
    cfg.write_text("tunnel:\n  enabled: true\n  clients:\n"
                   f"    - {{name: {json.dumps(client['name'])}, "
                   f"token: {json.dumps(client['token'])}}}\n", encoding="utf-8")
    r = subprocess.run([str(SERVER_BIN), "--config", str(cfg)], capture_output=True,
                       timeout=10, stdin=subprocess.DEVNULL)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (r.returncode, err)
    assert err.count("\n") == 1 and f"{cfg}:{line}: {key}: {why}" in err, err


# ---------------------------------------------------------------------------
# The client API


def test_client_api_lifecycle(server_factory, tmp_path, logs, echo_backend):
    srv = tunnel_server(server_factory, [{"name": "cfg", "token": CFG_TOKEN}])
    assert "with token" not in srv.log_text(), "a default client beside config clients"
    clients = all_clients(srv)
    assert list(clients) == ["cfg"], clients
    assert clients["cfg"]["source"] == "config" and clients["cfg"]["connected"] is False

    data = api_ok(srv, "/api/client/create", {"name": "edge"}, 201)
    token1 = data["token"]
    assert data["name"] == "edge" and len(token1) >= 32, data
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token1), token1
    assert token1 not in srv.log_text(), "an API-created token in the log"
    api_err(srv, "/api/client/create", {"name": "edge"}, 409, "client_exists")
    api_err(srv, "/api/client/create", {"name": "cfg"}, 409, "client_exists")
    for bad in ({"name": "b\u00fcro"}, {"name": ""}, {"name": "x" * 65}, {"name": 5}, {},
                {"name": "a b"}, {"name": "ok", "extra": 1}):
        api_err(srv, "/api/client/create", bad, 400, "invalid_field")
    api_err(srv, "/api/client/rotate", {"name": "edge", "grace_s": -1}, 400, "invalid_field")
    api_err(srv, "/api/client/rotate", {"name": "edge", "grace_s": "5"}, 400, "invalid_field")
    status, _, payload = srv.api("POST", "/api/client/create", raw=b"not json")
    assert (status, payload["error"]) == (400, "invalid_json"), payload
    for path in ("/api/client/rotate", "/api/client/remove"):
        api_err(srv, path, {"name": "cfg"}, 409, "managed_by_config")
        api_err(srv, path, {"name": "nobody"}, 404, "not_found")
        api_err(srv, path, {"name": "b\u00fcro"}, 400, "invalid_field")
    status, headers, _ = srv.api("GET", "/api/client/create")
    assert status == 405 and "POST" in headers.get("Allow", ""), (status, headers)
    c = all_clients(srv)["edge"]
    assert (c["source"], c["connected"], c["streams"], c["bytes_in"]) == ("api", False, 0, 0)

    cli = start_client(tmp_path, logs, srv, token1, name="edge")
    port = map_tunnel(srv, echo_backend.port, client="edge")
    assert echo_ok(port, timeout=5)
    c = all_clients(srv)["edge"]
    assert c["connected"] is True and re.fullmatch(r"127\.0\.0\.1:\d+", c["remote_addr"]), c
    assert c["bytes_in"] > 0 and c["bytes_out"] > 0, c
    connected_at = c["connected_at"]

    # Rotate with a grace period: the live session stays; both tokens authenticate (a
    # right token meets the live session: already_connected; a wrong one: auth_failed).
    t0 = time.time()
    data = api_ok(srv, "/api/client/rotate", {"name": "edge", "grace_s": 300})
    token2 = data["token"]
    assert token2 != token1 and len(token2) >= 32, data
    until = time.mktime(time.strptime(data["old_token_valid_until"], "%Y-%m-%dT%H:%M:%SZ"))
    until -= time.timezone
    assert t0 + 298 <= until <= time.time() + 302, data
    assert client_info(srv, "edge")["connected_at"] == connected_at
    assert echo_ok(port, timeout=5)
    assert hello_answer(srv.tunnel_port, "edge", token1)["error"] == "already_connected"
    assert hello_answer(srv.tunnel_port, "edge", token2)["error"] == "already_connected"
    assert hello_answer(srv.tunnel_port, "edge", token2 + "x")["error"] == "auth_failed"

    # Rotate with grace_s 0: the older tokens stop at once, the live session still stays.
    token3 = api_ok(srv, "/api/client/rotate", {"name": "edge", "grace_s": 0})["token"]
    assert hello_answer(srv.tunnel_port, "edge", token1)["error"] == "auth_failed"
    assert hello_answer(srv.tunnel_port, "edge", token2)["error"] == "auth_failed"
    assert hello_answer(srv.tunnel_port, "edge", token3)["error"] == "already_connected"
    assert client_info(srv, "edge")["connected_at"] == connected_at
    stored = srv.sqlite("SELECT token_hash FROM clients WHERE name = 'edge'")
    assert stored == [[hashlib.sha256(token3.encode()).hexdigest()]], stored

    # Remove: the live session closes at once, the mapping stays and waits.
    assert api_ok(srv, "/api/client/remove", {"name": "edge"}) == {"name": "edge"}
    wait_until(lambda: client_info(srv, "edge") is None, timeout=2,
               desc="the removed client's session closed")
    wait_status(srv, port, "waiting_for_client", timeout=2)
    assert "edge" not in all_clients(srv)
    assert srv.sqlite("SELECT count(*) FROM clients WHERE name = 'edge'") == [["0"]]
    # The client, refused with its old token, gives up.
    wait_until(lambda: cli.poll() is not None, timeout=15, desc="the removed client to exit")
    assert cli.poll() == 2, cli.log_tail()
    api_err(srv, "/api/client/remove", {"name": "edge"}, 404, "not_found")

    # Durable: after a restart the config client is back, edge is not, nothing new.
    assert srv.stop() == 0
    srv.start()
    assert list(all_clients(srv)) == ["cfg"]
    assert srv.mapping(port)["status"] == "waiting_for_client"


def test_names_are_ascii_only(server_factory, tmp_path, logs):
    """Issue 14 item 8: two clients named "büro" were both accepted."""
    srv = tunnel_server(server_factory, [{"name": "edge", "token": CFG_TOKEN}])
    for name in ("b\u00fcro", "b\u00fcro", "x" * 65, "", "a\nb", "edge "):
        got = hello_answer(srv.tunnel_port, name, CFG_TOKEN)
        assert got is not None and got["ok"] is False and got["error"] == "bad_hello", got
    assert client_count(srv) == 0
    status, body = srv.create(port=free_port(), target_port=22, use_tunnel=True,
                              client="b\u00fcro")
    assert (status, body["error"]) == (400, "invalid_field"), body
    start_client(tmp_path, logs, srv, CFG_TOKEN, name="edge")
    assert list(all_clients(srv)) == ["edge"]


# ---------------------------------------------------------------------------
# Failed Hellos (issue 14 item 7)


def test_failed_hellos_are_limited_per_source(server_factory, tmp_path, logs):
    srv = tunnel_server(server_factory, [{"name": "edge", "token": CFG_TOKEN}],
                        listen_addr="::")
    attempts = 300
    outcomes = []
    for i in range(attempts):
        got = hello_answer(srv.tunnel_port, "edge", f"wrong-token-{i:08d}")
        outcomes.append(got and got["error"])
    assert outcomes[:10] == ["auth_failed"] * 10, outcomes[:12]
    assert outcomes[10:] == ["rate_limited"] * (attempts - 10), set(outcomes[10:])
    # The right token from the blocked address is refused unchecked too...
    assert hello_answer(srv.tunnel_port, "edge", CFG_TOKEN)["error"] == "rate_limited"
    # ...while from another address it works at once: raw, and with the real client.
    ok = hello_answer(srv.tunnel_port, "edge", CFG_TOKEN, source="127.0.0.2")
    assert ok["ok"] is True, ok
    # What the client's status block shows about itself.
    assert ok["client"] == {"source": "config", "takeovers": 0, "refused": 0}, ok
    wait_until(lambda: client_count(srv, "edge") == 0, timeout=5, desc="raw session gone")
    cli = client_proc(tmp_path, srv, CFG_TOKEN, name="edge", server=f"[::1]:{srv.tunnel_port}")
    logs.append(cli)
    cli.start()
    wait_until(lambda: client_count(srv, "edge") == 1, timeout=10,
               desc="the real client over ::1 in")
    assert client_info(srv, "edge")["remote_addr"].startswith("[::1]:")

    # Bounded log: a handful of lines for 300 attempts, each kind once per 10 s.
    lines = [ln for ln in srv.log_text().splitlines()
             if re.search(r"\b(WARN|ERROR)\b", ln) and "127.0.0.1" in ln]
    assert 2 <= len(lines) <= 6, "\n".join(lines)
    assert any("refused for 60 s" in ln for ln in lines), lines
    text = srv.api("GET", "/metrics")[2]
    m = re.search(r'portmux_limit_refused_total\{limit="hello_failures"\} (\d+)', text)
    assert m and int(m.group(1)) == attempts - 10 + 1, m and m.group(0)
    assert metric(srv, "portmux_tunnel_auth_failures_total") == 10
    assert srv.running()


def test_a_client_whose_address_is_blocked_retries_instead_of_exiting(server_factory, tmp_path,
                                                                       logs):
    """Anyone sharing the client's address (a NAT, a balancer) can get that address's
    Hellos blocked for 60 s with ten bad ones. A client refused as rate_limited used to
    exit 2, which its systemd unit does not restart: stopped for good by a stranger. It
    backs off and tries again, and is in once the block is over."""
    srv = tunnel_server(server_factory, [{"name": "edge", "token": CFG_TOKEN}])
    for i in range(10):
        assert hello_answer(srv.tunnel_port, "edge", f"wrong-token-{i:08d}")["error"] == \
            "auth_failed"
    assert hello_answer(srv.tunnel_port, "edge", CFG_TOKEN)["error"] == "rate_limited"
    cli = client_proc(tmp_path, srv, CFG_TOKEN, name="edge")
    logs.append(cli)
    cli.start()
    cli.wait_log(r"too many failed Hellos.*trying again later", timeout=10)
    cli.wait_log(r"reconnecting in", timeout=10)
    assert cli.running(), cli.log_tail()
    wait_until(lambda: client_count(srv, "edge") == 1, timeout=100, interval=0.5,
               desc="the client in once the 60 s block is over")
    assert cli.running()


# ---------------------------------------------------------------------------
# Takeover (SPEC §4)


PROBE_MS = 1000


def test_frozen_client_is_taken_over(server_factory, tmp_path, logs, echo_backend):
    """A client whose network dropped silently (SIGSTOP) is replaced within the probe time,
    not after heartbeat_timeout (30 s)."""
    srv = tunnel_server(server_factory, [{"name": "edge", "token": CFG_TOKEN}],
                        takeover_probe_ms=PROBE_MS)
    first = start_client(tmp_path, logs, srv, CFG_TOKEN, name="edge", log_name="first")
    port = map_tunnel(srv, echo_backend.port, client="edge")
    assert echo_ok(port, timeout=5)
    old_remote = client_info(srv, "edge")["remote_addr"]
    first.send_signal(signal.SIGSTOP)
    try:
        second = client_proc(tmp_path, srv, CFG_TOKEN, name="edge", log_name="second")
        logs.append(second)
        t0 = time.monotonic()
        second.start()
        wait_until(lambda: echo_ok(port), timeout=PROBE_MS / 1000 + 1,
                   desc="the second client serving the mapping within probe + 1 s")
        took = time.monotonic() - t0
        assert second.running()
        c = client_info(srv, "edge")
        assert c["remote_addr"] != old_remote, (c, old_remote)
        srv.wait_log(r'WARN tunnel client "edge": session from \S+ did not answer within '
                     rf'{PROBE_MS} ms, taken over', timeout=2)
        assert metric(srv, "portmux_tunnel_takeovers_total") == 1
        assert all_clients(srv)["edge"]["takeovers"] == 1
        print(f"second client served after {took:.2f} s")
    finally:
        first.send_signal(signal.SIGCONT)


def test_two_live_clients_do_not_flap(server_factory, tmp_path, logs, echo_backend):
    srv = tunnel_server(server_factory, [{"name": "edge", "token": CFG_TOKEN}],
                        takeover_probe_ms=PROBE_MS)
    start_client(tmp_path, logs, srv, CFG_TOKEN, name="edge", log_name="first")
    port = map_tunnel(srv, echo_backend.port, client="edge")
    c0 = client_info(srv, "edge")
    # A second machine with the same credentials (reconnect on): refused, it gives up.
    second = client_proc(tmp_path, srv, CFG_TOKEN, name="edge", log_name="second")
    logs.append(second)
    second.start()
    wait_until(lambda: second.poll() is not None, timeout=PROBE_MS / 1000 + 10,
               desc="the second client refused")
    assert second.poll() == 2 and re.search(r"already connected", second.log_text()), \
        second.log_tail()
    # And again, twice, while the first keeps its session the whole time.
    for _ in range(2):
        r = run_client(srv, CFG_TOKEN, name="edge")
        assert r.returncode == 2, r
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        c = client_info(srv, "edge")
        assert c and (c["remote_addr"], c["connected_at"]) == (c0["remote_addr"],
                                                               c0["connected_at"]), c
        time.sleep(0.2)
    assert echo_ok(port, timeout=5)
    assert metric(srv, "portmux_tunnel_takeovers_total") == 0
    assert metric(srv, "portmux_tunnel_already_connected_total") == 3
    assert all_clients(srv)["edge"]["refused"] == 3
    assert len(re.findall(r"WARN tunnel new Hello|WARN tunnel client \"edge\": new Hello",
                          srv.log_text())) == 3


def test_client_api_needs_the_api_token(server_factory):
    api_token = "api-token-" + "7" * 20
    srv = server_factory(config={"api": {"token": api_token},
                                 "tunnel": {"enabled": True, "listen_addr": "127.0.0.1"}})
    for path, method, body in [("/api/clients", "GET", None),
                               ("/api/client/create", "POST", {"name": "x"}),
                               ("/api/client/rotate", "POST", {"name": "default"}),
                               ("/api/client/remove", "POST", {"name": "default"})]:
        for hdrs in ({}, {"Authorization": "Bearer wrong-" + api_token}):
            status, _, payload = srv.api(method, path, body=body, headers=hdrs)
            assert (status, payload.get("error")) == (401, "unauthorized"), (path, payload)
    auth = {"Authorization": f"Bearer {api_token}"}
    status, _, payload = srv.api("GET", "/api/clients", headers=auth)
    assert status == 200 and [c["name"] for c in payload["data"]["clients"]] == ["default"]
    # The refused calls changed nothing: "default" kept its first token, no "x".
    token = FIRST_START.search(srv.log_text()).group(1)
    assert srv.sqlite("SELECT name, token_hash FROM clients") == \
        [["default", hashlib.sha256(token.encode()).hexdigest()]]


def test_blocked_source_lines_share_the_global_cap(server_factory):
    """Each source blocked for failed Hellos wrote its own line, outside the cap that
    bounds every other line a peer can cause: many addresses (an IPv6 prefix costs
    nothing) made one line each. Now at most HELLO_LIMIT_LOG_GLOBAL (20) per 10 s."""
    srv = tunnel_server(server_factory, [{"name": "edge", "token": CFG_TOKEN}])
    sources = [f"127.0.1.{i}" for i in range(1, 26)]
    for src in sources:
        for i in range(10):
            assert hello_answer(srv.tunnel_port, "edge", f"wrong-token-{i:08d}",
                                source=src)["error"] == "auth_failed"
    blocked = [ln for ln in srv.log_text().splitlines() if "refused for 60 s" in ln]
    assert 1 <= len(blocked) <= 20, len(blocked)
    assert hello_answer(srv.tunnel_port, "edge", CFG_TOKEN, source=sources[-1])["error"] == \
        "rate_limited"
