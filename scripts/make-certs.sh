#!/usr/bin/env bash
# Makes the certificates for portmux's TLS tunnel with openssl: a private CA, a server
# certificate signed by it, and a client certificate for mutual TLS.
#
#   scripts/make-certs.sh [-d DIR] [-c CLIENT] [-D DAYS] [SERVER_NAME...]
#
# SERVER_NAME: the host names and IP addresses clients use in --server (default:
# localhost 127.0.0.1); each becomes a subjectAltName. CLIENT: the client certificate's
# common name (default: default). Files in DIR (default ./certs), keys mode 0600:
#   ca.pem ca.key              the CA: give ca.pem to clients (--ca) and, for mutual TLS,
#                              to the server (tunnel.tls.client_ca)
#   server.pem server.key      tunnel.tls.cert_file / tunnel.tls.key_file
#   client.pem client.key      portmux-client --cert / --key (mutual TLS)
# An existing CA in DIR is reused, so running it again adds or renews leaves under it.
set -euo pipefail

usage() {
    sed -n '2,15s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

dir=./certs
client=default
days=825
while getopts "d:c:D:h" opt; do
    case "$opt" in
        d) dir=$OPTARG ;;
        c) client=$OPTARG ;;
        D) days=$OPTARG ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
[[ $days =~ ^[1-9][0-9]*$ ]] || { echo "make-certs: -D DAYS must be a positive integer" >&2; exit 2; }
[[ $client =~ ^[A-Za-z0-9._-]{1,64}$ ]] || { echo "make-certs: -c CLIENT: 1-64 of [A-Za-z0-9._-]" >&2; exit 2; }

san=""
for n in "${names[@]}"; do
    if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then
        san+="${san:+,}IP:$n"
    elif [[ $n =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
        san+="${san:+,}DNS:$n"
    else
        echo "make-certs: not a host name or IP address: $n" >&2
        exit 2
    fi
done

# Keys are written into DIR: it is made 0700, and one that others may write to (or that
# someone else owns) is refused, since they could swap a key or plant a symlink there
# before a re-run renews the leaves.
umask 077
mkdir -p "$dir"
if [ "$(stat -c %u "$dir")" != "$(id -u)" ] || [ -n "$(find "$dir" -maxdepth 0 -perm /022)" ]; then
    echo "make-certs: $dir is writable by others or not yours; use a directory only you can write to" >&2
    exit 2
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)

if [ ! -f "$dir/ca.pem" ] || [ ! -f "$dir/ca.key" ]; then
    openssl req -x509 "${ec[@]}" -keyout "$dir/ca.key" -out "$dir/ca.pem" -days "$days" \
        -subj "/CN=portmux CA" -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>"$work/err" ||
        { cat "$work/err" >&2; exit 1; }
    echo "make-certs: new CA $dir/ca.pem"
fi

# leaf NAME CN EXTENSIONS: a key and a certificate signed by the CA.
leaf() {
    printf '%s\n' "$3" >"$work/$1.ext"
    openssl req "${ec[@]}" -keyout "$dir/$1.key" -out "$work/$1.csr" -subj "/CN=$2" \
        2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    openssl x509 -req -in "$work/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -out "$dir/$1.pem" \
        -extfile "$work/$1.ext" 2>"$work/err" || { cat "$work/err" >&2; exit 1; }
    echo "make-certs: $dir/$1.pem ($2)"
}

leaf server "${names[0]}" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
leaf client "$client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
# Certificates are public; the keys stay 0600.
chmod 644 "$dir/ca.pem" "$dir/server.pem" "$dir/client.pem"
