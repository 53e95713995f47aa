//! A fast zstd compressor (RFC 8878) for the producer's batches.
//!
//! Written here because ruzstd's compressor, the only mature pure-Rust one,
//! spent most of a zstd producer's time in its match finder: Strom produced
//! zstd at under half librdkafka's rate. This one writes frames that
//! every zstd reader accepts, simply:
//!
//! - one frame with its content size; up to 1 MiB it is one segment (a
//!   match may reach back to the frame's first byte), beyond that it
//!   declares a 1 MiB window (zstd level 2's for large inputs), so a reader
//!   streaming a big batch keeps at most 1 MiB of history;
//! - blocks of at most 128 KiB, each compressed or, when that would not be
//!   smaller, stored raw;
//! - matches found greedily: first the last match's offset again (rows of
//!   one layout repeat at one distance, and a repeated offset costs no
//!   bits), then one hash table of 5-byte prefixes, with larger steps over
//!   data that does not match (as LZ4 and zstd's fastest levels do);
//! - literals Huffman-coded when that is smaller (four streams, the weights
//!   written directly, so for bytes up to 128), else stored raw;
//! - sequences coded per block and per kind with one repeated symbol (RLE)
//!   where there is one, the predefined FSE tables for few sequences, and
//!   otherwise FSE tables described for the block's own counts.
//!
//! About 0.6-0.9 GB/s on records and JSON lines; output smaller than
//! ruzstd's fastest level and LZ4's, up to 1.5x zstd level 1's (which
//! finds longer matches). What is read back is always
//! exactly what was written, tested by the property tests below and,
//! against libzstd, by the librdkafka interop tests.

mod huffman;

use bytes::{BufMut, BytesMut};

const MAGIC: u32 = 0xFD2F_B528;
/// The most content one block may hold.
const BLOCK_MAX: usize = 128 * 1024;
/// Matches shorter than this are not worth a sequence.
const MIN_MATCH: usize = 4;
/// Hash table sizes: 2^10 to 2^16 entries, grown with the input.
const HASH_LOG_MIN: u32 = 10;
const HASH_LOG_MAX: u32 = 16;

/// Block types of a block header.
const RAW_BLOCK: u32 = 0;
const COMPRESSED_BLOCK: u32 = 2;

/// The window Strom's frames declare: 1 MiB (libzstd's streaming decoders,
/// zstd-jni in Java clients among them, take up to 128 MiB). A bigger input
/// gets a window descriptor instead of the single-segment flag, and matches
/// reach back no further than this; a decoder keeps this much of a frame's
/// output as history while it streams the frame.
const WINDOW_LOG: u32 = 20;

/// Appends `input` to `out` as one zstd frame.
pub(crate) fn compress(input: &[u8], out: &mut BytesMut) {
    compress_in_window(input, WINDOW_LOG, out);
}

/// [`compress`] with matches reaching back at most `2^window_log` bytes.
fn compress_in_window(input: &[u8], window_log: u32, out: &mut BytesMut) {
    let window = write_frame_header(input.len(), window_log, out);
    let hash_log = (usize::BITS - input.len().leading_zeros()).clamp(HASH_LOG_MIN, HASH_LOG_MAX);
    let mut matcher = Matcher {
        input,
        table: vec![0; 1 << hash_log],
        shift: 64 - hash_log,
        last_offset: 1,
        // Offset values (offset + 3) stay below 2^28 either way.
        max_offset: window.min((1 << 28) - 4),
    };
    // The decoder's last offset (its first repeat offset), as of the last
    // compressed block: a raw block leaves it as it was.
    let mut repeat = 1;
    let mut block = Block::default();
    let mut start = 0;
    loop {
        let end = (start + BLOCK_MAX).min(input.len());
        let last = end == input.len();
        block.clear();
        matcher.find(start, end, &mut block);
        let header_at = out.len();
        out.put_bytes(0, 3);
        let before = repeat;
        let written = block.encode(&mut repeat, out);
        let (kind, size) = if written < end - start {
            (COMPRESSED_BLOCK, written)
        } else {
            repeat = before;
            out.truncate(header_at + 3);
            out.extend_from_slice(&input[start..end]);
            (RAW_BLOCK, end - start)
        };
        let header = u32::from(last) | kind << 1 | (size as u32) << 3;
        out[header_at..header_at + 3].copy_from_slice(&header.to_le_bytes()[..3]);
        if last {
            return;
        }
        start = end;
    }
}

