"""HTTP API: shapes of /health, list, create, remove, and every failure row of SPEC §3
that applies without tunnel or auth, each checked for its envelope and for leaving the
store unchanged (through the API and through the sqlite3 CLI)."""
import http.client
import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import (PortHolder, Server, connect_refused, free_port, sqlite, wait_until)

MAPPING_FIELDS = {"id", "port", "target_ip", "target_port", "use_tunnel", "client", "name",
                  "created_at", "status"}
COUNTERS = {"active_connections", "total_connections", "failed_connections", "bytes_in",
            "bytes_out"}


def assert_json(headers):
    ctype = headers.get("Content-Type", "")
    assert ctype.split(";")[0].strip() == "application/json", f"Content-Type {ctype!r}"


def assert_failure(status, headers, body, want_status, want_error, field=None):
    assert status == want_status, f"status {status} (want {want_status}): {body!r}"
    assert_json(headers)
    assert isinstance(body, dict), f"body is not a JSON object: {body!r}"
    assert body.get("success") is False, body
    assert body.get("error") == want_error, body
    assert isinstance(body.get("message"), str) and body["message"].strip(), body
    assert "data" not in body, body
    if field is not None:
        assert field in body["message"], f"message does not name {field!r}: {body}"


def db_rows(db_path):
    return sqlite(db_path, "SELECT id, port, target_ip, target_port, use_tunnel, client, "
                           "name, created_at FROM mappings ORDER BY id", readonly=True)


# ---------------------------------------------------------------------------
# Shapes


def test_health_shape(server):
    status, headers, body = server.api("GET", "/health")
    assert status == 200
    assert_json(headers)
    assert body["status"] == "ok"
    assert body["tunnel_enabled"] is False
    assert body["tunnel_connected"] is False
    for key in ("clients", "mappings", "uptime_s"):
        assert isinstance(body[key], (int, float)) and not isinstance(body[key], bool), body
    assert body["clients"] == 0 and body["mappings"] == 0
    assert isinstance(body["version"], str) and body["version"], body
    assert "success" not in body and "data" not in body, "health has no envelope"


def test_list_shape_empty(server):
    status, headers, body = server.api("GET", "/api/mapping/list")
    assert status == 200
    assert_json(headers)
    assert body["success"] is True
    assert isinstance(body.get("message"), str)
    assert body["data"] == {"mappings": [], "count": 0}


# ---------------------------------------------------------------------------
# The life of one mapping (issue 3, test 1)


def curl(url, out_path=None, timeout=10):
    args = ["curl", "-sS", "--fail", "--max-time", str(timeout), url]
    if out_path:
        args += ["-o", str(out_path)]
    r = subprocess.run(args, capture_output=True, timeout=timeout + 5)
    assert r.returncode == 0, f"curl {url}: rc {r.returncode} {r.stderr.decode()}"
    return r.stdout


def test_create_forward_list_remove(server, http_backend, tmp_path):
    port = free_port()
    status, headers, body = server.api("POST", "/api/mapping/create", body={
        "port": port, "target_ip": "127.0.0.1", "target_port": http_backend.port,
        "name": "web"})
    assert status == 201, body
    assert_json(headers)
    assert body["success"] is True and isinstance(body["message"], str)
    data = body["data"]
    assert MAPPING_FIELDS <= set(data), f"missing {MAPPING_FIELDS - set(data)}"
    assert isinstance(data["id"], int) and not isinstance(data["id"], bool)
    assert data["port"] == port
    assert data["target_ip"] == "127.0.0.1"
    assert data["target_port"] == http_backend.port
    assert data["use_tunnel"] is False
    assert isinstance(data["client"], str)
    assert data["name"] == "web"
    assert isinstance(data["created_at"], (int, str)) and data["created_at"]
    assert data["status"] == "listening"

    # curl through the public port reaches the real http.server, byte for byte.
    assert curl(f"http://127.0.0.1:{port}/hello.txt") == http_backend.files["hello.txt"]
    out = tmp_path / "blob.out"
    curl(f"http://127.0.0.1:{port}/blob.bin", out_path=out)
    assert out.read_bytes() == http_backend.files["blob.bin"]

    status, headers, body = server.api("GET", "/api/mapping/list")
    assert status == 200
    assert body["success"] is True and body["data"]["count"] == 1
    [m] = body["data"]["mappings"]
    assert MAPPING_FIELDS | COUNTERS <= set(m), f"missing {(MAPPING_FIELDS | COUNTERS) - set(m)}"
    assert m["id"] == data["id"] and m["port"] == port and m["status"] == "listening"
    assert m["total_connections"] >= 2
    assert m["failed_connections"] == 0
    assert m["bytes_in"] > 0
    assert m["bytes_out"] >= len(http_backend.files["blob.bin"])
    wait_until(lambda: server.mapping(port)["active_connections"] == 0, timeout=5,
               desc="active_connections back to 0")
    assert server.health()["mappings"] == 1

    status, headers, body = server.api("POST", "/api/mapping/remove", body={"port": port})
    assert status == 200, body
    assert_json(headers)
    assert body["success"] is True and body["data"] == {"port": port}
    assert connect_refused(port), "public port still accepts after remove"
    assert server.list() == []
    assert db_rows(server.db_path) == []


