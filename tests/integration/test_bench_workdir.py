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
