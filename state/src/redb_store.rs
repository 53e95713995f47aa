//! A store in one redb file.
//!
//! Every [`Store::apply`] is one redb write transaction that writes the data
//! changes and, in the `meta` table, the changelog offset they reflect: data
//! and offset commit together or not at all.
//!
//! With [`Durability::Fast`] a commit is not forced to disk; a crash rolls the
//! file back to the last [`Durability::Durable`] commit — a consistent earlier
//! state whose offset says where the changelog replay must resume. So a crash
//! costs replaying the records since the last durable flush, never a wrong
//! state.

use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadOnlyTable, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use tracing::warn;

use crate::error::{Result, StateError};
use crate::store::{Durability, Store, WriteBatch};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const OFFSET_KEY: &str = "changelog_offset";
/// Page cache per store file: bounded, like Kafka Streams' RocksDB block cache.
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// The file of `table`'s store for `partition` under `state_dir`:
/// `<state_dir>/<table>/<partition>.redb`.
///
/// ```
/// let p = strom_state::redb_store::store_path("/var/lib/app".as_ref(), "totals", 3);
/// assert_eq!(p, std::path::PathBuf::from("/var/lib/app/totals/3.redb"));
/// ```
pub fn store_path(state_dir: &Path, table: &str, partition: i32) -> PathBuf {
    state_dir.join(table).join(format!("{partition}.redb"))
}

/// Deletes the local files of `table` under `state_dir` (nothing in Kafka): the
/// next start rebuilds them from the changelog.
pub fn reset(state_dir: &Path, table: &str) -> Result<()> {
    let dir = state_dir.join(table);
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StateError::Io { path: dir, source }),
    }
}

/// A [`Store`] in a redb database file.
pub struct RedbStore {
    db: Database,
    path: PathBuf,
    /// A read snapshot of the data table, reused by point reads until the next
    /// write commits (a read transaction per get costs more than the get).
    reader: std::sync::RwLock<Option<Arc<Snapshot>>>,
}

/// A read-only view of the data table as of one commit.
type Snapshot = ReadOnlyTable<&'static [u8], &'static [u8]>;

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

/// The file beside a store that says it is damaged (see
/// [`Store::mark_damaged`]).
fn damage_marker(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.damaged", path.display()))
}

impl RedbStore {
    /// Opens the store at `path`, creating it if missing.
    ///
    /// Every page's checksum is verified first. A file that fails (damaged,
    /// truncated, not a database) is moved aside to
    /// `<path>.corrupt-<unix seconds>` — never deleted — and a fresh store is
    /// created; recovery then rebuilds it from the changelog.
    pub fn open(path: impl AsRef<Path>) -> Result<RedbStore> {
        Self::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Like [`RedbStore::open`] with `cache_bytes` of page cache: the store's
    /// resident memory stays near this, however many keys it holds.
    pub fn open_with_cache(path: impl AsRef<Path>, cache_bytes: usize) -> Result<RedbStore> {
        let path = path.as_ref().to_owned();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        // Every page's checksum is verified at open, so a file changed
        // behind redb's back (a bad disk, a stray write) is found before its
        // values are served or logged to the changelog.
        let create = |path: &Path| {
            redb::Builder::new()
                .set_cache_size(cache_bytes)
                .set_check_integrity_on_open(true)
                .create(path)
        };
        let marker = damage_marker(&path);
        let opened = match std::fs::read_to_string(&marker) {
            Ok(why) => Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
                format!("marked damaged while in use: {}", why.trim()),
            ))),
            Err(_) => create(&path),
        };
        let db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StateError::storage(
                    &path,
                    "already open by another store or process",
                ))
            }
            Err(e) => {
                let stamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
                warn!(path = %path.display(), moved_to = %aside.display(), error = %e,
                    "state store unreadable; moved aside, it will be rebuilt from the changelog");
                match std::fs::rename(&path, &aside) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(StateError::Io {
                            path: path.clone(),
                            source,
                        })
                    }
                }
                match std::fs::remove_file(&marker) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => {
                        return Err(StateError::Io {
                            path: marker,
                            source,
                        })
                    }
                }
                create(&path).map_err(|e| StateError::storage(&path, e))?
            }
        };
        Ok(RedbStore {
            db,
            path,
            reader: std::sync::RwLock::new(None),
        })
    }

    /// A store on `backend` instead of a file (the fuzz targets' simulated
    /// disk), integrity checked at open like a file.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn on_backend(
        backend: impl redb::StorageBackend,
        label: &str,
    ) -> std::result::Result<RedbStore, redb::DatabaseError> {
        let db = redb::Builder::new()
            .set_check_integrity_on_open(true)
            .create_with_backend(backend)?;
        Ok(RedbStore {
            db,
            path: PathBuf::from(label),
            reader: std::sync::RwLock::new(None),
        })
    }

    /// The cached read snapshot, opened if there is none; `None` while the
    /// data table does not exist yet.
    fn reader(&self) -> Result<Option<Arc<Snapshot>>> {
        if let Some(r) = self
            .reader
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Ok(Some(r.clone()));
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(DATA) {
            Ok(t) => Arc::new(t),
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        *self.reader.write().unwrap_or_else(|e| e.into_inner()) = Some(table.clone());
        Ok(Some(table))
    }

    /// The store's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::storage(&self.path, e)
    }
}