def test_create_defaults_target_port(server):
    port = free_port()
    # Not 127.0.0.1: that would forward the port to itself.
    data = server.create_ok(port=port, target_ip="192.0.2.1")
    assert data["target_port"] == port
    assert data["use_tunnel"] is False  # tunnel disabled -> direct mode


def test_unicode_name_round_trip(server):
    name64 = ("журнал✓日本語🚀" * 8)[:64]
    assert len(name64) == 64 and len(name64.encode()) > 64
    port = free_port()
    data = server.create_ok(port=port, target_ip="localhost", target_port=9, name=name64)
    assert data["name"] == name64
    assert server.mapping(port)["name"] == name64
    # 65 code points is one too many.
    status, body = server.create(port=free_port(), target_ip="127.0.0.1", target_port=9,
                                 name=name64 + "x")
    assert status == 400 and body["error"] == "invalid_field", body
    server.restart()
    assert server.mapping(port)["name"] == name64
    assert server.stop() == 0
    rows = sqlite(server.db_path, "SELECT name FROM mappings")
    assert rows == [[name64]]


# ---------------------------------------------------------------------------
# Failure table (issue 3, test 3)


@pytest.fixture(scope="module")
def fsrv(tmp_path_factory):
    """One server for the failure table: port_range 20000-32699, one blacklisted port,
    one mapping already stored."""
    blacklisted = free_port()
    srv = Server(tmp_path_factory.mktemp("failures"), name="failures", config={
        "port_range": {"from": 20000, "end": 32699, "blacklist": [blacklisted]}})
    srv.blacklisted = blacklisted
    srv.start()
    srv.existing = free_port()
    srv.create_ok(port=srv.existing, target_ip="127.0.0.1", target_port=9, name="keep")
    yield srv
    srv.kill9()


def _valid(**over):
    body = {"port": free_port(), "target_ip": "127.0.0.1", "target_port": 9}
    body.update(over)
    return body


def _without(key):
    body = _valid()
    del body[key]
    return body


