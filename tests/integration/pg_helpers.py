"""A real PostgreSQL 15 for the cluster tests (SPEC §7), started by the tests themselves.

``PgServer`` runs initdb and pg_ctl as the ``postgres`` user (runuser when the tests run
as root, directly otherwise) in a temp dir of its own: the server listens on a free
127.0.0.1 port and on a unix socket in that dir, with trust authentication for local
connections only. ``url`` is the libpq connection URL a portmux node is given;
``psql(sql)`` runs one statement and returns its rows; ``freeze()``/``thaw()`` send
SIGSTOP/SIGCONT to every PostgreSQL process (postmaster and its children), which is how
the tests model a stalled database. Every wait is a loop with a deadline; ``stop()``
(also the fixture's teardown) stops the server and thaws it first when frozen.

Fixture: ``pg`` (one started server per test). Tests that need PostgreSQL are skipped
when the binaries are not installed (scripts/install-deps.sh lists them).
"""
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, wait_until

PG_USER = "postgres"


def pg_bindir():
    """The newest installed PostgreSQL server's bin dir (Debian: /usr/lib/postgresql/N/bin)."""
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return Path(cands[-1]).parent if cands else None


def pg_available():
    if pg_bindir() is None:
        return False
    if os.geteuid() != 0:
        return True
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return False
    return shutil.which("runuser") is not None


def _as_pg(args):
    """args run as the postgres user (initdb and postgres refuse to run as root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_USER, "--"] + [str(a) for a in args]
    return [str(a) for a in args]


class OpenTransaction:
    """A psql session that ran BEGIN and sql, and holds the transaction open (its locks
    with it) until commit() or rollback() (or the end of a with block: rollback)."""

    def __init__(self, pg, sql):
        self.proc = subprocess.Popen(
            _as_pg([pg.bindir / "psql", "-X", "-q", "-A", "-t", "-h", pg.sockdir, "-p", pg.port,
                    "-U", PG_USER, "-d", pg.dbname, "-v", "ON_ERROR_STOP=1"]),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd="/")  # the postgres user may not enter the test's own directory
        self.proc.stdin.write(f"BEGIN;\n{sql};\nSELECT 'ready';\n")
        self.proc.stdin.flush()
        # psql answers at once; anything else it says (a warning, a row count) comes first.
        said = []
        while not said or said[-1] not in ("ready", ""):
            said.append(self.proc.stdout.readline().strip())
        if said[-1] != "ready":
            self.proc.kill()
            raise AssertionError(f"{sql}: {said}")

    def _end(self, how):
        if self.proc.stdin.closed:
            return
        self.proc.stdin.write(f"{how};\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def commit(self):
        self._end("COMMIT")

    def rollback(self):
        self._end("ROLLBACK")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.rollback()


class TableLock(OpenTransaction):
    """A psql session holding one table locked (ACCESS EXCLUSIVE: every read and write of
    it waits) until release() or the end of a with block."""

    def __init__(self, pg, table):
        super().__init__(pg, f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")

    def release(self):
        self.rollback()


class PgServer:
    def __init__(self, workdir=None, port=None):
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL server binaries not installed")
        self.tmp = Path(tempfile.mkdtemp(prefix="portmux-pg-", dir=workdir))
        self.datadir = self.tmp / "data"
        self.sockdir = self.tmp / "sock"
        self.logfile = self.tmp / "postgres.log"
        self.port = port or free_port()
        self.dbname = "portmux"
        self.frozen = False
        self.started = False
        self.sockdir.mkdir()
        if os.geteuid() == 0:
            pw = pwd.getpwnam(PG_USER)
            for p in (self.tmp, self.sockdir):
                os.chown(p, pw.pw_uid, pw.pw_gid)
            os.chmod(self.tmp, 0o755)

    @property
    def url(self):
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{self.dbname}"

    def _run(self, args, timeout=60):
        r = subprocess.run(_as_pg(args), capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r.stdout

    def start(self, timeout=60.0):
        if not (self.datadir / "PG_VERSION").exists():
            self._run([self.bindir / "initdb", "-D", self.datadir, "-U", PG_USER,
                       "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"],
                      timeout=timeout)
            with open(self.datadir / "postgresql.conf", "a") as f:
                # Only loopback and the private socket; fsync off: test data is throwaway.
                f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                        f"unix_socket_directories = '{self.sockdir}'\n"
                        "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                        "max_connections = 100\n")
        # -w: pg_ctl itself waits (bounded by -t) until the server accepts connections.
        self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-l", self.logfile, "-w",
                   "-t", str(int(timeout)), "start"], timeout=timeout + 10)
        self.started = True
        wait_until(self._ready, timeout=timeout, desc="postgres accepting connections")
        if not self.psql("SELECT 1 FROM pg_database WHERE datname = 'portmux'", db="postgres"):
            self.psql("CREATE DATABASE portmux", db="postgres")
        return self

    def _ready(self):
        r = subprocess.run(_as_pg([self.bindir / "pg_isready", "-h", self.sockdir, "-p",
                                   self.port, "-t", "2"]), capture_output=True, timeout=10)
        return r.returncode == 0

    def psql(self, sql, db=None, timeout=30):
        """Rows of sql's result as lists of strings (unaligned, tab-separated)."""
        out = self._run([self.bindir / "psql", "-X", "-q", "-A", "-t", "-F", "\t",
                         "-v", "ON_ERROR_STOP=1", "-h", self.sockdir, "-p", self.port,
                         "-U", PG_USER, "-d", db or self.dbname, "-c", sql], timeout=timeout)
        return [line.split("\t") for line in out.splitlines() if line]

    def pids(self):
        """The postmaster and every child of it (backends, checkpointer, walwriter ...)."""
        try:
            head = (self.datadir / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return []
        pm = int(head)
        kids = subprocess.run(["pgrep", "-P", str(pm)], capture_output=True, text=True)
        return [pm] + [int(p) for p in kids.stdout.split()]

    def _signal_all(self, sig):
        for pid in self.pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def freeze(self):
        self.frozen = True
        self._signal_all(signal.SIGSTOP)

    def thaw(self):
        self._signal_all(signal.SIGCONT)
        self.frozen = False

    def stop(self, timeout=30.0):
        if not self.started:
            return
        if self.frozen:
            self.thaw()
        try:
            self._run([self.bindir / "pg_ctl", "-D", self.datadir, "-m", "fast", "-w",
                       "-t", str(int(timeout)), "stop"], timeout=timeout + 10)
        except (RuntimeError, subprocess.TimeoutExpired):
            self._signal_all(signal.SIGKILL)
            deadline = time.monotonic() + timeout
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.started = False

    def log_tail(self, n=40):
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def pg(tmp_path):
    if not pg_available():
        pytest.skip("PostgreSQL server binaries (postgresql) not installed")
    srv = PgServer()
    try:
        srv.start()
        yield srv
    finally:
        srv.cleanup()
