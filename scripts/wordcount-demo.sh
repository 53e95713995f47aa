#!/usr/bin/env bash
# The wordcount example end to end: a broker (a container started for the run,
# or STROM_BROKERS), one worker, sample text in, the top words out, then a clean
# stop of the worker with SIGTERM.
#
#   scripts/wordcount-demo.sh [TEXT-FILE]    (default streams/examples/sample.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
text=${1:-streams/examples/sample.txt}
cargo build --release -q -p strom --example wordcount
cargo build --release -q -p strom-benches --bin strom-bench
source scripts/test-broker.sh

state=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
STROM_BROKERS=$brokers STROM_STATE_DIR=$state target/release/examples/wordcount worker \
  --web-port "$port" --web-bind 127.0.0.1 --web-host 127.0.0.1 --log-level warn &
worker=$!
target/release/strom-bench send-lines --brokers "$brokers" --topic sentences <"$text"
target/release/strom-bench top-counts --brokers "$brokers" --topic word-counts-out \
  --expect-total "$(wc -w <"$text")" --top 10
# The same table, asked of the worker's web server.
python3 - "$port" <<'PY'
import json, sys, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
print("ready:", urllib.request.urlopen(base + "/ready").status)
print("the:", json.load(urllib.request.urlopen(base + "/tables/word-counts/the")))
PY
kill -TERM "$worker"
wait "$worker"
rm -rf "$state"
echo "worker stopped cleanly"
