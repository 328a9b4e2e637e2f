#!/usr/bin/env bash
# make-certs.sh DIR: a throw-away CA and a server certificate for "localhost" / 127.0.0.1
# (ECDSA P-256, valid 30 days), made with the openssl CLI. Writes DIR/{ca.pem,ca.key,
# server.pem,server.key}; does nothing when they exist and stay valid for another day. Concurrent callers are serialised.
set -eu
DIR=${1:?usage: make-certs.sh DIR}
mkdir -p "$DIR"
cd "$DIR"
exec 9>"$DIR/.lock"
flock -w 30 9
# Kept while both certificates stay valid for another day: the directory outlives runs
# (BENCH_WORK), and from day 31 an old pair failed every TLS bench.
[ -s server.pem ] && [ -s server.key ] && [ -s ca.pem ] &&
  openssl x509 -checkend 86400 -noout -in server.pem >/dev/null 2>&1 &&
  openssl x509 -checkend 86400 -noout -in ca.pem >/dev/null 2>&1 && exit 0
ossl() { timeout 30 openssl "$@" 2>>openssl.log; }
ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -keyout ca.key -out ca.pem -subj /CN=portmux-bench-ca \
  -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
ossl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
  -keyout server.key -out server.csr -subj /CN=localhost
printf '%s\n' 'subjectAltName=DNS:localhost,IP:127.0.0.1' 'basicConstraints=CA:FALSE' \
  'keyUsage=critical,digitalSignature' 'extendedKeyUsage=serverAuth' > server.ext
ossl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -set_serial "$(date +%s)" -days 30 \
  -out server.pem -extfile server.ext
chmod 600 ca.key server.key
