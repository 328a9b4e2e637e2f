#!/usr/bin/env bash
# portmux as a peers.sh forwarder, in the foreground:
#
#   PUB=20000 BACKEND=15201 bench/portmux-fwd.sh direct|tunnel|tls
#
# Starts portmux-server (fresh database, log level warn) in the background, waits for
# /health, for tunnel modes starts portmux-client and waits until the server counts it,
# creates the mapping 127.0.0.1:$PUB -> 127.0.0.1:$BACKEND through the API, waits until
# /api/mapping/list shows it "listening", writes $READY_FILE (when set), then waits for
# its children. Ends (status 1) if any step fails or takes more than 15 s; SIGTERM stops
# server and client.
#
# Env: PUB BACKEND (required); PORTMUX_SERVER PORTMUX_CLIENT (binaries, default
# ./build/portmux-{server,client}); BENCH_WORK (default /tmp/portmux-bench);
# PORTMUX_API_PORT (18090) PORTMUX_TUNNEL_PORT (18091); READY_FILE; PORTMUX_TUNNEL_DIAL
# (HOST:PORT the client dials, default 127.0.0.1:$PORTMUX_TUNNEL_PORT: bench/latency.sh puts
# a delay line there); PORTMUX_FWD_DIR (config and database, default $BENCH_WORK/run/portmux-MODE);
# PORTMUX_SESSION_BUFFER_LIMIT (bytes: the server's tunnel.session_buffer_limit and the
# client's --session-buffer-limit; default: theirs, 64 MiB).
set -u
MODE=${1:?usage: portmux-fwd.sh direct|tunnel|tls}
BENCH=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$BENCH")
SERVER=${PORTMUX_SERVER:-$REPO/build/portmux-server}
CLIENT=${PORTMUX_CLIENT:-$REPO/build/portmux-client}
. "$BENCH/work_dir.sh"  # BENCH_WORK: ours, 0700
WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}
API_PORT=${PORTMUX_API_PORT:-18090}
TUN_PORT=${PORTMUX_TUNNEL_PORT:-18091}
D=${PORTMUX_FWD_DIR:-$WORK/run/portmux-$MODE}
API=http://127.0.0.1:$API_PORT
: "${PUB:?PUB not set}" "${BACKEND:?BACKEND not set}"

case $MODE in direct|tunnel|tls) ;; *) echo "portmux-fwd: unknown mode $MODE" >&2; exit 2 ;; esac

SRV_PID= CLI_PID=
die() {
  echo "portmux-fwd $MODE: $*" >&2
  [ -n "$CLI_PID" ] && kill "$CLI_PID" 2>/dev/null
  [ -n "$SRV_PID" ] && kill "$SRV_PID" 2>/dev/null
  wait
  exit 1
}
trap 'kill $CLI_PID $SRV_PID 2>/dev/null; wait; exit 0' TERM INT

# until SECONDS CMD...: retries CMD every 50 ms until it succeeds or SECONDS pass.
until_ok() {
  local end=$((SECONDS + $1)); shift
  while ! "$@"; do
    [ $SECONDS -ge $end ] && return 1
    [ -n "$SRV_PID" ] && ! kill -0 "$SRV_PID" 2>/dev/null && return 1
    sleep 0.05
  done
}
health() { curl -fsS --max-time 2 "$API/health" 2>/dev/null; }
healthy() { health | grep -q '"status": *"ok"'; }
client_in() { health | grep -q '"tunnel_connected": *true'; }
listening_in_list() {
  curl -fsS --max-time 2 "$API/api/mapping/list" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)["data"]
sys.exit(0 if any(m["port"] == int(sys.argv[1]) and m["status"] == "listening" for m in d["mappings"]) else 1)
' "$PUB" 2>/dev/null
}

rm -rf "$D"
mkdir -p "$D"
TLS_YAML='  tls: {cert_file: "", key_file: ""}'
CLIENT_TLS=()
CLIENT_BUF=()
[ -n "${PORTMUX_SESSION_BUFFER_LIMIT:-}" ] && CLIENT_BUF=(--session-buffer-limit "$PORTMUX_SESSION_BUFFER_LIMIT")
if [ "$MODE" = tls ]; then
  "$BENCH/make-certs.sh" "$WORK/tls" || die "cannot make TLS certificates"
  TLS_YAML="  tls: {cert_file: \"$WORK/tls/server.pem\", key_file: \"$WORK/tls/server.key\"}"
  CLIENT_TLS=(--tls --ca "$WORK/tls/ca.pem" --server-name localhost)
fi
# A fresh token per run: the server has no built-in one (SPEC §4).
TOKEN=$(head -c 24 /dev/urandom | base64 | tr '+/' '-_')
cat > "$D/config.yaml" <<EOF
port_range: {from: $PUB, end: $PUB}
tunnel:
  enabled: $([ "$MODE" = direct ] && echo false || echo true)
  listen_addr: 127.0.0.1
  listen_port: $TUN_PORT
  max_streams_per_client: 1000000
$([ -n "${PORTMUX_SESSION_BUFFER_LIMIT:-}" ] && echo "  session_buffer_limit: $PORTMUX_SESSION_BUFFER_LIMIT")
  clients: [{name: default, token: "$TOKEN"}]
$TLS_YAML
api:
  listen_addr: 127.0.0.1
  listen_port: $API_PORT
database:
  path: $D/mappings.db
limits:
  max_connections_per_mapping: 1000000
log:
  level: warn
EOF

[ -x "$SERVER" ] || die "no server binary at $SERVER"
"$SERVER" --config "$D/config.yaml" &
SRV_PID=$!
until_ok 15 healthy || die "server did not answer /health on $API"

if [ "$MODE" = direct ]; then
  BODY="{\"port\":$PUB,\"target_ip\":\"127.0.0.1\",\"target_port\":$BACKEND}"
else
  [ -x "$CLIENT" ] || die "no client binary at $CLIENT"
  # The client first: a tunnel mapping listens at once, and a connection accepted while
  # no client is there would fail; so the public port only opens once the client is in.
  "$CLIENT" --server "${PORTMUX_TUNNEL_DIAL:-127.0.0.1:$TUN_PORT}" --token "$TOKEN" --log-level warn "${CLIENT_TLS[@]}" "${CLIENT_BUF[@]}" &
  CLI_PID=$!
  until_ok 15 client_in || die "client did not connect to the tunnel"
  BODY="{\"port\":$PUB,\"target_port\":$BACKEND}"
fi
code=$(curl -sS --max-time 5 -o "$D/create.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d "$BODY" "$API/api/mapping/create")
[ "$code" = 201 ] || die "create answered $code: $(cat "$D/create.json" 2>/dev/null)"
until_ok 15 listening_in_list || die "mapping $PUB not listening"
[ -n "${READY_FILE:-}" ] && echo "$MODE" > "$READY_FILE"
wait
