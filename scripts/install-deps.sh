#!/usr/bin/env bash
# Installs the Debian packages portmux needs:
#   scripts/install-deps.sh [SET...]   SET: build (make build, make run), test (make test,
#                                      .ci/run), bench (make bench), all; default: build test
# Idempotent: packages already present are skipped, and apt is not touched then.
# scripts/check-deps.py reads the lists below and fails when a test, benchmark or script
# runs a program whose package none of them installs.
set -euo pipefail

BUILD_PKGS=(
  build-essential cmake pkg-config
  libevent-dev libmicrohttpd-dev libjansson-dev libsqlite3-dev libyaml-dev libssl-dev libpq-dev
)
TEST_PKGS=(
  curl sqlite3 python3 python3-pytest procps iproute2 util-linux openssl
  prometheus
  openssh-server openssh-client
  redis-server redis-tools
  clang libclang-rt-14-dev valgrind
  iperf3
  nginx haproxy
  postgresql postgresql-15 postgresql-client-common
  chromium chromium-driver python3-selenium
  systemd groff-base man-db mandoc dpkg-dev
)
BENCH_PKGS=(
  python3 curl procps iproute2 util-linux openssl
  iperf3 wrk nginx haproxy socat rinetd openssh-server openssh-client
  linux-perf valgrind git
)

sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(build test)
[ "${sets[0]}" = all ] && sets=(build test bench)

PKGS=()
for s in "${sets[@]}"; do
  case $s in
    build) PKGS+=("${BUILD_PKGS[@]}") ;;
    test) PKGS+=("${TEST_PKGS[@]}") ;;
    bench) PKGS+=("${BENCH_PKGS[@]}") ;;
    *) echo "install-deps: unknown package set '$s' (build, test, bench, all)" >&2; exit 2 ;;
  esac
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
