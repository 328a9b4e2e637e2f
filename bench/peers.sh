#!/usr/bin/env bash
# Loopback (127.0.0.1 only) benchmark of TCP forwarders / tunnels. Adapted for portmux from
# the shared peer harness: portmux built-ins, idle memory at several connection counts
# (NCONNS), configurable ports, results by column name (report.py). bench/run.sh drives it.
#
#   ./peers.sh                      # default set: none portmux-direct portmux-tunnel portmux-tls haproxy1 ssh-gcm
#   ./peers.sh socat ssh            # a subset; built-ins: none haproxy1 haproxy socat rinetd ssh ssh-gcm
#                                   #   portmux-direct portmux-tunnel portmux-tls (bench/portmux-fwd.sh)
#   FWD_NAME=myfwd FWD_CMD='./myfwd -l 127.0.0.1:$PUB -t 127.0.0.1:$BACKEND' ./peers.sh custom
#   ./peers.sh table                # print markdown table of results-peers.tsv
#
# FWD_CMD is run by `bash -c` with $PUB (public port to listen on) and $BACKEND (backend port on
# 127.0.0.1) exported. It must stay in the foreground (no daemonizing); it may start several
# processes (e.g. tunnel server + client: 'srv ... & sleep 0.2; cli ... & wait'). CPU and memory are
# summed over that bash process and all its descendants. The harness waits until $PUB listens.
#
# Repetitions are interleaved: iperf3 rep 1 through every forwarder (each freshly started), rep 2
# through every forwarder, ...; then wrk likewise; then idle memory per forwarder. The TSV has the
# medians and, in the *_reps columns, every repetition (report.py shows min–max beside medians).
# Knobs (env): REPS=3 (repetitions of each iperf3 and wrk measure; medians) IPERF_T=5 WRK_D=5 WRK_C=50 NCONNS="500 10000" HOLD=5 PUB=19000
#   ports: IPERF_PORT=19201 HTTP_PORT=19080 HOLD_PORT=19090 SSH_PORT=19022 (all on 127.0.0.1)
#   portmux: PORTMUX_SERVER PORTMUX_CLIENT PORTMUX_API_PORT=19100 PORTMUX_TUNNEL_PORT=19101
set -u
cd "$(dirname "$0")"
BENCH=$(pwd)
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}
export BENCH_WORK=$WORK
RUN=$WORK/run
mkdir -p "$RUN"
OUT=${OUT:-$WORK/results-peers.txt}
TSV=${TSV:-$WORK/results-peers.tsv}
REPS=${REPS:-3}; IPERF_T=${IPERF_T:-5}; WRK_D=${WRK_D:-5}; WRK_C=${WRK_C:-50}
NCONNS=${NCONNS:-${NCONN:-500 10000}}; HOLD=${HOLD:-5}
export PUB=${PUB:-19000}
IPERF_PORT=${IPERF_PORT:-19201}; HTTP_PORT=${HTTP_PORT:-19080}; HOLD_PORT=${HOLD_PORT:-19090}
SSH_PORT=${SSH_PORT:-19022}
export PORTMUX_API_PORT=${PORTMUX_API_PORT:-19100} PORTMUX_TUNNEL_PORT=${PORTMUX_TUNNEL_PORT:-19101}
export READY_FILE=$RUN/fwd-ready
# 10,000 idle connections need ~10k fds in each of the holder, the backend and a forwarder
# process (20k in a one-process forwarder): raise the limit, the hard one too when root.
ulimit -Hn 65536 2>/dev/null; ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 4096
# A one-process forwarder needs 2 fds per connection: where the hard limit cannot be raised
# (no CAP_SYS_RESOURCE), hold fewer connections than asked rather than run into EMFILE.
FDLIM=$(ulimit -n)
if [ "$FDLIM" != unlimited ]; then
  cap=$(( (FDLIM - 1000) / 2 / 100 * 100 )) new=""
  for n in $NCONNS; do
    if [ "$n" -gt "$cap" ]; then
      echo "NOTE: fd limit $FDLIM (hard $(ulimit -Hn)): idle-connection test capped at $cap instead of $n connections" | tee -a "$OUT"
      n=$cap
    fi
    new="$new $n"
  done
  NCONNS=${new# }
fi
MAXN=$(printf '%s\n' $NCONNS | sort -n | tail -1)
HAPROXY_MAXCONN=$(( MAXN + 200 > 4000 ? MAXN + 200 : 4000 ))

log() { echo "$*" | tee -a "$OUT"; }
. "$BENCH/lib.sh"  # listening wait_listen median stop_tree

BACK_PIDS=()
FWD_PID=
cleanup() { [ -n "$FWD_PID" ] && stop_tree $FWD_PID; [ ${#BACK_PIDS[@]} -gt 0 ] && stop_tree "${BACK_PIDS[@]}"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- backends ----
start_backends() {
  start_nginx_ok "$RUN" $HTTP_PORT "$RUN/backend.log"
  BACK_PIDS+=($NGINX_PID)
  python3 "$BENCH/hold.py" server $HOLD_PORT >>"$RUN/backend.log" 2>&1 &
  BACK_PIDS+=($!)
  wait_listen $HTTP_PORT 10 || log "ERROR: nginx backend not listening"
  wait_listen $HOLD_PORT 10 || log "ERROR: hold backend not listening"
}
IPERF_PID=
start_iperf() {
  iperf3 -s -p $IPERF_PORT >>"$RUN/backend.log" 2>&1 &
  IPERF_PID=$!
  wait_listen $IPERF_PORT 10 || log "ERROR: iperf3 server not listening"
}
stop_iperf() { [ -n "$IPERF_PID" ] && stop_tree $IPERF_PID; IPERF_PID=; }

# ---- forwarders ----
ensure_ssh() {
  mkdir -p "$WORK/ssh" /run/sshd
  [ -f "$WORK/ssh/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/host_ed25519"
  [ -f "$WORK/ssh/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/client_ed25519"
  cp "$WORK/ssh/client_ed25519.pub" "$WORK/ssh/authorized_keys"
  cat > "$WORK/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $WORK/ssh/host_ed25519
PidFile $RUN/sshd.pid
AuthorizedKeysFile $WORK/ssh/authorized_keys
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
MaxStartups 100
LogLevel ERROR
EOF
}

start_fwd() {  # start_fwd NAME BACKENDPORT ; sets TARGET (port the client dials) and FWD_PID
  local name=$1 cmd=""
  export BACKEND=$2
  FWD_PID=
  if [ "$name" = none ]; then TARGET=$BACKEND; return 0; fi
  TARGET=$PUB
  if listening $PUB; then log "ERROR: port $PUB already in use"; return 1; fi
  case $name in
    haproxy1|haproxy)
      haproxy_tcp_cfg $PUB $BACKEND $HAPROXY_MAXCONN $([ $name = haproxy1 ] && echo 1) > "$RUN/haproxy.cfg"
      cmd="exec haproxy -db -f $RUN/haproxy.cfg" ;;
    socat)
      cmd="exec socat TCP-LISTEN:$PUB,bind=127.0.0.1,fork,reuseaddr TCP:127.0.0.1:$BACKEND" ;;
    rinetd)
      printf '127.0.0.1 %s 127.0.0.1 %s\n' $PUB $BACKEND > "$RUN/rinetd.conf"
      cmd="exec rinetd -f -c $RUN/rinetd.conf" ;;
    ssh|ssh-gcm)
      ensure_ssh
      local c=""; [ $name = ssh-gcm ] && c="-c aes128-gcm@openssh.com"
      cmd="/usr/sbin/sshd -D -e -f $WORK/ssh/sshd_config &
        for i in \$(seq 100); do ss -Hltn 'sport = :$SSH_PORT' | grep -q . && break; sleep 0.1; done
        ssh -N $c -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
          -o ExitOnForwardFailure=yes -o LogLevel=ERROR -i $WORK/ssh/client_ed25519 -p $SSH_PORT \
          -R 127.0.0.1:$PUB:127.0.0.1:$BACKEND root@127.0.0.1 &
        wait" ;;
    portmux-direct|portmux-tunnel|portmux-tls)
      cmd="exec $BENCH/portmux-fwd.sh ${name#portmux-}" ;;
    custom)
      [ -n "${FWD_CMD:-}" ] || { log "ERROR: custom needs FWD_CMD"; return 1; }
      cmd=$FWD_CMD ;;
    *) log "ERROR: unknown forwarder $name"; return 1 ;;
  esac
  echo "=== $(date +%T) start $name backend=$BACKEND" >> "$RUN/fwd.log"
  rm -f "$READY_FILE"
  bash -c "$cmd" >>"$RUN/fwd.log" 2>&1 </dev/null &
  FWD_PID=$!
  local j; for j in $(seq 200); do listening $PUB && break; [ -e /proc/$FWD_PID ] || break; sleep 0.1; done
  if ! listening $PUB; then log "ERROR: $name did not listen on $PUB (see $RUN/fwd.log)"; stop_fwd; return 1; fi
  if [ "${name#portmux-}" != "$name" ]; then  # portmux-fwd.sh says when the mapping is live
    local i; for i in $(seq 200); do [ -s "$READY_FILE" ] && break; [ -e /proc/$FWD_PID ] || break; sleep 0.1; done
    if [ ! -s "$READY_FILE" ]; then log "ERROR: $name not ready (see $RUN/fwd.log)"; stop_fwd; return 1; fi
  fi
  sleep 0.5
}
stop_fwd() {
  [ -n "$FWD_PID" ] && stop_tree $FWD_PID
  FWD_PID=
  local i; for i in $(seq 50); do listening $PUB || break; sleep 0.1; done
}
fwd_cpu() { if [ -n "$FWD_PID" ]; then python3 "$BENCH/proc.py" cpu $FWD_PID; else echo NA; fi; }
fwd_mem() { if [ -n "$FWD_PID" ]; then python3 "$BENCH/proc.py" mem $FWD_PID; else echo "NA NA 0"; fi; }

