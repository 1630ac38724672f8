#!/usr/bin/env bash
# Prepares what docker-compose.yml needs and git must never see, in this folder:
#   .env            from .env.example, every empty *_PASSWORD filled with a random value (kept on reruns)
#   certs/          a local CA and the broker's TLS certificate (ca.crt, tls.crt, tls.key; kept on reruns)
#   secrets/passwd  the broker's password file, hashed, for the accounts in .env (rewritten on every run)
# Needs openssl, and mosquitto_passwd (from the mosquitto package) or docker to run it in a container.
#
#   ./setup.sh                       # then: docker compose up -d --build
#   BROKER_HOSTNAMES="mqtt.example.com" ./setup.sh   # extra names the broker certificate is valid for
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
cd "$HERE"
MOSQUITTO_IMAGE="${MOSQUITTO_IMAGE:-eclipse-mosquitto:2.0.20}"
umask 077

# --- .env
if [[ ! -f .env ]]; then
  cp .env.example .env
  echo "created .env from .env.example"
fi
while IFS= read -r name; do
  value="$(openssl rand -hex 24)"
  sed -i.bak "s|^${name}=\$|${name}=${value}|" .env && rm -f .env.bak
  echo "generated ${name} in .env"
done < <(sed -n 's/^\([A-Z0-9_]*PASSWORD\)=$/\1/p' .env)
set -a
# shellcheck disable=SC1091
. ./.env
set +a

# --- TLS: a CA of this deployment and the broker's certificate (names in BROKER_HOSTNAMES are added)
mkdir -p certs
if [[ ! -f certs/tls.crt ]]; then
  san="DNS:mosquitto,DNS:localhost,IP:127.0.0.1"
  for name in ${BROKER_HOSTNAMES:-}; do
    if [[ "$name" =~ ^[0-9.]+$ ]]; then san="$san,IP:$name"; else san="$san,DNS:$name"; fi
  done
  openssl req -x509 -new -nodes -days 3650 -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout certs/ca.key -out certs/ca.crt -subj "/CN=edgefleet compose CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -keyout certs/tls.key -out certs/tls.csr -subj "/CN=mosquitto" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$san" > certs/tls.ext
  openssl x509 -req -in certs/tls.csr -CA certs/ca.crt -CAkey certs/ca.key -CAcreateserial \
    -days 825 -sha256 -extfile certs/tls.ext -out certs/tls.crt 2>/dev/null
  rm -f certs/tls.csr certs/tls.ext certs/ca.srl
  echo "created certs/ (CA and broker certificate for: $san)"
fi

# --- the broker's password file: plain user:password lines, then hashed in place by mosquitto_passwd -U
mkdir -p secrets
{
  echo "edgefleet-fleet:${MQTT_FLEET_PASSWORD:?}"
  echo "edgefleet-refiner:${MQTT_REFINER_PASSWORD:?}"
  echo "cam-01:${MQTT_CAM01_PASSWORD:?}"
  echo "cam-02:${MQTT_CAM02_PASSWORD:?}"
} > secrets/passwd
if command -v mosquitto_passwd >/dev/null; then
  mosquitto_passwd -U secrets/passwd
elif command -v docker >/dev/null; then
  docker run --rm --user "$(id -u):$(id -g)" -v "$HERE/secrets:/secrets" "$MOSQUITTO_IMAGE" \
    mosquitto_passwd -U /secrets/passwd
else
  rm -f secrets/passwd
  echo "need mosquitto_passwd (apt-get install mosquitto / brew install mosquitto) or docker" >&2
  exit 1
fi
echo "wrote secrets/passwd (4 broker accounts)"

# The containers run as other users (mosquitto: uid 1883; the agents: 10001) and must read the files they
# mount one by one; the folders stay private to you, which keeps other local users out.
chmod 0700 certs secrets
chmod 0644 certs/ca.crt certs/tls.crt certs/tls.key secrets/passwd
chmod 0600 certs/ca.key .env
echo "ready: docker compose up -d --build"
