#!/bin/sh
# Installs the Debian packages portmux needs:
#   scripts/install-deps.sh [SET...]   SET: build (make build, make run), test (make test,
#                                      .ci/run), bench (make bench), all; default: build test
#   scripts/install-deps.sh --list [SET...]   prints the sets' packages, installs nothing
# Plain POSIX sh: it works the same run as `sh scripts/install-deps.sh` (dash), with bash,
# or executed directly.
# Each set is one plain `apt-get install` line below (marked by the "# set:" comment above
# it), holding nothing but apt-get's options and the set's packages, so what a set installs
# is written once and can be read here; --list reads those lines from this file. It always
# runs `apt-get update`, then the sets' apt-get install lines, with apt-get as found on PATH:
# as root (the project's machines, CI, a fresh container) that installs everything
# missing (--no-upgrade leaves installed packages as they are). Should one package of a set
# not install (a mirror without it), the set's other packages are installed one by one,
# and the script fails naming what did not. Not root, apt-get itself refuses; the script
# then succeeds if every package is installed already and otherwise fails naming the
# missing ones (run it with sudo). scripts/check-deps.py reads `--list all` and fails when
# a test, benchmark or script runs a program whose package no set installs.
# No `set -e`: a failed install line is handled on the line after it (hence $?, so that
# the install line itself stays apt-get and its packages, nothing else).
# shellcheck disable=SC2181
set -u

# This file, for --list and the one-by-one fallback.
SELF=$0
[ -f "$SELF" ] || SELF=scripts/install-deps.sh

# The packages of set $1: the words after "apt-get install" on the line below its marker
# that are not options.
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
[ $# -eq 0 ] && set -- build test
[ "$1" = all ] && set -- build test bench
for s in "$@"; do
  case $s in
    build|test|bench) ;;
    *) echo "install-deps: unknown package set '$s' (build, test, bench, all)" >&2; exit 2 ;;
  esac
done
SETS=$*
want() { for s in $SETS; do [ "$s" = "$1" ] && return 0; done; return 1; }

if [ $LIST = 1 ]; then
  for s in $SETS; do packages_of "$s"; done | sort -u
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
FAILED=

# A set's packages that dpkg does not have installed.
missing_of() {
  for p in $(packages_of "$1"); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"
  done
}

# After a set's line failed. As root: its packages one at a time, so one that the mirror
# lacks does not keep the others out. Not root (apt-get cannot install): what is missing.
install_each() {
  if [ "$(id -u)" != 0 ]; then
    FAILED="$FAILED $(missing_of "$1" | tr '\n' ' ')"
    return
  fi
  for p in $(packages_of "$1"); do
    apt-get install -y -q --no-install-recommends --no-upgrade "$p" || FAILED="$FAILED $p"
  done
}

# The test and bench sets bring network daemons (sshd, nginx, prometheus, redis, PostgreSQL,
# haproxy, rinetd) only for their binaries: the tests start their own on 127.0.0.1. Debian
# starts and enables a daemon it installs, on every interface (sshd with passwords,
# prometheus without any); a daemon this run installs is neither started (policy-rc.d,
# while the script runs, unless the machine has its own) nor enabled at boot. One that
# was installed before is left as the machine's owner set it.
DAEMONS="openssh-server:ssh nginx:nginx prometheus:prometheus redis-server:redis-server postgresql:postgresql haproxy:haproxy rinetd:rinetd"
NEW_DAEMONS=
POLICY=${INSTALL_DEPS_POLICY_RC_D:-/usr/sbin/policy-rc.d}  # the variable: for its test
OUR_POLICY=0
if [ "$(id -u)" = 0 ]; then
  for d in $DAEMONS; do
    dpkg-query -W -f='${Status}' "${d%%:*}" 2>/dev/null | grep -q "install ok installed" ||
      NEW_DAEMONS="$NEW_DAEMONS $d"
  done
  if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# install-deps.sh: no daemon starts while it installs\nexit 101\n' >"$POLICY" &&
      chmod 755 "$POLICY" && OUR_POLICY=1
  fi
fi
# shellcheck disable=SC2317 # run by the trap
remove_policy() { if [ "$OUR_POLICY" = 1 ]; then rm -f "$POLICY"; fi; }
trap remove_policy EXIT

# Package lists first, as a fresh machine needs. Offline, the installs below still work
# for what is installed already (and fail, naming the package, for what is not).
apt-get update -q || echo "install-deps: apt-get update failed; installing from the lists at hand" >&2

if want build; then
# set: build
apt-get install -y -q --no-install-recommends --no-upgrade build-essential cmake pkg-config libevent-dev libmicrohttpd-dev libjansson-dev libsqlite3-dev libyaml-dev libssl-dev libpq-dev
[ $? -eq 0 ] || install_each build
fi

if want test; then
# set: test
apt-get install -y -q --no-install-recommends --no-upgrade curl sqlite3 python3 python3-pytest procps strace iproute2 util-linux mount openssl prometheus openssh-server openssh-client redis-server redis-tools clang libclang-rt-14-dev valgrind iperf3 nginx haproxy postgresql postgresql-15 postgresql-client-common chromium chromium-driver python3-selenium systemd groff-base man-db mandoc dpkg-dev cmake
[ $? -eq 0 ] || install_each test
fi

if want bench; then
# set: bench
apt-get install -y -q --no-install-recommends --no-upgrade python3 curl procps iproute2 util-linux openssl iperf3 wrk nginx haproxy socat rinetd openssh-server openssh-client linux-perf valgrind git
[ $? -eq 0 ] || install_each bench
fi

# The daemons this run installed: not enabled at boot, and stopped should one have started
# all the same (a machine with its own policy-rc.d that allows it).
for d in $NEW_DAEMONS; do
  dpkg-query -W -f='${Status}' "${d%%:*}" 2>/dev/null | grep -q "install ok installed" || continue
  unit=${d#*:}
  if command -v deb-systemd-helper >/dev/null 2>&1; then
    deb-systemd-helper disable "$unit.service" >/dev/null 2>&1 || true
  fi
  if [ -d /run/systemd/system ]; then
    systemctl stop "$unit.service" >/dev/null 2>&1 || true
  elif [ "$OUR_POLICY" = 0 ] && [ -x "/etc/init.d/$unit" ]; then
    "/etc/init.d/$unit" stop >/dev/null 2>&1 || true
  fi
done

# shellcheck disable=SC2086,SC2116 # the words again with one space between them
FAILED=$(echo $FAILED)
if [ -n "$FAILED" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing: $FAILED; run it as root (sudo $SELF $SETS)" >&2
  else
    echo "install-deps: could not install: $FAILED" >&2
  fi
  exit 1
fi
exit 0
