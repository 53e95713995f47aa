//! Huffman-coded literals sections (RFC 8878, 4.2): a tree described by
//! direct 4-bit weights and four streams behind a jump table.

use bytes::{BufMut, BytesMut};

use super::BitWriter;

/// The longest code the format allows.
const MAX_BITS: u32 = 11;
/// Fewer literals than this are not worth a tree.
const MIN_LITERALS: usize = 64;
/// Direct weights describe symbols 0 to 127; the weight of one more symbol
/// (the last one used) is implied.
const MAX_SYMBOL: usize = 128;

/// Appends `literals` as a compressed literals section and returns true,
/// or appends nothing and returns false when they are too few, use one
/// byte only, use a byte above 128, or would not get smaller.
pub(super) fn encode(literals: &[u8], out: &mut BytesMut) -> bool {
    let n = literals.len();
    if n < MIN_LITERALS {
        return false;
    }
    let mut counts = [0u32; 256];
    for &b in literals {
        counts[b as usize] += 1;
    }
    let Some(last) = counts.iter().rposition(|&c| c > 0) else {
        return false;
    };
    if last > MAX_SYMBOL || counts.iter().filter(|&&c| c > 0).count() < 2 {
        return false;
    }
    let lengths = limited_lengths(&counts[..=last]);
    let codes = canonical_codes(&lengths);
    let max_bits = lengths.iter().copied().max().unwrap_or(0);

    let mut body = BytesMut::with_capacity(n);
    // The tree: 127 + the number of stored weights, then the weights of
    // symbols 0..last, two to a byte, high nibble first.
    body.put_u8((127 + last) as u8);
    let weight = |s: usize| match lengths[s] {
        0 => 0,
        len => (max_bits + 1 - len) as u8,
    };
    for s in (0..last).step_by(2) {
        let low = if s + 1 < last { weight(s + 1) } else { 0 };
        body.put_u8(weight(s) << 4 | low);
    }
    // Four streams of (n + 3) / 4 literals (the last one takes the rest),
    // each written backwards so that the decoder reads them forwards.
    // (With at least MIN_LITERALS there are always four.)
    let segment = n.div_ceil(4);
    let jump_table_at = body.len();
    body.put_bytes(0, 6);
    let mut sizes = [0usize; 4];
    for (i, part) in literals.chunks(segment).enumerate() {
        let start = body.len();
        let mut bits = BitWriter::new(&mut body);
        for &b in part.iter().rev() {
            bits.add(codes[b as usize], lengths[b as usize]);
        }
        bits.finish(true);
        sizes[i] = body.len() - start;
    }
    if sizes[..3].iter().any(|&s| s > usize::from(u16::MAX)) {
        return false;
    }
    for (i, &size) in sizes[..3].iter().enumerate() {
        let at = jump_table_at + 2 * i;
        body[at..at + 2].copy_from_slice(&(size as u16).to_le_bytes());
    }
    let compressed = body.len();
    // Header: type 2 (compressed), a size format for four streams, then the
    // regenerated and compressed sizes in 10, 14 or 18 bits each.
    let biggest = n.max(compressed);
    let (format, field_bits, header_len) = if biggest < 1 << 10 {
        (1u64, 10, 3)
    } else if biggest < 1 << 14 {
        (2, 14, 4)
    } else {
        (3, 18, 5)
    };
    if header_len + compressed >= n {
        return false;
    }
    let header = 2 | format << 2 | (n as u64) << 4 | (compressed as u64) << (4 + field_bits);
    out.put_slice(&header.to_le_bytes()[..header_len]);
    out.put_slice(&body);
    true
}

/// Code lengths of a Huffman code for `counts`, none longer than
/// `MAX_BITS`: where the optimal code is deeper, the counts are flattened
/// (halved, keeping every used symbol) until it is not. 0 for unused
/// symbols.
fn limited_lengths(counts: &[u32]) -> Vec<u32> {
    let mut counts = counts.to_vec();
    loop {
        let lengths = huffman_lengths(&counts);
        if lengths.iter().all(|&l| l <= MAX_BITS) {
            return lengths;
        }
        for c in counts.iter_mut().filter(|c| **c > 0) {
            *c = (*c).div_ceil(2);
        }
    }
}

