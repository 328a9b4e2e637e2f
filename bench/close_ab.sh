#!/usr/bin/env bash
# Same-run A/B of Connection: close req/s through portmux, the companion of policy_ab.sh
# (which does iperf3 throughput): wrk -t2 -c50 with "Connection: close" against an nginx
# backend, through bench/portmux-fwd.sh, base build and head build back to back in each
# rep (order alternating). Prints medians and the median of pair ratios; exit 0 whatever
# the numbers (nothing here is pass/fail).
#
#   bench/close_ab.sh BASE_BUILD_DIR HEAD_BUILD_DIR     (each holds portmux-server/-client)
#   env: REPS=5 D=5 (seconds per wrk run) MODES="direct tunnel"
#        ports PUB=19400 HTTP=19401 PORTMUX_API_PORT=19402 PORTMUX_TUNNEL_PORT=19403
# A base build: git archive REF | tar -x -C DIR, then cmake + build portmux-server and
# portmux-client there (policy_ab.sh does the same).
set -u
[ $# -eq 2 ] || { echo "usage: $0 BASE_BUILD_DIR HEAD_BUILD_DIR" >&2; exit 2; }
BASE=$1 HEAD=$2 REPS=${REPS:-5} D=${D:-5}
BENCH=$(cd "$(dirname "$0")" && pwd)
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
W=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}/close-ab; rm -rf "$W"; mkdir -p "$W/nginx"
export PUB=${PUB:-19400} PORTMUX_API_PORT=${PORTMUX_API_PORT:-19402}
export PORTMUX_TUNNEL_PORT=${PORTMUX_TUNNEL_PORT:-19403} BENCH_WORK=$W
HTTP=${HTTP:-19401}
. "$BENCH/lib.sh"  # start_nginx_ok median
start_nginx_ok "$W" $HTTP "$W/nginx.log"
NG=$NGINX_PID
wait_listen $HTTP 5
one() { # BUILD MODE
  rm -f $W/ready
  PORTMUX_SERVER=$1/portmux-server PORTMUX_CLIENT=$1/portmux-client BACKEND=$HTTP READY_FILE=$W/ready \
    $BENCH/portmux-fwd.sh $2 >> $W/fwd.log 2>&1 &
  local f=$! end=$((SECONDS + 20))
  while [ ! -f $W/ready ]; do kill -0 $f 2>/dev/null || { echo 0; return; }; [ $SECONDS -ge $end ] && { kill $f; echo 0; return; }; sleep 0.05; done
  local out rps
  out=$(wrk -t2 -c50 -d${D}s -H "Connection: close" http://127.0.0.1:$PUB/ 2>&1)
  rps=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
  kill $f; wait $f 2>/dev/null
  echo "${rps:-0}"
}
declare -A R
for rep in $(seq 1 $REPS); do
  for mode in ${MODES:-direct tunnel}; do
    if [ $((rep % 2)) -eq 1 ]; then order="base head"; else order="head base"; fi
    for side in $order; do
      b=$HEAD; [ $side = base ] && b=$BASE
      v=$(one $b $mode)
      echo "rep $rep $mode $side: $v req/s" >&2
      R[$mode.$side]="${R[$mode.$side]:-} $v"
    done
  done
done
kill $NG; wait $NG 2>/dev/null
echo "| mode (wrk -t2 -c50 Connection: close, ${D} s, ${REPS} reps) | base req/s | head req/s | head/base medians | median of pair ratios | runs base · head |"
echo "|---|---|---|---|---|---|"
for mode in ${MODES:-direct tunnel}; do
  mb=$(median ${R[$mode.base]}) mh=$(median ${R[$mode.head]})
  pr=$(median $(paste <(printf '%s\n' ${R[$mode.head]}) <(printf '%s\n' ${R[$mode.base]}) | awk '$2 > 0 {printf "%.3f\n", $1 / $2}'))
  echo "| $mode | $mb | $mh | $(awk -v a=$mh -v b=$mb 'BEGIN{ if (b > 0) printf "%.3f", a / b; else print 0 }') | $pr |${R[$mode.base]} ·${R[$mode.head]} |"
done