/// Magic number, descriptor (no checksum, no dictionary), the window and
/// the content size in the fewest bytes that hold it; returns the window.
/// Content that fits the window is one segment: the window is the content.
fn write_frame_header(len: usize, window_log: u32, out: &mut BytesMut) -> usize {
    const SINGLE_SEGMENT: u8 = 1 << 5;
    out.put_u32_le(MAGIC);
    let window = 1usize << window_log;
    let single = len <= window;
    let flags = if single { SINGLE_SEGMENT } else { 0 };
    let size_flag: u8 = if len < 256 && single {
        0
    } else if (256..256 + (1 << 16)).contains(&len) {
        1
    } else if u32::try_from(len).is_ok() {
        2
    } else {
        3
    };
    out.put_u8(flags | size_flag << 6);
    if !single {
        // Window_Descriptor: exponent (log - 10), mantissa 0.
        out.put_u8(((window_log - 10) as u8) << 3);
    }
    match size_flag {
        0 => out.put_u8(len as u8),
        1 => out.put_u16_le((len - 256) as u16),
        2 => out.put_u32_le(len as u32),
        _ => out.put_u64_le(len as u64),
    }
    if single {
        len
    } else {
        window
    }
}

/// The greedy match finder. The table maps a hash of the 5 bytes at a
/// position to the last position seen with that hash, over the whole frame.
struct Matcher<'a> {
    input: &'a [u8],
    table: Vec<u32>,
    shift: u32,
    /// The offset of the last match found.
    last_offset: usize,
    /// The farthest back a match may reach: the frame's window.
    max_offset: usize,
}

impl Matcher<'_> {
    fn hash(&self, at: usize) -> usize {
        let v = read_u64(self.input, at) << 24;
        (v.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// Splits `input[start..end]` into literals and sequences.
    fn find(&mut self, start: usize, end: usize, block: &mut Block) {
        let input = self.input;
        let mut anchor = start;
        let mut at = start;
        // A match starts with MIN_MATCH bytes inside the block, and the hash
        // reads 8 bytes: the last few bytes of a block stay literals.
        let limit = end
            .saturating_sub(MIN_MATCH)
            .min(input.len().saturating_sub(8));
        while at < limit {
            // The last offset again, one byte on: rows of the same layout
            // repeat at the same distance, and a repeated offset costs no
            // offset bits.
            let next = at + 1;
            if self.last_offset <= next
                && read_u32(input, next - self.last_offset) == read_u32(input, next)
            {
                let from = next - self.last_offset;
                let len = MIN_MATCH
                    + common_prefix(&input[from + MIN_MATCH..], &input[next + MIN_MATCH..end]);
                at = self.matched(block, anchor, from, next, len, limit);
                anchor = at;
                continue;
            }
            let h = self.hash(at);
            let candidate = self.table[h] as usize;
            self.table[h] = at as u32;
            let found = candidate < at
                && at - candidate <= self.max_offset
                && read_u32(input, candidate) == read_u32(input, at);
            if !found {
                // Step faster the longer nothing has matched.
                at += 1 + ((at - anchor) >> 6);
                continue;
            }
            let mut len = MIN_MATCH
                + common_prefix(&input[candidate + MIN_MATCH..], &input[at + MIN_MATCH..end]);
            let (mut from, mut to) = (candidate, at);
            while to > anchor && from > 0 && input[from - 1] == input[to - 1] {
                from -= 1;
                to -= 1;
                len += 1;
            }
            at = self.matched(block, anchor, from, to, len, limit);
            anchor = at;
        }
        block.literals.extend_from_slice(&input[anchor..end]);
    }
}

impl Matcher<'_> {
    /// Adds the sequence of the literals from `anchor` and the match of
    /// `len` bytes at `to` copied from `from`; returns where the next one
    /// starts.
    fn matched(
        &mut self,
        block: &mut Block,
        anchor: usize,
        from: usize,
        to: usize,
        len: usize,
        limit: usize,
    ) -> usize {
        block.push(&self.input[anchor..to], to - from, len);
        self.last_offset = to - from;
        let at = to + len;
        // Remember a position inside the match: the next data often
        // repeats it.
        if at - 2 < limit {
            let h = self.hash(at - 2);
            self.table[h] = (at - 2) as u32;
        }
        at
    }
}

fn read_u64(input: &[u8], at: usize) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&input[at..at + 8]);
    u64::from_le_bytes(bytes)
}

fn read_u32(input: &[u8], at: usize) -> u32 {
    let mut bytes = [0; 4];
    bytes.copy_from_slice(&input[at..at + 4]);
    u32::from_le_bytes(bytes)
}

