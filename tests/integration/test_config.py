"""Config file handling (SPEC §5): a bad config stops start-up with exit status 2 and one
stderr line "FILE:LINE: KEY: reason"; good configs (including config.yaml.example) start."""
import re
import textwrap

import pytest

from conftest import SERVER_BIN, SOURCE_DIR, Server, free_port, run_once

# (id, yaml text, line, key) -- the key is the dotted path of the offending key.
BAD = [
    ("unknown-top-key", """\
        port_range:
          from: 20000
          end: 20100
        colour: blue
        """, 4, "colour"),
    ("unknown-nested-key", """\
        api:
          listen_addr: 127.0.0.1
          listen_prot: 8080
        """, 3, "api.listen_prot"),
    ("wrong-type-bool", """\
        log:
          level: info
        tunnel:
          enabled: maybe
        """, 4, "tunnel.enabled"),
    ("wrong-type-int", """\
        api:
          listen_port: eighty
        """, 2, "api.listen_port"),
    ("wrong-type-list-for-string", """\
        database:
          path: [a, b]
        """, 2, "database.path"),
    ("wrong-type-scalar-for-mapping", """\
        # a comment line
        api: 8080
        """, 2, "api"),
    ("bad-port-high", """\
        api:
          listen_addr: 127.0.0.1
          listen_port: 70000
        """, 3, "api.listen_port"),
    ("bad-port-negative", """\
        tunnel:
          listen_port: -1
        """, 2, "tunnel.listen_port"),
    ("bad-range-from", """\
        port_range:
          from: 0
        """, 2, "port_range.from"),
    ("bad-blacklist-entry", """\
        port_range:
          blacklist: [80, "x"]
        """, 2, "port_range.blacklist"),
    ("bad-log-level", """\
        log:
          level: loud
        """, 2, "log.level"),
    ("bad-cidr", """\
        api:
          allowed_ips: [10.0.0.0/8, 300.1.1.1/8]
        """, 2, "api.allowed_ips"),
    ("yaml-tab", "api:\n\tlisten_port: 8080\n", 2, "yaml"),
    ("yaml-bad-indent", """\
        log:
          level: info
         bad: 1
        """, 3, "yaml"),
]


def run_bad(tmp_path, text, timeout=10):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    r = run_once([SERVER_BIN, "--config", path], timeout=timeout)
    return path, r


@pytest.mark.parametrize("cid,text,line,key", BAD, ids=[b[0] for b in BAD])
def test_bad_config(tmp_path, cid, text, line, key):
    path, r = run_bad(tmp_path, textwrap.dedent(text))
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, f"exit {r.returncode}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, f"want one stderr line, got {lines!r}"
    m = re.match(r"^(.*):(\d+): ([^:]+): (.+)$", lines[0])
    assert m, f"not FILE:LINE: KEY: reason: {lines[0]!r}"
    assert m.group(1) == str(path)
    assert int(m.group(2)) == line, lines[0]
    got_key = m.group(3)
    # A list element may be named with its index: port_range.blacklist[1].
    assert got_key == key or got_key.startswith(key + "["), lines[0]
    assert m.group(4).strip()


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_config(tmp_path, kind):
    path = tmp_path / "nope.yaml"
    if kind == "directory":
        path.mkdir()
    r = run_once([SERVER_BIN, "--config", path], timeout=10)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, f"exit {r.returncode}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1, lines
    # There is no line to name in a file that cannot be read; the file and why are named.
    assert lines[0].startswith(f"{path}:"), lines[0]
    reason = "No such file" if kind == "missing" else "directory"
    assert reason in lines[0], lines[0]


def test_config_error_does_not_touch_database(tmp_path):
    db = tmp_path / "db" / "m.db"
    text = f'database:\n  path: "{db}"\nbogus: 1\n'
    path, r = run_bad(tmp_path, text)
    assert r.returncode == 2
    assert not db.exists(), "bad config still created the database"


def test_unknown_flag_exits_2(tmp_path):
    r = run_once([SERVER_BIN, "--no-such-flag"], timeout=10)
    assert r.returncode == 2, r


@pytest.mark.parametrize("style", ["--config", "-config", "--config="])
def test_config_flag_spellings(server_factory, style):
    srv = server_factory(start=False)
    if style.endswith("="):
        srv.proc.args[1:3] = [f"--config={srv.config_path}"]
    else:
        srv.proc.args[1] = style
    srv.start()
    assert srv.health()["status"] == "ok"
    assert srv.stop() == 0


def test_yes_no_booleans_and_comments(server_factory, tmp_path):
    api_port = free_port()
    text = textwrap.dedent(f"""\
        # comments and flow style are fine
        port_range: {{from: 20000, end: 32699, blacklist: [20001, 20002]}}
        tunnel:
          enabled: no   # yes/no are booleans too
        api:
          listen_addr: 127.0.0.1
          listen_port: {api_port}
        database:
          path: "{tmp_path / 'yn.db'}"
        log:
          level: warn
        """)
    srv = server_factory(config_text=text, api_port=api_port)
    assert srv.health()["tunnel_enabled"] is False
    status, body = srv.create(port=20001, target_ip="127.0.0.1", target_port=9)
    assert status == 400 and body["error"] == "port_out_of_range", body


def test_example_config_is_valid(server_factory, tmp_path):
    """config.yaml.example, with only ports, addresses and the database moved into the
    test's sandbox, starts and shows its defaults."""
    text = (SOURCE_DIR / "config.yaml.example").read_text()
    api_port, tunnel_port = free_port(), free_port()
    subs = [
        (r"(\n  listen_port: )9000\b", rf"\g<1>{tunnel_port}"),
        (r"(\n  listen_port: )8080\b", rf"\g<1>{api_port}"),
        (r"(\n  listen_addr: )0\.0\.0\.0\b", r"\g<1>127.0.0.1"),
        (r"(\n  path: )\./data/mappings\.db", rf'\g<1>"{tmp_path / "example.db"}"'),
    ]
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text)
        assert n == 1, f"config.yaml.example: {pattern!r} matched {n} times"
    srv = server_factory(config_text=text, api_port=api_port)
    h = srv.health()
    assert h["tunnel_enabled"] is True
    status, body = srv.create(port=9999, target_ip="127.0.0.1", target_port=9)
    assert status == 400 and body["error"] == "port_out_of_range", body
    assert srv.stop() == 0
    assert (tmp_path / "example.db").exists()


def test_database_directory_is_created(server_factory, tmp_path):
    db = tmp_path / "a" / "b" / "mappings.db"
    srv = server_factory(config={"database": {"path": str(db)}})
    srv.create_ok(port=free_port(), target_ip="127.0.0.1", target_port=9)
    assert srv.stop() == 0
    assert db.exists()


def test_unwritable_database_fails_start(server_factory, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    srv = server_factory(start=False, config={"database": {"path": str(blocker / "m.db")}})
    srv.proc.start()
    rc = srv.proc.wait(10)
    assert rc not in (0, None), "started without a usable database"
    assert str(blocker) in srv.log_text(), "the log does not say which path failed"


def test_server_class_default_config_roundtrip(tmp_path):
    """The fixture's YAML emitter produces what the server accepts (guards the harness)."""
    srv = Server(tmp_path / "s", config={"port_range": {"blacklist": [20001]},
                                         "limits": {"max_connections_per_mapping": 5}})
    try:
        srv.start()
        assert srv.health()["status"] == "ok"
    finally:
        srv.kill9()
