//! Read-committed filtering: which records of a partition a
//! [`IsolationLevel::ReadCommitted`](super::IsolationLevel::ReadCommitted)
//! consumer may hand out, decided from the transaction markers in the log.
//!
//! A transactional data batch of producer P is decided by P's first control
//! batch after it: a COMMIT marker makes it visible, an ABORT marker drops it.
//! Apache Kafka also sends, with each read-committed Fetch, the aborted
//! transactions in the returned range as (producer id, first offset); a batch
//! named there is dropped at once. Some brokers send that list empty even when
//! the data holds an aborted transaction (tansu 0.6 does), so the markers are
//! what this filter trusts: a transactional batch the list does not name is
//! held until its marker has been read, which may be several fetches later (a
//! Fetch can stop at `max_bytes` between data and marker, and Kafka's last
//! stable offset can fall between a committed transaction's data and its
//! marker when transactions interleave).
//!
//! ```text
//!  batch read ──► marker ──► decides its producer's held batches ──► release the front
//!      │
//!      ▼ data
//!  aborted (named by the list, or its ABORT marker read) ──► dropped
//!  committed (COMMIT marker read) or not transactional ──┐
//!  undecided (marker not read yet) ──────────────────────┤
//!                                                        ▼
//!                   nothing held and decided? ── yes ──► handed out
//!                                                        │ no
//!                                                        ▼
//!                   held behind the rest, in offset order; while the front is
//!                   decided: visible ──► handed out, aborted ──► dropped
//! ```
//!
//! Once one batch is held, everything after it in the partition (any producer,
//! transactional or not) is held behind it, so records still come out in
//! offset order and the consumer's position (the offset a commit would store)
//! never passes the first held record.
//!
//! # The memory bound
//!
//! Held batches are kept as fetched (compressed, if they are; their records
//! are decompressed only as they are handed out) and copied out of the
//! fetched buffer. Their bytes across one consumer are capped ([`HeldBudget`],
//! half of `max_buffered_bytes`). When holding one more batch goes past the
//! cap, the partition that held it gives up its held batches and *scans*: it
//! keeps reading forward, keeping only the transaction markers it reads
//! (producer id, offset, commit or abort), until every producer whose
//! transaction blocked the dropped data has written its marker. Then it asks to
//! re-read from the first dropped offset ([`Filtered::rewind`]: the consumer
//! fetches from there again under a new epoch, like a seek, keeping the pause
//! state) and decides the re-read batches from the recorded markers. So past the
//! cap the consumer costs a second read of the scanned range instead of memory;
//! each scan moves the front of the partition forward by at least one batch, so
//! scans cannot repeat forever (a transaction that never ends holds the
//! partition, at the bound as below it). The recorded markers (a few dozen bytes each) are not counted
//! in the cap; they are pruned once they lie before everything that may still
//! need them.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use super::TopicPartition;
use crate::error::Error;
use crate::records::{Batch, BatchDecoder};

/// Bytes of batches held by the read-committed filters of one consumer, and
/// their cap. Shared by the consumer's partitions; a filter gives its bytes back
/// when it releases, drops or is dropped with its partition.
#[derive(Debug)]
pub(super) struct HeldBudget {
    used: AtomicUsize,
    cap: usize,
}

impl HeldBudget {
    /// A budget of `cap` bytes.
    pub(super) fn new(cap: usize) -> Self {
        HeldBudget {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    /// Bytes held now.
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    fn over(&self) -> bool {
        self.used() > self.cap
    }
}

/// What one [`CommittedFilter::push`] produced.
#[derive(Debug)]
pub(super) struct Filtered {
    /// Batches that may be handed out, in offset order, each with the first
    /// offset to hand out of it. Their records are decoded only as they are
    /// handed out ([`Decoding::decided`](super::decoding::Decoding::decided)):
    /// one that does not decode is found then, and the partition is read
    /// again from it under a new filter, as after a seek.
    pub visible: VecDeque<(Batch, i64)>,
    /// The partition's position once `records` are handed out: the first held
    /// (or dropped-while-scanning) record, else the offset after the last batch
    /// read. `None` before anything was read.
    pub next: Option<i64>,
    /// A bad batch: fetch again from this offset and return the error. Nothing
    /// before it is lost; the filter carries on from there.
    pub error: Option<(i64, Error)>,
    /// A scan ended: fetch again from this offset (the first dropped record).
    pub rewind: Option<i64>,
}

/// What [`CommittedFilter::push_all`] produced: [`Filtered`] with its
/// records decoded.
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))] // the fuzz target reads only `records`
#[derive(Debug)]
pub(super) struct Decoded {
    pub records: Vec<super::ConsumerRecord>,
    pub next: Option<i64>,
    pub error: Option<(i64, Error)>,
    pub rewind: Option<i64>,
}

/// Why reading a fetched slice stopped early.
enum Stop {
    Error(i64, Error),
    Rewind(i64),
}

