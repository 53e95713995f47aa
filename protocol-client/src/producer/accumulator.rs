//! Per-partition batching: one open batch per partition that records are encoded
//! into, and a queue of closed batches waiting for the sink.
//!
//! Each partition's queue has its own mutex (franz-go's `recBuf`), so sends to
//! different partitions, and the sink draining one partition while records go
//! to another, do not wait for each other. The map of topics is read
//! without a lock (an [`ArcSwap`] snapshot: a shared read lock cost a send
//! two atomic writes to one cache line that every sending thread shares)
//! and copied when a topic is first seen or grows. A grown topic shares its
//! partitions' queues with the one it replaces, so a send that appends
//! through a snapshot just replaced loses nothing.
//! What is not per partition (the producer id, the transaction, a fatal
//! error, flush and close) is in [`Control`], behind a mutex `send` does not
//! take. Nothing is awaited while any of these locks is held.
//!
//! `buffer_memory` is a semaphore of bytes that a batch takes a chunk at a
//! time while at least half of it is free, so most records take their
//! bytes from their batch's spare, under the partition's lock, instead of
//! from the count every sender shares.
//!
//! Lock order: [`Control`], then a partition, then its topic's sticky
//! partitioner or the memory semaphore's own lock (to give a spare back).
//! `send` takes only the partition and what follows it, and, on its own,
//! the mutex under which the map of topics grows. `pending_records` locks
//! the partitions one at a time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;

use super::{Completion, DeliveryFuture, ProducerConfig, ProducerRecord};
use crate::connection::lock;
use crate::error::Error;
use crate::partitioner::{partition_for_key, Sticky};
use crate::records::{restamp, BatchBuilder, ProducerIdentity};

/// A batch on its way: open, ready, in flight, or waiting to be retried.
#[derive(Debug)]
pub(super) struct ProducerBatch {
    pub builder: BatchBuilder,
    pub completion: Arc<Completion>,
    /// Bytes of `buffer_memory` this batch holds.
    pub reserved: usize,
    /// Of `reserved`, bytes no record uses yet: the records that follow
    /// take them without touching the producer-wide count. Given back when
    /// the batch closes.
    pub spare: usize,
    pub records: usize,
    pub created: Instant,
    /// The encoded batch, kept so a retry resends exactly the same bytes.
    pub sealed: Option<Bytes>,
    /// Producer id, epoch and base sequence the batch was (or will be) sealed
    /// with; `None` until it is first taken for sending.
    pub identity: Option<ProducerIdentity>,
    /// Not to be sent again before this instant (retry backoff).
    pub retry_at: Option<Instant>,
    pub attempts: u32,
}

#[derive(Debug, Default)]
struct PartitionQueue {
    open: Option<ProducerBatch>,
    ready: VecDeque<ProducerBatch>,
    /// A request carrying this partition's front batch is out: nothing more is
    /// sent for it until that one is answered (keeps order across retries).
    in_flight: bool,
    /// Sequence of the next batch's first record, for the producer identity
    /// in `sequence_owner`; it restarts at 0 under a new id or epoch.
    next_sequence: i32,
    sequence_owner: Option<(i64, i16)>,
    /// Bytes of the last batch closed here: the next one starts with room
    /// for as much, so a busy partition's batches do not grow by copying.
    last_size: usize,
}

/// One topic's partitions. Replaced (sharing the queues) when it grows.
#[derive(Debug)]
struct TopicQueues {
    name: Arc<str>,
    partitions: Box<[Arc<Mutex<PartitionQueue>>]>,
    /// The client's metadata epoch when `partitions` was last sized.
    epoch: AtomicU64,
    sticky: Arc<Mutex<Sticky>>,
}

impl TopicQueues {
    /// Each partition with its index, for the sink's passes.
    fn each(&self) -> impl Iterator<Item = (i32, std::sync::MutexGuard<'_, PartitionQueue>)> {
        self.partitions
            .iter()
            .enumerate()
            .map(|(p, queue)| (p as i32, lock(queue)))
    }
}

