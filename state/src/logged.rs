//! A partition's store with its changelog: every change goes to the store's
//! pending batch and to the changelog; a flush waits for the changelog's
//! acknowledgements, then commits the batch with the changelog offset.
//!
//! Kafka Streams calls this layer `ChangeLoggingKeyValueBytesStore`; it wraps
//! any [`Store`] rather than being a flag of one.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;

use strom_client::producer::{DeliveryFuture, Producer, ProducerRecord};

use crate::error::{Result, StateError};
use crate::store::{Durability, Store, WriteBatch};

/// A write [`LoggedStore::write`] could not make, with what it was given.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub error: StateError,
    /// The key, handed back.
    pub key: Vec<u8>,
    /// The value (`None`: a delete), handed back.
    pub value: Option<Vec<u8>>,
}

/// One table partition: a [`Store`] plus its changelog partition.
///
/// Reads see the writes not yet flushed. The producer passed in decides how the
/// changelog is written: a transactional producer puts the changelog records in
/// the same Kafka transaction as the rest of the event's output.
#[derive(Debug)]
pub struct LoggedStore {
    store: Arc<dyn Store>,
    producer: Producer,
    topic: String,
    partition: i32,
    pending: WriteBatch,
    deliveries: Vec<DeliveryFuture>,
}

impl LoggedStore {
    /// The store of `partition`, logging to `topic`'s partition of the same number.
    pub fn new(
        store: Arc<dyn Store>,
        producer: Producer,
        topic: impl Into<String>,
        partition: i32,
    ) -> Self {
        LoggedStore {
            store,
            producer,
            topic: topic.into(),
            partition,
            pending: WriteBatch::default(),
            deliveries: Vec::new(),
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The table partition.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The value of `key`, including changes not flushed yet.
    ///
    /// Called inline on the partition task's runtime thread, not through
    /// `spawn_blocking`: a point read of a warm redb store takes about 1.2 µs
    /// there and 23 µs through `spawn_blocking` (`strom-bench state-read`,
    /// 1,000,000 keys: 840k against 44k reads/s on one task), and a read
    /// whose pages are not cached waits on the operating system's page cache,
    /// not on the network.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.pending.get(key) {
            Some(v) => Ok(v.map(<[u8]>::to_vec)),
            None => self.store.get(key),
        }
    }

    /// The entries with keys within the bounds, in key order, including
    /// changes not flushed yet.
    pub fn range(&self, from: Bound<&[u8]>, to: Bound<&[u8]>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut entries: BTreeMap<Vec<u8>, Vec<u8>> = self
            .store
            .range(from, to, usize::MAX)?
            .into_iter()
            .collect();
        for (key, change) in self.pending.range(from, to) {
            match change {
                Some(v) => entries.insert(key.to_vec(), v.to_vec()),
                None => entries.remove(key),
            };
        }
        Ok(entries.into_iter().collect())
    }

    /// Sets `key` to `value` (sent to the changelog now, stored at the next flush).
    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<()> {
        self.write(key, Some(value)).await.map_err(|r| r.error)
    }

    /// Deletes `key` (a tombstone in the changelog).
    pub async fn delete(&mut self, key: Vec<u8>) -> Result<()> {
        self.write(key, None).await.map_err(|r| r.error)
    }

    /// Sets `key` to `value`, or deletes it when `value` is `None`. If the
    /// changelog record cannot be sent, nothing changes and the key and value
    /// come back with the error, so the caller can try again without copies.
    pub async fn write(
        &mut self,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> std::result::Result<(), Refused> {
        if let Err(error) = self.log(&key, value.as_deref()).await {
            return Err(Refused { error, key, value });
        }
        match value {
            Some(v) => self.pending.put(key, v),
            None => self.pending.delete(key),
        }
        Ok(())
    }

    async fn log(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        let mut record = ProducerRecord::to(&self.topic)
            .partition(self.partition)
            .key(key);
        record.value = value;
        let delivery = self.producer.send(record).await?;
        // One future per batch is enough to wait for it; the latest one
        // gives the highest offset.
        match self.deliveries.last_mut() {
            Some(last) if last.same_batch(&delivery) => *last = delivery,
            _ => self.deliveries.push(delivery),
        }
        Ok(())
    }

    /// Number of changes waiting for the next flush.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Closes the partition's store on revoke or shutdown: a durable flush,
    /// then the file is released. Nothing written before is lost.
    pub async fn close(mut self) -> Result<Option<i64>> {
        self.flush(Durability::Durable).await
    }

    /// Forgets the pending changes and their changelog deliveries without
    /// storing them: their Kafka transaction was aborted, so the changelog
    /// holds none of them either (exactly-once).
    pub fn discard(&mut self) {
        self.pending.clear();
        self.deliveries.clear();
    }

    /// Waits until the changelog has every pending change (their own
    /// deliveries only, not the producer's other traffic), then commits them
    /// to the store together with the offset of the last one. A durable flush
    /// also makes every earlier fast commit durable, pending changes or not.
    /// Returns that offset (`None` when nothing was pending). If the changelog
    /// refused a change, nothing is committed and the error says which.
    ///
    /// Under exactly-once it is called once the transaction holding the
    /// changes has committed, so the store never holds an aborted change.
    pub async fn flush(&mut self, durability: Durability) -> Result<Option<i64>> {
        if self.deliveries.is_empty() {
            if durability == Durability::Durable {
                // Earlier fast commits reach the disk only with a durable one.
                let store = self.store.clone();
                tokio::task::spawn_blocking(move || {
                    store.apply(&WriteBatch::default(), None, Durability::Durable)
                })
                .await
                .map_err(|e| StateError::Codec {
                    what: format!("store task failed: {e}"),
                })??;
            }
            return Ok(None);
        }
        let mut last = None;
        for d in &self.deliveries {
            let written = match d.try_result() {
                Some(done) => done?,
                None => d.clone().await?,
            };
            last = last.max(Some(written.offset));
        }
        let batch = std::mem::take(&mut self.pending);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.apply(&batch, last, durability))
            .await
            .map_err(|e| StateError::Codec {
                what: format!("store task failed: {e}"),
            })??;
        self.deliveries.clear();
        Ok(last)
    }
}
