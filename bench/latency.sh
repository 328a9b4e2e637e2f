#!/usr/bin/env bash
# The tunnel where it runs: across a WAN round trip (issue 19, item 3). Loopback only.
#
#   bench/latency.sh            at 20 ms and 100 ms RTT: one stream's throughput through a
#                               portmux tunnel, through ssh -R and plain TCP (the limit); time
#                               to first byte of a new connection (HTTP GET) through the tunnel,
#                               a direct mapping, ssh -R and plain TCP; a table with the goals
#   bench/latency.sh --smoke    20 ms only, portmux and plain TCP, 1 rep, 1 s iperf3, 3 GETs:
#                               checks that the delay line delays and every path works
#   options: --rtt 20,100 (round trips, ms) --no-ssh
#            --rate MBIT (or LAT_RATE_MBIT): each delay line is also a link of MBIT Mbit/s per
#                               direction (delayline -r): a WAN whose bandwidth, not this
#                               machine's CPUs, is the limit; results go to latency-MBITmbit/
#   env:     LAT_T=8 (iperf3 seconds, after LAT_OMIT=2 s of ramp-up that are not counted)
#            LAT_REPS=3 (throughput repetitions) LAT_TTFB_N=9 (GETs per path) LAT_PORT=19300
#            (first of the ports it uses, up to +35) LAT_CAP_MB=64 (bytes the delay line holds
#            per direction of a connection, MiB: what is in flight on the "WAN" is at most
#            this, so a path moves at most LAT_CAP_MB / (RTT/2): 3 acts like a 6 MiB TCP
#            window across the WAN) LAT_TUNNEL_BUFFER_MB (default 2 × LAT_CAP_MB: the tunnel's
#            session buffer limit, server and client, so that it may keep as much in flight
#            per round trip as the delay line lets plain TCP; the path "tunnel-default" runs
#            beside it with the default 64 MiB) PORTMUX_SERVER PORTMUX_CLIENT
#            PORTMUX_BUILD_DIR BENCH_WORK (default /tmp/portmux-bench; this writes latency/)
#
# The delay line (bench/delayline.c, built here with gcc into $BENCH_WORK/latency: it is a
# bench tool, not part of the product's build) sits where the WAN is:
#   tunnel:  iperf3/curl -> portmux-server -> [tunnel port <- delay line <- portmux-client] -> backend
#            (throughput twice: with LAT_TUNNEL_BUFFER_MB, and with the default budget; one
#            stream moves at most about the budget per round trip: 64 MiB / 100 ms = 5.4 Gb/s)
#   ssh -R:  iperf3/curl -> sshd -> [sshd port <- delay line <- ssh] -> backend
#   direct:  curl -> portmux-server (direct mapping) -> delay line -> nginx
#   plain:   iperf3/curl -> delay line -> backend
# Repetitions are interleaved across the paths (plain, tunnel, ssh, plain, ...), so drift
# on a shared machine lands on all of them; medians are reported with min–max.
# Exit status: 0 when every portmux path and the delay line worked, 1 when one is broken (the
# delay line's self-check fails: an echo through it comes back changed, or sooner than the
# round trip; no throughput; HTTP errors; a time to first byte shorter than the round trip),
# 2 on a set-up error. Never for slowness. Every step has a time limit.
set -u
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
export BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}
SMOKE=0 SSH=1 RTTS="" RATE=${LAT_RATE_MBIT:-}
while [ $# -gt 0 ]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --no-ssh) SSH=0 ;;
    --rate) RATE=${2:?--rate needs Mbit/s}; shift ;;
    --rate=*) RATE=${1#--rate=} ;;
    --rtt) RTTS=${2:?--rtt needs a list}; shift ;;
    --rtt=*) RTTS=${1#--rtt=} ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "latency.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ $SMOKE = 1 ]; then
  RTTS=${RTTS:-20} SSH=0
  LAT_T=${LAT_T:-1} LAT_OMIT=${LAT_OMIT:-0} LAT_REPS=${LAT_REPS:-1} LAT_TTFB_N=${LAT_TTFB_N:-3}
else
  RTTS=${RTTS:-20,100}
  LAT_T=${LAT_T:-8} LAT_OMIT=${LAT_OMIT:-2} LAT_REPS=${LAT_REPS:-3} LAT_TTFB_N=${LAT_TTFB_N:-9}
fi
RTTS=${RTTS//,/ }
case $RATE in
  '') ;;
  *[!0-9]*|0*) echo "latency.sh: --rate takes whole Mbit/s, 1..1000000: $RATE" >&2; exit 2 ;;
  *) [ "$RATE" -le 1000000 ] || { echo "latency.sh: --rate $RATE: at most 1000000" >&2; exit 2; } ;;