/// What is known about a held batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Its producer's marker has not been read yet.
    Waiting,
    /// Committed, or not transactional: hand out.
    Visible,
    /// Aborted: drop.
    Aborted,
}

#[derive(Debug)]
struct Held {
    batch: Batch,
    /// First offset to hand out from it (a seek may land inside a batch).
    from: i64,
    fate: Fate,
}

/// Scanning after the held batches were dropped at the memory bound.
#[derive(Debug)]
struct Scan {
    /// The first dropped record: re-read from here.
    from: i64,
    /// Producers whose marker must be read before the dropped data can be decided.
    blocking: HashSet<i64>,
}

/// The read-committed state of one partition, carried from one fetch response
/// to the next. A seek, assign or unassign replaces it.
#[derive(Debug)]
pub(super) struct CommittedFilter {
    budget: Arc<HeldBudget>,
    /// The offset after the last batch read: a batch ending before it was read
    /// already. `None` before the first batch.
    next: Option<i64>,
    /// Held batches in offset order; the front is always waiting.
    held: VecDeque<Held>,
    /// Sequence number of `held[0]`; `held[i]` has `front_seq + i`.
    front_seq: u64,
    /// Bytes of `held`, as counted in the budget.
    held_bytes: usize,
    /// Held batches waiting for each producer's marker, by sequence number.
    waiting: HashMap<i64, Vec<u64>>,
    markers: MarkerLog,
    aborted: AbortedList,
    scan: Option<Scan>,
}

impl Drop for CommittedFilter {
    fn drop(&mut self) {
        self.budget.sub(self.held_bytes);
    }
}

impl CommittedFilter {
    /// A filter with nothing read yet, holding against `budget`.
    pub(super) fn new(budget: Arc<HeldBudget>) -> Self {
        CommittedFilter {
            budget,
            next: None,
            held: VecDeque::new(),
            front_seq: 0,
            held_bytes: 0,
            waiting: HashMap::new(),
            markers: MarkerLog::default(),
            aborted: AbortedList::default(),
            scan: None,
        }
    }

    /// Reads one fetched slice of the partition: `data` as fetched, `start` the
    /// first offset to hand out, `aborted` the broker's aborted-transaction list
    /// for it as (producer id, first offset).
    pub(super) fn push(
        &mut self,
        tp: &TopicPartition,
        data: Bytes,
        start: i64,
        check_crc: bool,
        aborted: &[(i64, i64)],
    ) -> Filtered {
        self.aborted.extend(aborted);
        let new_from = self.front_seq + self.held.len() as u64;
        let mut visible = VecDeque::new();
        let stop = self.read(tp, data, start, check_crc, &mut visible);
        // Batches held past this slice must not keep its whole buffer alive.
        let skip = new_from.saturating_sub(self.front_seq) as usize;
        for h in self.held.iter_mut().skip(skip) {
            h.batch.detach();
        }
        let next = self.resume_offset();
        if let Some(floor) = next {
            self.markers.prune_below(floor);
        }
        let (error, rewind) = match stop {
            None => (None, None),
            Some(Stop::Error(offset, e)) => (Some((offset, e)), None),
            Some(Stop::Rewind(offset)) => (None, Some(offset)),
        };
        Filtered {
            visible,
            next,
            error,
            rewind,
        }
    }