/// How many leading bytes `a` and `b` share.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n {
        let x = read_u64(a, i) ^ read_u64(b, i);
        if x != 0 {
            return i + (x.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    i
}

/// One block's literals and sequences, before coding.
#[derive(Default)]
struct Block {
    literals: Vec<u8>,
    sequences: Vec<Sequence>,
}

/// `literal_len` literals, then `match_len` bytes copied from `offset` back.
#[derive(Clone, Copy)]
struct Sequence {
    literal_len: u32,
    offset: u32,
    match_len: u32,
}

impl Block {
    fn clear(&mut self) {
        self.literals.clear();
        self.sequences.clear();
    }

    fn push(&mut self, literals: &[u8], offset: usize, match_len: usize) {
        self.literals.extend_from_slice(literals);
        self.sequences.push(Sequence {
            literal_len: literals.len() as u32,
            offset: offset as u32,
            match_len: match_len as u32,
        });
    }

    /// Appends the block's content (literals section, sequences section) and
    /// returns its size.
    fn encode(&self, repeat: &mut u32, out: &mut BytesMut) -> usize {
        let before = out.len();
        if !huffman::encode(&self.literals, out) {
            raw_literals(&self.literals, out);
        }
        let count = self.sequences.len();
        if count < 128 {
            out.put_u8(count as u8);
        } else if count < 0x7F00 {
            out.put_u8((count >> 8) as u8 + 0x80);
            out.put_u8(count as u8);
        } else {
            out.put_u8(0xFF);
            out.put_u16_le((count - 0x7F00) as u16);
        }
        if count > 0 {
            encode_sequences(&self.sequences, repeat, out);
        }
        out.len() - before
    }
}

/// A raw literals section: type 0, the size in 5, 12 or 20 bits, the bytes.
fn raw_literals(literals: &[u8], out: &mut BytesMut) {
    let n = literals.len();
    if n < 32 {
        out.put_u8((n as u8) << 3);
    } else if n < 4096 {
        out.put_u8(0b0100 | (n as u8 & 0xF) << 4);
        out.put_u8((n >> 4) as u8);
    } else {
        out.put_u8(0b1100 | (n as u8 & 0xF) << 4);
        out.put_u8((n >> 4) as u8);
        out.put_u8((n >> 12) as u8);
    }
    out.extend_from_slice(literals);
}

/// The sequences section after its count: the compression mode of each of
/// the three symbol kinds, their table descriptions, then the bitstream.
///
/// The decoder reads the bitstream backwards, so it is written from the last
/// sequence to the first: per sequence the state transitions (offset, match
/// length, literal length), then the extra bits (literal length, match
/// length, offset); at the end the three initial states (match length,
/// offset, literal length) and the end mark.
fn encode_sequences(sequences: &[Sequence], repeat: &mut u32, out: &mut BytesMut) {
    // Offset values: 1 repeats the last offset (after at least one literal;
    // with none it would mean another repeat), anything above 3 is the
    // offset plus 3.
    let codes: Vec<[Coded; 3]> = sequences
        .iter()
        .map(|s| {
            let offset_value = if s.literal_len > 0 && s.offset == *repeat {
                1
            } else {
                s.offset + 3
            };
            *repeat = s.offset;
            [
                literal_length_code(s.literal_len),
                match_length_code(s.match_len),
                offset_code(offset_value),
            ]
        })
        .collect();
    let predefined = tables();
    let ll = Coder::choose(&codes, 0, &predefined.literal_lengths, 9);
    let ml = Coder::choose(&codes, 1, &predefined.match_lengths, 9);
    let of = Coder::choose(&codes, 2, &predefined.offsets, 8);
    out.put_u8(ll.mode() << 6 | of.mode() << 4 | ml.mode() << 2);
    for coder in [&ll, &of, &ml] {
        coder.describe(out);
    }
    let mut bits = BitWriter::new(out);
    let Some(([last_ll, last_ml, last_of], rest)) = codes.split_last() else {
        return;
    };
    let mut ll_state = ll.initial(last_ll.code);
    let mut ml_state = ml.initial(last_ml.code);
    let mut of_state = of.initial(last_of.code);
    bits.extra(*last_ll);
    bits.extra(*last_ml);
    bits.extra(*last_of);
    for &[l, m, o] in rest.iter().rev() {
        of.encode(&mut of_state, o.code, &mut bits);
        ml.encode(&mut ml_state, m.code, &mut bits);
        ll.encode(&mut ll_state, l.code, &mut bits);
        bits.extra(l);
        bits.extra(m);
        bits.extra(o);
    }
    ml.flush(ml_state, &mut bits);
    of.flush(of_state, &mut bits);
    ll.flush(ll_state, &mut bits);
    bits.finish(true);
}

/// How one kind of symbol (literal length, match length or offset code) is
/// coded in a block.
enum Coder<'a> {
    /// The format's predefined table: no description, fits few sequences.
    Predefined(&'a Fse),
    /// Every sequence has this symbol: one byte, no bits per sequence.
    Rle(u8),
    /// A table for this block's own counts, described before the bitstream.
    Compressed { fse: Fse, normalized: Vec<i16> },
}

impl<'a> Coder<'a> {
    /// Below this many sequences a described table costs more than it saves.
    const DESCRIBE_FROM: usize = 64;

    fn choose(codes: &[[Coded; 3]], kind: usize, predefined: &'a Fse, max_log: u32) -> Coder<'a> {
        let mut counts = [0u32; 53];
        for c in codes {
            counts[c[kind].code as usize] += 1;
        }
        let used = counts.iter().filter(|&&n| n > 0).count();
        if used == 1 {
            return Coder::Rle(codes[0][kind].code);
        }
        if codes.len() < Self::DESCRIBE_FROM {
            return Coder::Predefined(predefined);
        }
        let last = counts.iter().rposition(|&n| n > 0).unwrap_or(0);
        let (log, normalized) = normalize(&counts[..=last], codes.len() as u32, used, max_log);
        Coder::Compressed {
            fse: Fse::new(log, &normalized),
            normalized,
        }
    }

    /// The mode's number in the Symbol_Compression_Modes byte.
    fn mode(&self) -> u8 {
        match self {
            Coder::Predefined(_) => 0,
            Coder::Rle(_) => 1,
            Coder::Compressed { .. } => 2,
        }
    }

    fn describe(&self, out: &mut BytesMut) {
        match self {
            Coder::Predefined(_) => {}
            Coder::Rle(symbol) => out.put_u8(*symbol),
            Coder::Compressed { fse, normalized } => describe(fse.log, normalized, out),
        }
    }

    fn table(&self) -> Option<&Fse> {
        match self {
            Coder::Predefined(fse) => Some(fse),
            Coder::Rle(_) => None,
            Coder::Compressed { fse, .. } => Some(fse),
        }
    }

    fn initial(&self, symbol: u8) -> u32 {
        self.table().map_or(0, |t| t.initial(symbol))
    }

    fn encode(&self, state: &mut u32, symbol: u8, bits: &mut BitWriter<'_>) {
        if let Some(t) = self.table() {
            t.encode(state, symbol, bits);
        }
    }

    fn flush(&self, state: u32, bits: &mut BitWriter<'_>) {
        if let Some(t) = self.table() {
            t.flush(state, bits);
        }
    }
}

/// Counts scaled to sum to a power of two (the table's size), every used
/// symbol keeping at least one state; with that power.
fn normalize(counts: &[u32], total: u32, used: usize, max_log: u32) -> (u32, Vec<i16>) {
    let fewest = usize::BITS - used.leading_zeros();
    let log = (31 - total.leading_zeros()).clamp(5.max(fewest), max_log);
    let size = 1u64 << log;
    let mut normalized: Vec<i16> = counts
        .iter()
        .map(|&n| match n {
            0 => 0,
            n => ((u64::from(n) * size + u64::from(total) / 2) / u64::from(total)).max(1) as i16,
        })
        .collect();
    let mut sum: i64 = normalized.iter().map(|&n| i64::from(n)).sum();
    while sum != size as i64 {
        // The largest symbol takes the difference, one state at a time when
        // giving up states so that none goes below one.
        let largest = (0..normalized.len())
            .max_by_key(|&i| normalized[i])
            .unwrap_or(0);
        if sum < size as i64 {
            normalized[largest] += (size as i64 - sum) as i16;
            sum = size as i64;
        } else {
            normalized[largest] -= 1;
            sum -= 1;
        }
    }
    (log, normalized)
}

/// Writes an FSE table description (RFC 8878, 4.1.1): the accuracy log less
/// 5 in 4 bits, then each symbol's count plus one in as few bits as what
/// is left of the table allows, and after a zero count the number of zeros
/// that follow, in 2-bit steps.
fn describe(log: u32, normalized: &[i16], out: &mut BytesMut) {
    let mut bits = BitWriter::new(out);
    bits.add(log - 5, 4);
    let mut remaining = (1i32 << log) + 1;
    let mut threshold = 1i32 << log;
    let mut nb = log + 1;
    let mut s = 0;
    while s < normalized.len() {
        let value = i32::from(normalized[s]) + 1;
        let max = 2 * threshold - 1 - remaining;
        if value < max {
            bits.add(value as u32, nb - 1);
        } else if value < threshold {
            bits.add(value as u32, nb);
        } else {
            bits.add((value + max) as u32, nb);
        }
        remaining -= i32::from(normalized[s]).abs();
        s += 1;
        if value == 1 {
            let mut zeros = normalized[s..].iter().take_while(|&&n| n == 0).count();
            s += zeros;
            while zeros >= 3 {
                bits.add(3, 2);
                zeros -= 3;
            }
            bits.add(zeros as u32, 2);
        }
        while remaining < threshold {
            nb -= 1;
            threshold >>= 1;
        }
    }
    bits.finish(false);
}

/// A value as a code and the extra bits that follow it.
#[derive(Clone, Copy)]
struct Coded {
    code: u8,
    extra: u32,
    extra_bits: u32,
}

/// Literal length codes 16..=35: (baseline, extra bits).
const LITERAL_LENGTH_CODES: [(u32, u32); 20] = [
    (16, 1),
    (18, 1),
    (20, 1),
    (22, 1),
    (24, 2),
    (28, 2),
    (32, 3),
    (40, 3),
    (48, 4),
    (64, 6),
    (128, 7),
    (256, 8),
    (512, 9),
    (1024, 10),
    (2048, 11),
    (4096, 12),
    (8192, 13),
    (16384, 14),
    (32768, 15),
    (65536, 16),
];

/// Match length codes 32..=52: (baseline, extra bits).
const MATCH_LENGTH_CODES: [(u32, u32); 21] = [
    (35, 1),
    (37, 1),
    (39, 1),
    (41, 1),
    (43, 2),
    (47, 2),
    (51, 3),
    (59, 3),
    (67, 4),
    (83, 4),
    (99, 5),
    (131, 7),
    (259, 8),
    (515, 9),
    (1027, 10),
    (2051, 11),
    (4099, 12),
    (8195, 13),
    (16387, 14),
    (32771, 15),
    (65539, 16),
];

/// The code of `value` when codes below `direct` stand for `value - bias`
/// itself and the rest are looked up in `table` (codes from `direct` on).
fn code(value: u32, bias: u32, direct: u32, table: &[(u32, u32)]) -> Coded {
    if value - bias < direct {
        return Coded {
            code: (value - bias) as u8,
            extra: 0,
            extra_bits: 0,
        };
    }
    let i = table.partition_point(|&(base, _)| base <= value) - 1;
    let (base, extra_bits) = table[i];
    Coded {
        code: (direct as usize + i) as u8,
        extra: value - base,
        extra_bits,
    }
}

fn literal_length_code(len: u32) -> Coded {
    code(len, 0, 16, &LITERAL_LENGTH_CODES)
}

fn match_length_code(len: u32) -> Coded {
    code(len, 3, 32, &MATCH_LENGTH_CODES)
}

/// An Offset_Value: an offset plus 3, or 1 for a repeat.
fn offset_code(value: u32) -> Coded {
    let code = 31 - value.leading_zeros();
    Coded {
        code: code as u8,
        extra: value - (1 << code),
        extra_bits: code,
    }
}

/// Writes bits forward, lowest first, 32 at a time; the decoder reads them
/// back from the end.
struct BitWriter<'a> {
    out: &'a mut BytesMut,
    held: u64,
    count: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut BytesMut) -> Self {
        BitWriter {
            out,
            held: 0,
            count: 0,
        }
    }

    /// Adds the low `n` (at most 32) bits of `value`.
    fn add(&mut self, value: u32, n: u32) {
        let mask = (1u64 << n) - 1;
        self.held |= (u64::from(value) & mask) << self.count;
        self.count += n;
        if self.count >= 32 {
            self.out.put_u32_le(self.held as u32);
            self.held >>= 32;
            self.count -= 32;
        }
    }

    fn extra(&mut self, c: Coded) {
        self.add(c.extra, c.extra_bits);
    }

    /// The end mark (a 1 bit) if asked for, then what is held, padded to a
    /// byte.
    fn finish(mut self, mark: bool) {
        if mark {
            self.add(1, 1);
        }
        let bytes = self.count.div_ceil(8) as usize;
        self.out.put_slice(&self.held.to_le_bytes()[..bytes]);
    }
}

