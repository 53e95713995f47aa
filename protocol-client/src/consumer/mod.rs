//! The consumer, assign mode: read chosen partitions from chosen offsets.
//!
//! ```text
//!  fetcher task ──Fetch (one per broker)──► broker
//!       │  positions advance as responses arrive; stops at the byte budget
//!       ▼
//!  channel of raw partition data ──► Consumer::poll: decode, skip, hand out records
//! ```
//!
//! The fetcher keeps a Fetch in flight per broker ahead of the caller, as long as
//! the bytes fetched but not yet polled stay under `max_buffered_bytes`, and
//! holds at most one fetched slice per partition: a partition is fetched again
//! once the consumer starts decoding the last chunk of its slice. It only
//! reads batch headers (to know the next offset); [`Consumer::poll`] decodes the
//! records on the caller's task, so decoding and fetching run side by side.
//!
//! A seek, assign or reset bumps the partition's epoch; data fetched under an older
//! epoch is dropped when polled, so nothing from before a seek leaks after it.
//!
//! A read-committed consumer passes each partition's data through its
//! [`committed`] filter, which holds transactional records until their
//! transaction's marker is read.

mod committed;
mod decoding;
mod fetcher;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};

use crate::cluster::Client;
use crate::error::{Error, Result};
use crate::records::Header;
pub use crate::types::TopicPartition;
use committed::{CommittedFilter, Filtered, HeldBudget};
use decoding::Decoding;

/// Where to start reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// The first offset still in the log.
    Earliest,
    /// The end of the log: only records produced from now on.
    Latest,
    /// This offset.
    At(i64),
}

/// What to do when the fetch position is not in the log (Java's
/// `auto.offset.reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoOffsetReset {
    /// Jump to the first offset still in the log.
    Earliest,
    /// Jump to the end of the log.
    #[default]
    Latest,
    /// Report [`Error::OffsetOutOfRange`] and stop reading the partition until a seek.
    None,
}

/// Which records a consumer sees (Java's `isolation.level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsolationLevel {
    /// Everything written, including records of open and aborted transactions.
    #[default]
    ReadUncommitted,
    /// Only committed records, and control records never.
    ///
    /// Fetches ask the broker for read-committed data, so they stop at the last
    /// stable offset (the first offset of a transaction still open). On top of
    /// that the consumer decides each transactional batch itself from its
    /// producer's next transaction marker in the log: a batch is handed out
    /// once its COMMIT marker has been read and dropped at its ABORT marker.
    /// A broker that sends aborted-transaction lists (Apache Kafka) gets
    /// aborted batches it names dropped at once; a broker that sends empty
    /// lists (tansu 0.6) is filtered from the markers alone, with the same
    /// result.
    ///
    /// Until a batch's marker is read (possibly several fetches later: a fetch
    /// may end between data and marker, and on Kafka a committed transaction's
    /// marker can lie past the last stable offset when transactions
    /// interleave), it and every record after it in the partition are held
    /// back, so records still come out in offset order and
    /// [`Consumer::position`] stays at the first held record. Held records of
    /// all partitions are capped at half of
    /// [`ConsumerConfig::max_buffered_bytes`]; past that a partition drops
    /// them, reads ahead for the markers only, and reads the dropped range
    /// again (more reading, not more memory).
    ReadCommitted,
}

/// Consumer settings.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Reset policy on OFFSET_OUT_OF_RANGE. Default [`AutoOffsetReset::Latest`].
    pub auto_offset_reset: AutoOffsetReset,
    /// How long the broker may hold a Fetch waiting for `fetch_min_bytes`
    /// (Java's `fetch.max.wait.ms`). Default 500 ms.
    pub fetch_max_wait: Duration,
    /// Bytes a Fetch waits for (Java's `fetch.min.bytes`). Default 1.
    pub fetch_min_bytes: i32,
    /// Bytes one Fetch response may carry (Java's `fetch.max.bytes`). Default 50 MiB.
    pub fetch_max_bytes: i32,
    /// Bytes per partition in one Fetch (Java's `max.partition.fetch.bytes`).
    /// Default 1 MiB.
    pub max_partition_fetch_bytes: i32,
    /// Bytes fetched ahead of the caller before the fetcher pauses. Default 64 MiB.
    /// A read-committed consumer may also hold up to half as much again in
    /// records waiting for their transaction's marker (see
    /// [`IsolationLevel::ReadCommitted`]).
    pub max_buffered_bytes: usize,
    /// Records one [`Consumer::poll`] returns at most (Java's
    /// `max.poll.records`). Default 500. A fetched slice of small records
    /// decodes to many thousands; handing them out in smaller parts keeps what
    /// a caller queues close to its own bound.
    pub max_poll_records: usize,
    /// Bytes of records (see [`ConsumerRecord::size`]) one [`Consumer::poll`]
    /// returns at most: it stops after the record that reaches this, so it
    /// always returns at least one. Default unbounded (as Java's consumer:
    /// only `max_poll_records` counts). Records of 100 KB make 500 of them
    /// 50 MB; a caller that queues what it polls under a memory bound sets
    /// this to that bound.
    pub max_poll_bytes: usize,
    /// Verify each batch's CRC-32C. Default true.
    pub check_crcs: bool,
    /// Read uncommitted (default) or committed records only.
    pub isolation: IsolationLevel,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Latest,
            fetch_max_wait: Duration::from_millis(500),
            fetch_min_bytes: 1,
            fetch_max_bytes: 50 * 1024 * 1024,
            max_partition_fetch_bytes: 1024 * 1024,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_poll_records: 500,
            max_poll_bytes: usize::MAX,
            check_crcs: true,
            isolation: IsolationLevel::ReadUncommitted,
        }
    }
}

/// A record read from Kafka. Key, value and headers share the fetched buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    /// The key.
    pub key: Option<Bytes>,
    /// The value.
    pub value: Option<Bytes>,
    /// The headers, in order, duplicates kept.
    pub headers: Vec<Header>,
}

impl ConsumerRecord {
    /// What the record costs in memory, roughly: its key, value and headers
    /// plus the record itself (for small records the record is most of it).
    pub fn size(&self) -> usize {
        let len = |b: &Option<Bytes>| b.as_ref().map_or(0, Bytes::len);
        let headers: usize = (self.headers.iter())
            .map(|h| h.key.len() + len(&h.value))
            .sum();
        len(&self.key) + len(&self.value) + headers + std::mem::size_of::<ConsumerRecord>()
    }
}

/// Per-partition state shared by the consumer and its fetcher.
#[derive(Debug)]
struct PartitionState {
    /// Next offset to fetch; `None` until a reset resolves it.
    fetch_position: Option<i64>,
    /// How to resolve a missing fetch position.
    reset: Offset,
    /// Next offset to hand to the caller.
    position: Option<i64>,
    /// Bumped by every seek; fetched data of an older epoch is dropped.
    epoch: u64,
    paused: bool,
    /// A fetch for this partition is out.
    in_flight: bool,
    /// The epoch of a fetched slice the consumer has not yet taken up to its
    /// last decode chunk. While it is the partition's current epoch nothing
    /// more is fetched for it (as Java's consumer fetches no partition that
    /// still has buffered data), so what one partition holds — paused, or
    /// slower than the others — stays within one fetch.
    slice_out: Option<u64>,
    /// Stopped by an error until the next seek.
    failed: bool,
    high_watermark: i64,
    /// The last fetch's last stable offset, or its high watermark when the
    /// broker sent none; -1 before the first fetch.
    last_stable_offset: i64,
    max_bytes: i32,
    /// Read-committed state (held records, markers), carried across fetches;
    /// created at the first read-committed fetch, dropped by a seek or reset.
    committed: Option<CommittedFilter>,
}

#[derive(Debug, Default)]
struct Shared {
    partitions: HashMap<TopicPartition, PartitionState>,
    /// Bytes sent to the channel and not yet taken by `poll`.
    buffered: usize,
    closed: bool,
    next_epoch: u64,
}

