#!/usr/bin/env bash
# `strom-bench windowed` beside its anchor, Quix Streams
# (benches/quix_windowed.py), on one broker in one run: the workload is fed
# once, then each runs over it RUNS times, alternating (each in its own
# consumer group). Prints every JSON line, then the medians and their ratio.
# The broker is the local tansu image in a container, or STROM_BENCH_BROKERS.
# Quix Streams is installed into target/quix-venv on first use.
#
#   scripts/windowed-vs-quix.sh [MESSAGES] [RUNS]     (default 1000000 3)
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-1000000}
runs=${2:-3}
quix_version=quixstreams==3.28.1

cargo build --release -q -p strom-benches --bin strom-bench
bench=target/release/strom-bench
venv=target/quix-venv
if ! "$venv/bin/python" -c 'import quixstreams' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$quix_version"
fi

STROM_BROKERS=${STROM_BENCH_BROKERS:-${STROM_BROKERS:-}}
source scripts/test-broker.sh

topic="windowed-bench-$(date +%s)"
fed=$("$bench" windowed-feed --brokers "$brokers" --messages "$messages" --topic "$topic")
echo "$fed"
base=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["base_ms"])' "$fed")

lines=()
for run in $(seq "$runs"); do
  lines+=("$("$bench" windowed --brokers "$brokers" --messages "$messages" --topic "$topic" --base-ms "$base" | tail -n 1)")
  echo "${lines[-1]}"
  lines+=("$("$venv/bin/python" benches/quix_windowed.py --brokers "$brokers" --topic "$topic" --messages "$messages" --base-ms "$base" 2>/dev/null | tail -n 1)")
  echo "${lines[-1]}"
done
printf '%s\n' "${lines[@]}" | python3 -c '
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
def median(op, field):
    return statistics.median(r[field] for r in runs if r["op"] == op)
strom, quix = median("windowed", "events_per_s"), median("quix-windowed", "events_per_s")
print(json.dumps({
    "strom_events_per_s": strom,
    "quix_events_per_s": quix,
    "ratio": strom / quix,
    "strom_peak_rss_mb": median("windowed", "peak_rss_mb"),
    "quix_peak_rss_mb": median("quix-windowed", "peak_rss_mb"),
    "all_correct": all(r["correct"] for r in runs),
}))'