/// The three predefined FSE tables.
struct Tables {
    literal_lengths: Fse,
    match_lengths: Fse,
    offsets: Fse,
}

fn tables() -> &'static Tables {
    static TABLES: std::sync::OnceLock<Tables> = std::sync::OnceLock::new();
    TABLES.get_or_init(|| Tables {
        literal_lengths: Fse::new(
            6,
            &[
                4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1,
                1, 1, 1, 1, -1, -1, -1, -1,
            ],
        ),
        match_lengths: Fse::new(
            6,
            &[
                1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
                1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1,
            ],
        ),
        offsets: Fse::new(
            5,
            &[
                1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1,
                -1, -1,
            ],
        ),
    })
}

/// An FSE (tANS) table for encoding, built from a normalized distribution
/// the way the decoder builds its table, so both agree on every state.
///
/// The decoder in state `u` emits `symbol[u]`, then reads `nb` bits into
/// `baseline + bits`. The i-th state (in table order) of a symbol with
/// `n` states has `nb = log - highbit(n + i)` and
/// `baseline = (n + i) << nb - size`. Encoding runs backwards: the encoder
/// holds the next state `x` (plus `size`), and for a symbol picks the one of
/// its states whose range holds `x`, writing the bits that lead there.
struct Fse {
    log: u32,
    /// Per symbol: how many states it has (a "less than one" symbol has one).
    count: Vec<u32>,
    /// Per symbol: where its states start in `states`.
    start: Vec<u32>,
    /// Every symbol's states in table order, grouped by symbol.
    states: Vec<u32>,
}

