//! The store of a global table: every partition of its source topic in one
//! store, each partition with its own offset.
//!
//! A global table (Kafka Streams' GlobalKTable, Faust's GlobalTable) holds
//! all of a topic, whichever partitions its keys were written to: a key is
//! looked up once, not in every partition. Each partition is replayed and
//! tailed like a changelog through [`GlobalStore::partition`], a [`Store`]
//! whose writes commit the partition's offset with the data, atomically: a
//! crash leaves every partition's offset matching the data it reflects.
//!
//! Layout inside the one store: data keys are prefixed with `01`, the offset
//! of partition `p` lives under `00` + `p` (4 bytes, big-endian). A key
//! written to two partitions holds the value applied last.
//!
//! ```
//! use std::sync::Arc;
//! use strom_state::global::GlobalStore;
//! use strom_state::{Durability, MemoryStore, Store, WriteBatch};
//!
//! let global = GlobalStore::new(Arc::new(MemoryStore::new()));
//! let mut batch = WriteBatch::default();
//! batch.put(b"ada".to_vec(), b"DE".to_vec());
//! global.partition(2).apply(&batch, Some(41), Durability::Fast)?;
//! assert_eq!(global.get(b"ada")?.as_deref(), Some(&b"DE"[..]));
//! assert_eq!(global.partition(2).changelog_offset()?, Some(41));
//! assert_eq!(global.partition(0).changelog_offset()?, None);
//! # Ok::<(), strom_state::StateError>(())
//! ```

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use crate::error::{Result, StateError};
use crate::store::{Durability, Store, WriteBatch};

const OFFSETS: u8 = 0;
const DATA: u8 = 1;

/// Bytes of keys and values the read cache of one global table holds at
/// most (it starts over when full).
const CACHE_BYTES: usize = 16 << 20;

/// One store holding every partition of a global table's source topic.
#[derive(Debug, Clone)]
pub struct GlobalStore {
    inner: Arc<dyn Store>,
    cache: Arc<Mutex<Cache>>,
}

/// The values (and absences) of keys read lately: lookups of a global table
/// come from every event of every partition, and a hash map answers them
/// several times faster than the store's B-tree. Every write through a
/// partition view drops the keys it touches, after it commits; a read that
/// missed stores its value only if no write came in between (`epoch`), so
/// the cache never holds a value older than the store's.
#[derive(Debug, Default)]
struct Cache {
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
    /// Bumped by every write.
    epoch: u64,
}

impl GlobalStore {
    /// A global table in `inner` (fresh, or one this type wrote).
    pub fn new(inner: Arc<dyn Store>) -> GlobalStore {
        GlobalStore {
            inner,
            cache: Arc::default(),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `key` (the key bytes as the source topic's records
    /// carry them).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let epoch = {
            let cache = self.cache();
            if let Some(value) = cache.values.get(key) {
                return Ok(value.clone());
            }
            cache.epoch
        };
        let value = self.inner.get(&data_key(key))?;
        let mut cache = self.cache();
        if cache.epoch == epoch {
            let size = entry_size(key, value.as_deref());
            if cache.bytes + size > CACHE_BYTES {
                cache.values.clear();
                cache.bytes = 0;
            }
            cache.bytes += size;
            if let Some(old) = cache.values.insert(key.to_vec(), value.clone()) {
                let old = entry_size(key, old.as_deref());
                cache.bytes = cache.bytes.saturating_sub(old);
            }
        }
        Ok(value)
    }

    /// Partition `partition` of the source topic as a store of its own:
    /// replay and tail it with [`recover_with_progress`](crate::recover_with_progress)
    /// and [`Standby`](crate::Standby).
    pub fn partition(&self, partition: i32) -> Arc<dyn Store> {
        Arc::new(Partition {
            global: self.clone(),
            partition,
        })
    }

    /// Number of keys.
    pub fn len(&self) -> Result<u64> {
        let offsets = self
            .inner
            .range(
                Bound::Included(&[OFFSETS][..]),
                Bound::Excluded(&[DATA][..]),
                usize::MAX,
            )?
            .len() as u64;
        Ok(self.inner.len()?.saturating_sub(offsets))
    }

    /// Whether it holds no keys.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// What one cached entry costs: its key and value, and the map's entry
/// and allocations (about 64 bytes), so absent keys count too.
fn entry_size(key: &[u8], value: Option<&[u8]>) -> usize {
    64 + key.len() + value.map_or(0, <[u8]>::len)
}

fn data_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(DATA);
    k.extend_from_slice(key);
    k
}

fn offset_key(partition: i32) -> [u8; 5] {
    let p = partition.to_be_bytes();
    [OFFSETS, p[0], p[1], p[2], p[3]]
}

/// One partition's view of a [`GlobalStore`]: reads see every partition's
/// keys; writes carry this partition's offset.
#[derive(Debug)]
struct Partition {
    global: GlobalStore,
    partition: i32,
}

impl Store for Partition {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.global.get(key)
    }

    fn range(
        &self,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let owned = |b: Bound<&[u8]>| b.map(data_key);
        let (from, to) = (owned(from), owned(to));
        let start = [DATA];
        let end = [DATA + 1];
        let from = match &from {
            Bound::Unbounded => Bound::Included(&start[..]),
            b => b.as_ref().map(Vec::as_slice),
        };
        let to = match &to {
            Bound::Unbounded => Bound::Excluded(&end[..]),
            b => b.as_ref().map(Vec::as_slice),
        };
        let mut entries = self.global.inner.range(from, to, limit)?;
        for (k, _) in &mut entries {
            k.remove(0);
        }
        Ok(entries)
    }

