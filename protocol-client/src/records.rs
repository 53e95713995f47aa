//! RecordBatch v2 (message format "magic 2"): the bytes inside Produce requests
//! and Fetch responses.
//!
//! `kafka-protocol` carries record data as raw [`Bytes`]; this module is the codec
//! for those bytes. It is written here rather than taken from `kafka_protocol::records`
//! for three reasons: decoded keys, values and headers are zero-copy slices of the
//! fetched buffer, duplicate header keys are kept (Kafka allows them), and a
//! truncated trailing batch — which Fetch returns when it stops at `max_bytes` — ends
//! decoding cleanly instead of failing it.
//!
//! ```text
//! RecordBatch:                          Record:
//!   baseOffset            i64  0..8       length          varint
//!   batchLength           i32  8..12      attributes      i8
//!   partitionLeaderEpoch  i32 12..16      timestampDelta  varlong
//!   magic (=2)            i8  16          offsetDelta     varint
//!   crc (crc32c of 21..)  u32 17..21      keyLength       varint (-1 = null)
//!   attributes            i16 21..23      key             bytes
//!   lastOffsetDelta       i32 23..27      valueLength     varint (-1 = null)
//!   baseTimestamp         i64 27..35      value           bytes
//!   maxTimestamp          i64 35..43      headerCount     varint
//!   producerId            i64 43..51      headers         [keyLen key valueLen value]
//!   producerEpoch         i16 51..53
//!   baseSequence          i32 53..57
//!   recordCount           i32 57..61
//!   records (compressed as a whole when attributes & 7 != 0)
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

/// Length of the fixed part of a RecordBatch, before its records.
pub const BATCH_HEADER_LEN: usize = 61;
/// `baseOffset` and `batchLength`: the part of a batch not counted in `batchLength`.
const LOG_OVERHEAD: usize = 12;
const CRC_OFFSET: usize = 17;
const ATTRIBUTES_OFFSET: usize = 21;

const COMPRESSION_MASK: i16 = 0x07;
const TRANSACTIONAL_FLAG: i16 = 0x10;
const CONTROL_FLAG: i16 = 0x20;

pub use crate::compression::Compression;
use crate::compression::{Decompressor, MAX_DECOMPRESSED};

/// A record header. Kafka allows the same key more than once; all are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header's key (UTF-8 by convention, not checked).
    pub key: Bytes,
    /// The header's value; `None` is a null value.
    pub value: Option<Bytes>,
}

impl Header {
    /// A header from a key and a value.
    ///
    /// ```
    /// let h = strom_client::Header::new("trace-id", "abc");
    /// assert_eq!(&h.key[..], b"trace-id");
    /// ```
    pub fn new(key: impl Into<Bytes>, value: impl Into<Bytes>) -> Self {
        Header {
            key: key.into(),
            value: Some(value.into()),
        }
    }
}

/// One record decoded from a batch. Key, value and header bytes share the
/// fetched buffer (no copies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The record's offset in its partition.
    pub offset: i64,
    /// Milliseconds since the Unix epoch (create time, or log-append time if the
    /// batch says so).
    pub timestamp: i64,
    /// The key; `None` is a null key.
    pub key: Option<Bytes>,
    /// The value; `None` is a null value (a tombstone in compacted topics).
    pub value: Option<Bytes>,
    /// The headers, in the order they were written.
    pub headers: Vec<Header>,
}

/// Producer identity written into a batch: all -1 for a plain producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerIdentity {
    /// `producerId`, -1 when not idempotent.
    pub producer_id: i64,
    /// `producerEpoch`, -1 when not idempotent.
    pub producer_epoch: i16,
    /// `baseSequence`, -1 when not idempotent.
    pub base_sequence: i32,
    /// Whether the batch is part of a transaction.
    pub transactional: bool,
}

impl Default for ProducerIdentity {
    fn default() -> Self {
        ProducerIdentity {
            producer_id: -1,
            producer_epoch: -1,
            base_sequence: -1,
            transactional: false,
        }
    }
}

/// Builds one RecordBatch: records are encoded as they are pushed, so sealing
/// only adds the header, compresses and computes the CRC.
///
/// ```
/// use strom_client::records::{BatchBuilder, BatchDecoder, Compression, ProducerIdentity};
/// let mut b = BatchBuilder::new(1024);
/// b.push(1_700_000_000_000, Some(b"k"), Some(b"v"), &[]);
/// let bytes = b.seal(Compression::Lz4, ProducerIdentity::default()).unwrap();
/// let batch = BatchDecoder::new(bytes, true).next().unwrap().unwrap();
/// let rec = batch.records().next().unwrap().unwrap();
/// assert_eq!(rec.value.as_deref(), Some(&b"v"[..]));
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    /// Room for the batch header (once a record is pushed), then the
    /// records: an uncompressed batch is sealed in place, without a copy.
    buf: BytesMut,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
}

impl BatchBuilder {
    /// An empty batch whose record buffer starts with `capacity` bytes
    /// (allocated at the first push).
    pub fn new(capacity: usize) -> Self {
        BatchBuilder {
            buf: BytesMut::with_capacity(if capacity == 0 {
                0
            } else {
                BATCH_HEADER_LEN + capacity
            }),
            count: 0,
            base_timestamp: 0,
            max_timestamp: -1,
        }
    }

    /// Number of records pushed.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// Whether no record was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size of the batch if sealed without compression.
    pub fn size(&self) -> usize {
        BATCH_HEADER_LEN + self.records().len()
    }

    /// The encoded records pushed so far.
    fn records(&self) -> &[u8] {
        self.buf.get(BATCH_HEADER_LEN..).unwrap_or_default()
    }

    /// The encoded size a record would add to a batch.
    pub fn record_size(key: Option<&[u8]>, value: Option<&[u8]>, headers: &[Header]) -> usize {
        // Worst case for the deltas: 10-byte varlong and 5-byte varint.
        let body = Self::body_len(0, i32::MAX, key, value, headers);
        body + varint_len(body as i64)
    }