impl Fse {
    fn new(log: u32, distribution: &[i16]) -> Fse {
        let size = 1usize << log;
        let mut symbol = vec![0usize; size];
        // "Less than one" symbols take the last states, one each.
        let mut high = size;
        for (s, &n) in distribution.iter().enumerate() {
            if n == -1 {
                high -= 1;
                symbol[high] = s;
            }
        }
        let step = (size >> 1) + (size >> 3) + 3;
        let mut at = 0;
        for (s, &n) in distribution.iter().enumerate() {
            for _ in 0..n.max(0) {
                symbol[at] = s;
                at = (at + step) & (size - 1);
                while at >= high {
                    at = (at + step) & (size - 1);
                }
            }
        }
        debug_assert_eq!(at, 0, "the distribution does not fill the table");
        // A "less than one" symbol has one state, an unused one none.
        let count: Vec<u32> = distribution
            .iter()
            .map(|&n| if n == -1 { 1 } else { n.max(0) as u32 })
            .collect();
        let mut start = Vec::with_capacity(count.len());
        let mut total = 0;
        for &n in &count {
            start.push(total);
            total += n;
        }
        let mut states = vec![0; size];
        let mut filled = vec![0; count.len()];
        for (u, &s) in symbol.iter().enumerate() {
            states[(start[s] + filled[s]) as usize] = u as u32;
            filled[s] += 1;
        }
        Fse {
            log,
            count,
            start,
            states,
        }
    }

