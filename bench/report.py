#!/usr/bin/env python3
"""Markdown report of a bench run: the forwarder table (medians, and min–max over the
repetitions beside each), the issue's targets as ratios against the peers measured in the same
run (met / missed), the control plane, and the latency bench (bench/latency.sh).

  report.py [--peers results-peers.tsv] [--control results-control.tsv] [--machine machine.txt]
            [--peers-only] [--check portmux-direct,portmux-tunnel]
            [--latency results-latency.tsv] [--check-latency]
            [--latency-link latency-1000mbit/results-latency.tsv --link-rate 1000]

--check: exit 1 when a listed forwarder (or the control plane, when given) is broken: a
measurement missing, zero throughput, HTTP errors over 1 % of requests, held connections that
did not all go through, a failed create/restore/client. --check-latency: exit 1 when a portmux
path of the latency bench is broken (no throughput, a GET that failed) or the delay line does
not delay (a time to first byte shorter than the round trip). --latency-link: the same tables
for latency.sh --rate (the delay line is also a link of --link-rate Mbit/s), checked alike.
Slowness never fails a check."""
import argparse, csv, math, sys


def num(v):
    try:
        x = float(v)
        return None if math.isnan(x) else x
    except (TypeError, ValueError):
        return None


def load_peers(path):
    rows = {}
    try:
        with open(path) as f:
            for r in csv.DictReader(f, delimiter="\t"):
                rows[r["fwd"]] = r  # the last run of a forwarder wins
    except FileNotFoundError:
        pass
    return rows


def load_control(path):
    d = {}
    if path:
        try:
            with open(path) as f:
                for line in f:
                    k, _, v = line.rstrip("\n").partition("\t")
                    d[k] = v
        except FileNotFoundError:
            pass
    return d


def nconns(rows):
    ns = set()
    for r in rows.values():
        for k in r:
            if k and k.startswith("kb_per_conn_rss_"):
                ns.add(int(k.rsplit("_", 1)[1]))
    return sorted(ns)


def fmt(x, nd=2):
    if x is None:
        return "n/a"
    if abs(x) >= 1000:
        return f"{x:.0f}"
    return f"{x:.{nd}f}"


def reps(v):
    """The numbers of a comma-separated list of repetitions (NA left out)."""
    return [x for x in (num(p) for p in (v or "").split(",")) if x is not None]


def spread(r, key, nd=2):
    """A median cell with the repetitions' min–max beside it (peers.sh writes KEY_reps)."""
    cell = fmt(num(r.get(key)), nd)
    xs = reps(r.get(key + "_reps"))
    if len(xs) > 1 and cell != "n/a":
        cell += f" ({fmt(min(xs), nd)}–{fmt(max(xs), nd)})"
    return cell


