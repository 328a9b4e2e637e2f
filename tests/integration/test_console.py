"""The web console (GET / and /ui/...): served assets, and the page itself driven in a
real headless Chromium against a real server and a real backend.

Chromium, chromedriver and python3-selenium come from scripts/install-deps.sh; when they
are missing these tests fail (they never skip). Every wait is a WebDriverWait or
wait_until with a deadline. Screenshots go to $PORTMUX_BUILD_DIR/console-screenshots/."""
import html.parser
import http.client
import re
import socket
from pathlib import Path

import pytest

from conftest import (BUILD_DIR, CLIENT_BIN, SOURCE_DIR, PortHolder, connect, connect_refused,
                      free_port, recv_all, sqlite, wait_until)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WEB_DIR = SOURCE_DIR / "web"
SHOTS_DIR = BUILD_DIR / "console-screenshots"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
TOKEN = "console-s3cret-token"
WAIT = 15  # seconds; the page polls every 2 s

try:
    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:  # fail, do not skip: scripts/install-deps.sh installs it
    raise ImportError(f"python3-selenium is missing ({e}); run scripts/install-deps.sh") from e


# ---------------------------------------------------------------------------
# Browser

def _chrome_options(user_data_dir, width, height):
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return opts


@pytest.fixture
def browser_factory(tmp_path):
    """make(width, height) -> a fresh headless Chromium, quit at teardown. At teardown the
    browser's console is checked: a CSP violation or a script error fails the test."""
    assert CHROMIUM.exists(), f"{CHROMIUM} missing: run scripts/install-deps.sh"
    assert CHROMEDRIVER.exists(), f"{CHROMEDRIVER} missing: run scripts/install-deps.sh"
    made = []

    def make(width=1400, height=900):
        n = len(made)
        profile = tmp_path / f"chrome-profile-{n}"
        profile.mkdir()
        service = Service(executable_path=str(CHROMEDRIVER),
                          log_path=str(tmp_path / f"chromedriver-{n}.log"))
        drv = webdriver.Chrome(service=service, options=_chrome_options(profile, width, height))
        drv.set_page_load_timeout(30)
        made.append(drv)
        return drv

    yield make
    problems = []
    for drv in made:
        try:
            problems += page_errors(drv)
        finally:
            drv.quit()
    assert not problems, "browser console errors:\n" + "\n".join(problems)


def page_errors(drv):
    """SEVERE browser-console lines other than the HTTP errors the tests provoke on purpose
    (a 4xx answer, a refused connection while the server is down)."""
    out = []
    for entry in drv.get_log("browser"):
        msg = entry.get("message", "")
        if entry.get("level") != "SEVERE" or "Failed to load resource" in msg:
            continue
        out.append(msg)
    return out


def wait(drv, timeout=WAIT):
    return WebDriverWait(drv, timeout, poll_frequency=0.05,
                         ignored_exceptions=(StaleElementReferenceException,))


def until(drv, cond, what, timeout=WAIT):
    return wait(drv, timeout).until(cond, message=f"timed out after {timeout}s: {what}")


def by_id(drv, ident):
    return drv.find_element(By.ID, ident)


def conn_state(drv):
    return by_id(drv, "conn-state").text


def open_console(drv, srv, want="live"):
    drv.get(f"http://127.0.0.1:{srv.api_port}/")
    until(drv, lambda d: conn_state(d) == want, f"console state {want!r}")


def mapping_row(drv, port):
    rows = drv.find_elements(By.CSS_SELECTOR, f'#mappings-body tr[data-port="{port}"]')
    return rows[0] if rows else None


def row_status(drv, port):
    row = mapping_row(drv, port)
    return row.find_element(By.CSS_SELECTOR, ".c-status .status").text if row else None


def row_bytes(drv, port, which):
    """(raw count, text shown) of the In or Out cell of port's row."""
    row = mapping_row(drv, port)
    if row is None:
        return None
    td = row.find_element(By.CSS_SELECTOR, f".c-bytes-{which}")
    return int(td.get_attribute("data-bytes")), td.text


def fill(drv, ident, text):
    el = by_id(drv, ident)
    el.clear()
    el.send_keys(text)


def submit_create(drv, port, target_ip="", target_port="", name="", tunnel=False, client=""):
    fill(drv, "f-port", str(port))
    by_id(drv, "f-mode-tunnel" if tunnel else "f-mode-direct").click()
    if tunnel:
        fill(drv, "f-client", client)
    fill(drv, "f-target-ip", target_ip)
    fill(drv, "f-target-port", str(target_port))
    fill(drv, "f-name", name)
    by_id(drv, "f-submit").click()


def visible_field_errors(drv):
    return {e.get_attribute("id"): e.text
            for e in drv.find_elements(By.CSS_SELECTOR, ".field-error, #form-error")
            if e.is_displayed()}


def http_get_via(port, path):
    """One HTTP/1.0 GET through the public port; returns the whole response."""
    with connect(port) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        s.shutdown(socket.SHUT_WR)
        return recv_all(s)


def shot(drv, name):
    SHOTS_DIR.mkdir(parents=True, exist_ok=True)
    path = SHOTS_DIR / name
    assert drv.save_screenshot(str(path)), f"screenshot {path} not written"
    assert path.stat().st_size > 5000, f"screenshot {path} is suspiciously small"
    return path


