//! The compression codecs of RecordBatch v2: what the low three bits of a
//! batch's attributes name, and how its records are (de)compressed.
//!
//! | codec | id | written as | read |
//! |---|---|---|---|
//! | none | 0 | | |
//! | gzip | 1 | one gzip member (level 6, as Java and librdkafka; zlib-rs) | any number of members |
//! | snappy | 2 | the xerial framing of snappy-java, 32 KiB blocks, as the Java producer | xerial framing, or a raw snappy block (librdkafka writes raw) |
//! | lz4 | 3 | an LZ4 frame | LZ4 frames |
//! | zstd | 4 | one zstd frame ([`zstd`]'s own fast compressor) | any number of frames (ruzstd) |
//!
//! Every codec is pure Rust. A batch's records are decompressed a chunk of
//! about [`CHUNK`] bytes at a time as they are read, and decompressing one
//! batch stops with an error past [`MAX_DECOMPRESSED`] bytes, so a small
//! hostile batch cannot take all memory.

mod snappy;
mod zstd;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use snappy::{snap_decode, stream as stream_raw_snappy};

use std::io::{Read, Write};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{Error, Result};

/// The most bytes one batch's records may decompress to (256 MiB).
pub const MAX_DECOMPRESSED: usize = 256 << 20;

/// The xerial framing's magic: `0x82 "SNAPPY" 0`, then version and the
/// oldest compatible version (both 1), big-endian i32s.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;
/// snappy-java's default block size, which the Java producer uses.
const XERIAL_BLOCK: usize = 32 * 1024;

/// How the records of a batch are compressed (Kafka's `compression.type`).
///
/// ```
/// use strom_client::Compression;
/// let zstd: Compression = "zstd".parse().unwrap();
/// assert_eq!(zstd, Compression::Zstd);
/// assert_eq!(zstd.to_string(), "zstd");
/// assert!("brotli".parse::<Compression>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// No compression.
    #[default]
    None,
    /// gzip (DEFLATE in gzip members).
    Gzip,
    /// Snappy.
    Snappy,
    /// LZ4 frames.
    Lz4,
    /// Zstandard frames.
    Zstd,
}

impl Compression {
    /// Every codec, in the order of their ids.
    pub const ALL: [Compression; 5] = [
        Compression::None,
        Compression::Gzip,
        Compression::Snappy,
        Compression::Lz4,
        Compression::Zstd,
    ];

    /// The codec's id in a batch's attributes.
    pub fn id(self) -> i16 {
        match self {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Snappy => 2,
            Compression::Lz4 => 3,
            Compression::Zstd => 4,
        }
    }

    /// The codec with this id, if there is one.
    pub fn from_id(id: i16) -> Option<Compression> {
        Compression::ALL.into_iter().find(|c| c.id() == id)
    }

    /// The codec's name as Kafka's `compression.type` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// Appends `input` compressed to `out`.
    pub(crate) fn compress(self, input: &[u8], out: &mut BytesMut) -> Result<()> {
        let failed = |e: std::io::Error| Error::Compression {
            codec: self.name(),
            what: e.to_string(),
        };
        match self {
            Compression::None => out.extend_from_slice(input),
            Compression::Gzip => {
                let mut enc =
                    flate2::write::GzEncoder::new(out.writer(), flate2::Compression::default());
                enc.write_all(input).map_err(failed)?;
                enc.finish().map_err(failed)?;
            }
            Compression::Snappy => snappy_xerial(input, out).map_err(failed)?,
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(out.writer());
                enc.write_all(input).map_err(failed)?;
                enc.finish()
                    .map_err(|e| failed(std::io::Error::other(e.to_string())))?;
            }
            Compression::Zstd => zstd::compress(input, out),
        }
        Ok(())
    }

    /// The records of a batch compressed with this codec, decompressed
    /// whole; the error says what is wrong with them.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn decompress(self, input: &[u8]) -> std::result::Result<Vec<u8>, String> {
        self.decompress_within(input, MAX_DECOMPRESSED)
    }

    #[cfg(any(test, feature = "fuzzing"))]
    fn decompress_within(self, input: &[u8], limit: usize) -> std::result::Result<Vec<u8>, String> {
        let mut chunks = Decompressor::new(self, Bytes::copy_from_slice(input));
        chunks.limit = limit;
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next_chunk()? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                Error::Config(format!(
                    "unknown compression {s:?}; expected none, gzip, snappy, lz4 or zstd"
                ))
            })
    }
}

