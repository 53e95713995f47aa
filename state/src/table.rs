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
/// flipped; strings are their UTF-8 bytes; `Vec<u8>` is itself.
///
/// ```
/// use strom_state::table::TableKey;
/// assert!((-3i64).encode_key() < 2i64.encode_key());
/// assert_eq!(i64::decode_key(&(-3i64).encode_key()).unwrap(), -3);
/// assert_eq!(i64::parse_key("-3").unwrap(), -3);
/// ```
pub trait TableKey: Sized {
    /// The key's bytes.
    fn encode_key(&self) -> Vec<u8>;
    /// The key from its bytes.
    fn decode_key(bytes: &[u8]) -> Result<Self>;
    /// The key from its text, as written in a URL or on a command line.
    fn parse_key(text: &str) -> Result<Self>;
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
        }
    )*};
}

unsigned_key!(u16, u32, u64);
signed_key!(i16 => u16, i32 => u32, i64 => u64);

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