    /// A state emitting `symbol`, to start encoding from.
    fn initial(&self, symbol: u8) -> u32 {
        self.states[self.start[symbol as usize] as usize] + (1 << self.log)
    }

    /// Moves `state` back to a state emitting `symbol`, writing the bits
    /// the decoder reads to come forward again.
    fn encode(&self, state: &mut u32, symbol: u8, bits: &mut BitWriter<'_>) {
        let s = symbol as usize;
        let n = self.count[s];
        let mut nb = self.log - (31 - n.leading_zeros());
        if (*state >> nb) < n {
            nb -= 1;
        }
        bits.add(*state, nb);
        let i = (*state >> nb) - n;
        *state = self.states[(self.start[s] + i) as usize] + (1 << self.log);
    }

    /// The state the decoder starts from.
    fn flush(&self, state: u32, bits: &mut BitWriter<'_>) {
        bits.add(state - (1 << self.log), self.log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(data: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        compress(data, &mut out);
        let back = super::super::Compression::Zstd.decompress(&out).unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the frame did not decode to its input");
        out
    }

    fn text(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                format!(
                    "{{\"id\":{i},\"user\":\"u{}\",\"page\":\"/p/{}\"}}\n",
                    i % 97,
                    i % 13
                )
                .into_bytes()
            })
            .collect()
    }

    #[test]
    fn edge_sizes_round_trip() {
        let data = text(2_000);
        for n in [
            0, 1, 4, 7, 8, 9, 31, 32, 255, 256, 257, 4095, 4096, 65791, 65792, 65793,
        ] {
            round_trip(&data[..n]);
            round_trip(&vec![b'a'; n]);
        }
    }

    /// Matches reach back across block boundaries; a long run becomes one
    /// overlapping match; content past 128 KiB spans several blocks.
    #[test]
    fn multi_block_frames_round_trip_and_compress() {
        let data = text(20_000);
        assert!(data.len() > 5 * BLOCK_MAX);
        let out = round_trip(&data);
        assert!(
            out.len() < data.len() / 4,
            "{} of {}",
            out.len(),
            data.len()
        );
        let zeros = vec![0u8; 3 * BLOCK_MAX + 17];
        assert!(round_trip(&zeros).len() < 200);
    }

    /// Data that does not compress is stored in raw blocks, so the frame is
    /// only a few bytes bigger than its input.
    #[test]
    fn incompressible_data_is_stored_raw() {
        let data = noise(300_000, 0x1234_5678_9abc_def0);
        let out = round_trip(&data);
        assert!(out.len() <= data.len() + 4 + 1 + 4 + 3 * 3, "{}", out.len());
    }

    /// The 1- and 2-byte sequence count forms (3 bytes: below) and long
    /// literal runs.
    #[test]
    fn many_short_matches_round_trip() {
        // 4-byte repeats separated by one unique byte: a sequence every 5 bytes.
        let data: Vec<u8> = (0..BLOCK_MAX / 5)
            .flat_map(|i| [b'a', b'b', b'c', b'd', (i % 251) as u8])
            .collect();
        round_trip(&data);
        for n in [127, 128, 0x7EFF, 0x7F00] {
            let data: Vec<u8> = (0..n)
                .flat_map(|i| [7, 7, 7, 7, 7, (i % 200) as u8 + 9])
                .collect();
            round_trip(&data);
        }
    }