    /// [`push`](Self::push), then every record it lets through taken at
    /// once, as the consumer takes them: a record that does not decode ends
    /// them, is the error, and leaves a new filter to read again from it.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn push_all(
        &mut self,
        tp: &TopicPartition,
        data: Bytes,
        start: i64,
        check_crc: bool,
        aborted: &[(i64, i64)],
    ) -> Decoded {
        let Filtered {
            visible,
            next,
            error,
            rewind,
        } = self.push(tp, data, start, check_crc, aborted);
        let mut decoding = super::decoding::Decoding::decided(tp, visible, next);
        let mut records = Vec::new();
        decoding.take(usize::MAX, usize::MAX, &mut records);
        match decoding.take_error() {
            Some(bad) => {
                *self = CommittedFilter::new(self.budget.clone());
                Decoded {
                    records,
                    next: Some(bad.0),
                    error: Some(bad),
                    rewind: None,
                }
            }
            None => Decoded {
                records,
                next,
                error,
                rewind,
            },
        }
    }

    /// Bytes held now by this partition.
    #[cfg(test)]
    pub(super) fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Whether this partition is scanning for markers after dropping its held batches.
    #[cfg(test)]
    pub(super) fn scanning(&self) -> bool {
        self.scan.is_some()
    }

    /// Where the partition's position may go: never past the first held or
    /// dropped-while-scanning record.
    fn resume_offset(&self) -> Option<i64> {
        if let Some(scan) = &self.scan {
            return Some(scan.from);
        }
        if let Some(front) = self.held.front() {
            return Some(front.from);
        }
        self.next
    }

    fn read(
        &mut self,
        tp: &TopicPartition,
        data: Bytes,
        start: i64,
        check_crc: bool,
        out: &mut VecDeque<(Batch, i64)>,
    ) -> Option<Stop> {
        let mut read_here = None;
        for batch in BatchDecoder::new(data, check_crc) {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    // As for read-uncommitted: fetch again from the bad batch.
                    let offset = match &e {
                        Error::CorruptRecord { offset, .. } => (*offset).max(start),
                        _ => start,
                    };
                    let offset = read_here.unwrap_or(offset);
                    self.next = Some(offset);
                    return Some(Stop::Error(offset, super::locate(tp, e, offset)));
                }
            };
            let last = batch.last_offset();
            if last < start || self.next.is_some_and(|n| last < n) {
                continue; // before the position, or read already
            }
            let after = last.saturating_add(1);
            self.next = Some(after);
            read_here = Some(after);
            let stop = if batch.is_control() {
                self.read_control(tp, &batch, out)
            } else {
                self.read_data(tp, batch, start, out)
            };
            if stop.is_some() {
                return stop;
            }
        }
        None
    }

    /// A control batch: a transaction marker decides its producer's held batches.
    fn read_control(
        &mut self,
        tp: &TopicPartition,
        batch: &Batch,
        out: &mut VecDeque<(Batch, i64)>,
    ) -> Option<Stop> {
        if !batch.is_transactional() {
            return None;
        }
        let Some(commit) = marker_kind(batch) else {
            debug!(%tp, offset = batch.base_offset, "control batch is not a transaction marker; skipped");
            return None;
        };
        let pid = batch.producer_id;
        let offset = batch.last_offset();
        self.aborted.reach(offset);
        self.aborted.end(pid);
        self.markers.record(pid, offset, commit);
        if let Some(seqs) = self.waiting.remove(&pid) {
            let fate = if commit { Fate::Visible } else { Fate::Aborted };
            for seq in seqs {
                if let Some(h) = self.held.get_mut((seq - self.front_seq) as usize) {
                    h.fate = fate;
                }
            }
        }
        if let Some(scan) = &mut self.scan {
            scan.blocking.remove(&pid);
            if scan.blocking.is_empty() {
                let from = scan.from;
                debug!(%tp, from, "read-committed scan found every marker it needed; re-reading");
                self.restart_at(from);
                return Some(Stop::Rewind(from));
            }
            return None;
        }
        self.release(out);
        None
    }

    /// A data batch: handed out, dropped or held.
    fn read_data(
        &mut self,
        tp: &TopicPartition,
        batch: Batch,
        start: i64,
        out: &mut VecDeque<(Batch, i64)>,
    ) -> Option<Stop> {
        if self.scan.is_some() {
            return None; // only markers matter while scanning
        }
        let fate = if batch.is_transactional() {
            let pid = batch.producer_id;
            self.aborted.reach(batch.last_offset());
            if self.aborted.is_aborting(pid) {
                Fate::Aborted
            } else {
                match self.markers.first_after(pid, batch.last_offset()) {
                    Some(true) => Fate::Visible,
                    Some(false) => Fate::Aborted,
                    None => Fate::Waiting,
                }
            }
        } else {
            Fate::Visible
        };
        let from = batch.base_offset.max(start);
        match fate {
            Fate::Aborted => None,
            Fate::Visible if self.held.is_empty() => {
                out.push_back((batch, from));
                None
            }
            _ => self.hold(tp, batch, from, fate),
        }
    }

    fn hold(&mut self, tp: &TopicPartition, batch: Batch, from: i64, fate: Fate) -> Option<Stop> {
        let seq = self.front_seq + self.held.len() as u64;
        if fate == Fate::Waiting {
            self.waiting.entry(batch.producer_id).or_default().push(seq);
        }
        let size = batch.held_size();
        self.held_bytes += size;
        self.budget.add(size);
        self.held.push_back(Held { batch, from, fate });
        if !self.budget.over() {
            return None;
        }
        let from = self.held.front().map_or(from, |h| h.from);
        let blocking: HashSet<i64> = self.waiting.keys().copied().collect();
        debug!(
            %tp,
            from,
            held_bytes = self.held_bytes,
            producers = blocking.len(),
            "read-committed hold is over its memory bound; dropping it and scanning for markers"
        );
        self.drop_held();
        if blocking.is_empty() {
            // Cannot happen (the front always waits), but never scan for nothing.
            self.restart_at(from);
            return Some(Stop::Rewind(from));
        }
        self.scan = Some(Scan { from, blocking });
        None
    }

    /// Hands out the decided front of the held batches, up to the first that waits.
    fn release(&mut self, out: &mut VecDeque<(Batch, i64)>) {
        while self.held.front().is_some_and(|h| h.fate != Fate::Waiting) {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            let size = h.batch.held_size();
            self.held_bytes -= size;
            self.budget.sub(size);
            self.front_seq += 1;
            if h.fate == Fate::Visible {
                out.push_back((h.batch, h.from));
            }
        }
    }

    /// Forgets what was read from `offset` on (and the held batches, all at or
    /// after it), keeping the recorded markers, to read again from `offset`.
    fn restart_at(&mut self, offset: i64) {
        self.drop_held();
        self.scan = None;
        self.aborted = AbortedList::default();
        self.next = Some(offset);
    }

    fn drop_held(&mut self) {
        self.budget.sub(self.held_bytes);
        self.held_bytes = 0;
        self.front_seq += self.held.len() as u64;
        self.held.clear();
        self.waiting.clear();
    }
}

