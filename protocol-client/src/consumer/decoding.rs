//! A fetched chunk decoded as its records are handed out: read uncommitted
//! straight from the fetched bytes, read committed from the batches its
//! filter let through.
//!
//! A batch of small records decodes to many times its fetched (and more so
//! its compressed) size: a 1 MB batch of ten-byte records becomes a hundred
//! thousand [`ConsumerRecord`]s. Decoding them only as `poll` hands them out
//! keeps what the consumer holds near the fetched bytes it counts, and lets
//! a caller's backpressure act within one batch: a partition paused part way
//! keeps its undecoded rest, not its records.

use std::collections::VecDeque;

use bytes::Bytes;

use super::{locate, ConsumerRecord, TopicPartition};
use crate::error::Error;
use crate::records::{Batch, BatchDecoder, IntoRecords};

/// Where a [`Decoding`] gets its batches.
#[derive(Debug)]
enum Batches {
    /// Fetched bytes, read uncommitted: every data batch; control batches
    /// are skipped.
    Fetched(BatchDecoder),
    /// The batches a read-committed filter lets through, each with the first
    /// offset to hand out of it.
    Decided(VecDeque<(Batch, i64)>),
}

/// One partition's fetched chunk, decoded a record ahead of the caller.
#[derive(Debug)]
pub(super) struct Decoding {
    tp: TopicPartition,
    batches: Batches,
    /// The records of the batch being read.
    records: Option<IntoRecords>,
    /// Records below this offset are skipped.
    start: i64,
    /// The next record to hand out, already decoded: `None` once the chunk
    /// is read to its end or to an error.
    peeked: Option<ConsumerRecord>,
    /// The offset after the last batch read (once an error is found: the
    /// offset to read again from).
    next: Option<i64>,
    /// The offset after the last record handed out.
    taken: Option<i64>,
    /// A batch or record that does not decode: the offset to read again
    /// from (nothing before it is left unhanded) and the error.
    error: Option<(i64, Error)>,
}

impl Decoding {
    /// Starts decoding `data`, read uncommitted, up to its first record at
    /// or after `start`.
    pub(super) fn new(tp: &TopicPartition, data: Bytes, start: i64, check_crc: bool) -> Decoding {
        let batches = Batches::Fetched(BatchDecoder::new(data, check_crc));
        Decoding::start(tp, batches, start, None)
    }

    /// Starts decoding the batches a read-committed filter let through, each
    /// from its offset; `next` is the position once all are taken.
    pub(super) fn decided(
        tp: &TopicPartition,
        batches: VecDeque<(Batch, i64)>,
        next: Option<i64>,
    ) -> Decoding {
        Decoding::start(tp, Batches::Decided(batches), i64::MIN, next)
    }

    fn start(tp: &TopicPartition, batches: Batches, start: i64, next: Option<i64>) -> Decoding {
        let mut decoding = Decoding {
            tp: tp.clone(),
            batches,
            records: None,
            start,
            peeked: None,
            next,
            taken: None,
            error: None,
        };
        decoding.advance();
        decoding
    }

    /// Moves the next `n` records (fewer at the end or at an error) to
    /// `out`, stopping after the record whose [size](ConsumerRecord::size)
    /// brings them to `max_bytes`.
    pub(super) fn take(&mut self, n: usize, max_bytes: usize, out: &mut Vec<ConsumerRecord>) {
        let mut bytes = 0usize;
        for _ in 0..n {
            let Some(record) = self.peeked.take() else {
                return;
            };
            self.taken = Some(record.offset.saturating_add(1));
            bytes = bytes.saturating_add(record.size());
            out.push(record);
            self.advance();
            if bytes >= max_bytes {
                return;
            }
        }
    }

    /// Decompressed bytes held for the batch being read: about one chunk
    /// of it (see [`Batch::records`]), however large it decompresses to.
    pub(super) fn decompressed_held(&self) -> usize {
        self.records
            .as_ref()
            .map_or(0, IntoRecords::decompressed_held)
    }

    /// Whether every record has been taken (or an error stops the rest).
    pub(super) fn is_empty(&self) -> bool {
        self.peeked.is_none()
    }

    /// The position once every record is taken: past the last batch read,
    /// trailing control batches included; or where an error was found.
    pub(super) fn next(&self) -> Option<i64> {
        self.next
    }

    /// The error that ended the chunk, once every record before it is taken.
    pub(super) fn take_error(&mut self) -> Option<(i64, Error)> {
        if self.peeked.is_some() {
            return None;
        }
        self.error.take()
    }

    /// Decodes up to the next record to hand out, into `peeked`.
    fn advance(&mut self) {
        loop {
            if let Some(records) = &mut self.records {
                match records.next() {
                    Some(Ok(r)) if r.offset < self.start => continue,
                    Some(Ok(r)) => {
                        self.peeked = Some(ConsumerRecord {
                            topic: self.tp.topic.clone(),
                            partition: self.tp.partition,
                            offset: r.offset,
                            timestamp: r.timestamp,
                            key: r.key,
                            value: r.value,
                            headers: r.headers,
                        });
                        return;
                    }
                    Some(Err(e)) => {
                        // Read again from the first record not handed out.
                        let offset = records
                            .batch()
                            .base_offset
                            .max(self.start)
                            .max(self.taken.unwrap_or(i64::MIN));
                        return self.fail(offset, e);
                    }
                    None => self.records = None,
                }
            }
            if !self.next_batch() {
                return;
            }
        }
    }

