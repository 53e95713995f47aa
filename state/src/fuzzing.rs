//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`). A panic
//! is a finding. Not part of the API.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use strom_client::consumer::ConsumerRecord;
use strom_client::records::BatchDecoder;

use crate::recovery::add_changes;
use crate::redb_store::RedbStore;
use crate::store::{Durability, Store, WriteBatch};
use crate::table::TableKey;

type Contents = BTreeMap<Vec<u8>, Vec<u8>>;

/// Changelog bytes as fetched (record batches, CRCs not checked so that
/// mutated batches get through): the records go through recovery's
/// changelog-to-write-batch step into a redb store, one store transaction per
/// batch, and the store must then hold what a map fed the same records holds,
/// with the offset of the last record. Every key is also decoded as each
/// table key type and every value as a JSON table value; what decodes must
/// encode back to the same bytes (keys) or decode again the same (values).
pub fn changelog(data: &[u8]) {
    let store = RedbStore::on_backend(Disk::default(), "fuzz-changelog")
        .expect("a fresh in-memory store opens");
    let mut model = Contents::new();
    let mut offset = None;
    for batch in BatchDecoder::new(Bytes::copy_from_slice(data), false) {
        let Ok(batch) = batch else { break };
        let records: Vec<ConsumerRecord> = batch
            .records()
            .map_while(|r| r.ok())
            .map(|r| ConsumerRecord {
                topic: "changelog".into(),
                partition: 0,
                offset: r.offset,
                timestamp: r.timestamp,
                key: r.key,
                value: r.value,
                headers: r.headers,
            })
            .collect();
        for r in &records {
            if let Some(key) = &r.key {
                keys_and_values(key, r.value.as_deref());
                match &r.value {
                    Some(v) => model.insert(key.to_vec(), v.to_vec()),
                    None => model.remove(&key[..]),
                };
            }
        }
        let mut changes = WriteBatch::default();
        let Some(last) = add_changes(&mut changes, records) else {
            continue;
        };
        store
            .apply(&changes, Some(last), Durability::Fast)
            .expect("an in-memory store takes a write");
        offset = Some(last);
    }
    assert_eq!(read_all(&store), Ok((model, offset)));
}

/// Each table key type must give back the bytes it decoded from; a JSON value
/// that decodes must decode the same after encoding.
fn keys_and_values(key: &[u8], value: Option<&[u8]>) {
    fn key_round_trip<K: TableKey>(bytes: &[u8]) {
        if let Ok(k) = K::decode_key(bytes) {
            assert_eq!(k.encode_key(), bytes, "{}", std::any::type_name::<K>());
        }
    }
    key_round_trip::<u16>(key);
    key_round_trip::<u32>(key);
    key_round_trip::<u64>(key);
    key_round_trip::<i16>(key);
    key_round_trip::<i32>(key);
    key_round_trip::<i64>(key);
    key_round_trip::<String>(key);
    key_round_trip::<Vec<u8>>(key);
    if let Some(Ok(v)) = value.map(serde_json::from_slice::<serde_json::Value>) {
        let encoded = serde_json::to_vec(&v).expect("a JSON value encodes");
        let again: serde_json::Value =
            serde_json::from_slice(&encoded).expect("encoded JSON decodes");
        assert_eq!(again, v);
    }
}

/// Everything in `store` and the changelog offset it reflects.
fn read_all(store: &dyn Store) -> Result<(Contents, Option<i64>), String> {
    let entries = store
        .range(Bound::Unbounded, Bound::Unbounded, usize::MAX)
        .map_err(|e| e.to_string())?;
    let offset = store.changelog_offset().map_err(|e| e.to_string())?;
    Ok((entries.into_iter().collect(), offset))
}