/// Transaction markers read, in offset order, for deciding batches read (again)
/// after them. Complete from the first recorded offset to the last: every
/// marker read is recorded, and only the oldest are pruned.
#[derive(Debug, Default)]
struct MarkerLog {
    /// (offset, producer id), oldest first.
    order: VecDeque<(i64, i64)>,
    /// Per producer: (offset, commit), oldest first.
    by_producer: HashMap<i64, VecDeque<(i64, bool)>>,
}

impl MarkerLog {
    fn record(&mut self, pid: i64, offset: i64, commit: bool) {
        if self.order.back().is_some_and(|&(last, _)| last >= offset) {
            return; // read again after a rewind: recorded already
        }
        self.order.push_back((offset, pid));
        self.by_producer
            .entry(pid)
            .or_default()
            .push_back((offset, commit));
    }

    /// Whether `pid`'s first marker after `offset` commits (`Some(true)`) or
    /// aborts; `None` if it has not been read.
    fn first_after(&self, pid: i64, offset: i64) -> Option<bool> {
        let markers = self.by_producer.get(&pid)?;
        let i = markers.partition_point(|&(o, _)| o <= offset);
        markers.get(i).map(|&(_, commit)| commit)
    }

    /// Forgets markers before `floor`: every batch still to decide lies at or
    /// after `floor`, and is decided by a marker after itself.
    fn prune_below(&mut self, floor: i64) {
        while let Some(&(offset, pid)) = self.order.front() {
            if offset >= floor {
                break;
            }
            self.order.pop_front();
            if let Some(markers) = self.by_producer.get_mut(&pid) {
                markers.pop_front();
                if markers.is_empty() {
                    self.by_producer.remove(&pid);
                }
            }
        }
    }
}

/// The broker's aborted-transaction lists, as Kafka sends them with each
/// read-committed Fetch: a transactional batch of producer P at or after one
/// of P's listed first offsets, and before P's next marker, was aborted.
/// Like Kafka, this assumes a list names only transactions whose marker is at
/// or after the fetch offset (a repeated entry is harmless until then).
#[derive(Debug, Default)]
struct AbortedList {
    /// (first offset, producer id) not reached yet.
    upcoming: BTreeSet<(i64, i64)>,
    /// Producers inside a listed aborted transaction.
    aborting: HashSet<i64>,
}

impl AbortedList {
    fn extend(&mut self, list: &[(i64, i64)]) {
        self.upcoming
            .extend(list.iter().map(|&(pid, first)| (first, pid)));
    }

    /// Enters the listed transactions that begin at or before `offset`.
    fn reach(&mut self, offset: i64) {
        while let Some(&(first, pid)) = self.upcoming.first() {
            if first > offset {
                break;
            }
            self.aborting.insert(pid);
            self.upcoming.pop_first();
        }
    }

    /// `pid`'s marker: its listed transaction, if any, is over.
    fn end(&mut self, pid: i64) {
        self.aborting.remove(&pid);
    }

    fn is_aborting(&self, pid: i64) -> bool {
        self.aborting.contains(&pid)
    }
}

