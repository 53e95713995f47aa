# Sourced by the scripts that need a broker: sets $brokers to STROM_BROKERS or
# to a tansu container started for the script (removed when it exits).
image=strom/tansu:0.6.0
brokers=${STROM_BROKERS:-}
if [[ -z $brokers ]]; then
  docker image inspect "$image" >/dev/null 2>&1 || scripts/build-test-broker.sh "$image"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  broker_container=$(docker run -d --rm -p "$port:$port" "$image" broker \
    --listener-url "tcp://0.0.0.0:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/)
  trap 'docker rm -f "$broker_container" >/dev/null 2>&1 || true' EXIT
  brokers=127.0.0.1:$port
fi