def set_viewport(drv, width, height, mobile):
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
    until(drv, lambda d: d.execute_script("return window.innerWidth") == width,
          f"viewport width {width}")


# ---------------------------------------------------------------------------
# 5. Unit level: the assets as served

def web_files():
    files = sorted(p for p in WEB_DIR.iterdir() if p.is_file())
    assert files, f"no files in {WEB_DIR}"
    return files


def raw_get(srv, path):
    """(status, headers, body bytes) of one GET, undecoded."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.api_port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_assets_served_byte_identical(server):
    names = {p.name for p in web_files()}
    assert {"index.html", "app.js", "style.css"} <= names, names
    for path in web_files():
        urls = [f"/ui/{path.name}"] + (["/"] if path.name == "index.html" else [])
        for url in urls:
            status, headers, body = raw_get(server, url)
            assert status == 200, (url, status)
            assert body == path.read_bytes(), f"{url} differs from {path}"
            want = CONTENT_TYPES.get(path.suffix)
            assert want, f"no expected content type for {path.name}; add it here"
            assert headers.get("Content-Type") == want, (url, headers.get("Content-Type"))
            assert headers.get("Content-Security-Policy") == CSP, (url, headers)
            assert headers.get("X-Content-Type-Options") == "nosniff", (url, headers)
            assert headers.get("Cache-Control"), (url, headers)


@pytest.mark.parametrize("url", ["/ui/", "/ui/nope.js", "/ui/index.htm", "/ui/../CMakeLists.txt",
                                 "/ui/%2e%2e/CMakeLists.txt", "/ui/app.js/x", "/index.html",
                                 "/ui//app.js"])
def test_unknown_ui_paths_are_404(server, url):
    status, headers, body = server.api("GET", url)
    assert status == 404, (url, status, body)
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert body["success"] is False and body["error"] == "not_found", body


def test_console_needs_no_token_but_api_does(server_factory):
    srv = server_factory(config={"api": {"token": TOKEN}})
    for url in ("/", "/ui/app.js", "/ui/style.css"):
        status, _, _ = srv.api("GET", url)
        assert status == 200, url
    status, _, body = srv.api("GET", "/api/mapping/list")
    assert status == 401 and body["error"] == "unauthorized", body


class _PageAudit(html.parser.HTMLParser):
    """Collects what the CSP would refuse: inline scripts/styles/handlers, foreign URLs."""

    def __init__(self):
        super().__init__()
        self.problems = []
        self.ids = set()
        self.labels_for = set()
        self.inputs = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "style":
            self.problems.append("<style> element")
        if "style" in a:
            self.problems.append(f"style attribute on <{tag}>")
        for k in a:
            if k.startswith("on"):
                self.problems.append(f"{k} handler on <{tag}>")
        for k in ("src", "href", "action"):
            v = a.get(k) or ""
            if re.match(r"^[a-z]+:", v, re.I) or v.startswith("//"):
                self.problems.append(f"{k}={v!r} leaves the origin")
        if tag == "script":
            if not a.get("src"):
                self.problems.append("inline <script>")
            self._in_script = True
        if tag == "label" and a.get("for"):
            self.labels_for.add(a["for"])
        if tag in ("input", "select", "textarea") and a.get("type") not in ("radio", "hidden"):
            self.inputs.append(a.get("id"))

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.problems.append("inline script text")


def test_page_fits_the_csp_and_labels_every_input():
    audit = _PageAudit()
    audit.feed((WEB_DIR / "index.html").read_text())
    assert not audit.problems, audit.problems
    unlabelled = [i for i in audit.inputs if i not in audit.labels_for]
    assert not unlabelled, f"inputs without <label for>: {unlabelled}"
    js = (WEB_DIR / "app.js").read_text()
    # API data reaches the page through textContent only.
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write|eval\(",
                         js), "app.js writes HTML from strings"
    assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", js), "app.js names another origin"
    for ident in re.findall(r"\$\('([\w-]+)'\)", js):
        assert ident in audit.ids, f"app.js uses #{ident}, which index.html lacks"


# ---------------------------------------------------------------------------
# 1. Create, see traffic, remove -- and the API agrees at each step

def test_console_create_traffic_remove(server, http_backend, browser_factory):
    drv = browser_factory()
    open_console(drv, server)
    assert by_id(drv, "h-version").text == server.health()["version"]
    assert by_id(drv, "h-tunnel").text == "off"
    port = free_port()

    submit_create(drv, port, "127.0.0.1", http_backend.port, name="web backend")
    until(drv, lambda d: row_status(d, port) == "listening", f"row {port} listening")
    m = server.mapping(port)
    assert m is not None and m["status"] == "listening", m
    assert (m["target_ip"], m["target_port"], m["use_tunnel"], m["name"]) == \
        ("127.0.0.1", http_backend.port, False, "web backend"), m
    row = mapping_row(drv, port)
    assert row.find_element(By.CSS_SELECTOR, ".c-mode").text == "direct"
    assert row.find_element(By.CSS_SELECTOR, ".c-target").text == f"127.0.0.1:{http_backend.port}"
    assert by_id(drv, "f-port").get_attribute("value") == "", "form not reset after create"
    assert visible_field_errors(drv) == {}

    # Traffic through the public port: the counters grow, and match the API's.
    assert row_bytes(drv, port, "in")[0] == 0 and row_bytes(drv, port, "out")[0] == 0
    resp = http_get_via(port, "/blob.bin")
    assert resp.endswith(http_backend.files["blob.bin"]), "relay corrupted the body"

    def counters_match_api(d):
        m = server.mapping(port)
        got_in, got_out = row_bytes(d, port, "in")[0], row_bytes(d, port, "out")[0]
        return m["bytes_out"] >= len(resp) and (got_in, got_out) == (m["bytes_in"], m["bytes_out"])
    until(drv, counters_match_api, "byte counters in the table equal the API's")
    n_out, text_out = row_bytes(drv, port, "out")
    assert n_out >= len(resp)
    assert re.fullmatch(r"3\.\d\d MiB", text_out), f"bytes out shown as {text_out!r}"
    assert re.fullmatch(r"\d+ B", row_bytes(drv, port, "in")[1]), row_bytes(drv, port, "in")
    conns = mapping_row(drv, port).find_element(By.CSS_SELECTOR, ".c-conns").text
    assert conns == "0 / 1 / 0", conns

    def spark_has_peak(d):
        pts = mapping_row(d, port).find_element(By.CSS_SELECTOR, "polyline.spark-out")
        ys = [float(p.split(",")[1]) for p in (pts.get_attribute("points") or "").split()]
        return ys and min(ys) < 21
    until(drv, spark_has_peak, "the traffic sparkline to show the burst")

    # Remove: cancel first (nothing happens), then confirm.
    mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.remove").click()
    dialog = by_id(drv, "confirm-dialog")
    until(drv, lambda d: dialog.get_attribute("open") is not None, "confirm dialog open")
    assert str(port) in by_id(drv, "confirm-text").text
    by_id(drv, "confirm-no").click()
    until(drv, lambda d: dialog.get_attribute("open") is None, "confirm dialog closed")
    assert server.mapping(port) is not None and mapping_row(drv, port) is not None

    mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.remove").click()
    until(drv, lambda d: dialog.get_attribute("open") is not None, "confirm dialog open")
    by_id(drv, "confirm-yes").click()
    until(drv, lambda d: mapping_row(d, port) is None, f"row {port} gone")
    assert server.mapping(port) is None
    assert connect_refused(port), "removed mapping still accepts connections"
    assert f"port {port} removed" in by_id(drv, "notice").text
    assert by_id(drv, "mappings-empty").is_displayed()


def test_console_filter_and_escaping(server, http_backend, browser_factory):
    hostile = "<img src=x onerror=\"document.title='pwned'\">"
    p1, p2 = free_port(), free_port()
    server.create_ok(port=p1, target_ip="127.0.0.1", target_port=http_backend.port, name="alpha")
    server.create_ok(port=p2, target_ip="127.0.0.1", target_port=http_backend.port, name=hostile)
    drv = browser_factory()
    open_console(drv, server)
    until(drv, lambda d: mapping_row(d, p1) and mapping_row(d, p2), "both rows")
    # Text stays text: no element was made from the name.
    name_cell = mapping_row(drv, p2).find_element(By.CSS_SELECTOR, ".c-name")
    assert name_cell.text == hostile
    assert not drv.find_elements(By.CSS_SELECTOR, "#mappings-body img")
    assert drv.title == "portmux console"

    fill(drv, "filter", "alpha")
    until(drv, lambda d: not mapping_row(d, p2).is_displayed(), "filter hides the other row")
    assert mapping_row(drv, p1).is_displayed()
    # The filter survives the next polls.
    before = by_id(drv, "last-update").text
    until(drv, lambda d: by_id(d, "last-update").text != before, "a later poll")
    assert mapping_row(drv, p1).is_displayed() and not mapping_row(drv, p2).is_displayed()
    fill(drv, "filter", "no-such-mapping")
    until(drv, lambda d: by_id(d, "mappings-empty").is_displayed(), "no-match message")
    assert "no-such-mapping" in by_id(drv, "mappings-empty").text
    by_id(drv, "filter").send_keys(Keys.CONTROL, "a")
    by_id(drv, "filter").send_keys(Keys.DELETE)
    until(drv, lambda d: mapping_row(d, p1).is_displayed() and mapping_row(d, p2).is_displayed(),
          "both rows shown again")


def test_console_keyboard_only(server, http_backend, browser_factory):
    drv = browser_factory()
    open_console(drv, server)
    port = free_port()
    # Tab order through the form: port, mode, target ip, target port, (client is off), name.
    by_id(drv, "f-port").send_keys(str(port), Keys.TAB)
    assert drv.switch_to.active_element.get_attribute("id") == "f-mode-direct"
    drv.switch_to.active_element.send_keys(Keys.TAB, "127.0.0.1", Keys.TAB,
                                           str(http_backend.port), Keys.TAB)
    assert drv.switch_to.active_element.get_attribute("id") == "f-name"
    drv.switch_to.active_element.send_keys("kbd", Keys.ENTER)
    until(drv, lambda d: row_status(d, port) == "listening", "created from the keyboard")
    assert server.mapping(port)["name"] == "kbd"

    btn = mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.remove")
    assert btn.tag_name == "button"
    btn.send_keys(Keys.ENTER)
    dialog = by_id(drv, "confirm-dialog")
    until(drv, lambda d: dialog.get_attribute("open") is not None, "dialog open")
    assert drv.switch_to.active_element.get_attribute("id") == "confirm-no", "Cancel has focus"
    drv.switch_to.active_element.send_keys(Keys.ESCAPE)
    until(drv, lambda d: dialog.get_attribute("open") is None, "Escape closes the dialog")
    assert server.mapping(port) is not None
    until(drv, lambda d: d.switch_to.active_element == mapping_row(d, port).find_element(
        By.CSS_SELECTOR, "button.remove"), "focus back on the row's Remove button")
    drv.switch_to.active_element.send_keys(Keys.ENTER)
    until(drv, lambda d: dialog.get_attribute("open") is not None, "dialog open again")
    drv.switch_to.active_element.send_keys(Keys.TAB)
    assert drv.switch_to.active_element.get_attribute("id") == "confirm-yes"
    drv.switch_to.active_element.send_keys(Keys.ENTER)
    until(drv, lambda d: mapping_row(d, port) is None, "removed from the keyboard")
    assert server.mapping(port) is None


def test_console_shows_disconnected_and_recovers(server, http_backend, browser_factory):
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=http_backend.port)
    drv = browser_factory()
    open_console(drv, server)
    until(drv, lambda d: row_status(d, port) == "listening", "row listening")
    server.kill9()
    until(drv, lambda d: conn_state(d) == "disconnected", "disconnected badge")
    banner = by_id(drv, "banner")
    assert banner.is_displayed() and "Disconnected" in banner.text, banner.text
    assert "is-stale" in drv.find_element(By.TAG_NAME, "body").get_attribute("class")
    shot(drv, "console-disconnected.png")
    server.start()
    until(drv, lambda d: conn_state(d) == "live", "live again after restart")
    assert not banner.is_displayed()
    until(drv, lambda d: row_status(d, port) == "listening", "restored mapping listed")


def client_row(drv, name):
    rows = drv.find_elements(By.CSS_SELECTOR, f'#clients-body tr[data-name="{name}"]')
    return rows[0] if rows else None


def test_console_tunnel_mapping_and_clients(server_factory, proc_factory, http_backend,
                                            browser_factory):
    token = "console-tunnel-token"
    srv = server_factory(config={"tunnel": {"enabled": True,
                                            "clients": [{"name": "edge", "token": token}]}})
    drv = browser_factory()
    set_viewport(drv, 1400, 900, mobile=False)
    open_console(drv, srv)
    until(drv, lambda d: by_id(d, "h-tunnel").text == "on · no client", "tunnel on, no client")
    port = free_port()
    submit_create(drv, port, "127.0.0.1", http_backend.port, name="via tunnel", tunnel=True,
                  client="edge")
    until(drv, lambda d: row_status(d, port) == "waiting for client", "waiting for client")
    m = srv.mapping(port)
    assert (m["use_tunnel"], m["client"], m["status"]) == (True, "edge", "waiting_for_client"), m
    row = mapping_row(drv, port)
    assert row.find_element(By.CSS_SELECTOR, ".c-mode").text == "tunnel"
    assert row.find_element(By.CSS_SELECTOR, ".c-client .client-name").text == "edge"
    # Every known client is listed (SPEC §4a): the config client, not connected yet.
    until(drv, lambda d: client_row(d, "edge") is not None, "the config client listed")
    assert not by_id(drv, "clients-empty").is_displayed()
    state = client_row(drv, "edge").find_element(By.CSS_SELECTOR, ".c-state").text
    assert state == "not connected", state
    assert client_row(drv, "edge").find_element(By.CSS_SELECTOR, ".c-source").text == "config"

    proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
                  "--name", "edge"], "client")
    until(drv, lambda d: client_row(d, "edge").find_element(By.CSS_SELECTOR, ".c-state").text
          == "connected", "client row connected")
    until(drv, lambda d: row_status(d, port) == "listening", "tunnel mapping listening")
    until(drv, lambda d: by_id(d, "h-tunnel").text == "on · connected", "tunnel connected")
    assert by_id(drv, "h-clients").text == "1"
    cells = client_row(drv, "edge").find_elements(By.CSS_SELECTOR, "td")
    api_client = srv.api("GET", "/api/clients")[2]["data"]["clients"][0]
    assert cells[0].text == api_client["remote_addr"]
    assert cells[1].text.endswith("ago)"), cells[1].text

    resp = http_get_via(port, "/hello.txt")
    assert resp.endswith(http_backend.files["hello.txt"]), resp

    def counters_match_api(d):
        m = srv.mapping(port)
        shown = (row_bytes(d, port, "in")[0], row_bytes(d, port, "out")[0])
        return m["bytes_out"] >= len(resp) and shown == (m["bytes_in"], m["bytes_out"])
    until(drv, counters_match_api, "tunnel mapping counters equal the API's")

    def client_bytes_shown(d):
        shown = [td.text for td in client_row(d, "edge").find_elements(By.CSS_SELECTOR, "td")[4:6]]
        return all(re.fullmatch(r"[1-9][\d.]* (B|KiB)", t) for t in shown)
    until(drv, client_bytes_shown, "the client's bytes in and out shown in human units")
    shot(drv, "console-tunnel-wide.png")


def client_state(drv, name):
    row = client_row(drv, name)
    return row.find_element(By.CSS_SELECTOR, ".c-state").text if row else None


def hello_ok(port, name, token):
    """The HelloResponse to one Hello on a fresh tunnel connection (dict)."""
    import json
    from sec_helpers import hello, read_frame
    with connect(port) as s:
        s.sendall(hello(name, token))
        fr = read_frame(s)
    return json.loads(fr[1]) if fr else None


def test_console_clients_page(server_factory, proc_factory, browser_factory):
    """Issue 15: the Clients page lists every client, creates one (token shown once, with a
    copy button), rotates and removes it."""
    cfg_token = "config-token-0123456789"
    srv = server_factory(config={"tunnel": {"enabled": True,
                                            "clients": [{"name": "cfg", "token": cfg_token}]}})
    drv = browser_factory()
    set_viewport(drv, 1400, 900, mobile=False)
    open_console(drv, srv)
    until(drv, lambda d: client_state(d, "cfg") == "not connected", "config client listed")
    row = client_row(drv, "cfg")
    assert row.find_element(By.CSS_SELECTOR, ".c-source").text == "config"
    assert row.find_elements(By.CSS_SELECTOR, "button") == [], "buttons on a config client"

    # A bad name: the server's message, next to the form.
    fill(drv, "client-name", "b\u00fcro")
    by_id(drv, "client-create").click()
    until(drv, lambda d: by_id(d, "client-form-error").is_displayed(), "name error shown")
    assert "1-64 characters" in by_id(drv, "client-form-error").text
    assert not by_id(drv, "client-token-box").is_displayed()

    # Create: the token appears once, with a copy button.
    fill(drv, "client-name", "lab")
    by_id(drv, "client-name").send_keys(Keys.ENTER)
    until(drv, lambda d: by_id(d, "client-token-box").is_displayed(), "token shown")
    assert not by_id(drv, "client-form-error").is_displayed()
    token = by_id(drv, "client-token").get_attribute("value")
    assert len(token) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", token), token
    assert "lab" in by_id(drv, "client-token-title").text
    by_id(drv, "client-token-copy").click()
    until(drv, lambda d: by_id(d, "client-token-copy").text in ("Copied", "Press Ctrl+C"),
          "copy acknowledged")
    shot(drv, "console-client-token-wide.png")
    by_id(drv, "client-token-done").click()
    assert not by_id(drv, "client-token-box").is_displayed()
    assert by_id(drv, "client-token").get_attribute("value") == ""
    until(drv, lambda d: client_state(d, "lab") == "not connected", "new client listed")
    assert client_row(drv, "lab").find_element(By.CSS_SELECTOR, ".c-source").text == "api"

    # The token shown is the one that works.
    proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
                  "--name", "lab"], "client-lab")
    until(drv, lambda d: client_state(d, "lab") == "connected", "lab connected")

    # Rotate: a new token shown; the live session stays; the new token authenticates.
    client_row(drv, "lab").find_element(By.CSS_SELECTOR, "button.rotate").click()
    until(drv, lambda d: by_id(d, "client-dialog").is_displayed(), "rotate dialog")
    assert by_id(drv, "client-dialog-title").text == "Rotate token?"
    by_id(drv, "client-dialog-yes").click()
    until(drv, lambda d: by_id(d, "client-token-box").is_displayed(), "new token shown")
    token2 = by_id(drv, "client-token").get_attribute("value")
    assert token2 != token and len(token2) >= 32, token2
    assert "old one works until" in by_id(drv, "client-token-title").text
    assert client_state(drv, "lab") == "connected"
    assert hello_ok(srv.tunnel_port, "lab", token2)["error"] == "already_connected"
    assert hello_ok(srv.tunnel_port, "lab", token2 + "x")["error"] == "auth_failed"
    by_id(drv, "client-token-done").click()

    # Remove: confirmed in a dialog; the row goes and the client's session with it.
    client_row(drv, "lab").find_element(By.CSS_SELECTOR, "button.remove").click()
    until(drv, lambda d: by_id(d, "client-dialog").is_displayed(), "remove dialog")
    assert by_id(drv, "client-dialog-title").text == "Remove client?"
    by_id(drv, "client-dialog-yes").click()
    until(drv, lambda d: client_row(d, "lab") is None, "lab row gone")
    names = [c["name"] for c in srv.api("GET", "/api/clients")[2]["data"]["clients"]]
    assert names == ["cfg"], names
    assert srv.health()["clients"] == 0
    assert page_errors(drv) == []
    shot(drv, "console-clients-wide.png")


# ---------------------------------------------------------------------------
# 2. The server's errors next to the field they name

def test_console_form_shows_port_errors(server, http_backend, browser_factory):
    taken = free_port()
    server.create_ok(port=taken, target_ip="127.0.0.1", target_port=http_backend.port)
    drv = browser_factory()
    open_console(drv, server)
    until(drv, lambda d: mapping_row(d, taken) is not None, "existing row")

    def expect_port_error(port, target_port, want_status, want_code):
        status, body = server.create(port=port, target_ip="127.0.0.1", target_port=target_port,
                                     use_tunnel=False)
        assert (status, body["error"]) == (want_status, want_code), body
        # The form sends the same request: the message shown is the server's, by the field.
        submit_create(drv, port, "127.0.0.1", target_port)
        until(drv, lambda d: by_id(d, "err-port").is_displayed(), f"port error for {port}")
        assert by_id(drv, "err-port").text == body["message"]
        assert body["message"].startswith("port")
        assert visible_field_errors(drv) == {"err-port": body["message"]}
        port_input = by_id(drv, "f-port")
        assert port_input.get_attribute("aria-invalid") == "true"
        assert "err-port" in port_input.get_attribute("aria-describedby")
        assert drv.execute_script(
            "return document.getElementById('err-port').parentElement"
            ".contains(document.getElementById('f-port'))"), "error is not next to the port field"
        assert drv.switch_to.active_element == port_input, "focus not moved to the port field"

    expect_port_error(80, http_backend.port, 400, "port_out_of_range")     # below port_range
    expect_port_error(70000, http_backend.port, 400, "invalid_field")      # not a port at all
    expect_port_error(taken, http_backend.port, 409, "port_in_use")        # duplicate
    assert [m["port"] for m in server.list()] == [taken], "a refused create left something"

    # Another field's error goes next to that field, and the port error is cleared.
    fill(drv, "f-port", str(free_port()))
    fill(drv, "f-target-ip", "bad host!")
    by_id(drv, "f-submit").click()
    until(drv, lambda d: by_id(d, "err-target_ip").is_displayed(), "target_ip error")
    errs = visible_field_errors(drv)
    assert list(errs) == ["err-target_ip"] and errs["err-target_ip"].startswith("target_ip"), errs

    # Fixing the port makes the create go through and the errors disappear.
    good = free_port()
    submit_create(drv, good, "127.0.0.1", http_backend.port)
    until(drv, lambda d: row_status(d, good) == "listening", "good create listed")
    assert visible_field_errors(drv) == {}
    assert server.mapping(good) is not None


# ---------------------------------------------------------------------------
# 3. api.token

def test_console_token(server_factory, http_backend, browser_factory):
    srv = server_factory(config={"api": {"token": TOKEN}})
    port = free_port()
    status, _, body = srv.api("POST", "/api/mapping/create",
                              body={"port": port, "target_ip": "127.0.0.1",
                                    "target_port": http_backend.port, "name": "secret"},
                              headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 201, body
    drv = browser_factory()
    open_console(drv, srv, want="token needed")
    assert by_id(drv, "token-panel").is_displayed()
    assert not by_id(drv, "data").is_displayed()
    assert not by_id(drv, "token-error").is_displayed()
    assert mapping_row(drv, port) is None, "data shown without a token"
    assert drv.switch_to.active_element == by_id(drv, "token-input")
    shot(drv, "token-needed-wide.png")

    fill(drv, "token-input", "not-the-token")
    by_id(drv, "token-submit").click()
    until(drv, lambda d: conn_state(d) == "wrong token", "wrong-token state")
    assert by_id(drv, "token-error").is_displayed()
    assert "Wrong token" in by_id(drv, "token-error").text
    assert not by_id(drv, "data").is_displayed()
    assert mapping_row(drv, port) is None
    shot(drv, "token-wrong-wide.png")

    fill(drv, "token-input", TOKEN)
    by_id(drv, "token-input").send_keys(Keys.ENTER)
    until(drv, lambda d: conn_state(d) == "live", "live with the right token")
    until(drv, lambda d: row_status(d, port) == "listening", "data with the right token")
    assert not by_id(drv, "token-panel").is_displayed()
    assert drv.execute_script("return sessionStorage.getItem('portmux.api_token')") == TOKEN

    # Asked once: a reload in the same tab goes straight to the data.
    drv.refresh()
    until(drv, lambda d: row_status(d, port) == "listening", "data after reload")
    assert not by_id(drv, "token-panel").is_displayed()

    # The form works with the token (create goes through the Authorization header).
    other = free_port()
    submit_create(drv, other, "127.0.0.1", http_backend.port)
    until(drv, lambda d: row_status(d, other) == "listening", "create with token")


# ---------------------------------------------------------------------------
# 4. Screenshots, wide and narrow

def _drive_traffic(drv, srv, port, path, rounds):
    """Several bursts, each waited for in the table, so the sparkline has a shape."""
    for _ in range(rounds):
        before = row_bytes(drv, port, "out")[0]
        http_get_via(port, path)
        until(drv, lambda d: row_bytes(d, port, "out")[0] > before, f"traffic on {port} shown")


def test_console_screenshots(server, http_backend, browser_factory):
    ports = sorted(free_port() for _ in range(3))
    web, api_, cache = ports
    server.create_ok(port=web, target_ip="127.0.0.1", target_port=http_backend.port, name="web")
    server.create_ok(port=api_, target_ip="localhost", target_port=http_backend.port,
                     name="staging api")
    server.create_ok(port=cache, target_ip="127.0.0.1", target_port=http_backend.port,
                     name="cache")
    # A stored mapping whose port is taken at start-up shows status error with its reason.
    broken = free_port()
    server.create_ok(port=broken, target_ip="127.0.0.1", target_port=http_backend.port,
                     name="broken")
    assert server.stop() == 0
    with PortHolder(broken):
        server.start()
        wait_until(lambda: (server.mapping(broken) or {}).get("status") == "error", timeout=10,
                   desc="mapping in error")

        drv = browser_factory(1400, 900)
        set_viewport(drv, 1400, 900, mobile=False)
        open_console(drv, server)
        until(drv, lambda d: row_status(d, broken) == "error", "error row")
        err_text = mapping_row(drv, broken).find_element(By.CSS_SELECTOR, ".status-detail").text
        assert err_text and err_text == server.mapping(broken)["error"], err_text

        _drive_traffic(drv, server, web, "/blob.bin", 3)
        _drive_traffic(drv, server, api_, "/hello.txt", 2)
        assert_no_horizontal_scroll(drv)
        wide = shot(drv, "console-wide-1400x900.png")

        set_viewport(drv, 390, 844, mobile=True)
        assert_no_horizontal_scroll(drv)
        narrow = shot(drv, "console-narrow-390x844.png")
        drv.execute_script("document.getElementById('mappings').scrollIntoView()")
        shot(drv, "console-narrow-390x844-mappings.png")
        # The create form's fields stack, the Remove buttons stay reachable.
        btn = mapping_row(drv, web).find_element(By.CSS_SELECTOR, "button.remove")
        assert btn.is_displayed() and btn.size["width"] > 40
    for path, size in ((wide, (1400, 900)), (narrow, (390, 844))):
        assert png_size(path) == size, (path, png_size(path))


def png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def assert_no_horizontal_scroll(drv):
    sw, iw = drv.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]")
    assert sw <= iw, f"page is {sw}px wide in a {iw}px window"


# ---------------------------------------------------------------------------
# Mapping policy (issue 16): the create form's new fields, refused counts, disabled state,
# edit in place and the enable/disable toggle -- each checked against the API.

def test_console_policy_edit_and_toggle(server, http_backend, browser_factory):
    from selenium.webdriver.support.ui import Select
    drv = browser_factory()
    open_console(drv, server)
    port = free_port()
    fill(drv, "f-allow-from", "127.0.0.2\n10.0.0.0/8")
    Select(by_id(drv, "f-proxy-protocol")).select_by_value("v2")
    fill(drv, "f-max-connections", "5")
    fill(drv, "f-rate-limit", "1000000")
    submit_create(drv, port, "127.0.0.1", http_backend.port, name="guarded")
    until(drv, lambda d: row_status(d, port) == "listening", f"row {port} listening")
    m = server.mapping(port)
    assert (m["allow_from"], m["proxy_protocol"], m["max_connections"], m["rate_limit"]) == \
        (["127.0.0.2/32", "10.0.0.0/8"], "v2", 5, 1000000), m
    policy = mapping_row(drv, port).find_element(By.CSS_SELECTOR, ".c-policy").text
    assert "127.0.0.2/32" in policy and "PROXY v2" in policy and "max 5" in policy, policy
    assert by_id(drv, "f-allow-from").get_attribute("value") == "", "form not reset"
    assert by_id(drv, "f-enabled").is_selected(), "form reset left Enabled unchecked"

    # A connection from outside allow_from is refused; the table counts it as the API does.
    try:  # the reset may come while connect() returns, or on the first read
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(1) == b""
    except ConnectionResetError:
        pass

    def refused_shown(d):
        td = mapping_row(d, port).find_element(By.CSS_SELECTOR, ".c-refused")
        return td.text == "1" == str(server.mapping(port)["refused_connections"])
    until(drv, refused_shown, "refused count 1 in the table")

    # Edit in place: open on the row, change fields, save; the API has them at once.
    mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.edit").click()
    dialog = by_id(drv, "edit-dialog")
    until(drv, lambda d: dialog.get_attribute("open") is not None, "edit dialog open")
    assert by_id(drv, "e-allow-from").get_attribute("value") == "127.0.0.2/32\n10.0.0.0/8"
    assert by_id(drv, "e-max-connections").get_attribute("value") == "5"
    fill(drv, "e-allow-from", "")
    Select(by_id(drv, "e-proxy-protocol")).select_by_value("none")
    fill(drv, "e-rate-limit", "abc")
    by_id(drv, "edit-save").click()
    until(drv, lambda d: by_id(d, "eerr-rate_limit").is_displayed(), "rate_limit error shown")
    assert by_id(drv, "eerr-rate_limit").text.startswith("rate_limit")
    assert server.mapping(port)["allow_from"] != [], "a refused update changed the mapping"
    fill(drv, "e-rate-limit", "0")
    fill(drv, "e-name", "open now")
    by_id(drv, "edit-save").click()
    until(drv, lambda d: dialog.get_attribute("open") is None, "edit dialog closed")
    m = server.mapping(port)
    assert (m["allow_from"], m["proxy_protocol"], m["rate_limit"], m["name"]) == \
        ([], "none", 0, "open now"), m
    resp = http_get_via(port, "/blob.bin")
    assert resp.endswith(http_backend.files["blob.bin"])

    # Toggle: disabled in the API, shown as such, the port closed; then enabled again.
    toggle = mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.toggle")
    assert toggle.text == "Disable"
    toggle.click()
    until(drv, lambda d: row_status(d, port) == "disabled", "row disabled")
    assert server.mapping(port)["enabled"] is False
    assert "is-disabled" in mapping_row(drv, port).get_attribute("class")
    assert connect_refused(port), "a disabled mapping still accepts connections"
    shot(drv, "policy-disabled.png")
    mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.toggle").click()
    until(drv, lambda d: row_status(d, port) == "listening", "row enabled again")
    assert server.mapping(port)["enabled"] is True
    assert http_get_via(port, "/blob.bin").endswith(http_backend.files["blob.bin"])


def test_console_edit_sends_only_what_changed(server, browser_factory):
    """Renaming a mapping in the edit dialog changes its name and nothing else: the
    default max_connections the list shows is not pinned into the mapping, and a change
    made through the API while the dialog was open is not undone."""
    drv = browser_factory()
    open_console(drv, server)
    port = free_port()
    server.create_ok(port=port, target_ip="127.0.0.1", target_port=9, name="before")
    until(drv, lambda d: row_status(d, port) == "listening", f"row {port} listening")
    mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.edit").click()
    dialog = by_id(drv, "edit-dialog")
    until(drv, lambda d: dialog.get_attribute("open") is not None, "edit dialog open")
    # Meanwhile, elsewhere: allow_from tightened through the API.
    status, _, body = server.api("POST", "/api/mapping/update",
                                 body={"port": port, "allow_from": ["10.0.0.0/8"]})
    assert status == 200, body
    fill(drv, "e-name", "after")
    by_id(drv, "edit-save").click()
    until(drv, lambda d: dialog.get_attribute("open") is None, "edit dialog closed")
    m = server.mapping(port)
    assert m["name"] == "after" and m["allow_from"] == ["10.0.0.0/8"], m
    stored = sqlite(server.db_path, f"SELECT max_connections FROM mappings WHERE port={port}")
    assert stored == [["0"]], f"the default max_connections was pinned: {stored}"
    # A save with nothing changed sends nothing.
    mapping_row(drv, port).find_element(By.CSS_SELECTOR, "button.edit").click()
    until(drv, lambda d: dialog.get_attribute("open") is not None, "edit dialog open again")
    by_id(drv, "edit-save").click()
    until(drv, lambda d: dialog.get_attribute("open") is None, "edit dialog closed again")
    assert server.mapping(port)["name"] == "after"


def test_console_public_address_range_client_state_directions(server_factory, proc_factory,
                                                              http_backend, browser_factory):
    """Issue 17: each mapping shows where the public connects (this page's host + the port),
    the port field shows port_range, a tunnel mapping says whether its own client is
    connected, a failed dial's reason is shown, and both tables name the traffic directions
    the same way (to target / from target), with the same numbers for one tunnel."""
    token = "console-direction-token"
    lo, hi = sorted(free_port() for _ in range(2))
    srv = server_factory(config={
        "port_range": {"from": 1024, "end": 65535},
        "tunnel": {"enabled": True, "clients": [{"name": "edge", "token": token},
                                                {"name": "idle", "token": token + "-2"}]}})
    drv = browser_factory()
    set_viewport(drv, 1400, 900, mobile=False)
    open_console(drv, srv)
    until(drv, lambda d: by_id(d, "port-range").text == "range 1024–65535",
          "the port range hint")
    srv.create_ok(port=lo, target_port=http_backend.port, use_tunnel=True, client="edge")
    srv.create_ok(port=hi, target_port=http_backend.port, use_tunnel=True, client="idle")
    until(drv, lambda d: mapping_row(d, lo) and mapping_row(d, hi), "both rows")
    for port in (lo, hi):
        addr = mapping_row(drv, port).find_element(By.CSS_SELECTOR, ".public-addr").text
        assert addr == f"127.0.0.1:{port}", addr

    def client_state_of(d, port):
        return mapping_row(d, port).find_element(By.CSS_SELECTOR, ".c-client .client-state").text
    assert client_state_of(drv, lo) == "not connected"
    # A dial while edge is away: its reason shows under the status.
    with connect(lo) as s:
        s.settimeout(10)
        try:
            assert s.recv(1) == b""
        except ConnectionResetError:
            pass
    until(drv, lambda d: mapping_row(d, lo).find_element(By.CSS_SELECTOR, ".status-detail").text
          == 'last failed dial: client "edge" not connected', "the failed dial's reason")

    proc_factory([CLIENT_BIN, "--server", f"127.0.0.1:{srv.tunnel_port}", "--token", token,
                  "--name", "edge"], "client")
    until(drv, lambda d: client_state_of(d, lo) == "connected", "edge connected on its row")
    # Another client's mapping still says its own client is away, though the tunnel is up.
    assert client_state_of(drv, hi) == "not connected"
    resp = http_get_via(lo, "/blob.bin")
    assert resp.endswith(http_backend.files["blob.bin"])

    def heads_of(table):
        return [th.get_attribute("textContent").strip()
                for th in drv.find_elements(By.CSS_SELECTOR, f"#{table} thead th")]
    heads, cheads = heads_of("mappings-table"), heads_of("clients-table")
    assert heads.index("To target") + 1 == heads.index("From target"), heads
    assert cheads.index("To target") + 1 == cheads.index("From target"), cheads

    def same_numbers(d):
        # One tunnel, one mapping that carried bytes: both rows read alike.
        to_m = mapping_row(d, lo).find_element(By.CSS_SELECTOR, ".c-bytes-in").text
        from_m = mapping_row(d, lo).find_element(By.CSS_SELECTOR, ".c-bytes-out").text
        row = client_row(d, "edge")
        to_c = row.find_element(By.CSS_SELECTOR, ".c-to-target").text
        from_c = row.find_element(By.CSS_SELECTOR, ".c-from-target").text
        m = srv.mapping(lo)
        return (m["active_connections"] == 0 and (to_m, from_m) == (to_c, from_c)
                and from_m != "0 B")
    until(drv, same_numbers, "the two tables' directions to agree")
