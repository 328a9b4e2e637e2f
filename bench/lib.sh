# Shell helpers shared by the bench scripts (sourced; BENCH must be set to bench/).
# Only processes a script started itself (and their descendants) are ever signalled.

listening() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

wait_listen() {  # wait_listen PORT SECONDS [PID]: until PORT listens (or PID is gone)
  local i; for i in $(seq $(( $2 * 10 ))); do
    listening "$1" && return 0
    [ -n "${3:-}" ] && ! [ -e "/proc/$3" ] && return 1
    sleep 0.1
  done; return 1
}

median() {  # median VALUE...: NA values are skipped; NA when none is left
  printf '%s\n' "$@" | grep -v '^NA$' | sort -g |
    awk '{a[NR]=$1} END{if(NR==0)print "NA"; else if(NR%2)print a[(NR+1)/2]; else printf "%.6g\n",(a[NR/2]+a[NR/2+1])/2}'
}

stop_tree() {  # stop_tree ROOTPID...: TERM, then KILL after 3 s, for the trees under them
  local pids i
  pids=$(python3 "$BENCH/proc.py" tree "$@")
  [ -z "$pids" ] && return 0
  kill $pids 2>/dev/null
  for i in $(seq 30); do
    pids=$(for p in $pids; do [ -e /proc/$p ] && [ "$(awk '{print $3}' /proc/$p/stat 2>/dev/null)" != Z ] && echo $p; done)
    [ -z "$pids" ] && break; sleep 0.1
  done
  [ -n "$pids" ] && kill -9 $pids 2>/dev/null
  wait "$@" 2>/dev/null
  return 0
}
