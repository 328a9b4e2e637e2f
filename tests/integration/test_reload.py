"""SIGHUP reloads the config (issue 17): the live keys apply at once, keys that need a
restart are named in a warning and keep their running value, and a config that does not
load is logged while the running one stays. The server never dies of a SIGHUP."""
import signal

from conftest import connect, free_port, to_yaml, wait_until


def reload(srv, config=None, text=None):
    """Rewrites srv's config file (dict or raw text), sends SIGHUP, waits for the outcome
    line, and returns the log written since."""
    if text is None:
        srv.config = config
        text = to_yaml(config)
    srv.config_path.write_text(text + "\n")
    mark = srv.log_mark()
    srv.proc.send_signal(signal.SIGHUP)
    srv.wait_log(r"reloaded |reload failed", after=mark)
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
