//! The typed layer: `Table<K, V>` over a [`LoggedStore`], with keys encoded so
//! byte order is key order and values through serde (JSON).

use std::marker::PhantomData;
use std::ops::Bound;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, StateError};
use crate::logged::LoggedStore;
use crate::store::Durability;

/// A table key: encoded so that comparing the bytes compares the keys, which
/// makes range scans follow key order.
///
/// Unsigned integers are big-endian; signed ones big-endian with the sign bit
/// flipped; strings are their UTF-8 bytes; `Vec<u8>` is itself. Tuples of
/// up to four keys are composite keys, ordered by their first part, then
/// their second, and so on: each part is written so that it ends itself
/// (fixed-size parts as they are, others with their zero bytes escaped and a
/// terminator), so a range over a prefix of the parts finds every key that
/// starts with it. A tuple's text (in a URL) is a JSON array of its parts.
///
/// ```
/// use strom_state::table::TableKey;
/// assert!((-3i64).encode_key() < 2i64.encode_key());
/// assert_eq!(i64::decode_key(&(-3i64).encode_key()).unwrap(), -3);
/// assert_eq!(i64::parse_key("-3").unwrap(), -3);
///
/// let key = ("ada".to_string(), 7u32);
/// assert!(key.encode_key() < ("ada".to_string(), 8u32).encode_key());
/// assert!(key.encode_key() < ("adam".to_string(), 0u32).encode_key());
/// assert_eq!(<(String, u32)>::decode_key(&key.encode_key()).unwrap(), key);
/// assert_eq!(<(String, u32)>::parse_key(r#"["ada", 7]"#).unwrap(), key);
/// ```
pub trait TableKey: Sized {
    /// The key's bytes.
    fn encode_key(&self) -> Vec<u8>;
    /// The key from its bytes.
    fn decode_key(bytes: &[u8]) -> Result<Self>;
    /// The key from its text, as written in a URL or on a command line.
    fn parse_key(text: &str) -> Result<Self>;

    /// Appends the key as one part of a composite key: in an encoding that
    /// ends itself and sorts as [`encode_key`](TableKey::encode_key) does.
    /// By default its bytes with each zero byte escaped (`00 ff`) and a
    /// terminator (`00 01`); fixed-size keys write their bytes as they are.
    fn encode_part(&self, out: &mut Vec<u8>) {
        escape_part(&self.encode_key(), out);
    }

    /// Reads a key written by [`encode_part`](TableKey::encode_part) from
    /// the front of `bytes`: the key and the bytes after it.
    fn decode_part(bytes: &[u8]) -> Result<(Self, &[u8])> {
        let (part, rest) = unescape_part(bytes)?;
        Ok((Self::decode_key(&part)?, rest))
    }
}