    /// xorshift bytes: data that does not compress.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// Content bigger than the window gets a window descriptor instead of
    /// the single-segment flag, and no match reaches back past the window,
    /// even where the same bytes came earlier.
    #[test]
    fn matches_stay_within_a_declared_window() {
        let window_log = 17;
        let repeated = noise(60_000, 7);
        let data = [repeated.clone(), noise(200_000, 9), repeated].concat();
        let mut out = BytesMut::new();
        compress_in_window(&data, window_log, &mut out);
        assert_eq!(out[4] & 1 << 5, 0, "single-segment flag set");
        assert_eq!(out[5], ((window_log - 10) as u8) << 3, "window descriptor");
        assert_eq!(
            super::super::Compression::Zstd.decompress(&out).unwrap(),
            data
        );
        let mut matcher = Matcher {
            input: &data,
            table: vec![0; 1 << 16],
            shift: 48,
            last_offset: 1,
            max_offset: 1 << window_log,
        };
        let mut block = Block::default();
        let mut start = 0;
        while start < data.len() {
            let end = (start + BLOCK_MAX).min(data.len());
            block.clear();
            matcher.find(start, end, &mut block);
            assert!(block.sequences.iter().all(|s| s.offset <= 1 << window_log));
            start = end;
        }
    }

    /// A raw block between compressed ones leaves the decoder's repeat
    /// offset as it was, so the encoder must forget what it coded there.
    /// Block 1: rows (last offset a row's length). Block 2: noise with one
    /// 5-byte match 30 bytes back, not worth its sequence, so stored raw.
    /// Block 3: one byte, then a match 30 bytes back, which must be coded
    /// as an offset, not as "the last offset again".
    #[test]
    fn repeat_offsets_survive_a_raw_block() {
        let mut data = records(1_300);
        data.truncate(BLOCK_MAX);
        data.extend(noise(BLOCK_MAX, 3));
        let piece = BLOCK_MAX + 5;
        data.copy_within(piece..piece + 5, piece + 30);
        data.push(b'z');
        for _ in 0..20 {
            data.push(data[data.len() - 30]);
        }
        data.extend(records(1_000));
        let out = round_trip(&data);
        // The middle block is the raw one (type 0 after block 1).
        let first_size = (u32::from_le_bytes([out[9], out[10], out[11], 0]) >> 3) as usize;
        let second = 9 + 3 + first_size;
        assert_eq!(out[second] >> 1 & 3, 0, "the middle block is not raw");
    }

    /// More than 0x7F00 sequences in one block: the 3-byte count form.
    #[test]
    fn a_block_of_the_most_sequences_round_trips() {
        let count = 0x7F00 + 100;
        let mut block = Block::default();
        block.push(b"abcd", 4, 4);
        for _ in 1..count {
            block.push(b"", 4, 4);
        }
        let len = 4 + 4 * count;
        assert!(len <= BLOCK_MAX);
        let mut out = BytesMut::new();
        write_frame_header(len, WINDOW_LOG, &mut out);
        let header_at = out.len();
        out.put_bytes(0, 3);
        let size = block.encode(&mut 1, &mut out);
        let header = 1 | COMPRESSED_BLOCK << 1 | (size as u32) << 3;
        out[header_at..header_at + 3].copy_from_slice(&header.to_le_bytes()[..3]);
        let back = super::super::Compression::Zstd.decompress(&out).unwrap();
        assert_eq!(back, b"abcd".repeat(1 + count));
    }

