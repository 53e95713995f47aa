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
STROM_BROKERS=$brokers STROM_STATE_DIR=$state target/release/examples/wordcount worker --log-level warn &
worker=$!
target/release/strom-bench send-lines --brokers "$brokers" --topic sentences <"$text"
target/release/strom-bench top-counts --brokers "$brokers" --topic word-counts-out \
  --expect-total "$(wc -w <"$text")" --top 10
kill -TERM "$worker"
wait "$worker"
rm -rf "$state"
echo "worker stopped cleanly"
