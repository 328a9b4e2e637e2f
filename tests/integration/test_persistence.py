"""Mappings survive kill -9 and restarts; a stored mapping whose port is taken at start-up
is kept with status "error" and comes back when the port is free (SPEC §2)."""
import signal
import subprocess

from conftest import PortHolder, connect_refused, free_port, sqlite


def fetch(port, path="/hello.txt"):
    r = subprocess.run(["curl", "-sS", "--fail", "--max-time", "10",
                        f"http://127.0.0.1:{port}{path}"], capture_output=True, timeout=15)
    assert r.returncode == 0, f"curl via {port}: {r.stderr.decode()}"
    return r.stdout


def test_kill9_right_after_create(server, http_backend):
    port = free_port()
    created = server.create_ok(port=port, target_ip="127.0.0.1", target_port=http_backend.port,
                               name="survivor")
    server.kill9()  # no chance to flush anything after the 201
    assert connect_refused(port)
    server.start()
    m = server.mapping(port)
    assert m is not None, "mapping lost by kill -9"
    for key in ("id", "port", "target_ip", "target_port", "use_tunnel", "client", "name",
                "created_at"):
        assert m[key] == created[key], (key, m[key], created[key])
    assert m["status"] == "listening"
    assert fetch(port) == http_backend.files["hello.txt"]


def test_restart_keeps_many_and_forgets_removed(server, http_backend):
    ports = [free_port() for _ in range(30)]
    for p in ports:
        server.create_ok(port=p, target_ip="127.0.0.1", target_port=http_backend.port)
    gone = ports[::3]
    for p in gone:
        assert server.remove(p)[0] == 200
    server.restart(sig=signal.SIGKILL)
    kept = sorted(set(ports) - set(gone))
    listed = server.list()
    assert sorted(m["port"] for m in listed) == kept
    assert all(m["status"] == "listening" for m in listed), listed
    assert server.health()["mappings"] == len(kept)
    for p in gone:
        assert connect_refused(p), f"removed mapping {p} came back"
    assert fetch(kept[0]) == http_backend.files["hello.txt"]
    assert fetch(kept[-1]) == http_backend.files["hello.txt"]


def _error_then_listening(server, port, other):
    m = server.mapping(port)
    assert m is not None, "mapping whose port was taken was dropped"
    assert m["status"] == "error", m
    assert isinstance(m.get("error"), str) and m["error"].strip(), m
    # The other mapping is not affected.
    assert server.mapping(other)["status"] == "listening"
    assert len(sqlite(server.db_path, "SELECT port FROM mappings")) == 2


def test_port_taken_at_restart_is_error_then_recovers(server, http_backend):
    port, other = free_port(), free_port()
    for p in (port, other):
        server.create_ok(port=p, target_ip="127.0.0.1", target_port=http_backend.port)
    assert server.stop() == 0
    with PortHolder(port):
        server.start()
        _error_then_listening(server, port, other)
        assert fetch(other) == http_backend.files["hello.txt"]
        assert server.stop() == 0
    # The port is free again: a restart binds it.
    server.start()
    m = server.mapping(port)
    assert m["status"] == "listening", m
    assert not m.get("error"), m
    assert fetch(port) == http_backend.files["hello.txt"]


def test_port_taken_at_restart_is_retried_by_create(server, http_backend):
    port, other = free_port(), free_port()
    for p in (port, other):
        server.create_ok(port=p, target_ip="127.0.0.1", target_port=9)
    assert server.stop() == 0
    holder = PortHolder(port)
    try:
        server.start()
        _error_then_listening(server, port, other)
        # Still held: a create on it is refused and the stored row stays as it was.
        status, body = server.create(port=port, target_ip="127.0.0.1",
                                     target_port=http_backend.port)
        assert status == 409 and body["error"] == "port_in_use", body
        assert server.mapping(port)["status"] == "error"
        assert sqlite(server.db_path, "SELECT target_port FROM mappings WHERE port=%d" % port) \
            == [["9"]]
    finally:
        holder.close()
    # Free now: the same create retries the bind and replaces the errored mapping.
    data = server.create_ok(port=port, target_ip="127.0.0.1", target_port=http_backend.port)
    assert data["status"] == "listening"
    assert fetch(port) == http_backend.files["hello.txt"]
    assert [m["port"] for m in server.list()].count(port) == 1
    server.restart()
    m = server.mapping(port)
    assert m["status"] == "listening" and m["target_port"] == http_backend.port, m


def test_error_mapping_can_be_removed(server):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    assert server.stop() == 0
    with PortHolder(port):
        server.start()
        assert server.mapping(port)["status"] == "error"
        status, body = server.remove(port)
        assert status == 200 and body["data"] == {"port": port}, body
        assert server.mapping(port) is None
    server.restart()
    assert server.list() == []
    assert sqlite(server.db_path, "SELECT count(*) FROM mappings") == [["0"]]


def test_database_locked_by_another_process_is_503_not_a_frozen_server(server, http_backend):
    """Another process holding SQLite's write lock (a sqlite3 shell left in a transaction)
    makes a write answer 503 store_unavailable within a fraction of a second, with
    nothing changed, not a 5 s freeze of every relay and a 500; once the lock goes, the
    same write works."""
    import sqlite3
    import time
    kept = free_port()
    server.create_ok(port=kept, target_ip="127.0.0.1", target_port=http_backend.port)
    port = free_port()
    db = sqlite3.connect(server.db_path, timeout=1, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        t0 = time.monotonic()
        status, body = server.create(port=port, target_ip="127.0.0.1",
                                     target_port=http_backend.port)
        took = time.monotonic() - t0
        assert status == 503 and body["error"] == "store_unavailable", (status, body)
        assert took < 2.0, f"the write held the server for {took:.2f} s"
        assert connect_refused(port), "a listener stayed for a write that was not stored"
        status, body = server.remove(kept)
        assert status == 503 and body["error"] == "store_unavailable", (status, body)
        t0 = time.monotonic()
        server.health()
        assert time.monotonic() - t0 < 1.0
        assert fetch(kept) == http_backend.files["hello.txt"]  # relaying goes on
    finally:
        db.execute("ROLLBACK")
        db.close()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=http_backend.port)
    assert fetch(port) == http_backend.files["hello.txt"]
    assert sorted(int(r[0]) for r in sqlite(server.db_path, "SELECT port FROM mappings")) \
        == sorted([kept, port])


def test_a_new_database_is_the_servers_alone(server_factory):
    """The database lists every target and the tunnel clients' token hashes: a new one,
    its -wal and -shm files and the directories the server creates for it are not
    readable by other users, whatever the umask (here 022, the usual one)."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        srv = server_factory(start=False)
        db = srv.dir / "state" / "sub" / "m.db"
        srv.config["database"] = {"path": str(db)}
        srv.write_config()
        srv.start()
    finally:
        os.umask(old)
    srv.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (srv.dir / "state", db.parent, db, db.with_name("m.db-wal"),
                       db.with_name("m.db-shm"), db.with_name("m.db.lock")) if p.exists()}
    assert {"m.db", "m.db-wal", "state", "sub"} <= set(modes), modes
    assert all(m & 0o077 == 0 for m in modes.values()), {k: oct(v) for k, v in modes.items()}
