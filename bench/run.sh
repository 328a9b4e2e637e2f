#!/usr/bin/env bash
# portmux benchmark, one command (`make bench` builds, then runs this). Loopback only.
#
#   bench/run.sh               full run: portmux direct, tunnel, tunnel over TLS, haproxy
#                              (nbthread 1), ssh -R (aes128-gcm) and no forwarder, in the same
#                              run; then the control plane; then the latency bench
#                              (bench/latency.sh: tunnel, ssh -R and plain TCP across a delay
#                              line at 20 and 100 ms RTT, then again with the delay line a
#                              link of LAT_LINK_MBIT=1000 Mbit/s: the WAN, not the CPUs, as
#                              the limit); prints one table with the ratios
#   bench/run.sh --smoke       a few seconds: portmux direct + tunnel only, 1 rep, 1 s iperf3,
#                              1 s wrk, 50 idle conns, 50 mappings, 20 tunnel clients, latency
#                              at 20 ms only (latency.sh --smoke); exit 1 only if something is
#                              broken (never for slowness) — for CI
#   options: --no-install (do not apt-get) --no-build (use the binaries as they are)
#            --fwd a,b,c (forwarders; see peers.sh) --no-control --no-latency
#            --profile (perf afterwards)
#   env:     PORTMUX_BUILD_DIR (default ./build, what `make bench` builds), BENCH_WORK
#            (default /tmp/portmux-bench: configs, logs, results — nothing is written in the
#            checkout), REPS IPERF_T WRK_D WRK_C NCONNS HOLD (see peers.sh), CP_MAPPINGS
#            CP_CLIENTS CP_REPS, LAT_* (see latency.sh --help; LAT_LINK_MBIT=0 skips the link
#            pass), BENCH_ARGS (options when
#            called without any, e.g. through `make bench BENCH_ARGS=--smoke`)
#
# Exit status: 0 when every measured portmux path worked, 1 when one is broken (a forwarder
# that does not start, no throughput, HTTP errors, idle connections that do not go through, a
# failed create/restore/client), 2 on a usage or set-up error. Every step has a time limit.
set -u
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
[ $# -eq 0 ] && [ -n "${BENCH_ARGS:-}" ] && set -- $BENCH_ARGS

SMOKE=0 INSTALL=1 BUILD=1 CONTROL=1 LATENCY=1 PROFILE=0 FWD_LIST=""
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --no-control) CONTROL=0 ;;
    --no-latency) LATENCY=0 ;;
    --profile) PROFILE=1 ;;
    --fwd) FWD_LIST=${2:?--fwd needs a list}; shift ;;
    --fwd=*) FWD_LIST=${1#--fwd=} ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
export BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}
WORK=$BENCH_WORK
BUILD_DIR=${PORTMUX_BUILD_DIR:-$REPO/build}
mkdir -p "$WORK/run"
exec 8>"$WORK/.lock"
if ! flock -n 8; then echo "run.sh: another bench run holds $WORK/.lock" >&2; exit 2; fi

if [ $SMOKE = 1 ]; then
  export REPS=${REPS:-1} IPERF_T=${IPERF_T:-1} WRK_D=${WRK_D:-1} NCONNS=${NCONNS:-50} HOLD=${HOLD:-1}
  CP_MAPPINGS=${CP_MAPPINGS:-50} CP_CLIENTS=${CP_CLIENTS:-20} CP_REPS=${CP_REPS:-1}
  DEFAULT_FWDS="portmux-direct portmux-tunnel"
  PEERS_LIMIT=600
else
  export REPS=${REPS:-3} IPERF_T=${IPERF_T:-5} WRK_D=${WRK_D:-5} NCONNS=${NCONNS:-500 10000} HOLD=${HOLD:-5}
  CP_MAPPINGS=${CP_MAPPINGS:-1000} CP_CLIENTS=${CP_CLIENTS:-1000} CP_REPS=${CP_REPS:-3}
  DEFAULT_FWDS="none portmux-direct portmux-tunnel portmux-tls haproxy1 ssh-gcm"
  PEERS_LIMIT=5400
