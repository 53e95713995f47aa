//! Choosing a partition for a record, the way the Java client does.
//!
//! Keyed records go to `(murmur2(key) & 0x7fffffff) % partitions`, so a key lands
//! where Kafka Streams and every other Java-partitioned producer put it. Records
//! without a key stick to one partition until its batch is closed, then move on
//! (KIP-480): fewer, larger batches than round-robin.

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`).
///
/// ```
/// assert_eq!(strom_client::partitioner::murmur2(b"21"), -973932308);
/// ```
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ len as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key`.
///
/// ```
/// let p = strom_client::partitioner::partition_for_key(b"user-42", 12);
/// assert!((0..12).contains(&p));
/// ```
pub fn partition_for_key(key: &[u8], partitions: usize) -> i32 {
    debug_assert!(partitions > 0);
    ((murmur2(key) & 0x7fff_ffff) as usize % partitions.max(1)) as i32
}

/// A small xorshift generator for picking sticky partitions; not for anything
/// that needs unpredictability.
#[derive(Debug, Clone)]
pub(crate) struct Xorshift(u64);

impl Xorshift {
    pub(crate) fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x2545_f491_4f6c_dd1d);
        Xorshift(nanos | 1)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n.max(1) as u64) as usize
    }
}

/// The sticky choice for records without a key: stays on one partition until
/// told its batch closed, then picks another one at random.
#[derive(Debug, Clone)]
pub(crate) struct Sticky {
    current: Option<i32>,
    rng: Xorshift,
}

impl Sticky {
    pub(crate) fn new() -> Self {
        Sticky {
            current: None,
            rng: Xorshift::seeded(),
        }
    }

    pub(crate) fn partition(&mut self, partitions: usize) -> i32 {
        match self.current {
            Some(p) if (p as usize) < partitions => p,
            _ => {
                let p = self.rng.below(partitions) as i32;
                self.current = Some(p);
                p
            }
        }
    }

    /// The batch of `partition` was closed: move to another partition.
    pub(crate) fn batch_closed(&mut self, partition: i32, partitions: usize) {
        if self.current == Some(partition) {
            self.current = if partitions > 1 {
                let step = 1 + self.rng.below(partitions - 1) as i32;
                Some((partition + step) % partitions as i32)
            } else {
                None
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of Kafka's own `UtilsTest.testMurmur2`.
    #[test]
    fn murmur2_matches_java_client() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (key, want) in cases {
            assert_eq!(murmur2(key), want, "key {:?}", String::from_utf8_lossy(key));
        }
    }

    /// Partitions follow `toPositive(murmur2) % n`, including for negative hashes.
    #[test]
    fn partition_uses_positive_hash() {
        // murmur2("21") is negative: -973932308 & 0x7fffffff = 1173551340.
        assert_eq!(partition_for_key(b"21", 7), 1173551340 % 7);
        assert_eq!(partition_for_key(b"abc", 12), 479470107 % 12);
    }

    /// The sticky partitioner keeps one partition until its batch closes, then moves.
    #[test]
    fn sticky_moves_only_when_batch_closes() {
        let mut s = Sticky::new();
        let p = s.partition(6);
        assert_eq!(s.partition(6), p);
        s.batch_closed(p, 6);
        let q = s.partition(6);
        assert_ne!(p, q);
        s.batch_closed(p, 6); // not the current one: no move
        assert_eq!(s.partition(6), q);
        let mut one = Sticky::new();
        assert_eq!(one.partition(1), 0);
        one.batch_closed(0, 1);
        assert_eq!(one.partition(1), 0);
    }
}
