//! The producer: records in, acknowledged offsets out.
//!
//! ```text
//!  send() ──► accumulator: one open batch per partition ──(full | linger | flush)──► ready queue
//!                                                                                      │
//!  DeliveryFuture ◄── completion ◄── sink: one ProduceRequest per broker ◄─────────────┘
//!                                    (every ready partition of that broker)
//! ```
//!
//! [`Producer::send`] partitions the record (Java's murmur2 for keys, sticky for
//! records without one), encodes it straight into its partition's open batch and
//! returns a [`DeliveryFuture`]. A background task, the sink, closes batches that
//! are full or whose linger has passed, puts every ready partition of a broker into
//! one ProduceRequest, and resolves each record's future with its offset or an
//! error. A partition has at most one request in flight, so a retried batch is
//! never overtaken by a later one: per-partition order holds across retries.

mod accumulator;
mod sink;
mod txn;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{Notify, SemaphorePermit};

use crate::cluster::Client;
use crate::error::{Error, Result};
use crate::records::{Compression, Header};

use accumulator::Accumulator;

/// How many acknowledgements a produce request waits for (Java's `acks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Acks {
    /// No response: the record counts as sent once written to the socket.
    /// Offsets are then unknown (-1).
    None,
    /// The leader has written the record.
    Leader,
    /// Every in-sync replica has the record.
    #[default]
    All,
}

impl Acks {
    fn code(self) -> i16 {
        match self {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => -1,
        }
    }
}

impl std::str::FromStr for Acks {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "0" | "none" => Ok(Acks::None),
            "1" | "leader" => Ok(Acks::Leader),
            "all" | "-1" => Ok(Acks::All),
            other => Err(Error::Config(format!(
                "acks must be 0, 1 or all, not {other:?}"
            ))),
        }
    }
}

/// Producer settings. Defaults follow librdkafka where they matter for
/// throughput (a 5 ms linger, batches up to 1 MB) and Java otherwise.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Acknowledgements to wait for. Default [`Acks::All`].
    pub acks: Acks,
    /// How long a batch waits for more records before it is sent (Java's
    /// `linger.ms`). Default 5 ms.
    pub linger: Duration,
    /// Size in bytes at which a partition's batch is closed (Java's
    /// `batch.size`). Default 1,000,000.
    pub batch_size: usize,
    /// Compression of each batch. Default none.
    pub compression: Compression,
    /// Bytes of records that may wait in the producer; `send` waits for room
    /// beyond that (Java's `buffer.memory`). Default 64 MiB.
    pub buffer_memory: usize,
    /// How long a record may take from `send` to acknowledgement, retries
    /// included (Java's `delivery.timeout.ms`). Default 120 s.
    pub delivery_timeout: Duration,
    /// Produce requests in flight per broker (each partition has at most one).
    /// Default 5.
    pub max_in_flight: usize,
    /// Bytes of batches one Produce request should carry (Java's
    /// `max.request.size`; counted before compression, and after it for a
    /// batch sent again). Batches ready for one broker
    /// beyond that go in further requests while `max_in_flight` allows, so
    /// the broker works on one request while the next is on its way and
    /// partitions come free one by one; a batch bigger than this still
    /// goes, alone. Default 1 MiB.
    pub max_request_size: usize,
    /// Idempotent delivery: a producer id and per-partition sequence numbers
    /// let the broker drop the duplicates retries would otherwise write (Java's
    /// `enable.idempotence`). Requires [`Acks::All`]. Default true.
    pub idempotence: bool,
    /// Makes the producer transactional (Java's `transactional.id`): records
    /// and consumer offsets become visible together on commit or not at all.
    /// Requires idempotence. Default none.
    pub transactional_id: Option<String>,
    /// How long the coordinator lets a transaction stay open before aborting
    /// it (Java's `transaction.timeout.ms`). Default 60 s.
    pub transaction_timeout: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(5),
            batch_size: 1_000_000,
            compression: Compression::None,
            buffer_memory: 64 * 1024 * 1024,
            delivery_timeout: Duration::from_secs(120),
            max_in_flight: 5,
            max_request_size: 1 << 20,
            idempotence: true,
            transactional_id: None,
            transaction_timeout: Duration::from_secs(60),
        }
    }
}

