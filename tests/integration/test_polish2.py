"""Issue 17, the second round: a tunnel mapping names a client that exists (refused at
create and update, warned about at restore), a mutual-TLS server refusing a client that
has no certificate (exit 2, no retry), SIGHUP applying api.allowed_hosts and the config's
tunnel clients, failed dials logged and shown per mapping (last_error)."""
import os
import shutil
import re
import secrets
import subprocess

import pytest

from conftest import CLIENT_BIN, free_port, run_once, wait_until

needs_client = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                  reason=f"portmux-client not built at {CLIENT_BIN}")


def tunnel_server(server_factory, clients, **tunnel):
    cfg = {"enabled": True, "listen_addr": "127.0.0.1",
           "clients": [{"name": n, "token": t} for n, t in clients.items()], **tunnel}
    return server_factory(config={"tunnel": cfg})


# ---- 1. a tunnel mapping names a client that exists ----

def test_create_refuses_an_unknown_client(server_factory):
    srv = tunnel_server(server_factory, {"edge1": secrets.token_hex(12)})
    port = free_port()
    status, body = srv.create(port=port, target_port=80, use_tunnel=True, client="ghost")
    assert status == 400 and body["error"] == "invalid_field", body
    assert "ghost" in body["message"], body
    # The default client name is no exception when the config does not list it.
    status, body = srv.create(port=port, target_port=80, use_tunnel=True)
    assert status == 400 and body["error"] == "invalid_field" and "default" in body["message"]
    assert srv.health()["mappings"] == 0
    # A known client and a direct mapping (no client at all) are accepted.
    srv.create_ok(port=port, target_port=80, use_tunnel=True, client="edge1")
    srv.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)


def test_update_refuses_an_unknown_client(server_factory):
    srv = tunnel_server(server_factory, {"edge1": secrets.token_hex(12)})
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    status, _, body = srv.api("POST", "/api/mapping/update",
                              body={"port": port, "use_tunnel": True, "client": "ghost"})
    assert status == 400 and body["error"] == "invalid_field" and "ghost" in body["message"]
    assert srv.mapping(port)["use_tunnel"] is False
    status, _, body = srv.api("POST", "/api/mapping/update",
                              body={"port": port, "use_tunnel": True, "client": "edge1"})
    assert status == 200, body
    assert srv.mapping(port)["client"] == "edge1"


def test_mapping_of_a_removed_client_is_restored_with_a_warning(server_factory):
    srv = tunnel_server(server_factory, {"edge1": secrets.token_hex(12)})
    status, _, body = srv.api("POST", "/api/client/create", body={"name": "edge2"})
    assert status == 201, body
    port = free_port()
    srv.create_ok(port=port, target_port=80, use_tunnel=True, client="edge2")
    status, _, body = srv.api("POST", "/api/client/remove", body={"name": "edge2"})
    assert status == 200, body
    # Still there (SPEC §4a), and an unrelated field still changes.
    status, _, body = srv.api("POST", "/api/mapping/update", body={"port": port, "name": "x"})
    assert status == 200, body
    srv.restart()
    m = srv.mapping(port)
    assert m is not None and m["client"] == "edge2" and m["status"] == "waiting_for_client"
    assert re.search(rf'port {port}: tunnel client "edge2" does not exist', srv.log_text())
    assert srv.running()


# ---- 4. mutual TLS without a client certificate ----

@needs_client
def test_mtls_without_a_client_certificate_exits_2(server_factory, pki):
    token = secrets.token_hex(12)
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"]),
           "client_ca": str(pki["client_ca"])}
    srv = tunnel_server(server_factory, {"default": token}, tls=tls)
    # Without --no-reconnect: a retry cannot help, so the client must give up by itself.
    cmd = [CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
           "--connect-timeout", "3", "--tls", "--ca", str(pki["ca"])]
    try:
        r = run_once(cmd, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("the client kept retrying without a client certificate") from None
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, (r.returncode, err)
    assert "client certificate" in err and "--cert" in err, err
    assert srv.health()["clients"] == 0


# ---- 5. SIGHUP: api.allowed_hosts and the config's tunnel clients ----

def hello_ok(srv, name, token):
    """One hand-made Hello; True when the server accepts it (the session is then closed)."""
    import json
    import socket
    from sec_helpers import T_HELLO_RESPONSE, hello, read_frame
    with socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5) as s:
        s.sendall(hello(name, token))
        f = read_frame(s)
    assert f is not None and f[0] == T_HELLO_RESPONSE, f
    return json.loads(f[1])["ok"] is True