/// A batch taken for sending.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub topic: Arc<str>,
    pub partition: i32,
    pub batch: ProducerBatch,
}

/// What is not per partition: taken by the sink and by the producer's
/// transaction and flush calls, never by `send`.
#[derive(Debug, Default)]
pub(super) struct Control {
    /// The last user handle is gone: send everything, then stop.
    pub closing: bool,
    /// Number of `flush` calls waiting: while non-zero, linger is skipped.
    pub flushes: usize,
    /// Producer id and epoch in force; `None` until assigned.
    pub identity: Option<(i64, i16)>,
    /// A sequence error asked for a new epoch (idempotent, non-transactional).
    pub bump_epoch: bool,
    /// Partitions added to the open transaction.
    pub txn_partitions: HashSet<(Arc<str>, i32)>,
    /// Consumer offsets were added to the current transaction.
    pub txn_group_added: bool,
    /// An error that ends this producer (fenced): everything fails with it.
    fatal: Option<Error>,
}

#[derive(Debug)]
pub(super) struct Accumulator {
    /// Bytes of `buffer_memory` not held by any batch. A batch takes them
    /// a chunk at a time (see [`ProducerBatch::spare`]): one update of this
    /// count, which every sending thread shares, per chunk instead of per
    /// record.
    pub memory: tokio::sync::Semaphore,
    /// Bytes a batch takes at a time when its spare runs out.
    spare_chunk: usize,
    buffer_memory: usize,
    /// Looked up on every send: FxHash, as topic names come from the
    /// application (no flooding to fear) and SipHash cost ~8% of a send.
    topics: ArcSwap<TopicMap>,
    /// Held while `topics` is copied and replaced.
    growing: Mutex<()>,
    batch_size: usize,
    linger: Duration,
    /// Stamp batches with a producer id and sequences.
    idempotent: bool,
    /// Partitions must be added to the transaction before records go to them.
    transactional: bool,
    /// Batches created and not yet completed. Counted up under the
    /// partition's lock, before the sink can see the batch.
    pending_batches: AtomicUsize,
    /// Records of the batches closed (or taken open to be failed) and not
    /// yet completed. Counted when a batch closes, not per record: one atomic that every sending thread
    /// wrote per record bounced between their caches.
    closed_records: AtomicUsize,
    /// `control.fatal` is set: lets `send` check without the mutex.
    fenced: AtomicBool,
    control: Mutex<Control>,
}

/// What [`Accumulator::take_sendable`] found: batches per broker, and
/// partitions that must first be added to the transaction.
#[derive(Debug, Default)]
pub(super) struct Sendable {
    pub by_broker: HashMap<i32, Vec<Outgoing>>,
    pub to_add: Vec<(Arc<str>, i32)>,
}

impl Accumulator {
    pub fn new(config: &ProducerConfig) -> Self {
        Accumulator {
            memory: tokio::sync::Semaphore::new(config.buffer_memory),
            spare_chunk: (config.buffer_memory / 64).min(SPARE_CHUNK),
            buffer_memory: config.buffer_memory,
            topics: ArcSwap::default(),
            growing: Mutex::default(),
            batch_size: config.batch_size,
            linger: config.linger,
            idempotent: config.idempotence,
            transactional: config.transactional_id.is_some(),
            pending_batches: AtomicUsize::new(0),
            closed_records: AtomicUsize::new(0),
            fenced: AtomicBool::new(false),
            control: Mutex::default(),
        }
    }

