#!/usr/bin/env bash
# Runs a subset of the integration tests with portmux-server and portmux-client under
# valgrind memcheck, then checks every valgrind log.
#
#   scripts/valgrind-integration.sh [pytest args...]
#   scripts/valgrind-integration.sh --check-logs DIR    (only check existing logs)
#
# Without arguments it runs the default subset below. Environment:
#   VALGRIND_BUILD   build directory (default: build-valgrind, a Debug build of its own)
#   VALGRIND_EXTRA   more valgrind options (e.g. --suppressions=FILE)
#
# How the binaries get wrapped: the tests find the binaries through PORTMUX_BUILD_DIR, so
# this script points that at a directory of wrapper scripts named portmux-server and
# portmux-client. Each wrapper runs the real binary under valgrind as its child and
# turns its own end into a SIGTERM for that child: a SIGTERM/SIGINT is passed on (and a
# SIGHUP, the server's reload), and
# when the wrapper is killed with SIGKILL (what the fixtures do at teardown) the child
# gets SIGTERM through PR_SET_PDEATHSIG. So every process exits through its normal
# shutdown path and valgrind writes a complete leak report. (Tests that need a real
# kill -9 of the server, like test_crash_safety.py, do not belong in this subset.)
#
# Exit status: 0 when pytest passed and every log has "ERROR SUMMARY: 0 errors" and no
# definitely-lost bytes; 1 otherwise (the offending logs are printed).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${VALGRIND_BUILD:-$ROOT/build-valgrind}
case $BUILD in /*) ;; *) BUILD=$ROOT/$BUILD ;; esac
WRAP=$BUILD/valgrind-bin
LOGS=$BUILD/valgrind-logs
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

DEFAULT_SUBSET=(
  test_security.py -m "not slow"
  test_tls.py
  test_api.py
  test_tunnel_basic.py
)

check_logs() { # dir; sets total and bad
  local f why
  echo "== valgrind logs ($1)"
  total=0; bad=0
  for f in "$1"/*.log; do
    [ -e "$f" ] || continue
    total=$((total + 1))
    why=""
    if ! grep -q "ERROR SUMMARY: 0 errors" "$f"; then
      if grep -q "ERROR SUMMARY:" "$f"; then why="errors: $(grep -o 'ERROR SUMMARY: [0-9]* errors' "$f" | tail -1)"
      else why="no ERROR SUMMARY (process did not exit normally)"; fi
    fi
    if grep -q "definitely lost:" "$f" && ! grep -q "definitely lost: 0 bytes" "$f"; then
      why="$why${why:+; }$(grep -o 'definitely lost: [0-9,]* bytes in [0-9,]* blocks' "$f" | tail -1)"
    fi
    if [ -n "$why" ]; then
      bad=$((bad + 1))
      echo "---- $f: $why"
      # The command line and the first error/leak records are what one needs to start.
      grep -m1 "Command:" "$f" || true
      awk '/^==[0-9]+== (Invalid|Conditional|Syscall|Mismatched|Source and|Use of uninit)|definitely lost in/ {p=1; n=0}
           p {print; if (++n >= 25 || /^==[0-9]+== $/) p=0}' "$f" | head -150
    fi
  done
}

if [ "${1:-}" = "--check-logs" ]; then
  check_logs "${2:?--check-logs DIR}"
  echo "== summary: $total valgrind logs, $bad with errors or definite leaks"
  [ "$total" -gt 0 ] && [ "$bad" -eq 0 ]
  exit
fi

command -v valgrind >/dev/null || { echo "valgrind not installed (apt-get install valgrind)" >&2; exit 1; }

echo "== build ($BUILD, Debug)"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Debug >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target portmux-server
if compgen -G "$ROOT/src/client/*.c" >/dev/null; then
  cmake --build "$BUILD" -j"$(nproc)" --target portmux-client
fi

rm -rf "$WRAP" "$LOGS"
mkdir -p "$WRAP" "$LOGS"

PDEATH=()
if setpriv --help 2>/dev/null | grep -q -- --pdeathsig; then
  PDEATH=(setpriv --pdeathsig TERM --)
else
  echo "warning: setpriv --pdeathsig unavailable: processes killed with SIGKILL leave no leak report" >&2
fi

make_wrapper() { # name
  local real=$BUILD/$1
  [ -x "$real" ] || return 0
  cat >"$WRAP/$1" <<EOF
#!/usr/bin/env bash
# valgrind wrapper for $real (made by scripts/valgrind-integration.sh)
${PDEATH[*]} valgrind --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=99 \\
  --track-fds=no --num-callers=30 --log-file="$LOGS/$1.%p.log" ${VALGRIND_EXTRA:-} \\
  "$real" "\$@" &
child=\$!
trap 'kill -TERM "\$child" 2>/dev/null' TERM INT
trap 'kill -HUP "\$child" 2>/dev/null' HUP
while :; do
  wait "\$child" && rc=0 || rc=\$?
  kill -0 "\$child" 2>/dev/null || exit "\$rc"
done
EOF
  chmod +x "$WRAP/$1"
}
make_wrapper portmux-server
make_wrapper portmux-client

if [ $# -gt 0 ]; then ARGS=("$@"); else ARGS=("${DEFAULT_SUBSET[@]}"); fi

echo "== pytest ${ARGS[*]} (binaries under valgrind)"
set +e
(cd "$ROOT/tests/integration" && \
  PORTMUX_BUILD_DIR=$WRAP PORTMUX_SOURCE_DIR=$ROOT PORTMUX_UNDER_VALGRIND=1 \
  "$PYTHON" -m pytest -q -p no:cacheprovider "${ARGS[@]}")
PYTEST_RC=$?
set -e

# Processes whose wrapper was killed are still shutting down (valgrind writes its report
# at exit): wait for them, bounded.
pids_alive() {
  local f pid n=0
  for f in "$LOGS"/*.log; do
    [ -e "$f" ] || continue
    pid=${f%.log}; pid=${pid##*.}
    if kill -0 "$pid" 2>/dev/null && grep -qa valgrind "/proc/$pid/cmdline" 2>/dev/null; then
      n=$((n + 1))
    fi
  done
  echo $n
}
deadline=$((SECONDS + 60))
while [ "$(pids_alive)" -gt 0 ] && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
for f in "$LOGS"/*.log; do
  [ -e "$f" ] || continue
  pid=${f%.log}; pid=${pid##*.}
  if kill -0 "$pid" 2>/dev/null && grep -qa valgrind "/proc/$pid/cmdline" 2>/dev/null; then
    echo "valgrind process $pid still running after 60 s: killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
done

check_logs "$LOGS"

echo "== summary: pytest exit $PYTEST_RC; $total valgrind logs, $bad with errors or definite leaks"
if [ "$total" -eq 0 ]; then
  echo "no valgrind log was written: the tests did not run the binaries?" >&2
  exit 1
fi
[ "$PYTEST_RC" -eq 0 ] && [ "$bad" -eq 0 ]