def test_sighup_applies_allowed_hosts(server_factory, server):
    from test_api_security import raw
    from test_reload import reload, with_
    name = "portmux.example.com"
    srv = server_factory(config={"api": {"token": "polish-token-0123456789"}})
    assert raw(srv, "GET", "/health", [("Host", f"{name}:8443")]).status == 421
    log = reload(srv, with_(srv.config, "api", allowed_hosts=[name]))
    assert "api.allowed_hosts" in log and "restart" not in log, log
    assert raw(srv, "GET", "/health", [("Host", f"{name}:8443")]).status == 200
    reload(srv, with_(srv.config, "api", allowed_hosts=[]))
    assert raw(srv, "GET", "/health", [("Host", f"{name}:8443")]).status == 421
    # Without a token (the default on loopback) a reload cannot open the API to a proxy
    # either: the names are kept out and the log says why.
    log = reload(server, with_(server.config, "api", allowed_hosts=[name]))
    assert "api.allowed_hosts keeps its running value" in log, log
    assert raw(server, "GET", "/health", [("Host", f"{name}:8443")]).status == 421


@needs_client
def test_sighup_applies_tunnel_clients(server_factory, tmp_path, logs):
    from sec_helpers import client_proc
    from test_reload import reload, with_
    tok1, tok2, tok2b = (secrets.token_hex(12) for _ in range(3))
    srv = tunnel_server(server_factory, {"edge1": tok1})
    c = client_proc(tmp_path, srv.tunnel_port, tok1, "--name", "edge1", "--no-reconnect")
    logs.append(c)
    c.start()
    wait_until(lambda: srv.health()["clients"] == 1, timeout=15, desc="edge1 connected")
    assert not hello_ok(srv, "edge2", tok2)

    # edge1 removed (its live session closed at once), edge2 added.
    cfg = with_(srv.config, "tunnel", clients=[{"name": "edge2", "token": tok2}])
    log = reload(srv, cfg)
    assert "tunnel.clients" in log and "restart" not in log, log
    assert re.search(r'tunnel client "edge1" removed from the config', log), log
    wait_until(lambda: c.poll() is not None, timeout=10, desc="edge1's session closed")
    assert srv.health()["clients"] == 0
    status, _, body = srv.api("GET", "/api/clients")
    assert [x["name"] for x in body["data"]["clients"]] == ["edge2"], body
    assert not hello_ok(srv, "edge1", tok1)
    assert hello_ok(srv, "edge2", tok2)
    srv.create_ok(port=free_port(), target_port=80, use_tunnel=True, client="edge2")

    # edge2's token changed: the old one stops working, the new one works.
    log = reload(srv, with_(srv.config, "tunnel", clients=[{"name": "edge2", "token": tok2b}]))
    assert "token changed" in log, log
    assert not hello_ok(srv, "edge2", tok2)
    assert hello_ok(srv, "edge2", tok2b)
    # Unchanged clients: nothing to apply.
    log = reload(srv, srv.config)
    assert "nothing changed that applies live" in log, log
    assert srv.running()


# ---- 2. failed dials: an info line per mapping per 10 s, last_error in the list ----

def dial_lines(srv, port, mark=0):
    return [ln for ln in srv.log_text()[mark:].splitlines()
            if f" INFO mapping port {port}: dial failed: " in ln]


def poke(port):
    """One public connection that the server closes without a byte (its dial failed)."""
    from conftest import connect
    with connect(port) as s:
        s.settimeout(15)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass


def test_failed_direct_dial_is_logged_and_listed(server):
    dead, port = free_port(), free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=dead)
    m = server.mapping(port)
    assert m["last_error"] is None and m["last_error_at"] is None, m
    mark = server.log_mark()
    for _ in range(6):
        poke(port)
    wait_until(lambda: server.mapping(port)["failed_connections"] == 6, desc="6 failed")
    m = server.mapping(port)
    assert m["last_error"] == f"connect to 127.0.0.1:{dead} failed: Connection refused", m
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", m["last_error_at"]), m
    lines = dial_lines(server, port, mark)
    # Six failures, one line per 10 s: the first, and at most one more carrying a count.
    assert 1 <= len(lines) <= 2 and "Connection refused" in lines[0], lines
    assert all("more failed since the last line" in ln for ln in lines[1:]), lines