/// Snappy in snappy-java's xerial framing: the header, then blocks of
/// (big-endian u32 length, raw snappy block).
fn snappy_xerial(input: &[u8], out: &mut BytesMut) -> std::io::Result<()> {
    out.extend_from_slice(XERIAL_MAGIC);
    out.put_i32(1);
    out.put_i32(1);
    let mut encoder = snap::raw::Encoder::new();
    let mut block = vec![0; snap::raw::max_compress_len(XERIAL_BLOCK)];
    for chunk in input.chunks(XERIAL_BLOCK) {
        let n = encoder
            .compress(chunk, &mut block)
            .map_err(std::io::Error::other)?;
        out.put_u32(n as u32);
        out.extend_from_slice(&block[..n]);
    }
    Ok(())
}

/// About how many decompressed bytes [`Decompressor::next_chunk`] hands out
/// at a time.
pub const CHUNK: usize = 64 << 10;

/// The largest zstd window read (128 MiB): the most libzstd's streaming
/// decoders (zstd-jni in Java clients among them) take by default.
const MAX_ZSTD_WINDOW: usize = 128 << 20;

/// A batch's compressed records, decompressed a chunk at a time, so that
/// reading a batch holds a chunk of its records rather than all of them.
///
/// Chunks are about [`CHUNK`] bytes: gzip and lz4 stream; zstd streams
/// beyond its frame's window (which its decoder keeps, see
/// [`Decompressor::retained`]), so a frame that fits its window, as
/// libzstd's one-shot compression writes small batches, comes as one
/// chunk; snappy streams each block, a xerial block (32 KiB as Java
/// writes them) or a whole raw one (librdkafka's), except that a block of
/// up to 256 KiB comes as one chunk (see [`snappy`]). Past
/// [`MAX_DECOMPRESSED`] bytes in all it fails.
pub(crate) struct Decompressor {
    codec: Compression,
    kind: Kind,
    /// Bytes handed out so far.
    produced: usize,
    limit: usize,
}

enum Kind {
    Gzip(Box<flate2::bufread::MultiGzDecoder<bytes::buf::Reader<Bytes>>>),
    Lz4(Box<lz4_flex::frame::FrameDecoder<bytes::buf::Reader<Bytes>>>),
    Snappy(Unsnappy),
    Zstd(Box<Unzstd>),
    /// Uncompressed: the input is the one chunk.
    Plain(Option<Bytes>),
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decompressor")
            .field("codec", &self.codec)
            .field("produced", &self.produced)
            .finish_non_exhaustive()
    }
}

impl Decompressor {
    /// Starts decompressing `input`, the records of a batch compressed with `codec`.
    pub(crate) fn new(codec: Compression, input: Bytes) -> Decompressor {
        let kind = match codec {
            Compression::None => Kind::Plain(Some(input)),
            Compression::Gzip => Kind::Gzip(Box::new(flate2::bufread::MultiGzDecoder::new(
                input.reader(),
            ))),
            Compression::Lz4 => {
                Kind::Lz4(Box::new(lz4_flex::frame::FrameDecoder::new(input.reader())))
            }
            Compression::Snappy => Kind::Snappy(Unsnappy::new(input)),
            Compression::Zstd => Kind::Zstd(Box::new(Unzstd::new(input))),
        };
        Decompressor {
            codec,
            kind,
            produced: 0,
            limit: MAX_DECOMPRESSED,
        }
    }

