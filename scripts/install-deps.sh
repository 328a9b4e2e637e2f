#!/usr/bin/env bash
# Installs every Debian package portmux needs to build, test and run.
# Idempotent: packages already present are skipped, apt is not touched then.
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config
  libevent-dev libmicrohttpd-dev libjansson-dev libsqlite3-dev libyaml-dev libssl-dev
  curl sqlite3 python3 python3-pytest procps util-linux prometheus
  openssh-server openssh-client redis-server redis-tools openssl
  clang libclang-rt-14-dev valgrind
  chromium chromium-driver python3-selenium
)
if [ "${PORTMUX_EXTRA_PKGS:-}" != "" ]; then
  # shellcheck disable=SC2206
  PKGS+=(${PORTMUX_EXTRA_PKGS})
fi

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
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