# ---- measurements ----
iperf_once() {  # iperf_once FLAGS -> prints "GBPS CPU_S_PER_GB"
  local c0 c1 js res
  c0=$(fwd_cpu)
  js=$(timeout $((IPERF_T + 25)) iperf3 -c 127.0.0.1 -p $TARGET -t $IPERF_T $1 -J 2>&1)
  c1=$(fwd_cpu)
  res=$(printf '%s' "$js" | python3 -c '
import json,sys
c0,c1=sys.argv[1],sys.argv[2]
try:
    e=json.load(sys.stdin)["end"]["sum_received"]
    gbps=e["bits_per_second"]/1e9; gb=e["bytes"]/1e9
    cpu="NA" if c0=="NA" or gb==0 else "%.3f"%((float(c1)-float(c0))/gb)
    print("%.2f %s %.2f"%(gbps,cpu,gb))
except Exception as ex:
    print("NA NA 0")
' "$c0" "$c1")
  [ "${res%% *}" = NA ] && echo "$js" | grep -i error | head -3 >> "$OUT"
  echo "$res"
}

wrk_once() {  # wrk_once "close"|"keepalive" -> prints "RPS P50MS P99MS ERRS"
  local hdr=() out
  [ "$1" = close ] && hdr=(-H "Connection: close")
  out=$(timeout $((WRK_D + 20)) wrk -t2 -c$WRK_C -d${WRK_D}s --latency "${hdr[@]}" http://127.0.0.1:$TARGET/ 2>&1)
  echo "$out" | sed 's/^/    | /' >> "$OUT"
  printf '%s' "$out" | python3 -c '
import re,sys
t=sys.stdin.read()
def ms(v):
    m=re.match(r"([\d.]+)(us|ms|s|m)",v); x=float(m.group(1))
    return x*{"us":1e-3,"ms":1,"s":1e3,"m":6e4}[m.group(2)]
try:
    rps=float(re.search(r"Requests/sec:\s+([\d.]+)",t).group(1))
    p50=ms(re.search(r"\n\s+50%\s+(\S+)",t).group(1)); p99=ms(re.search(r"\n\s+99%\s+(\S+)",t).group(1))
    m=re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",t)
    errs=sum(map(int,m.groups())) if m else 0
    n=re.search(r"Non-2xx or 3xx responses: (\d+)",t); errs+=int(n.group(1)) if n else 0
    print("%.0f %.3f %.3f %d"%(rps,p50,p99,errs))
except Exception:
    print("NA NA NA NA")
'
}

# Every repetition of a measure goes round all the forwarders (a, b, c, a, b, c, ...) with a
# fresh start of each, so drift on a shared machine lands on all of them; the medians and
# each repetition (for the min–max in the table) are kept per forwarder and measure.
declare -A REPV ERRS
add_rep() { REPV[$1]="${REPV[$1]:-}${REPV[$1]:+,}$2"; }   # add_rep "LABEL|KEY" VALUE
rep_median() { local -a xs; IFS=, read -ra xs <<< "${REPV[$1]:-NA}"; median "${xs[@]}"; }
label_of() { if [ "$1" = custom ]; then echo "${FWD_NAME:-custom}"; else echo "$1"; fi; }

iperf_rep() {  # iperf_rep NAME REP: the three iperf3 measures through a fresh forwarder
  local name=$1 rep=$2 label v r flags
  label=$(label_of "$1")
  if start_fwd $name $IPERF_PORT; then
    for v in 1 P8 R; do
      flags=""; [ $v = P8 ] && flags="-P 8"; [ $v = R ] && flags="-R"
      r=$(iperf_once "$flags"); set -- $r
      log "  $label iperf3 $v rep$rep: $1 Gbit/s  fwd_cpu ${2} s/GB  (${3} GB)"
      add_rep "$label|gbps_$v" "$1"; add_rep "$label|cpu_s_per_GB_$v" "$2"
    done
    stop_fwd
  else
    for v in 1 P8 R; do add_rep "$label|gbps_$v" NA; add_rep "$label|cpu_s_per_GB_$v" NA; done
  fi
}

wrk_rep() {  # wrk_rep NAME REP: wrk Connection: close, then keep-alive, through a fresh forwarder
  local name=$1 rep=$2 label kind k r
  label=$(label_of "$1")
  if start_fwd $name $HTTP_PORT; then
    for kind in close keepalive; do
      k=$kind; [ $kind = keepalive ] && k=ka
      r=$(wrk_once $kind); set -- $r
      log "  $label wrk $kind rep$rep: rps p50ms p99ms errors = $1 $2 $3 $4"
      add_rep "$label|${k}_rps" "$1"; add_rep "$label|${k}_p50ms" "$2"; add_rep "$label|${k}_p99ms" "$3"
      [ "$4" != NA ] && ERRS[$label|$k]=$(( ${ERRS[$label|$k]:-0} + $4 ))
      sleep 1
    done
    stop_fwd
  else
    for k in close ka; do add_rep "$label|${k}_rps" NA; add_rep "$label|${k}_p50ms" NA; add_rep "$label|${k}_p99ms" NA; done
  fi
}

REP_KEYS="gbps_1 gbps_P8 gbps_R cpu_s_per_GB_1 cpu_s_per_GB_P8 cpu_s_per_GB_R close_rps close_p50ms close_p99ms ka_rps ka_p50ms ka_p99ms"

mem_and_row() {  # mem_and_row NAME: idle memory at each of NCONNS, then the forwarder's TSV row
  local name=$1 label i k
  label=$(label_of "$1")
  log ""
  log "##### $label: idle memory  ($(date '+%F %T'))"
  [ "$name" = custom ] && log "FWD_CMD: $FWD_CMD"

  # memory with N idle connections, for each N in NCONNS (a fresh forwarder each time)
  local n memcols=() memhdr=() rss0=NA
  for n in $NCONNS; do
    local m0="NA NA 0" m1="NA NA 0" ok=0 kbc=NA pkbc=NA
    if start_fwd $name $HOLD_PORT; then
      m0=$(fwd_mem)
      rm -f "$RUN/ready"
      python3 "$BENCH/hold.py" client $TARGET $n $HOLD "$RUN/ready" >> "$OUT" 2>&1 &
      local hp=$! lim=$(( 600 + n / 4 ))   # tenths of a second: 60 s + 2.5 s per 1,000
      for i in $(seq $lim); do [ -s "$RUN/ready" ] && break; [ -e /proc/$hp ] || break; sleep 0.1; done
      sleep 0.5
      m1=$(fwd_mem); ok=$(cat "$RUN/ready" 2>/dev/null || echo 0)
      wait $hp
      stop_fwd
      set -- $m0; local r0=$1 p0=$2; set -- $m1; local r1=$1 p1=$2 n1=$3
      [ "$rss0" = NA ] && rss0=$r0
      if [ "$r0" != NA ] && [ "${ok:-0}" -gt 0 ]; then
        kbc=$(awk -v a=$r0 -v b=$r1 -v n=$ok 'BEGIN{printf "%.2f",(b-a)/n}')
        pkbc=$(awk -v a=$p0 -v b=$p1 -v n=$ok 'BEGIN{printf "%.2f",(b-a)/n}')
      fi
      log "  mem idle: RSS ${r0} KB PSS ${p0} KB; with $ok/$n conns: RSS ${r1} KB PSS ${p1} KB in ${n1} procs => ${kbc} KB/conn RSS, ${pkbc} KB/conn PSS"
      memcols+=("$r1" "$kbc" "$pkbc" "$ok")
    else
      memcols+=(NA NA NA 0)
    fi
    memhdr+=("rss_${n}_kb" "kb_per_conn_rss_${n}" "kb_per_conn_pss_${n}" "conns_ok_${n}")
    sleep 1
  done

  declare -A M
  for k in $REP_KEYS; do M[$k]=$(rep_median "$label|$k"); done
  local wc_e=${ERRS[$label|close]:-NA} wk_e=${ERRS[$label|ka]:-NA} repcols=() rephdr=()
  for k in $REP_KEYS; do rephdr+=("${k}_reps"); repcols+=("${REPV[$label|$k]:-NA}"); done
  if [ ! -f "$TSV" ]; then
    printf '%s\t' fwd gbps_1 gbps_P8 gbps_R cpu_s_per_GB_1 cpu_s_per_GB_P8 cpu_s_per_GB_R \
      close_rps close_p50ms close_p99ms close_err ka_rps ka_p50ms ka_p99ms ka_err rss_idle_kb \
      "${memhdr[@]}" "${rephdr[@]}" > "$TSV"
    printf 'wrk_d\tdate\n' >> "$TSV"
  fi
  printf '%s\t' "$label" "${M[gbps_1]}" "${M[gbps_P8]}" "${M[gbps_R]}" "${M[cpu_s_per_GB_1]}" \
    "${M[cpu_s_per_GB_P8]}" "${M[cpu_s_per_GB_R]}" "${M[close_rps]}" "${M[close_p50ms]}" \
    "${M[close_p99ms]}" "$wc_e" "${M[ka_rps]}" "${M[ka_p50ms]}" "${M[ka_p99ms]}" "$wk_e" "$rss0" \
    "${memcols[@]}" "${repcols[@]}" "$WRK_D" >> "$TSV"
  date '+%F %T' >> "$TSV"
  log "  SUMMARY $label: iperf 1/P8/R = ${M[gbps_1]}/${M[gbps_P8]}/${M[gbps_R]} Gbit/s, cpu ${M[cpu_s_per_GB_1]}/${M[cpu_s_per_GB_P8]}/${M[cpu_s_per_GB_R]} s/GB; close ${M[close_rps]} rps p50 ${M[close_p50ms]} p99 ${M[close_p99ms]} ms; keepalive ${M[ka_rps]} rps p50 ${M[ka_p50ms]} p99 ${M[ka_p99ms]} ms; mem ${memcols[*]}"
}

# ---- main ----
if [ "${1:-}" = table ]; then exec python3 "$BENCH/report.py" --peers "$TSV" --peers-only; fi
FWDS=("$@"); [ ${#FWDS[@]} -eq 0 ] && FWDS=(none portmux-direct portmux-tunnel portmux-tls haproxy1 ssh-gcm)
for p in $PUB $IPERF_PORT $HTTP_PORT $HOLD_PORT $SSH_PORT $PORTMUX_API_PORT $PORTMUX_TUNNEL_PORT; do
  if listening $p; then log "ERROR: port $p is already in use on this machine; set PUB/IPERF_PORT/... (see the header)"; exit 1; fi
done
log "=== peers.sh $(date '+%F %T') host=$(uname -r) cpus=$(nproc) REPS=$REPS IPERF_T=$IPERF_T WRK_D=$WRK_D WRK_C=$WRK_C NCONNS=$NCONNS HOLD=$HOLD load: $(cut -d' ' -f1-3 /proc/loadavg)"
start_backends
start_iperf
for i in $(seq $REPS); do
  log ""
  log "##### iperf3 rep $i/$REPS: ${FWDS[*]}  ($(date '+%F %T'))"
  for f in "${FWDS[@]}"; do iperf_rep "$f" $i; sleep 1; done
done
stop_iperf
for i in $(seq $REPS); do
  log ""
  log "##### wrk rep $i/$REPS: ${FWDS[*]}  ($(date '+%F %T'))"
  for f in "${FWDS[@]}"; do wrk_rep "$f" $i; done
done
for f in "${FWDS[@]}"; do mem_and_row "$f"; sleep 2; done