# (id, method, path, kind, payload, status, error, field named in message)
# kind "json": payload is a dict (or a callable making one with fsrv), sent JSON-encoded;
# "raw": payload is sent as is ("{P}" is replaced by a free port).
CASES = [
    ("json-garbage", "POST", "/api/mapping/create", "raw", "not json", 400, "invalid_json", None),
    ("json-array", "POST", "/api/mapping/create", "raw", '[{"port": 1}]', 400, "invalid_json", None),
    ("json-string", "POST", "/api/mapping/create", "raw", '"port"', 400, "invalid_json", None),
    ("json-empty", "POST", "/api/mapping/create", "raw", "", 400, "invalid_json", None),
    ("json-truncated", "POST", "/api/mapping/create", "raw", '{"port": {P}', 400, "invalid_json", None),
    ("json-number", "POST", "/api/mapping/create", "raw", "42", 400, "invalid_json", None),
    ("json-null", "POST", "/api/mapping/create", "raw", "null", 400, "invalid_json", None),
    ("port-string", "POST", "/api/mapping/create", "json", lambda s: _valid(port=str(free_port())), 400, "invalid_field", "port"),
    ("port-float", "POST", "/api/mapping/create", "raw", '{"port": {P}.0, "target_ip": "127.0.0.1", "target_port": 9}', 400, "invalid_field", "port"),
    ("port-1e10", "POST", "/api/mapping/create", "raw", '{"port": 1e10, "target_ip": "127.0.0.1", "target_port": 9}', 400, "invalid_field", "port"),
    ("port-exp-int", "POST", "/api/mapping/create", "raw", '{"port": 2.5e4, "target_ip": "127.0.0.1", "target_port": 9}', 400, "invalid_field", "port"),
    ("port-true", "POST", "/api/mapping/create", "json", lambda s: _valid(port=True), 400, "invalid_field", "port"),
    ("port-null", "POST", "/api/mapping/create", "json", lambda s: _valid(port=None), 400, "invalid_field", "port"),
    ("port-0", "POST", "/api/mapping/create", "json", lambda s: _valid(port=0), 400, "invalid_field", "port"),
    ("port-65536", "POST", "/api/mapping/create", "json", lambda s: _valid(port=65536), 400, "invalid_field", "port"),
    ("port-neg", "POST", "/api/mapping/create", "json", lambda s: _valid(port=-1), 400, "invalid_field", "port"),
    ("port-big", "POST", "/api/mapping/create", "json", lambda s: _valid(port=2**40 + 20001), 400, "invalid_field", "port"),
    ("port-beyond-64-bits", "POST", "/api/mapping/create", "raw", '{"port": 99999999999999999999, "target_ip": "127.0.0.1", "target_port": 9}', 400, "invalid_field", None),
    # An omitted port is picked by the server now (SPEC §2, test_policy.py); null is no port.
    ("port-null", "POST", "/api/mapping/create", "json", lambda s: _valid(port=None), 400, "invalid_field", "port"),
    ("target_ip-int", "POST", "/api/mapping/create", "json", lambda s: _valid(target_ip=123), 400, "invalid_field", "target_ip"),
    ("target_ip-empty", "POST", "/api/mapping/create", "json", lambda s: _valid(target_ip=""), 400, "invalid_field", "target_ip"),
    ("target_ip-bad", "POST", "/api/mapping/create", "json", lambda s: _valid(target_ip="bad host!"), 400, "invalid_field", "target_ip"),
    ("target_port-string", "POST", "/api/mapping/create", "json", lambda s: _valid(target_port="x"), 400, "invalid_field", "target_port"),
    ("target_port-0", "POST", "/api/mapping/create", "json", lambda s: _valid(target_port=0), 400, "invalid_field", "target_port"),
    ("target_port-70000", "POST", "/api/mapping/create", "json", lambda s: _valid(target_port=70000), 400, "invalid_field", "target_port"),
    ("target_port-float", "POST", "/api/mapping/create", "json", lambda s: _valid(target_port=80.0), 400, "invalid_field", "target_port"),
    ("use_tunnel-string", "POST", "/api/mapping/create", "json", lambda s: _valid(use_tunnel="yes"), 400, "invalid_field", "use_tunnel"),
    ("use_tunnel-int", "POST", "/api/mapping/create", "json", lambda s: _valid(use_tunnel=1), 400, "invalid_field", "use_tunnel"),
    ("client-int", "POST", "/api/mapping/create", "json", lambda s: _valid(client=5), 400, "invalid_field", "client"),
    ("name-65", "POST", "/api/mapping/create", "json", lambda s: _valid(name="n" * 65), 400, "invalid_field", "name"),
    ("name-int", "POST", "/api/mapping/create", "json", lambda s: _valid(name=7), 400, "invalid_field", "name"),
    ("unknown-field", "POST", "/api/mapping/create", "json", lambda s: _valid(foo=1), 400, "invalid_field", "foo"),
    ("out-of-range-low", "POST", "/api/mapping/create", "json", lambda s: _valid(port=19999), 400, "port_out_of_range", None),
    ("out-of-range-high", "POST", "/api/mapping/create", "json", lambda s: _valid(port=32700), 400, "port_out_of_range", None),
    ("out-of-range-80", "POST", "/api/mapping/create", "json", lambda s: _valid(port=80), 400, "port_out_of_range", None),
    ("blacklisted", "POST", "/api/mapping/create", "json", lambda s: _valid(port=s.blacklisted), 400, "port_out_of_range", None),
    ("tunnel-disabled", "POST", "/api/mapping/create", "json", lambda s: _valid(use_tunnel=True), 400, "tunnel_disabled", None),
    ("tunnel-disabled-no-ip", "POST", "/api/mapping/create", "json", lambda s: {"port": free_port(), "use_tunnel": True}, 400, "tunnel_disabled", None),
    ("duplicate", "POST", "/api/mapping/create", "json", lambda s: _valid(port=s.existing, target_port=10), 409, "port_in_use", None),
    ("not-found-api", "GET", "/api/nope", "json", None, 404, "not_found", None),
    ("not-found-api-post", "POST", "/api/mapping/nope", "json", lambda s: _valid(), 404, "not_found", None),
    ("not-found-root", "GET", "/nope.json", "json", None, 404, "not_found", None),
    ("remove-unmapped", "POST", "/api/mapping/remove", "json", lambda s: {"port": free_port()}, 404, "not_found", None),
    ("remove-invalid-json", "POST", "/api/mapping/remove", "raw", "port=1", 400, "invalid_json", None),
    ("remove-port-string", "POST", "/api/mapping/remove", "json", lambda s: {"port": str(s.existing)}, 400, "invalid_field", "port"),
    ("remove-port-missing", "POST", "/api/mapping/remove", "json", lambda s: {}, 400, "invalid_field", "port"),
    ("too-large", "POST", "/api/mapping/create", "raw", '{"port": {P}, "target_ip": "127.0.0.1", "target_port": 9, "name": "' + "x" * (65 * 1024) + '"}', 413, "body_too_large", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_failure(fsrv, case):
    cid, method, path, kind, payload, want_status, want_error, field = case
    before_list = fsrv.list()
    before_rows = db_rows(fsrv.db_path)
    assert len(before_rows) == len(before_list) == 1
    port_used = None
    if kind == "raw":
        port_used = free_port()
        raw = payload.replace("{P}", str(port_used))
        status, headers, body = fsrv.api(method, path, raw=raw)
    else:
        obj = payload(fsrv) if callable(payload) else payload
        if isinstance(obj, dict) and isinstance(obj.get("port"), int):
            port_used = obj["port"]
        status, headers, body = fsrv.api(method, path, body=obj)
    assert_failure(status, headers, body, want_status, want_error, field)
    assert fsrv.list() == before_list, "failed request changed the mappings"
    assert db_rows(fsrv.db_path) == before_rows, "failed request changed the database"
    if port_used and port_used != fsrv.existing and 0 < port_used < 65536:
        assert connect_refused(port_used), f"failed create left a listener on {port_used}"


def test_port_held_by_other_process(fsrv):
    before_rows = db_rows(fsrv.db_path)
    port = free_port()
    with PortHolder(port):
        status, headers, body = fsrv.api("POST", "/api/mapping/create",
                                         body=_valid(port=port))
        assert_failure(status, headers, body, 409, "port_in_use")
    assert db_rows(fsrv.db_path) == before_rows
    assert fsrv.mapping(port) is None
    # Once the port is free, the same create succeeds (nothing half-made was left).
    data = fsrv.create_ok(**_valid(port=port))
    assert data["status"] == "listening"
    assert fsrv.remove(port)[0] == 200


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/api/mapping/create", "POST"),
    ("GET", "/api/mapping/remove", "POST"),
    ("POST", "/api/mapping/list", "GET"),
    ("POST", "/health", "GET"),
    ("DELETE", "/api/mapping/list", "GET"),
])
def test_method_not_allowed(fsrv, method, path, allow):
    before_rows = db_rows(fsrv.db_path)
    body = {"port": fsrv.existing} if method != "GET" else None
    status, headers, payload = fsrv.api(method, path, body=body)
    assert_failure(status, headers, payload, 405, "method_not_allowed")
    allowed = [m.strip() for m in (headers.get("Allow") or "").split(",")]
    assert allow in allowed, f"Allow header {headers.get('Allow')!r}"
    assert db_rows(fsrv.db_path) == before_rows