/// Whether a control batch is a COMMIT (`Some(true)`) or ABORT (`Some(false)`)
/// marker; `None` for other control records. The control record's key is
/// version i16, type i16 (0 = abort, 1 = commit).
fn marker_kind(batch: &Batch) -> Option<bool> {
    let key = batch.records().next()?.ok()?.key?;
    match key.get(2..4)? {
        [0, 0] => Some(false),
        [0, 1] => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bytes::BytesMut;
    use proptest::prelude::*;

    use super::*;
    use crate::consumer::tests::{concat, txn_batch, values};
    use crate::records::{BatchBuilder, Compression, ProducerIdentity};

    const COMMIT: Option<i16> = Some(1);
    const ABORT: Option<i16> = Some(0);

    fn tp() -> TopicPartition {
        TopicPartition::new("t", 0)
    }

    fn filter(cap: usize) -> (CommittedFilter, Arc<HeldBudget>) {
        let budget = Arc::new(HeldBudget::new(cap));
        (CommittedFilter::new(budget.clone()), budget)
    }

    /// A batch at `base` of a producer outside any transaction.
    fn plain_batch(base: i64, values: &[&str], compression: Compression) -> Bytes {
        let mut b = BatchBuilder::new(64);
        for v in values {
            b.push(0, None, Some(v.as_bytes()), &[]);
        }
        let mut bytes =
            BytesMut::from(&b.seal(compression, ProducerIdentity::default()).unwrap()[..]);
        bytes[..8].copy_from_slice(&base.to_be_bytes());
        bytes.freeze()
    }

    /// Pushes one slice and checks it ended cleanly.
    fn push(f: &mut CommittedFilter, start: i64, parts: &[Bytes]) -> Decoded {
        let out = f.push_all(&tp(), concat(parts), start, true, &[]);
        assert!(out.error.is_none(), "{:?}", out.error);
        assert!(out.rewind.is_none());
        out
    }

    /// A transaction whose COMMIT marker comes in a later fetch than its data is
    /// held, then handed out whole when the marker arrives.
    #[test]
    fn commit_marker_in_a_later_fetch_releases_held_records() {
        let (mut f, budget) = filter(usize::MAX);
        let out = push(&mut f, 0, &[txn_batch(0, 7, &["a", "b"], None)]);
        assert!(out.records.is_empty());
        assert!(budget.used() > 0);
        let out = push(&mut f, 2, &[txn_batch(2, 7, &[], COMMIT)]);
        assert_eq!(values(&out.records), ["a", "b"]);
        assert_eq!(out.next, Some(3));
        assert_eq!(budget.used(), 0);
    }

    /// A transaction whose ABORT marker comes in a later fetch is held, then
    /// dropped: nothing of it is ever handed out.
    #[test]
    fn abort_marker_in_a_later_fetch_drops_held_records() {
        let (mut f, budget) = filter(usize::MAX);
        let out = push(&mut f, 0, &[txn_batch(0, 7, &["a", "b"], None)]);
        assert!(out.records.is_empty());
        let out = push(
            &mut f,
            2,
            &[txn_batch(2, 7, &[], ABORT), txn_batch(3, 7, &["c"], None)],
        );
        assert!(out.records.is_empty(), "{:?}", values(&out.records));
        let out = push(&mut f, 4, &[txn_batch(4, 7, &[], COMMIT)]);
        assert_eq!(values(&out.records), ["c"]);
        assert_eq!(budget.used(), 0);
    }

    /// Two producers' transactions interleaved: each batch follows its own
    /// producer's marker, and the output stays in offset order.
    #[test]
    fn interleaved_producers_are_decided_by_their_own_markers() {
        let (mut f, _) = filter(usize::MAX);
        let out = push(
            &mut f,
            0,
            &[
                txn_batch(0, 1, &["p1-0"], None),
                txn_batch(1, 2, &["p2-1"], None),
                txn_batch(2, 1, &["p1-2"], None),
                txn_batch(3, 2, &[], ABORT),
            ],
        );
        // p2 is decided (aborted) but p1's batch at 0 still waits in front.
        assert!(out.records.is_empty());
        assert_eq!(out.next, Some(0));
        let out = push(
            &mut f,
            4,
            &[
                txn_batch(4, 2, &["p2-4"], None),
                txn_batch(5, 1, &[], COMMIT),
            ],
        );
        assert_eq!(values(&out.records), ["p1-0", "p1-2"]);
        assert_eq!(out.next, Some(4), "p2's second transaction is open");
        let out = push(&mut f, 6, &[txn_batch(6, 2, &[], COMMIT)]);
        assert_eq!(values(&out.records), ["p2-4"]);
        assert_eq!(out.next, Some(7));
    }

    /// A non-transactional batch after a held one is held too and comes out
    /// after it, in offset order; with nothing held it comes out at once.
    #[test]
    fn plain_batch_after_a_held_one_waits_behind_it() {
        let (mut f, _) = filter(usize::MAX);
        let out = push(
            &mut f,
            0,
            &[
                plain_batch(0, &["plain-0"], Compression::None),
                txn_batch(1, 7, &["txn-1"], None),
                plain_batch(2, &["plain-2", "plain-3"], Compression::Lz4),
            ],
        );
        assert_eq!(values(&out.records), ["plain-0"]);
        assert_eq!(out.next, Some(1));
        let out = push(&mut f, 4, &[txn_batch(4, 7, &[], COMMIT)]);
        assert_eq!(values(&out.records), ["txn-1", "plain-2", "plain-3"]);
        assert_eq!(
            out.records.iter().map(|r| r.offset).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    /// With a non-empty aborted list, the batches it names are dropped at once
    /// (nothing held), even before their marker is read; batches it does not
    /// name still wait for their marker.
    #[test]
    fn aborted_list_drops_named_batches_without_holding_them() {
        let (mut f, budget) = filter(usize::MAX);
        let out = f.push_all(
            &tp(),
            concat(&[
                txn_batch(0, 7, &["aborted-0"], None),
                txn_batch(1, 7, &["aborted-1"], None),
                plain_batch(2, &["plain-2"], Compression::None),
            ]),
            0,
            true,
            &[(7, 0)],
        );
        assert_eq!(values(&out.records), ["plain-2"]);
        assert_eq!(
            budget.used(),
            0,
            "an aborted batch the list names is not held"
        );
        // The marker ends the listed transaction: pid 7's next one is decided
        // by its own marker.
        let out = f.push_all(
            &tp(),
            concat(&[
                txn_batch(3, 7, &[], ABORT),
                txn_batch(4, 7, &["committed-4"], None),
                txn_batch(5, 7, &[], COMMIT),
            ]),
            3,
            true,
            &[],
        );
        assert_eq!(values(&out.records), ["committed-4"]);
    }

    /// The position a commit would store never passes the first held record,
    /// even when a seek lands inside the held batch.
    #[test]
    fn position_stays_at_the_first_held_record() {
        let (mut f, _) = filter(usize::MAX);
        let out = push(
            &mut f,
            11,
            &[
                plain_batch(5, &["p5"], Compression::None),
                txn_batch(10, 7, &["t10", "t11", "t12"], None),
                plain_batch(13, &["p13"], Compression::None),
            ],
        );
        assert!(out.records.is_empty());
        assert_eq!(out.next, Some(11), "the first held record, not its batch");
        let out = push(&mut f, 14, &[plain_batch(14, &["p14"], Compression::None)]);
        assert_eq!(out.next, Some(11));
        let out = push(&mut f, 15, &[txn_batch(15, 7, &[], COMMIT)]);
        assert_eq!(values(&out.records), ["t11", "t12", "p13", "p14"]);
        assert_eq!(out.next, Some(16));
    }

    /// A batch with a bad CRC after a held one: the error names the bad batch,
    /// the position stays at the held record, and reading on from the bad
    /// offset (the consumer fetches it again) keeps what was held.
    #[test]
    fn corrupt_batch_after_a_held_one_keeps_the_held_records() {
        let (mut f, _) = filter(usize::MAX);
        let mut bad = BytesMut::from(&txn_batch(1, 8, &["x"], None)[..]);
        let n = bad.len();
        bad[n - 2] ^= 0xff;
        let out = f.push_all(
            &tp(),
            concat(&[txn_batch(0, 7, &["a"], None), bad.freeze()]),
            0,
            true,
            &[],
        );
        assert!(out.records.is_empty());
        assert_eq!(out.error.as_ref().map(|e| e.0), Some(1));
        assert_eq!(out.next, Some(0), "position at the held record");
        let out = push(
            &mut f,
            1,
            &[txn_batch(1, 8, &["x"], None), txn_batch(2, 7, &[], COMMIT)],
        );
        assert_eq!(values(&out.records), ["a"]);
        assert_eq!(out.next, Some(1), "pid 8 still open");
    }

    /// A held batch whose records turn out not to decode when its COMMIT
    /// marker releases it: the error names it, nothing is handed out past it,
    /// and reading it again gives the error again.
    #[test]
    fn undecodable_record_in_a_released_batch_is_reported_at_its_offset() {
        let (mut f, budget) = filter(usize::MAX);
        let mut bad = BytesMut::from(&txn_batch(0, 7, &["a"], None)[..]);
        bad[61] = 0x01; // record length -1 (zigzag); the CRC still matches
        let crc = crc32c::crc32c(&bad[21..]);
        bad[17..21].copy_from_slice(&crc.to_be_bytes());
        let bad = bad.freeze();
        let data = [
            bad.clone(),
            txn_batch(1, 7, &[], COMMIT),
            plain_batch(2, &["p2"], Compression::None),
        ];
        for _ in 0..2 {
            let out = f.push_all(&tp(), concat(&data), 0, true, &[]);
            assert!(out.records.is_empty());
            let (offset, e) = out.error.expect("the bad record is reported");
            assert_eq!(offset, 0);
            assert!(e.to_string().contains("t-0"), "{e}");
            assert_eq!(out.next, Some(0));
            assert_eq!(budget.used(), 0);
        }
    }

    /// Held batches give their bytes back when their partition's filter goes
    /// (seek, unassign).
    #[test]
    fn dropping_a_filter_returns_its_held_bytes() {
        let (mut f, budget) = filter(usize::MAX);
        push(&mut f, 0, &[txn_batch(0, 7, &["a"], None)]);
        assert!(budget.used() > 0);
        drop(f);
        assert_eq!(budget.used(), 0);
    }

    /// A log for tests: batches in offset order, the records a read-committed
    /// consumer must see, and the aborted transactions Kafka would list.
    #[derive(Debug, Clone)]
    struct Log {
        /// (base offset, offset after it, bytes)
        batches: Vec<(i64, i64, Bytes)>,
        /// Visible records (offset, value), in offset order, up to the first
        /// batch whose transaction never ends.
        visible: Vec<(i64, String)>,
        /// Offset of the first batch whose transaction never ends, if any.
        undecided: Option<i64>,
        /// Aborted transactions: (producer id, first offset, marker offset).
        aborted: Vec<(i64, i64, i64)>,
    }

    /// One step of a generated log.
    #[derive(Debug, Clone)]
    enum Step {
        /// `n` records of producer `pid` in its transaction.
        Txn { pid: i64, n: usize },
        /// `n` records outside any transaction.
        Plain { n: usize, lz4: bool },
        /// `pid` ends its transaction (or writes a stray marker).
        End { pid: i64, commit: bool },
    }

    fn build(steps: &[Step]) -> Log {
        let mut batches = Vec::new();
        // Per batch: (offset, values, Some(pid) if transactional).
        let mut data: Vec<(i64, Vec<String>, Option<i64>)> = Vec::new();
        let mut markers: Vec<(i64, i64, bool)> = Vec::new();
        let mut open: HashMap<i64, i64> = HashMap::new();
        let mut aborted = Vec::new();
        let mut offset = 0i64;
        for step in steps {
            let (pid, n, bytes) = match *step {
                Step::End { pid, commit } => {
                    let kind = if commit { COMMIT } else { ABORT };
                    batches.push((offset, offset + 1, txn_batch(offset, pid, &[], kind)));
                    markers.push((offset, pid, commit));
                    if let Some(first) = open.remove(&pid) {
                        if !commit {
                            aborted.push((pid, first, offset));
                        }
                    }
                    offset += 1;
                    continue;
                }
                Step::Txn { pid, n } => (Some(pid), n, None),
                Step::Plain { n, lz4 } => (None, n, Some(lz4)),
            };
            let vals: Vec<String> = (0..n as i64).map(|i| format!("v{}", offset + i)).collect();
            let refs: Vec<&str> = vals.iter().map(String::as_str).collect();
            let batch = match (pid, bytes) {
                (Some(pid), _) => {
                    open.entry(pid).or_insert(offset);
                    txn_batch(offset, pid, &refs, None)
                }
                (None, lz4) => plain_batch(
                    offset,
                    &refs,
                    if lz4 == Some(true) {
                        Compression::Lz4
                    } else {
                        Compression::None
                    },
                ),
            };
            batches.push((offset, offset + n as i64, batch));
            data.push((offset, vals, pid));
            offset += n as i64;
        }
        let mut visible = Vec::new();
        let mut undecided = None;
        for (at, vals, txn) in data {
            let show = match txn {
                None => true,
                Some(pid) => match markers.iter().find(|&&(m, p, _)| p == pid && m > at) {
                    Some(&(_, _, commit)) => commit,
                    None => {
                        undecided = Some(at);
                        break;
                    }
                },
            };
            if show {
                visible.extend(
                    vals.into_iter()
                        .enumerate()
                        .map(|(i, v)| (at + i as i64, v)),
                );
            }
        }
        Log {
            batches,
            visible,
            undecided,
            aborted,
        }
    }

    /// Feeds `log` through a filter as a fetcher would: each fetch from the
    /// current offset takes `cuts[i] % 4 + 1` whole batches and, every other
    /// time, part of the next (a fetch cut at `max_bytes`); a rewind moves the
    /// fetch offset back. Checks after every fetch that the records so far are
    /// a prefix of the visible ones, the position is not past the next visible
    /// record, and the budget holds. Returns the records.
    fn feed(log: &Log, cuts: &[usize], cap: usize, with_list: bool) -> Fed {
        let (mut f, budget) = filter(cap);
        let end = log.batches.last().map_or(0, |b| b.1);
        let mut got: Vec<(i64, String)> = Vec::new();
        let mut at = 0i64;
        let mut rewinds = 0;
        let mut next = None;
        for round in 0.. {
            assert!(round < 100_000, "no progress: at {at}, {rewinds} rewinds");
            if at >= end {
                break;
            }
            let cut = cuts.get(round % cuts.len().max(1)).copied().unwrap_or(0);
            let first = log.batches.iter().position(|b| b.1 > at).unwrap();
            let last = (first + cut % 4 + 1).min(log.batches.len());
            let mut parts: Vec<Bytes> = log.batches[first..last]
                .iter()
                .map(|b| b.2.clone())
                .collect();
            if cut % 2 == 1 {
                if let Some(next) = log.batches.get(last) {
                    parts.push(next.2.slice(..(cut / 2) % next.2.len()));
                }
            }
            let upper = log.batches[last - 1].1;
            let list: Vec<(i64, i64)> = if with_list {
                log.aborted
                    .iter()
                    .filter(|&&(_, first, marker)| marker >= at && first < upper)
                    .map(|&(pid, first, _)| (pid, first))
                    .collect()
            } else {
                Vec::new()
            };
            let out = f.push_all(&tp(), concat(&parts), at, true, &list);
            assert!(out.error.is_none(), "{:?}", out.error);
            got.extend(
                out.records
                    .iter()
                    .map(|r| (r.offset, values(std::slice::from_ref(r)).remove(0))),
            );
            assert!(
                got.len() <= log.visible.len() && got[..] == log.visible[..got.len()],
                "handed out {got:?}, visible {:?}",
                log.visible
            );
            if let (Some(next), Some(upcoming)) = (out.next, log.visible.get(got.len())) {
                assert!(
                    next <= upcoming.0,
                    "position {next} passed unreturned record {}",
                    upcoming.0
                );
            }
            if let Some(&(last_out, _)) = got.last() {
                assert!(out.next.is_some_and(|n| n > last_out));
            }
            assert!(
                budget.used() <= cap,
                "held {} over the cap {cap}",
                budget.used()
            );
            next = out.next;
            at = match out.rewind {
                Some(from) => {
                    rewinds += 1;
                    from
                }
                None => upper,
            };
        }
        Fed {
            got,
            next,
            rewinds,
            filter: f,
            budget,
        }
    }

    /// What [`feed`] ends with.
    struct Fed {
        /// The records handed out: (offset, value).
        got: Vec<(i64, String)>,
        /// The position after the last fetch.
        next: Option<i64>,
        /// How often the filter asked to re-read.
        rewinds: usize,
        filter: CommittedFilter,
        budget: Arc<HeldBudget>,
    }

    /// The memory bound: at a budget smaller than one batch the filter drops
    /// what it holds, scans ahead for the markers, asks to re-read, and ends
    /// with exactly the records of the committed transactions and none twice.
    #[test]
    fn scan_mode_at_a_tiny_budget_ends_with_exactly_the_committed_records() {
        let steps = [
            Step::Txn { pid: 1, n: 2 },
            Step::Plain { n: 1, lz4: false },
            Step::Txn { pid: 2, n: 2 },
            Step::Txn { pid: 1, n: 1 },
            Step::Plain { n: 2, lz4: true },
            Step::End {
                pid: 2,
                commit: false,
            },
            Step::Txn { pid: 3, n: 1 },
            Step::End {
                pid: 1,
                commit: true,
            },
            Step::Plain { n: 1, lz4: false },
            Step::End {
                pid: 3,
                commit: true,
            },
        ];
        let log = build(&steps);
        // Each fetch is one whole batch: the scan crosses fetches.
        let fed = feed(&log, &[0], 10, false);
        assert!(fed.rewinds > 0, "the budget was never exceeded");
        assert_eq!(fed.got, log.visible);
        let got: Vec<&str> = fed.got.iter().map(|(_, v)| v.as_str()).collect();
        assert_eq!(got, ["v0", "v1", "v2", "v5", "v6", "v7", "v9", "v11"]);
        assert_eq!(fed.next, Some(13));
        assert!(!fed.filter.scanning());
        assert_eq!(fed.filter.held_bytes(), 0);
        drop(fed.filter);
        assert_eq!(fed.budget.used(), 0);
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (1..=3i64, 1..4usize).prop_map(|(pid, n)| Step::Txn { pid, n }),
            1 => (1..3usize, any::<bool>()).prop_map(|(n, lz4)| Step::Plain { n, lz4 }),
            2 => (1..=3i64, any::<bool>()).prop_map(|(pid, commit)| Step::End { pid, commit }),
        ]
    }

    /// `steps`, then (if `close`) a marker for every transaction left open.
    fn closed(mut steps: Vec<Step>, close: Option<bool>) -> Vec<Step> {
        if let Some(commit) = close {
            for pid in 1..=3 {
                steps.push(Step::End { pid, commit });
            }
        }
        steps
    }

    proptest! {
        /// Random interleaved transactions of three producers (committed,
        /// aborted or left open) and plain batches, cut into random fetches
        /// (also between data and marker, and inside a batch), with or without
        /// Kafka's aborted lists, at any budget: the filter hands out exactly
        /// the model's records — committed and non-transactional, in offset
        /// order, up to the first transaction that never ends — and never
        /// more; the position never passes a record not handed out.
        #[test]
        fn filter_matches_the_model(
            steps in proptest::collection::vec(step(), 0..40),
            close in proptest::option::of(any::<bool>()),
            cuts in proptest::collection::vec(any::<usize>(), 1..16),
            cap in prop_oneof![Just(usize::MAX), 0..800usize],
            with_list in any::<bool>(),
        ) {
            let log = build(&closed(steps, close));
            prop_assume!(!log.batches.is_empty());
            let fed = feed(&log, &cuts, cap, with_list);
            let end = log.batches.last().map(|b| b.1);
            match log.undecided {
                None => {
                    prop_assert_eq!(&fed.got, &log.visible);
                    prop_assert_eq!(fed.next, end);
                    prop_assert!(!fed.filter.scanning());
                    prop_assert_eq!(fed.filter.held_bytes(), 0);
                }
                Some(undecided) if cap == usize::MAX => {
                    prop_assert_eq!(&fed.got, &log.visible);
                    prop_assert_eq!(fed.next, Some(undecided));
                }
                // At a small budget the tail may still be scanning; `feed`
                // checked that what came out is a prefix of the model.
                Some(undecided) => prop_assert!(fed.next.is_some_and(|n| n <= undecided)),
            }
            drop(fed.filter);
            prop_assert_eq!(fed.budget.used(), 0);
        }
    }
}
