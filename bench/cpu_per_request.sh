#!/usr/bin/env bash
# CPU per new connection of portmux direct and haproxy (nbthread 1), the two forwarders of
# issue 19's `Connection: close` goal, in the same run: wrk -t2 -c50 with "Connection:
# close" against an nginx backend through each in turn (REPS pairs, alternating), and each
# forwarder's user and system CPU time across the run from /proc/PID/stat, divided by the
# requests wrk completed. Prints µs per request (user, system) and req/s per run, then the
# medians and portmux's CPU per request as a share of haproxy's. Loopback only; exit 0
# whatever the numbers (nothing here is pass/fail).
#
#   bench/cpu_per_request.sh
#   env: REPS=3 D=5 (seconds per wrk run) PORTMUX_BUILD_DIR (default ./build)
#        ports PUB=19540 HTTP=19541 HAPROXY=19542 PORTMUX_API_PORT=19543 PORTMUX_TUNNEL_PORT=19544
set -u
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
REPS=${REPS:-3} D=${D:-5}
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
W=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}/cpu-per-request; rm -rf "$W"; mkdir -p "$W/nginx"
export PUB=${PUB:-19540} PORTMUX_API_PORT=${PORTMUX_API_PORT:-19543}
export PORTMUX_TUNNEL_PORT=${PORTMUX_TUNNEL_PORT:-19544} BENCH_WORK=$W
HTTP=${HTTP:-19541} HAPROXY=${HAPROXY:-19542}
BUILD=${PORTMUX_BUILD_DIR:-$REPO/build}
. "$BENCH/lib.sh"  # start_nginx_ok wait_listen stop_tree median haproxy_tcp_cfg
PIDS=()
trap '[ ${#PIDS[@]} -gt 0 ] && stop_tree "${PIDS[@]}"' EXIT
trap 'exit 130' INT TERM
for p in $PUB $HTTP $HAPROXY $PORTMUX_API_PORT $PORTMUX_TUNNEL_PORT; do
  if listening "$p"; then echo "cpu_per_request.sh: port $p is in use" >&2; exit 2; fi
done
[ -x "$BUILD/portmux-server" ] || { echo "cpu_per_request.sh: no $BUILD/portmux-server" >&2; exit 2; }

start_nginx_ok "$W" "$HTTP" "$W/nginx.log"
PIDS+=("$NGINX_PID")
wait_listen "$HTTP" 10 || { echo "cpu_per_request.sh: nginx did not listen" >&2; exit 2; }
haproxy_tcp_cfg "$HAPROXY" "$HTTP" 4000 1 > "$W/haproxy.cfg"
haproxy -db -f "$W/haproxy.cfg" > "$W/haproxy.log" 2>&1 &
HAP=$!
PIDS+=("$HAP")
PORTMUX_SERVER=$BUILD/portmux-server BACKEND=$HTTP READY_FILE=$W/ready \
  "$BENCH/portmux-fwd.sh" direct >> "$W/fwd.log" 2>&1 </dev/null &
FWD=$!
PIDS+=("$FWD")
wait_listen "$HAPROXY" 10 "$HAP" || { echo "cpu_per_request.sh: haproxy did not start (see $W/haproxy.log)" >&2; exit 2; }
for _ in $(seq 200); do [ -s "$W/ready" ] && break; sleep 0.1; done
[ -s "$W/ready" ] || { echo "cpu_per_request.sh: portmux did not start (see $W/fwd.log)" >&2; exit 2; }
PM=
for p in $(python3 "$BENCH/proc.py" tree "$FWD"); do
  [ "$(cat "/proc/$p/comm" 2>/dev/null)" = portmux-server ] && PM=$p
done
[ -n "$PM" ] || { echo "cpu_per_request.sh: no portmux-server under the wrapper" >&2; exit 2; }

ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }  # utime stime, clock ticks
one() {  # one PID PORT -> "user_us sys_us rps"
  local a b out n hz
  hz=$(getconf CLK_TCK)
  a=$(ticks "$1")
  out=$(timeout $((D + 30)) wrk -t2 -c50 -d"${D}s" -H "Connection: close" "http://127.0.0.1:$2/" 2>&1)
  b=$(ticks "$1")
  n=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
  [ -n "$n" ] && [ "$n" -gt 0 ] || { echo "NA NA NA"; return; }
  awk -v a="$a" -v b="$b" -v n="$n" -v hz="$hz" -v d="$D" 'BEGIN {
    split(a, x, " "); split(b, y, " ");
    printf "%.2f %.2f %.0f\n", (y[1] - x[1]) / hz * 1e6 / n, (y[2] - x[2]) / hz * 1e6 / n, n / d }'
}
declare -A U S R
for rep in $(seq "$REPS"); do
  order="portmux haproxy1"; [ $((rep % 2)) = 0 ] && order="haproxy1 portmux"
  for name in $order; do
    if [ "$name" = portmux ]; then set -- $(one "$PM" "$PUB"); else set -- $(one "$HAP" "$HAPROXY"); fi
    printf 'rep %d %-8s user %6s us/req  system %6s us/req  %6s req/s\n' "$rep" "$name" "$1" "$2" "$3"
    U[$name]="${U[$name]:-} $1" S[$name]="${S[$name]:-} $2" R[$name]="${R[$name]:-} $3"
  done
done
for name in portmux haproxy1; do
  # shellcheck disable=SC2086
  printf 'median %-8s user %6s us/req  system %6s us/req  %6s req/s\n' "$name" \
    "$(median ${U[$name]})" "$(median ${S[$name]})" "$(median ${R[$name]})"
done
# shellcheck disable=SC2086
awk -v pu="$(median ${U[portmux]})" -v ps="$(median ${S[portmux]})" \
    -v hu="$(median ${U[haproxy1]})" -v hs="$(median ${S[haproxy1]})" 'BEGIN {
  if (pu == "NA" || hu == "NA") { print "no data"; exit }
  printf "portmux CPU per request / haproxy1: %.2f (system time alone: %.2f of haproxy1 total)\n",
         (pu + ps) / (hu + hs), ps / (hu + hs) }'