    fn body_len(
        timestamp_delta: i64,
        offset_delta: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) -> usize {
        let mut n = 1 + varint_len(timestamp_delta) + varint_len(offset_delta as i64);
        n += bytes_len(key) + bytes_len(value);
        n += varint_len(headers.len() as i64);
        for h in headers {
            n += bytes_len(Some(&h.key)) + bytes_len(h.value.as_deref());
        }
        n
    }

    /// Appends a record; its offset delta is its position in the batch.
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) {
        if self.count == 0 {
            self.base_timestamp = timestamp;
        }
        if self.buf.is_empty() {
            self.buf.resize(BATCH_HEADER_LEN, 0);
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let ts_delta = timestamp - self.base_timestamp;
        let body = Self::body_len(ts_delta, self.count, key, value, headers);
        let buf = &mut self.buf;
        buf.reserve(body + 5);
        put_varint(buf, body as i64);
        buf.put_i8(0);
        put_varint(buf, ts_delta);
        put_varint(buf, self.count as i64);
        put_bytes(buf, key);
        put_bytes(buf, value);
        put_varint(buf, headers.len() as i64);
        for h in headers {
            put_bytes(buf, Some(&h.key));
            put_bytes(buf, h.value.as_deref());
        }
        self.count += 1;
    }

    /// Writes the finished batch (base offset 0) and returns its bytes.
    /// Uncompressed, the records stay where they were pushed and the header
    /// is written in front of them; compressed, they are compressed into a
    /// new buffer.
    pub fn seal(self, compression: Compression, producer: ProducerIdentity) -> Result<Bytes> {
        let mut out = match compression {
            Compression::None => {
                let mut buf = self.buf;
                if buf.is_empty() {
                    buf.resize(BATCH_HEADER_LEN, 0);
                }
                buf
            }
            _ => {
                let mut out = BytesMut::with_capacity(self.buf.len());
                out.resize(BATCH_HEADER_LEN, 0);
                compression.compress(
                    self.buf.get(BATCH_HEADER_LEN..).unwrap_or_default(),
                    &mut out,
                )?;
                out
            }
        };
        let mut header = &mut out[..BATCH_HEADER_LEN];
        header.put_i64(0);
        header.put_i32(0); // batchLength, set by `stamp`
        header.put_i32(-1); // partitionLeaderEpoch
        header.put_i8(2);
        header.put_u32(0); // crc, set by `stamp`
        header.put_i16(compression.id());
        header.put_i32(self.count - 1);
        header.put_i64(self.base_timestamp);
        header.put_i64(self.max_timestamp);
        header.put_i64(0); // producer id, epoch, base sequence: set by `stamp`
        header.put_i16(0);
        header.put_i32(0);
        header.put_i32(self.count);
        stamp(&mut out, producer);
        Ok(out.freeze())
    }
}

/// Sets the producer fields of a batch (id, epoch, base sequence, the
/// transactional flag), its length, and its CRC.
fn stamp(batch: &mut [u8], producer: ProducerIdentity) {
    let batch_len = (batch.len() - LOG_OVERHEAD) as i32;
    batch[8..12].copy_from_slice(&batch_len.to_be_bytes());
    let mut attributes =
        i16::from_be_bytes([batch[ATTRIBUTES_OFFSET], batch[ATTRIBUTES_OFFSET + 1]]);
    attributes &= !TRANSACTIONAL_FLAG;
    if producer.transactional {
        attributes |= TRANSACTIONAL_FLAG;
    }
    batch[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&attributes.to_be_bytes());
    batch[43..51].copy_from_slice(&producer.producer_id.to_be_bytes());
    batch[51..53].copy_from_slice(&producer.producer_epoch.to_be_bytes());
    batch[53..57].copy_from_slice(&producer.base_sequence.to_be_bytes());
    let crc = crc32c::crc32c(&batch[ATTRIBUTES_OFFSET..]);
    batch[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
}

/// A sealed batch with other producer fields (a new producer epoch's
/// sequence numbers): the same records, compressed or not, as a copy.
/// What the idempotent producer sends again instead of sealing a kept
/// builder anew, so it keeps each batch in memory once.
pub(crate) fn restamp(sealed: &Bytes, producer: ProducerIdentity) -> Bytes {
    let mut batch = BytesMut::from(&sealed[..]);
    if batch.len() >= BATCH_HEADER_LEN {
        stamp(&mut batch, producer);
    }
    batch.freeze()
}

/// One decoded RecordBatch: its header fields and its records, still
/// compressed if they were (they are decompressed a chunk at a time as they
/// are read, see [`Batch::records`]).
#[derive(Debug, Clone)]
pub struct Batch {
    /// Offset of the first record.
    pub base_offset: i64,
    /// Leader epoch stamped by the broker.
    pub partition_leader_epoch: i32,
    /// Raw attributes (compression, timestamp type, transactional, control).
    pub attributes: i16,
    /// `lastOffsetDelta`: the last offset is `base_offset + last_offset_delta`.
    pub last_offset_delta: i32,
    /// Timestamp of the first record.
    pub base_timestamp: i64,
    /// Largest timestamp in the batch.
    pub max_timestamp: i64,
    /// Producer id, -1 when not idempotent.
    pub producer_id: i64,
    /// Producer epoch.
    pub producer_epoch: i16,
    /// First sequence number.
    pub base_sequence: i32,
    /// Number of records the header declares.
    pub record_count: i32,
    /// The records as the batch carries them (compressed or not).
    body: Bytes,
}

impl Batch {
    /// Offset of the last record (records may have been compacted away before it).
    pub fn last_offset(&self) -> i64 {
        self.base_offset
            .saturating_add(self.last_offset_delta as i64)
    }

    /// Whether this is a control batch (transaction markers), never user data.
    pub fn is_control(&self) -> bool {
        self.attributes & CONTROL_FLAG != 0
    }

    /// Whether the batch belongs to a transaction.
    pub fn is_transactional(&self) -> bool {
        self.attributes & TRANSACTIONAL_FLAG != 0
    }

    /// Whether timestamps are the broker's log-append time.
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & 0x08 != 0
    }

    /// The codec the records are compressed with.
    pub fn compression(&self) -> Compression {
        // `BatchDecoder` hands out no batch with an unknown codec.
        Compression::from_id(self.attributes & COMPRESSION_MASK).unwrap_or_default()
    }

    /// The records of the batch, decoded lazily. Compressed records are
    /// decompressed a chunk of about [`CHUNK`](crate::compression::CHUNK)
    /// bytes at a time (a zstd frame beyond its window, which its decoder
    /// keeps); a record's key, value and headers share its chunk. Records
    /// that do not decompress are an error where they start; so is the last
    /// record when something is wrong after it (bytes left over, a bad
    /// checksum at the end of the compressed records).
    pub fn records(&self) -> RecordIter<'_> {
        RecordIter {
            batch: self,
            reader: Reader::new(self),
        }
    }

    /// The records of the batch, decoded lazily, by an iterator that owns
    /// the batch (so it can be kept, part read, between calls).
    pub fn into_records(self) -> IntoRecords {
        IntoRecords {
            reader: Reader::new(&self),
            batch: self,
        }
    }

    /// Bytes this batch keeps in memory: its header and its records as
    /// carried (compressed, if they are).
    pub(crate) fn held_size(&self) -> usize {
        BATCH_HEADER_LEN + self.body.len()
    }

    /// Copies the records out of the buffer they were decoded from, so
    /// keeping this batch does not keep that whole buffer alive.
    pub(crate) fn detach(&mut self) {
        self.body = Bytes::copy_from_slice(&self.body);
    }

    fn corrupt(&self, what: impl Into<String>) -> Error {
        Error::CorruptRecord {
            topic: None,
            partition: None,
            offset: self.base_offset,
            last_offset: Some(self.last_offset()),
            what: what.into(),
        }
    }
}

