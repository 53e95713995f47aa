#!/usr/bin/env bash
# Runs strom-bench (produce, then consume) against a broker started for the run:
# the local tansu image in a container (built first if missing), or the broker
# named by STROM_BENCH_BROKERS. When the librdkafka anchor is available
# (../shared/anchors/librdkafka-perf, or STROM_ANCHOR), it is run on the same
# broker in the same run, for comparison.
#
#   scripts/bench.sh [MESSAGES] [SIZE] [COMPRESSION]     (default 1000000 100 lz4)
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-1000000}
size=${2:-100}
compression=${3:-lz4}

cargo build --release -q -p strom-benches --bin strom-bench
bench=target/release/strom-bench

STROM_BROKERS=${STROM_BENCH_BROKERS:-${STROM_BROKERS:-}}
source scripts/test-broker.sh

run=$(date +%s)
echo "# strom-client, $messages records of $size bytes, $compression, broker $brokers" >&2
# Without keys, as rdkafka_performance -P sends its records.
"$bench" produce --brokers "$brokers" --topic "strom-bench-$run" --messages "$messages" --size "$size" --compression "$compression" --no-keys
"$bench" consume --brokers "$brokers" --topic "strom-bench-$run" --messages "$messages"

anchor=${STROM_ANCHOR:-../shared/anchors/librdkafka-perf}
if [[ -x $anchor ]]; then
  echo "# librdkafka rdkafka_performance on the same broker (columns: elapsed ms, msgs, bytes, rtt, dr, dr_m/s, ...)" >&2
  topic="librdkafka-bench-$run"
  # Same topic layout as strom-bench creates (6 partitions).
  "$bench" produce --brokers "$brokers" --topic "$topic" --messages 0 --size "$size" >/dev/null
  "$anchor" -P -t "$topic" -b "$brokers" -s "$size" -c "$messages" -z "$compression" -X linger.ms=5 -u 2>&1 | grep -v '^%' | tail -n 1
  "$anchor" -C -t "$topic" -b "$brokers" -G "librdkafka-bench-$run" -c "$messages" -u -X auto.offset.reset=earliest 2>&1 | grep -v '^%' | tail -n 1
fi
