"""SIGHUP reloads the config (issue 17): the live keys apply at once, keys that need a
restart are named in a warning and keep their running value, and a config that does not
load is logged while the running one stays. The server never dies of a SIGHUP."""
import os
import signal
import time

from conftest import SERVER_BIN, Proc, connect, free_port, to_yaml, wait_until


def reload(srv, config=None, text=None):
    """Rewrites srv's config file (dict or raw text), sends SIGHUP, waits for the outcome
    line, and returns the log written since."""
    if text is None:
        srv.config = config
        text = to_yaml(config)
    srv.config_path.write_text(text + "\n")
    mark = srv.log_mark()
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_log(r"reloaded |reload failed|reload refused", after=mark)
    assert srv.running(), f"server died on SIGHUP:\n{srv.log_tail()}"
    return srv.log_text()[mark:]


def with_(cfg, section, **kw):
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in cfg.items()}
    out.setdefault(section, {}).update(kw)
    return out


def test_sighup_keeps_the_server_running(server):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    log = reload(server, server.config)
    assert "nothing changed that applies live" in log, log
    assert server.health()["mappings"] == 1
    assert server.mapping(port)["status"] == "listening"


def test_log_level_applies_live(server_factory, echo_backend):
    srv = server_factory(config={"log": {"level": "info"}})
    port = free_port()
    srv.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)

    def one_connection():
        with connect(port) as s:
            s.sendall(b"x")
            assert s.recv(1) == b"x"
    mark = srv.log_mark()
    one_connection()
    wait_until(lambda: srv.mapping(port)["active_connections"] == 0, desc="closed")
    assert "connection opened" not in srv.log_text()[mark:]

    log = reload(srv, with_(srv.config, "log", level="debug"))
    assert "log.level" in log, log
    mark = srv.log_mark()
    one_connection()
    srv.wait_log(rf"DEBUG mapping port {port}: connection opened", after=mark)


def test_allowed_ips_apply_live(server):
    assert server.api("GET", "/health")[0] == 200
    log = reload(server, with_(server.config, "api", allowed_ips=["10.0.0.0/8"]))
    assert "api.allowed_ips" in log, log
    status, _, body = server.api("GET", "/health")
    assert status == 403 and body["error"] == "forbidden", (status, body)
    reload(server, with_(server.config, "api", allowed_ips=["127.0.0.0/8"]))
    assert server.api("GET", "/health")[0] == 200


def test_limits_and_port_range_apply_live(server, echo_backend):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=echo_backend.port)
    cfg = with_(server.config, "limits", max_connections_per_mapping=1)
    cfg = with_(cfg, "port_range", blacklist=[port + 1 if port < 65535 else port - 1])
    log = reload(server, cfg)
    assert "limits.max_connections_per_mapping" in log and "port_range.blacklist" in log, log
    with connect(port) as first:
        first.sendall(b"a")
        assert first.recv(1) == b"a"
        second = connect(port)
        try:
            second.settimeout(5)
            assert second.recv(1) == b"", "a second connection got through the new limit"
        except ConnectionResetError:
            pass
        finally:
            second.close()
    wait_until(lambda: server.mapping(port)["active_connections"] == 0, desc="closed")
    status, body = server.create(port=cfg["port_range"]["blacklist"][0],
                                 target_ip="127.0.0.1", target_port=9)
    assert status == 400 and body["error"] == "port_out_of_range", body


def test_restart_keys_are_named_and_kept(server):
    old_api = server.api_port
    cfg = with_(server.config, "api", listen_port=free_port())
    cfg = with_(cfg, "database", path=str(server.dir / "other.db"))
    log = reload(server, cfg)
    warn = [ln for ln in log.splitlines() if " WARN " in ln]
    assert len(warn) == 1 and "api.listen_port" in warn[0] and "database.path" in warn[0] \
        and "restart" in warn[0], log
    server.api_port = old_api  # still answering where it was
    assert server.health()["status"] == "ok"
    assert not (server.dir / "other.db").exists()


def test_bad_config_on_reload_keeps_the_running_one(server):
    reload(server, with_(server.config, "api", allowed_ips=["127.0.0.1/32"]))
    good = server.config
    log = reload(server, text="api:\n  listen_port: [not, a, port]\n")
    err = [ln for ln in log.splitlines() if " ERROR " in ln]
    assert len(err) == 1 and "reload failed, keeping the running config" in err[0] \
        and f"{server.config_path}:2: api.listen_port" in err[0], log
    assert server.health()["status"] == "ok"
    # A missing TLS file is a config error on reload too.
    bad_tls = with_(good, "tunnel", enabled=True,
                    tls={"cert_file": str(server.dir / "gone.pem"),
                         "key_file": str(server.dir / "gone.key")})
    log = reload(server, bad_tls)
    assert "reload failed" in log and "No such file or directory" in log, log
    # The running config is the last good one: a later good reload changes nothing.
    log = reload(server, good)
    assert "nothing changed that applies live" in log, log


def test_env_token_is_not_a_changed_api_token(server_factory):
    """With PORTMUX_API_TOKEN set, the file's api.token is not the running one: a reload
    does not warn that api.token changed, and the environment's token stays in force."""
    import os
    token = "env-token-0123456789abcdef"
    srv = server_factory(start=False)
    srv.proc.env = dict(os.environ, PORTMUX_API_TOKEN=token)
    srv.start()
    log = reload(srv, srv.config)
    assert "api.token" not in log, log
    assert srv.api("GET", "/api/mapping/list")[0] == 401
    assert srv.api("GET", "/api/mapping/list",
                   headers={"Authorization": f"Bearer {token}"})[0] == 200


