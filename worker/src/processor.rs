//! What the runtime runs: processors (the streams crate's agents, compiled down
//! to bytes) and the context they run in.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use strom_client::consumer::ConsumerRecord;
use strom_client::producer::{DeliveryFuture, Producer, ProducerRecord};
use strom_state::LoggedStore;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::error::WorkerError;
use crate::metrics::{Counter, Metrics};

/// What an agent's failure looks like to the runtime.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// The error a processor returns for an event whose key or value does not
/// decode: counted as a decode error, never retried.
#[derive(Debug, thiserror::Error)]
#[error("undecodable event: {0}")]
pub struct DecodeError(pub String);

/// What happens to an event an agent fails on (an error, a panic, or an
/// undecodable key or value).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Log it, count it, go on with the next event (its offset is committed).
    #[default]
    Skip,
    /// Send the event's original key, value and headers to this topic, with
    /// headers `strom.error.topic`, `strom.error.partition`,
    /// `strom.error.offset` and `strom.error.message`, then go on. The send is
    /// acknowledged before the offset is committed.
    DeadLetter(String),
    /// Process the event again up to `attempts` more times, waiting `backoff`
    /// before the first retry and twice as long before each next one; then
    /// skip it. Undecodable events are skipped at once.
    Retry {
        /// Retries after the first failure.
        attempts: u32,
        /// Wait before the first retry.
        backoff: std::time::Duration,
    },
    /// Stop the worker with an error naming the event (it is processed again
    /// after a restart: its offset is not committed).
    Stop,
}

/// The future of processing one event.
pub type ProcessFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send + 'a>>;

/// Processes the events of one source topic: in order per partition, or up
/// to [`Processor::concurrency`] at once.
///
/// An error is logged with the event's topic, partition and offset, and the
/// partition goes on with the next event (the event counts as processed).
///
/// A processor may hold events back (batching): it reports the earliest one in
/// [`Processor::held_from`], so no offset is committed past an event still
/// held, and hands them on in [`Processor::flush`], which the runtime calls
/// when [`Processor::deadline`] passes and before the partition closes.
pub trait Processor: Send + Sync {
    /// The topic whose events this processor takes.
    fn topic(&self) -> &str;

    /// Processes one event.
    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_>;

    /// How many events of one partition may be processed at once. With more
    /// than one their order is not kept, and offsets are committed up to the
    /// first event not yet done. Default 1: in order.
    fn concurrency(&self) -> usize {
        1
    }

    /// The offset (in [`Processor::topic`]) of the earliest event held back
    /// for `partition`, if any.
    fn held_from(&self, _partition: i32) -> Option<i64> {
        None
    }

    /// Processes whatever this processor holds back for `ctx`'s partition.
    fn flush(&self, _ctx: Context) -> ProcessFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    /// When the events held back for `partition` must be flushed at the
    /// latest, if any are held.
    fn deadline(&self, _partition: i32) -> Option<tokio::time::Instant> {
        None
    }

    /// This processor's error policy; `None` takes the worker's.
    fn error_policy(&self) -> Option<&ErrorPolicy> {
        None
    }

    /// Forgets anything held for `partition`: called when this worker starts
    /// on it, since what was held before it was lost is processed again from
    /// the committed offset.
    fn reset(&self, _partition: i32) {}
}

/// One table of a partition with its access counters.
#[derive(Debug)]
pub(crate) struct TableSlot {
    pub store: LoggedStore,
    pub reads: Counter,
    pub writes: Counter,
}

/// The tables and pending sends of one partition.
#[derive(Debug)]
pub(crate) struct PartitionState {
    pub tables: BTreeMap<String, TableSlot>,
    pub deliveries: Vec<DeliveryFuture>,
    /// Records sent, by topic.
    pub sent: HashMap<String, Counter>,
}

/// What a processor sees while it handles an event of one partition: that
/// partition's tables and a producer. Everything sent or written through it
/// is acknowledged before the event's offset is committed.
///
/// A cheap handle: clone it into the futures an agent spawns.
#[derive(Debug, Clone)]
pub struct Context {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    partition: i32,
    partitions: usize,
    state: Mutex<PartitionState>,
    producer: Producer,
    metrics: Metrics,
}

impl Context {
    pub(crate) fn new(
        partition: i32,
        partitions: usize,
        tables: BTreeMap<String, LoggedStore>,
        producer: Producer,
        metrics: Metrics,
    ) -> Context {
        let tables = tables
            .into_iter()
            .map(|(name, store)| {
                let (reads, writes) = metrics.table_counters(&name);
                (
                    name,
                    TableSlot {
                        store,
                        reads,
                        writes,
                    },
                )
            })
            .collect();
        Context {
            inner: Arc::new(Shared {
                partition,
                partitions,
                state: Mutex::new(PartitionState {
                    tables,
                    deliveries: Vec::new(),
                    sent: HashMap::new(),
                }),
                producer,
                metrics,
            }),
        }
    }

    /// The partition being processed.
    pub fn partition(&self) -> i32 {
        self.inner.partition
    }

    /// The partition count of the source topics (and the tables).
    pub fn partitions(&self) -> usize {
        self.inner.partitions
    }

    pub(crate) fn producer(&self) -> &Producer {
        &self.inner.producer
    }

    pub(crate) async fn state(&self) -> MutexGuard<'_, PartitionState> {
        self.inner.state.lock().await
    }

    /// This partition of table `name`, locked for the caller (reads and
    /// writes through it are not counted in the metrics; [`Context::get`],
    /// [`Context::put`] and [`Context::delete`] are).
    pub async fn table(
        &self,
        name: &str,
    ) -> Result<MappedMutexGuard<'_, LoggedStore>, WorkerError> {
        MutexGuard::try_map(self.state().await, |s| {
            s.tables.get_mut(name).map(|t| &mut t.store)
        })
        .map_err(|_| no_table(name))
    }

    /// The value of `key` in this partition of table `name`.
    pub async fn get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, WorkerError> {
        let state = self.state().await;
        let table = state.tables.get(name).ok_or_else(|| no_table(name))?;
        table.reads.inc();
        Ok(table.store.get(key)?)
    }

    /// Sets `key` to `value` in this partition of table `name`.
    pub async fn put(&self, name: &str, key: Vec<u8>, value: Vec<u8>) -> Result<(), WorkerError> {
        let mut state = self.state().await;
        let table = state.tables.get_mut(name).ok_or_else(|| no_table(name))?;
        table.writes.inc();
        Ok(table.store.put(key, value).await?)
    }

    /// Deletes `key` from this partition of table `name`.
    pub async fn delete(&self, name: &str, key: Vec<u8>) -> Result<(), WorkerError> {
        let mut state = self.state().await;
        let table = state.tables.get_mut(name).ok_or_else(|| no_table(name))?;
        table.writes.inc();
        Ok(table.store.delete(key).await?)
    }

    /// Sends a record; its acknowledgement is awaited before the current
    /// event's offset is committed.
    pub async fn send(&self, record: ProducerRecord<'_>) -> Result<(), WorkerError> {
        let topic = record.topic;
        let delivery = self.inner.producer.send(record).await?;
        let mut state = self.state().await;
        match state.sent.get(topic) {
            Some(c) => {
                c.inc();
            }
            None => {
                let c = self.inner.metrics.events_out(topic);
                c.inc();
                state.sent.insert(topic.to_owned(), c);
            }
        }
        state.deliveries.push(delivery);
        Ok(())
    }
}

fn no_table(name: &str) -> WorkerError {
    WorkerError::Config(format!("no table named {name:?} is declared"))
}
