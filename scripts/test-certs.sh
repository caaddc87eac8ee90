#!/usr/bin/env bash
# A throw-away x509 CA with one server and one client certificate, for tests and the
# demo (NBD over TLS: qemu-storage-daemon / libvirt's backup export and vmbackup).
# NOT for production: use your site's PKI (README, "Remote libvirt hosts").
#
#   scripts/test-certs.sh DIR [SAN...]    SAN e.g. DNS:localhost IP:127.0.0.1 (default)
#
# Writes, in the layout QEMU's tls-creds-x509 and vmbackup's --tls-dir read:
#   DIR/ca-cert.pem DIR/ca-key.pem
#   DIR/server-cert.pem DIR/server-key.pem     (QEMU's side: endpoint=server)
#   DIR/client-cert.pem DIR/client-key.pem     (vmbackup's side)
# Keys are EC P-256, certificates valid for 2 days. Needs the openssl CLI.
set -euo pipefail
DIR=${1:?usage: $0 DIR [SAN...]}; shift
SANS=("$@"); [ ${#SANS[@]} -gt 0 ] || SANS=(DNS:localhost IP:127.0.0.1)
san=$(IFS=,; echo "${SANS[*]}")
mkdir -p "$DIR"; cd "$DIR"
umask 077
key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
key ca-key.pem
openssl req -x509 -new -key ca-key.pem -out ca-cert.pem -days 2 -subj "/CN=vmbackup test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
sign() { # NAME CN EXTENSIONS
  key "$1-key.pem"
  openssl req -new -key "$1-key.pem" -subj "/CN=$2" -out "$1.csr"
  printf '%s\n' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -set_serial "0x$(openssl rand -hex 8)" \
    -days 2 -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
sign server "${SANS[0]#*:}" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$san"
sign client vmbackup "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
chmod 0644 ca-cert.pem server-cert.pem client-cert.pem