/// Iterates the records of a [`Batch`].
#[derive(Debug)]
pub struct RecordIter<'a> {
    batch: &'a Batch,
    reader: Reader,
}

impl Iterator for RecordIter<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        self.reader.next(self.batch)
    }
}

/// Iterates the records of a [`Batch`] it owns (see [`Batch::into_records`]).
#[derive(Debug)]
pub struct IntoRecords {
    batch: Batch,
    reader: Reader,
}

impl IntoRecords {
    /// The batch being read.
    pub fn batch(&self) -> &Batch {
        &self.batch
    }

    /// Decompressed bytes this iterator keeps (its chunk at hand and the
    /// rest of the next); 0 for uncompressed records, which are the
    /// batch's own bytes.
    pub(crate) fn decompressed_held(&self) -> usize {
        if self.batch.compression() == Compression::None {
            return 0;
        }
        let reader = &self.reader;
        reader.window.len()
            + reader.pending.as_ref().map_or(0, Bytes::len)
            + reader.source.as_ref().map_or(0, Decompressor::retained)
    }
}

impl Iterator for IntoRecords {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        self.reader.next(&self.batch)
    }
}

/// Where a [`RecordIter`] or [`IntoRecords`] is in its batch's records: the
/// decompressed bytes at hand (`window[pos..]`), then `pending`, then what
/// the decompressor has yet to give.
#[derive(Debug)]
struct Reader {
    window: Bytes,
    pos: usize,
    /// The rest of a chunk whose start went into a record that spans chunks.
    pending: Option<Bytes>,
    /// `None` for uncompressed records (the window is all of them), and
    /// once the decompressor has given everything.
    source: Option<Decompressor>,
    remaining: i32,
    /// Offset of the record before (`base_offset - 1` at the start).
    prev: i64,
}

/// The longest varint: a record's length is read once this much is at hand
/// (or all that is left).
const MAX_VARINT_LEN: usize = 10;

impl Reader {
    fn new(batch: &Batch) -> Reader {
        let (window, source) = match batch.compression() {
            Compression::None => (batch.body.clone(), None),
            codec => (
                Bytes::new(),
                Some(Decompressor::new(codec, batch.body.clone())),
            ),
        };
        Reader {
            window,
            pos: 0,
            pending: None,
            source,
            remaining: batch.record_count,
            prev: batch.base_offset.saturating_sub(1),
        }
    }

    fn next(&mut self, batch: &Batch) -> Option<Result<Record>> {
        let result = if self.remaining <= 0 {
            match self.end(batch) {
                Ok(()) => return None,
                Err(e) => Err(e),
            }
        } else {
            self.remaining -= 1;
            // The end of the records (bytes left over, a codec's trailing
            // checksum) is checked before the last record is handed out:
            // an error there stops at that record, where reading again
            // finds it again, not after the whole batch.
            self.decode_one(batch).and_then(|record| {
                if self.remaining == 0 {
                    self.end(batch)?;
                }
                Ok(record)
            })
        };
        if result.is_err() {
            // One corrupt record makes the rest of the batch unreadable.
            self.remaining = 0;
            self.pos = self.window.len();
            self.pending = None;
            self.source = None;
        }
        Some(result)
    }

    /// Checks that nothing follows the records the header declares (which
    /// reads a compressed stream to its end).
    fn end(&mut self, batch: &Batch) -> Result<()> {
        if self.fill(batch, 1)? {
            return Err(batch.corrupt(format!(
                "bytes left after the {} records the header declares",
                batch.record_count
            )));
        }
        Ok(())
    }

