"""Man pages and bash completion (issue 17): man/*.{1,8} render without warnings under
groff (and mandoc's lint when installed), every flag a binary's --help lists is in its
page, and completions/portmux.bash completes the three commands."""
import os
import re
import shutil
import subprocess

import pytest

from conftest import BUILD_DIR, SOURCE_DIR, run_once

PAGES = {"portmux-server": SOURCE_DIR / "man/portmux-server.8",
         "portmux-client": SOURCE_DIR / "man/portmux-client.1",
         "portmux-ctl": SOURCE_DIR / "man/portmux-ctl.1"}
COMPLETION = SOURCE_DIR / "completions/portmux.bash"
ENV = dict(os.environ, LC_ALL="C.UTF-8", MANWIDTH="80")


@pytest.mark.skipif(not shutil.which("groff"), reason="groff (groff-base) missing")
@pytest.mark.parametrize("name", PAGES)
def test_page_renders_without_warnings(name):
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rCHECKSTYLE=3", str(PAGES[name])],
                       capture_output=True, env=ENV, timeout=30)
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    text = re.sub(r".\x08", "", r.stdout.decode())
    assert "NAME" in text and "SYNOPSIS" in text and "EXIT STATUS" in text, text[:400]


@pytest.mark.skipif(not shutil.which("man"), reason="man (man-db) missing")
@pytest.mark.parametrize("name", PAGES)
def test_man_l_shows_the_page(name):
    r = subprocess.run(["man", "--warnings", "-l", str(PAGES[name])], capture_output=True,
                       env=ENV, timeout=30)
    assert r.returncode == 0 and r.stderr == b"", r.stderr.decode()
    assert name in r.stdout.decode()


@pytest.mark.skipif(not shutil.which("mandoc"), reason="mandoc missing")
@pytest.mark.parametrize("name", PAGES)
def test_mandoc_lint_clean(name):
    r = subprocess.run(["mandoc", "-T", "lint", "-W", "warning", str(PAGES[name])],
                       capture_output=True, env=ENV, timeout=30)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


@pytest.mark.parametrize("name", PAGES)
def test_page_documents_every_flag(name):
    binary = BUILD_DIR / name
    if not binary.exists():
        pytest.skip(f"{binary} not built")
    out = run_once([binary, "--help"]).stdout.decode()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", out))
    page = PAGES[name].read_text().replace("\\-", "-")
    missing = sorted(f for f in flags if f not in page)
    assert flags and not missing, f"{name}(1/8) lacks {missing}"


def complete(line):
    """What bash completion offers for the command line `line` (cursor at its end)."""
    script = f"""
source {COMPLETION}
COMP_LINE={line!r}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ $COMP_LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
fn=$(complete -p "${{COMP_WORDS[0]}}" | sed -E 's/.*-F ([^ ]+).*/\\1/')
$fn
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(["bash", "--norc", "-c", script], capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr.decode()
    return set(r.stdout.decode().split())


def test_bash_completion():
    assert complete("portmux-ctl ") >= {"mapping", "client", "health"}
    assert complete("portmux-ctl --json mapping ") == {"add", "list", "update", "rm"}
    assert complete("portmux-ctl client ") == {"add", "list", "rotate", "rm"}
    assert "--target-port" in complete("portmux-ctl mapping add --port 10022 --")
    assert complete("portmux-ctl mapping add --proxy-protocol ") == {"none", "v1", "v2"}
    assert complete("portmux-server --log-level ") == {"debug", "info", "warn", "error"}
    assert "--allow" in complete("portmux-client --")
    assert "--config" in complete("portmux-server --")