def peers_table(rows):
    ns = nconns(rows)
    head = ["forwarder", "1-stream Gb/s", "-P8 Gb/s", "-R Gb/s", "CPU s/GB 1 / P8",
            "close req/s", "close p50/p99 ms", "keep-alive req/s", "ka p50/p99 ms", "RSS idle KB"]
    head += [f"KB/conn RSS (PSS) @{n}" for n in ns]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        g = lambda k, nd=2: fmt(num(r.get(k)), nd)
        m = lambda k, nd=2: spread(r, k, nd)
        cells = [name, m("gbps_1"), m("gbps_P8"), m("gbps_R"),
                 f"{m('cpu_s_per_GB_1')} / {m('cpu_s_per_GB_P8')}", m("close_rps", 0),
                 f"{m('close_p50ms')} / {m('close_p99ms')}", m("ka_rps", 0),
                 f"{m('ka_p50ms')} / {m('ka_p99ms')}", g("rss_idle_kb", 0)]
        for n in ns:
            ok = r.get(f"conns_ok_{n}", "0")
            c = f"{g(f'kb_per_conn_rss_{n}')} ({g(f'kb_per_conn_pss_{n}')})"
            if ok != str(n):
                c += f" [{ok}/{n} conns]"
            cells.append(c)
        errs = [f"{k} {r.get(k)}" for k in ("close_err", "ka_err") if (num(r.get(k)) or 0) > 0]
        if errs:
            cells[0] += " (wrk errors: " + ", ".join(errs) + ")"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def targets(rows, ctl):
    def v(fwd, col):
        return num(rows.get(fwd, {}).get(col))

    res = []

    def ratio(desc, fwd, col, ref, refcol, goal, higher=True, unit=""):
        a, b = v(fwd, col), v(ref, refcol)
        if a is None or b is None or b == 0:
            res.append((desc, fmt(a) + unit, f"{ref}: {fmt(b)}{unit}", "n/a", "no data"))
            return
        q = a / b
        met = q >= goal if higher else q <= goal
        res.append((desc, fmt(a) + unit, f"{ref}: {fmt(b)}{unit}", f"{q:.2f}x",
                    "met" if met else "MISSED"))

    def absolute(desc, x, limit, unit):
        if x is None:
            res.append((desc, "n/a", f"≤ {limit} {unit}", "", "no data"))
        else:
            res.append((desc, f"{fmt(x)} {unit}", f"≤ {limit} {unit}", "",
                        "met" if x <= limit else "MISSED"))

    ns = nconns(rows)
    D, T, S, H, SSH = "portmux-direct", "portmux-tunnel", "portmux-tls", "haproxy1", "ssh-gcm"
    ratio("direct 1-stream ≥ 1.0× haproxy1", D, "gbps_1", H, "gbps_1", 1.0, unit=" Gb/s")
    ratio("direct 8-stream ≥ 1.0× haproxy1", D, "gbps_P8", H, "gbps_P8", 1.0, unit=" Gb/s")
    ratio("direct CPU s/GB (1 stream) ≤ haproxy1", D, "cpu_s_per_GB_1", H, "cpu_s_per_GB_1", 1.0, False)
    ratio("direct CPU s/GB (8 streams) ≤ haproxy1", D, "cpu_s_per_GB_P8", H, "cpu_s_per_GB_P8", 1.0, False)
    ratio("direct Connection: close req/s ≥ 1.0× haproxy1", D, "close_rps", H, "close_rps", 1.0)
    # Issue 19's connection set-up goals, beside the earlier floors.
    ratio("direct Connection: close req/s ≥ 1.2× haproxy1", D, "close_rps", H, "close_rps", 1.2)
    for n in ns:
        absolute(f"direct idle memory @{n} conns ≤ 4 KB/conn (RSS)", v(D, f"kb_per_conn_rss_{n}"), 4, "KB")
    ratio("tunnel 1-stream ≥ 1.5× ssh -R gcm", T, "gbps_1", SSH, "gbps_1", 1.5, unit=" Gb/s")
    ratio("tunnel 8-stream aggregate ≥ tunnel 1-stream", T, "gbps_P8", T, "gbps_1", 1.0, unit=" Gb/s")
    ratio("tunnel TLS 1-stream ≥ 1.0× ssh -R gcm", S, "gbps_1", SSH, "gbps_1", 1.0, unit=" Gb/s")
    ratio("tunnel TLS CPU s/GB (1 stream) ≤ ssh -R gcm", S, "cpu_s_per_GB_1", SSH, "cpu_s_per_GB_1", 1.0, False)
    ratio("tunnel Connection: close req/s ≥ 2× ssh -R", T, "close_rps", SSH, "close_rps", 2.0)
    ratio("tunnel TLS Connection: close req/s ≥ 1.5× ssh -R", S, "close_rps", SSH, "close_rps", 1.5)
    ratio("tunnel Connection: close p99 ≤ 1/3 of ssh -R", T, "close_p99ms", SSH, "close_p99ms", 1 / 3, False, " ms")
    ratio("tunnel keep-alive p99 ≤ 1/3 of ssh -R", T, "ka_p99ms", SSH, "ka_p99ms", 1 / 3, False, " ms")
    for n in ns:
        absolute(f"tunnel idle memory @{n} streams ≤ 8 KB/stream (server+client RSS)",
                 v(T, f"kb_per_conn_rss_{n}"), 8, "KB")
    nm = ctl.get("mappings", "1000")
    absolute(f"create mapping p99 ({nm} creates) ≤ 10 ms", num(ctl.get("create_p99_ms")), 10, "ms")
    absolute(f"restore {nm} mappings at start-up ≤ 1 s", num(ctl.get("restore_s")), 1, "s")
    absolute(f"list with {nm} mappings (p50) ≤ 50 ms", num(ctl.get("list_p50_ms")), 50, "ms")
    out = ["| target | portmux | compared with | ratio | |", "|---|---|---|---|---|"]
    out += ["| " + " | ".join(r) + " |" for r in res]
    return "\n".join(out), res