/// What the fetcher sends: one partition's slice of a Fetch response, or an error.
#[derive(Debug)]
struct Fetched {
    tp: TopicPartition,
    epoch: u64,
    /// The offset the fetch asked for: records below it are skipped.
    fetch_offset: i64,
    /// Aborted transactions in this data, as (producer id, first offset)
    /// (read-committed fetches only).
    aborted: Vec<(i64, i64)>,
    result: Result<Bytes>,
}

/// The consumer's state shared with its fetcher (and, in a group, with the
/// membership task that adds and removes partitions).
pub(crate) struct Handle {
    shared: Mutex<Shared>,
    wake_fetcher: Notify,
    config: ConsumerConfig,
    /// Bytes held by the read-committed filters of all partitions.
    held: Arc<HeldBudget>,
}

impl Handle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts reading these partitions (a partition already assigned restarts
    /// at the given offset).
    pub(crate) fn add_partitions(
        &self,
        partitions: impl IntoIterator<Item = (TopicPartition, Offset)>,
    ) {
        let mut shared = self.lock();
        for (tp, offset) in partitions {
            let epoch = bump(&mut shared);
            shared
                .partitions
                .insert(tp, new_state(offset, epoch, &self.config));
        }
        drop(shared);
        self.wake_fetcher.notify_one();
    }

    /// Stops reading these partitions; their fetched data is dropped.
    pub(crate) fn remove_partitions(&self, partitions: &[TopicPartition]) {
        let mut shared = self.lock();
        for tp in partitions {
            shared.partitions.remove(tp);
        }
    }

    /// Next offset to hand out for each assigned partition that has one.
    pub(crate) fn positions(&self) -> Vec<(TopicPartition, i64)> {
        self.lock()
            .partitions
            .iter()
            .filter_map(|(tp, s)| s.position.map(|p| (tp.clone(), p)))
            .collect()
    }
}

/// A Kafka consumer in assign mode.
///
/// ```no_run
/// # async fn f() -> strom_client::Result<()> {
/// use strom_client::{Client, ClientConfig};
/// use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
/// let client = Client::connect(ClientConfig::new(["127.0.0.1:9092"])).await?;
/// let mut consumer = Consumer::new(client, ConsumerConfig::default());
/// consumer.assign([(TopicPartition::new("orders", 0), Offset::Earliest)])?;
/// let record = consumer.recv().await?;
/// println!("{}@{}", record.partition, record.offset);
/// # Ok(()) }
/// ```
pub struct Consumer {
    handle: Arc<Handle>,
    rx: mpsc::UnboundedReceiver<Fetched>,
    config: ConsumerConfig,
    /// Records of one partition being handed out.
    ready: Option<Ready>,
    /// Records of paused partitions, set aside part way (read uncommitted:
    /// still undecoded) until they are resumed.
    parked_ready: Vec<Ready>,
    /// The rest of a fetched slice after the part decoded into `ready` (a
    /// slice is decoded [`DECODE_CHUNK`] bytes at a time); its bytes still
    /// count as buffered.
    leftover: Option<Fetched>,
    /// Whether the bytes of `leftover` no longer count as buffered.
    leftover_released: bool,
    /// Fetched slices of paused partitions, not decoded (a record takes
    /// several times its fetched bytes once decoded) until they are resumed.
    /// Their bytes no longer count as buffered, so the other partitions go
    /// on fetching; a paused partition fetches nothing more and holds at most
    /// one slice, so they are bounded by one slice per partition.
    parked: VecDeque<Fetched>,
    /// An error found after records that were returned first.
    pending_error: Option<Error>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("assignment", &self.assignment())
            .finish()
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.handle.lock().closed = true;
        self.handle.wake_fetcher.notify_one();
    }
}

