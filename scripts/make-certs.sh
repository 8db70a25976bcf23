#!/usr/bin/env bash
# Makes a throwaway CA and one certificate per server for the migration link's mutual TLS.
#   scripts/make-certs.sh DIR NAME[,NAME...] [IP-or-DNS ...]
# writes DIR/ca.pem (and ca.key) and DIR/NAME.pem, DIR/NAME.key for each NAME, valid for
# 127.0.0.1, ::1, localhost and every extra address given, and naming NAME itself as a DNS
# subject alternative name (the identity `nbd-server --allow` rules match). Each certificate can serve and
# connect (serverAuth and clientAuth), as each server is a source and a destination in turn.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 DIR NAME[,NAME...] [ADDRESS ...]" >&2; exit 2; }
dir=$1; names=$2; shift 2
mkdir -p "$dir"
san="IP:127.0.0.1,IP:::1,DNS:localhost"
for a in "$@"; do
  if [[ $a =~ ^[0-9.]+$ || $a == *:* ]]; then san+=",IP:$a"; else san+=",DNS:$a"; fi
done
if [ ! -f "$dir/ca.pem" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=nbd-cas test CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi
IFS=, read -ra list <<< "$names"
for n in "${list[@]}"; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$n" \
    -keyout "$dir/$n.key" -out "$dir/$n.csr" 2>/dev/null
  openssl x509 -req -in "$dir/$n.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 3650 -out "$dir/$n.pem" -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n' "$san,DNS:$n") 2>/dev/null
  rm -f "$dir/$n.csr"
done
echo "$dir: ca.pem and ${names//,/ } certificates for $san"
