"""Schema migrations (SPEC §1, §2): a fresh database gets the schema and PRAGMA
user_version; a second start applies nothing; a database from a newer portmux (or not a
database at all) stops start-up and is left byte for byte as it was."""
import hashlib
import re
import socket
import time

import pytest

from conftest import SOURCE_DIR, free_port, recv_exact, sqlite


def newest_migration():
    versions = [int(p.name.split("_")[0]) for p in (SOURCE_DIR / "migrations").glob("*.sql")]
    assert versions, "no migrations/NNNN_name.sql found"
    return max(versions)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def columns(db):
    return [row[1] for row in sqlite(db, "PRAGMA table_info(mappings)")]


def test_fresh_start_creates_schema(server_factory):
    srv = server_factory()
    assert srv.stop() == 0
    assert sqlite(srv.db_path, "SELECT name FROM sqlite_master WHERE type='table' "
                               "AND name='mappings'") == [["mappings"]]
    assert sqlite(srv.db_path, "PRAGMA user_version") == [[str(newest_migration())]]
    assert newest_migration() >= 1
    for col in ("id", "port", "target_ip", "target_port", "use_tunnel", "client", "name",
                "created_at"):
        assert col in columns(srv.db_path), f"column {col} missing"
    assert sqlite(srv.db_path, "PRAGMA integrity_check") == [["ok"]]


def test_second_start_applies_nothing(server_factory):
    srv = server_factory()
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9, name="x")
    assert srv.stop() == 0
    schema1 = sqlite(srv.db_path, "SELECT sql FROM sqlite_master ORDER BY name")
    rows1 = sqlite(srv.db_path, "SELECT * FROM mappings")
    version1 = sqlite(srv.db_path, "PRAGMA user_version")
    log_before = len(srv.log_text())
    srv.start()
    assert srv.stop() == 0
    second = srv.log_text()[log_before:]
    assert re.search(r"\bapplied 0 migrations\b", second), second
    assert not re.search(r"applied [1-9]\d* migration", second), second
    assert sqlite(srv.db_path, "PRAGMA user_version") == version1
    assert sqlite(srv.db_path, "SELECT sql FROM sqlite_master ORDER BY name") == schema1
    assert sqlite(srv.db_path, "SELECT * FROM mappings") == rows1


def _start_must_fail(srv, timeout=5.0):
    t0 = time.monotonic()
    srv.proc.start()
    rc = srv.proc.wait(timeout)
    return rc, time.monotonic() - t0


@pytest.mark.parametrize("with_rows", [False, True])
def test_future_schema_refused(server_factory, with_rows):
    srv = server_factory()
    if with_rows:
        srv.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    assert srv.stop() == 0
    sqlite(srv.db_path, "PRAGMA user_version=99")
    assert sqlite(srv.db_path, "PRAGMA user_version") == [["99"]]
    before = sha(srv.db_path)
    siblings = sorted(p.name for p in srv.db_path.parent.iterdir())
    log_before = len(srv.log_text())
    rc, took = _start_must_fail(srv)
    assert rc != 0, "started on a database from the future"
    assert took < 5
    log = srv.log_text()[log_before:]
    assert re.search(r"\b99\b", log), f"the refusal does not name version 99: {log}"
    assert sha(srv.db_path) == before, "database file changed"
    after = sorted(p.name for p in srv.db_path.parent.iterdir())
    assert after == siblings, f"left files behind: {set(after) - set(siblings)}"


def test_not_a_database_refused(server_factory):
    srv = server_factory(start=False)
    srv.db_path.write_bytes(b"this is not an SQLite database\n" * 100)
    before = sha(srv.db_path)
    rc, _ = _start_must_fail(srv)
    assert rc != 0
    assert sha(srv.db_path) == before
    assert str(srv.db_path) in srv.log_text(), "the refusal does not name the file"


def test_foreign_database_version_0_is_migrated(server_factory):
    """A database with user_version 0 but unrelated tables is migrated alongside them."""
    srv = server_factory(start=False)
    sqlite(srv.db_path, "CREATE TABLE notes(x TEXT); INSERT INTO notes VALUES('kept');")
    srv.start()
    assert srv.stop() == 0
    assert sqlite(srv.db_path, "SELECT x FROM notes") == [["kept"]]
    assert sqlite(srv.db_path, "PRAGMA user_version") == [[str(newest_migration())]]


def test_schema_1_database_migrates_and_keeps_every_mapping(server_factory, echo_backend):
    """A database written by the schema before the policy columns (0001 only, as the
    previous portmux left it) opens, gains the columns with defaults that keep each
    mapping behaving as before, and loses nothing."""
    srv = server_factory(start=False)
    p1, p2, p3 = free_port(), free_port(), free_port()
    schema1 = (SOURCE_DIR / "migrations" / "0001_init.sql").read_text()
    # Leading "BEGIN;": the file starts with a comment, which sqlite3 would take for an
    # option when it opens the argument.
    sqlite(srv.db_path, "BEGIN;\n" + schema1 + f"""
        INSERT INTO mappings (port, target_ip, target_port, use_tunnel, client, name,
                              created_at)
        VALUES ({p1}, '127.0.0.1', {echo_backend.port}, 0, '', 'echo', 1700000000),
               ({p2}, '', 22, 1, 'edge1', 'ssh', 1700000001),
               ({p3}, 'db.internal', 5432, 0, '', '', 1700000002);
        PRAGMA user_version = 1;
        COMMIT;""")
    rows_before = sqlite(srv.db_path, "SELECT id, port, target_ip, target_port, use_tunnel, "
                                      "client, name, created_at FROM mappings ORDER BY port")
    srv.config["tunnel"] = {"enabled": True, "listen_port": free_port(),
                            "listen_addr": "127.0.0.1",
                            "clients": [{"name": "edge1", "token": "tok-edge1-0123456789"}]}
    srv.write_config()
    srv.start()
    srv.wait_log(r"applied \d+ migration")
    assert sqlite(srv.db_path, "PRAGMA user_version", readonly=True) == \
        [[str(newest_migration())]]
    for col in ("allow_from", "proxy_protocol", "max_connections", "rate_limit", "enabled"):
        assert col in columns(srv.db_path), f"column {col} missing"
    assert sqlite(srv.db_path, "SELECT id, port, target_ip, target_port, use_tunnel, client, "
                               "name, created_at FROM mappings ORDER BY port",
                  readonly=True) == rows_before
    listed = {m["port"]: m for m in srv.list()}
    assert set(listed) == {p1, p2, p3}
    for m in listed.values():
        assert (m["allow_from"], m["proxy_protocol"], m["rate_limit"], m["enabled"]) == \
            ([], "none", 0, True), m
        assert m["max_connections"] == 10000, m
    assert listed[p1]["name"] == "echo" and listed[p1]["status"] == "listening"
    assert listed[p2]["client"] == "edge1" and listed[p2]["status"] == "waiting_for_client"
    assert listed[p3]["target_ip"] == "db.internal"
    with socket.create_connection(("127.0.0.1", p1), timeout=5) as s:
        s.sendall(b"old row\n")
        assert recv_exact(s, 8) == b"old row\n"
