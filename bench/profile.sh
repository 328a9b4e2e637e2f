#!/usr/bin/env bash
# Where portmux spends its time under a bulk transfer (loopback):
#
#   bench/profile.sh [direct|tunnel|tls]...      (default: direct tunnel)
#
# For each mode: iperf3 server as the backend, portmux (bench/portmux-fwd.sh MODE), one
# iperf3 stream through it, and `perf record -g` on the portmux processes for PROFILE_T
# seconds (default 5) while it runs. Writes $BENCH_WORK/profile/perf-MODE.data and
# perf-MODE.txt (flat: self time by process and symbol, kernel included) and
# perf-MODE-callers.txt (call graphs of the top symbols). Without a working perf (VMs that
# do not expose perf events) it falls back to `valgrind --tool=callgrind` on a short
# transfer (callgrind-MODE.txt). Every step is bounded in time.
#
# Env: PROFILE_T=5 PUB=19000 IPERF_PORT=19201 PORTMUX_SERVER PORTMUX_CLIENT BENCH_WORK
set -u
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
export BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}
OUT=$BENCH_WORK/profile
mkdir -p "$OUT" "$BENCH_WORK/run"
T=${PROFILE_T:-5}
export PUB=${PUB:-19000}
IPERF_PORT=${IPERF_PORT:-19201}
export PORTMUX_SERVER=${PORTMUX_SERVER:-${PORTMUX_BUILD_DIR:-$REPO/build}/portmux-server}
export PORTMUX_CLIENT=${PORTMUX_CLIENT:-${PORTMUX_BUILD_DIR:-$REPO/build}/portmux-client}
export PORTMUX_API_PORT=${PORTMUX_API_PORT:-19100} PORTMUX_TUNNEL_PORT=${PORTMUX_TUNNEL_PORT:-19101}
export READY_FILE=$BENCH_WORK/run/profile-ready
MODES=("$@"); [ ${#MODES[@]} -eq 0 ] && MODES=(direct tunnel)

IPERF_PID= FWD_PID=
. "$BENCH/lib.sh"  # stop_tree
cleanup() { [ -n "$FWD_PID" ] && stop_tree $FWD_PID; [ -n "$IPERF_PID" ] && stop_tree $IPERF_PID; FWD_PID= IPERF_PID=; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # start MODE: iperf3 backend + portmux, waits for the mapping
  rm -f "$READY_FILE"
  iperf3 -s -p $IPERF_PORT >>"$OUT/backend.log" 2>&1 &
  IPERF_PID=$!
  BACKEND=$IPERF_PORT bash -c "exec '$BENCH/portmux-fwd.sh' $1" >>"$OUT/fwd.log" 2>&1 </dev/null &
  FWD_PID=$!
  local i; for i in $(seq 200); do [ -s "$READY_FILE" ] && return 0; [ -e /proc/$FWD_PID ] || break; sleep 0.1; done
  echo "profile: portmux $1 did not start (see $OUT/fwd.log)" >&2
  return 1
}
portmux_pids() {  # server (and client) PIDs under the wrapper, comma-separated
  local p out=""
  for p in $(python3 "$BENCH/proc.py" tree $FWD_PID); do
    case $(cat /proc/$p/comm 2>/dev/null) in portmux-server|portmux-client|memcheck*|callgrind*) out="$out,$p" ;; esac
  done
  echo "${out#,}"
}

perf_ok() { timeout 20 perf record -q -o "$OUT/.probe.data" -- true >/dev/null 2>&1; }

profile_perf() {
  local mode=$1 pids data=$OUT/perf-$1.data
  start "$mode" || return 1
  pids=$(portmux_pids)
  timeout $((T + 20)) iperf3 -c 127.0.0.1 -p $PUB -t $((T + 3)) > "$OUT/iperf-$mode.txt" 2>&1 &
  local ip=$!
  sleep 1
  timeout $((T + 30)) perf record -q -F 999 -g -o "$data" -p "$pids" -- sleep "$T" 2>"$OUT/perf-$mode.err"
  wait $ip
  cleanup
  {
    echo "# portmux $mode, one iperf3 stream ($(grep -E 'receiver' "$OUT/iperf-$mode.txt" | awk '{print $7, $8}')), perf -F 999 for $T s on $pids"
    timeout 120 perf report -i "$data" --no-children --sort comm,dso,sym --stdio -g none --percent-limit 0.5 2>/dev/null | grep -v '^$'
    echo; echo "# by process / DSO"
    timeout 120 perf report -i "$data" --no-children --sort comm,dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -20
  } > "$OUT/perf-$mode.txt"
  timeout 120 perf report -i "$data" --no-children --sort sym --stdio -G --percent-limit 2 2>/dev/null > "$OUT/perf-$mode-callers.txt"
  echo "profile: $OUT/perf-$mode.txt"
  grep -E '^ +[0-9.]+%' "$OUT/perf-$mode.txt" | head -25
}

profile_callgrind() {
  local mode=$1 d=$OUT/vg-$1
  mkdir -p "$d"
  rm -f "$d"/callgrind.out.*
  printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/callgrind.out.%%p "%s" "$@"\n' "$d" "$PORTMUX_SERVER" > "$d/server"
  printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/callgrind.out.%%p "%s" "$@"\n' "$d" "$PORTMUX_CLIENT" > "$d/client"
  chmod +x "$d/server" "$d/client"
  PORTMUX_SERVER=$d/server PORTMUX_CLIENT=$d/client start "$mode" || return 1
  timeout 120 iperf3 -c 127.0.0.1 -p $PUB -n 200M > "$OUT/iperf-$mode.txt" 2>&1
  cleanup
  { for f in "$d"/callgrind.out.*; do echo "### $f"; timeout 120 callgrind_annotate "$f" 2>/dev/null | head -40; done; } > "$OUT/callgrind-$mode.txt"
  echo "profile: $OUT/callgrind-$mode.txt"
}

if command -v perf >/dev/null && perf_ok; then
  for m in "${MODES[@]}"; do profile_perf "$m"; done
elif command -v valgrind >/dev/null; then
  echo "profile: perf cannot record here (no perf events in this VM?); using callgrind" >&2
  for m in "${MODES[@]}"; do profile_callgrind "$m"; done
else
  echo "profile: neither perf (linux-perf) nor valgrind is usable" >&2
  exit 1
fi
