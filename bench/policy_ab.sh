#!/usr/bin/env bash
# Same-run A/B for the mapping policy (issue 16): does a mapping *without* limits lose
# throughput to the feature (allow_from check at accept, PROXY header path, token bucket
# and rate-limit group hooks)? Builds REF (default: main) from `git archive` into the
# bench work directory, then alternates the two builds REPS times per mode on the same
# machine in the same run -- iperf3 through portmux direct and through the tunnel, one
# stream -- and prints the medians and the ratio this checkout / REF.
#
#   bench/policy_ab.sh [--base REF] [--reps N] [--time S] [--modes "direct tunnel"]
#
# The checkout's own binaries come from PORTMUX_BUILD_DIR (default ./build; built when
# missing). Nothing is written into the checkout; results also go to
# $BENCH_WORK/policy-ab/results.md (BENCH_WORK default /tmp/portmux-bench).
# Ports (env): PUB=19300 IPERF_PORT=19301 PORTMUX_API_PORT=19302 PORTMUX_TUNNEL_PORT=19303.
# Exit 1 only when something is broken (a build, a forwarder that does not come up, an
# iperf3 run without a result), never because a number is low.
set -u
BASE_REF=main REPS=5 T=5 MODES="direct tunnel"
while [ $# -gt 0 ]; do
  case $1 in
    --base) BASE_REF=$2; shift 2 ;;
    --reps) REPS=$2; shift 2 ;;
    --time) T=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    *) echo "usage: $0 [--base REF] [--reps N] [--time S] [--modes \"direct tunnel\"]" >&2; exit 2 ;;
  esac
done
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}/policy-ab
HEAD_BUILD=${PORTMUX_BUILD_DIR:-$REPO/build}
export PUB=${PUB:-19300}
IPERF_PORT=${IPERF_PORT:-19301}
export PORTMUX_API_PORT=${PORTMUX_API_PORT:-19302}
export PORTMUX_TUNNEL_PORT=${PORTMUX_TUNNEL_PORT:-19303}
export BENCH_WORK=$WORK

log() { echo "policy-ab: $*" >&2; }
die() { log "$*"; cleanup; exit 1; }
IPERF_PID= FWD_PID=
cleanup() {
  [ -n "$FWD_PID" ] && kill "$FWD_PID" 2>/dev/null && wait "$FWD_PID" 2>/dev/null
  [ -n "$IPERF_PID" ] && kill "$IPERF_PID" 2>/dev/null && wait "$IPERF_PID" 2>/dev/null
  FWD_PID= IPERF_PID=
}
trap 'cleanup; exit 1' INT TERM

build() { # SRC BUILD
  cmake -S "$1" -B "$2" -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$2.cmake.log" 2>&1 &&
    nice cmake --build "$2" -j2 --target portmux-server portmux-client >"$2.build.log" 2>&1
}

mkdir -p "$WORK"
base_rev=$(git -C "$REPO" rev-parse --short "$BASE_REF") || die "unknown ref $BASE_REF"
head_rev=$(git -C "$REPO" rev-parse --short HEAD)
BASE_SRC=$WORK/src-$base_rev BASE_BUILD=$WORK/build-$base_rev
if [ ! -x "$BASE_BUILD/portmux-server" ]; then
  log "building $BASE_REF ($base_rev) in $BASE_BUILD"
  rm -rf "$BASE_SRC" && mkdir -p "$BASE_SRC" "$BASE_BUILD"
  git -C "$REPO" archive "$base_rev" | tar -x -C "$BASE_SRC" || die "git archive $base_rev failed"
  build "$BASE_SRC" "$BASE_BUILD" || die "build of $base_rev failed (see $BASE_BUILD.build.log)"
fi
if [ ! -x "$HEAD_BUILD/portmux-server" ] || [ ! -x "$HEAD_BUILD/portmux-client" ]; then
  log "building the checkout in $HEAD_BUILD"
  mkdir -p "$HEAD_BUILD"
  build "$REPO" "$HEAD_BUILD" || die "build of the checkout failed"
fi

for p in $PUB $IPERF_PORT $PORTMUX_API_PORT $PORTMUX_TUNNEL_PORT; do
  (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && die "port $p is in use"
done
iperf3 -s -p "$IPERF_PORT" >"$WORK/iperf3-server.log" 2>&1 &
IPERF_PID=$!

# run_one BUILD MODE -> Gbit/s on stdout
run_one() {
  local ready=$WORK/ready js gbps end
  rm -f "$ready"
  PORTMUX_SERVER=$1/portmux-server PORTMUX_CLIENT=$1/portmux-client BACKEND=$IPERF_PORT \
    READY_FILE=$ready "$BENCH/portmux-fwd.sh" "$2" >>"$WORK/fwd.log" 2>&1 &
  FWD_PID=$!
  end=$((SECONDS + 20))
  while [ ! -f "$ready" ]; do
    kill -0 "$FWD_PID" 2>/dev/null || { log "forwarder $2 ($1) exited"; return 1; }
    [ $SECONDS -ge $end ] && { log "forwarder $2 ($1) not ready in 20 s"; return 1; }
    sleep 0.05
  done
  js=$(timeout $((T + 20)) iperf3 -c 127.0.0.1 -p "$PUB" -t "$T" -J 2>&1)
  kill "$FWD_PID" 2>/dev/null
  wait "$FWD_PID" 2>/dev/null
  FWD_PID=
  gbps=$(printf '%s' "$js" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("%.2f" % (d["end"]["sum_received"]["bits_per_second"] / 1e9))' 2>/dev/null)
  [ -n "$gbps" ] || { log "iperf3 through $2 ($1) gave no result"; return 1; }
  echo "$gbps"
}

declare -A RES
for rep in $(seq 1 "$REPS"); do
  for mode in $MODES; do
    # Alternate which build goes first, so a warm-up or drift favours neither.
    if [ $((rep % 2)) -eq 1 ]; then order="base head"; else order="head base"; fi
    for side in $order; do
      b=$HEAD_BUILD
      [ $side = base ] && b=$BASE_BUILD
      v=$(run_one "$b" "$mode") || die "run failed"
      log "rep $rep $mode $side: $v Gbit/s"
      RES[$mode.$side]="${RES[$mode.$side]:-} $v"
    done
  done
done
cleanup

. "$BENCH/lib.sh"  # median
{
  echo "| mode (iperf3, 1 stream, ${T} s, ${REPS} reps) | $BASE_REF $base_rev Gbit/s | HEAD $head_rev Gbit/s | HEAD / base (medians) | HEAD / base (median of back-to-back pairs) | runs base · head |"
  echo "|---|---|---|---|---|---|"
  for mode in $MODES; do
    mb=$(median ${RES[$mode.base]}) mh=$(median ${RES[$mode.head]})
    ratio=$(awk -v a="$mh" -v b="$mb" 'BEGIN {printf "%.3f", (b > 0) ? a / b : 0}')
    # Each rep ran the two builds back to back: their ratio cancels the load of the moment
    # (on a shared machine one rep swings by 2x), so its median is the steadier figure.
    pairs=$(paste <(printf '%s\n' ${RES[$mode.head]}) <(printf '%s\n' ${RES[$mode.base]}) |
            awk '$2 > 0 {printf "%.3f\n", $1 / $2}')
    pr=$(median "$pairs")
    echo "| $mode, no limits | $mb | $mh | $ratio | $pr |${RES[$mode.base]} ·${RES[$mode.head]} |"
  done
} | tee "$WORK/results.md"
