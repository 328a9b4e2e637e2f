"""portmux-ctl (issue 17): every verb against a real portmux-server over 127.0.0.1.

The client/update verbs talk to endpoints of SPEC §3/§4a that land in parallel: their
tests skip (saying so) while this server answers 404 for those paths."""
import json
import os
import re

import pytest

from conftest import BUILD_DIR, SerialBackend, connect, free_port, run_once, wait_until

CTL = BUILD_DIR / "portmux-ctl"


def ctl(server, *args, token=None, env_extra=None, api=None):
    """Runs portmux-ctl against server; returns (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PORTMUX_API", "PORTMUX_API_TOKEN")}
    env.update(env_extra or {})
    argv = [CTL]
    if api is not None or server is not None:
        argv += ["--api", api or f"http://127.0.0.1:{server.api_port}"]
    if token is not None:
        argv += ["--token", token]
    r = run_once(argv + list(args), timeout=20, env=env)
    return r.returncode, r.stdout.decode(), r.stderr.decode()


def table(text):
    """Rows of a portmux-ctl table as dicts keyed by the header words."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    head = lines[0].split()
    return [dict(zip(head, ln.split(None, len(head) - 1))) for ln in lines[1:]
            if not ln.startswith("port ")]


def endpoint_missing(server, path):
    """True when the server does not know path (GET on a POST path answers 405 once it
    exists, 404 before)."""
    status, _, _ = server.api("GET", path)
    return status == 404


def test_health_table_and_json(server):
    rc, out, err = ctl(server, "health")
    assert rc == 0, err
    rows = dict(ln.split(None, 1) for ln in out.splitlines())
    assert rows["status"] == "ok" and rows["mappings"] == "0", out
    rc, out, err = ctl(server, "--json", "health")
    assert rc == 0, err
    data = json.loads(out)
    assert data["status"] == "ok" and data["version"] == server.health()["version"]


def test_mapping_add_list_rm(server, echo_backend):
    port = free_port()
    rc, out, err = ctl(server, "mapping", "add", "--port", str(port), "--target-ip",
                       "127.0.0.1", "--target-port", str(echo_backend.port), "--name", "echo one")
    assert rc == 0, err
    assert f"created mapping on port {port}" in out
    m = server.mapping(port)
    assert m["target_port"] == echo_backend.port and m["name"] == "echo one"
    with connect(port) as s:  # the mapping really forwards
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"

    rc, out, err = ctl(server, "mapping", "list")
    assert rc == 0, err
    rows = {r["PORT"]: r for r in table(out)}
    assert rows[str(port)]["MODE"] == "direct"
    assert rows[str(port)]["TARGET"] == f"127.0.0.1:{echo_backend.port}"
    assert rows[str(port)]["STATUS"] == "listening"
    assert rows[str(port)]["NAME"] == "echo one"
    wait_until(lambda: server.mapping(port)["total_connections"] == 1, desc="counted")

    rc, out, err = ctl(server, "--json", "mapping", "list")
    assert rc == 0, err
    data = json.loads(out)
    assert data["count"] == 1 and data["mappings"][0]["port"] == port

    rc, out, err = ctl(server, "mapping", "rm", str(port))
    assert rc == 0 and f"removed mapping on port {port}" in out, err
    assert server.mapping(port) is None


def test_mapping_add_json_prints_the_stored_mapping(server):
    port = free_port()
    rc, out, err = ctl(server, "--json", "mapping", "add", "--port", str(port), "--direct",
                       "--target-ip", "127.0.0.1", "--target-port", "9")
    assert rc == 0, err
    data = json.loads(out)
    assert data["port"] == port and data["use_tunnel"] is False and "id" in data
    assert server.mapping(port)["id"] == data["id"]


def test_api_refusal_exits_1_with_the_error_code(server):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    rc, out, err = ctl(server, "mapping", "add", "--port", str(port), "--target-ip",
                       "127.0.0.1", "--target-port", "9")
    assert rc == 1 and "port_in_use" in err, (rc, err)
    rc, _, err = ctl(server, "mapping", "rm", str(free_port()))
    assert rc == 1 and "not_found" in err, (rc, err)
    rc, _, err = ctl(server, "mapping", "add", "--port", "70000", "--target-ip", "127.0.0.1")
    assert rc == 1 and "invalid_field" in err, (rc, err)


