#!/usr/bin/env python3
"""Fails when the modules under src/ include each other in a circle.

A module is a file's path without its extension (src/server/mapping.c and mapping.h are
one module, src/server/mapping). Module A depends on module B when A's .c or .h includes
B's header with #include "...". Headers are found as the compiler finds them: next to the
including file first, then in src/common (every target's include path). A header without
a .c of its own (types only, like server.h) is a module too, with the includes it makes.

Every strongly connected component of more than one module is a circle: it is printed
with one concrete cycle through it, and the exit status is 1. Exit 0 when there is none.

    scripts/check-includes.py [SRC_DIR]      (default: src next to this script's parent)
    scripts/check-includes.py --self-test    (the check finds a planted circle, and only it)
"""
import os
import re
import sys

INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def modules(src):
    """{module: [files]} for every .c and .h under src."""
    mods = {}
    for root, _, files in os.walk(src):
        for f in sorted(files):
            if f.endswith((".c", ".h")):
                path = os.path.join(root, f)
                mods.setdefault(os.path.splitext(path)[0], []).append(path)
    return mods


def resolve(src, including, name):
    for d in (os.path.dirname(including), os.path.join(src, "common")):
        p = os.path.normpath(os.path.join(d, name))
        if os.path.exists(p):
            return p
    return None  # a generated or system-style header: not one of our modules


def graph(src):
    mods = modules(src)
    edges = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            with open(f, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
            for name in INCLUDE.findall(text):
                p = resolve(src, f, name)
                if p is None:
                    continue
                dep = os.path.splitext(p)[0]
                if dep != m and dep in edges:
                    edges[m].add(dep)
    return edges


def sccs(edges):
    """Tarjan's algorithm, iterative: the components with more than one module."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def one_cycle(edges, comp):
    """A concrete circle through the component's first module, for the message."""
    members, first = set(comp), comp[0]
    prev, frontier = {first: None}, [first]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == first:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [first]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def self_test():
    """Plants a circle (server/a.c -> b.h, b.h -> a.h via a types-free path) in a scratch
    tree and checks it is reported; then breaks it and checks the tree passes."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for d in ("common", "server"):
            os.makedirs(os.path.join(tmp, d))
        files = {
            "common/log.h": "",
            "server/a.h": '#include "log.h"\n',
            "server/a.c": '#include "a.h"\n#include "b.h"\n',
            "server/b.h": "",
            "server/b.c": '#include "b.h"\n#include "a.h"\n',
        }
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        found = sccs(graph(tmp))
        want = [[os.path.join(tmp, "server/a"), os.path.join(tmp, "server/b")]]
        if found != want:
            print(f"self-test: planted circle not found as {want}: {found}", file=sys.stderr)
            return 1
        with open(os.path.join(tmp, "server/b.c"), "w") as f:
            f.write('#include "b.h"\n#include "log.h"\n')
        found = sccs(graph(tmp))
        if found:
            print(f"self-test: a circle reported where none is: {found}", file=sys.stderr)
            return 1
    print("check-includes self-test: ok")
    return 0


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "src"))
    if not os.path.isdir(src):
        print(f"check-includes: {src} is not a directory", file=sys.stderr)
        return 2
    edges = graph(src)
    circles = sccs(edges)
    rel = lambda m: os.path.relpath(m, src)
    for comp in circles:
        print("include circle: " + " -> ".join(rel(m) for m in one_cycle(edges, comp)),
              file=sys.stderr)
        print("  (modules in it: " + ", ".join(rel(m) for m in comp) + ")", file=sys.stderr)
    if circles:
        return 1
    print(f"check-includes: {len(edges)} modules, no include circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
