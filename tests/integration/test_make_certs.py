"""scripts/make-certs.sh (issue 17): its CA, server and client certificates bring up the
tunnel with TLS and mutual TLS between the real binaries on 127.0.0.1."""
import os
import shutil

import pytest

from conftest import CLIENT_BIN, SOURCE_DIR, connect, free_port, run_once, wait_until
from tunnel_helpers import run_client, start_client, tunnel_server

SCRIPT = SOURCE_DIR / "scripts/make-certs.sh"
TOKEN = "tok-" + os.urandom(8).hex()

pytestmark = [
    pytest.mark.skipif(not shutil.which("openssl"), reason="openssl missing"),
    pytest.mark.skipif(not CLIENT_BIN.exists(), reason="portmux-client not built"),
]


def make_certs(d, *args):
    r = run_once([SCRIPT, "-d", d, *args], timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return r


def test_files_modes_and_chain(tmp_path):
    d = tmp_path / "certs"
    make_certs(d, "-c", "edge1", "localhost", "127.0.0.1", "tunnel.example.com")
    for f in ("ca", "server", "client"):
        assert (d / f"{f}.pem").stat().st_mode & 0o777 == 0o644, f
        assert (d / f"{f}.key").stat().st_mode & 0o777 == 0o600, f
    r = run_once(["openssl", "verify", "-CAfile", d / "ca.pem", d / "server.pem",
                  d / "client.pem"])
    assert r.returncode == 0, r.stdout + r.stderr
    san = run_once(["openssl", "x509", "-in", d / "server.pem", "-noout", "-ext",
                    "subjectAltName"]).stdout.decode()
    assert "DNS:localhost" in san and "IP Address:127.0.0.1" in san \
        and "DNS:tunnel.example.com" in san, san
    subj = run_once(["openssl", "x509", "-in", d / "client.pem", "-noout", "-subject"])
    assert b"CN = edge1" in subj.stdout, subj.stdout
    # Again into the same directory: the CA stays, the leaves are new and still verify.
    ca = (d / "ca.pem").read_bytes()
    make_certs(d)
    assert (d / "ca.pem").read_bytes() == ca
    r = run_once(["openssl", "verify", "-CAfile", d / "ca.pem", d / "server.pem"])
    assert r.returncode == 0


def test_key_directory_is_private_and_a_shared_one_refused(tmp_path):
    """Under umask 000 the directory came out 0777: anyone could swap a key or plant a
    symlink before a re-run renewed the leaves. It is 0700 now, and a directory others may
    write to is refused before anything is written."""
    d = tmp_path / "certs"
    r = run_once(["bash", "-c", f'umask 000; exec "{SCRIPT}" -d "{d}"'], timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / "server.key").stat().st_mode & 0o777 == 0o600
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    r = run_once([SCRIPT, "-d", shared], timeout=60)
    assert r.returncode == 2 and b"writable by others" in r.stderr, r
    assert list(shared.iterdir()) == []


@pytest.mark.parametrize("args", [["-D", "x"], ["-c", "bad name"], ["not a host!"], ["-z"]])
def test_bad_arguments_exit_2(tmp_path, args):
    r = run_once([SCRIPT, "-d", tmp_path / "c", *args])
    assert r.returncode == 2 and r.stderr, r
    assert not (tmp_path / "c" / "server.pem").exists()


def test_tls_and_mutual_tls_with_its_output(server_factory, echo_backend, tmp_path, logs):
    d = tmp_path / "certs"
    make_certs(d)
    srv = tunnel_server(server_factory, [{"name": "default", "token": TOKEN}],
                        tls={"cert_file": str(d / "server.pem"),
                             "key_file": str(d / "server.key"),
                             "client_ca": str(d / "ca.pem")})
    # Mutual TLS: without a client certificate the server does not let the client in.
    r = run_client(srv, TOKEN, "--ca", str(d / "ca.pem"), "--connect-timeout", "5")
    assert r.returncode != 0, r
    assert srv.health()["tunnel_connected"] is False

    start_client(tmp_path, logs, srv, TOKEN, "--ca", str(d / "ca.pem"),
                 "--cert", str(d / "client.pem"), "--key", str(d / "client.key"))
    port = free_port()
    srv.create_ok(port=port, target_port=echo_backend.port, use_tunnel=True)
    with connect(port) as s:
        s.sendall(b"through mutual TLS")
        got = b""
        while len(got) < 18:
            chunk = s.recv(64)
            assert chunk, "closed early"
            got += chunk
    assert got == b"through mutual TLS"
    wait_until(lambda: srv.mapping(port)["total_connections"] == 1, desc="counted")
    assert "TLS on, client certificates required" in srv.log_text()
