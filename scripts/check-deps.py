#!/usr/bin/python3
"""Checks that every outside program the project's tests, benchmarks and scripts run comes
from a Debian package that scripts/install-deps.sh installs (or an Essential/required one).

    scripts/check-deps.py [-v]        (make check-deps; run by .ci/run after install-deps)

It reads tests/, bench/ and scripts/ and collects the programs they start:
  * Python: the first element of a subprocess argument list (run/Popen/check_output/call
    ...(["prog", ...])), shutil.which("prog"), and absolute paths such as "/usr/sbin/sshd";
  * shell: the command word of each simple command (after ;, &&, ||, |, $(, `, then, do,
    and prefixes such as timeout N, exec, nohup, env, sudo), heredoc bodies skipped.
For each program it finds the executable (PATH, /usr/sbin, /sbin), asks `dpkg -S` which
package ships it, and fails, naming the program, the file that runs it and the package,
when that package is in none of the lists. A program that is not installed at all fails
too: on a machine where install-deps has run, that means no list brings it.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCAN_DIRS = ["tests", "bench", "scripts"]
INSTALL_DEPS = ROOT / "scripts" / "install-deps.sh"
# Debian's programs first: tests run /usr/bin/python3 even where another python3 is first.
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:" + os.environ.get("PATH", "")

# Shell words in command position that are not outside programs.
SHELL_WORDS = set("""
    if then else elif fi for while until do done case esac in function select time
    return exit break continue local export readonly declare typeset unset shift set
    eval exec source . : true false test [ [[ ]] ] echo printf read cd pwd pushd popd
    wait kill trap command type hash builtin let alias ulimit umask getopts jobs fg bg
    compgen disown shopt mapfile readarray enable logout caller help history suspend times
""".split())
# Prefixes whose argument is itself a command.
PREFIXES = {"timeout", "exec", "nohup", "env", "sudo", "nice", "setsid", "stdbuf",
            "taskset", "chrt", "ionice", "prlimit", "runuser", "xargs", "command"}
PROGRAM_RE = re.compile(r"^[a-z][a-z0-9_.+-]*$")

PY_CALL_RE = re.compile(
    r"(?:run|Popen|check_output|check_call|call|run_once|getoutput)\(\s*\[\s*[rbf]?[\"']([^\"'\s]+)[\"']")
PY_WHICH_RE = re.compile(r"which\(\s*[\"']([^\"'\s]+)[\"']")
ABS_PATH_RE = re.compile(r"[\"'](/(?:usr/)?s?bin/[A-Za-z0-9_.+-]+)[\"']")


def py_programs(text):
    """(program, line) pairs named by a Python file."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        for rx in (PY_CALL_RE, PY_WHICH_RE, ABS_PATH_RE):
            for m in rx.finditer(code):
                found.append((m.group(1), lineno))
    return found


