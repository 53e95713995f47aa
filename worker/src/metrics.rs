//! The worker's metrics, served at `/metrics` in the Prometheus (OpenMetrics)
//! text format.
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `strom_events_in_total` | topic, partition | events handed to agents (each agent of the topic counts an event once, and so does each stage of one: a `group_by`'s, a partition timer's) |
//! | `strom_events_done_total` | topic, partition | events agents are done with (processed, skipped, dead-lettered, or failed; counted as `events_in`) |
//! | `strom_events_out_total` | topic | records agents sent (not changelogs; each partition adds its count every 32 records and at each checkpoint) |
//! | `strom_processing_seconds` | topic | time to process one event |
//! | `strom_consumer_lag` | topic, partition | high watermark − position |
//! | `strom_memory_limit_bytes`, `strom_memory_held_bytes` | part | the memory budget's share of each part (`stores`, `producer`, `fetched`), and what the producer and the fetched records (consumer read-ahead and tasks' queues) hold |
//! | `strom_commits_total`, `strom_commit_seconds` | | offset commits (transactions under exactly-once) |
//! | `strom_aborted_transactions_total` | | transactions aborted (exactly-once) |
//! | `strom_rebalances_total` | | rebalances this worker took part in |
//! | `strom_recovery_replayed`, `strom_recovery_to_replay` | table, partition | changelog replay progress |
//! | `strom_partition_ready` | partition | 0 recovering, 1 processing |
//! | `strom_global_table_offset` | table, partition | the last offset of its source topic a global table applied |
//! | `strom_worker_failed` | | 1 once an error stops the worker |
//! | `strom_table_reads_total`, `strom_table_writes_total` | table | table access (each partition adds its count every 32 and at each checkpoint) |
//! | `strom_late_events_total` | table | events of a windowed table whose every window had closed (dropped) |
//! | `strom_decode_errors_total`, `strom_agent_errors_total`, `strom_dead_lettered_total` | topic | bad input |
//! | `strom_corrupt_batches_total` | topic, partition | fetched batches that did not decode (stepped over or stopped at by the error policy) |
//! | `strom_client_connects_total`, `strom_client_connect_failures_total` | | connections opened to brokers, attempts that failed |
//! | `strom_client_connections_lost_total`, `strom_client_request_timeouts_total` | | open connections that failed, requests unanswered within the request timeout |

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
pub(crate) use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TablePartitionLabels {
    table: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartLabels {
    part: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NumberLabels {
    partition: i32,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // 50 µs … ~13 s.
    Histogram::new(exponential_buckets(0.00005, 4.0, 10))
}

/// The metrics of one worker. A cheap handle: clones share the counters.
///
/// ```
/// let metrics = strom_worker::Metrics::default();
/// metrics.rebalanced();
/// assert!(metrics.render().contains("strom_rebalances_total 1"));
/// ```
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    events_in: Family<PartitionLabels, Counter>,
    events_done: Family<PartitionLabels, Counter>,
    events_out: Family<TopicLabels, Counter>,
    processing: HistogramFamily<TopicLabels>,
    lag: Family<PartitionLabels, Gauge>,
    memory_limit: Family<PartLabels, Gauge>,
    memory_held: Family<PartLabels, Gauge>,
    commits: Counter,
    aborted: Counter,
    commit_seconds: Histogram,
    rebalances: Counter,
    replayed: Family<TablePartitionLabels, Gauge>,
    to_replay: Family<TablePartitionLabels, Gauge>,
    ready: Family<NumberLabels, Gauge>,
    global_applied: Family<TablePartitionLabels, Gauge>,
    failed: Gauge,
    table_reads: Family<TableLabels, Counter>,
    table_writes: Family<TableLabels, Counter>,
    late_events: Family<TableLabels, Counter>,
    decode_errors: Family<TopicLabels, Counter>,
    agent_errors: Family<TopicLabels, Counter>,
    dead_lettered: Family<TopicLabels, Counter>,
    corrupt_batches: Family<PartitionLabels, Counter>,
    /// The client's connection health ([`strom_client::health`]), brought up
    /// to date at each render, and the counts it was last brought to.
    connects: Counter,
    connect_failures: Counter,
    connections_lost: Counter,
    request_timeouts: Counter,
    health_seen: std::sync::Mutex<strom_client::health::ConnectionStats>,
}

/// One partition's share of a counter that every partition adds to (a
/// table's reads, records sent to a topic): counted here, and added to the
/// shared counter every [`PartitionCounter::BATCH`] counts, at each
/// checkpoint ([`PartitionCounter::flush`]) and when dropped. An atomic add
/// per event to one counter of all partitions made its cache line bounce
/// between the cores running them.
#[derive(Debug)]
pub(crate) struct PartitionCounter {
    shared: Counter,
    pending: std::cell::Cell<u64>,
}

impl PartitionCounter {
    /// Counts held back at most.
    pub const BATCH: u64 = 32;

    pub fn new(shared: Counter) -> PartitionCounter {
        PartitionCounter {
            shared,
            pending: std::cell::Cell::new(0),
        }
    }

    pub fn inc(&self) {
        let n = self.pending.get() + 1;
        if n >= Self::BATCH {
            self.shared.inc_by(n);
            self.pending.set(0);
        } else {
            self.pending.set(n);
        }
    }

    /// Adds what is held back to the shared counter.
    pub fn flush(&self) {
        let n = self.pending.replace(0);
        if n > 0 {
            self.shared.inc_by(n);
        }
    }
}

impl Drop for PartitionCounter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The per-event metrics of one topic partition, resolved once by the
/// partition task.
#[derive(Debug, Clone)]
pub(crate) struct EventMeters {
    /// The topic they count.
    pub topic: Arc<str>,
    pub events_in: Counter,
    pub events_done: Counter,
    pub processing: Histogram,
    pub decode_errors: Counter,
    pub agent_errors: Counter,
    pub dead_lettered: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("strom");
        let inner = Inner {
            events_in: Family::default(),
            events_done: Family::default(),
            events_out: Family::default(),
            processing: Family::new_with_constructor(latency),
            lag: Family::default(),
            memory_limit: Family::default(),
            memory_held: Family::default(),
            commits: Counter::default(),
            aborted: Counter::default(),
            commit_seconds: latency(),
            rebalances: Counter::default(),
            replayed: Family::default(),
            to_replay: Family::default(),
            ready: Family::default(),
            global_applied: Family::default(),
            failed: Gauge::default(),
            table_reads: Family::default(),
            table_writes: Family::default(),
            late_events: Family::default(),
            decode_errors: Family::default(),
            agent_errors: Family::default(),
            dead_lettered: Family::default(),
            corrupt_batches: Family::default(),
            connects: Counter::default(),
            connect_failures: Counter::default(),
            connections_lost: Counter::default(),
            request_timeouts: Counter::default(),
            health_seen: std::sync::Mutex::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "events_in",
            "Events handed to agents",
            inner.events_in.clone(),
        );
        r.register(
            "events_done",
            "Events agents are done with (processed, skipped, dead-lettered, or failed)",
            inner.events_done.clone(),
        );
        r.register(
            "events_out",
            "Records agents sent (changelog records not counted)",
            inner.events_out.clone(),
        );
        r.register(
            "processing_seconds",
            "Time to process one event",
            inner.processing.clone(),
        );
        r.register(
            "consumer_lag",
            "Records between the position and the high watermark",
            inner.lag.clone(),
        );
        r.register(
            "memory_limit_bytes",
            "The memory budget's share of each part",
            inner.memory_limit.clone(),
        );
        r.register(
            "memory_held_bytes",
            "Bytes each part holds",
            inner.memory_held.clone(),
        );
        r.register("commits", "Offset commits", inner.commits.clone());
        r.register(
            "aborted_transactions",
            "Transactions aborted (exactly-once)",
            inner.aborted.clone(),
        );
        r.register(
            "commit_seconds",
            "Time to checkpoint and commit",
            inner.commit_seconds.clone(),
        );
        r.register(
            "rebalances",
            "Rebalances this worker took part in",
            inner.rebalances.clone(),
        );
        r.register(
            "recovery_replayed",
            "Changelog records replayed into a table partition",
            inner.replayed.clone(),
        );
        r.register(
            "recovery_to_replay",
            "Changelog records expected to replay (a hint from the high watermark)",
            inner.to_replay.clone(),
        );
        r.register(
            "global_table_offset",
            "The last offset of its source topic's partition a global table applied",
            inner.global_applied.clone(),
        );
        r.register(
            "partition_ready",
            "1 when the partition's tables are recovered and it processes, 0 while it recovers",
            inner.ready.clone(),
        );
        r.register(
            "worker_failed",
            "1 once an error stops the worker",
            inner.failed.clone(),
        );
        r.register("table_reads", "Table reads", inner.table_reads.clone());
        r.register("table_writes", "Table writes", inner.table_writes.clone());
        r.register(
            "late_events",
            "Events of a windowed table whose every window had closed (dropped)",
            inner.late_events.clone(),
        );
        r.register(
            "decode_errors",
            "Events whose key or value did not decode",
            inner.decode_errors.clone(),
        );
        r.register(
            "agent_errors",
            "Events an agent failed on (errors and panics)",
            inner.agent_errors.clone(),
        );
        r.register(
            "corrupt_batches",
            "Fetched record batches that did not decode (damaged, or an unknown codec)",
            inner.corrupt_batches.clone(),
        );
        r.register(
            "dead_lettered",
            "Events sent to a dead-letter topic",
            inner.dead_lettered.clone(),
        );
        r.register(
            "client_connects",
            "Connections opened to brokers",
            inner.connects.clone(),
        );
        r.register(
            "client_connect_failures",
            "Attempts to connect to a broker that failed",
            inner.connect_failures.clone(),
        );
        r.register(
            "client_connections_lost",
            "Open broker connections that failed (reset, closed, write error)",
            inner.connections_lost.clone(),
        );
        r.register(
            "client_request_timeouts",
            "Requests a broker did not answer within the request timeout",
            inner.request_timeouts.clone(),
        );
        Metrics {
            inner: Arc::new(Inner { registry, ..inner }),
        }
    }
}

