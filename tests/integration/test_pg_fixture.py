"""The PostgreSQL fixture itself (pg_helpers.py): it starts a real server the cluster
tests can use, answers SQL on its socket and its loopback port, and freezes/thaws."""
import socket

from conftest import wait_until

from pg_helpers import pg  # noqa: F401  (fixture)


def test_pg_starts_answers_and_freezes(pg):  # noqa: F811
    assert pg.psql("SELECT 40 + 2") == [["42"]]
    assert pg.psql("SHOW server_version_num")[0][0] >= "150000"
    # The node connects over TCP on loopback: the port must accept.
    with socket.create_connection(("127.0.0.1", pg.port), timeout=5):
        pass
    pids = pg.pids()
    assert len(pids) >= 2  # postmaster and its children
    pg.freeze()
    # A backend may exit between the listing and the signal (the psql session above ends
    # on its own): gone counts as stopped; the postmaster itself must be stopped.
    wait_until(lambda: _state(pids[0]) == "T" and
               all(_state(pid) in ("T", None) for pid in pg.pids()), timeout=10,
               desc="every postgres process stopped")
    pg.thaw()
    assert pg.psql("SELECT 1") == [["1"]]


def _state(pid):
    """The process's state letter (T when stopped), None when it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except FileNotFoundError:
        return None