    /// Makes `need` bytes contiguous at `window[pos..]`, decompressing more
    /// as needed; false when the records end first. A record that spans
    /// chunks is copied, together with its start, into a window of its own.
    fn fill(&mut self, batch: &Batch, need: usize) -> Result<bool> {
        let mut joined: Option<BytesMut> = None;
        loop {
            let have = joined
                .as_ref()
                .map_or(self.window.len() - self.pos, BytesMut::len);
            if have >= need {
                break;
            }
            let chunk = match self.pending.take() {
                Some(chunk) => chunk,
                None => match self.source.as_mut().map(Decompressor::next_chunk) {
                    Some(Ok(Some(chunk))) => chunk,
                    Some(Ok(None)) | None => {
                        self.source = None;
                        break;
                    }
                    Some(Err(e)) => return Err(batch.corrupt(e)),
                },
            };
            if joined.is_none() && self.pos == self.window.len() {
                (self.window, self.pos) = (chunk, 0);
                continue;
            }
            let joined = joined.get_or_insert_with(|| BytesMut::from(&self.window[self.pos..]));
            let take = (need - joined.len()).min(chunk.len());
            joined.extend_from_slice(&chunk[..take]);
            if take < chunk.len() {
                self.pending = Some(chunk.slice(take..));
            }
        }
        if let Some(joined) = joined {
            (self.window, self.pos) = (joined.freeze(), 0);
        }
        Ok(self.window.len() - self.pos >= need)
    }

    fn decode_one(&mut self, batch: &Batch) -> Result<Record> {
        let (len, n) = match read_varint(&self.window[self.pos..]) {
            Some(varint) => varint,
            None => {
                // Cut by the end of a chunk, or truncated or overlong.
                self.fill(batch, MAX_VARINT_LEN)?;
                read_varint(&self.window[self.pos..])
                    .ok_or_else(|| batch.corrupt("truncated or overlong varint"))?
            }
        };
        if len < 0 || len as u64 > MAX_DECOMPRESSED as u64 {
            return Err(batch.corrupt(format!("record length {len} runs past the batch")));
        }
        if !self.fill(batch, n + len as usize)? {
            return Err(batch.corrupt(format!("record length {len} runs past the batch")));
        }
        let buf = &self.window;
        let mut cur = Cursor {
            buf,
            pos: self.pos + n,
            end: self.pos + n + len as usize,
            batch,
        };
        // Every field must lie inside the record's own length.
        let end = cur.end;
        let _attributes = cur.i8()?;
        let ts_delta = cur.varint()?;
        let offset_delta = cur.varint()?;
        let key = cur.bytes()?;
        let value = cur.bytes()?;
        let header_count = cur.varint()?;
        if header_count < 0 {
            return Err(batch.corrupt(format!("negative header count {header_count}")));
        }
        let mut headers = Vec::with_capacity((header_count as usize).min(end - cur.pos));
        for _ in 0..header_count {
            let key = cur
                .bytes()?
                .ok_or_else(|| batch.corrupt("null header key"))?;
            let value = cur.bytes()?;
            headers.push(Header { key, value });
        }
        if cur.pos != end {
            return Err(batch.corrupt(format!(
                "record declares {len} bytes but its fields end {} bytes early",
                end - cur.pos
            )));
        }
        self.pos = end;
        let timestamp = if batch.is_log_append_time() {
            batch.max_timestamp
        } else {
            batch.base_timestamp.wrapping_add(ts_delta)
        };
        let offset = batch
            .base_offset
            .checked_add(offset_delta)
            .ok_or_else(|| batch.corrupt(format!("offset delta {offset_delta} overflows")))?;
        // Offsets ascend inside the batch and end at its last offset; the
        // consumer's position is taken from the batch, so a record outside
        // that range would be handed out twice or skipped over.
        if offset <= self.prev || offset > batch.last_offset() {
            return Err(batch.corrupt(format!(
                "record offset {offset} outside {}..={} of the batch",
                self.prev.saturating_add(1),
                batch.last_offset()
            )));
        }
        self.prev = offset;
        Ok(Record {
            offset,
            timestamp,
            key,
            value,
            headers,
        })
    }
}

struct Cursor<'a> {
    buf: &'a Bytes,
    pos: usize,
    /// Reads stop here: the end of the current record.
    end: usize,
    batch: &'a Batch,
}

impl Cursor<'_> {
    fn i8(&mut self) -> Result<i8> {
        if self.pos >= self.end {
            return Err(self.batch.corrupt("record truncated"));
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b as i8)
    }

    fn varint(&mut self) -> Result<i64> {
        let (v, n) = read_varint(&self.buf[self.pos..self.end])
            .ok_or_else(|| self.batch.corrupt("truncated or overlong varint"))?;
        self.pos += n;
        Ok(v)
    }

    fn bytes(&mut self) -> Result<Option<Bytes>> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        if len as u64 > (self.end - self.pos) as u64 {
            return Err(self
                .batch
                .corrupt(format!("field of {len} bytes runs past its record")));
        }
        let end = self.pos + len as usize;
        let b = self.buf.slice(self.pos..end);
        self.pos = end;
        Ok(Some(b))
    }
}

/// Splits a buffer of concatenated RecordBatches (a Fetch response's `records`)
/// into batches.
///
/// Stops without error at a truncated trailing batch; [`BatchDecoder::truncated`]
/// then says so. A batch with a bad CRC, an unknown magic or an unsupported
/// compression codec is an error.
#[derive(Debug)]
pub struct BatchDecoder {
    buf: Bytes,
    check_crc: bool,
    truncated: bool,
    /// The offset after the last batch decoded: the next must not start before.
    next_offset: Option<i64>,
}

impl BatchDecoder {
    /// A decoder over `buf`; `check_crc` verifies each batch's CRC-32C.
    pub fn new(buf: Bytes, check_crc: bool) -> Self {
        BatchDecoder {
            buf,
            check_crc,
            truncated: false,
            next_offset: None,
        }
    }

