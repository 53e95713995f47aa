//! A store in memory: the same contract as [`crate::RedbStore`], nothing on disk.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::RwLock;

use crate::error::Result;
use crate::store::{Durability, Store, WriteBatch};

#[derive(Debug, Default)]
struct Inner {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
    offset: Option<i64>,
}

/// A [`Store`] in memory, for tests and for tables that accept a full replay
/// of their changelog on every start.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .get(key)
            .cloned())
    }

    fn range(
        &self,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        Ok(inner
            .data
            .range::<[u8], _>((from, to))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn apply(
        &self,
        batch: &WriteBatch,
        changelog_offset: Option<i64>,
        _durability: Durability,
    ) -> Result<()> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for (k, v) in batch.iter() {
            match v {
                Some(v) => inner.data.insert(k.to_vec(), v.to_vec()),
                None => inner.data.remove(k),
            };
        }
        if changelog_offset.is_some() {
            inner.offset = changelog_offset;
        }
        Ok(())
    }

    fn changelog_offset(&self) -> Result<Option<i64>> {
        Ok(self.inner.read().unwrap_or_else(|e| e.into_inner()).offset)
    }

    fn len(&self) -> Result<u64> {
        Ok(self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .data
            .len() as u64)
    }
}

#[cfg(test)]
mod tests {
    /// The store contract holds in memory.
    #[test]
    fn memory_store_keeps_the_contract() {
        crate::store::contract::check(&super::MemoryStore::new());
    }
}
