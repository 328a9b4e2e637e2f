#!/usr/bin/env python3
"""Process-tree helpers for peers.sh (copied from the shared peer harness).
  proc.py tree ROOT...   -> PIDs of ROOTs and all descendants (one per line)
  proc.py cpu  ROOT...   -> CPU seconds (utime+stime+cutime+cstime) summed over the trees
  proc.py mem  ROOT...   -> "RSS_KB PSS_KB NPROC" summed over the trees
"""
import os, sys

def stat(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0]=state, rest[1]=ppid, utime=rest[11], stime=rest[12], cutime=rest[13], cstime=rest[14]
    return int(rest[1]), [int(x) for x in rest[11:15]]

def tree(roots):
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = stat(d)
            if st:
                children.setdefault(st[0], []).append(int(d))
    out, todo = [], [int(r) for r in roots if os.path.exists(f"/proc/{r}")]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo.extend(children.get(p, []))
    return out

def field(pid, fname, key):
    try:
        with open(f"/proc/{pid}/{fname}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

cmd, roots = sys.argv[1], sys.argv[2:]
pids = tree(roots)
if cmd == "tree":
    print("\n".join(map(str, pids)))
elif cmd == "cpu":
    tck = os.sysconf("SC_CLK_TCK")
    tot = 0
    for p in pids:
        st = stat(p)
        if st:
            tot += sum(st[1])
    print(f"{tot / tck:.2f}")
elif cmd == "mem":
    rss = sum(field(p, "status", "VmRSS:") for p in pids)
    pss = sum(field(p, "smaps_rollup", "Pss:") for p in pids)
    print(rss, pss, len(pids))
