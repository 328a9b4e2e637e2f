"""Issue 17, the second round: a tunnel mapping names a client that exists (refused at
create and update, warned about at restore), a mutual-TLS server refusing a client that
has no certificate (exit 2, no retry), SIGHUP applying api.allowed_hosts and the config's
tunnel clients, failed dials logged and shown per mapping (last_error)."""
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