esac
L=$BENCH_WORK/latency${RATE:+-${RATE}mbit}
RUN=$L/run
for r in $RTTS; do
  case $r in ''|*[!0-9]*) echo "latency.sh: --rtt takes whole milliseconds, even: $r" >&2; exit 2 ;; esac
  [ $((r % 2)) = 0 ] && [ "$r" -le 2000 ] || { echo "latency.sh: RTT $r: even, at most 2000 ms" >&2; exit 2; }
done

B=${LAT_PORT:-19300}
IPERF_PORT=$((B + 1)) HTTP_PORT=$((B + 2)) SSH_PORT=$((B + 3))
ECHO_PORT=$((B + 4))
DL_PLAIN=$((B + 10)) DL_HTTP=$((B + 11)) DL_TUN_IPERF=$((B + 12)) DL_TUN_HTTP=$((B + 13)) DL_SSH=$((B + 14))
DL_ECHO=$((B + 15))
PM_TI_API=$((B + 20)) PM_TI_TUN=$((B + 21)) PM_TI_PUB=$((B + 22))   # tunnel, iperf3 mapping
PM_TH_API=$((B + 23)) PM_TH_TUN=$((B + 24)) PM_TH_PUB=$((B + 25))   # tunnel, HTTP mapping
PM_DH_API=$((B + 26)) PM_DH_PUB=$((B + 27)) PM_DH_TUN=$((B + 28))   # direct mapping, HTTP
SSH_IPERF_PUB=$((B + 30)) SSH_HTTP_PUB=$((B + 31))
DL_TUN64=$((B + 32)) PM_T64_API=$((B + 33)) PM_T64_TUN=$((B + 34)) PM_T64_PUB=$((B + 35))  # default budget
TUNNEL_BUFFER_MB=${LAT_TUNNEL_BUFFER_MB:-$((2 * ${LAT_CAP_MB:-64}))}
BUILD_DIR=${PORTMUX_BUILD_DIR:-$REPO/build}
export PORTMUX_SERVER=${PORTMUX_SERVER:-$BUILD_DIR/portmux-server}
export PORTMUX_CLIENT=${PORTMUX_CLIENT:-$BUILD_DIR/portmux-client}
DELAYLINE=$L/delayline
TSV=$L/results-latency.tsv
LOG=$L/latency.log

mkdir -p "$RUN"
: > "$LOG"
log() { echo "$*" | tee -a "$LOG"; }
say() { echo "== $*"; echo "== $*" >> "$LOG"; }
. "$BENCH/lib.sh"  # listening wait_listen median stop_tree