impl ProducerConfig {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 || self.batch_size > i32::MAX as usize {
            return Err(Error::Config(format!(
                "batch_size {} is out of range",
                self.batch_size
            )));
        }
        if self.buffer_memory < self.batch_size || self.buffer_memory > u32::MAX as usize {
            return Err(Error::Config(format!(
                "buffer_memory {} must be at least batch_size {} and fit in 32 bits",
                self.buffer_memory, self.batch_size
            )));
        }
        if self.max_in_flight == 0 {
            return Err(Error::Config("max_in_flight must be at least 1".into()));
        }
        if self.idempotence && self.acks != Acks::All {
            return Err(Error::Config(format!(
                "idempotence needs acks=all (got {:?}); set idempotence to false for other acks",
                self.acks
            )));
        }
        if self.idempotence && self.max_in_flight > 5 {
            return Err(Error::Config(format!(
                "idempotence allows at most 5 requests in flight per broker, not {}",
                self.max_in_flight
            )));
        }
        if self.transactional_id.is_some() && !self.idempotence {
            return Err(Error::Config(
                "a transactional producer must be idempotent".into(),
            ));
        }
        Ok(())
    }
}

/// A record to send. Its bytes are copied into a batch by [`Producer::send`],
/// so it only borrows them.
///
/// ```
/// use strom_client::producer::ProducerRecord;
/// let r = ProducerRecord::to("orders").key(b"user-1").value(b"{\"total\":3}");
/// assert_eq!(r.topic, "orders");
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ProducerRecord<'a> {
    /// The topic.
    pub topic: &'a str,
    /// An explicit partition; `None` lets the partitioner choose.
    pub partition: Option<i32>,
    /// The key; `None` is a null key.
    pub key: Option<&'a [u8]>,
    /// The value; `None` is a null value (a tombstone).
    pub value: Option<&'a [u8]>,
    /// Headers.
    pub headers: &'a [Header],
    /// Milliseconds since the epoch; `None` stamps the time of `send`.
    pub timestamp: Option<i64>,
}

impl<'a> ProducerRecord<'a> {
    /// An empty record for `topic`.
    pub fn to(topic: &'a str) -> Self {
        ProducerRecord {
            topic,
            partition: None,
            key: None,
            value: None,
            headers: &[],
            timestamp: None,
        }
    }
    /// Sets the key.
    pub fn key(mut self, key: &'a [u8]) -> Self {
        self.key = Some(key);
        self
    }
    /// Sets the value.
    pub fn value(mut self, value: &'a [u8]) -> Self {
        self.value = Some(value);
        self
    }
    /// Sets the headers.
    pub fn headers(mut self, headers: &'a [Header]) -> Self {
        self.headers = headers;
        self
    }
    /// Sends to this partition instead of the partitioner's choice.
    pub fn partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
    /// Sets the timestamp (ms since the epoch).
    pub fn timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }
}

/// Where an acknowledged record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The offset, or -1 with [`Acks::None`].
    pub offset: i64,
}

/// The outcome of one batch, shared by the futures of its records.
#[derive(Debug)]
struct Completion {
    topic: Arc<str>,
    partition: i32,
    /// The batch's base offset, or the error that failed it.
    result: OnceLock<Result<i64>>,
    done: Notify,
}

impl Completion {
    fn new(topic: Arc<str>, partition: i32) -> Arc<Self> {
        Arc::new(Completion {
            topic,
            partition,
            result: OnceLock::new(),
            done: Notify::new(),
        })
    }

    fn complete(&self, result: Result<i64>) {
        let _ = self.result.set(result);
        self.done.notify_waiters();
    }
}

/// Resolves to where a record was written once the broker acknowledged it,
/// or to the error that stopped it. Await it, or drop it if only
/// [`Producer::flush`] matters.
#[derive(Debug, Clone)]
pub struct DeliveryFuture {
    completion: Arc<Completion>,
    index: i64,
}

