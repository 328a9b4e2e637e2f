"""The bench scripts' work directory (deployment review): BENCH_WORK defaulted to the fixed
/tmp/portmux-bench, and a local user who made it first could plant the ssh key the peer
sshd lets in as root, or a script the profiler runs. The directory is now made 0700, and
one someone else owns or others may write to is refused before anything is written."""
import os

from conftest import SOURCE_DIR, run_once

PEERS = SOURCE_DIR / "bench/peers.sh"


def test_bench_work_directory_is_private_and_a_shared_one_refused(tmp_path):
    fresh = tmp_path / "fresh"
    env = dict(os.environ, BENCH_WORK=str(fresh))
    r = run_once(["bash", "-c", f'umask 000; exec bash "{PEERS}" table'], env=env, timeout=60)
    assert fresh.is_dir() and fresh.stat().st_mode & 0o777 == 0o700, (r, oct(fresh.stat().st_mode))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = run_once(["bash", PEERS, "table"], env=dict(os.environ, BENCH_WORK=str(shared)),
                 timeout=60)
    assert r.returncode == 2 and b"others may write to it" in r.stderr, r
    assert list(shared.iterdir()) == []


def test_bench_certificates_are_renewed_before_they_expire(tmp_path):
    """bench/make-certs.sh kept any certificates it found: its directory outlives runs, and
    from day 31 the 30-day pair failed every TLS bench. One that ends within a day is
    made again."""
    script = SOURCE_DIR / "bench/make-certs.sh"
    d = tmp_path / "tls"
    assert run_once(["bash", script, d], timeout=60).returncode == 0
    first = (d / "server.pem").read_bytes()
    assert run_once(["bash", script, d], timeout=60).returncode == 0
    assert (d / "server.pem").read_bytes() == first  # still valid: kept
    # A leaf that ends within the day (as the old pair did on its 30th).
    r = run_once(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                  "-keyout", d / "server.key", "-out", d / "server.pem"], timeout=60)
    assert r.returncode == 0, r
    assert run_once(["bash", script, d], timeout=60).returncode == 0
    r = run_once(["openssl", "verify", "-CAfile", d / "ca.pem", d / "server.pem"], timeout=30)
    assert r.returncode == 0, r
    r = run_once(["openssl", "x509", "-checkend", "86400", "-noout", "-in", d / "server.pem"],
                 timeout=30)
    assert r.returncode == 0, r
