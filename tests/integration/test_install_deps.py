"""scripts/install-deps.sh and the network daemons of its sets (deployment review): the
test set installs sshd, nginx, prometheus, redis, PostgreSQL and haproxy for their
binaries, and Debian starts and enables each (sshd with passwords, prometheus without
any, on every interface). A daemon the script installs is neither started nor enabled;
one installed before is left alone. Run against stand-ins for apt-get, dpkg-query, id and
deb-systemd-helper on PATH, so nothing is installed and no root is needed."""
import os
import stat

from conftest import SOURCE_DIR, run_once

SCRIPT = SOURCE_DIR / "scripts/install-deps.sh"

FAKES = {
    # Root, as on the project's machines.
    "id": 'echo 0\n',
    # "Installed": the packages listed in $STATE.
    "dpkg-query": 'p=$(eval echo \\${$#}); grep -qx "$p" "$STATE" && printf "install ok installed"\n'
                  'exit 0\n',
    # Records each install with whether daemons could start (policy-rc.d), then "installs".
    "apt-get": '[ "$1" = install ] || exit 0\n'
               'if [ -x "$INSTALL_DEPS_POLICY_RC_D" ]; then "$INSTALL_DEPS_POLICY_RC_D"; '
               'echo "install policy=$?" >>"$CALLS"; else echo "install policy=none" >>"$CALLS"; fi\n'
               'for p in "$@"; do case $p in -*|install) ;; *) echo "$p" >>"$STATE" ;; esac; done\n',
    "deb-systemd-helper": 'echo "helper $*" >>"$CALLS"\n',
    "systemctl": 'echo "systemctl $*" >>"$CALLS"\n',
}


def test_daemons_it_installs_are_not_started_or_enabled(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        f = bin_dir / name
        f.write_text("#!/bin/sh\n" + body)
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    state, calls, policy = tmp_path / "installed", tmp_path / "calls", tmp_path / "policy-rc.d"
    state.write_text("nginx\n")  # installed before: the machine owner's
    calls.write_text("")
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin", STATE=str(state),
               CALLS=str(calls), INSTALL_DEPS_POLICY_RC_D=str(policy))
    r = run_once(["sh", SCRIPT, "test"], env=env, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    log = calls.read_text().splitlines()
    # While it installed, no daemon could start; the policy is gone afterwards.
    installs = [ln for ln in log if ln.startswith("install")]
    assert installs and all(ln == "install policy=101" for ln in installs), log
    assert not policy.exists()
    disabled = {ln.split()[2] for ln in log if ln.startswith("helper disable")}
    assert disabled == {"ssh.service", "prometheus.service", "redis-server.service",
                        "postgresql.service", "haproxy.service"}, log
    # A policy-rc.d of the machine's own is neither replaced nor removed, and daemons
    # installed before are not touched (nothing is disabled or stopped).
    policy.write_text("#!/bin/sh\nexit 0\n")
    policy.chmod(0o755)
    state.write_text("openssh-server\nnginx\nprometheus\nredis-server\npostgresql\nhaproxy\n")
    calls.write_text("")
    r = run_once(["sh", SCRIPT, "test"], env=env, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert policy.read_text() == "#!/bin/sh\nexit 0\n"
    log = calls.read_text().splitlines()
    assert "install policy=0" in log and not [ln for ln in log if "disable" in ln or "stop" in ln], log