@needs_client
def test_failed_tunnel_dials_name_the_reason(server_factory, tmp_path, logs):
    from sec_helpers import client_proc
    token = secrets.token_hex(12)
    srv = tunnel_server(server_factory, {"edge1": token})
    port, target = free_port(), free_port()
    srv.create_ok(port=port, target_port=target, use_tunnel=True, client="edge1")
    # No client connected.
    poke(port)
    wait_until(lambda: srv.mapping(port)["last_error"] is not None, desc="last_error")
    assert srv.mapping(port)["last_error"] == 'client "edge1" not connected'
    assert 'dial failed: client "edge1" not connected' in srv.log_text()
    # The client's --allow refuses the target: status 2.
    c = client_proc(tmp_path, srv.tunnel_port, token, "--name", "edge1",
                    "--allow", f"127.0.0.1:{target + 1 if target < 65535 else 1}")
    logs.append(c)
    c.start()
    wait_until(lambda: srv.health()["clients"] == 1, timeout=15, desc="edge1 connected")
    poke(port)
    want = f'client "edge1" could not connect to 127.0.0.1:{target}: not allowed by its ' \
           f'--allow (status 2)'
    wait_until(lambda: srv.mapping(port)["last_error"] == want, desc="the --allow refusal")


# ---- 3. Notice frames go server -> client only ----

def test_notice_sent_to_the_server_is_a_protocol_error(server_factory):
    import json
    import socket
    from sec_helpers import T_HELLO_RESPONSE, frame, hello, read_frame
    token = secrets.token_hex(12)
    srv = tunnel_server(server_factory, {"edge1": token})
    with socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5) as s:
        s.sendall(hello("edge1", token) + b"")
        f = read_frame(s)
        assert f[0] == T_HELLO_RESPONSE and json.loads(f[1])["ok"] is True, f
        wait_until(lambda: srv.health()["clients"] == 1, desc="the session")
        s.sendall(frame(0x0A, b'{"event":"mappings","mappings":[]}'))
        while read_frame(s) is not None:  # KeepAlives, then EOF
            pass
    wait_until(lambda: srv.health()["clients"] == 0, desc="the session to be closed")
    assert "Notice sent to the server" in srv.log_text()
    assert srv.running()


def test_hello_without_notices_gets_no_notice(server_factory):
    """An older client (no "notices" in its Hello) never sees the new frame type."""
    import json
    import socket
    from sec_helpers import T_HELLO_RESPONSE, hello, read_frame
    token = secrets.token_hex(12)
    srv = tunnel_server(server_factory, {"edge1": token}, heartbeat_interval=1)
    with socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5) as s:
        s.sendall(hello("edge1", token))
        f = read_frame(s)
        assert f[0] == T_HELLO_RESPONSE and json.loads(f[1])["mappings"] == [], f
        srv.create_ok(port=free_port(), target_port=80, use_tunnel=True, client="edge1")
        # Frames until the next KeepAlive (heartbeat 1 s): none may be a Notice.
        for _ in range(3):
            f = read_frame(s, timeout=5)
            assert f is not None and f[0] == 0x05, f


def test_hello_response_with_many_mappings_fits_one_frame(server_factory):
    """The HelloResponse (and a Notice) lists as many mappings as fit a JSON frame (4 KiB)
    and is still sent with hundreds of them: the client connects."""
    import json
    import socket
    from sec_helpers import T_HELLO_RESPONSE, hello, read_frame
    token = secrets.token_hex(12)
    srv = tunnel_server(server_factory, {"edge1": token})
    for _ in range(150):
        srv.create_ok(target_ip="internal-host-with-a-long-name.example.internal",
                      target_port=8443, use_tunnel=True, client="edge1")
    with socket.create_connection(("127.0.0.1", srv.tunnel_port), timeout=5) as s:
        s.sendall(hello("edge1", token))
        f = read_frame(s, timeout=10)
    assert f is not None and f[0] == T_HELLO_RESPONSE, f
    body = json.loads(f[1])
    assert body["ok"] is True and 10 < len(body["mappings"]) < 150, len(body["mappings"])
    assert len(f[1]) <= 4096