/// A model-based test of the redb store under I/O failures and crashes, as
/// redb fuzzes itself: operations read from `data` go to a [`RedbStore`] on a
/// simulated disk and to a map. Writes are applied in store transactions
/// (fast or durable, each with the next changelog offset); reads must agree
/// with the map; the disk can be told to fail its n-th next write or sync;
/// the process can crash (every write kept) or the power fail (only what was
/// synced kept, plus some of the later writes). After an error (the store is
/// dropped, as a worker that stops on it would) or a crash the
/// store is reopened, integrity check included, and must hold exactly one of
/// the states committed since the last durable commit — data and offset from
/// the same commit, nothing durable lost.
pub fn store_model(data: &[u8]) {
    let disk = Disk::default();
    let mut store = Some(RedbStore::on_backend(disk.clone(), "fuzz-store").expect("opens"));
    let mut model = Contents::new();
    // Every state the store may be found in after a crash, oldest first: the
    // last durable commit, then the commits after it.
    let mut possible = vec![(Contents::new(), None)];
    let mut next_offset = 0i64;
    let mut pending = WriteBatch::default();
    let mut pending_model = model.clone();
    let mut ops = data.iter().copied();
    while let Some(op) = ops.next() {
        let arg = ops.next().unwrap_or(0);
        let Some(s) = store.as_ref() else {
            store = Some(reopen(&disk, &mut possible, &mut model, &mut pending_model));
            pending.clear();
            continue;
        };
        match op % 9 {
            0 => {
                let (key, value) = (key_of(arg), value_of(ops.next().unwrap_or(0)));
                pending_model.insert(key.clone(), value.clone());
                pending.put(key, value);
            }
            1 => {
                pending_model.remove(&key_of(arg));
                pending.delete(key_of(arg));
            }
            2 | 3 => {
                let durability = if op % 9 == 3 {
                    Durability::Durable
                } else {
                    Durability::Fast
                };
                let state = (pending_model.clone(), Some(next_offset));
                match s.apply(&pending, Some(next_offset), durability) {
                    Ok(()) => {
                        model = pending_model.clone();
                        if durability == Durability::Durable {
                            possible.clear();
                        }
                        possible.push(state);
                    }
                    Err(_) => {
                        // The commit may or may not have happened.
                        possible.push(state);
                        store = None;
                    }
                }
                next_offset += 1;
                pending.clear();
            }
            4 => match s.get(&key_of(arg)) {
                Ok(v) => assert_eq!(v.as_ref(), model.get(&key_of(arg)), "get"),
                Err(_) => store = None,
            },
            5 => match read_all(s) {
                Ok(found) => assert_eq!(found, (model.clone(), possible_last(&possible)), "range"),
                Err(_) => store = None,
            },
            6 => disk.fail_after(Some(u32::from(arg % 32))),
            // A crash: the disk as it is now is what the next open finds,
            // whatever dropping the store would still write.
            7 => {
                let image = disk.crash_image(None);
                drop(store.take());
                disk.restore(image);
            }
            _ => {
                let image = disk.crash_image(Some(arg));
                drop(store.take());
                disk.restore(image);
            }
        }
        if store.is_none() {
            pending_model = model.clone();
        }
    }
}

fn possible_last(possible: &[(Contents, Option<i64>)]) -> Option<i64> {
    possible.last().and_then(|(_, offset)| *offset)
}

/// Reopens the store on `disk` (no failures injected) and checks it holds one
/// of the `possible` states, which then becomes the only one.
fn reopen(
    disk: &Disk,
    possible: &mut Vec<(Contents, Option<i64>)>,
    model: &mut Contents,
    pending_model: &mut Contents,
) -> RedbStore {
    disk.fail_after(None);
    let store = match RedbStore::on_backend(disk.clone(), "fuzz-store") {
        Ok(s) => s,
        Err(e) => panic!("a store reopened after a crash does not open: {e}"),
    };
    let found = read_all(&store).expect("a reopened store reads");
    assert!(
        possible.contains(&found),
        "after a crash the store holds {found:?}, none of the committed states {possible:?}"
    );
    *model = found.0.clone();
    *pending_model = found.0.clone();
    *possible = vec![found];
    store
}

/// One of 24 keys, some long enough to spread over pages.
fn key_of(b: u8) -> Vec<u8> {
    let n = b % 24;
    let mut key = vec![b'k', n];
    if n >= 20 {
        key.resize(600 + usize::from(n), n);
    }
    key
}

/// A value of up to ~8 KiB, so that some writes split pages.
fn value_of(b: u8) -> Vec<u8> {
    vec![b; usize::from(b) * 32 + 1]
}

/// A simulated disk: what was written, what was synced, the writes since the
/// last sync, and a countdown to an injected failure.
#[derive(Debug, Clone, Default)]
struct Disk(Arc<Mutex<DiskState>>);

#[derive(Debug, Default)]
struct DiskState {
    written: Vec<u8>,
    synced: Vec<u8>,
    since_sync: Vec<(u64, Vec<u8>)>,
    fail_after: Option<u32>,
}

