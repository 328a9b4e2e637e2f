"""TLS on the tunnel: certificates made here with the openssl CLI (a CA and a server
certificate for 127.0.0.1/localhost, a client CA and a client certificate, an unrelated
CA), real portmux-server and portmux-client, a python http.server behind a tunnel mapping
and curl in front of it.

Covered: verified end to end (by IP and by --server-name), wrong CA, wrong name, the
system store by default, plaintext against TLS both ways, mutual TLS (no certificate, a
certificate from another CA, the right one), a TCP peer that never handshakes, junk on
the TLS port, the negotiated cipher (AES-128-GCM first), and start-up with unusable
certificate files."""
import hashlib
import re
import secrets
import socket
import subprocess
import time

import pytest

from conftest import CLIENT_BIN, connect, free_port, run_once, wait_until
from sec_helpers import client_proc, flood, hello

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

VERIFY_WORDS = re.compile(r"certificate|verify", re.I)


def tls_server(server_factory, pki, token, mtls=False, **tunnel):
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"])}
    if mtls:
        tls["client_ca"] = str(pki["client_ca"])
    cfg = {"enabled": True, "listen_addr": "127.0.0.1",
           "clients": [{"name": "default", "token": token}], "tls": tls, **tunnel}
    return server_factory(config={"tunnel": cfg})


def client_args(pki, *, ca="ca", server_name=None, cert=None):
    args = ["--tls"]
    if ca:
        args += ["--ca", str(pki[ca])]
    if server_name:
        args += ["--server-name", server_name]
    if cert:
        args += ["--cert", str(pki[cert]), "--key", str(pki[cert + "_key"])]
    return args


def start_client(tmp_path, logs, srv, token, args, name="client"):
    """A client that must connect: waits until the server counts it."""
    c = client_proc(tmp_path, srv.tunnel_port, token, *args, name=name)
    logs.append(c)
    c.start()

    def connected():
        assert c.running(), f"{name} exited {c.poll()}:\n{c.log_tail()}"
        return srv.health()["clients"] == 1

    wait_until(connected, timeout=15, desc=f"{name} to connect")
    return c


def refused_client(srv, token, args, timeout=25):
    """Runs a client that must fail: --no-reconnect, short timeouts. Returns the
    CompletedProcess (stdout and stderr apart); asserts it exited non-zero."""
    cmd = [CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
           "--no-reconnect", "--connect-timeout", "3", *args]
    try:
        r = run_once(cmd, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"client still running after {timeout}s: {cmd}") from None
    assert r.returncode != 0, f"client exited 0: {r.stderr.decode(errors='replace')}"
    assert srv.health()["clients"] == 0, "a refused client is counted as connected"
    return r


def through_tunnel(srv, http_backend):
    """Maps a fresh port to the backend through the tunnel and fetches two files with curl."""
    port = free_port()
    srv.create_ok(port=port, target_port=http_backend.port)
    wait_until(lambda: srv.mapping(port)["status"] == "listening", timeout=10,
               desc="mapping to be listening")
    for name in ("hello.txt", "blob.bin"):
        r = subprocess.run(["curl", "-sS", "--fail", "--max-time", "20",
                            f"http://127.0.0.1:{port}/{name}"], capture_output=True, timeout=30)
        assert r.returncode == 0, f"curl {name}: rc {r.returncode} {r.stderr.decode()}"
        want = http_backend.files[name]
        assert len(r.stdout) == len(want) and \
            hashlib.sha256(r.stdout).digest() == hashlib.sha256(want).digest(), \
            f"{name}: {len(r.stdout)} bytes, want {len(want)}"
    return port


def still_serving(srv):
    h = srv.health()
    assert h["status"] == "ok" and h["tunnel_enabled"] is True, h
    assert srv.running()


# ---------------------------------------------------------------------------


@pytest.mark.parametrize("server_name", [None, "localhost"], ids=["by-ip", "server-name"])
def test_tls_end_to_end(server_factory, pki, http_backend, tmp_path, logs, server_name):
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token)
    start_client(tmp_path, logs, srv, token, client_args(pki, server_name=server_name))
    through_tunnel(srv, http_backend)
    clients = srv.api("GET", "/api/clients")[2]["data"]["clients"]
    assert [c["name"] for c in clients] == ["default"], clients
    assert "TLS" in srv.log_text(), "server log does not say TLS is on"


