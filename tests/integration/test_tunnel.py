"""Tunnel mode with real peers (issue 4): ssh and scp to our own sshd, redis-cli to
redis-server, curl to python's http.server -- each reached through portmux-server's
public port, the tunnel, and portmux-client dialling the service on its side.

Only 127.0.0.1, free ports, every wait bounded by a deadline."""
import getpass
import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conftest import connect_refused, free_port, wait_until
from tunnel_helpers import client_info, http_get, map_tunnel, tunnel_env, wait_streams_drained

SSHD = "/usr/sbin/sshd"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def start_listening(proc_factory, args, name, port, timeout=10.0):
    """Starts a service as a Proc and waits until port accepts connections."""
    p = proc_factory(args, name)
    wait_until(lambda: p.poll() is not None or not connect_refused(port), timeout=timeout,
               desc=f"{name} to listen on {port}")
    assert p.running(), f"{name} exited {p.poll()}:\n{p.log_tail()}"
    return p


@pytest.fixture
def sshd(tmp_path, proc_factory):
    """Our own sshd on a free 127.0.0.1 port: own host key, own authorized_keys holding a
    key made here. Returns (port, private key path)."""
    d = tmp_path / "sshd"
    d.mkdir()
    for kind, path in (("host", d / "host_ed25519"), ("user", d / "id_ed25519")):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", kind, "-f",
                        str(path)], check=True, capture_output=True, timeout=30)
    (d / "authorized_keys").write_text((d / "id_ed25519.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {d / 'host_ed25519'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        f"PidFile {d / 'sshd.pid'}",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
    ]) + "\n")
    start_listening(proc_factory, [SSHD, "-D", "-e", "-f", d / "sshd_config"], "sshd", port)
    return port, d / "id_ed25519"


def ssh_opts(key):
    return ["-F", "/dev/null", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
            "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]


def test_ssh_and_scp_through_tunnel(server_factory, tmp_path, logs, sshd):
    ssh_port, key = sshd
    srv, _ = tunnel_env(server_factory, tmp_path, logs)
    port = map_tunnel(srv, ssh_port)
    user = getpass.getuser()

    r = subprocess.run(["ssh", "-p", str(port), *ssh_opts(key), f"{user}@127.0.0.1",
                        "echo", "tunnel-ok"], capture_output=True, timeout=30)
    assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace"))
    assert r.stdout == b"tunnel-ok\n", r.stdout

    src = tmp_path / "random.bin"
    src.write_bytes(os.urandom(32 << 20))
    want = sha256_file(src)
    up = tmp_path / "uploaded.bin"
    r = subprocess.run(["scp", "-q", "-P", str(port), *ssh_opts(key), str(src),
                        f"{user}@127.0.0.1:{up}"], capture_output=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace"))
    assert up.stat().st_size == 32 << 20
    assert sha256_file(up) == want

    down = tmp_path / "downloaded.bin"
    r = subprocess.run(["scp", "-q", "-P", str(port), *ssh_opts(key),
                        f"{user}@127.0.0.1:{src}", str(down)], capture_output=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace"))
    assert sha256_file(down) == want

    wait_streams_drained(srv, port)
    m = srv.mapping(port)
    assert m["total_connections"] == 3 and m["failed_connections"] == 0, m
    assert m["bytes_in"] >= 32 << 20 and m["bytes_out"] >= 32 << 20, m
    c = client_info(srv)
    assert c["bytes_in"] >= 32 << 20 and c["bytes_out"] >= 32 << 20, c


def test_redis_through_tunnel(server_factory, tmp_path, logs, proc_factory):
    rport = free_port()
    start_listening(proc_factory, ["redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no", "--daemonize", "no"],
                    "redis-server", rport)
    srv, _ = tunnel_env(server_factory, tmp_path, logs)
    port = map_tunnel(srv, rport)
    value = os.urandom(8).hex()

    def cli(*args):
        r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                           capture_output=True, timeout=20)
        assert r.returncode == 0, (args, r.returncode, r.stderr)
        return r.stdout.decode().strip()

    assert cli("SET", "k", value) == "OK"
    assert cli("GET", "k") == value
    # The value really is in the redis behind the tunnel, not an artefact of it.
    r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(rport), "GET", "k"],
                       capture_output=True, timeout=20)
    assert r.stdout.decode().strip() == value
    wait_streams_drained(srv, port)


def test_curl_through_tunnel(server_factory, tmp_path, logs, http_backend):
    srv, _ = tunnel_env(server_factory, tmp_path, logs)
    port = map_tunnel(srv, http_backend.port)
    for name, data in http_backend.files.items():
        status, body = http_get(port, f"/{name}")
        assert status == 200, (name, status, body[:200])
        assert body == data, (name, len(body), len(data))
    status, _ = http_get(port, "/no-such-file")
    assert status == 404
    wait_streams_drained(srv, port)
    assert srv.mapping(port)["failed_connections"] == 0
