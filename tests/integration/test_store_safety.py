"""The SQLite store under an operator's bad day, from a review of "never loses a mapping":
durability of an answered write, more stored mappings than descriptors, the database
file deleted under a running server, a second server through a symlink, a database the
server may not write."""
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import SERVER_BIN, free_port, free_range, run_once, wait_until


def test_a_create_is_on_disk_before_it_is_answered(server_factory):
    """SPEC 3: the change is durable when the answer is sent. With synchronous=NORMAL
    in WAL mode SQLite synced only at checkpoints: a power cut could take back a
    mapping answered 201. Traced: an fsync/fdatasync comes before the 201."""
    srv = server_factory()
    out = srv.dir / "strace.out"
    tracer = subprocess.Popen(
        ["strace", "-f", "-qq", "-s", "24", "-e", "trace=fsync,fdatasync,sendto,sendmsg,writev,write",
         "-o", str(out), "-p", str(srv.pid)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # attached (strace -qq says nothing when it is)
        if tracer.poll() is not None:
            pytest.skip(f"strace cannot attach here: {tracer.stderr.read().strip()}")
        port = free_port()
        srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
        wait_until(lambda: "201 Created" in out.read_text(), timeout=10,
                   desc="the answer traced")
    finally:
        tracer.send_signal(signal.SIGINT)
        tracer.wait(10)
    lines = out.read_text().splitlines()
    answered = next(i for i, l in enumerate(lines) if "201 Created" in l)
    synced = [l for l in lines[:answered] if re.search(r"\b(fsync|fdatasync)\(", l)]
    assert synced, "\n".join(lines[:answered + 1])


def test_more_stored_mappings_than_descriptors_still_starts_with_its_api(server_factory):
    """A restore bound every stored mapping: with more of them than the open-file limit
    allows, the API found no descriptor, the start failed (exit 1) and so did every later
    one, leaving no way to remove a mapping. Listeners now leave the reserve to the API:
    the ports past it keep status error, and the API answers."""
    base = free_range(150)
    srv = server_factory(config={"port_range": {"from": base, "end": base + 149,
                                                "blacklist": []}})
    for port in range(base, base + 150):
        srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    assert srv.stop() == 0
    srv.proc.args = ["prlimit", "--nofile=128:128", *srv.proc.args]
    srv.start(timeout=20)
    listed = srv.list()
    assert len(listed) == 150
    failed = [m for m in listed if m["status"] == "error"]
    assert failed and len(failed) < 150, [m["status"] for m in listed]
    assert all("Too many open files" in (m.get("error") or m.get("message") or str(m))
               for m in failed), failed[0]
    # The operator can act: a mapping removed, the API still answers, nothing else lost.
    assert srv.remove(failed[0]["port"])[0] == 200
    assert srv.api("GET", "/health")[0] == 200
    assert len(srv.list()) == 149


def test_a_database_deleted_under_the_server_refuses_writes(server_factory):
    """Deleted (or replaced) while the server runs, the database took every write into the
    unlinked file: 201, and gone at the next start. Writes now answer 503 and change
    nothing; the log says why."""
    srv = server_factory()
    kept = free_port()
    srv.create_ok(port=kept, target_ip="127.0.0.1", target_port=9)
    for suffix in ("", "-wal", "-shm"):
        Path(str(srv.db_path) + suffix).unlink(missing_ok=True)
    port = free_port()
    status, body = srv.create(port=port, target_ip="127.0.0.1", target_port=9)
    assert status == 503 and body["error"] == "store_unavailable", (status, body)
    assert "server log" in body["message"], body
    assert [m["port"] for m in srv.list()] == [kept]
    srv.wait_log(r"was deleted or replaced while the server runs: writes are refused")
    status, body = srv.remove(kept)
    assert status == 503, (status, body)
    assert [m["port"] for m in srv.list()] == [kept]


def test_a_second_server_through_a_symlink_is_refused(server_factory):
    """The lock was named after the configured path: a second server given a symlink to
    the same database started, and the two wrote behind each other's backs."""
    first = server_factory(name="first")
    link_dir = Path(tempfile.mkdtemp(prefix="portmux-link-"))
    try:
        link = link_dir / "mappings.db"
        link.symlink_to(first.db_path)
        second = server_factory(name="second", start=False,
                                config={"database": {"path": str(link)}})
        second.proc.start()
        assert second.proc.wait(10) != 0, second.log_tail()
        assert "in use by another portmux-server" in second.log_text(), second.log_tail()
        assert first.api("GET", "/health")[0] == 200
    finally:
        shutil.rmtree(link_dir)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to run the server as another user")
def test_a_database_the_server_may_not_write_is_refused_at_start():
    """SQLite opened a file it may not write read-only without a word: the server said
    "ready" and every write failed (500). It now refuses to start, naming the cause."""
    d = Path(tempfile.mkdtemp(prefix="portmux-ro-", dir="/tmp"))  # reachable by nobody
    try:
        d.chmod(0o777)
        db = d / "mappings.db"
        db.touch()
        db.chmod(0o444)  # root's, read-only to everyone else
        server = d / "portmux-server"  # a copy nobody may run wherever the checkout is
        shutil.copy(SERVER_BIN, server)
        server.chmod(0o755)
        cfg = d / "config.yaml"
        cfg.write_text(f"api:\n  listen_addr: 127.0.0.1\n  listen_port: {free_port()}\n"
                       f"database:\n  path: {db}\n")
        cfg.chmod(0o644)
        r = run_once(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", server,
                      "--config", cfg], timeout=10)
        err = r.stderr.decode()
        assert r.returncode == 1, (r.returncode, err)
        assert "is read-only to this process" in err, err
    finally:
        shutil.rmtree(d)