@pytest.mark.parametrize("case", ["other CA", "wrong server name", "system store"])
def test_tls_client_rejects_unverified_server(server_factory, pki, http_backend, tmp_path,
                                              logs, case):
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token)
    args = {"other CA": client_args(pki, ca="other_ca"),
            "wrong server name": client_args(pki, server_name="evil.example"),
            "system store": client_args(pki, ca=None)}[case]
    r = refused_client(srv, token, args)
    err = r.stderr.decode(errors="replace")
    assert VERIFY_WORDS.search(err), f"{case}: stderr does not say why: {err!r}"
    # The server shrugs it off and serves a good client.
    still_serving(srv)
    start_client(tmp_path, logs, srv, token, client_args(pki))
    through_tunnel(srv, http_backend)


def test_plaintext_client_against_tls_server(server_factory, pki, http_backend, tmp_path,
                                             logs):
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token)
    t0 = time.monotonic()
    refused_client(srv, token, [])
    assert time.monotonic() - t0 < 15
    # A plaintext Hello by hand is closed promptly, without a HelloResponse in clear.
    with connect(srv.tunnel_port, timeout=5) as s:
        s.sendall(hello("default", token))
        s.settimeout(5)
        got = b""
        try:
            while True:
                c = s.recv(4096)
                if not c:
                    break
                got += c
        except ConnectionResetError:
            pass
        except socket.timeout:
            raise AssertionError("plaintext Hello to the TLS port: still open after 5 s")
    assert b'"ok"' not in got, f"the TLS port answered a plaintext Hello: {got!r}"
    assert srv.health()["clients"] == 0
    still_serving(srv)
    start_client(tmp_path, logs, srv, token, client_args(pki))
    through_tunnel(srv, http_backend)


def test_tls_client_against_plaintext_server(server_factory, pki, tmp_path, logs):
    token = secrets.token_hex(8)
    srv = server_factory(config={"tunnel": {"enabled": True, "listen_addr": "127.0.0.1",
                                            "clients": [{"name": "default", "token": token}]}})
    t0 = time.monotonic()
    refused_client(srv, token, client_args(pki))
    assert time.monotonic() - t0 < 15
    still_serving(srv)
    # The plaintext server still takes a plaintext client.
    start_client(tmp_path, logs, srv, token, [])


def test_mutual_tls(server_factory, pki, http_backend, tmp_path, logs):
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token, mtls=True)
    assert "mutual" in srv.log_text().lower() or "client" in srv.log_text().lower()
    # No client certificate: refused.
    refused_client(srv, token, client_args(pki))
    # A certificate from a CA the server does not trust: refused, and the client hears
    # why (the server's alert) and stops with exit 2 rather than "connection closed".
    r = refused_client(srv, token, client_args(pki, cert="rogue_client"))
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2 and "unknown ca" in err, (r.returncode, err)
    # Without --no-reconnect too: a refusal is not retried.
    r = run_once([CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
                  "--connect-timeout", "3", *client_args(pki, cert="rogue_client")], timeout=20)
    assert r.returncode == 2 and b"reconnecting" not in r.stderr, r
    # The server's own leaf is no client certificate either (wrong CA, serverAuth only).
    r = run_once([CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
                  "--no-reconnect", "--connect-timeout", "3", "--tls", "--ca", pki["ca"],
                  "--cert", pki["server"], "--key", pki["server_key"]], timeout=25)
    assert r.returncode != 0
    assert srv.health()["clients"] == 0
    still_serving(srv)
    # The right certificate: works end to end.
    start_client(tmp_path, logs, srv, token, client_args(pki, cert="client"))
    through_tunnel(srv, http_backend)


def test_mtls_still_needs_the_token(server_factory, pki, tmp_path):
    """A valid client certificate does not replace the Hello token."""
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token, mtls=True)
    refused_client(srv, "not-" + token, client_args(pki, cert="client"))
    still_serving(srv)


def test_tls_silent_peer_is_dropped(server_factory, pki):
    """A TCP connection to the TLS port that never handshakes is closed after
    tunnel.hello_timeout, so idle sockets cannot pile up."""
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token, hello_timeout=2)
    # From four addresses: one may hold at most 16 connections waiting for their Hello.
    socks = [socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5,
                                      source_address=(f"127.0.14.{1 + i % 4}", 0))
             for i in range(20)]
    t0 = time.monotonic()
    try:
        for s in socks:
            s.settimeout(max(0.1, t0 + 10 - time.monotonic()))
            try:
                assert s.recv(1) == b""
            except ConnectionResetError:
                pass
            except socket.timeout:
                raise AssertionError("silent TLS peer still connected 10 s later "
                                     "(hello_timeout 2)") from None
    finally:
        for s in socks:
            s.close()
    still_serving(srv)