@pytest.mark.parametrize("args", [
    [], ["bogus"], ["mapping"], ["mapping", "frobnicate"], ["mapping", "rm"],
    ["mapping", "rm", "abc"], ["mapping", "add", "--port", "x"], ["mapping", "add", "--nope"],
    ["mapping", "update", "1234"], ["client", "add"], ["client", "rotate", "a", "--grace", "x"],
    ["health", "extra"], ["--timeout", "0", "health"],
], ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2(server, args):
    rc, out, err = ctl(server, *args)
    assert rc == 2, (rc, out, err)
    assert err.strip(), "a usage error says what is wrong"
    assert server.list() == []  # nothing was sent


def test_unreachable_server_exits_3():
    port = free_port()  # nothing listens there
    rc, _, err = ctl(None, "health", api=f"http://127.0.0.1:{port}")
    assert rc == 3 and "cannot reach" in err, (rc, err)
    rc, _, err = ctl(None, "health", api="https://127.0.0.1:1")
    assert rc == 2 and "http://" in err, (rc, err)


def test_token_from_flag_and_environment(server_factory):
    token = "ctl-test-token-0123456789"
    srv = server_factory(config={"api": {"token": token}})
    rc, _, err = ctl(srv, "mapping", "list")
    assert rc == 1 and "unauthorized" in err, (rc, err)
    rc, _, err = ctl(srv, "mapping", "list", token="wrong-token-0123456789")
    assert rc == 1 and "unauthorized" in err, (rc, err)
    rc, out, err = ctl(srv, "mapping", "list", token=token)
    assert rc == 0 and out.startswith("PORT"), err
    env = {"PORTMUX_API": f"http://127.0.0.1:{srv.api_port}", "PORTMUX_API_TOKEN": token}
    rc, out, err = ctl(None, "--json", "mapping", "list", env_extra=env)
    assert rc == 0 and json.loads(out)["count"] == 0, err


def test_credentials_in_the_api_url_are_refused_and_not_echoed():
    """A user and password in --api are not used (the API takes a bearer token): a usage
    error that does not print them, where the "cannot reach" line used to."""
    port = free_port()  # nothing listens there
    for api in (f"http://user:SECRETPW@127.0.0.1:{port}", f"https://user:SECRETPW@127.0.0.1:{port}",
                "user:SECRETPW@127.0.0.1:8080"):
        rc, _, err = ctl(None, "health", api=api)
        assert rc == 2 and "--token" in err and "SECRETPW" not in err, (api, rc, err)


def test_a_token_with_a_newline_is_a_usage_error(server_factory):
    """A token read from a secret file often ends in a newline: it would never match, and
    the ctl said "out of memory". It is a usage error (exit 2) that says why."""
    token = "ctl-test-token-0123456789"
    srv = server_factory(config={"api": {"token": token}})
    rc, _, err = ctl(srv, "mapping", "list", token=token + "\n")
    assert rc == 2 and "printable ASCII without spaces" in err, (rc, err)
    env = {"PORTMUX_API_TOKEN": token + "\n"}
    rc, _, err = ctl(srv, "mapping", "list", env_extra=env)
    assert rc == 2 and "PORTMUX_API_TOKEN" in err, (rc, err)


def test_client_list(server_factory):
    srv = server_factory(config={"tunnel": {"enabled": True}})
    rc, out, err = ctl(srv, "client", "list")
    assert rc == 0, err
    assert out.split()[:3] == ["NAME", "SOURCE", "CONNECTED"]
    status, _, body = srv.api("GET", "/api/clients")
    rc, out, err = ctl(srv, "--json", "client", "list")
    assert rc == 0, err
    assert json.loads(out) == body["data"]


def test_mapping_update(server, echo_backend):
    if endpoint_missing(server, "/api/mapping/update"):
        pytest.skip("this server has no POST /api/mapping/update yet (404)")
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    rc, out, err = ctl(server, "mapping", "update", str(port), "--name", "renamed",
                       "--max-connections", "7")
    assert rc == 0, err
    assert f"updated mapping on port {port}" in out
    m = server.mapping(port)
    assert m["name"] == "renamed" and m["max_connections"] == 7
    rc, out, err = ctl(server, "--json", "mapping", "update", str(port), "--disable")
    assert rc == 0, err
    assert json.loads(out)["enabled"] is False
    rc, _, err = ctl(server, "mapping", "update", str(free_port()), "--name", "x")
    assert rc == 1 and "not_found" in err, (rc, err)


def test_client_add_rotate_rm(server_factory):
    srv = server_factory(config={"tunnel": {"enabled": True}})
    if endpoint_missing(srv, "/api/client/create"):
        pytest.skip("this server has no POST /api/client/create yet (404)")
    rc, out, err = ctl(srv, "client", "add", "edge-ctl")
    assert rc == 0, err
    token = re.search(r"^token: (\S+)$", out, re.M).group(1)
    assert len(token) >= 32
    rc, out, err = ctl(srv, "client", "list")
    rows = {r["NAME"]: r for r in table(out)}
    assert rows["edge-ctl"]["SOURCE"] == "api" and rows["edge-ctl"]["CONNECTED"] == "no"
    rc, out, err = ctl(srv, "client", "add", "edge-ctl")
    assert rc == 1 and "client_exists" in err, (rc, err)

    rc, out, err = ctl(srv, "--json", "client", "rotate", "edge-ctl", "--grace", "0")
    assert rc == 0, err
    data = json.loads(out)
    assert data["name"] == "edge-ctl" and data["token"] != token

    rc, out, err = ctl(srv, "client", "rm", "edge-ctl")
    assert rc == 0 and "removed client edge-ctl" in out, err
    rc, out, err = ctl(srv, "client", "rm", "edge-ctl")
    assert rc == 1 and "not_found" in err, (rc, err)


ESC = "\x1b]0;pwned\x07\x1b[2J\x1b[31mFAKE\x1b[0m\u009b2J\x7f"


class _HostileApi:
    """An "API" on 127.0.0.1 whose every string carries terminal escape sequences."""

    def __init__(self):
        import http.server
        import threading

        class H(http.server.BaseHTTPRequestHandler):
            def _send(self, code, obj):
                b = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(b)))
                self.end_headers()
                self.wfile.write(b)

            def do_GET(self):
                if self.path == "/health":
                    self._send(200, {"status": "ok", "ver" + ESC: ESC})
                else:
                    self._send(200, {"success": True, "message": "", "data": {
                        "count": 1, "mappings": [{
                            "port": 1, "target_ip": "x" + ESC, "target_port": 1,
                            "status": "error", "name": ESC, "error": ESC,
                            "last_error": ESC}]}})

            def do_POST(self):
                if self.path == "/api/client/create":
                    self._send(201, {"success": True, "message": "", "data": {
                        "name": "n" + ESC, "token": "t" + ESC}})
                else:
                    self._send(400, {"success": False, "error": "bad" + ESC, "message": ESC})

            def log_message(self, *a):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("args", [["health"], ["mapping", "list"], ["client", "add", "x"],
                                  ["mapping", "rm", "1"], ["--json", "health"],
                                  ["--json", "mapping", "list"]])
