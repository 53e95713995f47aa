//! The byte-level store contract that tables sit on.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::error::Result;

/// How hard a flush tries to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Committed in memory: a crash may lose it, which recovery repairs by
    /// replaying the changelog from the last durable offset.
    Fast,
    /// On disk when the call returns (revoke, shutdown, periodic checkpoints).
    Durable,
}

/// Changes applied to a store at once: all of them or none.
///
/// ```
/// let mut b = strom_state::WriteBatch::default();
/// b.put(b"k".to_vec(), b"v".to_vec());
/// b.delete(b"gone".to_vec());
/// assert_eq!(b.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// Key → new value, or `None` for a delete. The last change to a key wins.
    ops: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl WriteBatch {
    /// Sets `key` to `value`.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.insert(key, Some(value));
    }

    /// Deletes `key`.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.insert(key, None);
    }

    /// The pending change to `key`: `Some(None)` is a pending delete.
    pub fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.ops.get(key).map(|v| v.as_deref())
    }

    /// The changes to keys within the bounds, in key order.
    pub fn range<'a>(
        &'a self,
        from: Bound<&'a [u8]>,
        to: Bound<&'a [u8]>,
    ) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> + 'a {
        self.ops
            .range::<[u8], _>((from, to))
            .map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    /// Number of keys changed.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing is changed.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The changes in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], Option<&[u8]>)> {
        self.ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref()))
    }

    /// Forgets every change.
    pub fn clear(&mut self) {
        self.ops.clear();
    }
}

/// A key-value store of bytes that also remembers which changelog offset its
/// contents reflect. Both live in one atomic unit, so after a crash they can
/// never disagree: recovery replays the changelog from that offset + 1.
///
/// Calls block (redb does I/O): async callers use `spawn_blocking` for
/// writes, flushes and scans; point reads are cheap enough to make inline
/// (see [`LoggedStore::get`](crate::LoggedStore::get)).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// The value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>>;

    /// Up to `limit` entries with keys within the bounds, in key order.
    fn range(
        &self,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;

    /// Applies `batch` and, with it, records `changelog_offset` (the offset of
    /// the last changelog record the store now reflects) — atomically.
    fn apply(
        &self,
        batch: &WriteBatch,
        changelog_offset: Option<i64>,
        durability: Durability,
    ) -> Result<()>;

    /// The changelog offset the contents reflect; `None` for a fresh store.
    fn changelog_offset(&self) -> Result<Option<i64>>;

    /// Number of keys.
    fn len(&self) -> Result<u64>;

    /// Whether the store holds no keys.
    fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Records that the store holds something it should not (a value that
    /// does not decode): its next open moves it aside and starts empty, so
    /// it is rebuilt from the changelog. Nothing to do for a store that does
    /// not outlive the process.
    fn mark_damaged(&self, _why: &str) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every [`Store`] implementation must show.
    use super::*;

    fn batch(ops: &[(&str, Option<&str>)]) -> WriteBatch {
        let mut b = WriteBatch::default();
        for (k, v) in ops {
            match v {
                Some(v) => b.put(k.as_bytes().to_vec(), v.as_bytes().to_vec()),
                None => b.delete(k.as_bytes().to_vec()),
            }
        }
        b
    }

    fn keys(entries: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
        entries
            .iter()
            .map(|(k, _)| String::from_utf8(k.clone()).unwrap())
            .collect()
    }

    /// Get, put, delete, range, atomic batches and the changelog offset.
    pub(crate) fn check(store: &dyn Store) {
        assert_eq!(store.get(b"a").unwrap(), None);
        assert_eq!(store.changelog_offset().unwrap(), None);
        assert!(store.is_empty().unwrap());

        store
            .apply(
                &batch(&[("b", Some("2")), ("a", Some("1")), ("c", Some("3"))]),
                Some(10),
                Durability::Fast,
            )
            .unwrap();
        assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(store.changelog_offset().unwrap(), Some(10));
        assert_eq!(store.len().unwrap(), 3);

        // Overwrite, delete and insert in one batch: all visible together.
        store
            .apply(
                &batch(&[("a", Some("one")), ("b", None), ("d", Some("4"))]),
                Some(11),
                Durability::Durable,
            )
            .unwrap();
        assert_eq!(store.get(b"a").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(store.get(b"b").unwrap(), None);
        assert_eq!(store.changelog_offset().unwrap(), Some(11));

        // Range scans follow key order and honour bounds and limits.
        let all = store
            .range(Bound::Unbounded, Bound::Unbounded, usize::MAX)
            .unwrap();
        assert_eq!(keys(&all), ["a", "c", "d"]);
        let mid = store
            .range(Bound::Excluded(b"a"), Bound::Included(b"d"), usize::MAX)
            .unwrap();
        assert_eq!(keys(&mid), ["c", "d"]);
        let first = store
            .range(Bound::Included(b"b"), Bound::Unbounded, 1)
            .unwrap();
        assert_eq!(keys(&first), ["c"]);

        // A batch without an offset keeps the last one.
        store
            .apply(&batch(&[("e", Some("5"))]), None, Durability::Fast)
            .unwrap();
        assert_eq!(store.changelog_offset().unwrap(), Some(11));
        assert_eq!(store.len().unwrap(), 4);
    }
}