@pytest.mark.parametrize("version,offer,want", [
    ("-tls1_3", [], "TLS_AES_128_GCM_SHA256"),
    ("-tls1_2", [], "ECDHE-ECDSA-AES128-GCM-SHA256"),
    # The server's preference wins over a client that lists AES-256 first.
    ("-tls1_3", ["-ciphersuites", "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"],
     "TLS_AES_128_GCM_SHA256"),
], ids=["tls1.3", "tls1.2", "server-preference"])
def test_tls_prefers_aes128_gcm(server_factory, pki, version, offer, want):
    """The tunnel negotiates AES-128-GCM (AES-NI, the cheapest AEAD per byte here) with
    a client that offers the usual lists, as openssl s_client does."""
    srv = tls_server(server_factory, pki, secrets.token_hex(8))
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{srv.tunnel_port}",
                        "-CAfile", str(pki["ca"]), version, *offer],
                       input=b"", capture_output=True, timeout=20)
    out = r.stdout.decode(errors="replace")
    m = re.search(r"Cipher is (\S+)", out)
    assert m, f"no cipher in s_client output:\n{out}\n{r.stderr.decode(errors='replace')}"
    assert m.group(1) == want, out
    still_serving(srv)


def test_tls_port_survives_junk(server_factory, pki, http_backend, tmp_path, logs):
    token = secrets.token_hex(8)
    srv = tls_server(server_factory, pki, token, hello_timeout=2)
    # Random bytes, then records that start like a ClientHello and then go wrong.
    stats = flood([("127.0.0.1", srv.tunnel_port, "raw")], 1000, concurrency=100, seed=99)
    assert stats.connected == 1000, stats
    tls_like = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + secrets.token_bytes(600)
    for _ in range(50):
        with connect(srv.tunnel_port) as s:
            s.sendall(tls_like)
    still_serving(srv)
    start_client(tmp_path, logs, srv, token, client_args(pki))
    through_tunnel(srv, http_backend)


@pytest.mark.parametrize("case", ["missing cert", "missing key", "key of another cert",
                                  "cert is garbage", "client_ca missing"])
