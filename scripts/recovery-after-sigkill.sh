#!/usr/bin/env bash
# How long a wordcount worker takes to get going again after SIGKILL, with the
# table holding KEYS distinct words: with durable checkpoints (the defaults)
# and without them (a checkpoint reaches disk only at revoke or shutdown, as
# before issue 13). Each run: a fresh broker and state dir, KEYS distinct words
# fed and counted, SIGKILL KILL_AFTER seconds after the last count (default 7:
# past the 5 s durable interval), restart on the same state dir. It prints the
# changelog records the restart replayed and the longest replay of one table
# partition (from the log), and the seconds until /ready answers 200.
#
# BROKER=nisshi runs nisshi 0.8.1, where the worker is a static member and
# gets its partitions back at once; on tansu 0.6 (the default, no static
# membership) the restart first waits out the killed member's session, 10 s.
#
#   [BROKER=nisshi] scripts/recovery-after-sigkill.sh [KEYS] [RUNS]   (default 1000000 3)
set -euo pipefail
cd "$(dirname "$0")/.."
keys=${1:-1000000}
runs=${2:-3}
kill_after=${KILL_AFTER:-7}
cargo build --release -q -p strom --example wordcount
cargo build --release -q -p strom-benches --bin strom-bench
if [[ ${BROKER:-tansu} == nisshi ]]; then
  image=(--entrypoint /nisshi strom/nisshi:0.8.1) engine=memory://nisshi/ static=true
else
  image=(strom/tansu:0.6.0) engine=memory://tansu/ static=false
fi
work=$(mktemp -d)
trap 'docker rm -f strom-recovery-broker >/dev/null 2>&1 || true; pkill -KILL -f "$work" || true; rm -rf "$work"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
python3 - "$keys" >"$work/words.txt" <<'PY'
import sys
n = int(sys.argv[1])
for start in range(0, n, 10):
    print(" ".join(f"k{i:08d}" for i in range(start, min(start + 10, n))))
PY

start_worker() { # state-dir web-port log env...
  local state=$1 web=$2 log=$3
  shift 3
  env "$@" STROM_BROKERS="$brokers" STROM_STATE_DIR="$state" STROM_STATIC_MEMBERSHIP=$static \
    target/release/examples/wordcount worker --log-level info \
    --web-port "$web" --web-bind 127.0.0.1 --web-host 127.0.0.1 >>"$log" 2>&1 &
  echo $!
}

one_run() { # label env...
  local label=$1
  shift
  docker rm -f strom-recovery-broker >/dev/null 2>&1 || true
  local port
  port=$(free_port)
  docker run -d --rm --name strom-recovery-broker -p "$port:$port" "${image[@]}" broker \
    --listener-url "tcp://0.0.0.0:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$engine" >/dev/null
  brokers=127.0.0.1:$port
  sleep 1
  local state="$work/state-$label" web log="$work/$label.log"
  rm -rf "$state" "$log"
  web=$(free_port)
  local pid
  pid=$(start_worker "$state" "$web" "$log" "$@")
  target/release/strom-bench send-lines --brokers "$brokers" --topic sentences <"$work/words.txt" >/dev/null
  target/release/strom-bench top-counts --brokers "$brokers" --topic word-counts-out \
    --expect-total "$keys" --top 0 >/dev/null
  sleep "$kill_after"
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null || true
  local before
  before=$(wc -l <"$log")
  local t0
  t0=$(date +%s.%N)
  pid=$(start_worker "$state" "$web" "$log" "$@")
  until curl -sf "http://127.0.0.1:$web/ready" >/dev/null; do sleep 0.05; done
  local t1
  t1=$(date +%s.%N)
  local restart replayed longest
  restart=$(tail -n +"$((before + 1))" "$log" | sed 's/\x1b\[[0-9;]*m//g')
  replayed=$(grep 'table ready' <<<"$restart" | grep -o 'replayed=[0-9]*' | cut -d= -f2 | paste -sd+ | bc)
  longest=$( (grep ' recovered' <<<"$restart" || true) | grep -o 'seconds=[0-9.]*' | cut -d= -f2 | sort -g | tail -1)
  printf '%-16s replayed %8s records, longest replay %6.2f s, ready after %6.2f s\n' \
    "$label" "${replayed:-0}" "${longest:-0}" "$(echo "$t1 - $t0" | bc)"
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
}

echo "$keys distinct words; SIGKILL $kill_after s after the last count; restart on the same state dir"
for run in $(seq "$runs"); do
  one_run "durable-off-$run" STROM_DURABLE_CHECKPOINT_INTERVAL_MS=86400000 \
    STROM_DURABLE_CHECKPOINT_CHANGES=1000000000000
  one_run "durable-on-$run"
done