    /// Takes bytes of [`Accumulator::memory`] for a record of `size` that
    /// its batch's spare does not cover: a chunk (to be the batch's spare)
    /// while at least half the buffer is free, else `size`, waiting while
    /// the buffer is full. Open batches' spare bytes so never hold much
    /// more than half the buffer, however many there are. Dropping the
    /// permit gives the bytes back.
    pub async fn reserve(&self, size: usize) -> Result<tokio::sync::SemaphorePermit<'_>, Error> {
        let chunk = size.max(self.spare_chunk);
        if self.memory.available_permits() >= chunk.max(self.buffer_memory / 2) {
            if let Ok(permit) = self.memory.try_acquire_many(chunk as u32) {
                return Ok(permit);
            }
        }
        (self.memory)
            .acquire_many(size as u32)
            .await
            .map_err(|_| Error::Closed("producer"))
    }

    /// The producer-wide state.
    pub fn control(&self) -> std::sync::MutexGuard<'_, Control> {
        lock(&self.control)
    }

    /// The error that ended this producer, if one did.
    pub fn fatal(&self) -> Option<Error> {
        if !self.fenced.load(Ordering::Acquire) {
            return None;
        }
        self.control().fatal.clone()
    }

    /// Ends the producer with `err` (the first such error stays).
    pub fn fence(&self, err: Error) {
        self.control().fatal.get_or_insert(err);
        self.fenced.store(true, Ordering::Release);
    }

    /// Batches created and not yet completed.
    pub fn pending_batches(&self) -> usize {
        self.pending_batches.load(Ordering::Acquire)
    }

    /// Records sent and not yet completed: those of closed batches and
    /// those in open batches, which it locks one partition at a time (so
    /// under concurrent sends, a snapshot that may be off by the records
    /// of a batch closing meanwhile).
    pub fn pending_records(&self) -> usize {
        let open: usize = (self.topics().iter())
            .flat_map(|t| t.each())
            .map(|(_, queue)| queue.open.as_ref().map_or(0, |b| b.records))
            .sum();
        self.closed_records.load(Ordering::Acquire) + open
    }

    /// A topic's queues, registered or grown to `partitions` when the topic
    /// is new or has gained partitions (partition counts only grow in Kafka).
    fn topic(&self, topic: &str, partitions: usize, epoch: u64) -> Arc<TopicQueues> {
        if let Some(queues) = self.topics.load().get(topic) {
            if queues.partitions.len() >= partitions {
                queues.epoch.store(epoch, Ordering::Relaxed);
                return queues.clone();
            }
        }
        let _growing = lock(&self.growing);
        let topics = self.topics.load();
        match topics.get(topic) {
            Some(old) if old.partitions.len() >= partitions => {
                old.epoch.store(epoch, Ordering::Relaxed);
                old.clone()
            }
            old => {
                let (name, mut queues, sticky) = match old {
                    Some(old) => (
                        old.name.clone(),
                        old.partitions.to_vec(),
                        old.sticky.clone(),
                    ),
                    None => (
                        Arc::from(topic),
                        vec![],
                        Arc::new(Mutex::new(Sticky::new())),
                    ),
                };
                queues.resize_with(partitions, Arc::default);
                let grown = Arc::new(TopicQueues {
                    name: name.clone(),
                    partitions: queues.into(),
                    epoch: AtomicU64::new(epoch),
                    sticky,
                });
                let mut copy = TopicMap::clone(&topics);
                copy.insert(name, grown.clone());
                self.topics.store(Arc::new(copy));
                grown
            }
        }
    }

    /// Every topic's queues as they are now, for the sink's passes (which
    /// then lock one partition at a time).
    fn topics(&self) -> Vec<Arc<TopicQueues>> {
        self.topics.load().values().cloned().collect()
    }

    /// Encodes `record` into its partition's open batch if its topic's
    /// partition count is known under metadata `epoch` (one look-up in the
    /// snapshot of topics: the common case). `None` when it is not: the caller
    /// loads the count and calls [`Accumulator::append`].
    ///
    /// `credit` is bytes of [`Accumulator::memory`] the caller took for the
    /// record; `Ok(None)` when neither they nor the open batch's spare
    /// cover its `size`: nothing was added, and the caller takes memory and
    /// tries again.
    pub fn append_known(
        &self,
        record: &ProducerRecord<'_>,
        epoch: u64,
        timestamp: i64,
        (size, credit): (usize, usize),
    ) -> Option<Result<Option<Appended>, Error>> {
        let topics = self.topics.load();
        let topic = topics
            .get(record.topic)
            .filter(|t| t.epoch.load(Ordering::Relaxed) == epoch)?;
        Some(self.append_to(
            topic,
            topic.partitions.len(),
            record,
            timestamp,
            (size, credit),
        ))
    }

    /// Encodes `record` into its partition's open batch, registering or
    /// growing its topic to `partitions`, the count the client's metadata
    /// knows under `epoch`. `credit` as for [`Accumulator::append_known`].
    pub fn append(
        &self,
        record: &ProducerRecord<'_>,
        (partitions, epoch): (usize, u64),
        timestamp: i64,
        (size, credit): (usize, usize),
    ) -> Result<Option<Appended>, Error> {
        let topic = self.topic(record.topic, partitions, epoch);
        // Checked against the metadata's count: the queues keep the largest
        // count seen, which a re-created topic may not have.
        self.append_to(&topic, partitions, record, timestamp, (size, credit))
    }

    /// Returns the record's future and whether the sink should wake (a batch
    /// started or closed), or `None` when it needs memory (see
    /// [`Accumulator::append_known`]); an explicit partition from
    /// `partitions` on is an error.
    fn append_to(
        &self,
        topic: &TopicQueues,
        partitions: usize,
        record: &ProducerRecord<'_>,
        timestamp: i64,
        (size, credit): (usize, usize),
    ) -> Result<Option<Appended>, Error> {
        let batch_size = self.batch_size;
        let n = topic.partitions.len();
        let partition = match (record.partition, record.key) {
            (Some(p), _) if p < 0 || p as usize >= partitions.min(n) => {
                return Err(Error::UnknownPartition {
                    topic: record.topic.to_owned(),
                    partition: p,
                    partitions,
                })
            }
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, n),
            (None, None) => lock(&topic.sticky).partition(n),
        };
        let mut queue = lock(&topic.partitions[partition as usize]);
        let mut wake = false;
        let mut new_batch = false;
        let fits = |open: &ProducerBatch| {
            open.builder.is_empty() || open.builder.size() + size <= batch_size
        };
        let spare = queue
            .open
            .as_ref()
            .filter(|open| fits(open))
            .map_or(0, |open| open.spare);
        if spare + credit < size {
            return Ok(None);
        }
        if queue.open.as_ref().is_some_and(|open| !fits(open)) {
            self.close(&mut queue, &topic.sticky, partition, n);
            wake = true;
        }
        let last_size = queue.last_size;
        let open = queue.open.get_or_insert_with(|| {
            new_batch = true;
            ProducerBatch {
                builder: BatchBuilder::new(size.max(batch_size.min(last_size.max(64 * 1024)))),
                completion: Completion::new(topic.name.clone(), partition),
                reserved: 0,
                spare: 0,
                records: 0,
                created: Instant::now(),
                sealed: None,
                identity: None,
                retry_at: None,
                attempts: 0,
            }
        });
        let index = open.builder.len() as i64;
        open.builder
            .push(timestamp, record.key, record.value, record.headers);
        open.reserved += credit;
        open.spare = open.spare + credit - size;
        open.records += 1;
        let future = DeliveryFuture {
            completion: open.completion.clone(),
            index,
        };
        let full = open.builder.size() >= batch_size;
        // Counted while the partition is locked: the sink cannot have taken
        // (and completed) this batch before it is counted.
        if new_batch {
            self.pending_batches.fetch_add(1, Ordering::AcqRel);
            wake = true;
        }
        if full {
            self.close(&mut queue, &topic.sticky, partition, n);
            wake = true;
        }
        Ok(Some((future, wake)))
    }

    /// Closes open batches whose linger has passed (all of them when `force`).
    /// Returns the earliest instant at which something becomes due: an open
    /// batch's linger or a retry's backoff.
    ///
    /// A partition with a batch in flight or waiting could not send a batch
    /// closed now any sooner: its open batch goes on filling (up to
    /// `batch_size`) until the partition is free, as in Java's accumulator.
    /// Over a slow link that is what keeps throughput up: one big batch per
    /// round trip instead of one linger's worth.
    pub fn collect_ready(&self, now: Instant, force: bool) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut due = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for topic in self.topics() {
            let n = topic.partitions.len();
            for (p, mut queue) in topic.each() {
                let busy = queue.in_flight || !queue.ready.is_empty();
                if let Some(open) = &queue.open {
                    let deadline = open.created + self.linger;
                    if force || (deadline <= now && !busy) {
                        self.close(&mut queue, &topic.sticky, p, n);
                    } else if !busy {
                        due(deadline);
                    }
                }
                if !queue.in_flight {
                    if let Some(at) = queue.ready.front().and_then(|b| b.retry_at) {
                        if at > now {
                            due(at);
                        }
                    }
                }
            }
        }
        next
    }

    /// Takes the front ready batch of every partition that has none in flight,
    /// whose retry backoff has passed and for which `route` names a broker
    /// (returning `None` skips the partition for now).
    ///
    /// With idempotence, a batch gets its sequence here, when first sent under
    /// the current producer id and epoch: partitions have one batch in flight,
    /// so sequences follow queue order. A retried batch keeps its sequence (and
    /// bytes) unless the epoch changed, in which case it is sequenced anew.
    pub fn take_sendable(
        &self,
        control: &Control,
        now: Instant,
        mut route: impl FnMut(&str, i32) -> Option<i32>,
    ) -> Sendable {
        let mut out = Sendable::default();
        if self.idempotent && (control.identity.is_none() || control.bump_epoch) {
            return out;
        }
        for topic in self.topics() {
            for (p, mut queue) in topic.each() {
                if queue.in_flight {
                    continue;
                }
                let Some(front) = queue.ready.front() else {
                    continue;
                };
                if front.retry_at.is_some_and(|at| at > now) {
                    continue;
                }
                if self.transactional && !control.txn_partitions.contains(&(topic.name.clone(), p))
                {
                    out.to_add.push((topic.name.clone(), p));
                    continue;
                }
                let Some(broker) = route(&topic.name, p) else {
                    continue;
                };
                let Some(mut batch) = queue.ready.pop_front() else {
                    continue;
                };
                if let Some((pid, epoch)) = control.identity.filter(|_| self.idempotent) {
                    let current = batch
                        .identity
                        .is_some_and(|i| (i.producer_id, i.producer_epoch) == (pid, epoch));
                    if !current {
                        if queue.sequence_owner != Some((pid, epoch)) {
                            queue.sequence_owner = Some((pid, epoch));
                            queue.next_sequence = 0;
                        }
                        batch.identity = Some(ProducerIdentity {
                            producer_id: pid,
                            producer_epoch: epoch,
                            base_sequence: queue.next_sequence,
                            transactional: self.transactional,
                        });
                        if let Some(sealed) = batch.sealed.take() {
                            batch.sealed = batch.identity.map(|i| restamp(&sealed, i));
                        }
                        let next = queue.next_sequence as i64 + batch.records as i64;
                        queue.next_sequence = (next % (i32::MAX as i64 + 1)) as i32;
                    }
                }
                queue.in_flight = true;
                out.by_broker.entry(broker).or_default().push(Outgoing {
                    topic: topic.name.clone(),
                    partition: p,
                    batch,
                });
            }
        }
        out
    }

    /// Every batch not in flight (open or ready) of the partitions `which`
    /// selects, removed: for failing them.
    pub fn take_waiting(&self, mut which: impl FnMut(&str, i32) -> bool) -> Vec<Outgoing> {
        let mut out = vec![];
        for topic in self.topics() {
            for (p, mut queue) in topic.each() {
                if !which(&topic.name, p) {
                    continue;
                }
                let queue = &mut *queue;
                if let Some(open) = &queue.open {
                    self.closed_records
                        .fetch_add(open.records, Ordering::AcqRel);
                }
                let waiting = queue.open.take().into_iter().chain(queue.ready.drain(..));
                for batch in waiting {
                    out.push(Outgoing {
                        topic: topic.name.clone(),
                        partition: p,
                        batch,
                    });
                }
            }
        }
        out
    }

    /// Puts a batch back at the front of its partition for a retry.
    pub fn requeue(&self, out: Outgoing) {
        if let Some(queue) = self.queue(&out.topic, out.partition) {
            let mut queue = lock(&queue);
            queue.in_flight = false;
            queue.ready.push_front(out.batch);
        }
    }

    /// The partition's request was answered (the batch is done).
    pub fn unmute(&self, topic: &str, partition: i32) {
        if let Some(queue) = self.queue(topic, partition) {
            lock(&queue).in_flight = false;
        }
    }

    /// Ready batches (not in flight) older than `timeout`: removed and returned.
    pub fn take_expired(&self, now: Instant, timeout: Duration) -> Vec<Outgoing> {
        let mut out = vec![];
        for topic in self.topics() {
            for (p, mut queue) in topic.each() {
                if queue.in_flight {
                    continue;
                }
                while queue
                    .ready
                    .front()
                    .is_some_and(|b| now.duration_since(b.created) >= timeout)
                {
                    if let Some(batch) = queue.ready.pop_front() {
                        out.push(Outgoing {
                            topic: topic.name.clone(),
                            partition: p,
                            batch,
                        });
                    }
                }
            }
        }
        out
    }

    /// Accounts for a completed batch; true when nothing is pending any more.
    pub fn batch_done(&self, batch: &ProducerBatch) -> bool {
        self.closed_records
            .fetch_sub(batch.records, Ordering::AcqRel);
        self.pending_batches.fetch_sub(1, Ordering::AcqRel) == 1
    }

    fn queue(&self, topic: &str, partition: i32) -> Option<Arc<Mutex<PartitionQueue>>> {
        self.topics
            .load()
            .get(topic)
            .and_then(|t| t.partitions.get(partition as usize).cloned())
    }

    /// Moves a partition's open batch, if any, to its ready queue.
    fn close(
        &self,
        queue: &mut PartitionQueue,
        sticky: &Mutex<Sticky>,
        partition: i32,
        partitions: usize,
    ) {
        if let Some(mut batch) = queue.open.take() {
            self.closed_records
                .fetch_add(batch.records, Ordering::AcqRel);
            self.memory.add_permits(batch.spare);
            batch.reserved -= std::mem::take(&mut batch.spare);
            queue.last_size = batch.builder.size();
            queue.ready.push_back(batch);
            lock(sticky).batch_closed(partition, partitions);
        }
    }
}

