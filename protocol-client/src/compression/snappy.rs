//! Reading a raw snappy block a chunk at a time.
//!
//! librdkafka compresses a whole batch into one raw snappy block (no xerial
//! framing), which `snap` can only decompress whole: a 1 MB batch of
//! repetitive records becomes up to 21 MB held at once. [`RawBlock`] hands
//! the block out in chunks of about [`CHUNK`] bytes instead.
//!
//! The format (google/snappy's `format_description.txt`): the decompressed
//! length as a varint, then elements. A literal copies bytes from the
//! input; a copy repeats 1 to 64 bytes from `offset` bytes back in the
//! output (overlapping itself when the offset is shorter than the length).
//! Every snappy compressor in use (google's, librdkafka's port, snappy-java,
//! `snap`) compresses 64 KiB blocks independently, so its copies reach at
//! most 64 KiB back: the chunk handed out before the current one is all the
//! history kept. A block whose copy reaches further, which the format
//! allows, is decompressed whole from there on, as before; so is a block
//! of up to [`WHOLE`] bytes, which `snap` does faster.

use bytes::Bytes;

use super::CHUNK;

/// Snappy expands at most about 21:1 (a 2-byte copy of 64 bytes): a block
/// whose header promises more is forged.
const MAX_EXPANSION: usize = 22;

/// Blocks up to this size are decompressed whole, by `snap`, which
/// decodes about a third faster than [`RawBlock`] streams.
const WHOLE: usize = 4 * CHUNK;

/// One raw snappy block being decompressed.
pub(super) struct RawBlock {
    input: Bytes,
    /// Where the next element (or the rest of a literal) starts in `input`.
    pos: usize,
    /// Bytes of a literal at `pos` not copied yet (cut at a chunk's end).
    literal: usize,
    /// The decompressed length the block's header gives.
    expected: usize,
    /// Bytes handed out so far.
    produced: usize,
    /// The chunk handed out last: what a copy at the start of the next one
    /// may reach back into.
    history: Bytes,
    /// The rest of the block decompressed whole (a small block, or a copy
    /// reached past `history`), handed out [`WHOLE`] bytes at a time.
    rest: Option<Bytes>,
}

/// One element of a raw snappy block.
enum Element {
    /// `len` bytes of input follow the element's `header` bytes.
    Literal { header: usize, len: usize },
    /// `len` bytes from `offset` back; the element is `header` bytes.
    Copy {
        header: usize,
        len: usize,
        offset: usize,
    },
}

impl RawBlock {
    /// A block to decompress; an error if its header is damaged, forged or
    /// gives more than `limit` bytes. Decompressed whole when it is small.
    pub(super) fn new(input: Bytes, limit: usize) -> Result<RawBlock, String> {
        let mut block = RawBlock::streaming(input, limit)?;
        if block.expected <= WHOLE {
            block.rest = Some(block.decompress_whole()?);
        }
        Ok(block)
    }

    /// A block to decompress a chunk at a time, whatever its size.
    fn streaming(input: Bytes, limit: usize) -> Result<RawBlock, String> {
        let (expected, header) = varint(&input).ok_or("the snappy length header is damaged")?;
        if expected > limit {
            return Err(format!("the records decompress to more than {limit} bytes"));
        }
        if expected > input.len().saturating_mul(MAX_EXPANSION).saturating_add(64) {
            return Err(format!(
                "a snappy block of {} bytes claims {expected} bytes decompressed",
                input.len()
            ));
        }
        Ok(RawBlock {
            input,
            pos: header,
            literal: 0,
            expected,
            produced: 0,
            history: Bytes::new(),
            rest: None,
        })
    }

