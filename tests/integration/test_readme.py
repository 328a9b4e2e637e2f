"""README.md cannot rot (issue 7): every `curl` command of its ```sh blocks runs, in
order, against real servers, and must answer what the `# => STATUS BODY` comment under it
says; every `build/portmux-client` command starts for real and must connect; the usage
blocks equal the binaries' --help; every error code of the table has an example.

The conventions (also in the README's "The examples are tested"):
* `<!-- readme-test: server=NAME config={JSON} -->` right before a block switches to the
  server NAME, started on first use with the test's base config deep-merged with JSON;
  `<!-- readme-test: skip -->` marks a block that is not run (and may hold no curl).
* http://127.0.0.1:8080 -> that server's API, portmux.example.com:9000 -> its tunnel
  endpoint, ports 10001-10099 -> free ports (one map per server), 10000/10100 -> the ends
  of the test's port_range, 8000 -> a real HTTP backend.
* Expected JSON: keys shown must be there with the values shown; "..." elides, a string
  ending in "..." is a prefix; numbers (but port, target_port) and the per-run strings
  (remote_addr, connected_at, version) are checked by type. Expected text: each line is
  there (a sample line up to its value). No expectation: exit 0 and a status below 400.
"""
import json
import os
import re
import os
import shlex
import subprocess

import pytest

from conftest import (BUILD_DIR, CLIENT_BIN, SERVER_BIN, SOURCE_DIR, deep_merge, free_port,
                      wait_until)
from tunnel_helpers import client_count

pytestmark = pytest.mark.skipif(not CLIENT_BIN.exists(),
                                reason=f"portmux-client not built at {CLIENT_BIN}")

README = SOURCE_DIR / "README.md"
CTL_BIN = BUILD_DIR / "portmux-ctl"
PUBLIC_HOST = "portmux.example.com"
RANGE = (20000, 32699)  # where free_port() draws from: the test servers' port_range
# The quick start's token, as a reader copies it from the first start's log line into
# PORTMUX_TOKEN: the test servers' "default" client has it.
QUICKSTART_TOKEN = re.search(r"^export PORTMUX_TOKEN=(\S+)", README.read_text(), re.M).group(1)
BASE_CONFIG = {"port_range": {"from": RANGE[0], "end": RANGE[1], "blacklist": []},
               "tunnel": {"enabled": True,
                          "clients": [{"name": "default", "token": QUICKSTART_TOKEN}]}}
# "source": the README's default client comes from a first start (api), the test's from
# the config, so that the token is the README's.
DYNAMIC_STRINGS = {"remote_addr", "connected_at", "version", "last_seen", "created_at",
                   "old_token_valid_until", "source"}
EXACT_NUMBERS = {"port", "target_port"}

BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^\n]*?) -->[ \t]*\n\s*)?"
                   r"```(?P<lang>[a-z]*)\n(?P<body>.*?)```", re.S)
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


# ---------------------------------------------------------------------------
# Reading the README

def blocks(text):
    """[(marker or None, lang, body)] in order."""
    return [(m.group("marker"), m.group("lang"), m.group("body")) for m in BLOCK.finditer(text)]


def logical_lines(body):
    """Lines with backslash continuations joined."""
    out, cur = [], None
    for line in body.splitlines():
        cur = line if cur is None else f"{cur} {line.strip()}"
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        out.append(cur)
        cur = None
    return out


def steps(body):
    """[(command, expectation lines or None)]: a `# =>` line right under a command, and
    the comment lines that follow it, are that command's expected answer."""
    lines = [ln.strip() for ln in logical_lines(body)]
    out, i = [], 0
    while i < len(lines):
        cmd = lines[i]
        i += 1
        if not cmd or cmd.startswith("#"):
            continue
        exp = None
        if i < len(lines) and lines[i].startswith("# =>"):
            exp = [lines[i][4:].strip()]
            i += 1
            while i < len(lines) and lines[i].startswith("#") and not lines[i].startswith("# =>"):
                exp.append(lines[i][1:])
                i += 1
        out.append((cmd, exp))
    return out


def is_curl(cmd):
    return re.match(r"curl\s", cmd) is not None or re.search(r"\|\s*curl\s", cmd) is not None


def is_client(cmd):
    return cmd.startswith("build/portmux-client ")


def is_ctl(cmd):
    return cmd.startswith("build/portmux-ctl ")


def _drop_elisions(s):
    s = re.sub(r",\s*\.\.\.", "", s)
    s = re.sub(r"\.\.\.\s*,", "", s)
    return s.replace("...", "")