    /// Moves on to the next batch to read; false at the end or an error.
    fn next_batch(&mut self) -> bool {
        let batches = match &mut self.batches {
            Batches::Decided(decided) => {
                let Some((batch, from)) = decided.pop_front() else {
                    return false;
                };
                self.start = from;
                self.records = Some(batch.into_records());
                return true;
            }
            Batches::Fetched(batches) => batches,
        };
        match batches.next() {
            None => false,
            Some(Err(e)) => {
                let offset = match &e {
                    Error::CorruptRecord { offset, .. } => (*offset).max(self.start),
                    _ => self.start,
                };
                self.fail(self.next.unwrap_or(offset), e);
                false
            }
            Some(Ok(batch)) => {
                let after = batch.last_offset().saturating_add(1);
                if after > self.start {
                    self.next = Some(after);
                    if !batch.is_control() {
                        self.records = Some(batch.into_records());
                    }
                }
                true
            }
        }
    }

    fn fail(&mut self, offset: i64, e: Error) {
        self.records = None;
        self.next = Some(offset);
        self.error = Some((offset, locate(&self.tp, e, offset)));
    }
}

#[cfg(test)]
mod tests {
    use bytes::{Bytes, BytesMut};
    use proptest::prelude::*;

    use super::*;
    use crate::records::{BatchBuilder, Compression, ProducerIdentity};

    /// Batches of the given sizes from offset 0, uncompressed or lz4.
    fn batches(sizes: &[usize], lz4: bool) -> Bytes {
        let mut out = BytesMut::new();
        let mut base = 0i64;
        for &n in sizes {
            let mut b = BatchBuilder::new(64);
            for i in 0..n {
                b.push(
                    i as i64,
                    Some(format!("k{}", base + i as i64).as_bytes()),
                    Some(b"v"),
                    &[],
                );
            }
            let codec = if lz4 {
                Compression::Lz4
            } else {
                Compression::None
            };
            let mut batch =
                BytesMut::from(&b.seal(codec, ProducerIdentity::default()).unwrap()[..]);
            batch[..8].copy_from_slice(&base.to_be_bytes());
            out.extend_from_slice(&batch);
            base += n as i64;
        }
        out.freeze()
    }

    fn tp() -> TopicPartition {
        TopicPartition::new("t", 0)
    }

    proptest! {
        /// Taken in parts of any sizes, a chunk gives the same records, in
        /// the same order, as taken at once, and ends at the same position.
        #[test]
        fn taking_in_parts_is_taking_at_once(
            sizes in proptest::collection::vec(1usize..300, 1..6),
            parts in proptest::collection::vec(1usize..700, 1..50),
            start in 0i64..400,
            lz4 in any::<bool>(),
        ) {
            let data = batches(&sizes, lz4);
            let mut whole = Vec::new();
            let mut at_once = Decoding::new(&tp(), data.clone(), start, true);
            at_once.take(usize::MAX, usize::MAX, &mut whole);
            let mut pieces = Vec::new();
            let mut decoding = Decoding::new(&tp(), data, start, true);
            for n in parts.iter().cycle() {
                if decoding.is_empty() {
                    break;
                }
                let before = pieces.len();
                decoding.take(*n, usize::MAX, &mut pieces);
                prop_assert!(pieces.len() - before <= *n);
            }
            prop_assert_eq!(&pieces, &whole);
            let total: usize = sizes.iter().sum();
            let expected: Vec<i64> = (start.min(total as i64)..total as i64).collect();
            prop_assert_eq!(whole.iter().map(|r| r.offset).collect::<Vec<_>>(), expected);
            prop_assert_eq!(decoding.next(), Some(total as i64).filter(|&t| t > start));
            prop_assert!(decoding.take_error().is_none());
        }
    }

    /// A record that does not decode, in a batch whose CRC is not checked:
    /// the records before it are handed out, and the error names the first
    /// offset not handed out, where reading starts again.
    #[test]
    fn a_bad_record_stops_after_the_records_before_it() {
        let data = batches(&[3, 5], false);
        let mut bad = BytesMut::from(&data[..]);
        // The last byte: the header count of the last record (offset 7).
        let n = bad.len();
        bad[n - 1] = 0x7e;
        let mut decoding = Decoding::new(&tp(), bad.freeze(), 1, false);
        let mut out = Vec::new();
        decoding.take(4, usize::MAX, &mut out);
        assert!(decoding.take_error().is_none(), "not before its records");
        decoding.take(usize::MAX, usize::MAX, &mut out);
        let offsets: Vec<i64> = out.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (1..7).collect::<Vec<_>>());
        let (offset, e) = decoding.take_error().expect("the bad record");
        assert_eq!((offset, decoding.next()), (7, Some(7)));
        assert!(e.to_string().contains("t-0"), "{e}");
    }
}