def test_client_refuses_bad_tokens_heartbeats_and_non_files(tmp_path):
    """portmux-client checks what the server would refuse anyway, before connecting:
    a token with a space or newline, a heartbeat timeout within one interval (the session
    would drop between two KeepAlives), and a FIFO named by --ca (OpenSSL would block
    reading it). Each is one line on stderr and exit 2, at once."""
    port = free_port()  # nothing listens: nothing may be dialled
    base = [CLIENT_BIN, "--server", f"127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if k != "PORTMUX_TOKEN"}
    cases = [
        (["--token", "tok-0123456789abcdef\n"], "printable ASCII without spaces"),
        (["--token", "tok 0123456789abcdef"], "printable ASCII without spaces"),
        (["--token", "tok-0123456789abcdef", "--heartbeat-interval", "10",
          "--heartbeat-timeout", "5"], "must be greater than --heartbeat-interval"),
    ]
    fifo = tmp_path / "ca.fifo"
    os.mkfifo(fifo)
    cases.append((["--token", "tok-0123456789abcdef", "--tls", "--ca", str(fifo)],
                  "not a regular file"))
    for args, want in cases:
        r = run_once(base + args, timeout=10, env=env)
        err = r.stderr.decode()
        assert r.returncode == 2 and want in err, (args, r.returncode, err)
    r = run_once(base, timeout=10, env=dict(env, PORTMUX_TOKEN="tok-0123456789abcdef\n"))
    assert r.returncode == 2 and "PORTMUX_TOKEN" in r.stderr.decode(), r.stderr


def test_server_refuses_an_env_token_with_a_newline(server_factory):
    """PORTMUX_API_TOKEN with a trailing newline (a secret file read as it is) would lock
    every client out with 401s and nothing to say why: the server refuses to start."""
    srv = server_factory(start=False)
    srv.proc.env = dict(os.environ, PORTMUX_API_TOKEN="env-token-0123456789abcdef\n")
    srv.proc.start()
    assert srv.proc.wait(10) == 2, srv.log_tail()
    assert "PORTMUX_API_TOKEN must be printable ASCII without spaces" in srv.log_text()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root to run the client as another user")
def test_client_names_an_unreadable_key_as_such():
    """A key the client's user may not read (a 0600 root key under the unit's DynamicUser)
    was reported as OpenSSL's "system lib"; it is "Permission denied" now."""
    import tempfile
    from pathlib import Path
    d = Path(tempfile.mkdtemp(prefix="portmux-keys-", dir="/tmp"))  # reachable by nobody
    d.chmod(0o755)
    try:
        _unreadable_key_case(d)
    finally:
        shutil.rmtree(d)


def _unreadable_key_case(d):
    for name in ("ca.pem", "client.pem", "client.key"):
        (d / name).write_text("-----BEGIN X-----\n-----END X-----\n")
    (d / "client.key").chmod(0o600)
    for f in ("ca.pem", "client.pem"):
        (d / f).chmod(0o644)
    # A copy nobody may run wherever the checkout is (a CI clone may be 0700 root's).
    client = d / "portmux-client"
    shutil.copy(CLIENT_BIN, client)
    client.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PORTMUX_TOKEN"}
    r = run_once(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", client,
                  "--server", f"127.0.0.1:{free_port()}", "--token", "tok-0123456789abcdef",
                  "--tls", "--ca", d / "ca.pem", "--cert", d / "client.pem",
                  "--key", d / "client.key"], timeout=10, env=env)
    err = r.stderr.decode()
    assert r.returncode == 2 and "--key" in err and "Permission denied" in err, err


@needs_client
def test_client_refuses_an_empty_or_overlong_server_name():
    """--server-name "" failed every connection as if the server were away ("cannot start
    a connection", then retries for ever): it is a usage error now, as is a name longer
    than SNI allows (255 bytes)."""
    for name in ("", "a" * 256):
        r = run_once([CLIENT_BIN, "--server", f"127.0.0.1:{free_port()}", "--token",
                      "tok-0123456789abcdef", "--server-name", name], timeout=10)
        err = r.stderr.decode()
        assert r.returncode == 2 and "--server-name must be 1..255 characters" in err, (r, err)