def unelide(text):
    """JSON text with `...` removed outside strings (inside one it means a prefix)."""
    parts, pos = [], 0
    for m in JSON_STRING.finditer(text):
        parts += [_drop_elisions(text[pos:m.start()]), m.group(0)]
        pos = m.end()
    return "".join(parts + [_drop_elisions(text[pos:])])


# ---------------------------------------------------------------------------
# Checking answers

def match_json(exp, act, key=None, path="$"):
    if isinstance(exp, dict):
        assert isinstance(act, dict), f"{path}: expected an object, got {act!r}"
        for k, v in exp.items():
            assert k in act, f"{path}.{k} missing in {act!r}"
            match_json(v, act[k], k, f"{path}.{k}")
    elif isinstance(exp, list):
        assert isinstance(act, list) and len(act) >= len(exp), f"{path}: {act!r}"
        for i, v in enumerate(exp):
            match_json(v, act[i], key, f"{path}[{i}]")
    elif isinstance(exp, bool) or exp is None:
        assert act is exp, f"{path}: expected {exp!r}, got {act!r}"
    elif isinstance(exp, (int, float)):
        assert isinstance(act, (int, float)) and not isinstance(act, bool), f"{path}: {act!r}"
        assert key not in EXACT_NUMBERS or act == exp, f"{path}: expected {exp}, got {act}"
    else:
        assert isinstance(act, str), f"{path}: expected a string, got {act!r}"
        if key in DYNAMIC_STRINGS:
            return
        if exp.endswith("..."):
            assert act.startswith(exp[:-3]), f"{path}: {act!r} does not start with {exp[:-3]!r}"
        else:
            assert act == exp, f"{path}: expected {exp!r}, got {act!r}"


def match_text(expected_lines, out):
    lines = out.splitlines()
    for exp in expected_lines:
        if exp.startswith("#"):
            assert exp in lines, f"line {exp!r} not in the output"
        else:
            series = exp.rsplit(" ", 1)[0] + " "
            assert any(ln.startswith(series) for ln in lines), f"no sample {series!r}"


# ---------------------------------------------------------------------------
# Servers, rewriting, running

class ReadmeServer:
    """One server the README's examples talk to, with its own map of README ports."""

    def __init__(self, name, srv, backend_port):
        self.name = name
        self.srv = srv
        self.ports = {8080: srv.api_port, 8000: backend_port, 10000: RANGE[0],
                      10100: RANGE[1]}
        if srv.tunnel_port:
            self.ports[9000] = srv.tunnel_port

    def _port(self, m):
        n = int(m.group(1))
        if n not in self.ports and 10000 <= n <= 10100:
            self.ports[n] = free_port()
        return str(self.ports.get(n, n))

    def rewrite(self, text):
        text = text.replace(PUBLIC_HOST, "127.0.0.1")
        return re.sub(r"(?<![\d.])(\d{4,5})(?!\d)", self._port, text)


def start_server(name, config, server_factory):
    srv = server_factory(config=deep_merge(BASE_CONFIG, config), start=False,
                         name=f"readme-{name}")
    if config.get("api", {}).get("allowed_ips"):
        # /health is filtered too: wait for the ready line instead.
        srv.proc.start()
        srv.wait_log(r"INFO server portmux \S+ ready")
    else:
        srv.start()
    return srv


def parse_marker(marker):
    m = re.fullmatch(r"server=(\S+)(?:\s+config=(\{.*\}))?", marker.strip())
    assert m, f"bad readme-test marker {marker!r}"
    return m.group(1), json.loads(m.group(2)) if m.group(2) else {}


def expectation(env, exp):
    """(status, ("json", value) | ("text", lines) | None) from the `# =>` lines."""
    first = env.rewrite(exp[0])
    m = re.fullmatch(r"(\d{3})\s*(.*)", first)
    assert m, f"expectation must start with a status: {exp[0]!r}"
    rest = ([m.group(2)] if m.group(2) else []) + [env.rewrite(x) for x in exp[1:]]
    if not rest:
        return int(m.group(1)), None
    if rest[0].lstrip().startswith("{"):
        text = unelide("".join(x.strip() for x in rest))
        return int(m.group(1)), ("json", json.loads(text))
    return int(m.group(1)), ("text", [x[1:] if x.startswith(" ") else x for x in rest])


