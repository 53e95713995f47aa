"""The anchor of `strom-bench windowed`: the same workload in Quix Streams.

Per-key counts in one-minute tumbling windows, results on close
(`tumbling_window(60s).count().final()`), over a topic that
`strom-bench windowed-feed` filled; prints one JSON line like
`strom-bench windowed`'s, with "correct" checked against the same
expectation (computed here from the same formula).

    pip install quixstreams
    strom-bench windowed-feed --brokers B --messages N --topic T   # prints base_ms
    python benches/quix_windowed.py --brokers B --topic T --messages N --base-ms BASE
"""

import argparse
import json
import os
import resource
import shutil
import tempfile
import time
import uuid

from quixstreams import Application

KEYS = 1000
SPAN_MS = 30 * 60_000
MINUTE = 60_000


def expected(n, base):
    """(key, window start) -> count, as strom-bench's `expected`."""
    truth = {}
    for i in range(n):
        key = f"key{(i * 7919) % KEYS}"
        t = base + (i * SPAN_MS) // max(n, 1)
        w = (key, t - t % MINUTE)
        truth[w] = truth.get(w, 0) + 1
    return truth


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--base-ms", type=int, required=True)
    args = parser.parse_args()

    truth = expected(args.messages, args.base_ms)
    run = uuid.uuid4().hex[:8]
    state_dir = tempfile.mkdtemp(prefix=f"quix-windowed-{run}-")
    app = Application(
        broker_address=args.brokers,
        consumer_group=f"quix-windowed-{run}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    events = app.topic(args.topic, key_deserializer="str", value_deserializer="json")
    results = app.topic(f"quix-windowed-results-{run}", value_serializer="json")

    got = {}
    clock = {"first": None, "end": None}

    def first(value):
        if clock["first"] is None:
            clock["first"] = time.monotonic()
        return value

    def record(value, key, timestamp, headers):
        w = (key, value["start"])
        got.setdefault(w, []).append(value["value"])
        if sum(len(v) for v in got.values()) >= len(truth) and clock["end"] is None:
            clock["end"] = time.monotonic()
            app.stop()

    sdf = app.dataframe(events)
    sdf = sdf.update(first)
    sdf = sdf.tumbling_window(duration_ms=MINUTE).count().final()
    sdf = sdf.update(record, metadata=True)
    sdf = sdf.to_topic(results)
    app.run()

    seconds = (clock["end"] or time.monotonic()) - (clock["first"] or time.monotonic())
    once = {w: v[0] for w, v in got.items() if len(v) == 1}
    events = args.messages + KEYS
    print(
        json.dumps(
            {
                "op": "quix-windowed",
                "events": events,
                "windows": len(truth),
                "windows_sent": sum(len(v) for v in got.values()),
                "seconds": seconds,
                "events_per_s": events / seconds if seconds > 0 else None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "correct": once == truth and len(got) == len(truth),
            }
        ),
        flush=True,
    )
    shutil.rmtree(state_dir, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
