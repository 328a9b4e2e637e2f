#!/usr/bin/env bash
# Installs the Debian packages portmux needs:
#   scripts/install-deps.sh [SET...]   SET: build (make build, make run), test (make test,
#                                      .ci/run), bench (make bench), all; default: build test
#   scripts/install-deps.sh --list [SET...]   prints the sets' packages, installs nothing
# Each set is one plain `apt-get install` line below (marked by the "# set:" comment above
# it), so what a set installs is written once and can be read here; --list reads those
# lines from this file. As root (as on the project's machines and in CI) it always runs
# `apt-get update`, then the sets' apt-get install: on a fresh machine that installs
# everything, elsewhere it installs what is missing (--no-upgrade leaves installed packages
# as they are). Not root, it runs itself again under sudo. scripts/check-deps.py reads
# `--list all` and fails when a test, benchmark or script runs a program whose package no
# set installs.
set -euo pipefail
SELF=$0

# The packages of set $1: the words after "apt-get install" on the line below its marker.
packages_of() {
  awk -v set="$1" '
    $0 == "# set: " set { take = 1; next }
    take && /^apt-get install / {
      for (i = 3; i <= NF; i++) if ($i !~ /^-/) print $i
      exit
    }' "$SELF"
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
want() { local s; for s in "${sets[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

if [ $LIST = 1 ]; then
  for s in "${sets[@]}"; do packages_of "$s"; done | sort -u
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  # apt needs root: the whole script again under sudo, so every apt-get line stays plain.
  if command -v sudo > /dev/null; then
    exec sudo DEBIAN_FRONTEND=noninteractive "$SELF" "${sets[@]}"
  fi
  missing=()
  for s in "${sets[@]}"; do
    while read -r p; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing+=("$p")
    done < <(packages_of "$s")
  done
  [ ${#missing[@]} -eq 0 ] && exit 0
  echo "install-deps: missing ${missing[*]}; run this as root (no sudo here)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Package lists first, as a fresh machine needs. Offline, the installs below still work
# for what is installed already (and fail, naming the package, for what is not).
apt-get update -q || echo "install-deps: apt-get update failed; installing from the lists at hand" >&2

if want build; then
# set: build
apt-get install -y -q --no-install-recommends --no-upgrade build-essential cmake pkg-config libevent-dev libmicrohttpd-dev libjansson-dev libsqlite3-dev libyaml-dev libssl-dev libpq-dev
fi

if want test; then
# set: test
apt-get install -y -q --no-install-recommends --no-upgrade curl sqlite3 python3 python3-pytest procps iproute2 util-linux openssl prometheus openssh-server openssh-client redis-server redis-tools clang libclang-rt-14-dev valgrind iperf3 nginx haproxy postgresql postgresql-15 postgresql-client-common chromium chromium-driver python3-selenium systemd groff-base man-db mandoc dpkg-dev cmake
fi

if want bench; then
# set: bench
apt-get install -y -q --no-install-recommends --no-upgrade python3 curl procps iproute2 util-linux openssl iperf3 wrk nginx haproxy socat rinetd openssh-server openssh-client linux-perf valgrind git
fi