def test_failures_left_store_intact(fsrv):
    """After the whole table: one mapping, in the API, in the file, after a restart."""
    [m] = fsrv.list()
    assert m["port"] == fsrv.existing and m["name"] == "keep" and m["status"] == "listening"
    assert fsrv.stop() == 0
    rows = db_rows(fsrv.db_path)
    assert len(rows) == 1 and rows[0][1] == str(fsrv.existing), rows
    fsrv.start()
    assert [x["port"] for x in fsrv.list()] == [fsrv.existing]


def test_server_survives_garbage_requests(fsrv):
    """Odd but well-formed HTTP must not hurt the server."""
    for raw in ['{"port": ' + "9" * 5000 + "}", '{"port": 1, "port": 2}', "\x00\xff\xfe",
                '{"name": "\\ud800"}', json.dumps({"port": [1] * 1000})]:
        status, _, body = fsrv.api("POST", "/api/mapping/create", raw=raw)
        assert 400 <= status < 500, (raw[:40], status, body)
    assert fsrv.health()["status"] == "ok"
    assert len(fsrv.list()) == 1


# ---------------------------------------------------------------------------
# More of the contract


def test_created_at_is_now(server):
    data = server.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    if isinstance(data["created_at"], int):
        assert abs(data["created_at"] - time.time()) < 120, data
    else:
        assert isinstance(data["created_at"], str) and data["created_at"], data