impl DeliveryFuture {
    /// Whether both records are in the same batch: they are written, or
    /// fail, together (so waiting for one of them waits for both).
    pub fn same_batch(&self, other: &DeliveryFuture) -> bool {
        Arc::ptr_eq(&self.completion, &other.completion)
    }

    /// The outcome if the record's batch has completed, without waiting.
    pub fn try_result(&self) -> Option<Result<RecordMetadata>> {
        self.completion.result.get().map(|r| self.metadata(r))
    }

    fn metadata(&self, r: &Result<i64>) -> Result<RecordMetadata> {
        match r {
            Ok(base) => Ok(RecordMetadata {
                topic: self.completion.topic.clone(),
                partition: self.completion.partition,
                offset: if *base < 0 { -1 } else { base + self.index },
            }),
            Err(e) => Err(e.clone()),
        }
    }

    async fn wait(self) -> Result<RecordMetadata> {
        loop {
            let notified = self.completion.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.completion.result.get() {
                return self.metadata(r);
            }
            notified.await;
        }
    }
}

impl IntoFuture for DeliveryFuture {
    type Output = Result<RecordMetadata>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// Shared between the handles and the sink task.
struct Inner {
    client: Client,
    config: ProducerConfig,
    accumulator: Accumulator,
    /// Wakes the sink: a batch is ready, a new batch started, a flush or close began.
    wake_sink: Notify,
    /// Wakes `flush` callers: the last pending batch completed.
    idle: Notify,
    /// Where the transaction stands (transactional producers only).
    txn: std::sync::Mutex<txn::TxnState>,
    /// The transaction coordinator's broker id, once found.
    txn_coordinator: std::sync::Mutex<Option<i32>>,
}

impl Inner {
    fn control(&self) -> std::sync::MutexGuard<'_, accumulator::Control> {
        self.accumulator.control()
    }

    /// Ends this producer: every waiting record fails with `err`, and so does
    /// every later call.
    fn fence(&self, err: Error) {
        tracing::error!(error = %err, "producer fenced");
        self.accumulator.fence(err);
        self.wake_sink.notify_one();
    }

    /// A record of the open transaction failed: the transaction can only abort.
    fn transaction_failed(&self, err: &Error) {
        if self.config.transactional_id.is_some() {
            let mut state = self.txn.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(&*state, txn::TxnState::InTransaction) {
                *state = txn::TxnState::Abortable(err.clone());
            }
        }
    }
}

/// Marks the producer closing when the last user handle goes.
struct HandleGuard(Arc<Inner>);

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.0.control().closing = true;
        self.0.wake_sink.notify_one();
    }
}

/// An async Kafka producer. Clone it to share it between tasks.
///
/// ```no_run
/// # async fn f() -> strom_client::Result<()> {
/// use strom_client::{Client, ClientConfig};
/// use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
/// let client = Client::connect(ClientConfig::new(["127.0.0.1:9092"])).await?;
/// let producer = Producer::new(client, ProducerConfig::default())?;
/// let delivery = producer.send(ProducerRecord::to("orders").key(b"k").value(b"v")).await?;
/// let written = delivery.await?;
/// println!("at {}-{}@{}", written.topic, written.partition, written.offset);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Producer {
    handle: Arc<HandleGuard>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("config", &self.inner().config)
            .finish()
    }
}

impl Producer {
    /// A producer on `client`. Starts its sink task on the current tokio runtime.
    pub fn new(client: Client, config: ProducerConfig) -> Result<Producer> {
        config.validate()?;
        let inner = Arc::new(Inner {
            accumulator: Accumulator::new(&config),
            client,
            config,
            wake_sink: Notify::new(),
            idle: Notify::new(),
            txn: std::sync::Mutex::new(txn::TxnState::Uninitialized),
            txn_coordinator: std::sync::Mutex::new(None),
        });
        tokio::spawn(sink::run(inner.clone()));
        Ok(Producer {
            handle: Arc::new(HandleGuard(inner)),
        })
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.handle.0
    }

