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

start_nginx_ok() {  # start_nginx_ok DIR PORT LOG: nginx answering "ok" on 127.0.0.1:PORT in
                    # the background (its PID in NGINX_PID); config and temp files under DIR
  mkdir -p "$1/nginx"
  cat > "$1/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $1/nginx.pid;
error_log $1/nginx-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $1/nginx/cb; proxy_temp_path $1/nginx/px; fastcgi_temp_path $1/nginx/fc;
  uwsgi_temp_path $1/nginx/uw; scgi_temp_path $1/nginx/sc;
  keepalive_requests 10000000;
  server { listen 127.0.0.1:$2 backlog=4096; location / { return 200 "ok\n"; } }
}
EOF
  nginx -p "$1/nginx" -e "$1/nginx-error.log" -c "$1/nginx.conf" >>"$3" 2>&1 &
  NGINX_PID=$!
}

haproxy_tcp_cfg() {  # haproxy_tcp_cfg PUB BACKEND MAXCONN [THREADS]: a TCP-mode haproxy
  # config on stdout, 127.0.0.1:PUB -> 127.0.0.1:BACKEND (THREADS: nbthread; default haproxy's)
  echo "global"; echo "  maxconn $3"; [ -n "${4:-}" ] && echo "  nbthread $4"
  printf 'defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 5m\n  timeout server 5m\n'
  printf 'frontend fe\n  bind 127.0.0.1:%s\n  default_backend be\n' "$1"
  printf 'backend be\n  server s1 127.0.0.1:%s\n' "$2"
}
