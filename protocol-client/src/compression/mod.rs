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
//! Every codec is pure Rust. Decompressing a batch stops with an error past
//! [`MAX_DECOMPRESSED`] bytes, so a small hostile batch cannot take all memory.

mod zstd;

use std::io::{Read, Write};

use bytes::{BufMut, BytesMut};

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

    /// The records of a batch compressed with this codec, decompressed; the
    /// error says what is wrong with them.
    pub(crate) fn decompress(self, input: &[u8]) -> std::result::Result<Vec<u8>, String> {
        self.decompress_within(input, MAX_DECOMPRESSED)
    }

    fn decompress_within(self, input: &[u8], limit: usize) -> std::result::Result<Vec<u8>, String> {
        let read_all = |mut r: Box<dyn Read + '_>| {
            let mut out = Vec::with_capacity(input.len().saturating_mul(4).min(limit));
            r.by_ref()
                .take(limit as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|e| e.to_string())?;
            within(out, limit)
        };
        let out = match self {
            Compression::None => Ok(input.to_vec()),
            Compression::Gzip => read_all(Box::new(flate2::read::MultiGzDecoder::new(input))),
            Compression::Snappy => unsnappy(input, limit),
            Compression::Lz4 => read_all(Box::new(lz4_flex::frame::FrameDecoder::new(input))),
            Compression::Zstd => unzstd(input, limit),
        };
        out.map_err(|e| format!("{} decompression failed: {e}", self.name()))
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

fn within(out: Vec<u8>, limit: usize) -> std::result::Result<Vec<u8>, String> {
    if out.len() > limit {
        return Err(too_big(limit));
    }
    Ok(out)
}

fn too_big(limit: usize) -> String {
    format!("the records decompress to more than {limit} bytes")
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

/// Snappy as Kafka's producers write it: xerial-framed (Java) or one raw
/// block (librdkafka).
fn unsnappy(input: &[u8], limit: usize) -> std::result::Result<Vec<u8>, String> {
    let mut decoder = snap::raw::Decoder::new();
    let mut raw = |block: &[u8], out: &mut Vec<u8>| {
        let len = snap::raw::decompress_len(block).map_err(|e| e.to_string())?;
        if out.len() + len > limit {
            return Err(too_big(limit));
        }
        // Snappy expands at most about 21:1 (a 2-byte copy of 64 bytes):
        // a header promising more is forged; do not allocate for it.
        if len > block.len().saturating_mul(22).saturating_add(64) {
            return Err(format!(
                "a snappy block of {} bytes claims {len} bytes decompressed",
                block.len()
            ));
        }
        let start = out.len();
        out.resize(start + len, 0);
        decoder
            .decompress(block, &mut out[start..])
            .map_err(|e| e.to_string())?;
        Ok(())
    };
    let mut out = Vec::new();
    if !input.starts_with(XERIAL_MAGIC) {
        raw(input, &mut out)?;
        return Ok(out);
    }
    let mut rest = input
        .get(XERIAL_HEADER_LEN..)
        .ok_or("the xerial header is cut short")?;
    while !rest.is_empty() {
        let (len, body) = rest
            .split_first_chunk::<4>()
            .ok_or("a xerial block length is cut short")?;
        let len = u32::from_be_bytes(*len) as usize;
        let block = body
            .get(..len)
            .ok_or_else(|| format!("a xerial block says {len} bytes, {} remain", body.len()))?;
        raw(block, &mut out)?;
        rest = &body[len..];
    }
    Ok(out)
}

/// Every zstd frame of `input`, decompressed and concatenated (skippable
/// frames skipped).
fn unzstd(mut input: &[u8], limit: usize) -> std::result::Result<Vec<u8>, String> {
    use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
    use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
    let mut decoder = FrameDecoder::new();
    let mut out = Vec::new();
    while !input.is_empty() {
        match decoder.init(&mut input) {
            Ok(()) => {}
            Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                length,
                ..
            })) => {
                input = input
                    .get(length as usize..)
                    .ok_or("a skippable frame is cut short")?;
                continue;
            }
            Err(e) => return Err(e.to_string()),
        }
        while !decoder.is_finished() {
            let before = input.len();
            decoder
                .decode_blocks(&mut input, BlockDecodingStrategy::UptoBytes(1 << 20))
                .map_err(|e| e.to_string())?;
            decoder
                .collect_to_writer(&mut out)
                .map_err(|e| e.to_string())?;
            if out.len() > limit {
                return Err(too_big(limit));
            }
            if input.len() == before && !decoder.is_finished() {
                return Err("a frame is cut short".into());
            }
        }
        decoder
            .collect_to_writer(&mut out)
            .map_err(|e| e.to_string())?;
    }
    within(out, limit)
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
    fn text(n: usize) -> Vec<u8> {
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