    /// The next decompressed bytes (never empty), or `None` at the end; the
    /// error says what is wrong with the input, naming the codec.
    pub(crate) fn next_chunk(&mut self) -> std::result::Result<Option<Bytes>, String> {
        let chunk = match &mut self.kind {
            Kind::Plain(input) => Ok(input.take().filter(|b| !b.is_empty())),
            Kind::Gzip(gzip) => read_chunk(gzip.as_mut()),
            // An lz4 frame's end reads as an empty buffer; more frames may follow.
            Kind::Lz4(lz4) => {
                buffered_chunk(lz4.as_mut(), |lz4| lz4.get_ref().get_ref().has_remaining())
            }
            Kind::Snappy(snappy) => snappy.next_block(self.limit),
            Kind::Zstd(zstd) => zstd.next_chunk(),
        };
        let failed = |e: String| format!("{} decompression failed: {e}", self.codec.name());
        let chunk = chunk.map_err(failed)?;
        if let Some(chunk) = &chunk {
            self.produced += chunk.len();
            if self.produced > self.limit {
                return Err(failed(format!(
                    "the records decompress to more than {} bytes",
                    self.limit
                )));
            }
        }
        Ok(chunk)
    }

    /// Decompressed bytes the decoder keeps internally beyond what it has
    /// handed out: a zstd frame's window of history (gzip's 32 KiB window,
    /// an lz4 frame's block buffer, 64 KiB as Kafka's clients write them,
    /// and the last chunk a raw snappy block keeps for its copies, at most
    /// 64 KiB and 64 bytes, are not counted; nor is the rest of a raw
    /// snappy block that a far-reaching copy made it decompress whole).
    pub(crate) fn retained(&self) -> usize {
        match &self.kind {
            Kind::Zstd(zstd) => zstd.retained(),
            _ => 0,
        }
    }
}