def run_curl(env, cmd, exp, cwd):
    assert " # " not in cmd, f"no trailing comment on a curl line: {cmd!r}"
    real = env.rewrite(cmd) + " -s -w '\\n%{http_code}'"
    r = subprocess.run(["bash", "-c", real], capture_output=True, timeout=30, cwd=cwd)
    where = f"README command {cmd!r}\nran as {real!r}"
    assert r.returncode == 0, f"{where}\nexit {r.returncode}: {r.stderr.decode()}"
    body, _, code = r.stdout.decode().rpartition("\n")
    status = int(code)
    if exp is None:
        assert status < 400, f"{where}\n-> {status} {body}"
        return
    want, shape = expectation(env, exp)
    assert status == want, f"{where}\n-> {status} {body}\nREADME says {want}"
    if shape is None:
        return
    kind, value = shape
    try:
        if kind == "json":
            match_json(value, json.loads(body))
        else:
            match_text(value, body)
    except (AssertionError, ValueError) as e:
        raise AssertionError(f"{where}\n-> {status} {body[:2000]}\n{e}") from None


def start_client(env, cmd, proc_factory):
    args = shlex.split(env.rewrite(cmd))
    args[0] = str(CLIENT_BIN)
    # "$OFFICE_TOKEN": the README's placeholder for the token its marker gave "office".
    tokens = {f"{c['name'].upper()}_TOKEN": c["token"]
              for c in env.srv.config.get("tunnel", {}).get("clients", [])}
    args = [re.sub(r"\$(\w+)", lambda m: tokens.get(m.group(1), m.group(0)), a) for a in args]
    name = args[args.index("--name") + 1] if "--name" in args else "default"
    # Without --token the client reads PORTMUX_TOKEN, exported as the quick start says.
    p = proc_factory(args, f"readme-client-{env.name}-{name}",
                     env=dict(os.environ, PORTMUX_TOKEN=QUICKSTART_TOKEN))
    wait_until(lambda: p.poll() is not None or client_count(env.srv, name) == 1,
               timeout=15, desc=f"README client {name!r} to connect ({cmd!r})")
    assert p.running(), f"README client exited {p.poll()}: {cmd!r}\n{p.log_tail()}"


def run_ctl(env, cmd, exp, cwd):
    """A portmux-ctl command, with PORTMUX_API pointing at env's server. `# => exit N`
    gives the exit status (default 0); each line after it must be in the output, compared
    with runs of blanks collapsed (table columns widen with the real ports), a trailing
    `...` eliding the rest of the line."""
    args = shlex.split(env.rewrite(cmd))
    args[0] = str(CTL_BIN)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PORTMUX_API")}
    environ["PORTMUX_API"] = f"http://127.0.0.1:{env.srv.api_port}"
    r = subprocess.run(args, capture_output=True, timeout=30, cwd=cwd, env=environ)
    out = r.stdout.decode() + r.stderr.decode()
    want, lines = 0, []
    if exp:
        m = re.fullmatch(r"exit (\d+)", exp[0].strip())
        assert m, f"a portmux-ctl expectation starts with `exit N`: {exp[0]!r}"
        want, lines = int(m.group(1)), [env.rewrite(x) for x in exp[1:]]
    where = f"README command {cmd!r} ran as {args!r}"
    assert r.returncode == want, f"{where}\nexit {r.returncode}, README says {want}:\n{out}"
    seen = [" ".join(ln.split()) for ln in out.splitlines()]
    for line in lines:
        line = " ".join(line.split())
        line = line[:-3].rstrip() if line.endswith("...") else line
        assert any(line in s for s in seen), f"{where}\nno line {line!r} in:\n{out}"


# ---------------------------------------------------------------------------
# Tests

def test_readme_examples_run(server_factory, proc_factory, http_backend, tmp_path):
    servers, env = {}, None
    ran = {"curl": 0, "client": 0, "expectations": 0, "ctl": 0}
    for marker, lang, body in blocks(README.read_text()):
        if lang != "sh":
            assert not re.search(r"^\s*curl\s", body, re.M), \
                f"a curl command in a ```{lang} block is never run:\n{body}"
            continue
        cmds = steps(body)
        if marker and marker.strip() == "skip":
            assert not any(is_curl(c) for c, _ in cmds), f"a skipped block holds a curl:\n{body}"
            continue
        if marker:
            name, config = parse_marker(marker)
            if name not in servers:
                srv = start_server(name, config, server_factory)
                servers[name] = ReadmeServer(name, srv, http_backend.port)
            env = servers[name]
        for cmd, exp in cmds:
            if is_curl(cmd):
                assert env is not None, f"curl before any readme-test server marker: {cmd!r}"
                run_curl(env, cmd, exp, tmp_path)
                ran["curl"] += 1
                ran["expectations"] += exp is not None
            elif is_client(cmd):
                assert env is not None, f"client before any readme-test server marker: {cmd!r}"
                start_client(env, cmd, proc_factory)
                ran["client"] += 1
            elif is_ctl(cmd):
                assert env is not None, f"portmux-ctl before any readme-test server: {cmd!r}"
                run_ctl(env, cmd, exp, tmp_path)
                ran["ctl"] += 1
            else:
                assert exp is None, f"an expectation under a command that is not run: {cmd!r}"
    # The README has these many; fewer means the parser lost some.
    assert ran["curl"] >= 25 and ran["client"] >= 4 and ran["expectations"] >= 20, ran
    assert ran["ctl"] >= 5, ran