fi
FWDS=${FWD_LIST:-$DEFAULT_FWDS}
FWDS=${FWDS//,/ }

say() { echo "== $*"; }

# ---- 1. tools (Debian): install-deps.sh bench (+ build when it builds) ----
install_deps() {
  local sets=(bench)
  # build.txt also brings gcc and libevent's headers for latency.sh's delay line
  [ $BUILD = 1 ] && { [ ! -x "$BUILD_DIR/portmux-server" ] || ! command -v gcc >/dev/null; } && sets+=(build)
  if ! command -v apt-get >/dev/null; then
    echo "run.sh: no apt-get; install scripts/install-deps.sh ${sets[*]}, or pass --no-install" >&2
    return 1
  fi
  timeout 2700 "$REPO/scripts/install-deps.sh" "${sets[@]}"
}

# ---- 2. binaries ----
build() {
  local log=$WORK/build.log
  : > "$log"
  if [ ! -f "$BUILD_DIR/CMakeCache.txt" ]; then
    timeout 300 cmake -S "$REPO" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo >>"$log" 2>&1 ||
      { tail -20 "$log"; return 1; }
  fi
  # one target at a time, so a client that does not build yet leaves the server usable
  local t
  for t in portmux-server portmux-client; do
    timeout 1200 cmake --build "$BUILD_DIR" -j"$(nproc)" --target $t >>"$log" 2>&1 ||
      echo "run.sh: building $t failed (see $log); using what is in $BUILD_DIR" >&2
  done
}

machine_info() {
  local f=$WORK/machine.txt v
  v() { "$@" 2>&1 | head -1; }
  {
    echo "### Machine"
    echo
    echo "- date: $(date '+%F %T %Z'); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- CPU: $(nproc) × $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); RAM $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
    echo "- kernel: $(uname -sr); $(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-?}")"
    echo "- portmux: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet HEAD -- src 2>/dev/null || echo ' (+ uncommitted src changes)'), $(v "$SERVER" --version), built in $BUILD_DIR ($(grep -m1 '^CMAKE_BUILD_TYPE' "$BUILD_DIR/CMakeCache.txt" 2>/dev/null | cut -d= -f2)); libevent $(dpkg-query -W -f='${Version}' 'libevent-2.1-7*' 2>/dev/null | head -1), OpenSSL $(v openssl version | cut -d' ' -f2)"
    echo "- peers: $(v haproxy -v | cut -d' ' -f1-3), $(v ssh -V | cut -d, -f1), $(v rinetd -v), socat $(socat -V 2>/dev/null | sed -n 's/^socat version \([^ ]*\).*/\1/p')"
    echo "- tools: $(v iperf3 --version | cut -d' ' -f1-2), $(v wrk -v | cut -d' ' -f1-2), $(v nginx -v | sed 's/.*: //'), $(v python3 --version)"
    echo "- open files: soft $(ulimit -n), hard $(ulimit -Hn)$( [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt 21000 ] && echo ' — too low for 10,000 connections through a one-process forwarder (2 fds each) and not raisable here (no CAP_SYS_RESOURCE): peers.sh caps the idle-connection test, see the column headers')"
    echo "- knobs: REPS=$REPS IPERF_T=$IPERF_T WRK_D=$WRK_D WRK_C=${WRK_C:-50} NCONNS='$NCONNS' HOLD=$HOLD CP_MAPPINGS=$CP_MAPPINGS CP_CLIENTS=$CP_CLIENTS CP_REPS=$CP_REPS"
  } > "$f" 2>/dev/null
}

if [ $INSTALL = 1 ]; then install_deps || { echo "run.sh: installing the tools failed" >&2; exit 2; }; fi
if [ $BUILD = 1 ]; then build; fi
export PORTMUX_SERVER=${PORTMUX_SERVER:-$BUILD_DIR/portmux-server}
export PORTMUX_CLIENT=${PORTMUX_CLIENT:-$BUILD_DIR/portmux-client}
SERVER=$PORTMUX_SERVER
if [ ! -x "$SERVER" ]; then echo "run.sh: no server binary at $SERVER (make build)" >&2; exit 2; fi
[ -x "$PORTMUX_CLIENT" ] || echo "run.sh: no client binary at $PORTMUX_CLIENT: tunnel rows will be empty" >&2

ulimit -Hn 65536 2>/dev/null; ulimit -n 65536 2>/dev/null || ulimit -n 20000 2>/dev/null
rm -f "$WORK"/results-peers.tsv "$WORK"/results-peers.txt "$WORK"/results-control.tsv "$WORK"/results.md \
  "$WORK"/latency/results-latency.tsv
machine_info
T0=$SECONDS