/// Appends `bytes` as a part that ends itself and sorts like `bytes`: each
/// zero byte as `00 ff`, then `00 01`. A shorter part sorts before any
/// longer one it begins, because the terminator's `01` is below the `ff`
/// of an escaped zero and `00` is below any other byte.
fn escape_part(bytes: &[u8], out: &mut Vec<u8>) {
    for &b in bytes {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.extend_from_slice(&[0, 1]);
}

/// Reads a part written by [`escape_part`]: its bytes and what follows it.
fn unescape_part(bytes: &[u8]) -> Result<(Vec<u8>, &[u8])> {
    let mut part = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (0, Some(0xff)) => part.push(0),
            (0, Some(1)) => return Ok((part, &bytes[i + 2..])),
            (0, _) => break,
            (b, _) => {
                part.push(b);
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    Err(StateError::Codec {
        what: format!(
            "a composite key part is not terminated in {} bytes",
            bytes.len()
        ),
    })
}

/// Reads a fixed-size part of `n` bytes from the front of `bytes`.
fn fixed_part<K: TableKey>(bytes: &[u8], n: usize) -> Result<(K, &[u8])> {
    if bytes.len() < n {
        return Err(key_error("fixed-size", bytes));
    }
    let (part, rest) = bytes.split_at(n);
    Ok((K::decode_key(part)?, rest))
}

fn parse_error(what: &str, text: &str) -> StateError {
    StateError::Codec {
        what: format!("{text:?} is not a {what} key"),
    }
}

fn key_error(what: &str, bytes: &[u8]) -> StateError {
    StateError::Codec {
        what: format!("cannot decode a {what} key from {} bytes", bytes.len()),
    }
}

macro_rules! unsigned_key {
    ($($t:ty),*) => {$(
        impl TableKey for $t {
            fn encode_key(&self) -> Vec<u8> {
                self.to_be_bytes().to_vec()
            }
            fn decode_key(bytes: &[u8]) -> Result<Self> {
                let array = bytes.try_into().map_err(|_| key_error(stringify!($t), bytes))?;
                Ok(<$t>::from_be_bytes(array))
            }
            fn parse_key(text: &str) -> Result<Self> {
                text.parse().map_err(|_| parse_error(stringify!($t), text))
            }
            fn encode_part(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            fn decode_part(bytes: &[u8]) -> Result<(Self, &[u8])> {
                fixed_part(bytes, std::mem::size_of::<$t>())
            }
        }
    )*};
}

macro_rules! signed_key {
    ($($t:ty => $u:ty),*) => {$(
        impl TableKey for $t {
            fn encode_key(&self) -> Vec<u8> {
                ((*self as $u) ^ (1 << (<$u>::BITS - 1))).to_be_bytes().to_vec()
            }
            fn decode_key(bytes: &[u8]) -> Result<Self> {
                let array = bytes.try_into().map_err(|_| key_error(stringify!($t), bytes))?;
                Ok((<$u>::from_be_bytes(array) ^ (1 << (<$u>::BITS - 1))) as $t)
            }
            fn parse_key(text: &str) -> Result<Self> {
                text.parse().map_err(|_| parse_error(stringify!($t), text))
            }
            fn encode_part(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.encode_key());
            }
            fn decode_part(bytes: &[u8]) -> Result<(Self, &[u8])> {
                fixed_part(bytes, std::mem::size_of::<$t>())
            }
        }
    )*};
}

unsigned_key!(u8, u16, u32, u64);
signed_key!(i8 => u8, i16 => u16, i32 => u32, i64 => u64);

impl TableKey for String {
    fn encode_key(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        String::from_utf8(bytes.to_vec()).map_err(|_| key_error("UTF-8 string", bytes))
    }
    fn parse_key(text: &str) -> Result<Self> {
        Ok(text.to_owned())
    }
}

impl TableKey for Vec<u8> {
    fn encode_key(&self) -> Vec<u8> {
        self.clone()
    }
    fn decode_key(bytes: &[u8]) -> Result<Self> {
        Ok(bytes.to_vec())
    }
    /// The text's UTF-8 bytes.
    fn parse_key(text: &str) -> Result<Self> {
        Ok(text.as_bytes().to_vec())
    }
}

/// The parts of a composite key's text: a JSON array, each element a part's
/// text (a string as its content, anything else as its JSON). Public for
/// [`table_key!`](crate::table_key); not an API of its own.
#[doc(hidden)]
pub fn parse_parts(text: &str, n: usize) -> Result<Vec<String>> {
    let wrong = || StateError::Codec {
        what: format!("{text:?} is not a composite key: a JSON array of {n} parts"),
    };
    let parts: Vec<serde_json::Value> = serde_json::from_str(text).map_err(|_| wrong())?;
    if parts.len() != n {
        return Err(wrong());
    }
    Ok(parts
        .into_iter()
        .map(|p| match p {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .collect())
}

macro_rules! tuple_key {
    ($n:literal: $($t:ident),+) => {
        impl<$($t: TableKey),+> TableKey for ($($t,)+) {
            fn encode_key(&self) -> Vec<u8> {
                let mut out = Vec::new();
                self.encode_part(&mut out);
                out
            }
            fn decode_key(bytes: &[u8]) -> Result<Self> {
                let (key, rest) = Self::decode_part(bytes)?;
                if !rest.is_empty() {
                    return Err(StateError::Codec {
                        what: format!("{} bytes after a composite key", rest.len()),
                    });
                }
                Ok(key)
            }
            fn parse_key(text: &str) -> Result<Self> {
                let mut parts = parse_parts(text, $n)?.into_iter();
                Ok(($($t::parse_key(&parts.next().unwrap_or_default())?,)+))
            }
            #[allow(non_snake_case)]
            fn encode_part(&self, out: &mut Vec<u8>) {
                let ($($t,)+) = self;
                $($t.encode_part(out);)+
            }
            #[allow(non_snake_case)]
            fn decode_part(bytes: &[u8]) -> Result<(Self, &[u8])> {
                let rest = bytes;
                $(let ($t, rest) = $t::decode_part(rest)?;)+
                Ok((($($t,)+), rest))
            }
        }
    };
}

tuple_key!(2: A, B);
tuple_key!(3: A, B, C);
tuple_key!(4: A, B, C, D);

/// Composite keys that begin with the parts `P`: `(A, B)` and longer tuples
/// begin with `A`, `(A, B, C)` and longer with `(A, B)`, and so on. Their
/// keys sort together: [`prefix_bounds`] bounds them.
pub trait KeyPrefix<P: TableKey>: TableKey {}

impl<A: TableKey, B: TableKey> KeyPrefix<A> for (A, B) {}
impl<A: TableKey, B: TableKey, C: TableKey> KeyPrefix<A> for (A, B, C) {}
impl<A: TableKey, B: TableKey, C: TableKey> KeyPrefix<(A, B)> for (A, B, C) {}
impl<A: TableKey, B: TableKey, C: TableKey, D: TableKey> KeyPrefix<A> for (A, B, C, D) {}
impl<A: TableKey, B: TableKey, C: TableKey, D: TableKey> KeyPrefix<(A, B)> for (A, B, C, D) {}
impl<A: TableKey, B: TableKey, C: TableKey, D: TableKey> KeyPrefix<(A, B, C)> for (A, B, C, D) {}

/// Makes a struct a composite table key: its fields are the key's parts, in
/// the order written, encoded as a tuple's are (each part ending itself),
/// so its keys sort field by field and a range over its first field finds
/// every key that begins with it (`Ctx::prefix`, with the struct
/// [`KeyPrefix`] of the first field's type). Its text (in a URL) is a JSON
/// array of the fields' texts. List the struct's fields, with their types
/// (each a [`TableKey`]); the struct itself is declared as usual, so it
/// can also derive serde's traits for topics.
///
/// ```
/// use strom_state::table::{prefix_bounds, TableKey};
/// #[derive(Debug, Clone, PartialEq)]
/// struct Visit {
///     customer: String,
///     day: u32,
/// }
/// strom_state::table_key!(Visit { customer: String, day: u32 });
///
/// let ada3 = Visit { customer: "ada".into(), day: 3 };
/// let ada12 = Visit { customer: "ada".into(), day: 12 };
/// let adam1 = Visit { customer: "adam".into(), day: 1 };
/// assert!(ada3.encode_key() < ada12.encode_key() && ada12.encode_key() < adam1.encode_key());
/// assert_eq!(Visit::decode_key(&ada12.encode_key()).unwrap(), ada12);
/// assert_eq!(Visit::parse_key(r#"["ada", 12]"#).unwrap(), ada12);
/// let (from, to) = prefix_bounds(&"ada".to_string());
/// assert!(std::ops::RangeBounds::contains(&(from, to), &ada12.encode_key()));
/// ```
#[macro_export]
macro_rules! table_key {
    ($name:ident { $first:ident : $first_type:ty $(, $field:ident : $type:ty)* $(,)? }) => {
        impl $crate::table::TableKey for $name {
            fn encode_key(&self) -> Vec<u8> {
                let mut out = Vec::new();
                $crate::table::TableKey::encode_part(self, &mut out);
                out
            }
            fn decode_key(bytes: &[u8]) -> $crate::Result<Self> {
                let (key, rest) = <Self as $crate::table::TableKey>::decode_part(bytes)?;
                if !rest.is_empty() {
                    return Err($crate::StateError::Codec {
                        what: format!("{} bytes after a {} key", rest.len(), stringify!($name)),
                    });
                }
                Ok(key)
            }
            fn parse_key(text: &str) -> $crate::Result<Self> {
                let n = [stringify!($first) $(, stringify!($field))*].len();
                let mut parts = $crate::table::parse_parts(text, n)?.into_iter();
                let mut next = || parts.next().unwrap_or_default();
                Ok($name {
                    $first: <$first_type as $crate::table::TableKey>::parse_key(&next())?,
                    $($field: <$type as $crate::table::TableKey>::parse_key(&next())?,)*
                })
            }
            fn encode_part(&self, out: &mut Vec<u8>) {
                $crate::table::TableKey::encode_part(&self.$first, out);
                $($crate::table::TableKey::encode_part(&self.$field, out);)*
            }
            fn decode_part(bytes: &[u8]) -> $crate::Result<(Self, &[u8])> {
                let ($first, rest) = <$first_type as $crate::table::TableKey>::decode_part(bytes)?;
                $(let ($field, rest) = <$type as $crate::table::TableKey>::decode_part(rest)?;)*
                Ok(($name { $first $(, $field)* }, rest))
            }
        }
        impl $crate::table::KeyPrefix<$first_type> for $name {}
    };
}

/// The bounds of the encoded keys that begin with `prefix`'s parts: from its
/// parts' bytes up to the first byte string after all that begin with them.
///
/// ```
/// use std::ops::RangeBounds;
/// use strom_state::table::{prefix_bounds, TableKey};
/// let (from, to) = prefix_bounds(&"ada".to_string());
/// let key = ("ada".to_string(), 7u32).encode_key();
/// assert!((from.clone(), to.clone()).contains(&key));
/// let other = ("adam".to_string(), 7u32).encode_key();
/// assert!(!(from, to).contains(&other));
/// ```
pub fn prefix_bounds<P: TableKey>(prefix: &P) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    let mut from = Vec::new();
    prefix.encode_part(&mut from);
    let mut to = from.clone();
    while to.last() == Some(&0xff) {
        to.pop();
    }
    let to = match to.last_mut() {
        Some(last) => {
            *last += 1;
            Bound::Excluded(to)
        }
        None => Bound::Unbounded,
    };
    (Bound::Included(from), to)
}

/// A table partition of typed keys and values.
///
/// ```no_run
/// # async fn f(logged: strom_state::LoggedStore) -> strom_state::Result<()> {
/// use strom_state::{Durability, Table};
/// let mut totals: Table<String, u64> = Table::new(logged);
/// let now = totals.get(&"alice".to_string())?.unwrap_or(0);
/// totals.put(&"alice".to_string(), &(now + 5)).await?;
/// totals.flush(Durability::Fast).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Table<K, V> {
    logged: LoggedStore,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K: TableKey, V: Serialize + DeserializeOwned> Table<K, V> {
    /// The typed view of `logged`.
    pub fn new(logged: LoggedStore) -> Self {
        Table {
            logged,
            types: PhantomData,
        }
    }

    /// The byte-level store with its changelog.
    pub fn logged(&self) -> &LoggedStore {
        &self.logged
    }

    fn decode_value(bytes: &[u8]) -> Result<V> {
        serde_json::from_slice(bytes).map_err(|e| StateError::Codec {
            what: format!("cannot decode a table value: {e}"),
        })
    }

    /// The value of `key` (changes not yet flushed included).
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        self.logged
            .get(&key.encode_key())?
            .map(|b| Self::decode_value(&b))
            .transpose()
    }

    /// Sets `key` to `value`.
    pub async fn put(&mut self, key: &K, value: &V) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(|e| StateError::Codec {
            what: format!("cannot encode a table value: {e}"),
        })?;
        self.logged.put(key.encode_key(), bytes).await
    }

    /// Deletes `key`.
    pub async fn delete(&mut self, key: &K) -> Result<()> {
        self.logged.delete(key.encode_key()).await
    }

    /// Up to `limit` entries with keys within the bounds, in key order, as of
    /// the last flush.
    pub fn range(&self, from: Bound<&K>, to: Bound<&K>, limit: usize) -> Result<Vec<(K, V)>> {
        let enc = |b: Bound<&K>| b.map(TableKey::encode_key);
        let (from, to) = (enc(from), enc(to));
        self.logged
            .store()
            .range(
                from.as_ref().map(Vec::as_slice),
                to.as_ref().map(Vec::as_slice),
                limit,
            )?
            .into_iter()
            .map(|(k, v)| Ok((K::decode_key(&k)?, Self::decode_value(&v)?)))
            .collect()
    }

    /// Closes the partition (durable flush); see [`LoggedStore::close`].
    pub async fn close(self) -> Result<Option<i64>> {
        self.logged.close().await
    }

    /// Commits every change since the last flush once the changelog has it;
    /// see [`LoggedStore::flush`].
    pub async fn flush(&mut self, durability: Durability) -> Result<Option<i64>> {
        self.logged.flush(durability).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encoded integer and string keys sort like the keys, and decode back.
    #[test]
    fn encoded_keys_sort_like_keys() {
        let ints = [i64::MIN, -300, -1, 0, 1, 255, 256, i64::MAX];
        let enc: Vec<_> = ints.iter().map(TableKey::encode_key).collect();
        assert!(enc.windows(2).all(|w| w[0] < w[1]), "i64 order");
        for i in ints {
            assert_eq!(i64::decode_key(&i.encode_key()).unwrap(), i);
        }
        let small = [-2i16, -1, 0, 7];
        let enc: Vec<_> = small.iter().map(TableKey::encode_key).collect();
        assert!(enc.windows(2).all(|w| w[0] < w[1]), "i16 order");
        let words = ["", "a", "ab", "b", "ä"];
        let enc: Vec<_> = words.iter().map(|w| w.to_string().encode_key()).collect();
        assert!(enc.windows(2).all(|w| w[0] < w[1]), "string order");
        assert_eq!(u32::decode_key(&7u32.encode_key()).unwrap(), 7);
        assert!(u32::decode_key(&[1, 2]).is_err());
        assert!(String::decode_key(&[0xff]).is_err());
    }
}

#[cfg(test)]
mod composite {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Composite keys sort as their parts do, one after the other, and
        /// decode back, whatever bytes (zeros included) the parts hold.
        #[test]
        fn composite_keys_sort_like_tuples(
            a in (any::<Vec<u8>>(), any::<i32>(), any::<String>()),
            b in (any::<Vec<u8>>(), any::<i32>(), any::<String>()),
            short in prop::collection::vec(0u8..3, 0..4),
            long in prop::collection::vec(0u8..3, 0..4),
        ) {
            let (ea, eb) = (a.encode_key(), b.encode_key());
            prop_assert_eq!(a.cmp(&b), ea.cmp(&eb));
            prop_assert_eq!(<(Vec<u8>, i32, String)>::decode_key(&ea).unwrap(), a);
            // Parts of zeros and small bytes, where escaping matters most.
            let (x, y) = ((short.clone(), 1u8 as u16), (long.clone(), 0u16));
            prop_assert_eq!(x.cmp(&y), x.encode_key().cmp(&y.encode_key()));
        }

        /// A composite key's prefix bounds exactly the keys that start
        /// with it: every key with first part `p` sorts between `(p, MIN)`
        /// and `(p, MAX)`, and no other key does.
        #[test]
        fn a_prefix_bounds_its_keys(
            p in any::<String>(),
            q in any::<String>(),
            n in any::<u64>(),
        ) {
            let (lo, hi) = ((p.clone(), 0u64).encode_key(), (p.clone(), u64::MAX).encode_key());
            let key = (q.clone(), n).encode_key();
            prop_assert_eq!(lo <= key && key <= hi, p == q);
        }
    }

    proptest! {
        /// The bounds of a prefix hold exactly the keys that begin with it,
        /// a prefix of zeros and `ff` bytes included.
        #[test]
        fn prefix_bounds_hold_the_keys_of_the_prefix(
            p in prop::collection::vec(prop::sample::select(vec![0u8, 1, 0xfe, 0xff]), 0..4),
            q in prop::collection::vec(prop::sample::select(vec![0u8, 1, 0xfe, 0xff]), 0..4),
            n in any::<u16>(),
            m in any::<u8>(),
        ) {
            use std::ops::RangeBounds;
            let bounds = prefix_bounds(&p);
            let key = (q.clone(), n, m).encode_key();
            prop_assert_eq!(bounds.contains(&key), p == q);
            let pair = prefix_bounds(&(q.clone(), n));
            prop_assert!(pair.contains(&key));
        }
    }

    #[test]
    fn damaged_composite_keys_are_errors() {
        let key = ("ab".to_string(), 7u32).encode_key();
        for cut in 0..key.len() {
            assert!(
                <(String, u32)>::decode_key(&key[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut extra = key.clone();
        extra.push(1);
        assert!(<(String, u32)>::decode_key(&extra).is_err());
        assert!(<(String, u32)>::parse_key("[\"ab\"]").is_err());
        assert!(<(String, u32)>::parse_key("ab,7").is_err());
        assert_eq!(
            <(String, u32)>::parse_key("[\"ab\", 7]").unwrap(),
            ("ab".to_string(), 7)
        );
    }
}