def test_tls_unusable_files_stop_startup(server_factory, pki, tmp_path, case):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                       "-----END CERTIFICATE-----\n")
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"])}
    named = {
        "missing cert": ("cert_file", str(tmp_path / "nope.pem")),
        "missing key": ("key_file", str(tmp_path / "nope.key")),
        "key of another cert": ("key_file", str(pki["client_key"])),
        "cert is garbage": ("cert_file", str(garbage)),
        "client_ca missing": ("client_ca", str(tmp_path / "no-ca.pem")),
    }[case]
    tls[named[0]] = named[1]
    srv = server_factory(config={"tunnel": {"enabled": True, "listen_addr": "127.0.0.1",
                                            "tls": tls}}, start=False)
    srv.proc.start()
    try:
        rc = srv.proc.wait(10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{case}: server kept running:\n{srv.log_tail()}") from None
    assert rc != 0, f"{case}: exit status 0"
    assert named[1] in srv.log_text(), f"{case}: the message does not name {named[1]}:\n" \
                                       f"{srv.log_tail()}"


def test_a_forged_tls_alert_does_not_stop_a_client_that_was_in(server_factory, pki, tmp_path,
                                                                logs):
    """Once the client has been in, one packet from anyone on the path (a TLS alert
    "bad certificate" answering its ClientHello) used to count as a refusal: exit 2, which
    its unit does not restart. It is now a lost connection: retried with backoff, and the
    client is back once the real server answers again."""
    token = "tok-" + secrets.token_hex(12)
    srv = tls_server(server_factory, pki, token)
    cli = start_client(tmp_path, logs, srv, token, client_args(pki))
    port = srv.tunnel_port
    assert srv.stop() == 0
    fake = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fake.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    fake.bind(("127.0.0.1", port))
    fake.listen(8)
    fake.settimeout(0.2)
    mark = cli.log_mark()
    answered = 0
    deadline = time.monotonic() + 20
    try:
        while answered < 2 and time.monotonic() < deadline:
            try:
                c, _ = fake.accept()
            except socket.timeout:
                assert cli.running(), f"client exited {cli.poll()}:\n{cli.log_tail()}"
                continue
            with c:
                c.settimeout(5)
                try:
                    c.recv(4096)  # its ClientHello
                    c.sendall(b"\x15\x03\x03\x00\x02\x02\x2a")  # fatal alert: bad_certificate
                except OSError:
                    pass
            answered += 1
        assert answered == 2, "the client did not come back after the first alert"
        cli.wait_log(r"reconnecting in", timeout=10, after=mark)
        assert cli.running(), f"client exited {cli.poll()}:\n{cli.log_tail()}"
    finally:
        fake.close()
    srv.start()
    wait_until(lambda: srv.health()["clients"] == 1, timeout=30, interval=0.2,
               desc="the client back once the real server answers")


def test_server_name_alone_means_tls(proc_factory):
    """--server-name names the certificate to check, so it turns TLS on as --ca does; it
    used to leave the session in plaintext, token and all."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]
    try:
        proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{port}", "--token",
                      "tok-" + secrets.token_hex(12), "--server-name", "localhost",
                      "--no-reconnect"], "client")
        c, _ = listener.accept()
        with c:
            c.settimeout(10)
            first = c.recv(1)
        assert first == b"\x16", f"not a TLS handshake record: {first!r}"
    finally:
        listener.close()


SERVER_EXT = ("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
              "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n")


def _own_pki(pki, tmp_path, days=30):
    """A copy of the tunnel CA and a server leaf of its own in tmp_path (a test that
    renews or loosens its files must not touch the shared ones)."""
    import shutil
    from sec_helpers import _make_leaf
    d = tmp_path / "own-pki"
    d.mkdir()
    shutil.copy(pki["ca"], d / "ca.pem")
    shutil.copy(pki["ca_key"], d / "ca.key")
    _make_leaf(d, "server", "localhost", "ca", SERVER_EXT, days=days)
    return dict(pki, server=d / "server.pem", server_key=d / "server.key", own_dir=d)


def _served_serial(port):
    """The serial of the certificate the tunnel port serves (not verified: only read)."""
    import ssl
    pem = ssl.get_server_certificate(("127.0.0.1", port), timeout=5)
    r = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.encode(),
                       capture_output=True, timeout=10)
    return r.stdout.decode().strip()


def test_sighup_serves_a_certificate_renewed_in_place(server_factory, pki, tmp_path):
    """A renewal hook writes the new certificate over the old and reloads (the unit's
    ExecReload is SIGHUP): the reload compared only the paths, said "nothing changed", and
    the old certificate was served until it expired. The files are read again now."""
    from sec_helpers import _make_leaf
    own = _own_pki(pki, tmp_path)
    token = secrets.token_hex(16)
    srv = tls_server(server_factory, own, token)
    before = _served_serial(srv.tunnel_port)
    _make_leaf(own["own_dir"], "server", "localhost", "ca", SERVER_EXT)
    mark = srv.log_mark()
    srv.proc.send_signal(1)  # SIGHUP
    srv.wait_log(r"reloaded .*tunnel\.tls certificate \(files read again\)", after=mark)
    after = _served_serial(srv.tunnel_port)
    assert after != before, (before, after)
    # A renewal that does not load (a key of another certificate) keeps the running one.
    (own["own_dir"] / "server.key").write_bytes(pki["client_key"].read_bytes())
    mark = srv.log_mark()
    srv.proc.send_signal(1)
    srv.wait_log(r"reload failed, keeping the running config|the running certificate stays",
                 after=mark)
    assert _served_serial(srv.tunnel_port) == after
    still_serving(srv)


def test_a_certificate_near_its_end_and_a_key_others_may_read_are_warned_about(
        server_factory, pki, tmp_path):
    """The server started with an expiring (or expired) certificate and a key every user
    could read without a word; clients then failed with "certificate has expired"."""
    own = _own_pki(pki, tmp_path, days=5)
    own["server_key"].chmod(0o644)
    srv = tls_server(server_factory, own, secrets.token_hex(16))
    srv.wait_log(r"WARN tunnel .*server\.pem expires in [45] day\(s\): renew it")
    srv.wait_log(r"WARN tunnel .*server\.key \(the private key\) is readable by every user "
                 r"\(mode 644\)")