fn topic(topic: &str) -> TopicLabels {
    TopicLabels {
        topic: topic.to_owned(),
    }
}

impl Metrics {
    /// The metrics in the text exposition format.
    pub fn render(&self) -> String {
        self.catch_up_on_connections();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// Brings the connection counters up to the client's counts.
    fn catch_up_on_connections(&self) {
        let inner = &self.inner;
        let now = strom_client::health::stats();
        let mut seen = inner.health_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (counter, now, before) in [
            (&inner.connects, now.connects, seen.connects),
            (
                &inner.connect_failures,
                now.connect_failures,
                seen.connect_failures,
            ),
            (&inner.connections_lost, now.lost, seen.lost),
            (
                &inner.request_timeouts,
                now.request_timeouts,
                seen.request_timeouts,
            ),
        ] {
            counter.inc_by(now.saturating_sub(before));
        }
        *seen = now;
    }

    /// The counter of records sent to `topic` (a handle: count with `inc`).
    pub(crate) fn events_out(&self, topic: &str) -> Counter {
        self.inner
            .events_out
            .get_or_create_owned(&self::topic(topic))
    }

    /// The read and write counters of `table`.
    pub(crate) fn table_counters(&self, table: &str) -> (Counter, Counter) {
        let labels = TableLabels {
            table: table.to_owned(),
        };
        (
            self.inner.table_reads.get_or_create_owned(&labels),
            self.inner.table_writes.get_or_create_owned(&labels),
        )
    }

    /// The late-event counter of windowed table `table`.
    pub(crate) fn late_events(&self, table: &str) -> Counter {
        let labels = TableLabels {
            table: table.to_owned(),
        };
        self.inner.late_events.get_or_create_owned(&labels)
    }

    /// The per-event handles of `topic`/`partition`.
    pub(crate) fn event_meters(&self, topic: &str, partition: i32) -> EventMeters {
        let of = self::topic(topic);
        let labels = PartitionLabels {
            topic: topic.to_owned(),
            partition,
        };
        EventMeters {
            topic: Arc::from(topic),
            events_in: self.inner.events_in.get_or_create_owned(&labels),
            events_done: self.inner.events_done.get_or_create_owned(&labels),
            processing: self.inner.processing.get_or_create_owned(&of),
            decode_errors: self.inner.decode_errors.get_or_create_owned(&of),
            agent_errors: self.inner.agent_errors.get_or_create_owned(&of),
            dead_lettered: self.inner.dead_lettered.get_or_create_owned(&of),
        }
    }

    /// Events of `topic`/`partition` agents are done with: processed,
    /// skipped, dead-lettered, or failed (each agent counts each event once).
    pub fn events_done(&self, topic: &str, partition: i32) -> u64 {
        let labels = PartitionLabels {
            topic: topic.to_owned(),
            partition,
        };
        self.inner.events_done.get(&labels).map_or(0, |c| c.get())
    }

    /// An error stops the worker.
    pub(crate) fn failed(&self) {
        self.inner.failed.set(1);
    }

    /// Whether an error stops (or stopped) the worker.
    pub fn has_failed(&self) -> bool {
        self.inner.failed.get() == 1
    }

    /// Whether partition number `partition` is processing (`Some(true)`),
    /// recovering (`Some(false)`), or not this worker's (`None`).
    pub fn is_ready(&self, partition: i32) -> Option<bool> {
        let ready = self.inner.ready.get(&NumberLabels { partition })?;
        Some(ready.get() == 1)
    }

    /// The lag of `topic`/`partition` is `lag` records.
    pub fn lag(&self, topic: &str, partition: i32, lag: i64) {
        self.inner
            .lag
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition,
            })
            .set(lag);
    }

    /// Shows the memory budget's shares.
    pub(crate) fn memory_limits(&self, shares: &crate::budget::Shares) {
        for (part, bytes) in [
            ("stores", shares.stores),
            ("producer", shares.producer),
            ("fetched", shares.fetched),
        ] {
            let gauge = self.inner.memory_limit.get_or_create(&PartLabels { part });
            gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// `part` of the memory budget holds `bytes`.
    pub(crate) fn memory_held(&self, part: &'static str, bytes: usize) {
        let gauge = self.inner.memory_held.get_or_create(&PartLabels { part });
        gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Forgets the lag of a partition this worker no longer reads.
    pub fn forget_lag(&self, topic: &str, partition: i32) {
        self.inner.lag.remove(&PartitionLabels {
            topic: topic.to_owned(),
            partition,
        });
    }

    /// A checkpoint and commit took `took`.
    pub fn committed(&self, took: Duration) {
        self.inner.commits.inc();
        self.inner.commit_seconds.observe(took.as_secs_f64());
    }

    /// A batch of `topic`/`partition` did not decode.
    pub fn corrupt_batch(&self, topic: &str, partition: i32) {
        self.inner
            .corrupt_batches
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition,
            })
            .inc();
    }

    /// A transaction was aborted.
    pub fn aborted(&self) {
        self.inner.aborted.inc();
    }

    /// The group rebalanced.
    pub fn rebalanced(&self) {
        self.inner.rebalances.inc();
    }

    /// Recovery of `table`/`partition` has replayed `replayed` of `to_replay`.
    pub fn recovery(&self, table: &str, partition: i32, replayed: u64, to_replay: u64) {
        let labels = TablePartitionLabels {
            table: table.to_owned(),
            partition,
        };
        self.inner
            .replayed
            .get_or_create(&labels)
            .set(replayed as i64);
        self.inner
            .to_replay
            .get_or_create(&labels)
            .set(to_replay as i64);
    }

    /// The gauge of the last offset of `partition` of its topic that global
    /// table `table` applied.
    pub(crate) fn global_applied(&self, table: &str, partition: i32) -> Gauge {
        let labels = TablePartitionLabels {
            table: table.to_owned(),
            partition,
        };
        self.inner.global_applied.get_or_create_owned(&labels)
    }

    /// The last offset of `partition` of its topic that global table `table`
    /// applied, once it applied one.
    pub fn global_offset(&self, table: &str, partition: i32) -> Option<i64> {
        let labels = TablePartitionLabels {
            table: table.to_owned(),
            partition,
        };
        self.inner.global_applied.get(&labels).map(|g| g.get())
    }

    /// Partition number `partition` is processing (`true`) or recovering.
    pub fn partition_ready(&self, partition: i32, ready: bool) {
        self.inner
            .ready
            .get_or_create(&NumberLabels { partition })
            .set(i64::from(ready));
    }

    /// Forgets a partition number this worker no longer owns.
    pub fn forget_partition(&self, partition: i32) {
        self.inner.ready.remove(&NumberLabels { partition });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partition's counts reach the shared counter in batches, at a
    /// flush, and when the partition's counter goes: none is lost.
    #[test]
    fn partition_counts_reach_the_shared_counter() {
        let shared = Counter::default();
        let a = PartitionCounter::new(shared.clone());
        let b = PartitionCounter::new(shared.clone());
        for _ in 0..PartitionCounter::BATCH - 1 {
            a.inc();
        }
        b.inc();
        assert_eq!(shared.get(), 0, "held back below a batch");
        a.inc();
        assert_eq!(shared.get(), PartitionCounter::BATCH);
        b.flush();
        assert_eq!(shared.get(), PartitionCounter::BATCH + 1);
        a.inc();
        drop(a);
        assert_eq!(shared.get(), PartitionCounter::BATCH + 2);
        b.flush();
        assert_eq!(shared.get(), PartitionCounter::BATCH + 2, "flushed twice");
    }

    /// The client's connection counts appear in `/metrics` and follow it.
    #[test]
    fn connection_health_is_rendered() {
        let metrics = Metrics::default();
        let value = |text: &str, name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        };
        let before = strom_client::health::stats().connects;
        let first = metrics.render();
        let after = strom_client::health::stats().connects;
        let seen = value(&first, "strom_client_connects_total");
        assert!(
            before <= seen && seen <= after,
            "{before} <= {seen} <= {after}"
        );
        for name in [
            "strom_client_connect_failures_total",
            "strom_client_connections_lost_total",
            "strom_client_request_timeouts_total",
        ] {
            value(&first, name);
        }
    }
}