    /// Adds a record to its partition's batch and returns the future of its
    /// delivery. Waits only when `buffer_memory` is full, or to load the topic's
    /// metadata the first time it is seen.
    ///
    /// Records sent from one task to one partition are written in `send` order.
    /// Cancel-safe: if dropped before it returns, the record was not added.
    pub async fn send(&self, record: ProducerRecord<'_>) -> Result<DeliveryFuture> {
        let inner = self.inner();
        if let Some(e) = inner.accumulator.fatal() {
            return Err(e);
        }
        if inner.config.transactional_id.is_some() {
            match &*self.txn_state() {
                txn::TxnState::InTransaction => {}
                txn::TxnState::Abortable(e) => {
                    return Err(self.txn_misuse(format!("the transaction failed ({e}); abort it")))
                }
                _ => {
                    return Err(self.txn_misuse(
                        "send outside a transaction: call begin_transaction first".into(),
                    ))
                }
            }
        }
        let size =
            crate::records::BatchBuilder::record_size(record.key, record.value, record.headers);
        if size > inner.config.buffer_memory {
            return Err(Error::Config(format!(
                "a record of {size} bytes cannot fit in buffer_memory {}",
                inner.config.buffer_memory
            )));
        }
        let timestamp = record.timestamp.unwrap_or_else(now_ms);
        // Memory taken for the record, held until it is in its batch: a send
        // that fails or is dropped before gives it back. None at first: the
        // open batch's spare usually covers the record.
        let mut permit = None;
        let credit = |held: &Option<SemaphorePermit>| {
            (size, held.as_ref().map_or(0, SemaphorePermit::num_permits))
        };
        let (future, wake) = loop {
            // The client's metadata cache, refreshed in the background, so
            // partitions added to the topic are used once the cache knows
            // them; the count the accumulator holds is used while the cache
            // is unchanged (one atomic load instead of a cache look-up).
            let epoch = inner.client.metadata_epoch();
            let appended = match (inner.accumulator).append_known(
                &record,
                epoch,
                timestamp,
                credit(&permit),
            ) {
                Some(appended) => appended?,
                None => {
                    let partitions = match inner.client.cached_topic(record.topic) {
                        Some(t) if !t.partitions.is_empty() => t.partitions.len(),
                        _ => {
                            // Not held while the metadata loads: sends to a
                            // topic that is missing or slow to answer would
                            // otherwise keep memory from sends to others.
                            drop(permit.take());
                            let topic = inner.client.topic_metadata(record.topic).await?;
                            topic.partitions.len()
                        }
                    };
                    let known = (partitions, epoch);
                    (inner.accumulator).append(&record, known, timestamp, credit(&permit))?
                }
            };
            match appended {
                Some(appended) => break appended,
                None => permit = Some(inner.accumulator.reserve(size).await?),
            }
        };
        if let Some(permit) = permit {
            permit.forget(); // Now the batch's.
        }
        if wake {
            inner.wake_sink.notify_one();
        }
        Ok(future)
    }