def test_usage_blocks_equal_help():
    text = README.read_text()
    for binary in (CLIENT_BIN, SERVER_BIN):
        r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr
        assert f"```text\n{r.stdout}```" in text, \
            f"README's usage block of {binary.name} differs from --help:\n{r.stdout}"


def test_every_error_code_has_an_example():
    text = README.read_text()
    table = set(re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", text, re.M))
    # Every code the server can answer (its table in mapping_request.c) is in the README's.
    source = (SOURCE_DIR / "src" / "server" / "mapping_request.c").read_text()
    codes = set(re.findall(r'\[API_E_[A-Z_]+\] = \{"([a-z_]+)", (\d{3})\}', source))
    assert len(codes) >= 12, codes
    assert {(st, code) for code, st in codes} - {("500", "internal_error")} <= table, \
        f"error codes missing from the README's table: {codes}"
    shown = set()
    for _, lang, body in blocks(text):
        if lang != "sh":
            continue
        for cmd, exp in steps(body):
            if exp and is_curl(cmd):
                m = re.match(r"(\d{3}) ", exp[0])
                err = re.search(r'"error":"([a-z_]+)"', "".join(exp))
                if m and err:
                    shown.add((m.group(1), err.group(1)))
    # store_unavailable needs a stalled PostgreSQL, which the README's examples cannot
    # stage; test_cluster_pg.py answers it with a real frozen database instead, and
    # test_cluster_pg_async.py a write held in flight by a row lock.
    table -= {("503", "store_unavailable")}
    assert table <= shown, f"error codes without a README example: {sorted(table - shown)}"


def test_parser_sees_what_a_reader_sees():
    """The helpers themselves: continuations, expectations, elisions."""
    body = ("curl -X POST http://127.0.0.1:8080/x \\\n     -d '{\"port\":10022}'\n"
            "# => 201 {\"a\":1,\n#    \"b\":\"c...\",...}\nssh -p 10022 host\n# prose\n")
    got = steps(body)
    assert got[0] == ("curl -X POST http://127.0.0.1:8080/x -d '{\"port\":10022}'",
                      ['201 {"a":1,', '    "b":"c...",...}']), got
    assert got[1] == ("ssh -p 10022 host", None), got
    assert json.loads(unelide('{"a":[{...,"b":"x...",...}],...}')) == {"a": [{"b": "x..."}]}
    match_json({"b": "x..."}, {"b": "xyz"})
    with pytest.raises(AssertionError):
        match_json({"b": "x"}, {"b": "xyz"})
    with pytest.raises(AssertionError):
        match_json({"port": 1}, {"port": 2}, None)


def test_scenarios_do_not_collide():
    """Issue 17: a reader who follows the README top to bottom on one server must not hit
    port_in_use or already_connected: each scenario has its own public ports and its own
    client name, used nowhere else in the README's runnable examples."""
    text = README.read_text()
    start = text.index("\n## Scenarios\n")
    end = text.index("\n## ", start + 1)
    scen_text, rest = text[start:end], text[:start] + text[end:]
    parts = re.split(r"\n### ", scen_text)[1:]
    assert len(parts) >= 3, "the scenarios moved: update this test"

    def ports(t):
        return set(int(p) for p in re.findall(r'"port":(\d+)', t))

    def clients(t):
        named = set(re.findall(r'"client":"([\w.-]+)"', t))
        named |= set(re.findall(r"portmux-client [^\n]*?--name (\S+)", t.replace("\\\n", " ")))
        return named
    seen_ports, seen_clients = ports(rest), clients(rest) | {"default"}
    for part in parts:
        title = part.splitlines()[0]
        p, c = ports(part), clients(part)
        assert p, f"scenario {title!r} creates no mapping"
        assert c, f"scenario {title!r} names no client of its own"
        assert not p & seen_ports, f"scenario {title!r} reuses ports {p & seen_ports}"
        assert not c & seen_clients, f"scenario {title!r} reuses clients {c & seen_clients}"
        seen_ports |= p
        seen_clients |= c