# ---- 3. forwarders ----
say "forwarders: $FWDS ($(cat /proc/loadavg | cut -d' ' -f1-3) load); log: $WORK/results-peers.txt"
# shellcheck disable=SC2086
timeout -k 30 $PEERS_LIMIT "$BENCH/peers.sh" $FWDS | grep --line-buffered -E 'SUMMARY|ERROR|NOTE|#####'
peers_rc=${PIPESTATUS[0]}
[ "$peers_rc" = 124 ] && echo "run.sh: peers.sh hit its $PEERS_LIMIT s limit" >&2

# ---- 4. control plane ----
CTL_ARGS=()
if [ $CONTROL = 1 ]; then
  say "control plane: $CP_MAPPINGS mappings, $CP_CLIENTS tunnel clients"
  timeout -k 10 600 python3 "$BENCH/control.py" bench --server "$SERVER" --work "$WORK" \
    --out "$WORK/results-control.tsv" --mappings "$CP_MAPPINGS" --clients "$CP_CLIENTS" \
    --reps "$CP_REPS" > "$WORK/results-control.txt" 2>&1
  grep -E 'BROKEN|restore [0-9]|clients:' "$WORK/results-control.txt"
  CTL_ARGS=(--control "$WORK/results-control.tsv")
fi

# ---- 5. latency: the tunnel across a delay line ----
LAT_ARGS=()
if [ $LATENCY = 1 ]; then
  say "latency: tunnel, ssh -R and plain TCP across a delay line; log: $WORK/results-latency.txt"
  lat_opts=(); [ $SMOKE = 1 ] && lat_opts=(--smoke)
  timeout -k 10 1500 "$BENCH/latency.sh" "${lat_opts[@]}" > "$WORK/results-latency.txt" 2>&1
  lat_rc=$?
  grep -E '^== |ERROR' "$WORK/results-latency.txt"
  [ "$lat_rc" = 0 ] || echo "run.sh: latency.sh exited $lat_rc (see $WORK/results-latency.txt)" >&2
  sed -n 's/^- portmux: [^;]*; knobs: /- latency knobs: /p' "$WORK/latency/machine.txt" >> "$WORK/machine.txt" 2>/dev/null
  LAT_ARGS=(--latency "$WORK/latency/results-latency.tsv" --check-latency)
  if [ $SMOKE = 0 ] && [ "${LAT_LINK_MBIT:-1000}" != 0 ]; then
    link=${LAT_LINK_MBIT:-1000}
    say "latency across a $link Mbit/s link; log: $WORK/results-latency-link.txt"
    timeout -k 10 1500 "$BENCH/latency.sh" --rate "$link" > "$WORK/results-latency-link.txt" 2>&1
    link_rc=$?
    grep -E '^== |ERROR' "$WORK/results-latency-link.txt"
    [ "$link_rc" = 0 ] || { echo "run.sh: latency.sh --rate $link exited $link_rc" >&2; lat_rc=$link_rc; }
    sed -n 's/^- portmux: [^;]*; knobs: /- latency knobs (link pass): /p' "$WORK/latency-${link}mbit/machine.txt" \
      >> "$WORK/machine.txt" 2>/dev/null
    LAT_ARGS+=(--latency-link "$WORK/latency-${link}mbit/results-latency.tsv" --link-rate "$link")
  fi
fi

# ---- 6. the table ----
CHECK=""
for f in $FWDS; do case $f in portmux-*) CHECK="$CHECK,$f" ;; esac; done
echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); measurements took $((SECONDS - T0)) s" >> "$WORK/machine.txt"
echo
python3 "$BENCH/report.py" --peers "$WORK/results-peers.tsv" "${CTL_ARGS[@]}" \
  "${LAT_ARGS[@]}" --machine "$WORK/machine.txt" --check "${CHECK#,}" > "$WORK/results.md"
rc=$?
[ $LATENCY = 1 ] && [ "$lat_rc" != 0 ] && rc=1
cat "$WORK/results.md"
echo
echo "(results: $WORK/results.md; raw: $WORK/results-peers.tsv, results-peers.txt, results-control.tsv, latency/)"

if [ $PROFILE = 1 ]; then
  say "profile (perf) of portmux direct and tunnel under iperf3"
  timeout -k 10 600 "$BENCH/profile.sh" direct tunnel || echo "run.sh: profile failed" >&2
fi
exit $rc