def test_hostile_server_strings_cannot_drive_the_terminal(args):
    """Whatever the server (or anyone answering in its place) puts in a string, portmux-ctl
    prints no control character: no OSC title, no clear screen, no colour, no C1 CSI."""
    api = _HostileApi()
    try:
        rc, out, err = ctl(None, *args, api=api.url)
    finally:
        api.close()
    both = out + err
    assert "pwned" in both or "FAKE" in both or "bad" in both, (rc, out, err)
    for ch in ("\x1b", "\x07", "\x7f", "\u009b"):
        assert ch not in both, (args, repr(both))


def _slow_api(mode):
    """A listener on 127.0.0.1 that answers every request slowly: "trickle" sends a
    response's headers and then one body byte every 0.3 s; "headers" sends header lines
    without end. Each answer stops after 20 s."""
    import time

    def answer(c, stopping):
        c.recv(65536)
        if mode == "trickle":
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n")
        else:
            c.sendall(b"HTTP/1.1 200 OK\r\n")
        deadline = time.monotonic() + 20
        while not stopping.is_set() and time.monotonic() < deadline:
            if mode == "trickle":
                c.sendall(b" ")
                time.sleep(0.3)
            else:
                c.sendall(b"X-Filler: " + b"a" * 8000 + b"\r\n")
                time.sleep(0.01)

    return SerialBackend(answer)


@pytest.mark.parametrize("mode", ["trickle", "headers"])
def test_timeout_bounds_the_whole_answer(mode):
    """--timeout S is "seconds to wait for an answer": evhttp's timeout counted only
    silence, so a server trickling a byte every 0.3 s kept ctl waiting as long as it liked,
    and endless header lines grew it by 20 MB a second. Now it gives up after S seconds, and
    headers are bounded."""
    import time
    api = _slow_api(mode)
    try:
        t0 = time.monotonic()
        rc, out, err = ctl(None, "--timeout", "2", "health", api=f"http://127.0.0.1:{api.port}")
        took = time.monotonic() - t0
    finally:
        api.stop()
    assert rc == 3 and "cannot reach the API" in err, (rc, out, err)
    assert took < 10, f"gave up after {took:.1f} s"
    assert "in progress" not in err, err