    /// Whether decoding stopped at an incomplete trailing batch.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    fn decode_next(&mut self) -> Result<Option<Batch>> {
        let buf = &self.buf;
        if buf.len() < LOG_OVERHEAD {
            self.truncated = !buf.is_empty();
            return Ok(None);
        }
        let mut hdr = &buf[..];
        let base_offset = hdr.get_i64();
        let batch_len = hdr.get_i32();
        let corrupt = |what: String| Error::CorruptRecord {
            topic: None,
            partition: None,
            offset: base_offset,
            last_offset: None,
            what,
        };
        if batch_len < (BATCH_HEADER_LEN - LOG_OVERHEAD) as i32 {
            return Err(corrupt(format!("batch length {batch_len} is too small")));
        }
        let total = LOG_OVERHEAD + batch_len as usize;
        if buf.len() < total {
            self.truncated = true;
            return Ok(None);
        }
        // The base offset is outside the CRC; offsets handed out must ascend.
        if let Some(next) = self.next_offset.filter(|&next| base_offset < next) {
            return Err(corrupt(format!(
                "batch at offset {base_offset} starts before {next}, where the batch before it ended"
            )));
        }
        let this = self.buf.split_to(total);
        let mut hdr = &this[LOG_OVERHEAD..];
        let partition_leader_epoch = hdr.get_i32();
        let magic = hdr.get_i8();
        if magic != 2 {
            return Err(corrupt(format!(
                "message format magic {magic} is not supported (only v2)"
            )));
        }
        let crc = hdr.get_u32();
        if self.check_crc {
            let actual = crc32c::crc32c(&this[ATTRIBUTES_OFFSET..]);
            if actual != crc {
                return Err(corrupt(format!(
                    "CRC mismatch: batch says {crc:#010x}, bytes give {actual:#010x}"
                )));
            }
        }
        let attributes = hdr.get_i16();
        let last_offset_delta = hdr.get_i32();
        // The header is trusted from here when its CRC was checked.
        let checked = self.check_crc;
        let corrupt = |what: String| Error::CorruptRecord {
            topic: None,
            partition: None,
            offset: base_offset,
            last_offset: checked.then(|| base_offset.saturating_add(i64::from(last_offset_delta))),
            what,
        };
        let base_timestamp = hdr.get_i64();
        let max_timestamp = hdr.get_i64();
        let producer_id = hdr.get_i64();
        let producer_epoch = hdr.get_i16();
        let base_sequence = hdr.get_i32();
        let record_count = hdr.get_i32();
        if record_count < 0 {
            return Err(corrupt(format!("negative record count {record_count}")));
        }
        if last_offset_delta < 0 {
            return Err(corrupt(format!(
                "negative last offset delta {last_offset_delta}"
            )));
        }
        if Compression::from_id(attributes & COMPRESSION_MASK).is_none() {
            return Err(corrupt(format!(
                "compression codec {} is unknown (known: none, gzip, snappy, lz4, zstd)",
                attributes & COMPRESSION_MASK
            )));
        }
        self.next_offset = Some(
            base_offset
                .saturating_add(i64::from(last_offset_delta))
                .saturating_add(1),
        );
        Ok(Some(Batch {
            base_offset,
            partition_leader_epoch,
            attributes,
            last_offset_delta,
            base_timestamp,
            max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            record_count,
            body: this.slice(BATCH_HEADER_LEN..),
        }))
    }
}

impl Iterator for BatchDecoder {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        match self.decode_next() {
            Ok(Some(b)) => Some(Ok(b)),
            Ok(None) => None,
            Err(e) => {
                // The rest of the buffer cannot be trusted after a bad batch.
                self.buf.clear();
                Some(Err(e))
            }
        }
    }
}

/// Number of bytes of a zigzag varint.
pub(crate) fn varint_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn bytes_len(b: Option<&[u8]>) -> usize {
    match b {
        None => 1,
        Some(b) => varint_len(b.len() as i64) + b.len(),
    }
}