    /// The next chunk (never empty: about [`CHUNK`] bytes streamed, up to
    /// [`WHOLE`] of a block decompressed whole), or `None` once the block is
    /// read and gave exactly the length its header says.
    pub(super) fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        if let Some(rest) = &mut self.rest {
            let piece = rest.split_to(rest.len().min(WHOLE));
            self.produced += piece.len();
            return Ok((!piece.is_empty()).then_some(piece));
        }
        let mut out = Vec::with_capacity(CHUNK.min(self.expected - self.produced) + 64);
        while out.len() < CHUNK {
            if self.literal > 0 {
                let n = self.literal.min(CHUNK - out.len());
                out.extend_from_slice(&self.input[self.pos..self.pos + n]);
                (self.pos, self.literal) = (self.pos + n, self.literal - n);
                continue;
            }
            if self.pos == self.input.len() {
                break;
            }
            let written = self.produced + out.len();
            match element(&self.input[self.pos..]).ok_or("a snappy element is cut short")? {
                Element::Literal { header, len } => {
                    if self.input.len() - self.pos - header < len {
                        return Err("a snappy literal runs past the block's end".into());
                    }
                    if written + len > self.expected {
                        return Err(self.overrun());
                    }
                    (self.pos, self.literal) = (self.pos + header, len);
                }
                Element::Copy {
                    header,
                    len,
                    offset,
                } => {
                    if offset == 0 || offset > written {
                        return Err(format!(
                            "a snappy copy reaches {offset} bytes back, {written} are written"
                        ));
                    }
                    if written + len > self.expected {
                        return Err(self.overrun());
                    }
                    if offset > out.len() + self.history.len() {
                        return self.whole(out);
                    }
                    copy(&mut out, &self.history, offset, len);
                    self.pos += header;
                }
            }
        }
        if out.is_empty() {
            if self.produced != self.expected {
                return Err(format!(
                    "a snappy block gives {} bytes, its header says {}",
                    self.produced, self.expected
                ));
            }
            return Ok(None);
        }
        self.produced += out.len();
        self.history = Bytes::from(out);
        Ok(Some(self.history.clone()))
    }

    fn overrun(&self) -> String {
        format!(
            "a snappy block gives more than the {} bytes its header says",
            self.expected
        )
    }

    /// Decompresses the whole block (a copy reaches further back than the
    /// history kept) and hands out what follows `out`'s start: `out` now,
    /// the rest as the next chunks.
    fn whole(&mut self, out: Vec<u8>) -> Result<Option<Bytes>, String> {
        let all = self.decompress_whole()?;
        let start = self.produced + out.len();
        self.rest = Some(all.slice(start..));
        if out.is_empty() {
            return self.next_chunk();
        }
        self.produced += out.len();
        Ok(Some(all.slice(start - out.len()..start)))
    }

    /// The whole block decompressed by `snap`; nothing is left to stream.
    fn decompress_whole(&mut self) -> Result<Bytes, String> {
        let mut all = vec![0; self.expected];
        snap::raw::Decoder::new()
            .decompress(&self.input, &mut all)
            .map_err(|e| e.to_string())?;
        (self.input, self.pos, self.literal) = (Bytes::new(), 0, 0);
        Ok(Bytes::from(all))
    }
}