impl Disk {
    fn state(&self) -> std::sync::MutexGuard<'_, DiskState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_after(&self, n: Option<u32>) {
        self.state().fail_after = n;
    }

    /// What a crash now leaves on the disk: every write if the process
    /// crashed (`lost_power` None); if the power failed, what was synced plus
    /// those later writes that the mask picks (bit i for write i mod 8).
    fn crash_image(&self, lost_power: Option<u8>) -> Vec<u8> {
        let d = self.state();
        let Some(mask) = lost_power else {
            return d.written.clone();
        };
        let mut image = d.synced.clone();
        for (i, (offset, data)) in d.since_sync.iter().enumerate() {
            if mask & (1 << (i % 8)) != 0 {
                let start = *offset as usize;
                if let Some(dst) = image.get_mut(start..start + data.len()) {
                    dst.copy_from_slice(data);
                }
            }
        }
        image
    }

    /// Puts the disk back to `image`, as the next process finds it.
    fn restore(&self, image: Vec<u8>) {
        let mut d = self.state();
        d.written = image.clone();
        d.synced = image;
        d.since_sync.clear();
    }
}

impl DiskState {
    /// Counts down to the injected failure.
    fn io(&mut self) -> std::io::Result<()> {
        match self.fail_after {
            Some(0) => Err(std::io::Error::other("injected I/O failure")),
            Some(ref mut n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl redb::StorageBackend for Disk {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state().written.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let d = self.state();
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| d.written.get(o..o + out.len()))
            .ok_or_else(|| std::io::Error::other("read past the end"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut d = self.state();
        d.io()?;
        d.written.resize(len as usize, 0);
        // A length change reaches the disk at once (as a journaling file
        // system's metadata does).
        d.synced.resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        let mut d = self.state();
        d.io()?;
        d.synced = d.written.clone();
        d.since_sync.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut d = self.state();
        d.io()?;
        let start = offset as usize;
        let dst = d
            .written
            .get_mut(start..start + data.len())
            .ok_or_else(|| std::io::Error::other("write past the end"))?;
        dst.copy_from_slice(data);
        d.since_sync.push((offset, data.to_vec()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use strom_client::fuzzing::smoke;
    use strom_client::records::{BatchBuilder, ProducerIdentity};
    use strom_client::Compression;

    use super::*;

    /// Changelog batches: counts of words as u64 keys and string keys, JSON
    /// values, a delete (null value), in two codecs.
    fn changelog_seed() -> Vec<u8> {
        let mut out = Vec::new();
        for (base, codec) in [(0i64, Compression::None), (3, Compression::Lz4)] {
            let mut b = BatchBuilder::new(64);
            b.push(1, Some(&7u64.encode_key()), Some(b"12"), &[]);
            b.push(2, Some(b"word"), Some(br#"{"n":[1,2]}"#), &[]);
            b.push(3, Some(b"gone"), None, &[]);
            let mut bytes = b
                .seal(codec, ProducerIdentity::default())
                .expect("a seed batch seals")
                .to_vec();
            bytes[..8].copy_from_slice(&base.to_be_bytes());
            out.extend(bytes);
        }
        out
    }

    /// Puts, deletes, fast and durable commits, reads, an injected failure,
    /// a crash and a power failure.
    fn store_seed() -> Vec<u8> {
        vec![
            0, 1, 40, 0, 2, 200, 0, 21, 90, 2, 0, 5, 0, 1, 2, 3, 0, 4, 1, 0, 22, 255, 2, 0, 5, 0,
            7, 0, 4, 21, 0, 3, 30, 3, 0, 6, 3, 0, 9, 9, 3, 0, 5, 0, 0, 5, 5, 2, 0, 8, 0x55, 5, 0,
            1, 21, 3, 0, 4, 21,
        ]
    }

    /// The CI's short smoke run of the state's fuzz targets.
    #[test]
    fn fuzz_targets_smoke() {
        let kept = smoke("changelog", &[changelog_seed()], changelog, usize::MAX)
            + smoke("store_model", &[store_seed()], store_model, usize::MAX);
        println!("{kept} kept inputs");
    }

    /// The seeds reach what they are for: the changelog seed's records land
    /// in the store, and the store seed commits and crashes.
    #[test]
    fn seeds_reach_the_store() {
        changelog(&changelog_seed());
        let store = RedbStore::on_backend(Disk::default(), "t").expect("opens");
        let mut changes = WriteBatch::default();
        changes.put(b"k".to_vec(), b"v".to_vec());
        store
            .apply(&changes, Some(4), Durability::Durable)
            .expect("applies");
        assert_eq!(read_all(&store).expect("reads").1, Some(4));
        store_model(&store_seed());
    }
}