def test_concurrent_creates_same_port(server):
    """Create is atomic: of 16 simultaneous creates on one port exactly one wins."""
    port = free_port()
    with ThreadPoolExecutor(16) as ex:
        results = list(ex.map(lambda i: server.create(port=port, target_ip="127.0.0.1",
                                                      target_port=1000 + i), range(16)))
    codes = sorted(status for status, _ in results)
    assert codes == [201] + [409] * 15, results
    [winner] = [body["data"] for status, body in results if status == 201]
    assert all(body["error"] == "port_in_use" for status, body in results if status == 409)
    [m] = server.list()
    assert m["target_port"] == winner["target_port"]
    assert db_rows(server.db_path) and len(db_rows(server.db_path)) == 1


def test_clients_without_tunnel(server):
    status, headers, body = server.api("GET", "/api/clients")
    assert status == 200
    assert_json(headers)
    assert body["success"] is True and body["data"] == {"clients": [], "count": 0}


def test_metrics_exposition(server, http_backend):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=http_backend.port)
    assert curl(f"http://127.0.0.1:{port}/hello.txt") == http_backend.files["hello.txt"]
    status, headers, text = server.api("GET", "/metrics")
    assert status == 200
    ctype = headers.get("Content-Type", "")
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype, ctype
    assert isinstance(text, str) and "# TYPE" in text
    # Every sample line is NAME[{labels}] VALUE.
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert re.match(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [-+0-9.eE]+(Inf|NaN)?$',
                             line), line
    assert f'port="{port}"' in text


def test_remove_twice(server):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    assert server.remove(port)[0] == 200
    status, headers, body = server.api("POST", "/api/mapping/remove", body={"port": port})
    assert_failure(status, headers, body, 404, "not_found")
    # And it can be created again afterwards.
    assert server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)["port"] == port


def test_many_requests_one_connection(server):
    """HTTP/1.1 keep-alive: several requests on one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.api_port, timeout=10)
    try:
        for _ in range(20):
            conn.request("GET", "/api/mapping/list")
            r = conn.getresponse()
            assert r.status == 200
            assert json.loads(r.read())["success"] is True
    finally:
        conn.close()


def test_create_on_the_api_port(server):
    """The server's own API port cannot be mapped: the bind fails, 409, nothing stored."""
    status, headers, body = server.api("POST", "/api/mapping/create", body={
        "port": server.api_port, "target_ip": "127.0.0.1", "target_port": 9})
    assert_failure(status, headers, body, 409, "port_in_use")
    assert server.list() == []
    assert server.health()["status"] == "ok"


def test_head_health(server):
    """Health checkers often use HEAD: it goes wherever GET does, without a body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.api_port, timeout=5)
    conn.request("HEAD", "/health")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read() == b""
    conn.close()
