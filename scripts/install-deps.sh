#!/usr/bin/env bash
# Installs the Debian packages portmux needs:
#   scripts/install-deps.sh [SET...]   SET: build (make build, make run), test (make test,
#                                      .ci/run), bench (make bench), all; default: build test
#   scripts/install-deps.sh --list [SET...]   prints the sets' packages, installs nothing
# Each set is one literal `apt-get install` command below, so what a set installs is
# written once and can be read here. As root it always runs `apt-get update` and then the
# sets' apt-get install with --no-upgrade, which installs what is missing and leaves
# installed packages as they are (no download when nothing is missing). Not root, it
# runs itself again under sudo when something is missing, and leaves apt alone otherwise. scripts/check-deps.py reads `--list all` and fails when a test, benchmark or
# script runs a program whose package no set installs.
set -euo pipefail

set_build() {
  apt-get install -y -q --no-install-recommends --no-upgrade build-essential cmake pkg-config libevent-dev libmicrohttpd-dev libjansson-dev libsqlite3-dev libyaml-dev libssl-dev libpq-dev
}

set_test() {
  apt-get install -y -q --no-install-recommends --no-upgrade curl sqlite3 python3 python3-pytest procps iproute2 util-linux openssl prometheus openssh-server openssh-client redis-server redis-tools clang libclang-rt-14-dev valgrind iperf3 nginx haproxy postgresql postgresql-15 postgresql-client-common chromium chromium-driver python3-selenium systemd groff-base man-db mandoc dpkg-dev cmake
}

set_bench() {
  apt-get install -y -q --no-install-recommends --no-upgrade python3 curl procps iproute2 util-linux openssl iperf3 wrk nginx haproxy socat rinetd openssh-server openssh-client linux-perf valgrind git
}

# The packages of set $1: its apt-get command, run with apt-get standing for a printer.
packages_of() {
  (
    apt-get() { local a; for a; do case $a in install|-*) ;; *) echo "$a" ;; esac; done; }
    "set_$1"
  )
}

LIST=0
if [ "${1:-}" = --list ]; then LIST=1; shift; fi
sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(build test)
[ "${sets[0]}" = all ] && sets=(build test bench)
for s in "${sets[@]}"; do
  case $s in
    build|test|bench) ;;
    *) echo "install-deps: unknown package set '$s' (build, test, bench, all)" >&2; exit 2 ;;
  esac
done

if [ $LIST = 1 ]; then
  for s in "${sets[@]}"; do packages_of "$s"; done | sort -u
  exit 0
fi

missing=()
for s in "${sets[@]}"; do
  while read -r p; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done < <(packages_of "$s")
done
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" != 0 ]; then
  [ ${#missing[@]} -eq 0 ] && exit 0
  # apt needs root: the whole script again under sudo, so every apt-get line stays plain.
  command -v sudo > /dev/null ||
    { echo "install-deps: missing ${missing[*]}; run this as root (no sudo here)" >&2; exit 1; }
  exec sudo DEBIAN_FRONTEND=noninteractive "$0" "${sets[@]}"
fi
# Package lists first, as on a fresh machine. Offline with everything installed, a failed
# update costs nothing: the installs below then have nothing to fetch.
[ ${#missing[@]} -gt 0 ] && echo "install-deps: installing ${missing[*]}" >&2
if ! apt-get update -q > /dev/null; then
  [ ${#missing[@]} -gt 0 ] && { echo "install-deps: apt-get update failed" >&2; exit 1; }
  echo "install-deps: apt-get update failed (offline?); every package is installed already" >&2
fi
for s in "${sets[@]}"; do
  if [ ${#missing[@]} -gt 0 ]; then "set_$s"; else "set_$s" > /dev/null; fi
done