/// Optimal code lengths (depths in a Huffman tree) for at least two used
/// symbols.
fn huffman_lengths(counts: &[u32]) -> Vec<u32> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Nodes: the leaves first, then each merge; parent links give depths.
    let mut parent: Vec<usize> = Vec::new();
    let mut heap = BinaryHeap::new();
    let mut leaf_node = vec![usize::MAX; counts.len()];
    for (s, &c) in counts.iter().enumerate() {
        if c > 0 {
            leaf_node[s] = parent.len();
            heap.push(Reverse((u64::from(c), parent.len())));
            parent.push(usize::MAX);
        }
    }
    while heap.len() > 1 {
        let (Some(Reverse((a, x))), Some(Reverse((b, y)))) = (heap.pop(), heap.pop()) else {
            break;
        };
        let node = parent.len();
        parent.push(usize::MAX);
        parent[x] = node;
        parent[y] = node;
        heap.push(Reverse((a + b, node)));
    }
    // Parents come after their children, so depths fill in from the root.
    let mut depth = vec![0u32; parent.len()];
    for node in (0..parent.len()).rev() {
        if parent[node] != usize::MAX {
            depth[node] = depth[parent[node]] + 1;
        }
    }
    leaf_node
        .iter()
        .map(|&node| if node == usize::MAX { 0 } else { depth[node] })
        .collect()
}

/// The format's canonical codes: symbols in order of length, longest first,
/// then of value, take consecutive codes, shifted right when the length
/// shrinks.
fn canonical_codes(lengths: &[u32]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..lengths.len()).filter(|&s| lengths[s] > 0).collect();
    order.sort_by_key(|&s| (std::cmp::Reverse(lengths[s]), s));
    let mut codes = vec![0; lengths.len()];
    let mut code = 0u32;
    let mut length = order.first().map_or(0, |&s| lengths[s]);
    for s in order {
        code >>= length - lengths[s];
        length = lengths[s];
        codes[s] = code;
        code += 1;
    }
    codes
}

#[cfg(test)]
pub(super) mod tests_support {
    /// The depth an unlimited Huffman code for `counts` would reach.
    pub(in crate::compression::zstd) fn unlimited_depth(counts: &[u32]) -> u32 {
        let last = counts.iter().rposition(|&c| c > 0).unwrap_or(0);
        super::huffman_lengths(&counts[..=last])
            .into_iter()
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 8878, 4.2.1.1: weights 4 3 2 0 1 1 give the
    /// codes 1, 01, 001, -, 0000, 0001.
    #[test]
    fn canonical_codes_follow_the_rfc_example() {
        let lengths = [1, 2, 3, 0, 4, 4];
        assert_eq!(
            canonical_codes(&lengths),
            [0b1, 0b01, 0b001, 0, 0b0000, 0b0001]
        );
    }

    /// Skewed counts (Fibonacci-like) would need codes longer than 11 bits;
    /// the limited code stays within them and stays complete.
    #[test]
    fn lengths_are_limited_and_complete() {
        let mut counts = vec![0u32; 40];
        let (mut a, mut b) = (1u32, 1u32);
        for c in counts.iter_mut().take(30) {
            *c = a;
            (a, b) = (b, a.saturating_add(b));
        }
        assert!(huffman_lengths(&counts).iter().any(|&l| l > MAX_BITS));
        let lengths = limited_lengths(&counts);
        assert!(lengths.iter().all(|&l| l <= MAX_BITS));
        let kraft: u64 = lengths
            .iter()
            .filter(|&&l| l > 0)
            .map(|&l| 1u64 << (MAX_BITS - l))
            .sum();
        assert_eq!(kraft, 1 << MAX_BITS);
    }

    #[test]
    fn what_cannot_be_coded_is_left_to_raw_literals() {
        let mut out = BytesMut::new();
        assert!(!encode(&[b'a'; 1000], &mut out), "one symbol");
        assert!(!encode(b"short", &mut out), "too few");
        let high: Vec<u8> = (0..1000).map(|i| [b'a', 200][i % 2]).collect();
        assert!(!encode(&high, &mut out), "a byte above 128");
        assert!(out.is_empty());
        assert!(encode(&b"abcabcabdd".repeat(100), &mut out));
    }
}
