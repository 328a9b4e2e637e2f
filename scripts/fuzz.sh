#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each for a bounded time on a copy of
# its seed corpus. A crash leaves its input in $BUILD/fuzz-artifacts and fails the script;
# copy that input into tests/fuzz/corpus/<target>/ so ctest replays it from then on.
#   scripts/fuzz.sh [BUILD_DIR] [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-fuzz}
SECONDS_PER_TARGET=${2:-60}
cmake -S . -B "$BUILD" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=Debug -DPORTMUX_FUZZ=ON >/dev/null
targets=()
for src in tests/fuzz/fuzz_*.c; do
  targets+=("$(basename "$src" .c)")
done
cmake --build "$BUILD" -j"$(nproc)" --target "${targets[@]}"
mkdir -p "$BUILD/fuzz-artifacts"
status=0
for t in "${targets[@]}"; do
  work="$BUILD/fuzz-corpus/$t"
  mkdir -p "$work"
  if [ -d "tests/fuzz/corpus/$t" ]; then cp -n "tests/fuzz/corpus/$t"/* "$work"/ 2>/dev/null || true; fi
  echo "== $t: ${SECONDS_PER_TARGET}s"
  if ! "$BUILD/$t" -max_total_time="$SECONDS_PER_TARGET" -max_len=140000 -timeout=10 \
        -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$BUILD/fuzz-artifacts/$t-" "$work" 2>"$BUILD/fuzz-$t.log"; then
    echo "FAIL: $t found a crash; see $BUILD/fuzz-$t.log and $BUILD/fuzz-artifacts/"
    tail -40 "$BUILD/fuzz-$t.log"
    status=1
  else
    grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb|^#[0-9]+.*DONE' "$BUILD/fuzz-$t.log" | tail -3
  fi
done
exit $status