def control_table(ctl):
    if not ctl:
        return "(no control-plane results)"
    g = lambda k: ctl.get(k, "n/a")
    rows = [
        ("mappings created through the API", f"{g('mappings')} ({g('create_failed')} failed) in {g('create_total_s')} s"),
        ("create latency p50 / p99 / max", f"{g('create_p50_ms')} / {g('create_p99_ms')} / {g('create_max_ms')} ms"),
        ("GET /api/mapping/list with all of them, p50 / max", f"{g('list_p50_ms')} / {g('list_max_ms')} ms ({g('list_bytes')} bytes)"),
        ("start-up restoring them: exec → /health ok", f"{g('restore_health_s')} s (median)"),
        ("start-up restoring them: exec → all listening", f"{g('restore_s')} s median, {g('restore_max_s')} s max"),
        ("server RSS: empty / with the mappings / restored", f"{g('rss_empty_kb')} / {g('rss_mappings_kb')} / {g('rss_restored_kb')} KB"),
        ("tunnel clients connected (each its own session)", f"{g('clients_ok')} of {g('clients')} (/health: {g('clients_health')})"),
        ("server RSS before / with the clients", f"{g('rss_clients_base_kb')} / {g('rss_clients_kb')} KB"),
        ("per client (RSS / PSS)", f"{g('kb_per_client_rss')} / {g('kb_per_client_pss')} KB"),
        ("GET /api/clients with all of them", f"{g('clients_list_ms')} ms"),
    ]
    if ctl.get("broken"):
        rows.append(("BROKEN", ctl["broken"]))
    return "\n".join(["| control plane | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows])


def check(rows, ctl, names, with_control):
    problems = []
    ns = nconns(rows)
    for name in names:
        r = rows.get(name)
        if not r:
            problems.append(f"{name}: no results (did it start? see run/fwd.log)")
            continue
        for k in ("gbps_1", "gbps_P8", "gbps_R", "close_rps", "ka_rps"):
            x = num(r.get(k))
            if not x or x <= 0:
                problems.append(f"{name}: {k} = {r.get(k)}")
        d = num(r.get("wrk_d")) or 1
        for kind in ("close", "ka"):
            rps, err = num(r.get(f"{kind}_rps")), num(r.get(f"{kind}_err"))
            if rps and err is not None and err > max(5, 0.01 * rps * d):
                problems.append(f"{name}: wrk {kind}: {err:.0f} errors of ~{rps * d:.0f} requests")
        for n in ns:
            if r.get(f"conns_ok_{n}") != str(n):
                problems.append(f"{name}: {r.get(f'conns_ok_{n}')}/{n} idle connections went through")
    if with_control:
        if not ctl:
            problems.append("control plane: no results")
        elif ctl.get("broken"):
            problems.append("control plane: " + ctl["broken"])
    return problems


LAT_PATHS = {"plain": "plain TCP", "direct": "direct mapping", "tunnel": "tunnel",
             "tunnel-default": "tunnel (default 64 MiB budget)", "ssh": "ssh -R"}


def load_latency(path):
    """{rtt_ms: {(measure, path): [values]}} from latency.sh's TSV (NA kept as None)."""
    out = {}
    try:
        with open(path) as f:
            for r in csv.DictReader(f, delimiter="\t"):
                rtt = int(r["rtt_ms"])
                vals = [num(v) for v in r["values"].split(",")]
                out.setdefault(rtt, {})[(r["measure"], r["path"])] = vals
    except FileNotFoundError:
        pass
    return out


def med(vals):
    xs = sorted(x for x in vals if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def lat_cell(vals, nd):
    if vals is None:
        return "n/a"
    xs = [x for x in vals if x is not None]
    cell = fmt(med(vals), nd)
    if len(xs) > 1:
        cell += f" ({fmt(min(xs), nd)}–{fmt(max(xs), nd)})"
    if len(xs) < len(vals):
        cell += f" [{len(vals) - len(xs)} failed]"
    return cell


def latency_report(lat, where=""):
    """The latency table (medians, min–max) and its goals: one tunnel stream ≥ 90 % of plain
    TCP through the same delay line; tunnel time to first byte ≤ direct + 1 RTT. "tunnel" has
    a session buffer budget matched to the delay line's (LAT_TUNNEL_BUFFER_MB); the column
    beside it is the same tunnel with the default 64 MiB, whose bound (about 64 MiB per round
    trip) it shows."""
    head = ["RTT", "plain TCP Mb/s", "tunnel Mb/s", "tunnel, default budget Mb/s", "ssh -R Mb/s",
            "tunnel / plain (goal ≥ 90 %)", "default budget / plain",
            "TTFB plain ms", "TTFB direct ms", "TTFB tunnel ms", "TTFB ssh -R ms",
            "tunnel − direct (goal ≤ 1 RTT)"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    goals = []
    for rtt in sorted(lat):
        d = lat[rtt]
        tp = lambda p: d.get(("tput_mbps", p))
        tf = lambda p: d.get(("ttfb_ms", p))
        plain, tun = med(tp("plain") or []), med(tp("tunnel") or [])
        ratio = "n/a"
        if plain and tun is not None:
            q = tun / plain
            met = q >= 0.9
            ratio = f"{100 * q:.0f} % {'met' if met else 'MISSED'}"
            goals.append((f"tunnel 1-stream ≥ 90 % of plain TCP @{rtt} ms{where}", f"{fmt(tun, 1)} Mb/s",
                          f"plain: {fmt(plain, 1)} Mb/s", f"{100 * q:.0f} %", "met" if met else "MISSED"))
        else:
            goals.append((f"tunnel 1-stream ≥ 90 % of plain TCP @{rtt} ms{where}", "n/a", "n/a", "", "no data"))
        direct, ttun = med(tf("direct") or []), med(tf("tunnel") or [])
        diff = "n/a"
        if direct is not None and ttun is not None:
            extra = ttun - direct
            met = extra <= rtt
            diff = f"{fmt(extra, 1)} ms = {extra / rtt:.2f} RTT {'met' if met else 'MISSED'}"
            goals.append((f"tunnel TTFB ≤ direct + 1 RTT @{rtt} ms{where}", f"{fmt(ttun, 1)} ms",
                          f"direct: {fmt(direct, 1)} ms", f"{extra / rtt:+.2f} RTT", "met" if met else "MISSED"))
        else:
            goals.append((f"tunnel TTFB ≤ direct + 1 RTT @{rtt} ms{where}", "n/a", "n/a", "", "no data"))
        tdef = med(tp("tunnel-default") or [])
        ratio_def = f"{100 * tdef / plain:.0f} %" if plain and tdef is not None else "n/a"
        out.append("| " + " | ".join([f"{rtt} ms", lat_cell(tp("plain"), 0), lat_cell(tp("tunnel"), 0),
                                      lat_cell(tp("tunnel-default"), 0), lat_cell(tp("ssh"), 0),
                                      ratio, ratio_def, lat_cell(tf("plain"), 1),
                                      lat_cell(tf("direct"), 1), lat_cell(tf("tunnel"), 1),
                                      lat_cell(tf("ssh"), 1), diff]) + " |")
    g = ["| goal | portmux | compared with | ratio | |", "|---|---|---|---|---|"]
    g += ["| " + " | ".join(r) + " |" for r in goals]
    return "\n".join(out), "\n".join(g), goals


def check_latency(lat, where=""):
    problems = []
    if not lat:
        return [f"latency{where}: no results"]
    for rtt, d in sorted(lat.items()):
        for measure, path in (("tput_mbps", "plain"), ("tput_mbps", "tunnel"),
                              ("tput_mbps", "tunnel-default"), ("ttfb_ms", "plain"),
                              ("ttfb_ms", "direct"), ("ttfb_ms", "tunnel")):
            vals = d.get((measure, path))
            what = f"latency @{rtt} ms{where}: {LAT_PATHS[path]} {'throughput' if measure == 'tput_mbps' else 'GET'}"
            if vals is None:
                problems.append(f"{what}: no results (did it start? see latency/run/)")
            elif any(v is None for v in vals) or (measure == "tput_mbps" and not all(vals)):
                problems.append(f"{what}: {sum(1 for v in vals if not v)} of {len(vals)} failed")
            elif measure == "ttfb_ms" and min(vals) < rtt - 0.05:
                # each byte is held RTT/2 each way: a shorter answer means it was not held
                problems.append(f"{what}: first byte after {min(vals)} ms, under the {rtt} ms round "
                                f"trip: the delay line is not delaying")
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers")
    ap.add_argument("--control")
    ap.add_argument("--machine")
    ap.add_argument("--peers-only", action="store_true")
    ap.add_argument("--check")
    ap.add_argument("--latency")
    ap.add_argument("--check-latency", action="store_true")
    ap.add_argument("--latency-link", help="latency.sh --rate's TSV: the same paths across a "
                    "link of --link-rate Mbit/s")
    ap.add_argument("--link-rate", type=int)
    a = ap.parse_args()
    if not a.peers and not a.latency and not a.latency_link:
        ap.error("--peers, --latency or --latency-link is needed")
    rows, ctl = load_peers(a.peers) if a.peers else {}, load_control(a.control)
    if a.peers_only:
        print(peers_table(rows))
        return 0
    if a.machine:
        try:
            print(open(a.machine).read().rstrip() + "\n")
        except FileNotFoundError:
            pass
    rc = 0
    if a.peers:
        rc = peers_report(a, rows, ctl)
    sections = []
    if a.latency:
        sections.append((a.latency, "", "### Latency: one stream and a new connection across a "
                         "delay line (no bandwidth cap; medians, min–max)"))
    if a.latency_link:
        rate = f"{a.link_rate} Mbit/s" if a.link_rate else "a capped"
        sections.append((a.latency_link, f" over {rate}",
                         f"### Latency across a {rate} link (delay line with a bandwidth cap: "
                         "the WAN, not this machine's CPUs, is the limit; medians, min–max)"))
    for path, where, title in sections:
        lat = load_latency(path)
        table, goals, res = latency_report(lat, where)
        print("\n" + title + "\n")
        print(table + "\n")
        print(goals + "\n")
        met = sum(1 for r in res if r[4] == "met")
        missed = sum(1 for r in res if r[4] == "MISSED")
        print(f"{met} met, {missed} missed, {len(res) - met - missed} without data.")
        if a.check_latency:
            probs = check_latency(lat, where)
            print()
            if probs:
                print("LATENCY CHECK FAILED (something is broken, not slow):")
                for p in probs:
                    print(f"  - {p}")
                rc = 1
            else:
                print("LATENCY CHECK OK: the delay line delays and every portmux path worked.")
    return rc


def peers_report(a, rows, ctl):
    print("### Forwarders (loopback, medians; min–max of the repetitions in brackets)\n")
    print(peers_table(rows) + "\n")
    print("### Targets (ratios in this run)\n")
    t, res = targets(rows, ctl)
    print(t + "\n")
    met = sum(1 for r in res if r[4] == "met")
    missed = sum(1 for r in res if r[4] == "MISSED")
    print(f"{met} met, {missed} missed, {len(res) - met - missed} without data.\n")
    print("### Control plane\n")
    print(control_table(ctl))
    if a.check:
        probs = check(rows, ctl, [n for n in a.check.split(",") if n], bool(a.control))
        print()
        if probs:
            print("CHECK FAILED (something is broken, not slow):")
            for p in probs:
                print(f"  - {p}")
            return 1
        print("CHECK OK: every benchmarked path worked (numbers are not judged).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