impl Consumer {
    /// A consumer with no partitions. Starts its fetcher on the current runtime.
    pub fn new(client: Client, config: ConsumerConfig) -> Consumer {
        let handle = Arc::new(Handle {
            shared: Mutex::new(Shared::default()),
            wake_fetcher: Notify::new(),
            config: config.clone(),
            held: Arc::new(HeldBudget::new(config.max_buffered_bytes / 2)),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(fetcher::run(client, config.clone(), handle.clone(), tx));
        Consumer {
            handle,
            rx,
            config,
            ready: None,
            parked_ready: Vec::new(),
            leftover: None,
            leftover_released: false,
            parked: VecDeque::new(),
            pending_error: None,
        }
    }

    pub(crate) fn handle(&self) -> &Arc<Handle> {
        &self.handle
    }

    /// Replaces the assignment: these partitions, each starting where its
    /// [`Offset`] says. Buffered records of dropped partitions are discarded.
    pub fn assign(
        &mut self,
        partitions: impl IntoIterator<Item = (TopicPartition, Offset)>,
    ) -> Result<()> {
        self.handle.lock().partitions.clear();
        self.handle.add_partitions(partitions);
        self.ready = None;
        self.pending_error = None;
        Ok(())
    }

    /// The assigned partitions, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self.handle.lock().partitions.keys().cloned().collect();
        v.sort();
        v
    }

    /// Moves the next read of `tp` to `offset`. Records already buffered for it
    /// are discarded.
    pub fn seek(&mut self, tp: &TopicPartition, offset: Offset) -> Result<()> {
        let mut shared = self.handle.lock();
        let epoch = bump(&mut shared);
        let Some(state) = shared.partitions.get_mut(tp) else {
            return Err(not_assigned(tp));
        };
        let paused = state.paused;
        *state = new_state(offset, epoch, &self.config);
        state.paused = paused;
        drop(shared);
        self.handle.wake_fetcher.notify_one();
        Ok(())
    }

    /// Stops fetching `tp` until [`Consumer::resume`]. No more of its records
    /// are returned (read committed: except those already decoded, at most
    /// one decode chunk); data already
    /// fetched (at most one slice of a Fetch response) waits, undecoded and
    /// outside the read-ahead budget (so the
    /// other partitions go on fetching), until the partition is resumed.
    pub fn pause(&mut self, tp: &TopicPartition) -> Result<()> {
        self.set_paused(tp, true)
    }

    /// Fetches `tp` again after [`Consumer::pause`].
    pub fn resume(&mut self, tp: &TopicPartition) -> Result<()> {
        self.set_paused(tp, false)
    }

    fn set_paused(&mut self, tp: &TopicPartition, paused: bool) -> Result<()> {
        let mut shared = self.handle.lock();
        let state = shared
            .partitions
            .get_mut(tp)
            .ok_or_else(|| not_assigned(tp))?;
        state.paused = paused;
        drop(shared);
        self.handle.wake_fetcher.notify_one();
        Ok(())
    }

    /// The offset of the next record `poll` will return for `tp` (`None` while
    /// a reset to earliest or latest is still being resolved).
    pub fn position(&self, tp: &TopicPartition) -> Option<i64> {
        self.handle
            .lock()
            .partitions
            .get(tp)
            .and_then(|s| s.position)
    }

    /// Fetched bytes (as the broker sent them) not yet taken by `poll`: what
    /// [`ConsumerConfig::max_buffered_bytes`] bounds, plus the slices set
    /// aside for paused partitions (at most one per partition), which no
    /// longer count against that bound, plus the decompressed records at
    /// hand (about [`CHUNK`](crate::compression::CHUNK) bytes for the
    /// partition being handed out and for each paused part way).
    pub fn buffered_bytes(&self) -> usize {
        let len = |f: &Fetched| f.result.as_ref().map_or(0, Bytes::len);
        let leftover = self.leftover.as_ref().filter(|_| self.leftover_released);
        let set_aside = self.parked.iter().map(len).sum::<usize>() + leftover.map_or(0, len);
        let decompressed = (self.ready.iter().chain(&self.parked_ready))
            .map(|r| r.records.decompressed_held())
            .sum::<usize>();
        self.handle.lock().buffered + set_aside + decompressed
    }

    /// The high watermark of `tp` from the last fetch (-1 before the first).
    pub fn high_watermark(&self, tp: &TopicPartition) -> i64 {
        self.handle
            .lock()
            .partitions
            .get(tp)
            .map_or(-1, |s| s.high_watermark)
    }

    /// The last stable offset of `tp` from the last fetch: the first offset of
    /// a transaction still open, which a read-committed consumer does not read
    /// past. When the broker sent none, the high watermark; -1 before the
    /// first fetch.
    pub fn last_stable_offset(&self, tp: &TopicPartition) -> i64 {
        self.handle
            .lock()
            .partitions
            .get(tp)
            .map_or(-1, |s| s.last_stable_offset)
    }

    /// The next record. Cancel-safe: a record is only removed when returned.
    pub async fn recv(&mut self) -> Result<ConsumerRecord> {
        loop {
            if let Some(r) = self.hand_out(1).pop() {
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// The next records: up to [`ConsumerConfig::max_poll_records`] (and
    /// [`ConsumerConfig::max_poll_bytes`]) of one partition, in offset order
    /// (at least one record). Errors name the
    /// topic, partition and offset; a corrupt batch is not skipped — the
    /// partition stays at its offset and the error repeats until a seek moves past it.
    ///
    /// Cancel-safe.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>> {
        loop {
            let records = self.hand_out(self.config.max_poll_records.max(1));
            if !records.is_empty() {
                return Ok(records);
            }
            self.fill().await?;
        }
    }

    /// Hands out up to `n` ready records and moves the partition's position
    /// past them, so a commit of the position covers exactly what the caller got.
    /// Records of a partition sought, revoked or unassigned since they were
    /// decoded are dropped instead; those of a paused partition are set aside.
    fn hand_out(&mut self, n: usize) -> Vec<ConsumerRecord> {
        let Some(ready) = &mut self.ready else {
            return Vec::new();
        };
        let mut shared = self.handle.lock();
        let Shared {
            partitions,
            next_epoch,
            ..
        } = &mut *shared;
        let state = partitions
            .get_mut(&ready.tp)
            .filter(|s| s.epoch == ready.epoch);
        let Some(state) = state else {
            drop(shared);
            self.ready = None;
            return Vec::new();
        };
        if state.paused {
            drop(shared);
            self.parked_ready.extend(self.ready.take());
            return Vec::new();
        }
        let mut out = Vec::new();
        ready.records.take(n, self.config.max_poll_bytes, &mut out);
        let after_last = out.last().map(|r| r.offset + 1);
        if !ready.records.is_empty() {
            state.position = after_last;
            return out;
        }
        match ready.records.take_error() {
            None => state.position = ready.records.next().or(after_last),
            Some((from, e)) => {
                // Read again from the batch or record that does not decode
                // (nothing after it is skipped); the error comes next. A
                // read-committed filter has read past it: a new one reads
                // again from it, as after a seek.
                *next_epoch += 1;
                state.epoch = *next_epoch;
                state.fetch_position = Some(from);
                state.position = Some(from);
                state.committed = None;
                self.pending_error = Some(e);
                self.handle.wake_fetcher.notify_one();
            }
        }
        drop(shared);
        self.ready = None;
        out
    }

    /// Takes `len` fetched bytes out of the read-ahead budget, waking the
    /// fetcher when that makes room.
    fn release(&self, len: usize) {
        let mut shared = self.handle.lock();
        shared.buffered -= len;
        if shared.buffered + len >= self.config.max_buffered_bytes
            && shared.buffered < self.config.max_buffered_bytes
        {
            self.handle.wake_fetcher.notify_one();
        }
    }

    /// Notes that the last decode chunk of a fetched slice has been taken:
    /// its partition may be fetched again.
    fn taken_up(&self, fetched: &Fetched) {
        let mut shared = self.handle.lock();
        let state = shared.partitions.get_mut(&fetched.tp);
        if let Some(state) = state.filter(|s| s.slice_out == Some(fetched.epoch)) {
            state.slice_out = None;
            drop(shared);
            self.handle.wake_fetcher.notify_one();
        }
    }

    /// Whether `fetched` is current data of a paused partition.
    fn is_paused(&self, fetched: &Fetched) -> bool {
        self.paused(&fetched.tp, fetched.epoch)
    }

    /// Whether `tp` is paused and still at `epoch`.
    fn paused(&self, tp: &TopicPartition, epoch: u64) -> bool {
        self.handle
            .lock()
            .partitions
            .get(tp)
            .is_some_and(|s| s.paused && s.epoch == epoch)
    }

    /// The first parked slice whose partition was resumed (or sought,
    /// revoked or unassigned since: it is dropped as such data is).
    fn unparked(&mut self) -> Option<Fetched> {
        let at = self.parked.iter().position(|f| !self.is_paused(f))?;
        self.parked.remove(at)
    }

    /// Waits for the next fetched data with records in it and makes it
    /// `ready` (a partition's records set aside for a pause first, once it
    /// is resumed); returns a pending or fetch error instead, if there is one.
    async fn fill(&mut self) -> Result<()> {
        if let Some(e) = self.pending_error.take() {
            return Err(e);
        }
        let committed = self.config.isolation == IsolationLevel::ReadCommitted;
        // Records set aside for a pause come before anything else of their
        // partition (a stale one is dropped by `hand_out`).
        if let Some(at) = (self.parked_ready.iter()).position(|r| !self.paused(&r.tp, r.epoch)) {
            self.ready = Some(self.parked_ready.swap_remove(at));
            return Ok(());
        }
        loop {
            let leftover = self.leftover.take();
            let is_leftover = leftover.is_some();
            // Whether its bytes no longer count as buffered (parked data).
            let (mut fetched, released) = match leftover {
                Some(rest) => (rest, self.leftover_released),
                None => match self.unparked() {
                    Some(parked) => (parked, true),
                    None => match self.rx.recv().await {
                        Some(fetched) => (fetched, false),
                        None => return Err(Error::Closed("consumer fetcher")),
                    },
                },
            };
            if self.is_paused(&fetched) {
                if !released {
                    self.release(fetched.result.as_ref().map_or(0, Bytes::len));
                }
                // A leftover is the earliest data of its partition: it goes
                // before whatever of it was parked meanwhile.
                if is_leftover {
                    self.parked.push_front(fetched);
                } else {
                    self.parked.push_back(fetched);
                }
                continue;
            }
            let rest = match &mut fetched.result {
                Ok(data) => split_after(data, DECODE_CHUNK),
                Err(_) => None,
            };
            match rest {
                None => self.taken_up(&fetched),
                Some(rest) => {
                    self.leftover = Some(Fetched {
                        tp: fetched.tp.clone(),
                        epoch: fetched.epoch,
                        fetch_offset: fetched.fetch_offset,
                        aborted: Vec::new(),
                        result: Ok(rest),
                    });
                    self.leftover_released = released;
                }
            }
            if !released {
                self.release(fetched.result.as_ref().map_or(0, Bytes::len));
            }
            let current = {
                let mut shared = self.handle.lock();
                shared
                    .partitions
                    .get_mut(&fetched.tp)
                    .filter(|s| s.epoch == fetched.epoch)
                    .map(|s| {
                        // Read committed: the filter is taken out while it
                        // reads (outside the lock) and put back after.
                        let filter = (committed && fetched.result.is_ok()).then(|| {
                            s.committed
                                .take()
                                .unwrap_or_else(|| CommittedFilter::new(self.handle.held.clone()))
                        });
                        (s.position, filter)
                    })
            };
            let Some((position, mut filter)) = current else {
                continue; // fetched before a seek or unassign
            };
            let data = fetched.result?;
            let start = position
                .unwrap_or(fetched.fetch_offset)
                .max(fetched.fetch_offset);
            let (records, error, rewind) = match &mut filter {
                Some(filter) => {
                    let Filtered {
                        visible,
                        next,
                        error,
                        rewind,
                    } = filter.push(
                        &fetched.tp,
                        data,
                        start,
                        self.config.check_crcs,
                        &fetched.aborted,
                    );
                    let mut decoding = Decoding::decided(&fetched.tp, visible, next);
                    match decoding.take_error() {
                        // The first record to hand out does not decode:
                        // read again from it, under a new filter as after a
                        // seek (this one has read past it).
                        Some(bad) => {
                            *filter = CommittedFilter::new(self.handle.held.clone());
                            (decoding, Some(bad), None)
                        }
                        None => (decoding, error, rewind),
                    }
                }
                None => {
                    let mut decoding =
                        Decoding::new(&fetched.tp, data, start, self.config.check_crcs);
                    // Only an error before the first record shows yet.
                    let error = decoding.take_error();
                    (decoding, error, None)
                }
            };
            let next = records.next();
            let mut epoch = fetched.epoch;
            // Fetch again from a bad batch (nothing after it is skipped), or
            // from the first record a read-committed scan dropped. The new
            // epoch drops data already fetched beyond it; the good records
            // before it stay valid under that epoch, and so does the
            // read-committed filter, which has read exactly up to it.
            let refetch = error.as_ref().map(|&(bad, _)| bad).or(rewind);
            if filter.is_some() || refetch.is_some() {
                let mut shared = self.handle.lock();
                let new_epoch = refetch.map(|_| bump(&mut shared));
                if let Some(state) = shared
                    .partitions
                    .get_mut(&fetched.tp)
                    .filter(|s| s.epoch == fetched.epoch)
                {
                    state.committed = filter;
                    if let (Some(from), Some(new_epoch)) = (refetch, new_epoch) {
                        state.fetch_position = Some(from);
                        state.epoch = new_epoch;
                        if records.is_empty() {
                            state.position = next.or(Some(from));
                        }
                        epoch = new_epoch;
                    }
                }
                drop(shared);
                if refetch.is_some() {
                    self.handle.wake_fetcher.notify_one();
                }
            }
            if let Some((_, e)) = error {
                if records.is_empty() {
                    return Err(e);
                }
                self.pending_error = Some(e);
            }
            if !records.is_empty() {
                self.ready = Some(Ready {
                    tp: fetched.tp,
                    epoch,
                    records: Box::new(records),
                });
                return Ok(());
            }
            // Nothing to hand out (transaction markers, aborted or held
            // records): the position still moves past what was read, so a
            // reader waiting for the end of the log sees it reached.
            if let Some(next) = next {
                let mut shared = self.handle.lock();
                if let Some(state) = shared
                    .partitions
                    .get_mut(&fetched.tp)
                    .filter(|s| s.epoch == epoch)
                {
                    if state.position.is_none_or(|p| p < next) {
                        state.position = Some(next);
                    }
                }
            }
        }
    }
}

/// Fetched bytes taken up at a time: a chunk's bytes leave the read-ahead
/// budget when it is taken up. Read committed filters a chunk's batches at
/// once (it may hold some until their markers come); both paths decode
/// records only as they are handed out.
const DECODE_CHUNK: usize = 32 * 1024;

/// Cuts `data` after the first whole batches that reach `limit` bytes (at
/// least one batch, however big) and returns the rest, if any. Batches are
/// only measured here; anything odd is left in `data` for the decoder to
/// report.
fn split_after(data: &mut Bytes, limit: usize) -> Option<Bytes> {
    let mut end = 0usize;
    while end < limit {
        let header = data.get(end..end + 12)?;
        let batch_len = i32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        let next = usize::try_from(batch_len)
            .ok()
            .and_then(|n| (end + 12).checked_add(n))
            .filter(|&next| next <= data.len())?;
        end = next;
    }
    (end < data.len()).then(|| data.split_off(end))
}

/// Records of one partition waiting to be handed out.
#[derive(Debug)]
struct Ready {
    tp: TopicPartition,
    /// The partition's epoch when they were fetched.
    epoch: u64,
    records: Box<Decoding>,
}

fn bump(shared: &mut Shared) -> u64 {
    shared.next_epoch += 1;
    shared.next_epoch
}

fn new_state(offset: Offset, epoch: u64, config: &ConsumerConfig) -> PartitionState {
    let at = match offset {
        Offset::At(o) => Some(o),
        _ => None,
    };
    PartitionState {
        fetch_position: at,
        reset: offset,
        position: at,
        epoch,
        paused: false,
        in_flight: false,
        slice_out: None,
        failed: false,
        high_watermark: -1,
        last_stable_offset: -1,
        max_bytes: config.max_partition_fetch_bytes,
        committed: None,
    }
}

fn not_assigned(tp: &TopicPartition) -> Error {
    Error::Config(format!("partition {tp} is not assigned to this consumer"))
}

/// Decodes one partition's fetched bytes at once, read uncommitted: the
/// records at or after `start`, the offset after the last batch read (or, if
/// a batch or record was bad, its offset) and the error. Control batches are
/// never handed out.
#[cfg(any(test, feature = "fuzzing"))]
#[allow(clippy::type_complexity)]
fn decode(
    tp: &TopicPartition,
    data: Bytes,
    start: i64,
    check_crc: bool,
) -> (Vec<ConsumerRecord>, Option<i64>, Option<(i64, Error)>) {
    let mut decoding = Decoding::new(tp, data, start, check_crc);
    let mut out = Vec::new();
    decoding.take(usize::MAX, usize::MAX, &mut out);
    (out, decoding.next(), decoding.take_error())
}

/// One partition's fetched bytes through both read paths, as a fuzz target
/// drives them (see `crate::fuzzing`), panicking where they break what the
/// consumer relies on: records ascend from `start`; read committed hands out
/// nothing read uncommitted does not; a filter gives back every byte it held.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn read_fetched(
    data: Bytes,
    start: i64,
    check_crc: bool,
    aborted: &[(i64, i64)],
    held_cap: usize,
) {
    let tp = TopicPartition::new("fuzz", 0);
    let ascending = |records: &[ConsumerRecord], path: &str| {
        let mut last = start - 1;
        for r in records {
            assert!(r.offset > last, "{path}: offset {} after {last}", r.offset);
            last = r.offset;
        }
    };
    let (plain, next, error) = decode(&tp, data.clone(), start, check_crc);
    ascending(&plain, "read uncommitted");
    if let (Some(next), Some(last)) = (next, plain.last()) {
        assert!(
            next > last.offset,
            "position {next} not after {}",
            last.offset
        );
    }
    let stop = error.as_ref().map_or(i64::MAX, |(offset, _)| *offset);
    let budget = Arc::new(HeldBudget::new(held_cap));
    let mut filter = CommittedFilter::new(budget.clone());
    let out = filter.push_all(&tp, data, start, check_crc, aborted);
    ascending(&out.records, "read committed");
    let seen: std::collections::HashMap<i64, &ConsumerRecord> =
        plain.iter().map(|r| (r.offset, r)).collect();
    for r in out.records.iter().filter(|r| r.offset < stop) {
        let Some(p) = seen.get(&r.offset) else {
            panic!(
                "read committed handed out offset {} that read uncommitted did not",
                r.offset
            );
        };
        assert_eq!(
            (&p.key, &p.value),
            (&r.key, &r.value),
            "offset {}",
            r.offset
        );
    }
    drop(filter);
    assert_eq!(budget.used(), 0, "a dropped filter kept held bytes");
}

/// Names the partition and offset in a record error.
fn locate(tp: &TopicPartition, e: Error, offset: i64) -> Error {
    match e {
        Error::CorruptRecord {
            what, last_offset, ..
        } => Error::CorruptRecord {
            topic: Some(tp.topic.to_string()),
            partition: Some(tp.partition),
            offset,
            last_offset,
            what,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{BatchBuilder, Compression, ProducerIdentity};
    use bytes::BytesMut;

    fn batch(base: i64, n: usize) -> Bytes {
        let mut b = BatchBuilder::new(64);
        for i in 0..n {
            b.push(i as i64, Some(format!("k{i}").as_bytes()), Some(b"v"), &[]);
        }
        let mut bytes = BytesMut::from(
            &b.seal(Compression::Lz4, ProducerIdentity::default())
                .unwrap()[..],
        );
        bytes[..8].copy_from_slice(&base.to_be_bytes());
        bytes.freeze()
    }

    pub(in crate::consumer) fn concat(parts: &[Bytes]) -> Bytes {
        let mut out = BytesMut::new();
        for p in parts {
            out.extend_from_slice(p);
        }
        out.freeze()
    }

    /// A batch at `base` of producer `pid`; `control` makes it a transaction
    /// marker (0 = abort, 1 = commit) instead of data.
    pub(in crate::consumer) fn txn_batch(
        base: i64,
        pid: i64,
        values: &[&str],
        control: Option<i16>,
    ) -> Bytes {
        let mut b = BatchBuilder::new(64);
        match control {
            Some(kind) => {
                let mut key = 0i16.to_be_bytes().to_vec();
                key.extend_from_slice(&kind.to_be_bytes());
                b.push(0, Some(&key), Some(b"marker"), &[]);
            }
            None => {
                for v in values {
                    b.push(0, None, Some(v.as_bytes()), &[]);
                }
            }
        }
        let identity = ProducerIdentity {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence: 0,
            transactional: true,
        };
        let mut bytes = BytesMut::from(&b.seal(Compression::None, identity).unwrap()[..]);
        bytes[..8].copy_from_slice(&base.to_be_bytes());
        if control.is_some() {
            bytes[22] |= 0x20; // control flag, low byte of the attributes
            let crc = crc32c::crc32c(&bytes[21..]);
            bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        }
        bytes.freeze()
    }

    pub(in crate::consumer) fn values(records: &[ConsumerRecord]) -> Vec<String> {
        records
            .iter()
            .map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap())
            .collect()
    }

    /// Read committed with the broker's aborted list: the aborted
    /// transaction's records are dropped, the committed one's kept, markers
    /// never handed out, and the position moves past all of it.
    #[test]
    fn aborted_transactions_are_filtered_and_markers_skipped() {
        let tp = TopicPartition::new("t", 0);
        // pid 7 aborts offsets 0-1 (marker at 2); pid 8 commits 3-4 (marker at 5);
        // pid 7 writes again at 6 in a later, committed transaction (marker at 7).
        let data = concat(&[
            txn_batch(0, 7, &["a0", "a1"], None),
            txn_batch(2, 7, &[], Some(0)),
            txn_batch(3, 8, &["c3", "c4"], None),
            txn_batch(5, 8, &[], Some(1)),
            txn_batch(6, 7, &["c6"], None),
            txn_batch(7, 7, &[], Some(1)),
        ]);
        let mut filter = CommittedFilter::new(Arc::new(HeldBudget::new(usize::MAX)));
        let out = filter.push_all(&tp, data.clone(), 0, true, &[(7, 0)]);
        assert!(out.error.is_none() && out.rewind.is_none());
        assert_eq!(values(&out.records), ["c3", "c4", "c6"]);
        assert_eq!(out.next, Some(8));
        // Read uncommitted: every data record, still no markers.
        let (records, _, _) = decode(&tp, data, 0, true);
        assert_eq!(values(&records), ["a0", "a1", "c3", "c4", "c6"]);
    }

    /// Records below the fetch offset inside a batch are skipped; the next
    /// position follows the last whole batch.
    #[test]
    fn decode_skips_records_below_start() {
        let tp = TopicPartition::new("t", 0);
        let data = concat(&[batch(0, 5), batch(5, 5)]);
        let (records, next, err) = decode(&tp, data, 3, true);
        assert!(err.is_none());
        assert_eq!(
            records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            (3..10).collect::<Vec<_>>()
        );
        assert_eq!(next, Some(10));
    }

    /// A truncated trailing batch is left for the next fetch.
    #[test]
    fn decode_stops_at_truncated_batch() {
        let tp = TopicPartition::new("t", 0);
        let second = batch(5, 5);
        let data = concat(&[batch(0, 5), second.slice(..second.len() - 1)]);
        let (records, next, err) = decode(&tp, data, 0, true);
        assert!(err.is_none());
        assert_eq!(records.len(), 5);
        assert_eq!(next, Some(5));
    }

    /// A corrupt batch after good ones: the good records come out and the error
    /// points at the bad batch's offset, so nothing after it is skipped.
    /// A fetched slice is cut after whole batches, at least one, once the
    /// limit is reached; a truncated or odd tail is left to the decoder.
    #[test]
    fn slices_are_cut_after_whole_batches() {
        let parts: Vec<Bytes> = (0..4).map(|i| batch(i * 10, 10)).collect();
        let one = parts[0].len();
        let mut data = concat(&parts);
        let rest = split_after(&mut data, 1).expect("cut after the first batch");
        assert_eq!((data.len(), rest.len()), (one, 3 * one));
        let mut data = concat(&parts);
        let rest = split_after(&mut data, one + 1).expect("cut after two batches");
        assert_eq!(data.len(), 2 * one);
        let (records, next, err) = decode(&TopicPartition::new("t", 0), rest, 0, true);
        assert!(err.is_none());
        assert_eq!(records.first().map(|r| r.offset), Some(20));
        assert_eq!(next, Some(40));
        let mut whole = concat(&parts);
        assert!(split_after(&mut whole, 10 * one).is_none());
        let truncated = concat(&parts).slice(..2 * one + 20);
        let mut cut = truncated.clone();
        let rest = split_after(&mut cut, one).expect("cut after the first batch");
        assert_eq!(rest.len(), one + 20);
        let mut tail = truncated.clone();
        assert!(
            split_after(&mut tail, 3 * one).is_none(),
            "a truncated batch is not measured"
        );
        assert_eq!(tail.len(), truncated.len());
    }

    #[test]
    fn decode_reports_corrupt_batch_at_its_offset() {
        let tp = TopicPartition::new("orders", 2);
        let mut bad = BytesMut::from(&batch(5, 5)[..]);
        let n = bad.len();
        bad[n - 2] ^= 0xff;
        let data = concat(&[batch(0, 5), bad.freeze()]);
        let (records, next, err) = decode(&tp, data, 0, true);
        assert_eq!(records.len(), 5);
        assert_eq!(next, Some(5));
        let (offset, e) = err.unwrap();
        assert_eq!(offset, 5);
        let text = e.to_string();
        assert!(
            text.contains("orders-2") && text.contains("offset 5"),
            "{text}"
        );
    }

    mod out_of_range {
        use std::time::Duration;

        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        use kafka_protocol::messages::list_offsets_response::{
            ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
        };
        use kafka_protocol::messages::*;
        use kafka_protocol::protocol::{Decodable, StrBytes};

        use super::*;
        use crate::connection::response_frame;
        use crate::testing::scripted_broker;
        use crate::{Client, ClientConfig};

        /// A broker whose partition `t-0` holds offsets 0..100: fetches past
        /// the end get OFFSET_OUT_OF_RANGE, others a batch of 10 records.
        async fn broker() -> String {
            let apis = [(ApiKey::Fetch, 12), (ApiKey::ListOffsets, 8)];
            scripted_broker("t", 1, &apis, |mut req| match req.api {
                ApiKey::ListOffsets => {
                    let asked = ListOffsetsRequest::decode(&mut req.body, req.version).unwrap();
                    let spec = asked.topics[0].partitions[0].timestamp;
                    response_frame(
                        req.correlation_id,
                        req.version,
                        ListOffsetsResponse::default().with_topics(vec![
                            ListOffsetsTopicResponse::default()
                                .with_name(TopicName(StrBytes::from_static_str("t")))
                                .with_partitions(vec![ListOffsetsPartitionResponse::default()
                                    .with_offset(if spec == -2 { 0 } else { 100 })]),
                        ]),
                    )
                }
                _ => {
                    let fetch = FetchRequest::decode(&mut req.body, req.version).unwrap();
                    let offset = fetch.topics[0].partitions[0].fetch_offset;
                    let mut data = PartitionData::default().with_high_watermark(100);
                    if !(0..100).contains(&offset) {
                        data.error_code = 1; // OFFSET_OUT_OF_RANGE
                    } else {
                        let mut b = BatchBuilder::new(64);
                        for o in offset..(offset + 10).min(100) {
                            b.push(0, None, Some(o.to_string().as_bytes()), &[]);
                        }
                        let mut bytes = BytesMut::from(
                            &b.seal(Compression::None, ProducerIdentity::default())
                                .unwrap()[..],
                        );
                        bytes[..8].copy_from_slice(&offset.to_be_bytes());
                        data.records = Some(bytes.freeze());
                    }
                    response_frame(
                        req.correlation_id,
                        req.version,
                        FetchResponse::default().with_responses(vec![
                            FetchableTopicResponse::default()
                                .with_topic(TopicName(StrBytes::from_static_str("t")))
                                .with_partitions(vec![data]),
                        ]),
                    )
                }
            })
            .await
        }

        async fn consumer(reset: AutoOffsetReset) -> Consumer {
            let client = Client::connect(ClientConfig::new([broker().await]))
                .await
                .unwrap();
            let mut c = Consumer::new(
                client,
                ConsumerConfig {
                    auto_offset_reset: reset,
                    ..ConsumerConfig::default()
                },
            );
            c.assign([(TopicPartition::new("t", 0), Offset::At(1_000))])
                .unwrap();
            c
        }

        /// OFFSET_OUT_OF_RANGE resets to the earliest or latest offset as the
        /// policy says (the test broker in containers never sends it).
        #[tokio::test]
        async fn out_of_range_position_follows_the_reset_policy() {
            let mut earliest = consumer(AutoOffsetReset::Earliest).await;
            let r = tokio::time::timeout(Duration::from_secs(10), earliest.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.offset, 0);

            let latest = consumer(AutoOffsetReset::Latest).await;
            let tp = TopicPartition::new("t", 0);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while latest.position(&tp) != Some(100) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no reset to latest: {:?}",
                    latest.position(&tp)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }

            let mut none = consumer(AutoOffsetReset::None).await;
            let err = tokio::time::timeout(Duration::from_secs(10), none.recv())
                .await
                .unwrap()
                .unwrap_err();
            assert!(
                matches!(err, Error::OffsetOutOfRange { offset: 1_000, .. }),
                "{err}"
            );
        }
    }

    mod read_committed {
        use std::sync::Mutex;
        use std::time::Duration;

        use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
        use kafka_protocol::messages::*;
        use kafka_protocol::protocol::{Decodable, StrBytes};

        use super::*;
        use crate::connection::response_frame;
        use crate::testing::scripted_broker;
        use crate::{Client, ClientConfig};

        /// The partition `t-0` of a scripted broker: its batches (base offset,
        /// offset after, bytes), which a test may append to, and the offsets
        /// fetched so far.
        #[derive(Default)]
        struct Log {
            batches: Vec<(i64, i64, Bytes)>,
            fetched_from: Vec<i64>,
        }

        /// A broker serving `log`: each Fetch gets at most two batches from the
        /// fetch offset (so markers often come a fetch after their data), a
        /// high watermark at the end of the log and a last stable offset of
        /// `lso`, and an empty aborted list, as tansu sends.
        async fn broker(log: Arc<Mutex<Log>>, lso: i64) -> String {
            scripted_broker("t", 1, &[(ApiKey::Fetch, 12)], move |mut req| {
                let fetch = FetchRequest::decode(&mut req.body, req.version).unwrap();
                assert_eq!(fetch.isolation_level, 1, "a read-committed fetch");
                let offset = fetch.topics[0].partitions[0].fetch_offset;
                let mut log = log.lock().unwrap();
                log.fetched_from.push(offset);
                let end = log.batches.last().map_or(0, |b| b.1);
                let mut records = BytesMut::new();
                for b in log.batches.iter().filter(|b| b.1 > offset).take(2) {
                    records.extend_from_slice(&b.2);
                }
                let data = PartitionData::default()
                    .with_high_watermark(end)
                    .with_last_stable_offset(lso)
                    .with_aborted_transactions(Some(vec![]))
                    .with_records(Some(records.freeze()));
                response_frame(
                    req.correlation_id,
                    req.version,
                    FetchResponse::default()
                        .with_responses(vec![FetchableTopicResponse::default()
                            .with_topic(TopicName(StrBytes::from_static_str("t")))
                            .with_partitions(vec![data])]),
                )
            })
            .await
        }

        fn append(log: &Mutex<Log>, batch: Bytes, n: i64) {
            let mut log = log.lock().unwrap();
            let base = log.batches.last().map_or(0, |b| b.1);
            let mut bytes = BytesMut::from(&batch[..]);
            bytes[..8].copy_from_slice(&base.to_be_bytes());
            log.batches.push((base, base + n, bytes.freeze()));
        }

        /// A transactional data batch of `pid` with one record.
        fn data(log: &Mutex<Log>, pid: i64, value: &str) {
            append(log, txn_batch(0, pid, &[value], None), 1);
        }

        fn marker(log: &Mutex<Log>, pid: i64, commit: bool) {
            append(log, txn_batch(0, pid, &[], Some(commit as i16)), 1);
        }

        fn plain(log: &Mutex<Log>, value: &str) {
            let mut b = crate::records::BatchBuilder::new(64);
            b.push(0, None, Some(value.as_bytes()), &[]);
            let bytes = b
                .seal(Compression::None, ProducerIdentity::default())
                .unwrap();
            append(log, bytes, 1);
        }

        async fn consumer(addr: String, max_buffered_bytes: usize) -> Consumer {
            let client = Client::connect(ClientConfig::new([addr])).await.unwrap();
            let mut c = Consumer::new(
                client,
                ConsumerConfig {
                    isolation: IsolationLevel::ReadCommitted,
                    max_buffered_bytes,
                    ..ConsumerConfig::default()
                },
            );
            c.assign([(TopicPartition::new("t", 0), Offset::At(0))])
                .unwrap();
            c
        }

        async fn take(c: &mut Consumer, n: usize) -> Vec<String> {
            let mut out = Vec::new();
            while out.len() < n {
                let r = tokio::time::timeout(Duration::from_secs(10), c.recv())
                    .await
                    .expect("records in time")
                    .unwrap();
                out.extend(values(&[r]));
            }
            out
        }

        /// Through the real fetcher: an open transaction holds its records and
        /// everything after it, the position stays at its first record, and the
        /// COMMIT marker written later hands them all out in order; the last
        /// stable offset is the broker's.
        #[tokio::test]
        async fn open_transaction_holds_the_partition_until_its_marker() {
            let log = Arc::new(Mutex::new(Log::default()));
            plain(&log, "p0");
            data(&log, 1, "a1");
            plain(&log, "p2");
            let mut c = consumer(broker(log.clone(), 1).await, 64 * 1024 * 1024).await;
            let tp = TopicPartition::new("t", 0);
            assert_eq!(c.last_stable_offset(&tp), -1);
            assert_eq!(take(&mut c, 1).await, ["p0"]);
            let more = tokio::time::timeout(Duration::from_millis(500), c.recv()).await;
            assert!(more.is_err(), "a held record came out: {more:?}");
            assert_eq!(c.position(&tp), Some(1));
            assert_eq!(c.last_stable_offset(&tp), 1);
            assert_eq!(c.high_watermark(&tp), 3);
            marker(&log, 1, true);
            plain(&log, "p4");
            assert_eq!(take(&mut c, 3).await, ["a1", "p2", "p4"]);
            assert_eq!(c.position(&tp), Some(5));
        }

        /// Through the real fetcher at a tiny memory budget: the held records
        /// are dropped, the partition scans ahead for the markers, fetches again
        /// from the first dropped offset and hands out exactly the committed
        /// and plain records, once each, in order.
        #[tokio::test]
        async fn over_the_budget_the_partition_is_read_again_from_the_first_held_record() {
            let log = Arc::new(Mutex::new(Log::default()));
            data(&log, 1, "a0");
            plain(&log, "p1");
            data(&log, 2, "b2");
            data(&log, 1, "a3");
            plain(&log, "p4");
            marker(&log, 2, false);
            plain(&log, "p6");
            marker(&log, 1, true);
            plain(&log, "p8");
            // Half of 300 bytes holds two small batches, not three.
            let mut c = consumer(broker(log.clone(), 9).await, 300).await;
            assert_eq!(take(&mut c, 6).await, ["a0", "p1", "a3", "p4", "p6", "p8"]);
            let more = tokio::time::timeout(Duration::from_millis(300), c.recv()).await;
            assert!(more.is_err(), "a record twice or an aborted one: {more:?}");
            assert_eq!(c.position(&TopicPartition::new("t", 0)), Some(9));
            let fetched = log.lock().unwrap().fetched_from.clone();
            assert!(
                fetched.iter().filter(|&&o| o == 0).count() >= 2,
                "offset 0 was not read again: {fetched:?}"
            );
            assert_eq!(c.handle.held.used(), 0);
        }
    }

    /// A marker that arrives in a fetch of its own (its data was read
    /// before): the position moves past it, so a reader waiting for the end
    /// of the log sees it reached.
    #[tokio::test(start_paused = true)]
    async fn position_moves_past_a_marker_fetched_alone() {
        use crate::mock::MockCluster;
        use crate::producer::{Producer, ProducerConfig, ProducerRecord};
        let cluster = MockCluster::new();
        cluster.create_topic("t", 1);
        let client = crate::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                transactional_id: Some("tx".into()),
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        producer.init_transactions().await.unwrap();
        producer.begin_transaction().unwrap();
        producer
            .send(ProducerRecord::to("t").partition(0).value(b"v"))
            .await
            .unwrap()
            .await
            .unwrap();
        let tp = TopicPartition::new("t", 0);
        let mut c = Consumer::new(client.clone(), ConsumerConfig::default());
        c.assign([(tp.clone(), Offset::At(0))]).unwrap();
        assert_eq!(c.recv().await.unwrap().offset, 0);
        producer.commit_transaction().await.unwrap();
        assert_eq!(cluster.end_offset("t", 0), 2, "record at 0, marker at 1");
        let _ = tokio::time::timeout(Duration::from_secs(5), c.recv()).await;
        assert_eq!(c.position(&tp), Some(2), "not past the marker");
    }

    /// A broker that cuts a fetch at its byte bounds, mid-batch, returns
    /// no whole batch when one is larger than them: the partition's fetch
    /// size doubles until the batch fits, past `fetch_max_bytes` if need be
    /// (as a worker sets it low, to its share of the memory budget).
    #[tokio::test(start_paused = true)]
    async fn a_batch_larger_than_the_fetch_bounds_is_read() {
        use crate::mock::{Action, MockCluster};
        let cluster = MockCluster::new();
        cluster.create_topic("t", 1);
        let big = {
            let mut b = BatchBuilder::new(64);
            for i in 0..3 {
                b.push(i, None, Some(&vec![i as u8; 700_000]), &[]);
            }
            b.seal(Compression::None, ProducerIdentity::default())
                .unwrap()
        };
        assert!(big.len() > 2 << 20);
        cluster.append_raw("t", 0, big);
        cluster.append_raw("t", 0, batch(3, 10));
        // A consumer that never gets a whole batch fetches without end, and a
        // paused clock never moves while it does: after 50 fetches the
        // broker stops answering, so the timeout below fails the test.
        let fetches = std::sync::atomic::AtomicUsize::new(0);
        cluster.set_hook(move |call| match call.api {
            kafka_protocol::messages::ApiKey::Fetch => {
                if fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 50 {
                    Action::CutFetches
                } else {
                    Action::Hang
                }
            }
            _ => Action::Answer,
        });
        let client = crate::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let config = ConsumerConfig {
            fetch_max_bytes: 1 << 20,
            max_partition_fetch_bytes: 512 << 10,
            max_buffered_bytes: 1 << 20,
            ..ConsumerConfig::default()
        };
        let mut c = Consumer::new(client, config);
        c.assign([(TopicPartition::new("t", 0), Offset::Earliest)])
            .unwrap();
        let mut offsets = vec![];
        while offsets.len() < 13 {
            let records = tokio::time::timeout(Duration::from_secs(30), c.poll())
                .await
                .expect("records larger than the fetch bounds were never read")
                .unwrap();
            offsets.extend(records.iter().map(|r| r.offset));
        }
        assert_eq!(offsets, (0..13).collect::<Vec<i64>>());
    }

    /// Data of a partition fetched before it was paused is not handed out
    /// (only what was already decoded is): a paused partition's records
    /// stop, so the caller's queue for it stops growing. Once resumed it
    /// goes on exactly where it stopped.
    #[tokio::test(start_paused = true)]
    async fn a_paused_partition_hands_out_no_fetched_data_until_resumed() {
        use crate::mock::MockCluster;
        const PER_PARTITION: usize = 200_000;
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        for p in 0..2 {
            for i in 0..PER_PARTITION / 500 {
                cluster.append_raw("t", p, batch((i * 500) as i64, 500));
            }
        }
        let config = ConsumerConfig {
            // A budget a paused partition's parked data could fill: the
            // other partition must go on regardless.
            max_buffered_bytes: 200_000,
            // Slices larger than a decode chunk, so leftovers get parked.
            max_partition_fetch_bytes: 400_000,
            ..ConsumerConfig::default()
        };
        let mut c = two_partitions_from_earliest(&cluster, config).await;
        let tp0 = TopicPartition::new("t", 0);
        /// Polls until nothing comes for 2 s, noting the offsets by partition.
        async fn drain(c: &mut Consumer, got: &mut [Vec<i64>; 2]) {
            while let Ok(records) = tokio::time::timeout(Duration::from_secs(2), c.poll()).await {
                for r in records.unwrap() {
                    got[r.partition as usize].push(r.offset);
                }
            }
        }
        let mut got: [Vec<i64>; 2] = [Vec::new(), Vec::new()];
        for r in c.poll().await.unwrap() {
            got[r.partition as usize].push(r.offset);
        }
        // Let the fetcher read ahead as far as its budget goes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        c.pause(&tp0).unwrap();
        drain(&mut c, &mut got).await;
        assert_eq!(got[1].len(), PER_PARTITION, "partition 1 went on");
        // The paused partition's slice, set aside, still counts as held.
        let held = c.buffered_bytes();
        assert!(
            held > 0 && held <= 400_000,
            "{held} bytes held while paused"
        );
        // At most the first poll's records: nothing of partition 0 after the
        // pause, though its chunk was decoded part way.
        assert!(
            got[0].len() <= 500,
            "{} records of the paused partition handed out",
            got[0].len()
        );
        // Pausing and resuming again and again loses and repeats nothing.
        for i in 0..400 {
            if i % 2 == 0 {
                c.resume(&tp0).unwrap();
            } else {
                c.pause(&tp0).unwrap();
            }
            if let Ok(records) = tokio::time::timeout(Duration::from_millis(50), c.poll()).await {
                for r in records.unwrap() {
                    got[r.partition as usize].push(r.offset);
                }
            }
        }
        c.resume(&tp0).unwrap();
        drain(&mut c, &mut got).await;
        let expected: Vec<i64> = (0..PER_PARTITION as i64).collect();
        assert_eq!(got[0], expected, "partition 0 after resuming");
        assert_eq!(got[1], expected, "partition 1");
        assert_eq!(c.buffered_bytes(), 0, "all handed out");
    }

    /// A consumer of partitions 0 and 1 of topic "t" of `cluster`, from
    /// the earliest offset.
    async fn two_partitions_from_earliest(
        cluster: &crate::mock::MockCluster,
        config: ConsumerConfig,
    ) -> Consumer {
        let client = crate::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let mut c = Consumer::new(client, config);
        c.assign((0..2).map(|p| (TopicPartition::new("t", p), Offset::Earliest)))
            .unwrap();
        c
    }

    /// A topic of highly compressible records: each lz4 batch is about
    /// 20 KB fetched and 4 MB decompressed. The consumer holds its fetched
    /// bytes and about a chunk decompressed per partition being read (or
    /// paused part way), never a whole decompressed batch; and it reads
    /// every record, across a pause.
    #[tokio::test(start_paused = true)]
    async fn compressed_batches_are_held_a_chunk_at_a_time() {
        use crate::mock::MockCluster;
        const PER_BATCH: usize = 4_000;
        const VALUE: usize = 1_000;
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        for p in 0..2 {
            for i in 0..3 {
                let mut b = crate::records::BatchBuilder::new(64);
                for _ in 0..PER_BATCH {
                    b.push(0, None, Some(&[p as u8; VALUE]), &[]);
                }
                let mut sealed = BytesMut::from(
                    &b.seal(Compression::Lz4, ProducerIdentity::default())
                        .unwrap()[..],
                );
                sealed[..8].copy_from_slice(&((i * PER_BATCH) as i64).to_be_bytes());
                cluster.append_raw("t", p, sealed.freeze());
            }
        }
        let config = ConsumerConfig {
            max_buffered_bytes: 64 << 10,
            max_poll_records: 100,
            ..ConsumerConfig::default()
        };
        let mut c = two_partitions_from_earliest(&cluster, config).await;
        let tp0 = TopicPartition::new("t", 0);
        let (mut got, mut most_held, mut value_bytes) = ([0usize; 2], 0, 0);
        let mut paused = false;
        while got != [3 * PER_BATCH; 2] {
            let records = tokio::time::timeout(Duration::from_secs(10), c.poll())
                .await
                .expect("records keep coming")
                .unwrap();
            for r in &records {
                assert_eq!(r.offset, got[r.partition as usize] as i64);
                assert_eq!(r.value.as_deref(), Some(&[r.partition as u8; VALUE][..]));
                got[r.partition as usize] += 1;
                value_bytes += VALUE;
            }
            most_held = most_held.max(c.buffered_bytes());
            // Pause partition 0 part way through a batch, then resume it
            // once partition 1 is read.
            if !paused && got[0] > PER_BATCH / 2 {
                c.pause(&tp0).unwrap();
                paused = true;
            }
            if paused && got[1] == 3 * PER_BATCH {
                c.resume(&tp0).unwrap();
            }
        }
        assert_eq!(value_bytes, 6 * PER_BATCH * VALUE);
        eprintln!("held at most {most_held} bytes");
        // The 64 KiB budget, and two partitions' chunks at hand (64 KiB
        // each, and the rest of a chunk a record spans into).
        assert!(
            most_held <= 384 << 10,
            "held {most_held} bytes decompressing 4 MB batches"
        );
        assert!(
            most_held > 64 << 10,
            "held {most_held}: decompressed chunks not counted"
        );
        assert_eq!(c.buffered_bytes(), 0, "all handed out");
    }

    /// A poll stops after the record that brings it to `max_poll_bytes`
    /// (so it always returns one, however large), well before
    /// `max_poll_records` when records are large.
    #[tokio::test(start_paused = true)]
    async fn a_poll_returns_at_most_max_poll_bytes_and_at_least_one_record() {
        use crate::mock::MockCluster;
        let cluster = MockCluster::new();
        cluster.create_topic("t", 1);
        let mut b = crate::records::BatchBuilder::new(64);
        // One record of 100 KB, then 20 of 10 KB.
        for i in 0..21 {
            let value = vec![b'v'; if i == 0 { 100_000 } else { 10_000 }];
            b.push(0, None, Some(&value), &[]);
        }
        let sealed = b.seal(Compression::None, ProducerIdentity::default());
        cluster.append_raw("t", 0, sealed.unwrap());
        let client = crate::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let config = ConsumerConfig {
            max_poll_bytes: 25_000,
            ..ConsumerConfig::default()
        };
        let mut c = Consumer::new(client, config);
        c.assign([(TopicPartition::new("t", 0), Offset::Earliest)])
            .unwrap();
        let mut sizes = Vec::new();
        let mut next = 0;
        while next < 21 {
            let records = c.poll().await.unwrap();
            for r in &records {
                assert_eq!(r.offset, next);
                next += 1;
            }
            sizes.push(records.len());
        }
        // The big one alone; of the 10 KB records, the third reaches 25,000 bytes.
        assert_eq!(sizes, [1, 3, 3, 3, 3, 3, 3, 2], "records per poll");
    }

    /// A consumer that is not polled holds at most one fetched slice per
    /// partition, however large its budget; a poll returns at most
    /// `max_poll_records`; and once polled it reads on to the end.
    #[tokio::test(start_paused = true)]
    async fn a_partition_holds_one_fetched_slice_at_a_time() {
        use crate::mock::MockCluster;
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        for p in 0..2 {
            for i in 0..100 {
                cluster.append_raw("t", p, batch(i * 100, 100));
            }
        }
        let client = crate::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let one = batch(0, 100).len();
        let config = ConsumerConfig {
            max_partition_fetch_bytes: (3 * one) as i32,
            max_poll_records: 70,
            ..ConsumerConfig::default()
        };
        let mut c = Consumer::new(client, config);
        c.assign((0..2).map(|p| (TopicPartition::new("t", p), Offset::Earliest)))
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let buffered = c.handle.lock().buffered;
        assert!(
            buffered > 0 && buffered <= 2 * 3 * one,
            "{buffered} bytes fetched ahead for 2 partitions of {one}-byte batches, 3 a fetch"
        );
        let mut got = [0usize; 2];
        while got != [10_000, 10_000] {
            let records = c.poll().await.unwrap();
            assert!(records.len() <= 70, "{} records in one poll", records.len());
            got[records[0].partition as usize] += records.len();
        }
    }

    /// A partition waiting for its slice to be taken up is fetched again
    /// soon after, not after a long poll on a caught-up partition of the
    /// same broker has sat out `fetch_max_wait`.
    #[tokio::test(start_paused = true)]
    async fn a_caught_up_partition_does_not_hold_up_the_others() {
        use crate::mock::MockCluster;
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        for i in 0..50 {
            cluster.append_raw("t", 0, batch(i * 100, 100));
        }
        let client = crate::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let config = ConsumerConfig {
            max_partition_fetch_bytes: batch(0, 100).len() as i32,
            ..ConsumerConfig::default()
        };
        let mut c = Consumer::new(client, config);
        c.assign((0..2).map(|p| (TopicPartition::new("t", p), Offset::Earliest)))
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut got = 0;
        while got < 5_000 {
            got += c.poll().await.unwrap().len();
        }
        // 50 fetches of partition 0, each after the one before was taken up.
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?} for 50 slices");
    }

    /// A record that does not decode mid-batch (its CRC not checked), read
    /// committed and uncommitted: the records before it are handed out once,
    /// then the error names its offset, where the position stays and
    /// reading starts again (the error again, nothing after it skipped); a
    /// seek past it goes on.
    #[tokio::test(start_paused = true)]
    async fn a_record_that_does_not_decode_stops_the_partition_at_its_offset() {
        use crate::mock::MockCluster;
        let plain = |base: i64, n: usize| {
            let mut b = BatchBuilder::new(64);
            for i in 0..n {
                b.push(
                    i as i64,
                    None,
                    Some(format!("v{}", base + i as i64).as_bytes()),
                    &[],
                );
            }
            let mut bytes = BytesMut::from(
                &b.seal(Compression::None, ProducerIdentity::default())
                    .unwrap()[..],
            );
            bytes[..8].copy_from_slice(&base.to_be_bytes());
            bytes
        };
        for isolation in [
            IsolationLevel::ReadUncommitted,
            IsolationLevel::ReadCommitted,
        ] {
            let cluster = MockCluster::new();
            cluster.create_topic("t", 1);
            let mut bad = plain(0, 5);
            // The last byte: the header count of the last record (offset 4).
            let n = bad.len();
            bad[n - 1] = 0x7e;
            cluster.append_raw("t", 0, bad.freeze());
            cluster.append_raw("t", 0, plain(5, 2).freeze());
            let client = crate::Client::connect(cluster.client_config())
                .await
                .unwrap();
            let config = ConsumerConfig {
                isolation,
                check_crcs: false,
                ..ConsumerConfig::default()
            };
            let mut c = Consumer::new(client, config);
            let tp = TopicPartition::new("t", 0);
            c.assign([(tp.clone(), Offset::At(0))]).unwrap();
            let mut got = Vec::new();
            let e = loop {
                match c.recv().await {
                    Ok(r) => got.push(r.offset),
                    Err(e) => break e,
                }
            };
            assert_eq!(got, [0, 1, 2, 3], "{isolation:?}");
            assert!(e.to_string().contains("offset 4"), "{isolation:?}: {e}");
            assert_eq!(c.position(&tp), Some(4), "{isolation:?}");
            let again = tokio::time::timeout(Duration::from_secs(5), c.recv()).await;
            assert!(
                matches!(again, Ok(Err(_))),
                "{isolation:?}: not the error again: {again:?}"
            );
            assert_eq!(c.position(&tp), Some(4), "{isolation:?}");
            c.seek(&tp, Offset::At(5)).unwrap();
            assert_eq!(c.recv().await.unwrap().offset, 5, "{isolation:?}");
            assert_eq!(c.recv().await.unwrap().offset, 6, "{isolation:?}");
        }
    }
}