def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(server, tmp_path):
    """A FIFO where the config or a TLS file should be: opening it for reading would
    wait for a writer, with the whole server (reload runs on its loop) or its start-up
    stuck. It is refused at once, like a directory."""
    good = server.config_path.read_text()
    server.config_path.unlink()
    os.mkfifo(server.config_path)
    try:
        mark = server.log_mark()
        server.proc.send_signal(signal.SIGHUP)
        line = server.wait_log(r"reload failed.*", after=mark).group(0)
        assert "not a regular file" in line, line
        assert server.health()["status"] == "ok"
        # At start: exit 2 with one line, not a process waiting forever.
        p = Proc([SERVER_BIN, "--config", server.config_path], tmp_path / "fifo.log").start()
        assert p.wait(10) == 2, p.log_text()
        assert "not a regular file" in p.log_text()
    finally:
        server.config_path.unlink()
        server.config_path.write_text(good)
    fifo = tmp_path / "cert.fifo"
    os.mkfifo(fifo)
    log = reload(server, with_(server.config, "tunnel", enabled=True,
                               tls={"cert_file": str(fifo), "key_file": str(fifo)}))
    assert "reload failed" in log and "not a regular file" in log, log
    assert server.health()["status"] == "ok"


def test_an_empty_config_on_reload_is_refused(server):
    """An empty file (caught mid-write, truncated by mistake) would put every key back to
    its default: allowed_ips open again, the port range reset, config clients gone. A
    reload refuses it and keeps the running config; at start an empty file still means
    the defaults."""
    reload(server, with_(server.config, "api", allowed_ips=["127.0.0.1/32"]))
    for text in ("", "# only a comment\n", "---\n"):
        log = reload(server, text=text)
        assert "reload refused, keeping the running config" in log and "sets nothing" in log, \
            (text, log)
        assert "reloaded" not in log, log
    # The running allowed_ips still stands: a peer outside it would be refused, and a
    # later reload of the same list changes nothing.
    log = reload(server, with_(server.config, "api", allowed_ips=["127.0.0.1/32"]))
    assert "nothing changed that applies live" in log, log


def test_tunnel_keys_apply_and_bind_addr_waits_for_a_restart(server):
    """tunnel.max_pending, takeover_probe_ms and session_buffer_limit apply to what starts
    after the reload; mappings.bind_addr would move every listener, so a restart is named
    for it. They used to be dropped without a word."""
    cfg = with_(server.config, "tunnel", max_pending=64, takeover_probe_ms=1500,
                session_buffer_limit=32 * 1024 * 1024)
    cfg = with_(cfg, "mappings", bind_addr="127.0.0.3")
    log = reload(server, cfg)
    live = [ln for ln in log.splitlines() if "reloaded" in ln]
    assert live and all(k in live[0] for k in ("tunnel.max_pending", "tunnel.takeover_probe_ms",
                                                "tunnel.session_buffer_limit")), log
    warn = [ln for ln in log.splitlines() if " WARN " in ln]
    assert len(warn) == 1 and "mappings.bind_addr" in warn[0] and "restart" in warn[0], log
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=9)
    with connect(port):
        pass  # the running bind address still serves new mappings


def test_a_stored_client_shadowed_by_the_config_comes_back_when_the_config_drops_it(
        server_factory):
    """An API client whose name a config client takes is shadowed; when a later reload
    drops the config client, the stored one serves again at once (listed, rotatable).
    It used to be neither listed nor creatable until a restart."""
    srv = server_factory(config={"tunnel": {"enabled": True}})
    status, _, body = srv.api("POST", "/api/client/create", body={"name": "c1"})
    assert status == 201, body
    shadow = with_(srv.config, "tunnel", clients=[{"name": "c1",
                                                  "token": "config-token-0123456789"}])
    log = reload(srv, shadow)
    assert "shadowed" in log, log
    plain = with_(srv.config, "tunnel", clients=[])
    log = reload(srv, plain)
    assert 'stored client "c1" is no longer shadowed' in log, log
    clients = {c["name"]: c for c in srv.api("GET", "/api/clients")[2]["data"]["clients"]}
    assert "c1" in clients and clients["c1"]["source"] == "api", clients
    status, _, body = srv.api("POST", "/api/client/rotate", body={"name": "c1"})
    assert status == 200, body


def test_sighup_during_start_up_does_not_kill_the_server(server_factory):
    """A reload sent while the config is still being read (systemctl reload during
    start) used to end the process (SIGHUP's default) before the loop's handler was in
    place. A config with many tunnel clients makes that read take a while."""
    srv = server_factory(start=False)
    srv.config.setdefault("tunnel", {})["clients"] = [
        {"name": f"c{i}", "token": f"token-{i:06d}-0123456789abcdef"} for i in range(30000)]
    srv.write_config()
    srv.proc.start()
    # Past exec and the dynamic loader (nothing can ignore a signal before main), and
    # well inside the ~2 s the config takes to read.
    time.sleep(0.3)
    deadline = time.monotonic() + 0.8
    while time.monotonic() < deadline and srv.proc.popen.poll() is None:
        srv.proc.send_signal(signal.SIGHUP)
        time.sleep(0.05)
    wait_until(lambda: "ready" in srv.log_text() or srv.proc.popen.poll() is not None,
               timeout=60, desc="ready, or the end of the process")
    assert srv.running(), f"exit {srv.proc.popen.poll()}: {srv.log_tail()}"
    assert srv.health()["status"] == "ok"
