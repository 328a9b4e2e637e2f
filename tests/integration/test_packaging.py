"""Install and packaging (issue 17): the .deb that `make package` (CPack) builds.

Installing it with `dpkg -i` would change this machine (the tests run as root), so the
package is built from the build tree into a temp dir, inspected with `dpkg-deb -I/-c`,
unpacked with `dpkg-deb -x`, and its binaries run from the unpacked /usr/bin: a server on
free loopback ports answers the unpacked portmux-ctl. The systemd units pass
`systemd-analyze verify` with ExecStart pointed at the unpacked binaries."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import BUILD_DIR, Server, free_port, run_once

pytestmark = pytest.mark.skipif(
    not shutil.which("cpack") or not shutil.which("dpkg-deb") or
    not (BUILD_DIR / "CPackConfig.cmake").exists(),
    reason="needs cpack, dpkg-deb and a configured build tree")

BINARIES = ("portmux-server", "portmux-client", "portmux-ctl")


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """(path of the .deb, directory it was unpacked into)."""
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(["cpack", "-G", "DEB", "--config", str(BUILD_DIR / "CPackConfig.cmake"),
                        "-B", str(out)], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    debs = list(out.glob("portmux_*.deb"))
    assert len(debs) == 1, list(out.iterdir())
    root = out / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True, timeout=60)
    return debs[0], root


def dpkg_deb(*args):
    r = subprocess.run(["dpkg-deb", *map(str, args)], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout.decode()


def test_control_dependencies_and_postinst(deb, tmp_path):
    path, _ = deb
    control = dpkg_deb("-f", path)
    assert re.search(r"^Package: portmux$", control, re.M), control
    depends = re.search(r"^Depends: (.*)$", control, re.M).group(1)
    for lib in ("adduser", "libevent-2.1", "libmicrohttpd", "libjansson", "libsqlite3",
                "libyaml", "libssl"):
        assert lib in depends, depends
    info = dpkg_deb("-I", path)
    assert re.search(r"\bpostinst\b", info), info
    ctrl = tmp_path / "control"
    dpkg_deb("-e", path, ctrl)
    postinst = (ctrl / "postinst").read_text()
    assert "adduser --system --group" in postinst and " portmux" in postinst, postinst
    assert (ctrl / "postinst").stat().st_mode & 0o111, "postinst is not executable"
    assert subprocess.run(["sh", "-n", str(ctrl / "postinst")]).returncode == 0


def test_files_in_place(deb):
    _, root = deb
    for b in BINARIES:
        assert (root / "usr/bin" / b).stat().st_mode & 0o111, b
    for f in ("usr/lib/systemd/system/portmux-server.service",
              "usr/lib/systemd/system/portmux-client.service",
              "usr/share/man/man8/portmux-server.8", "usr/share/man/man1/portmux-client.1",
              "usr/share/man/man1/portmux-ctl.1", "usr/share/portmux/config.yaml.example",
              "usr/share/doc/portmux/README.md", "usr/share/doc/portmux/API.md",
              "usr/share/doc/portmux/PROTOCOL.md"):
        assert (root / f).is_file(), f
    for b in BINARIES:
        assert (root / "usr/share/bash-completion/completions" / b).is_file(), b
    server = (root / "usr/lib/systemd/system/portmux-server.service").read_text()
    client = (root / "usr/lib/systemd/system/portmux-client.service").read_text()
    assert "ExecStart=/usr/bin/portmux-server " in server, server
    assert "User=portmux" in server and "ExecReload=" in server, server
    assert "ExecStart=/usr/bin/portmux-client " in client, client
    assert re.search(r"^RestartPreventExitStatus=2$", client, re.M), client
    # Hardening: files they create are theirs alone, and secrets stay off command lines
    # (the client's token in PORTMUX_TOKEN; the server's in an EnvironmentFile).
    for unit in (server, client):
        assert re.search(r"^UMask=0077$", unit, re.M) and "ProtectProc=invisible" in unit, unit
    assert re.search(r"^EnvironmentFile=-/etc/portmux/portmux.env$", server, re.M), server
    example = [ln for ln in client.splitlines() if "PORTMUX_CLIENT_ARGS=" in ln]
    assert example and all("--token" not in ln for ln in example), example
    assert "PORTMUX_TOKEN=" in client, client


def test_binaries_run_from_the_package(deb, tmp_path, logs):
    _, root = deb
    bindir = root / "usr/bin"
    for b in BINARIES:
        r = run_once([bindir / b, "--version"])
        assert r.returncode == 0 and r.stdout.decode().startswith(b + " "), (b, r)
    srv = Server(tmp_path / "pkg-server", name="pkg-server")
    srv.proc.args[0] = str(bindir / "portmux-server")
    logs.append(srv)
    srv.start()
    port = free_port()
    ctl = [bindir / "portmux-ctl", "--api", f"http://127.0.0.1:{srv.api_port}"]
    r = run_once(ctl + ["mapping", "add", "--port", port, "--target-ip", "127.0.0.1",
                        "--target-port", "9"])
    assert r.returncode == 0, r.stderr
    r = run_once(ctl + ["--json", "health"])
    assert r.returncode == 0 and '"mappings": 1' in r.stdout.decode(), r
    assert srv.stop() == 0


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_units_pass_systemd_analyze_verify(deb, tmp_path):
    _, root = deb
    units = []
    for name in ("portmux-server.service", "portmux-client.service"):
        text = (root / "usr/lib/systemd/system" / name).read_text()
        # verify checks that ExecStart exists: point it at the unpacked binaries.
        (tmp_path / name).write_text(text.replace("/usr/bin/", f"{root}/usr/bin/"))
        units.append(str(tmp_path / name))
    r = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                       timeout=60)
    out = r.stdout.decode() + r.stderr.decode()
    assert r.returncode == 0 and out.strip() == "", out


def test_make_install_into_destdir(tmp_path):
    """What `make install` runs: cmake --install, here into a DESTDIR."""
    dest = tmp_path / "dest"
    r = subprocess.run(["cmake", "--install", str(BUILD_DIR), "--prefix", "/opt/pm"],
                       capture_output=True, timeout=120, env={**os.environ, "DESTDIR": str(dest)})
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    root = dest / "opt/pm"
    for b in BINARIES:
        assert run_once([root / "bin" / b, "--version"]).returncode == 0, b
    unit = (root / "lib/systemd/system/portmux-server.service").read_text()
    assert "ExecStart=/opt/pm/bin/portmux-server " in unit, unit
    assert (root / "share/man/man1/portmux-ctl.1").is_file()
    assert (root / "share/bash-completion/completions/portmux-ctl").is_file()