/// A record's delivery future, and whether the sink should wake.
pub(super) type Appended = (DeliveryFuture, bool);

/// The most a batch takes of `buffer_memory` at a time beyond what its
/// record needs.
const SPARE_CHUNK: usize = 64 << 10;

/// The producer's topics by name.
type TopicMap = HashMap<Arc<str>, Arc<TopicQueues>, rustc_hash::FxBuildHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{BatchDecoder, Compression};

    /// Senders on four threads and a sink draining at the same time, as the
    /// per-partition locks allow: every record lands in exactly one batch, in
    /// each sender's order within its partition, and the pending counts never
    /// run below zero (a batch counted after the sink could take it would).
    #[test]
    fn concurrent_appends_and_drains_account_for_every_record() {
        const SENDERS: u32 = 4;
        const RECORDS: u32 = 20_000;
        let config = ProducerConfig {
            batch_size: 4096,
            linger: Duration::ZERO,
            ..ProducerConfig::default()
        };
        let acc = Arc::new(Accumulator::new(&config));
        let done = Arc::new(AtomicBool::new(false));
        let sink = {
            let (acc, done) = (acc.clone(), done.clone());
            std::thread::spawn(move || {
                let mut seen: HashMap<(i32, u32), Vec<u32>> = HashMap::new();
                let mut batches = 0usize;
                let started = std::time::Instant::now();
                loop {
                    let waited = started.elapsed();
                    assert!(
                        waited < Duration::from_secs(60),
                        "not drained in {waited:?}"
                    );
                    let finished = done.load(Ordering::Acquire);
                    acc.collect_ready(Instant::now(), finished);
                    let control = Control {
                        identity: Some((7, 0)),
                        ..Control::default()
                    };
                    let sendable = acc.take_sendable(&control, Instant::now(), |_, _| Some(1));
                    let outs = sendable
                        .by_broker
                        .into_values()
                        .flatten()
                        .collect::<Vec<_>>();
                    let empty = outs.is_empty();
                    for mut out in outs {
                        let pending = acc.pending_batches();
                        assert!((1..1 << 32).contains(&pending), "pending {pending}");
                        let builder =
                            std::mem::replace(&mut out.batch.builder, BatchBuilder::new(0));
                        let sealed = builder.seal(Compression::None, Default::default()).unwrap();
                        for batch in BatchDecoder::new(sealed, true) {
                            for record in batch.unwrap().records() {
                                let value = record.unwrap().value.unwrap();
                                let sender = u32::from_be_bytes(value[..4].try_into().unwrap());
                                let i = u32::from_be_bytes(value[4..].try_into().unwrap());
                                seen.entry((out.partition, sender)).or_default().push(i);
                            }
                        }
                        acc.unmute(&out.topic, out.partition);
                        acc.batch_done(&out.batch);
                        batches += 1;
                    }
                    if empty && finished && acc.pending_batches() == 0 {
                        return (seen, batches);
                    }
                }
            })
        };
        let senders: Vec<_> = (0..SENDERS)
            .map(|sender| {
                let acc = acc.clone();
                std::thread::spawn(move || {
                    for i in 0..RECORDS {
                        let mut value = sender.to_be_bytes().to_vec();
                        value.extend_from_slice(&i.to_be_bytes());
                        let record = ProducerRecord::to("t")
                            .partition((i % 3) as i32)
                            .value(&value);
                        let known = acc.append_known(&record, 1, 0, (64, 64));
                        known
                            .unwrap_or_else(|| acc.append(&record, (3, 1), 0, (64, 64)))
                            .unwrap()
                            .expect("the record's bytes are credited");
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        done.store(true, Ordering::Release);
        let (seen, batches) = sink.join().unwrap();
        assert!(batches > 3, "{batches} batches");
        assert_eq!(acc.pending_records(), 0);
        for sender in 0..SENDERS {
            for p in 0..3 {
                let got = &seen[&(p, sender)];
                let want: Vec<u32> = (0..RECORDS).filter(|i| i % 3 == p as u32).collect();
                assert_eq!(got, &want, "sender {sender} partition {p}");
            }
        }
    }

    /// Records are counted as pending from their send to their batch's
    /// completion, whether their batch was open, closed or taken open to
    /// be failed.
    #[test]
    fn pending_records_count_open_closed_and_failed_batches() {
        let config = ProducerConfig {
            batch_size: 4096,
            ..ProducerConfig::default()
        };
        let acc = Accumulator::new(&config);
        let send = |partition: i32, n: usize| {
            for _ in 0..n {
                let record = ProducerRecord::to("t").partition(partition).value(b"v");
                acc.append(&record, (2, 1), 0, (64, 64)).unwrap().unwrap();
            }
        };
        send(0, 3);
        send(1, 2);
        assert_eq!(acc.pending_records(), 5);
        acc.collect_ready(Instant::now(), true);
        send(1, 4);
        assert_eq!((acc.pending_records(), acc.pending_batches()), (9, 3));
        // Partition 1's closed and open batches are failed; 0's is sent.
        let failed = acc.take_waiting(|_, p| p == 1);
        assert_eq!(failed.iter().map(|o| o.batch.records).sum::<usize>(), 6);
        for out in &failed {
            acc.batch_done(&out.batch);
        }
        assert_eq!(acc.pending_records(), 3);
        let control = Control {
            identity: Some((7, 0)),
            ..Control::default()
        };
        let sendable = acc.take_sendable(&control, Instant::now(), |_, _| Some(1));
        for out in sendable.by_broker.into_values().flatten() {
            acc.batch_done(&out.batch);
        }
        assert_eq!((acc.pending_records(), acc.pending_batches()), (0, 0));
    }

    /// A batch takes `buffer_memory` a chunk at a time: records covered by
    /// its spare take none, one that is not is refused until the caller
    /// brings memory; closing the batch gives the spare back, so a batch
    /// then holds exactly its records' bytes until it completes.
    #[tokio::test]
    async fn batches_take_memory_a_chunk_at_a_time_and_give_the_spare_back() {
        let config = ProducerConfig {
            buffer_memory: 1 << 20,
            batch_size: 1 << 20,
            ..ProducerConfig::default()
        };
        let acc = Accumulator::new(&config);
        let chunk = (1 << 20) / 64;
        let free = || acc.memory.available_permits();
        let record = ProducerRecord::to("t").partition(0).value(b"v");
        let size = 100;
        let append = |credit| acc.append(&record, (1, 1), 0, (size, credit)).unwrap();
        assert!(
            append(0).is_none(),
            "no batch, no spare: the record needs memory"
        );
        assert_eq!(free(), 1 << 20, "a refused record takes nothing");
        let permit = acc.reserve(size).await.unwrap();
        assert_eq!(permit.num_permits(), chunk);
        assert!(append(permit.num_permits()).is_some());
        permit.forget();
        // The chunk's spare covers the next records, and only them.
        let covered = chunk / size - 1;
        for i in 0..covered {
            assert!(append(0).is_some(), "record {i} after the first");
        }
        assert_eq!(
            free(),
            (1 << 20) - chunk,
            "covered records take nothing more"
        );
        assert!(append(0).is_none(), "the spare is used up");
        let permit = acc.reserve(size).await.unwrap();
        assert!(append(permit.num_permits()).is_some());
        permit.forget();
        assert_eq!(free(), (1 << 20) - 2 * chunk);
        let records = covered + 2;
        acc.collect_ready(Instant::now(), true);
        assert_eq!(
            free(),
            (1 << 20) - records * size,
            "the spare came back at close"
        );
        let control = Control {
            identity: Some((7, 0)),
            ..Control::default()
        };
        let sendable = acc.take_sendable(&control, Instant::now(), |_, _| Some(1));
        let batches: Vec<_> = sendable.by_broker.into_values().flatten().collect();
        assert_eq!(batches.len(), 1);
        assert_eq!(
            (batches[0].batch.records, batches[0].batch.reserved),
            (records, records * size)
        );
        // With less than half the buffer free, a record takes its own size
        // only: open batches' spare never holds much more than half of it.
        let half = 1 << 19;
        let held = acc.memory.try_acquire_many((free() - half) as u32).unwrap();
        assert_eq!(acc.reserve(size).await.unwrap().num_permits(), chunk);
        held.forget();
        let _held = acc.memory.try_acquire_many(1).unwrap();
        assert_eq!(acc.reserve(size).await.unwrap().num_permits(), size);
    }
}
