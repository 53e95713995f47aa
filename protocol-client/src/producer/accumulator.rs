//! Per-partition batching: one open batch per partition that records are encoded
//! into, and a queue of closed batches waiting for the sink.
//!
//! All of it sits behind one mutex that `send` and the sink take briefly; nothing
//! is awaited while it is held.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;

use super::{Completion, DeliveryFuture, ProducerConfig, ProducerRecord};
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

#[derive(Debug)]
struct TopicQueues {
    name: Arc<str>,
    partitions: Vec<PartitionQueue>,
    /// The client's metadata epoch when `partitions` was last sized.
    epoch: u64,
    sticky: Sticky,
}

/// A batch taken for sending.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub topic: Arc<str>,
    pub partition: i32,
    pub batch: ProducerBatch,
}

#[derive(Debug)]
pub(super) struct Accumulator {
    /// Looked up on every send: FxHash, as topic names come from the
    /// application (no flooding to fear) and SipHash cost ~8% of a send.
    topics: HashMap<Arc<str>, TopicQueues, rustc_hash::FxBuildHasher>,
    batch_size: usize,
    linger: Duration,
    /// The last user handle is gone: send everything, then stop.
    pub closing: bool,
    /// Number of `flush` calls waiting: while non-zero, linger is skipped.
    pub flushes: usize,
    /// Batches created and not yet completed.
    pub pending_batches: usize,
    /// Records sent and not yet completed.
    pub pending_records: usize,
    /// Stamp batches with a producer id and sequences.
    idempotent: bool,
    /// Partitions must be added to the transaction before records go to them.
    transactional: bool,
    /// Producer id and epoch in force; `None` until assigned.
    pub identity: Option<(i64, i16)>,
    /// A sequence error asked for a new epoch (idempotent, non-transactional).
    pub bump_epoch: bool,
    /// Partitions added to the open transaction.
    pub txn_partitions: HashSet<(Arc<str>, i32)>,
    /// Consumer offsets were added to the current transaction.
    pub txn_group_added: bool,
    /// An error that ends this producer (fenced): everything fails with it.
    pub fatal: Option<Error>,
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
            topics: HashMap::default(),
            batch_size: config.batch_size,
            linger: config.linger,
            closing: false,
            flushes: 0,
            pending_batches: 0,
            pending_records: 0,
            idempotent: config.idempotence,
            transactional: config.transactional_id.is_some(),
            identity: None,
            bump_epoch: false,
            txn_partitions: HashSet::new(),
            txn_group_added: false,
            fatal: None,
        }
    }

    /// The partition count of `topic` known under metadata `epoch`, if the
    /// topic was sized under that epoch (the cache has not changed since).
    pub fn partition_count(&self, topic: &str, epoch: u64) -> Option<usize> {
        self.topics
            .get(topic)
            .filter(|t| t.epoch == epoch)
            .map(|t| t.partitions.len())
    }

    /// Registers a topic and returns its queues, growing them when the
    /// topic has gained partitions (partition counts only grow in Kafka).
    fn topic(&mut self, topic: &str, partitions: usize, epoch: u64) -> &mut TopicQueues {
        if !self.topics.contains_key(topic) {
            let name: Arc<str> = Arc::from(topic);
            let queues = TopicQueues {
                name: name.clone(),
                partitions: Vec::new(),
                epoch,
                sticky: Sticky::new(),
            };
            self.topics.insert(name, queues);
        }
        let Some(queues) = self.topics.get_mut(topic) else {
            unreachable!("inserted above")
        };
        if queues.partitions.len() < partitions {
            queues
                .partitions
                .resize_with(partitions, PartitionQueue::default);
        }
        queues.epoch = epoch;
        queues
    }

    /// Encodes `record` into its partition's open batch. Returns its future and
    /// whether the sink should wake (a batch started or closed).
    ///
    /// `partitions` is the topic's partition count as the client's metadata
    /// knows it under `epoch`; the caller has checked an explicit partition
    /// is below it.
    pub fn append(
        &mut self,
        record: &ProducerRecord<'_>,
        (partitions, epoch): (usize, u64),
        timestamp: i64,
        size: usize,
    ) -> (DeliveryFuture, bool) {
        let batch_size = self.batch_size;
        let topic = self.topic(record.topic, partitions, epoch);
        let n = topic.partitions.len();
        let partition = match (record.partition, record.key) {
            (Some(p), _) => p,
            (None, Some(key)) => partition_for_key(key, n),
            (None, None) => topic.sticky.partition(n),
        };
        let queue = &mut topic.partitions[partition as usize];
        let mut wake = false;
        let mut new_batch = false;
        if let Some(open) = &queue.open {
            if !open.builder.is_empty() && open.builder.size() + size > batch_size {
                close(queue, &mut topic.sticky, partition, n);
                wake = true;
            }
        }
        let open = queue.open.get_or_insert_with(|| {
            new_batch = true;
            ProducerBatch {
                builder: BatchBuilder::new(
                    size.max(batch_size.min(queue.last_size.max(64 * 1024))),
                ),
                completion: Completion::new(topic.name.clone(), partition),
                reserved: 0,
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
        open.reserved += size;
        open.records += 1;
        let future = DeliveryFuture {
            completion: open.completion.clone(),
            index,
        };
        if open.builder.size() >= batch_size {
            close(queue, &mut topic.sticky, partition, n);
            wake = true;
        }
        if new_batch {
            self.pending_batches += 1;
            wake = true;
        }
        self.pending_records += 1;
        (future, wake)
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
    pub fn collect_ready(&mut self, now: Instant, force: bool) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut due = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for topic in self.topics.values_mut() {
            let n = topic.partitions.len();
            for (p, queue) in topic.partitions.iter_mut().enumerate() {
                let busy = queue.in_flight || !queue.ready.is_empty();
                if let Some(open) = &queue.open {
                    let deadline = open.created + self.linger;
                    if force || (deadline <= now && !busy) {
                        close(queue, &mut topic.sticky, p as i32, n);
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
        &mut self,
        now: Instant,
        mut route: impl FnMut(&str, i32) -> Option<i32>,
    ) -> Sendable {
        let mut out = Sendable::default();
        if self.idempotent && (self.identity.is_none() || self.bump_epoch) {
            return out;
        }
        for topic in self.topics.values_mut() {
            for (p, queue) in topic.partitions.iter_mut().enumerate() {
                if queue.in_flight {
                    continue;
                }
                let Some(front) = queue.ready.front() else {
                    continue;
                };
                if front.retry_at.is_some_and(|at| at > now) {
                    continue;
                }
                if self.transactional
                    && !self
                        .txn_partitions
                        .contains(&(topic.name.clone(), p as i32))
                {
                    out.to_add.push((topic.name.clone(), p as i32));
                    continue;
                }
                let Some(broker) = route(&topic.name, p as i32) else {
                    continue;
                };
                let Some(mut batch) = queue.ready.pop_front() else {
                    continue;
                };
                if let Some((pid, epoch)) = self.identity.filter(|_| self.idempotent) {
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
                    partition: p as i32,
                    batch,
                });
            }
        }
        out
    }

    /// Every batch not in flight (open or ready) of the partitions `which`
    /// selects, removed: for failing them.
    pub fn take_waiting(&mut self, mut which: impl FnMut(&str, i32) -> bool) -> Vec<Outgoing> {
        let mut out = vec![];
        for topic in self.topics.values_mut() {
            for (p, queue) in topic.partitions.iter_mut().enumerate() {
                if !which(&topic.name, p as i32) {
                    continue;
                }
                let waiting = queue.open.take().into_iter().chain(queue.ready.drain(..));
                for batch in waiting {
                    out.push(Outgoing {
                        topic: topic.name.clone(),
                        partition: p as i32,
                        batch,
                    });
                }
            }
        }
        out
    }

    /// Puts a batch back at the front of its partition for a retry.
    pub fn requeue(&mut self, out: Outgoing) {
        if let Some(queue) = self.queue(&out.topic, out.partition) {
            queue.in_flight = false;
            queue.ready.push_front(out.batch);
        }
    }

    /// The partition's request was answered (the batch is done).
    pub fn unmute(&mut self, topic: &str, partition: i32) {
        if let Some(queue) = self.queue(topic, partition) {
            queue.in_flight = false;
        }
    }

    /// Ready batches (not in flight) older than `timeout`: removed and returned.
    pub fn take_expired(&mut self, now: Instant, timeout: Duration) -> Vec<Outgoing> {
        let mut out = vec![];
        for topic in self.topics.values_mut() {
            for (p, queue) in topic.partitions.iter_mut().enumerate() {
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
                            partition: p as i32,
                            batch,
                        });
                    }
                }
            }
        }
        out
    }

    /// Accounts for a completed batch; true when nothing is pending any more.
    pub fn batch_done(&mut self, batch: &ProducerBatch) -> bool {
        self.pending_batches -= 1;
        self.pending_records -= batch.records;
        self.pending_batches == 0
    }

    fn queue(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionQueue> {
        self.topics
            .get_mut(topic)
            .and_then(|t| t.partitions.get_mut(partition as usize))
    }
}

fn close(queue: &mut PartitionQueue, sticky: &mut Sticky, partition: i32, partitions: usize) {
    if let Some(batch) = queue.open.take() {
        queue.last_size = batch.builder.size();
        queue.ready.push_back(batch);
        sticky.batch_closed(partition, partitions);
    }
}