    /// Literals whose Huffman code would be deeper than 11 bits (counts
    /// growing like Fibonacci's) are coded with the limited lengths and
    /// decode exactly.
    #[test]
    fn literals_needing_limited_code_lengths_round_trip() {
        let (mut a, mut b) = (1usize, 1usize);
        let mut data = Vec::new();
        for symbol in 0..22u8 {
            data.extend(std::iter::repeat_n(symbol * 5, a));
            (a, b) = (b, a + b);
        }
        // Shuffled, so that few matches take the literals away.
        let mut x = 0x9E37_79B9u64;
        for i in (1..data.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut counts = [0u32; 256];
        data.iter().for_each(|&b| counts[b as usize] += 1);
        assert!(huffman_depth_over_limit(&counts));
        round_trip(&data);
    }

    fn huffman_depth_over_limit(counts: &[u32]) -> bool {
        huffman::tests_support::unlimited_depth(counts) > 11
    }

    /// Every literal length, match length and offset code maps back to the
    /// value through the tables the decoder uses.
    #[test]
    fn codes_cover_every_value() {
        // A sequence holds less than a whole block of literals.
        for len in 0..BLOCK_MAX as u32 {
            let c = literal_length_code(len);
            let base = if c.code < 16 {
                u32::from(c.code)
            } else {
                LITERAL_LENGTH_CODES[c.code as usize - 16].0
            };
            assert!(c.code <= 35 && c.extra < 1 << c.extra_bits);
            assert_eq!(base + c.extra, len);
            if len >= 3 {
                let c = match_length_code(len);
                let base = if c.code < 32 {
                    u32::from(c.code) + 3
                } else {
                    MATCH_LENGTH_CODES[c.code as usize - 32].0
                };
                assert!(c.code <= 52 && c.extra < 1 << c.extra_bits);
                assert_eq!(base + c.extra, len);
            }
        }
        for offset in [1, 2, 5, 1000, (1 << 28) - 4] {
            let c = offset_code(offset + 3);
            assert!(c.code <= 28);
            assert_eq!((1 << c.code) + c.extra - 3, offset);
        }
    }

    /// Records as the producer batches them: a few header bytes, a key and
    /// a value per record.
    fn records(n: u64) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let mut r = vec![0u8; 8];
                r.extend_from_slice(format!("key-{i}").as_bytes());
                r.extend_from_slice(format!("{i}:").as_bytes());
                r.resize(r.len() + 90, b'x');
                r
            })
            .collect()
    }

    /// Never worse than ruzstd's fastest level, the compressor this one
    /// replaced, on records and on JSON lines.
    #[test]
    fn compresses_at_least_as_well_as_ruzstd() {
        for data in [records(10_000), text(10_000)] {
            let mut ours = BytesMut::new();
            compress(&data, &mut ours);
            let mut theirs = Vec::new();
            ruzstd::encoding::compress(
                &data[..],
                &mut theirs,
                ruzstd::encoding::CompressionLevel::Fastest,
            );
            assert!(
                ours.len() <= theirs.len(),
                "{} > {}",
                ours.len(),
                theirs.len()
            );
            round_trip(&data);
        }
    }

    /// Each symbol kind is coded RLE when one symbol is used, with the
    /// predefined table for few sequences, and with a described table
    /// otherwise; frames with each decode (the round trips above).
    #[test]
    fn each_coding_mode_is_chosen_where_it_fits() {
        let coded = |n: u32| {
            [
                literal_length_code(n % 40),
                match_length_code(4 + n % 7),
                offset_code(4 + n),
            ]
        };
        let predefined = tables();
        let same: Vec<_> = (0..100).map(|_| coded(3)).collect();
        assert_eq!(
            Coder::choose(&same, 0, &predefined.literal_lengths, 9).mode(),
            1
        );
        let few: Vec<_> = (0..10).map(coded).collect();
        assert_eq!(
            Coder::choose(&few, 0, &predefined.literal_lengths, 9).mode(),
            0
        );
        let many: Vec<_> = (0..1000).map(coded).collect();
        for kind in 0..3 {
            assert_eq!(Coder::choose(&many, kind, &predefined.offsets, 8).mode(), 2);
        }
        // Normalized counts always fill the table exactly.
        for total in [64u32, 65, 1000, 30_000] {
            let counts: Vec<u32> = (0..53).map(|s| (total / 53).max(1) + s % 3).collect();
            let sum = counts.iter().sum();
            let (log, normalized) = normalize(&counts, sum, 53, 9);
            assert_eq!(
                normalized.iter().map(|&n| i64::from(n)).sum::<i64>(),
                1 << log
            );
            assert!(normalized.iter().all(|&n| n >= 1));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Compressible data of any shape: pieces of a small alphabet,
        /// repeated at any distance.
        #[test]
        fn repetitive_data_round_trips(
            pieces in proptest::collection::vec((proptest::collection::vec(0u8..4, 0..40), 0usize..300_000, 0usize..200), 0..400),
        ) {
            let mut data = Vec::new();
            for (fresh, back, len) in pieces {
                data.extend_from_slice(&fresh);
                if !data.is_empty() {
                    let from = data.len() - 1 - back % data.len();
                    for i in 0..len {
                        data.push(data[from + i]);
                    }
                }
            }
            round_trip(&data);
        }

        /// Literals the Huffman coder takes (bytes up to 128), skewed or
        /// flat; bytes above 128 (stored raw) are in the codec tests.
        #[test]
        fn literals_round_trip(
            data in proptest::collection::vec(prop_oneof![6 => Just(b'e'), 3 => 0u8..=128], 0..20_000),
            flat in proptest::collection::vec(0u8..=128, 0..3_000),
        ) {
            round_trip(&data);
            round_trip(&flat);
        }
    }
}