    /// Sends every record added so far, without waiting for the linger, and
    /// waits until all of them are acknowledged or failed.
    ///
    /// Records sent by other tasks while `flush` waits are waited for too.
    /// Cancel-safe: dropping the future ends the flush and nothing else.
    pub async fn flush(&self) -> Result<()> {
        let inner = self.inner();
        // Linger is off while any flush waits; the guard turns it back on even
        // if this future is dropped halfway (cancel-safe).
        struct Flushing<'a>(&'a Inner);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.control().flushes -= 1;
            }
        }
        inner.control().flushes += 1;
        let _flushing = Flushing(inner);
        inner.wake_sink.notify_one();
        loop {
            let idle = inner.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if inner.accumulator.pending_batches() == 0 {
                break;
            }
            idle.await;
        }
        Ok(())
    }

    fn txn_state(&self) -> std::sync::MutexGuard<'_, txn::TxnState> {
        self.inner().txn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn txn_misuse(&self, what: String) -> Error {
        Error::Transaction {
            transactional_id: self
                .inner()
                .config
                .transactional_id
                .clone()
                .unwrap_or_default(),
            what,
        }
    }

    fn identity(&self) -> Result<(i64, i16)> {
        if let Some(e) = self.inner().accumulator.fatal() {
            return Err(e);
        }
        self.inner()
            .control()
            .identity
            .ok_or_else(|| self.txn_misuse("init_transactions has not run".into()))
    }

    /// Registers the transactional id with its coordinator and gets this
    /// producer's id and epoch, fencing any older producer with the same
    /// transactional id and completing (aborting) its open transaction. Call
    /// once before the first transaction.
    pub async fn init_transactions(&self) -> Result<()> {
        if self.inner().config.transactional_id.is_none() {
            return Err(Error::Config(
                "init_transactions needs a transactional_id".into(),
            ));
        }
        let identity = txn::init_producer_id(self.inner(), None).await?;
        self.inner().control().identity = Some(identity);
        *self.txn_state() = txn::TxnState::Ready;
        self.inner().wake_sink.notify_one();
        Ok(())
    }

    /// Starts a transaction: records sent from now on commit or abort together.
    pub fn begin_transaction(&self) -> Result<()> {
        self.identity()?;
        let mut state = self.txn_state();
        match &*state {
            txn::TxnState::Ready => {
                *state = txn::TxnState::InTransaction;
                Ok(())
            }
            other => Err(self.txn_misuse(format!("begin_transaction in state {other:?}"))),
        }
    }

    /// Makes `offsets` (next offsets to read) the group's committed offsets when,
    /// and only when, the transaction commits. `group` is the consumer's
    /// [`GroupMetadata`]: the coordinator refuses it if the member's generation
    /// is over (KIP-447), so a zombie cannot commit.
    pub async fn send_offsets_to_transaction(
        &self,
        offsets: &[(crate::types::TopicPartition, i64)],
        group: &crate::group::GroupMetadata,
    ) -> Result<()> {
        let identity = self.identity()?;
        if !matches!(&*self.txn_state(), txn::TxnState::InTransaction) {
            return Err(self.txn_misuse("send_offsets_to_transaction outside a transaction".into()));
        }
        let result = txn::send_offsets(self.inner(), identity, offsets, group).await;
        if result.is_ok() {
            self.inner().control().txn_group_added = true;
        }
        self.note_txn_error(&result);
        result
    }

    /// Sends everything, then commits the transaction. If any record of it
    /// failed, nothing is committed: the error says so and the transaction must
    /// be aborted.
    pub async fn commit_transaction(&self) -> Result<()> {
        self.end_transaction(true).await
    }

    /// Aborts the transaction: its records and offsets never become visible to
    /// read-committed consumers.
    pub async fn abort_transaction(&self) -> Result<()> {
        self.end_transaction(false).await
    }

    async fn end_transaction(&self, commit: bool) -> Result<()> {
        let identity = self.identity()?;
        match (&*self.txn_state(), commit) {
            (txn::TxnState::InTransaction, _) | (txn::TxnState::Abortable(_), false) => {}
            (txn::TxnState::Abortable(e), true) => {
                return Err(self.txn_misuse(format!(
                    "cannot commit: the transaction failed ({e}); abort it"
                )))
            }
            (other, _) => return Err(self.txn_misuse(format!("no open transaction ({other:?})"))),
        }
        self.flush().await?;
        if let Some(e) = self.inner().accumulator.fatal() {
            return Err(e);
        }
        if commit {
            if let txn::TxnState::Abortable(e) = &*self.txn_state() {
                return Err(self.txn_misuse(format!(
                    "cannot commit: a record failed ({e}); abort the transaction"
                )));
            }
        }
        let empty = {
            let control = self.inner().control();
            control.txn_partitions.is_empty() && !control.txn_group_added
        };
        // A transaction that wrote nothing has nothing at the coordinator to
        // end (Kafka answers EndTxn for it with INVALID_TXN_STATE).
        let result = if empty {
            Ok(())
        } else {
            txn::end(self.inner(), identity, commit).await
        };
        self.note_txn_error(&result);
        if result.is_ok() {
            let mut control = self.inner().control();
            control.txn_partitions.clear();
            control.txn_group_added = false;
            drop(control);
            *self.txn_state() = txn::TxnState::Ready;
        }
        result
    }

    /// A fencing error ends the producer; any other failure of a transaction
    /// step leaves the transaction only abortable.
    fn note_txn_error<T>(&self, result: &Result<T>) {
        match result {
            Err(e @ Error::ProducerFenced { .. }) => self.inner().fence(e.clone()),
            Err(e) => {
                let mut state = self.txn_state();
                if matches!(&*state, txn::TxnState::InTransaction) {
                    *state = txn::TxnState::Abortable(e.clone());
                }
            }
            Ok(_) => {}
        }
    }

    /// Whether the open transaction holds nothing yet: no record sent or
    /// waiting, no offsets added. Committing it would change nothing.
    pub fn transaction_is_empty(&self) -> bool {
        let control = self.inner().control();
        control.txn_partitions.is_empty()
            && !control.txn_group_added
            // A batch is counted from its first record on.
            && self.inner().accumulator.pending_batches() == 0
    }

    /// Bytes of `buffer_memory` held (for metrics and tests): by the records
    /// waiting in the producer, and as spare room by open batches (a chunk
    /// of 64 KiB, or a 64th of `buffer_memory`, or so each, taken only
    /// while at least half the buffer is free).
    pub fn buffered_bytes(&self) -> usize {
        self.inner().config.buffer_memory - self.inner().accumulator.memory.available_permits()
    }

    /// Number of records sent but not yet acknowledged or failed. Counts
    /// the records of open batches one partition at a time: while other
    /// tasks send, a snapshot.
    pub fn in_flight_records(&self) -> usize {
        self.inner().accumulator.pending_records()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use kafka_protocol::messages::produce_response::{
        PartitionProduceResponse, TopicProduceResponse,
    };
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::{Decodable, StrBytes};

    use super::*;
    use crate::connection::response_frame;
    use crate::records::BatchDecoder;
    use crate::testing::scripted_broker;
    use crate::ClientConfig;

    /// What the scripted broker saw: the first value of each produced batch, in
    /// the order batches were accepted, and how many Produce requests came.
    #[derive(Default)]
    struct Log {
        accepted: Vec<Vec<u8>>,
        produce_requests: usize,
        /// Base offset to hand out next.
        next_offset: i64,
    }

    /// A one-partition broker that answers the first Produce with
    /// NOT_LEADER_OR_FOLLOWER and accepts everything after.
    async fn flaky_broker(log: Arc<Mutex<Log>>) -> String {
        scripted_broker("t", 1, &[(ApiKey::Produce, 11)], move |mut req| {
            let req_body = ProduceRequest::decode(&mut req.body, req.version).unwrap();
            let records = req_body.topic_data[0].partition_data[0]
                .records
                .clone()
                .unwrap();
            let mut log = log.lock().unwrap();
            log.produce_requests += 1;
            let (code, base) = if log.produce_requests == 1 {
                (6, -1) // NOT_LEADER_OR_FOLLOWER
            } else {
                let batch = BatchDecoder::new(records, true).next().unwrap().unwrap();
                let first = batch.records().next().unwrap().unwrap();
                log.accepted.push(first.value.unwrap().to_vec());
                let base = log.next_offset;
                log.next_offset += batch.record_count as i64;
                (0, base)
            };
            response_frame(
                req.correlation_id,
                req.version,
                ProduceResponse::default().with_responses(vec![TopicProduceResponse::default()
                    .with_name(TopicName(StrBytes::from_static_str("t")))
                    .with_partition_responses(vec![PartitionProduceResponse::default()
                        .with_index(0)
                        .with_error_code(code)
                        .with_base_offset(base)])]),
            )
        })
        .await
    }

    /// A batch that fails with a retriable error is sent again before any later
    /// batch of its partition, so records keep their order and offsets.
    #[tokio::test]
    async fn retried_batch_keeps_partition_order() {
        let log = Arc::new(Mutex::new(Log::default()));
        let addr = flaky_broker(log.clone()).await;
        let mut config = ClientConfig::new([addr]);
        config.retry_backoff = std::time::Duration::from_millis(10);
        let client = Client::connect(config).await.unwrap();
        let producer = Producer::new(
            client,
            ProducerConfig {
                batch_size: 200, // a few records per batch: many batches
                idempotence: false,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        let mut futures = vec![];
        for i in 0..50u32 {
            let v = format!("{i:04}");
            futures.push(
                producer
                    .send(ProducerRecord::to("t").value(v.as_bytes()))
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.unwrap();
        for (i, f) in futures.into_iter().enumerate() {
            assert_eq!(f.await.unwrap().offset, i as i64, "record {i}");
        }
        let log = log.lock().unwrap();
        assert!(
            log.produce_requests > log.accepted.len(),
            "the first request was not refused"
        );
        let mut sorted = log.accepted.clone();
        sorted.sort();
        assert_eq!(log.accepted, sorted, "batches accepted out of order");
        assert_eq!(
            log.accepted[0], b"0000",
            "the refused first batch was not retried first"
        );
    }

    /// An idempotent producer whose batch the broker refuses with
    /// UNKNOWN_PRODUCER_ID bumps its epoch and sends the sealed batch again
    /// stamped with the new producer fields (it keeps no builder to seal it
    /// anew): the broker, checking the CRC, takes every record once, in
    /// order, compressed or not.
    #[tokio::test]
    async fn a_batch_sent_again_under_a_new_epoch_is_restamped() {
        use crate::mock::{Action, MockCluster, ResponseError};
        use std::sync::atomic::{AtomicUsize, Ordering};
        for compression in [Compression::None, Compression::Lz4] {
            let cluster = MockCluster::new();
            cluster.create_topic("t", 1);
            let produces = Arc::new(AtomicUsize::new(0));
            let seen = produces.clone();
            cluster.set_hook(move |call| match call.api {
                ApiKey::Produce if seen.fetch_add(1, Ordering::SeqCst) == 0 => {
                    Action::Fail(ResponseError::UnknownProducerId)
                }
                _ => Action::Answer,
            });
            let client = Client::connect(cluster.client_config()).await.unwrap();
            let producer = Producer::new(
                client,
                ProducerConfig {
                    compression,
                    idempotence: true,
                    linger: std::time::Duration::from_millis(50),
                    ..ProducerConfig::default()
                },
            )
            .unwrap();
            let mut deliveries = Vec::new();
            for i in 0..10u32 {
                let value = format!("{i:02}");
                let record = ProducerRecord::to("t").partition(0).value(value.as_bytes());
                deliveries.push(producer.send(record).await.unwrap());
            }
            producer.flush().await.unwrap();
            for (i, d) in deliveries.into_iter().enumerate() {
                assert_eq!(d.await.unwrap().offset, i as i64, "{compression:?}");
            }
            let values: Vec<Vec<u8>> = (cluster.records("t", 0).into_iter())
                .map(|r| r.value.unwrap().to_vec())
                .collect();
            let want: Vec<Vec<u8>> = (0..10u32).map(|i| format!("{i:02}").into_bytes()).collect();
            assert_eq!(values, want, "{compression:?}");
            assert!(produces.load(Ordering::SeqCst) >= 2, "never refused");
            assert!(
                cluster.received(ApiKey::InitProducerId) >= 2,
                "no epoch bump"
            );
        }
    }

    /// A send that waits for its topic's metadata holds no buffer memory
    /// meanwhile (sends to other topics go on), a cancelled one holds none
    /// after, and neither does a send that fails (a partition the topic does
    /// not have).
    #[tokio::test(start_paused = true)]
    async fn a_send_that_adds_no_record_holds_no_memory() {
        use crate::mock::{Action, MockCluster};
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        cluster.set_hook(|call| match call.api {
            ApiKey::Metadata if call.topics.iter().any(|t| t == "slow") => Action::Hang,
            _ => Action::Answer,
        });
        let client = Client::connect(cluster.client_config()).await.unwrap();
        let value = [7u8; 100];
        let size = crate::records::BatchBuilder::record_size(None, Some(&value), &[]);
        // Room for one record at a time.
        let config = ProducerConfig {
            buffer_memory: size,
            batch_size: size,
            ..ProducerConfig::default()
        };
        let producer = Producer::new(client, config).unwrap();
        // "t"'s partition count is known before the slow send starts.
        let first = producer.send(ProducerRecord::to("t").value(&value));
        first.await.unwrap().await.unwrap();
        let slow = {
            let producer = producer.clone();
            tokio::spawn(async move {
                let record = ProducerRecord::to("slow").value(&value);
                producer.send(record).await.map(|_| ())
            })
        };
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        assert!(!slow.is_finished(), "the metadata never comes");
        assert_eq!(
            producer.buffered_bytes(),
            0,
            "while a send waits for metadata"
        );
        let other = producer.send(ProducerRecord::to("t").partition(0).value(&value));
        let other = tokio::time::timeout(std::time::Duration::from_secs(5), other)
            .await
            .expect("a send to another topic waited for the slow one's memory")
            .unwrap();
        other.await.unwrap();
        slow.abort();
        assert!(slow.await.unwrap_err().is_cancelled());
        assert_eq!(producer.buffered_bytes(), 0, "after a cancelled send");
        let bad = ProducerRecord::to("t").partition(2).value(b"v");
        let err = producer.send(bad).await.unwrap_err();
        assert!(
            matches!(err, Error::UnknownPartition { partitions: 2, .. }),
            "{err}"
        );
        assert_eq!(producer.buffered_bytes(), 0, "after a failed send");
        // The same for a topic whose count is not known yet (loaded first).
        cluster.create_topic("u", 2);
        let bad = ProducerRecord::to("u").partition(2).value(b"v");
        let err = producer.send(bad).await.unwrap_err();
        assert!(
            matches!(err, Error::UnknownPartition { partitions: 2, .. }),
            "{err}"
        );
        assert_eq!(producer.buffered_bytes(), 0, "after a failed first send");
        let good = ProducerRecord::to("t").partition(1).value(b"v");
        let delivery = producer.send(good).await.unwrap();
        assert!(producer.buffered_bytes() > 0);
        producer.flush().await.unwrap();
        delivery.await.unwrap();
        assert_eq!(producer.buffered_bytes(), 0, "after the delivery");
    }

    /// Batches ready for one broker go in requests of `max_request_size`,
    /// as many as `max_in_flight` allows (the rest in the last one), so the
    /// broker is not handed every partition's batch in one request that
    /// comes back all at once.
    #[tokio::test]
    async fn ready_batches_are_spread_over_requests() {
        use crate::mock::{Action, MockCluster};
        for (max_request_size, expected) in [(1 << 20, vec![6]), (1, vec![1, 1, 1, 1, 2])] {
            let cluster = MockCluster::new();
            cluster.create_topic("t", 6);
            let seen = Arc::new(Mutex::new(Vec::new()));
            let log = seen.clone();
            cluster.set_hook(move |call| {
                if call.api == ApiKey::Produce {
                    log.lock().unwrap().push(call.partitions.len());
                }
                Action::Answer
            });
            let client = Client::connect(cluster.client_config()).await.unwrap();
            let producer = Producer::new(
                client,
                ProducerConfig {
                    max_request_size,
                    linger: std::time::Duration::from_secs(60),
                    ..ProducerConfig::default()
                },
            )
            .unwrap();
            for p in 0..6 {
                producer
                    .send(ProducerRecord::to("t").partition(p).value(b"v"))
                    .await
                    .unwrap();
            }
            producer.flush().await.unwrap();
            let mut seen = seen.lock().unwrap().clone();
            seen.sort();
            assert_eq!(seen, expected, "max_request_size {max_request_size}");
            for p in 0..6 {
                assert_eq!(cluster.records("t", p).len(), 1);
            }
        }
    }
}