def _blank_quotes(text):
    """Replaces quoted text (messages, patterns, inline python/awk) and comments by blanks,
    keeping newlines so line numbers hold. A double-quoted string that holds a command, as
    in cmd="exec prog args", keeps its text: that text is run later."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            out.append(text[i:i + 2])
            i += 2
        elif c == "'":
            j = text.find("'", i + 1)
            j = n if j < 0 else j
            out.append("''" + "\n" * text.count("\n", i, j))
            i = j + 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            body = text[i + 1:j]
            if re.match(r"(exec|timeout|nohup) ", body):
                out.append(" ; " + body + " ; ")
            else:
                out.append('""' + "\n" * body.count("\n"))
            i = j + 1
        elif c == "#" and (i == 0 or text[i - 1] in " \t\n;"):
            j = text.find("\n", i)
            i = n if j < 0 else j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _drop_heredocs(text):
    lines, out, end = text.split("\n"), [], None
    for line in lines:
        if end is not None:
            out.append("")
            if line.strip() == end:
                end = None
            continue
        m = re.search(r"<<-?\s*['\"]?([A-Za-z_]+)['\"]?", line)
        if m:
            end = m.group(1)
        out.append(line)
    return "\n".join(out)


def _drop_arrays_and_case_labels(text):
    # arr=(a b c) and arr+=(…), possibly over several lines: words, not commands
    text = re.sub(r"[A-Za-z_][A-Za-z0-9_]*\+?=\(([^)]*)\)",
                  lambda m: "\n" * m.group(0).count("\n"), text)
    # case labels: "in a|b)" and ";; a|b)" and a label starting a line
    text = re.sub(r"\bin[ \t]+[^\s()]+\)", "in ;", text)
    text = re.sub(r";;[ \t]*[^\s()]+\)", ";;", text)
    text = re.sub(r"(?m)^[ \t]*[^\s()=]+\)(?=\s|$)", " ", text)
    # arithmetic is not a command
    return re.sub(r"\$\(\([^\n]*?\)\)", "0", text)


def sh_functions(text):
    return set(re.findall(r"^\s*(?:function\s+)?([A-Za-z_][A-Za-z0-9_-]*)\s*\(\)", text, re.M))


def sourced_functions(path, text):
    """Functions of the files a script sources from its own directory (`. "$BENCH/lib.sh"`,
    `source lib.sh`): called there, they are not programs."""
    names = set()
    for rel in re.findall(r"^\s*(?:\.|source)\s+\"?(?:\$\{?\w+\}?/)?([\w.-]+\.(?:sh|bash))\"?",
                          text, re.M):
        lib = path.parent / rel
        if lib.is_file():
            names |= sh_functions(lib.read_text())
    return names


def sh_programs(text, known=frozenset()):
    """(program, line) pairs named by a shell script: each simple command's first word.
    known: functions it gets from elsewhere (sourced files)."""
    found = []
    functions = sh_functions(text) | set(known)
    text = _drop_arrays_and_case_labels(_blank_quotes(_drop_heredocs(text)))
    text = re.sub(r"\$\{[^}\n]*\}", "X", text)                 # ${var:-a|b}
    text = re.sub(r"\\\n", lambda m: " ", text)                 # continuation lines

    for lineno, line in enumerate(text.split("\n"), 1):
        for seg in re.split(r"\|\||&&|[;|&`(){}]|\$\(|\bthen\b|\bdo\b|\belse\b|\bif\b|\bwhile\b|\buntil\b|!", line):
            words = seg.split()
            i = 0
            while i < len(words):
                w = words[i]
                if re.match(r"^[A-Za-z_][A-Za-z0-9_]*\+?=", w):
                    i += 1
                    continue
                if w in PREFIXES:
                    i += 1
                    # skip the prefix's own options and numeric arguments
                    while i < len(words) and (words[i].startswith("-") or re.match(r"^[0-9.]+[smhd]?$", words[i])):
                        i += 1
                    continue
                break
            if i >= len(words):
                continue
            w = words[i]
            if re.match(r"^/(usr/)?s?bin/", w):
                found.append((w, lineno))
                continue
            if w in SHELL_WORDS or w in functions or not PROGRAM_RE.match(w) or w.startswith("portmux"):
                continue
            found.append((w, lineno))
    return found


def is_shell(path, text):
    return path.suffix in (".sh", ".bash") or text.startswith("#!/bin/sh") or \
        text.startswith("#!/usr/bin/env bash") or text.startswith("#!/bin/bash")


def collect():
    uses = {}
    for d in SCAN_DIRS:
        for path in sorted((ROOT / d).rglob("*")):
            if not path.is_file() or "corpus" in path.parts or "__pycache__" in path.parts \
                    or path.resolve() == Path(__file__).resolve():
                continue
            try:
                text = path.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            if path.suffix == ".py" or text.startswith("#!/usr/bin/python") or \
                    text.startswith("#!/usr/bin/env python"):
                pairs = py_programs(text)
            elif is_shell(path, text):
                pairs = sh_programs(text, sourced_functions(path, text))
            else:
                continue
            rel = path.relative_to(ROOT)
            for prog, lineno in pairs:
                uses.setdefault(prog, []).append(f"{rel}:{lineno}")
    return uses


def listed_packages():
    """The packages install-deps.sh installs: its sets' apt-get commands (`--list all`)."""
    r = subprocess.run(["bash", str(INSTALL_DEPS), "--list", "all"], capture_output=True,
                       text=True, check=True)
    return set(r.stdout.split())


def package_of(path):
    """The package shipping path (following symlinks such as /etc/alternatives), or None."""
    cands = [path, os.path.realpath(path)]
    for c in list(cands):  # merged /usr: /bin/x is /usr/bin/x
        if c.startswith("/usr/"):
            cands.append(c[4:])
        else:
            cands.append("/usr" + c)
    for c in cands:
        r = subprocess.run(["dpkg-query", "-S", c], capture_output=True, text=True)
        for line in r.stdout.splitlines() if r.returncode == 0 else []:
            if not line.startswith("diversion "):
                return line.split(":", 1)[0].split(",")[0].strip()
    return None


def depends_of(pkg):
    """The packages pkg depends on directly (alternatives included)."""
    r = subprocess.run(["dpkg-query", "-W", "-f=${Depends},${Pre-Depends}", pkg],
                       capture_output=True, text=True)
    names = set()
    for alt in re.split(r"[,|]", r.stdout if r.returncode == 0 else ""):
        word = alt.strip().split(" ", 1)[0].split(":", 1)[0]
        if word:
            names.add(word)
    return names


def is_base_package(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Essential} ${Priority}", pkg],
                       capture_output=True, text=True)
    fields = r.stdout.split()
    return r.returncode == 0 and ("yes" in fields or "required" in fields)


def main():
    verbose = "-v" in sys.argv[1:]
    uses = collect()
    listed = listed_packages()
    # A package that a listed one depends on directly comes with it (python3 -> python3-minimal).
    pulled = set().union(*(depends_of(p) for p in listed))
    failures = []
    for prog in sorted(uses):
        where = ", ".join(uses[prog][:3]) + (" …" if len(uses[prog]) > 3 else "")
        exe = prog if prog.startswith("/") and os.access(prog, os.X_OK) else \
            shutil.which(prog, path=SEARCH_PATH)
        if exe is None:
            failures.append(f"{prog}: not installed (run in {where}); add the Debian package "
                            f"that provides it to the test or bench set in scripts/install-deps.sh")
            continue
        pkg = package_of(exe)
        if pkg is None:
            failures.append(f"{prog}: {exe} belongs to no Debian package (run in {where})")
        elif pkg in listed or pkg in pulled or is_base_package(pkg):
            if verbose:
                print(f"ok   {prog:<18} {pkg:<22} {where}")
        else:
            failures.append(f"{prog}: package {pkg} is not in scripts/install-deps.sh "
                            f"(run in {where})")
    for f in failures:
        print(f"check-deps: {f}", file=sys.stderr)
    if failures:
        return 1
    print(f"check-deps: {len(uses)} programs, each from a listed or essential package")
    return 0


if __name__ == "__main__":
    sys.exit(main())
