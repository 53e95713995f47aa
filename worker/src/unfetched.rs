//! What a time-ordered task knows of the records the broker holds for it
//! and the worker has not handed it yet, so it can wait for them instead of
//! processing one topic's backlog before another's (Kafka Streams'
//! fetch-lag check before it picks a task's next record).
//!
//! The poll loop publishes each source partition's lag after it hands out
//! records (so a lag of 0 is published only once those records are in the
//! task's inbox); a task reads it when one of its partitions has nothing
//! queued. A task that waits marks the partition, and the poll loop lifts
//! that partition's backpressure pause even while the task holds more than
//! its bound of the other topics' records, or the wait could never end.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use strom_client::consumer::{IsolationLevel, TopicPartition};
use strom_client::group::GroupConsumer;

/// Per source partition: the records the broker holds past what was
/// handed to the tasks, and which partitions tasks wait for.
#[derive(Default)]
pub(crate) struct Unfetched {
    lag: Mutex<HashMap<TopicPartition, i64>>,
    waited_for: Mutex<HashSet<TopicPartition>>,
}

impl Unfetched {
    /// Publishes the lag of every assigned partition: up to the last stable
    /// offset under read-committed (records of an open transaction are not
    /// waited for), else the high watermark. A partition whose position or
    /// end is not known yet has no lag published.
    pub fn publish(&self, consumer: &GroupConsumer, isolation: IsolationLevel) {
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        for tp in consumer.group().assignment() {
            let end = match isolation {
                IsolationLevel::ReadCommitted => consumer.last_stable_offset(&tp),
                IsolationLevel::ReadUncommitted => consumer.high_watermark(&tp),
            };
            match consumer.position(&tp) {
                Some(position) if end >= 0 => {
                    lag.insert(tp, (end - position).max(0));
                }
                _ => {
                    lag.remove(&tp);
                }
            }
        }
    }

    /// The records of `tp` the broker holds and the task has not been
    /// handed; `None` while unknown.
    pub fn lag(&self, tp: &TopicPartition) -> Option<i64> {
        let lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.get(tp).copied()
    }

    /// Forgets partition number `n`'s lags and waits (it was assigned anew:
    /// what was published before is stale).
    pub fn forget(&self, n: i32) {
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        lag.retain(|tp, _| tp.partition != n);
        drop(lag);
        self.set_waiting(n, &[]);
    }

    /// Replaces what partition number `n`'s task waits for.
    pub fn set_waiting(&self, n: i32, tps: &[TopicPartition]) {
        let mut waited = self.waited_for.lock().unwrap_or_else(|e| e.into_inner());
        waited.retain(|tp| tp.partition != n);
        waited.extend(tps.iter().cloned());
    }

    /// Whether a task waits for records of `tp`.
    pub fn is_waited_for(&self, tp: &TopicPartition) -> bool {
        let waited = self.waited_for.lock().unwrap_or_else(|e| e.into_inner());
        waited.contains(tp)
    }
}
