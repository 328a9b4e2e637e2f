#!/usr/bin/env bash
# Installs the Debian packages portmux needs, from the lists in scripts/packages/:
#   scripts/install-deps.sh [SET...]   SET: build (make build, make run), test (make test,
#                                      .ci/run), bench (make bench); default: build test
# Idempotent: packages already present are skipped, and apt is not touched then.
# scripts/check-deps.py keeps the lists complete (every program a test or benchmark runs).
set -euo pipefail
cd "$(dirname "$0")"

sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(build test)
[ "${sets[0]}" = all ] && sets=(build test bench)

PKGS=()
for s in "${sets[@]}"; do
  list="packages/$s.txt"
  if [ ! -f "$list" ]; then
    echo "install-deps: unknown package set '$s' (build, test, bench, all)" >&2
    exit 2
  fi
  while read -r p _; do
    case $p in ''|'#'*) continue ;; esac
    PKGS+=("$p")
  done < "$list"
done
if [ "${PORTMUX_EXTRA_PKGS:-}" != "" ]; then
  # shellcheck disable=SC2206
  PKGS+=(${PORTMUX_EXTRA_PKGS})
fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    case " ${missing[*]-} " in *" $p "*) ;; *) missing+=("$p") ;; esac
  fi
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