/// `block` streamed a chunk at a time whatever its size, each chunk
/// checked to be at most [`WHOLE`] bytes (about [`CHUNK`] until a copy
/// reaches past the history), put together (for the fuzz target and the
/// tests).
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn stream(block: &[u8]) -> Result<Vec<u8>, String> {
    let limit = super::MAX_DECOMPRESSED;
    let mut raw = RawBlock::streaming(Bytes::copy_from_slice(block), limit)?;
    let mut out = vec![];
    while let Some(chunk) = raw.next_chunk()? {
        assert!(chunk.len() <= WHOLE, "a chunk of {} bytes", chunk.len());
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// What `snap` decodes `block` to, whole; `None` when its header claims more
/// than any snappy block of its size can give (`snap` would allocate it all
/// before finding out), which the stream refuses at once.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn snap_decode(block: &[u8]) -> Option<Result<Vec<u8>, snap::Error>> {
    let claimed = snap::raw::decompress_len(block).unwrap_or(0);
    (claimed <= block.len().saturating_mul(MAX_EXPANSION).saturating_add(64))
        .then(|| snap::raw::Decoder::new().decompress_vec(block))
}

/// Appends `len` bytes found `offset` bytes back, in `out` and, before it,
/// in `history`; byte by byte where the copy overlaps itself, as snappy
/// defines it. `offset` is at most `out.len() + history.len()`.
fn copy(out: &mut Vec<u8>, history: &[u8], offset: usize, len: usize) {
    if offset > out.len() {
        // Reaches back past this chunk's start, into the last one.
        let first = history.len() - (offset - out.len());
        for from in first..first + len {
            let byte = match history.get(from) {
                Some(&b) => b,
                None => out[from - history.len()],
            };
            out.push(byte);
        }
        return;
    }
    let start = out.len() - offset;
    if offset >= len {
        out.extend_from_within(start..start + len);
        return;
    }
    // A repeat: the pattern of `offset` bytes, as often as it fits.
    let mut left = len;
    while left > 0 {
        let n = left.min(offset);
        let from = out.len() - offset;
        out.extend_from_within(from..from + n);
        left -= n;
    }
}

/// The element at the start of `input`, or `None` if it is cut short.
fn element(input: &[u8]) -> Option<Element> {
    let tag = *input.first()?;
    let le = |n: usize| -> Option<usize> {
        let bytes = input.get(1..1 + n)?;
        Some(bytes.iter().rev().fold(0, |v, &b| v << 8 | b as usize))
    };
    Some(match tag & 3 {
        0 => {
            let short = (tag >> 2) as usize;
            let (header, len) = match short {
                0..=59 => (1, short + 1),
                // 60..63: the length - 1 in the next 1 to 4 bytes.
                _ => {
                    let n = short - 59;
                    (1 + n, le(n)?.checked_add(1)?)
                }
            };
            Element::Literal { header, len }
        }
        1 => Element::Copy {
            header: 2,
            len: 4 + ((tag >> 2) & 7) as usize,
            offset: ((tag as usize >> 5) << 8) | *input.get(1)? as usize,
        },
        2 => Element::Copy {
            header: 3,
            len: 1 + (tag >> 2) as usize,
            offset: le(2)?,
        },
        _ => Element::Copy {
            header: 5,
            len: 1 + (tag >> 2) as usize,
            offset: le(4)?,
        },
    })
}

/// A little-endian base-128 varint of at most 32 bits, and its length.
fn varint(input: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0u64;
    for (i, &b) in input.iter().take(5).enumerate() {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return u32::try_from(value).ok().map(|v| (v as usize, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::tests::text;
    use super::*;
    use proptest::prelude::*;

    /// The chunks of `block`, streamed whatever its size.
    fn chunks(block: &[u8]) -> Result<Vec<Bytes>, String> {
        let limit = super::super::MAX_DECOMPRESSED;
        let mut raw = RawBlock::streaming(Bytes::copy_from_slice(block), limit)?;
        let mut out = vec![];
        while let Some(chunk) = raw.next_chunk()? {
            out.push(chunk);
        }
        Ok(out)
    }

    /// A block of 4 MB of records comes back whole, in chunks of about
    /// [`CHUNK`] bytes (a copy may run up to 64 bytes past).
    #[test]
    fn a_big_block_is_read_a_chunk_at_a_time() {
        let data = text(120_000);
        assert!(data.len() > 3_000_000);
        let block = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        let chunks = chunks(&block).unwrap();
        assert!(chunks.iter().all(|c| c.len() <= CHUNK + 64));
        assert!(chunks.len() > data.len() / (CHUNK + 64));
        assert_eq!(chunks.concat(), data);
    }

    /// A copy reaching further back than the last chunk (allowed by the
    /// format, written by no compressor in use) is read, from the whole
    /// block decompressed, handed out [`WHOLE`] bytes at a time.
    #[test]
    fn a_copy_beyond_the_history_is_read_whole() {
        let literal: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let copies = 5_000;
        let mut block = literal_block(literal.len() + 64 * (1 + copies), &literal);
        // A copy of 64 bytes from 190,000 back (4-byte offset).
        block.push(63 << 2 | 3);
        block.extend_from_slice(&190_000u32.to_le_bytes());
        let mut want = literal.clone();
        want.extend_from_within(10_000..10_064);
        // Then 320,000 bytes more, 1,000 bytes back each time.
        for _ in 0..copies {
            block.extend(copy2(64, 1_000));
            let from = want.len() - 1_000;
            want.extend_from_within(from..from + 64);
        }
        let chunks = chunks(&block).unwrap();
        assert!(chunks.iter().all(|c| c.len() <= WHOLE));
        assert!(chunks.len() > 3, "{} chunks", chunks.len());
        assert_eq!(chunks.concat(), want);
        assert_eq!(stream(&block).unwrap(), want);
        assert_eq!(
            snap::raw::Decoder::new().decompress_vec(&block).unwrap(),
            want
        );
    }

    /// A block's length header: `total` as a varint.
    fn length_header(total: usize) -> Vec<u8> {
        let mut header = vec![];
        let mut n = total;
        while n >= 0x80 {
            header.push((n as u8) | 0x80);
            n >>= 7;
        }
        header.push(n as u8);
        header
    }

    /// The length header, then a literal of `literal`.
    fn literal_block(total: usize, literal: &[u8]) -> Vec<u8> {
        let mut block = length_header(total);
        // Tag 62: the length - 1 in the next 3 bytes.
        block.push(62 << 2);
        block.extend_from_slice(&(literal.len() as u32 - 1).to_le_bytes()[..3]);
        block.extend_from_slice(literal);
        block
    }

    /// A 2-byte-offset copy element.
    fn copy2(len: usize, offset: u16) -> Vec<u8> {
        let mut e = vec![((len - 1) as u8) << 2 | 2];
        e.extend_from_slice(&offset.to_le_bytes());
        e
    }

    /// Copies at a chunk's start reach back into the chunk handed out
    /// before, also when they overlap what they write. (Compressors in use
    /// never make them: their 64 KiB blocks end where chunks end; a copy
    /// running past a chunk's end moves the chunk ends.)
    #[test]
    fn copies_reach_into_the_last_chunk() {
        let literal: Vec<u8> = (0..CHUNK as u32 - 6)
            .map(|i| (i * 13 % 241) as u8)
            .collect();
        let total = literal.len() + 20 + 64 + 10;
        let mut block = literal_block(total, &literal);
        // Runs 14 bytes past the chunk's end.
        block.extend(copy2(20, 100));
        // Starts the next chunk: 40 bytes back, then over itself.
        block.extend(copy2(64, 40));
        // 70 back: 6 bytes in the last chunk, 4 in this one.
        block.extend(copy2(10, 70));
        let chunks = chunks(&block).unwrap();
        assert_eq!(
            chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
            [CHUNK + 14, 74]
        );
        let want = snap::raw::Decoder::new().decompress_vec(&block).unwrap();
        assert_eq!(chunks.concat(), want);
    }

    #[test]
    fn damaged_blocks_are_errors() {
        let data = text(1_000);
        let block = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        let e = chunks(&block[..block.len() - 3]).unwrap_err();
        assert!(
            e.contains("cut short") || e.contains("runs past") || e.contains("header says"),
            "{e}"
        );
        // A header one byte short of the data.
        let mut short = length_header(data.len() - 1);
        let (_, header) = varint(&block).unwrap();
        short.extend_from_slice(&block[header..]);
        let e = chunks(&short).unwrap_err();
        assert!(e.contains("more than the"), "{e}");
        // A copy before the start.
        let e = chunks(&[4, 1 << 2 | 1, 9]).unwrap_err();
        assert!(e.contains("reaches 9 bytes back, 0 are written"), "{e}");
        let e = chunks(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).unwrap_err();
        assert!(e.contains("length header is damaged"), "{e}");
        let e = chunks(&[0x80, 0x80, 0x80, 0x08, 0]).unwrap_err();
        assert!(e.contains("claims"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever `snap` compresses, of any compressibility, comes back.
        #[test]
        fn compressed_data_round_trips(
            seed in proptest::collection::vec(any::<u8>(), 1..64),
            repeats in 1usize..6_000,
            noise in proptest::collection::vec(any::<u8>(), 0..70_000),
        ) {
            let mut data: Vec<u8> = seed.iter().cycle().take(seed.len() * repeats).copied().collect();
            data.extend_from_slice(&noise);
            data.extend_from_slice(&text(repeats));
            let block = snap::raw::Encoder::new().compress_vec(&data).unwrap();
            let chunks = chunks(&block).unwrap();
            prop_assert!(chunks.iter().all(|c| c.len() <= CHUNK + 64));
            prop_assert_eq!(chunks.concat(), data);
        }

        /// Any bytes decode as `snap` decodes them, or fail where it does:
        /// random ones, and a compressed block with bytes changed.
        #[test]
        fn any_block_decodes_as_snap_does(
            random in proptest::collection::vec(any::<u8>(), 0..300),
            lines in 1usize..4_000,
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        ) {
            let mut changed = snap::raw::Encoder::new().compress_vec(&text(lines)).unwrap();
            for (at, byte) in changes {
                let at = at.index(changed.len());
                changed[at] ^= byte;
            }
            for block in [random, changed] {
                same_as_snap(&block)?;
            }
        }
    }

    /// Streamed, and as [`RawBlock::new`] reads it (whole when small).
    fn same_as_snap(block: &[u8]) -> Result<(), TestCaseError> {
        let read = || -> Result<Vec<u8>, String> {
            let mut raw = RawBlock::new(Bytes::copy_from_slice(block), usize::MAX)?;
            let mut out = vec![];
            while let Some(chunk) = raw.next_chunk()? {
                out.extend_from_slice(&chunk);
            }
            Ok(out)
        };
        for ours in [stream(block), read()] {
            match (&ours, snap_decode(block)) {
                (Ok(a), Some(Ok(b))) => prop_assert_eq!(a, &b),
                (Err(_), Some(Err(_)) | None) => {}
                (ours, snap) => prop_assert!(false, "ours {:?}, snap {:?}", ours, snap),
            }
        }
        Ok(())
    }
}