# ---- processes: only PIDs started here, and their descendants ----
PIDS=()
stop_all() { [ ${#PIDS[@]} -gt 0 ] && stop_tree "${PIDS[@]}"; PIDS=(); }
trap stop_all EXIT
trap 'exit 130' INT TERM

# ---- the delay line: built from bench/delayline.c with the project's warning flags ----
build_delayline() {
  local src=$BENCH/delayline.c flags
  [ -x "$DELAYLINE" ] && [ "$DELAYLINE" -nt "$src" ] && return 0
  flags=$(pkg-config --cflags --libs libevent 2>/dev/null) ||
    { echo "latency.sh: pkg-config finds no libevent (scripts/install-deps.sh build)" >&2; return 1; }
  # shellcheck disable=SC2086
  timeout 120 gcc -std=c11 -O2 -g -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
    -D_GNU_SOURCE ${DELAYLINE_CFLAGS:-} -o "$DELAYLINE.tmp" "$src" $flags && mv "$DELAYLINE.tmp" "$DELAYLINE"
}
start_delay() {  # start_delay LISTENPORT TARGETPORT ONEWAY_MS
  "$DELAYLINE" -l "127.0.0.1:$1" -t "127.0.0.1:$2" -d "$3" -m "${LAT_CAP_MB:-64}" ${RATE:+-r "$RATE"} \
    >>"$RUN/delayline.log" 2>&1 &
  PIDS+=($!)
  wait_listen "$1" 10 $! || { log "ERROR: delay line on $1 did not listen (see $RUN/delayline.log)"; return 1; }
}

# ---- backends: iperf3 server, nginx (as in peers.sh) ----
start_backends() {
  iperf3 -s -p $IPERF_PORT >>"$RUN/backend.log" 2>&1 &
  PIDS+=($!)
  start_nginx_ok "$RUN" $HTTP_PORT "$RUN/backend.log"
  PIDS+=($NGINX_PID)
  wait_listen $IPERF_PORT 10 || { log "ERROR: iperf3 server not listening"; return 1; }
  wait_listen $HTTP_PORT 10 || { log "ERROR: nginx not listening"; return 1; }
}

# ---- portmux through bench/portmux-fwd.sh (fresh server, database and client each) ----
start_portmux() {  # start_portmux NAME MODE API TUNNEL PUB BACKEND [DIAL [BUFFER_BYTES]]
  local name=$1 mode=$2 ready=$RUN/ready-$1
  rm -f "$ready"
  PUB=$5 BACKEND=$6 PORTMUX_API_PORT=$3 PORTMUX_TUNNEL_PORT=$4 READY_FILE=$ready \
    PORTMUX_SESSION_BUFFER_LIMIT=${8:-} \
    PORTMUX_FWD_DIR=$RUN/portmux-$name PORTMUX_TUNNEL_DIAL=${7:-127.0.0.1:$4} \
    "$BENCH/portmux-fwd.sh" "$mode" >>"$RUN/portmux-$name.log" 2>&1 </dev/null &
  local i pid=$!
  PIDS+=("$pid")
  # the client's Hello and the mapping cross the delay line: a few round trips
  for i in $(seq 300); do [ -s "$ready" ] && return 0; [ -e /proc/$pid ] || break; sleep 0.1; done
  log "ERROR: portmux $name not ready (see $RUN/portmux-$name.log)"
  return 1
}

# ---- ssh -R (as peers.sh sets it up), the client reaching sshd through the delay line ----
start_ssh() {
  local k=$BENCH_WORK/ssh
  mkdir -p "$k" /run/sshd
  [ -f "$k/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$k/host_ed25519"
  [ -f "$k/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$k/client_ed25519"
  cp "$k/client_ed25519.pub" "$L/authorized_keys"
  cat > "$L/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $k/host_ed25519
PidFile $RUN/sshd.pid
AuthorizedKeysFile $L/authorized_keys
PermitRootLogin yes
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
PrintMotd no
UseDNS no
LogLevel ERROR
EOF
  /usr/sbin/sshd -D -e -f "$L/sshd_config" >>"$RUN/ssh.log" 2>&1 &
  PIDS+=($!)
  wait_listen $SSH_PORT 10 $! || { log "ERROR: sshd did not listen"; return 1; }
  timeout -k 5 36000 ssh -N -c aes128-gcm@openssh.com -o BatchMode=yes -o StrictHostKeyChecking=no \
    -o UserKnownHostsFile=/dev/null -o ExitOnForwardFailure=yes -o LogLevel=ERROR \
    -i "$k/client_ed25519" -p $DL_SSH \
    -R 127.0.0.1:$SSH_IPERF_PUB:127.0.0.1:$IPERF_PORT -R 127.0.0.1:$SSH_HTTP_PUB:127.0.0.1:$HTTP_PORT \
    "$(id -un)@127.0.0.1" >>"$RUN/ssh.log" 2>&1 </dev/null &
  PIDS+=($!)
  wait_listen $SSH_IPERF_PUB 30 $! && wait_listen $SSH_HTTP_PUB 10 $! ||
    { log "ERROR: ssh -R did not come up (see $RUN/ssh.log)"; return 1; }
}

# ---- measures ----
iperf_once() {  # iperf_once PORT -> Mbit/s received, or NA
  local js
  js=$(timeout $((LAT_T + LAT_OMIT + 30)) iperf3 -c 127.0.0.1 -p "$1" -t "$LAT_T" -O "$LAT_OMIT" -J 2>&1)
  printf '%s' "$js" | python3 -c '
import json, sys
try:
    print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e6))
except Exception:
    print("NA")
' || echo NA
  printf '%s\n' "$js" | grep -i '"error"' | head -2 >> "$LOG"
}
ttfb_once() {  # ttfb_once PORT -> ms to the first byte of the response, or NA (not a 200)
  local out
  out=$(timeout 30 curl -s -o /dev/null --max-time 20 -w '%{http_code} %{time_starttransfer}' \
    "http://127.0.0.1:$1/" 2>/dev/null)
  set -- $out
  if [ "${1:-}" = 200 ]; then awk -v s="$2" 'BEGIN{printf "%.2f\n", s * 1000}'; else echo NA; fi
}

# The delay line itself, before anything is measured through it: 8 MiB echoed through it
# (bench/hold.py's echo server) come back whole and in order, a 4-byte ping no sooner than the
# round trip, and the FIN no sooner either.
delay_selfcheck() {  # delay_selfcheck RTT_MS
  python3 "$BENCH/hold.py" server $ECHO_PORT >>"$RUN/backend.log" 2>&1 &
  PIDS+=($!)
  wait_listen $ECHO_PORT 10 || { log "ERROR: echo server not listening"; return 1; }
  start_delay $DL_ECHO $ECHO_PORT $(( $1 / 2 )) || return 1
  timeout 60 python3 -c '
import os, socket, sys, threading, time
port, rtt = int(sys.argv[1]), float(sys.argv[2])
s = socket.create_connection(("127.0.0.1", port), timeout=30)
t = time.monotonic(); s.sendall(b"ping"); got = b""
while len(got) < 4:
    d = s.recv(4 - len(got))
    if not d: break
    got += d
ping = (time.monotonic() - t) * 1000
blob, back = os.urandom(8 << 20), bytearray()
def rd():
    while len(back) < len(blob):
        d = s.recv(1 << 20)
        if not d: break
        back.extend(d)
th = threading.Thread(target=rd); th.start(); s.sendall(blob); th.join(30)
s.shutdown(socket.SHUT_WR); t = time.monotonic(); end = s.recv(16); fin = (time.monotonic() - t) * 1000
errs = []
if got != b"ping" or ping < rtt: errs.append("ping %r after %.2f ms" % (got, ping))
if bytes(back) != blob: errs.append("8 MiB echo: %d bytes back, %s" % (len(back), "different" if len(back) == len(blob) else "short"))
if end != b"" or fin < rtt: errs.append("FIN after %.2f ms (%r)" % (fin, end))
print("delay line self-check: ping %.2f ms, 8 MiB echo %s, FIN after %.2f ms: %s" % (ping, "intact" if bytes(back) == blob else "BROKEN", fin, "; ".join(errs) or "ok"))
sys.exit(1 if errs else 0)
' $DL_ECHO "$1" 2>&1 | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" = 0 ] || { log "ERROR: the delay line failed its self-check at $1 ms"; return 1; }
}

# results: one row per RTT, measure and path, with every repetition
tsv_row() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$TSV"; }

bench_rtt() {  # bench_rtt RTT_MS
  local rtt=$1 d=$(( $1 / 2 )) i p v tput_paths ttfb_paths
  declare -A TP TF
  say "RTT $rtt ms ($d ms each way): starting the paths"
  delay_selfcheck "$rtt" || return 1
  start_backends || return 1
  start_delay $DL_PLAIN $IPERF_PORT $d || return 1
  start_delay $DL_HTTP $HTTP_PORT $d || return 1
  start_delay $DL_TUN_IPERF $PM_TI_TUN $d || return 1
  start_delay $DL_TUN_HTTP $PM_TH_TUN $d || return 1
  tput_paths="plain" ttfb_paths="plain"
  start_delay $DL_TUN64 $PM_T64_TUN $d || return 1
  start_portmux tunnel-iperf tunnel $PM_TI_API $PM_TI_TUN $PM_TI_PUB $IPERF_PORT 127.0.0.1:$DL_TUN_IPERF \
    $((TUNNEL_BUFFER_MB << 20)) && tput_paths="$tput_paths tunnel"
  start_portmux tunnel-iperf64 tunnel $PM_T64_API $PM_T64_TUN $PM_T64_PUB $IPERF_PORT 127.0.0.1:$DL_TUN64 &&
    tput_paths="$tput_paths tunnel-default"
  start_portmux tunnel-http tunnel $PM_TH_API $PM_TH_TUN $PM_TH_PUB $HTTP_PORT 127.0.0.1:$DL_TUN_HTTP &&
    ttfb_paths="$ttfb_paths tunnel"
  # a direct mapping whose target is across the WAN: the delay line in front of nginx
  start_portmux direct-http direct $PM_DH_API $PM_DH_TUN $PM_DH_PUB $DL_HTTP && ttfb_paths="$ttfb_paths direct"
  if [ $SSH = 1 ]; then
    start_delay $DL_SSH $SSH_PORT $d || return 1
    start_ssh && { tput_paths="$tput_paths ssh"; ttfb_paths="$ttfb_paths ssh"; }
  fi
  declare -A PORT_T=([plain]=$DL_PLAIN [tunnel]=$PM_TI_PUB [tunnel-default]=$PM_T64_PUB [ssh]=$SSH_IPERF_PUB)
  declare -A PORT_H=([plain]=$DL_HTTP [tunnel]=$PM_TH_PUB [direct]=$PM_DH_PUB [ssh]=$SSH_HTTP_PUB)

  say "RTT $rtt ms: one iperf3 stream, $LAT_REPS × ($tput_paths) interleaved, ${LAT_T} s each after ${LAT_OMIT} s"
  for i in $(seq "$LAT_REPS"); do
    for p in $tput_paths; do
      v=$(iperf_once "${PORT_T[$p]}")
      log "  rtt $rtt rep $i $p: $v Mbit/s"
      TP[$p]="${TP[$p]:-}${TP[$p]:+,}$v"
    done
  done
  say "RTT $rtt ms: time to first byte, $LAT_TTFB_N × ($ttfb_paths) interleaved, a new connection each"
  for i in $(seq "$LAT_TTFB_N"); do
    for p in $ttfb_paths; do
      v=$(ttfb_once "${PORT_H[$p]}")
      TF[$p]="${TF[$p]:-}${TF[$p]:+,}$v"
    done
  done
  for p in plain tunnel tunnel-default ssh; do [ -n "${TP[$p]:-}" ] && tsv_row "$rtt" tput_mbps "$p" "${TP[$p]}"; done
  for p in plain direct tunnel ssh; do
    [ -n "${TF[$p]:-}" ] && { tsv_row "$rtt" ttfb_ms "$p" "${TF[$p]}"; log "  rtt $rtt ttfb $p: ${TF[$p]} ms"; }
  done
  stop_all
  return 0
}

# ---- main ----
for p in $IPERF_PORT $HTTP_PORT $SSH_PORT $ECHO_PORT $DL_ECHO $DL_PLAIN $DL_HTTP $DL_TUN_IPERF $DL_TUN_HTTP $DL_SSH \
    $PM_TI_API $PM_TI_TUN $PM_TI_PUB $PM_TH_API $PM_TH_TUN $PM_TH_PUB $PM_DH_API $PM_DH_PUB $PM_DH_TUN \
    $SSH_IPERF_PUB $SSH_HTTP_PUB $DL_TUN64 $PM_T64_API $PM_T64_TUN $PM_T64_PUB; do
  if listening "$p"; then echo "latency.sh: port $p is in use; set LAT_PORT (see --help)" >&2; exit 2; fi
done
[ -x "$PORTMUX_SERVER" ] || { echo "latency.sh: no server binary at $PORTMUX_SERVER" >&2; exit 2; }
build_delayline || { echo "latency.sh: cannot build $DELAYLINE from bench/delayline.c" >&2; exit 2; }
rm -f "$TSV"
printf 'rtt_ms\tmeasure\tpath\tvalues\n' > "$TSV"
{
  echo "- date: $(date '+%F %T %Z'); load average at start: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) CPUs; $(uname -sr)"
  echo "- portmux: $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null); knobs: RTTs '$RTTS' ms, ${RATE:+link $RATE Mbit/s each way, }LAT_CAP_MB=${LAT_CAP_MB:-64} LAT_TUNNEL_BUFFER_MB=$TUNNEL_BUFFER_MB LAT_T=$LAT_T LAT_OMIT=$LAT_OMIT LAT_REPS=$LAT_REPS LAT_TTFB_N=$LAT_TTFB_N"
} > "$L/machine.txt"
T0=$SECONDS
rc=0
for r in $RTTS; do bench_rtt "$r" || rc=1; stop_all; done
echo "- load average at the end: $(cut -d' ' -f1-3 /proc/loadavg); measurements took $((SECONDS - T0)) s" >> "$L/machine.txt"
if [ -n "$RATE" ]; then rep_args=(--latency-link "$TSV" --link-rate "$RATE"); else rep_args=(--latency "$TSV"); fi
python3 "$BENCH/report.py" "${rep_args[@]}" --machine "$L/machine.txt" --check-latency > "$L/results.md"
prc=$?
cat "$L/results.md"
echo
echo "(results: $L/results.md; raw: $TSV, $LOG, $RUN/)"
[ $rc = 0 ] && rc=$prc
exit $rc
