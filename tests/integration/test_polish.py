"""Operator polish (issue 17): server flags, JSON shape details, rtt_ms rounding, direct
mappings without a client, TLS files as config errors, one server per database, mapping
ids never reused (migration 0004). Real binaries, 127.0.0.1, free ports."""
import http.client
import json
import os
import re
import shutil
import subprocess

import pytest

from conftest import (CLIENT_BIN, SERVER_BIN, SOURCE_DIR, Server, free_port, run_once,
                      sqlite, wait_until)
from tunnel_helpers import start_client, tunnel_server

TOKEN = "tok-" + os.urandom(8).hex()


def raw_get(port, path):
    """GET path; returns (status, body bytes) exactly as sent."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


# ---- flags ----

@pytest.mark.parametrize("flag", ["-V", "--version", "-version"])
def test_version_flags(flag):
    r = run_once([SERVER_BIN, flag])
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rb"portmux-server \d+\.\d+\.\d+\n", r.stdout), r.stdout


@pytest.mark.parametrize("flag", ["-h", "--help", "-help"])
def test_help_flags_list_short_forms(flag):
    r = run_once([SERVER_BIN, flag])
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert "-h, -help, --help" in out and "-V, --version" in out and "SIGHUP" in out, out


# ---- JSON details ----

def test_json_responses_end_with_a_newline(server):
    for path in ("/health", "/api/mapping/list", "/api/clients", "/api/nope"):
        status, body = raw_get(server.api_port, path)
        assert body.endswith(b"}\n") and body.count(b"\n") == 1, (path, status, body)
        json.loads(body)
    status, _, body = server.api("POST", "/api/mapping/create", raw=b"{bad")
    assert status == 400 and body["error"] == "invalid_json", body


def test_direct_mapping_has_no_client(server):
    port = free_port()
    m = server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    assert m["client"] == "" and m["use_tunnel"] is False, m
    port2 = free_port()  # a client named in direct mode is not kept either
    m2 = server.create_ok(port=port2, target_ip="127.0.0.1", target_port=9, client="edge")
    assert m2["client"] == "", m2
    assert server.mapping(port)["client"] == "" and server.mapping(port2)["client"] == ""
    assert server.sqlite(f"SELECT client FROM mappings WHERE port={port}") == [[""]]
    status, text = raw_get(server.api_port, "/metrics")
    # The per-mapping series carry a client label (portmux_connections_refused_total has
    # {port,reason} only, as SPEC §2 names it).
    lines = [ln for ln in text.decode().splitlines()
             if f'port="{port}"' in ln and ln.startswith("portmux_mapping_")]
    assert lines and all('client=""' in ln for ln in lines), lines


@pytest.mark.skipif(not CLIENT_BIN.exists(), reason="portmux-client not built")
def test_rtt_ms_in_whole_microseconds(server_factory, tmp_path, logs):
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}],
                        heartbeat_interval=1, heartbeat_timeout=5)
    start_client(tmp_path, logs, srv, TOKEN, "--heartbeat-interval", "1")

    def sample():
        _, body = raw_get(srv.api_port, "/api/clients")
        m = re.search(rb'"rtt_ms":\s*([0-9.eE+-]+)', body)
        return m and float(m.group(1)) > 0 and m.group(1)
    text = wait_until(sample, timeout=10, desc="an rtt_ms sample").decode()
    assert re.fullmatch(r"\d+(\.\d{1,3})?", text), f"rtt_ms printed as {text}"


# ---- TLS files are config errors ----

def tls_server(tmp_path, name, **tls):
    port = free_port()
    cfg = {"tunnel": {"enabled": True, "listen_addr": "127.0.0.1",
                      "listen_port": free_port(), "tls": tls}}
    return Server(tmp_path / name, config=cfg, name=name, api_port=port)


def start_fails(srv):
    r = run_once([SERVER_BIN, "--config", srv.config_path], timeout=10)
    return r.returncode, r.stderr.decode() + r.stdout.decode()


def tls_line(srv, key):
    """The config file's line number of key (cert_file, key_file, client_ca)."""
    for i, ln in enumerate(srv.config_path.read_text().splitlines(), 1):
        if re.match(rf"\s*{key}:", ln):
            return i
    raise AssertionError(f"{key} not in {srv.config_path}")


@pytest.mark.parametrize("which", ["cert_file", "key_file", "client_ca"])
def test_missing_tls_file_is_a_config_error(tmp_path, pki, which):
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
           "client_ca": str(pki["client_ca"])}
    tls[which] = str(tmp_path / "nonexistent.pem")
    srv = tls_server(tmp_path, f"missing-{which}", **tls)
    rc, out = start_fails(srv)
    assert rc == 2, (rc, out)
    want = f"{srv.config_path}:{tls_line(srv, which)}: tunnel.tls.{which}: " \
           "No such file or directory"
    assert want in out, out
    assert len(out.strip().splitlines()) == 1, out