/// Up to [`CHUNK`] bytes read from `r` (into zeroed memory: `Read` needs it).
fn read_chunk(r: &mut impl Read) -> std::result::Result<Option<Bytes>, String> {
    let mut out = vec![0; CHUNK];
    let mut filled = 0;
    while filled < CHUNK {
        match r.read(&mut out[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    out.truncate(filled);
    Ok((filled > 0).then(|| Bytes::from(out)))
}

/// Up to about [`CHUNK`] bytes copied out of `r`'s own buffer; an empty
/// buffer is the end only when `more` says no input is left.
fn buffered_chunk<R: std::io::BufRead>(
    r: &mut R,
    more: impl Fn(&R) -> bool,
) -> std::result::Result<Option<Bytes>, String> {
    let mut out = Vec::with_capacity(CHUNK);
    while out.len() < CHUNK {
        let n = match r.fill_buf() {
            Ok([]) => 0,
            Ok(data) => {
                let n = data.len().min(CHUNK - out.len());
                out.extend_from_slice(&data[..n]);
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.to_string()),
        };
        if n == 0 && !more(r) {
            break;
        }
        r.consume(n);
    }
    Ok((!out.is_empty()).then(|| Bytes::from(out)))
}

/// Snappy as Kafka's producers write it: xerial-framed (Java), or one raw
/// block (librdkafka); either way each block a chunk at a time.
struct Unsnappy {
    input: Bytes,
    /// Whether `input` is the xerial blocks after their header.
    xerial: bool,
    /// Whether the xerial header itself is cut short.
    header_cut: bool,
    /// The block being read.
    block: Option<snappy::RawBlock>,
}

impl Unsnappy {
    fn new(input: Bytes) -> Unsnappy {
        let xerial = input.starts_with(XERIAL_MAGIC);
        let header_cut = xerial && input.len() < XERIAL_HEADER_LEN;
        Unsnappy {
            input: if xerial {
                input.slice(XERIAL_HEADER_LEN.min(input.len())..)
            } else {
                input
            },
            xerial,
            header_cut,
            block: None,
        }
    }

    fn next_block(&mut self, limit: usize) -> std::result::Result<Option<Bytes>, String> {
        if self.header_cut {
            return Err("the xerial header is cut short".into());
        }
        loop {
            if let Some(block) = &mut self.block {
                match block.next_chunk()? {
                    Some(chunk) => return Ok(Some(chunk)),
                    None => self.block = None,
                }
            }
            if self.input.is_empty() {
                return Ok(None);
            }
            let block = if self.xerial {
                let (len, body) = self
                    .input
                    .split_first_chunk::<4>()
                    .ok_or("a xerial block length is cut short")?;
                let len = u32::from_be_bytes(*len) as usize;
                if body.len() < len {
                    return Err(format!(
                        "a xerial block says {len} bytes, {} remain",
                        body.len()
                    ));
                }
                self.input.advance(4);
                self.input.split_to(len)
            } else {
                std::mem::take(&mut self.input)
            };
            self.block = Some(snappy::RawBlock::new(block, limit)?);
        }
    }
}

/// The window a zstd frame header declares (RFC 8878, 3.1.1.1): its
/// window descriptor, or for a single-segment frame its content size.
fn frame_window(header: &[u8]) -> usize {
    const MAGIC_LEN: usize = 4;
    let Some(&descriptor) = header.get(MAGIC_LEN) else {
        return 0;
    };
    let rest = &header[MAGIC_LEN + 1..];
    if descriptor & 1 << 5 == 0 {
        let Some(&w) = rest.first() else { return 0 };
        let base = 1u64 << (10 + (w >> 3));
        let window = base + (base / 8) * u64::from(w & 7);
        return usize::try_from(window).unwrap_or(usize::MAX);
    }
    let dict_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
    let size = rest.get(dict_len..).unwrap_or_default();
    let le = |n: usize| {
        size.iter()
            .take(n)
            .rev()
            .fold(0u64, |v, &b| v << 8 | u64::from(b))
    };
    let content = match descriptor >> 6 {
        0 => le(1),
        1 => le(2) + 256,
        2 => le(4),
        _ => le(8),
    };
    usize::try_from(content).unwrap_or(usize::MAX)
}

/// Every zstd frame of the input, decompressed and concatenated
/// (skippable frames skipped).
struct Unzstd {
    decoder: ruzstd::decoding::FrameDecoder,
    input: Bytes,
    /// Whether a frame has been started and not yet drained.
    in_frame: bool,
    /// The current frame's window: the history its decoder keeps.
    window: usize,
}

impl Unzstd {
    fn new(input: Bytes) -> Unzstd {
        Unzstd {
            decoder: ruzstd::decoding::FrameDecoder::new(),
            input,
            in_frame: false,
            window: 0,
        }
    }

    /// Decompressed bytes the decoder keeps: a frame's whole window while
    /// it is read (it hands out only what lies beyond the window), nothing
    /// once the frame is finished (its last chunk drains all of it).
    fn retained(&self) -> usize {
        if self.in_frame && !self.decoder.is_finished() {
            self.window
        } else {
            0
        }
    }

    fn next_chunk(&mut self) -> std::result::Result<Option<Bytes>, String> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        use ruzstd::decoding::BlockDecodingStrategy;
        loop {
            if !self.in_frame {
                if self.input.is_empty() {
                    return Ok(None);
                }
                let mut rest = &self.input[..];
                let started = self.decoder.init(&mut rest);
                let header = self.input.split_to(self.input.len() - rest.len());
                match started {
                    Ok(()) => {
                        // The decoder keeps a window of output before it
                        // hands any out, and frees none of it until the
                        // frame ends: refuse a window larger than libzstd's
                        // streaming decoders take, as they do.
                        self.window = frame_window(&header);
                        if self.window > MAX_ZSTD_WINDOW {
                            return Err(format!(
                                "a frame needs a window of {} bytes, more than {MAX_ZSTD_WINDOW}",
                                self.window
                            ));
                        }
                        self.in_frame = true;
                    }
                    Err(FrameDecoderError::ReadFrameHeaderError(
                        ReadFrameHeaderError::SkipFrame { length, .. },
                    )) => {
                        if (length as usize) > self.input.len() {
                            return Err("a skippable frame is cut short".into());
                        }
                        self.input.advance(length as usize);
                    }
                    Err(e) => return Err(e.to_string()),
                }
                continue;
            }
            if self.decoder.can_collect() >= CHUNK || self.decoder.is_finished() {
                match self.decoder.collect() {
                    Some(out) if !out.is_empty() => return Ok(Some(Bytes::from(out))),
                    _ if self.decoder.is_finished() => {
                        self.in_frame = false;
                        continue;
                    }
                    _ => {}
                }
            }
            let mut rest = &self.input[..];
            self.decoder
                .decode_blocks(&mut rest, BlockDecodingStrategy::UptoBytes(CHUNK))
                .map_err(|e| e.to_string())?;
            let read = self.input.len() - rest.len();
            if read == 0 && !self.decoder.is_finished() {
                return Err("a frame is cut short".into());
            }
            self.input.advance(read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(codec: Compression, data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        codec.compress(data, &mut out).unwrap();
        codec.decompress(&out).unwrap()
    }

    /// Records of a typical batch: repetitive text compresses with every codec.
    pub(super) fn text(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("record {i} of the batch, value {}\n", i % 17).into_bytes())
            .collect()
    }

    #[test]
    fn every_codec_round_trips_and_compresses() {
        let data = text(5_000);
        for codec in Compression::ALL {
            let mut out = BytesMut::new();
            codec.compress(&data, &mut out).unwrap();
            if codec != Compression::None {
                assert!(out.len() < data.len() / 2, "{codec} did not compress");
            }
            assert_eq!(codec.decompress(&out).unwrap(), data, "{codec}");
        }
    }

    /// The xerial framing as snappy-java writes it: the header, then blocks
    /// of at most 32 KiB of input.
    #[test]
    fn snappy_is_written_in_xerial_blocks() {
        let data = text(10_000);
        assert!(data.len() > 2 * XERIAL_BLOCK);
        let mut out = BytesMut::new();
        Compression::Snappy.compress(&data, &mut out).unwrap();
        assert_eq!(&out[..8], XERIAL_MAGIC);
        assert_eq!(&out[8..16], &[0, 0, 0, 1, 0, 0, 0, 1]);
        let mut rest = &out[16..];
        let mut blocks = 0;
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            let block = &rest[4..4 + len];
            assert!(snap::raw::decompress_len(block).unwrap() <= XERIAL_BLOCK);
            rest = &rest[4 + len..];
            blocks += 1;
        }
        assert_eq!(blocks, data.len().div_ceil(XERIAL_BLOCK));
    }

    /// librdkafka writes one raw snappy block, without framing.
    #[test]
    fn raw_snappy_is_read() {
        let data = text(1_000);
        let raw = snap::raw::Encoder::new().compress_vec(&data).unwrap();
        assert_eq!(Compression::Snappy.decompress(&raw).unwrap(), data);
    }

    /// Kafka's readers accept several gzip members and zstd frames.
    #[test]
    fn concatenated_gzip_members_and_zstd_frames_are_read() {
        let (a, b) = (text(100), text(300));
        for codec in [Compression::Gzip, Compression::Zstd] {
            let mut out = BytesMut::new();
            codec.compress(&a, &mut out).unwrap();
            codec.compress(&b, &mut out).unwrap();
            assert_eq!(
                codec.decompress(&out).unwrap(),
                [a.clone(), b.clone()].concat()
            );
        }
    }

    /// zstd's skippable frames are skipped, and one cut short is an error;
    /// so is a xerial header cut short.
    #[test]
    fn skippable_frames_and_cut_headers() {
        let data = text(100);
        let mut frame = BytesMut::new();
        Compression::Zstd.compress(&data, &mut frame).unwrap();
        // Magic 0x184D2A50, length 3, then 3 bytes.
        let skippable = [0x50, 0x2A, 0x4D, 0x18, 3, 0, 0, 0, 9, 9, 9];
        let both = [&skippable[..], &frame[..]].concat();
        assert_eq!(Compression::Zstd.decompress(&both).unwrap(), data);
        let e = Compression::Zstd.decompress(&skippable[..10]).unwrap_err();
        assert!(e.contains("skippable frame is cut short"), "{e}");
        let e = Compression::Snappy
            .decompress(&XERIAL_MAGIC[..])
            .unwrap_err();
        assert!(e.contains("xerial header is cut short"), "{e}");
    }

    #[test]
    fn cut_short_input_is_an_error_naming_the_codec() {
        let data = text(2_000);
        for codec in &Compression::ALL[1..] {
            let mut out = BytesMut::new();
            codec.compress(&data, &mut out).unwrap();
            let cut = &out[..out.len() / 2];
            let e = codec.decompress(cut).unwrap_err();
            assert!(e.starts_with(codec.name()), "{e}");
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        let limit = 1 << 20;
        let zeros = vec![0u8; 3 * limit];
        for codec in &Compression::ALL[1..] {
            let mut out = BytesMut::new();
            codec.compress(&zeros, &mut out).unwrap();
            assert!(out.len() < limit / 4, "{codec}: {} bytes", out.len());
            let e = codec.decompress_within(&out, limit).unwrap_err();
            assert!(e.contains("more than"), "{codec}: {e}");
        }
    }

    /// A zstd frame that needs a window over 128 MiB is refused before
    /// anything is decoded (its decoder would hold that much); the windows
    /// frame headers declare are read as RFC 8878 gives them.
    #[test]
    fn zstd_windows_are_read_and_bounded() {
        // Magic, no single segment, window 2^28, then an empty last raw block.
        let big = [0x28, 0xB5, 0x2F, 0xFD, 0x00, 18 << 3, 0x01, 0x00, 0x00];
        let e = Compression::Zstd.decompress(&big).unwrap_err();
        assert!(e.contains("window of 268435456 bytes"), "{e}");
        // Mantissa: 2^20 + 3 * 2^17.
        assert_eq!(
            frame_window(&[0x28, 0xB5, 0x2F, 0xFD, 0x00, 10 << 3 | 3]),
            1_441_792
        );
        // Single segment: the content size, in 1, 2 (+256), 4 or 8 bytes.
        let single = |flag: u8, size: &[u8]| {
            let mut header = vec![0x28, 0xB5, 0x2F, 0xFD, 1 << 5 | flag << 6];
            header.extend_from_slice(size);
            frame_window(&header)
        };
        assert_eq!(single(0, &[200]), 200);
        assert_eq!(single(1, &[0x10, 0x00]), 256 + 16);
        assert_eq!(single(2, &[0, 0, 0x10, 0]), 1 << 20);
        assert_eq!(single(3, &[0, 0, 0, 0, 1, 0, 0, 0]), 1 << 32);
        // Strom's own frames: 1 MiB beyond 1 MiB of content.
        let mut out = BytesMut::new();
        Compression::Zstd
            .compress(&text(100_000), &mut out)
            .unwrap();
        assert_eq!(frame_window(&out[..14]), 1 << 20);
    }

    #[test]
    fn names_parse_back() {
        for codec in Compression::ALL {
            assert_eq!(codec.name().parse::<Compression>().unwrap(), codec);
            assert_eq!(Compression::from_id(codec.id()), Some(codec));
        }
        assert_eq!("ZSTD".parse::<Compression>().unwrap(), Compression::Zstd);
        assert_eq!(Compression::from_id(5), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any bytes survive every codec.
        #[test]
        fn any_bytes_round_trip(data in proptest::collection::vec(any::<u8>(), 0..70_000)) {
            for codec in Compression::ALL {
                prop_assert_eq!(&round_trip(codec, &data), &data);
            }
        }

        /// Any bytes given to a decoder give records or an error, never a
        /// panic or a hang.
        #[test]
        fn any_input_decodes_or_errs(data in proptest::collection::vec(any::<u8>(), 0..4_000), id in 1i16..5) {
            let codec = Compression::from_id(id).unwrap();
            let _ = codec.decompress(&data);
            let mut framed = BytesMut::new();
            framed.extend_from_slice(XERIAL_MAGIC);
            framed.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]);
            framed.extend_from_slice(&data);
            let _ = Compression::Snappy.decompress(&framed);
        }
    }
}