impl Store for RedbStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let read = |table: &Snapshot| -> Result<Option<Vec<u8>>> {
            Ok(table
                .get(key)
                .map_err(|e| self.err(e))?
                .map(|v| v.value().to_vec()))
        };
        if let Some(table) = self
            .reader
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return read(table);
        }
        let Some(table) = self.reader()? else {
            return Ok(None);
        };
        Ok(table
            .get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    fn range(
        &self,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(DATA) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for entry in table
            .range::<&[u8]>((from, to))
            .map_err(|e| self.err(e))?
            .take(limit)
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn apply(
        &self,
        batch: &WriteBatch,
        changelog_offset: Option<i64>,
        durability: Durability,
    ) -> Result<()> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(match durability {
            Durability::Fast => redb::Durability::None,
            Durability::Durable => redb::Durability::Immediate,
        })
        .map_err(|e| self.err(e))?;
        {
            let mut data = txn.open_table(DATA).map_err(|e| self.err(e))?;
            for (k, v) in batch.iter() {
                match v {
                    Some(v) => {
                        data.insert(k, v).map_err(|e| self.err(e))?;
                    }
                    None => {
                        data.remove(k).map_err(|e| self.err(e))?;
                    }
                }
            }
            let mut meta = txn.open_table(META).map_err(|e| self.err(e))?;
            if let Some(offset) = changelog_offset {
                meta.insert(OFFSET_KEY, offset).map_err(|e| self.err(e))?;
            }
        }
        let committed = txn.commit().map_err(|e| self.err(e));
        // Later reads must see this commit.
        *self.reader.write().unwrap_or_else(|e| e.into_inner()) = None;
        committed
    }

    fn changelog_offset(&self) -> Result<Option<i64>> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(META) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        Ok(table
            .get(OFFSET_KEY)
            .map_err(|e| self.err(e))?
            .map(|v| v.value()))
    }

    fn mark_damaged(&self, why: &str) -> Result<()> {
        let marker = damage_marker(&self.path);
        std::fs::write(&marker, why).map_err(|source| StateError::Io {
            path: marker,
            source,
        })
    }

    fn len(&self) -> Result<u64> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        match txn.open_table(DATA) {
            Ok(t) => t.len().map_err(|e| self.err(e)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "strom-state-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The store contract holds in redb.
    #[test]
    fn redb_store_keeps_the_contract() {
        let dir = temp_dir("contract");
        crate::store::contract::check(&RedbStore::open(dir.join("t-0.redb")).unwrap());
        std::fs::remove_dir_all(dir).ok();
    }

    /// Data and offset survive closing and reopening the file.
    #[test]
    fn reopened_store_has_data_and_offset() {
        let dir = temp_dir("reopen");
        let path = dir.join("t-0.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            let mut b = WriteBatch::default();
            b.put(b"k".to_vec(), b"v".to_vec());
            store.apply(&b, Some(41), Durability::Durable).unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(store.changelog_offset().unwrap(), Some(41));
        std::fs::remove_dir_all(dir).ok();
    }

    /// `reset` removes a table's files and nothing else.
    #[test]
    fn reset_deletes_only_that_tables_files() {
        let dir = temp_dir("reset");
        drop(RedbStore::open(store_path(&dir, "a", 0)).unwrap());
        drop(RedbStore::open(store_path(&dir, "b", 0)).unwrap());
        reset(&dir, "a").unwrap();
        assert!(!store_path(&dir, "a", 0).exists());
        assert!(store_path(&dir, "b", 0).exists());
        reset(&dir, "a").unwrap(); // nothing left: fine
        std::fs::remove_dir_all(dir).ok();
    }

    /// A garbage file is moved aside (kept) and replaced by a fresh store.
    #[test]
    fn corrupt_file_is_moved_aside_and_replaced() {
        let dir = temp_dir("corrupt");
        let path = dir.join("t-0.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.changelog_offset().unwrap(), None);
        assert!(store.is_empty().unwrap());
        let aside: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "the damaged file was not kept");
        assert_eq!(std::fs::read(aside[0].path()).unwrap(), vec![0x5a; 8192]);
        std::fs::remove_dir_all(dir).ok();
    }

    /// Stored counts changed in a data page (a few digits, as a bad disk or
    /// a stray write would) are found at open, though every page still
    /// parses: the file is moved aside and the store starts empty, to be
    /// rebuilt from the changelog, instead of serving the wrong counts.
    #[test]
    fn a_changed_data_page_is_found_at_open() {
        let dir = temp_dir("page");
        let path = dir.join("t-0.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            let mut b = WriteBatch::default();
            for i in 0..1_000u32 {
                b.put(
                    format!("word-{i:04}").into_bytes(),
                    format!("count={:06}", 500_000 + i).into_bytes(),
                );
            }
            store.apply(&b, Some(999), Durability::Durable).unwrap();
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let needle = b"count=500500";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("the value is stored as written");
        bytes[at + 6..at + 9].copy_from_slice(b"100"); // count=100500
        std::fs::write(&path, &bytes).unwrap();

        let store = RedbStore::open(&path).unwrap();
        assert_eq!(
            store.get(b"word-0500").unwrap(),
            None,
            "the damaged value was served"
        );
        assert_eq!(store.changelog_offset().unwrap(), None);
        let aside = std::fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
            .count();
        assert_eq!(aside, 1, "the damaged file was not kept");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A store marked damaged while in use is moved aside at its next open
    /// and starts empty; the marker goes with it.
    #[test]
    fn a_store_marked_damaged_is_moved_aside_at_its_next_open() {
        let dir = temp_dir("marked");
        let path = dir.join("t-0.redb");
        {
            let store = RedbStore::open(&path).unwrap();
            let mut b = WriteBatch::default();
            b.put(b"k".to_vec(), b"\"xx".to_vec());
            store.apply(&b, Some(7), Durability::Durable).unwrap();
            store.mark_damaged("a value does not decode").unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.get(b"k").unwrap(), None);
        assert_eq!(store.changelog_offset().unwrap(), None);
        assert!(!damage_marker(&path).exists(), "the marker stayed");
        drop(store);
        let again = RedbStore::open(&path).unwrap();
        assert_eq!(again.changelog_offset().unwrap(), None, "reopened fine");
        std::fs::remove_dir_all(dir).ok();
    }
}