/// Writes a zigzag varint (Kafka's `varint` and `varlong`).
pub(crate) fn put_varint(buf: &mut impl BufMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

fn put_bytes(buf: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => put_varint(buf, -1),
        Some(b) => {
            put_varint(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
    }
}

/// Reads a zigzag varint; `None` when truncated or longer than 10 bytes.
pub(crate) fn read_varint(buf: &[u8]) -> Option<(i64, usize)> {
    let mut z: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(10) {
        z |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            let v = ((z >> 1) as i64) ^ -((z & 1) as i64);
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sealed batch stamped with other producer fields is that batch
    /// sealed with them, byte for byte, whatever its codec; it decodes with
    /// its CRC checked and carries the new fields.
    #[test]
    fn a_restamped_batch_is_the_batch_sealed_with_its_fields() {
        let build = || {
            let mut b = BatchBuilder::new(64);
            for i in 0..20i64 {
                let key = format!("key-{i}");
                b.push(1_000 + i, Some(key.as_bytes()), Some(b"value"), &[]);
            }
            b
        };
        let first = ProducerIdentity {
            producer_id: 7,
            producer_epoch: 1,
            base_sequence: 0,
            transactional: false,
        };
        let next = ProducerIdentity {
            producer_id: 9,
            producer_epoch: 4,
            base_sequence: 1234,
            transactional: true,
        };
        for compression in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let sealed = build().seal(compression, first).unwrap();
            let restamped = restamp(&sealed, next);
            assert_eq!(
                restamped,
                build().seal(compression, next).unwrap(),
                "{compression:?}"
            );
            let batch = BatchDecoder::new(restamped, true).next().unwrap().unwrap();
            assert_eq!(
                (batch.producer_id, batch.producer_epoch, batch.base_sequence),
                (9, 4, 1234)
            );
            assert!(batch.is_transactional());
            assert_eq!(batch.records().count(), 20);
        }
    }

    fn sample(n: usize, compression: Compression) -> Bytes {
        let mut b = BatchBuilder::new(64);
        for i in 0..n {
            let key = format!("key-{i}");
            let value = format!("{i}:{}", "x".repeat(i % 50));
            let headers = [Header::new("h", format!("{i}")), Header::new("h", "dup")];
            b.push(
                1_000 + i as i64,
                Some(key.as_bytes()),
                Some(value.as_bytes()),
                &headers,
            );
        }
        b.seal(compression, ProducerIdentity::default()).unwrap()
    }

    fn decode_all(bytes: Bytes) -> Vec<Record> {
        let mut out = vec![];
        for batch in BatchDecoder::new(bytes, true) {
            for r in batch.unwrap().records() {
                out.push(r.unwrap());
            }
        }
        out
    }

    fn check_sample(records: &[Record], n: usize) {
        assert_eq!(records.len(), n);
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r.offset, i as i64);
            assert_eq!(r.timestamp, 1_000 + i as i64);
            assert_eq!(r.key.as_deref(), Some(format!("key-{i}").as_bytes()));
            assert_eq!(
                r.value.as_deref(),
                Some(format!("{i}:{}", "x".repeat(i % 50)).as_bytes())
            );
            assert_eq!(r.headers.len(), 2, "duplicate header keys are both kept");
            assert_eq!(
                r.headers[0].value.as_deref(),
                Some(format!("{i}").as_bytes())
            );
            assert_eq!(r.headers[1].value.as_deref(), Some(&b"dup"[..]));
        }
    }

    /// Records survive an encode/decode round trip uncompressed.
    #[test]
    fn batch_round_trips_without_compression() {
        check_sample(&decode_all(sample(500, Compression::None)), 500);
    }

    /// Records survive an encode/decode round trip through lz4 frames.
    #[test]
    fn batch_round_trips_with_lz4() {
        let plain = sample(500, Compression::None);
        let lz4 = sample(500, Compression::Lz4);
        assert!(
            lz4.len() < plain.len() / 2,
            "lz4 should compress the sample"
        );
        check_sample(&decode_all(lz4), 500);
    }

    /// LZ4 frames written by the reference `lz4` tool (v1.9.4: default options;
    /// linked blocks with block and content checksums and content size; level 9)
    /// decode to the records the batch builder encodes.
    #[test]
    fn lz4_frames_from_the_reference_tool_decode() {
        let frames: [&[u8]; 3] = [
            include_bytes!("../tests/data/records-default.lz4"),
            include_bytes!("../tests/data/records-linked-checksums.lz4"),
            include_bytes!("../tests/data/records-hc.lz4"),
        ];
        let plain = sample(300, Compression::None);
        for frame in frames {
            let mut b = BytesMut::from(&plain[..BATCH_HEADER_LEN]);
            b.extend_from_slice(frame);
            b[ATTRIBUTES_OFFSET..ATTRIBUTES_OFFSET + 2].copy_from_slice(&3i16.to_be_bytes());
            let len = (b.len() - LOG_OVERHEAD) as i32;
            b[8..12].copy_from_slice(&len.to_be_bytes());
            let crc = crc32c::crc32c(&b[ATTRIBUTES_OFFSET..]);
            b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_be_bytes());
            check_sample(&decode_all(b.freeze()), 300);
        }
    }

    /// Null keys, null values and empty values are distinguished.
    #[test]
    fn null_and_empty_fields_are_distinct() {
        let mut b = BatchBuilder::new(16);
        b.push(5, None, None, &[]);
        b.push(
            6,
            Some(b""),
            Some(b""),
            &[Header {
                key: Bytes::from_static(b"k"),
                value: None,
            }],
        );
        let recs = decode_all(
            b.seal(Compression::None, ProducerIdentity::default())
                .unwrap(),
        );
        assert_eq!(recs[0].key, None);
        assert_eq!(recs[0].value, None);
        assert_eq!(recs[1].key.as_deref(), Some(&b""[..]));
        assert_eq!(recs[1].value.as_deref(), Some(&b""[..]));
        assert_eq!(recs[1].headers[0].value, None);
    }

    /// A buffer cut inside its last batch yields the complete batches and flags truncation.
    #[test]
    fn truncated_trailing_batch_is_not_an_error() {
        let first = sample(10, Compression::None);
        let second = sample(10, Compression::Lz4);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&first);
        buf.extend_from_slice(&second[..second.len() - 7]);
        let mut dec = BatchDecoder::new(buf.freeze(), true);
        let batches: Vec<_> = dec.by_ref().collect::<Result<_>>().unwrap();
        assert_eq!(batches.len(), 1);
        assert!(dec.truncated());
        // Also when even the 12-byte prefix is incomplete.
        let mut dec = BatchDecoder::new(first.slice(..5), true);
        assert!(dec.next().is_none());
        assert!(dec.truncated());
    }

    /// A flipped bit fails the CRC check with an error naming the batch's offset.
    #[test]
    fn corrupted_batch_fails_crc() {
        let mut bytes = BytesMut::from(&sample(10, Compression::None)[..]);
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        let err = BatchDecoder::new(bytes.freeze(), true)
            .next()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("CRC mismatch"), "{err}");
    }

    /// Garbage inside a batch whose CRC is skipped still gives errors, not panics.
    #[test]
    fn garbage_records_give_errors_not_panics() {
        let good = sample(20, Compression::None);
        let mut errors = 0;
        for cut in BATCH_HEADER_LEN..good.len() {
            let mut bytes = BytesMut::from(&good[..]);
            for b in bytes[cut..].iter_mut() {
                *b = 0xff;
            }
            let mut here = 0;
            for batch in BatchDecoder::new(bytes.freeze(), false).flatten() {
                here += batch.records().filter(Result::is_err).count();
            }
            assert!(here <= 1, "decoding goes on after a corrupt record");
            errors += here;
        }
        // 0xff bytes are overlong varints wherever a length or delta is read;
        // only cuts inside the last header's value bytes can go unnoticed
        // (which is what the CRC is for).
        let cuts = good.len() - BATCH_HEADER_LEN;
        assert!(errors >= cuts - 8, "{errors} errors for {cuts} corruptions");
        let lz4 = sample(20, Compression::Lz4);
        let mut bytes = BytesMut::from(&lz4[..]);
        bytes[BATCH_HEADER_LEN + 10] ^= 0xff;
        let res: Result<Vec<Batch>> = BatchDecoder::new(bytes.freeze(), false).collect();
        assert!(res.is_err() || res.unwrap()[0].records().any(|r| r.is_err()));
    }

    /// A batch that decompresses to many chunks is read a chunk at a time:
    /// every record comes back whole (those spanning chunks, and one larger
    /// than several chunks, included), while the reader never holds much
    /// more than a chunk and the largest record, not the batch.
    #[test]
    fn a_compressed_batch_is_read_a_chunk_at_a_time() {
        // About 4 MiB of compressible values of uneven sizes, and one of
        // 300 KiB in the middle.
        let big = 300 << 10;
        let value = |i: usize| {
            let len = if i == 10_000 { big } else { 1 + i * 37 % 500 };
            vec![b'a' + (i % 26) as u8; len]
        };
        let n = 20_000;
        let build = || {
            let mut b = BatchBuilder::new(64);
            for i in 0..n {
                b.push(
                    i as i64,
                    Some(format!("k{i}").as_bytes()),
                    Some(&value(i)),
                    &[],
                );
            }
            b
        };
        let whole = build().size();
        assert!(whole > 4 << 20, "{whole} bytes");
        // librdkafka's snappy: the records in one raw block, no framing.
        let raw_snappy = {
            let plain = build().seal(Compression::None, ProducerIdentity::default());
            let plain = plain.unwrap();
            let mut batch = BytesMut::from(&plain[..BATCH_HEADER_LEN]);
            let records = &plain[BATCH_HEADER_LEN..];
            batch.extend_from_slice(&snap::raw::Encoder::new().compress_vec(records).unwrap());
            batch[ATTRIBUTES_OFFSET + 1] |= Compression::Snappy.id() as u8;
            stamp(&mut batch, ProducerIdentity::default());
            ("raw snappy".to_owned(), Compression::Snappy, batch.freeze())
        };
        let codecs = [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ];
        let sealed = codecs.map(|c| {
            let sealed = build().seal(c, ProducerIdentity::default()).unwrap();
            (c.to_string(), c, sealed)
        });
        for (name, codec, sealed) in sealed.into_iter().chain([raw_snappy]) {
            let codec_name = &name;
            assert!(
                sealed.len() < whole / 8,
                "{codec_name}: {} bytes",
                sealed.len()
            );
            let batch = BatchDecoder::new(sealed, true).next().unwrap().unwrap();
            let mut records = batch.into_records();
            let (mut read, mut most_held) = (0, 0);
            while let Some(record) = records.next() {
                let record = record.unwrap();
                assert_eq!(record.offset, read as i64, "{codec_name}");
                assert_eq!(record.key.as_deref(), Some(format!("k{read}").as_bytes()));
                assert!(
                    record.value.as_deref() == Some(&value(read)[..]),
                    "{codec_name}: record {read}"
                );
                most_held = most_held.max(records.decompressed_held());
                read += 1;
            }
            assert_eq!(read, n, "{codec_name}");
            eprintln!("{codec_name}: {whole} bytes read holding at most {most_held}");
            assert!(most_held > 0, "{codec_name}");
            // zstd also keeps the frame's window of history (1 MiB as Strom writes it).
            let window = if codec == Compression::Zstd {
                1 << 20
            } else {
                0
            };
            // Chunks of 64 KiB: the largest record and a few chunks beside it.
            let bound = big + (256 << 10) + window;
            assert!(most_held <= bound, "{codec_name}: held {most_held} bytes");
        }
    }

    /// The end of a batch's records is checked before its last record is
    /// handed out, so an error there stops at a record that reading again
    /// finds again: bytes left over after the declared count fail the last
    /// record, and a compressed stream whose end is bad (gzip's trailing
    /// CRC) fails in its last chunk, before the batch's last record.
    #[test]
    fn a_bad_end_of_the_records_is_found_before_the_last_record() {
        let mut bytes = BytesMut::from(&sample(5, Compression::None)[..]);
        bytes[57..61].copy_from_slice(&4i32.to_be_bytes()); // record count
        let batch = BatchDecoder::new(bytes.freeze(), false)
            .next()
            .unwrap()
            .unwrap();
        let results: Vec<_> = batch.records().collect();
        assert_eq!(results.len(), 4);
        assert!(results[..3].iter().all(Result::is_ok));
        let e = results[3].as_ref().unwrap_err().to_string();
        assert!(e.contains("bytes left after the 4 records"), "{e}");

        let mut bytes = BytesMut::from(&sample(3_000, Compression::Gzip)[..]);
        let len = bytes.len();
        bytes[len - 6] ^= 0xff; // in the CRC-32 of gzip's trailer
        let batch = BatchDecoder::new(bytes.freeze(), false)
            .next()
            .unwrap()
            .unwrap();
        let results: Vec<_> = batch.records().collect();
        let good = results.iter().take_while(|r| r.is_ok()).count();
        assert!(good > 0 && good < 3_000, "{good} records before the error");
        assert_eq!(results.len(), good + 1, "one error, then nothing");
        let e = results[good].as_ref().unwrap_err().to_string();
        assert!(e.contains("gzip decompression failed"), "{e}");
    }

    /// Frames of lz4 one after another are all read, also when one ends
    /// exactly at a chunk's end.
    #[test]
    fn consecutive_lz4_frames_are_read() {
        use crate::compression::{Decompressor, CHUNK};
        let (a, b) = (vec![1u8; CHUNK], vec![2u8; 1000]);
        let mut input = BytesMut::new();
        Compression::Lz4.compress(&a, &mut input).unwrap();
        Compression::Lz4.compress(&b, &mut input).unwrap();
        let mut chunks = Decompressor::new(Compression::Lz4, input.freeze());
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next_chunk().unwrap() {
            out.extend_from_slice(&chunk);
        }
        assert_eq!(out, [a, b].concat());
    }

    /// An unknown codec id, and records that do not decompress with the
    /// codec the batch names, are errors that say so.
    #[test]
    fn unknown_and_mismatched_codecs_are_named() {
        for (id, expected) in [(5, "codec 5 is unknown"), (4, "zstd decompression failed")] {
            let mut bytes = BytesMut::from(&sample(3, Compression::None)[..]);
            bytes[ATTRIBUTES_OFFSET + 1] = id;
            // An unknown codec fails the batch; records that do not
            // decompress fail where they start.
            let err = match BatchDecoder::new(bytes.freeze(), false).next().unwrap() {
                Err(e) => e,
                Ok(batch) => batch.records().next().unwrap().unwrap_err(),
            };
            assert!(err.to_string().contains(expected), "{err}");
        }
    }

    /// Varints round-trip at their boundaries and overlong ones are rejected.
    #[test]
    fn varints_round_trip() {
        for v in [
            0i64,
            1,
            -1,
            63,
            -64,
            64,
            300,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut buf = BytesMut::new();
            put_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v));
            assert_eq!(read_varint(&buf), Some((v, buf.len())));
        }
        assert_eq!(read_varint(&[0x80; 11]), None);
        assert_eq!(read_varint(&[0x80]), None);
    }

    /// `record_size` never underestimates what `push` writes.
    #[test]
    fn record_size_is_an_upper_bound() {
        let mut b = BatchBuilder::new(0);
        let before = b.records().len();
        b.push(0, Some(b"key"), Some(&[7u8; 300]), &[Header::new("a", "b")]);
        let used = b.records().len() - before;
        assert!(
            used <= BatchBuilder::record_size(
                Some(b"key"),
                Some(&[7u8; 300]),
                &[Header::new("a", "b")]
            )
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        type Fields = (
            i64,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Vec<(Vec<u8>, Option<Vec<u8>>)>,
        );

        fn record() -> impl Strategy<Value = Fields> {
            (
                -1_000_000i64..1_000_000,
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..512)),
                proptest::collection::vec(
                    (
                        proptest::collection::vec(any::<u8>(), 0..8),
                        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..16)),
                    ),
                    0..4,
                ),
            )
        }

        proptest! {
            // Each case compresses up to 3 MB (in a debug build).
            #![proptest_config(ProptestConfig::with_cases(32))]

            /// Records over many decompressed chunks, of any sizes (so a
            /// record, or its length, is cut by a chunk's end anywhere; some
            /// span several chunks) come back whole in every codec.
            #[test]
            fn records_across_chunks_round_trip(
                records in proptest::collection::vec((0usize..300, 0usize..150_000, any::<u8>()), 1..24),
                codec in 1i16..5,
            ) {
                let mut b = BatchBuilder::new(0);
                let value = |len: usize, byte: u8| -> Vec<u8> {
                    (0..len).map(|i| byte.wrapping_add((i / 1000) as u8)).collect()
                };
                for (i, (key_len, len, byte)) in records.iter().enumerate() {
                    b.push(i as i64, Some(&vec![b'k'; *key_len]), Some(&value(*len, *byte)), &[]);
                }
                let compression = Compression::from_id(codec).unwrap();
                let decoded = decode_all(b.seal(compression, ProducerIdentity::default()).unwrap());
                prop_assert_eq!(decoded.len(), records.len());
                for (r, (key_len, len, byte)) in decoded.iter().zip(&records) {
                    prop_assert_eq!(r.key.as_ref().map(Bytes::len), Some(*key_len));
                    prop_assert!(r.value.as_deref() == Some(&value(*len, *byte)[..]));
                }
            }
        }

        proptest! {
            /// Any records (null or empty keys and values, duplicate headers,
            /// timestamps before the first) survive every codec unchanged.
            #[test]
            fn any_records_round_trip(records in proptest::collection::vec(record(), 1..40), codec in 0i16..5) {
                let base = 1_700_000_000_000i64;
                let mut b = BatchBuilder::new(0);
                for (ts, key, value, headers) in &records {
                    let headers: Vec<Header> = headers
                        .iter()
                        .map(|(k, v)| Header { key: Bytes::copy_from_slice(k), value: v.as_deref().map(Bytes::copy_from_slice) })
                        .collect();
                    b.push(base + ts, key.as_deref(), value.as_deref(), &headers);
                }
                let compression = Compression::from_id(codec).unwrap();
                let decoded = decode_all(b.seal(compression, ProducerIdentity::default()).unwrap());
                prop_assert_eq!(decoded.len(), records.len());
                for (i, (r, (ts, key, value, headers))) in decoded.iter().zip(&records).enumerate() {
                    prop_assert_eq!(r.offset, i as i64);
                    prop_assert_eq!(r.timestamp, base + ts);
                    prop_assert_eq!(r.key.as_deref(), key.as_deref());
                    prop_assert_eq!(r.value.as_deref(), value.as_deref());
                    prop_assert_eq!(r.headers.len(), headers.len());
                    for (h, (k, v)) in r.headers.iter().zip(headers) {
                        prop_assert_eq!(&h.key[..], &k[..]);
                        prop_assert_eq!(h.value.as_deref(), v.as_deref());
                    }
                }
            }

            /// A valid batch with random bytes overwritten never panics the
            /// decoder (CRC off, so the damage reaches the record parser).
            #[test]
            fn damaged_batches_never_panic(
                damage in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                codec in 0i16..5,
            ) {
                let compression = Compression::from_id(codec).unwrap();
                let mut bytes = BytesMut::from(&sample(30, compression)[..]);
                let len = bytes.len();
                for (at, byte) in damage {
                    bytes[at % len] = byte;
                }
                for batch in BatchDecoder::new(bytes.freeze(), false).flatten() {
                    prop_assert!(batch.records().take(10_000).count() <= 31);
                }
            }
        }
    }
}
