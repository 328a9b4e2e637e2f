# Sourced by the bench scripts before they use BENCH_WORK (default $TMPDIR or /tmp, then
# portmux-bench): made 0700, and refused when someone else owns it or others may write to
# it. The scripts keep ssh keys there (the peer sshd lets them in as root) and run
# scripts from it; a fixed name under /tmp is one any local user could create first.
BENCH_WORK=${BENCH_WORK:-${TMPDIR:-/tmp}/portmux-bench}
export BENCH_WORK
(umask 077 && mkdir -p "$BENCH_WORK") || { echo "bench: cannot make $BENCH_WORK" >&2; exit 2; }
if [ "$(stat -c %u "$BENCH_WORK")" != "$(id -u)" ] ||
   [ -n "$(find "$BENCH_WORK" -maxdepth 0 -perm /022)" ]; then
  echo "bench: $BENCH_WORK is not yours or others may write to it; remove it or set BENCH_WORK" >&2
  exit 2
fi