def test_unreadable_malformed_and_mismatched_tls_files(tmp_path, pki):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    srv = tls_server(tmp_path, "bad-cert", cert_file=str(garbage),
                     key_file=str(pki["server_key"]))
    rc, out = start_fails(srv)
    assert rc == 2 and f":{tls_line(srv, 'cert_file')}: tunnel.tls.cert_file: no PEM " \
                      "certificate" in out, out

    srv = tls_server(tmp_path, "bad-key", cert_file=str(pki["server"]),
                     key_file=str(pki["server"]))  # a certificate where the key belongs
    rc, out = start_fails(srv)
    assert rc == 2 and "tunnel.tls.key_file: no PEM private key" in out, out

    srv = tls_server(tmp_path, "other-key", cert_file=str(pki["server"]),
                     key_file=str(pki["client_key"]))
    rc, out = start_fails(srv)
    assert rc == 2 and "tunnel.tls.key_file: the key does not belong" in out, out

    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.key"
        shutil.copy(pki["server_key"], locked)
        locked.chmod(0)
        srv = tls_server(tmp_path, "locked", cert_file=str(pki["server"]),
                         key_file=str(locked))
        rc, out = start_fails(srv)
        assert rc == 2 and "tunnel.tls.key_file: Permission denied" in out, out


def test_good_tls_files_start(tmp_path, pki, logs):
    srv = tls_server(tmp_path, "good", cert_file=str(pki["server"]),
                     key_file=str(pki["server_key"]), client_ca=str(pki["client_ca"]))
    logs.append(srv)
    srv.start()
    assert srv.health()["tunnel_enabled"] is True
    assert srv.stop() == 0


# ---- one server per database ----

def test_second_server_on_the_same_database_fails_and_touches_nothing(server_factory):
    first = server_factory()
    port = free_port()
    first.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    rows = first.sqlite("SELECT * FROM mappings")
    files = {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()
             if p.name.startswith("mappings.db")}

    second = server_factory(config={"database": {"path": str(first.db_path)}},
                            name="second", start=False)
    second.proc.start()
    rc = second.proc.wait(10)
    log = second.log_text().strip().splitlines()
    assert rc == 1, (rc, log)
    errors = [ln for ln in log if " ERROR " in ln]
    assert len(errors) == 1 and "in use by another portmux-server" in errors[0], log
    assert not any("listening" in ln for ln in log), log
    # The live server is untouched: same files, same rows, still serving.
    assert {p.name: p.stat().st_mtime_ns for p in first.dir.iterdir()
            if p.name.startswith("mappings.db")} == files
    assert first.sqlite("SELECT * FROM mappings") == rows
    assert first.mapping(port)["status"] == "listening"

    # Once the first is gone (even by kill -9) the database is free again.
    first.kill9()
    second.start()
    assert second.mapping(port) is not None


# ---- ids (migration 0004) ----

SCHEMA_0001 = (SOURCE_DIR / "migrations" / "0001_init.sql").read_text()


def test_ids_not_reused_after_remove(server):
    a = server.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    b = server.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    assert server.remove(b["port"])[0] == 200
    c = server.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    assert c["id"] > b["id"] > a["id"], (a, b, c)
    server.restart()
    assert server.remove(c["port"])[0] == 200
    d = server.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    assert d["id"] > c["id"], (c, d)


def test_database_from_schema_1_keeps_rows_ids_and_checks(server_factory, tmp_path):
    db = tmp_path / "old.db"
    p1, p2, p3 = free_port(), free_port(), free_port()
    sqlite(db, "\n" + SCHEMA_0001 +  # a leading "-" would be a sqlite3 option
           f"INSERT INTO mappings VALUES (3, {p1}, '127.0.0.1', 9, 0, 'default', 'a', 100);"
           f"INSERT INTO mappings VALUES (7, {p2}, '', 22, 1, 'office', 'b', 200);"
           "PRAGMA user_version = 1;")
    srv = server_factory(config={"database": {"path": str(db)},
                                 "tunnel": {"enabled": True}})
    got = {m["port"]: m for m in srv.list()}
    assert (got[p1]["id"], got[p1]["name"], got[p1]["client"]) == (3, "a", ""), got[p1]
    assert (got[p2]["id"], got[p2]["client"], got[p2]["use_tunnel"]) == (7, "office", True)
    assert srv.remove(p2)[0] == 200
    m = srv.create_ok(port=p3, target_ip="127.0.0.1", target_port=9)
    assert m["id"] == 8, m  # after the highest id ever, not reusing 7
    schema = srv.sqlite("SELECT replace(sql, char(10), ' ') FROM sqlite_master "
                        "WHERE name='mappings'")[0][0]
    assert "AUTOINCREMENT" in schema and "CHECK (port BETWEEN 1 AND 65535)" in schema
    r = subprocess.run(["sqlite3", str(db), "INSERT INTO mappings (port, target_port, "
                        "use_tunnel, created_at) VALUES (0, 1, 0, 1)"], capture_output=True)
    assert r.returncode != 0 and b"CHECK constraint failed" in r.stderr, r.stderr


@pytest.mark.parametrize("addr,warned", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_tunnel_without_tls_off_loopback_warns(server_factory, addr, warned):
    """Tokens travel in the Hello: a tunnel reachable from the network without TLS says so
    at start (a loopback tunnel, say behind an ssh or stunnel front, does not)."""
    srv = tunnel_server(server_factory, listen_addr=addr)
    srv.wait_log(r"INFO server portmux .* ready", timeout=10)
    lines = [ln for ln in srv.log_text().splitlines() if "has no TLS" in ln]
    if warned:
        assert len(lines) == 1 and " WARN tunnel " in lines[0], lines
        assert "client tokens and relayed bytes cross the network in clear" in lines[0]
    else:
        assert lines == [], lines