    fn apply(
        &self,
        batch: &WriteBatch,
        changelog_offset: Option<i64>,
        durability: Durability,
    ) -> Result<()> {
        let mut prefixed = WriteBatch::default();
        for (key, value) in batch.iter() {
            match value {
                Some(v) => prefixed.put(data_key(key), v.to_vec()),
                None => prefixed.delete(data_key(key)),
            }
        }
        if let Some(offset) = changelog_offset {
            prefixed.put(
                offset_key(self.partition).to_vec(),
                offset.to_be_bytes().to_vec(),
            );
        }
        let applied = self.global.inner.apply(&prefixed, None, durability);
        // After the commit (or a failure, which may have written some):
        // readers that missed before it do not fill the cache.
        let mut cache = self.global.cache();
        cache.epoch += 1;
        for (key, _) in batch.iter() {
            if let Some(old) = cache.values.remove(key) {
                let old = entry_size(key, old.as_deref());
                cache.bytes = cache.bytes.saturating_sub(old);
            }
        }
        applied
    }

    fn changelog_offset(&self) -> Result<Option<i64>> {
        let Some(bytes) = self.global.inner.get(&offset_key(self.partition))? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = bytes.as_slice().try_into().map_err(|_| StateError::Codec {
            what: format!(
                "the offset of partition {} in a global table's store is {} bytes, not 8",
                self.partition,
                bytes.len()
            ),
        })?;
        Ok(Some(i64::from_be_bytes(bytes)))
    }

    fn len(&self) -> Result<u64> {
        self.global.len()
    }

    fn mark_damaged(&self, why: &str) -> Result<()> {
        self.global.inner.mark_damaged(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn put(store: &Arc<dyn Store>, key: &[u8], value: &[u8], offset: i64) {
        let mut b = WriteBatch::default();
        b.put(key.to_vec(), value.to_vec());
        store.apply(&b, Some(offset), Durability::Fast).unwrap();
    }

    /// Reads through the cache see every write of any partition view: an
    /// absence, a value and a delete, each read before and after.
    #[test]
    fn cached_reads_follow_every_write() {
        let global = GlobalStore::new(Arc::new(MemoryStore::new()));
        let (p0, p1) = (global.partition(0), global.partition(1));
        assert_eq!(global.get(b"a").unwrap(), None);
        put(&p0, b"a", b"1", 1);
        assert_eq!(global.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(p1.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        put(&p1, b"a", b"2", 1);
        assert_eq!(global.get(b"a").unwrap().as_deref(), Some(&b"2"[..]));
        let mut delete = WriteBatch::default();
        delete.delete(b"a".to_vec());
        p0.apply(&delete, Some(2), Durability::Fast).unwrap();
        assert_eq!(global.get(b"a").unwrap(), None);
        // Many keys past the cache's size: it starts over, reads stay right.
        let big = vec![7u8; 1 << 20];
        for i in 0..40u8 {
            put(&p0, &[b'k', i], &big, 3 + i64::from(i));
            assert_eq!(
                global.get(&[b'k', i]).unwrap().map(|v| v.len()),
                Some(1 << 20)
            );
        }
        assert!(global.cache().bytes <= CACHE_BYTES);
    }

    /// Partitions keep their own offsets; reads and scans see every
    /// partition's keys and nothing of the offsets.
    #[test]
    fn partitions_share_keys_and_keep_their_offsets() {
        let global = GlobalStore::new(Arc::new(MemoryStore::new()));
        let (p0, p1) = (global.partition(0), global.partition(1));
        put(&p0, b"a", b"1", 10);
        put(&p1, b"b", b"2", 3);
        put(&p1, b"\x00", b"zero", 4);
        assert_eq!(p0.changelog_offset().unwrap(), Some(10));
        assert_eq!(p1.changelog_offset().unwrap(), Some(4));
        assert_eq!(global.partition(7).changelog_offset().unwrap(), None);
        assert_eq!(global.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(p0.get(b"b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(global.len().unwrap(), 3);
        let all = p0
            .range(Bound::Unbounded, Bound::Unbounded, usize::MAX)
            .unwrap();
        let keys: Vec<&[u8]> = all.iter().map(|(k, _)| k.as_slice()).collect();
        assert_eq!(keys, [&b"\x00"[..], b"a", b"b"]);
        let from_a = p1
            .range(Bound::Excluded(b"a"), Bound::Unbounded, usize::MAX)
            .unwrap();
        assert_eq!(from_a, vec![(b"b".to_vec(), b"2".to_vec())]);

        // A tombstone in either partition deletes; the last write wins.
        let mut gone = WriteBatch::default();
        gone.delete(b"a".to_vec());
        p1.apply(&gone, Some(5), Durability::Fast).unwrap();
        assert_eq!(global.get(b"a").unwrap(), None);
        assert_eq!(p1.changelog_offset().unwrap(), Some(5));
        assert_eq!(p0.changelog_offset().unwrap(), Some(10));
    }

    /// A damaged offset is an error that says which partition, not a guess.
    #[test]
    fn a_damaged_offset_is_an_error() {
        let inner: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let mut b = WriteBatch::default();
        b.put(offset_key(3).to_vec(), b"short".to_vec());
        inner.apply(&b, None, Durability::Fast).unwrap();
        let e = GlobalStore::new(inner)
            .partition(3)
            .changelog_offset()
            .unwrap_err();
        assert!(e.to_string().contains("partition 3"), "{e}");
    }
}
