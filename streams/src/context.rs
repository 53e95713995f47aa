//! What an agent sees while it handles one event: typed tables and sends.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use strom_client::partitioner::partition_for_key;
use strom_client::producer::ProducerRecord;
use strom_client::Header;
use strom_state::TableKey;

use crate::error::{Error, Result};
use crate::stream::Event;
use crate::table::Table;
use crate::topic::Topic;

/// The event's partition, its tables and a producer. Everything an agent sends
/// or writes through it is acknowledged before the event counts as done.
/// Records it sends carry the event's time (its timestamp), as Kafka Streams'
/// outputs do, not the time they were sent; an event without a time (a
/// negative timestamp, as records of old clients have) sends with the
/// current time.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub(crate) inner: strom_worker::Context,
    /// The time of the event being handled (of a batch: its latest event).
    pub(crate) event_time: Option<i64>,
}

fn value_error(table: &str, e: serde_json::Error) -> Error {
    Error::Codec {
        topic: table.to_owned(),
        source: crate::codec::CodecError {
            what: e.to_string(),
        },
    }
}

impl Ctx {
    /// The context of a batch of events: sends carry its latest event's time.
    pub(crate) fn for_batch<K, V>(inner: strom_worker::Context, batch: &[Event<K, V>]) -> Ctx {
        Ctx {
            inner,
            event_time: batch.iter().map(|e| e.timestamp).max(),
        }
    }

    /// The time of the event being handled (ms since the epoch; of a batch,
    /// its latest event): what the records it sends carry.
    pub fn event_time(&self) -> Option<i64> {
        self.event_time
    }

    /// The partition's stream time (ms since the epoch): the latest event
    /// time its task has seen since it started, this event's included. It
    /// never goes back: a late event leaves it where it is.
    pub fn stream_time(&self) -> Option<i64> {
        self.inner.stream_time()
    }

    /// The partition the event came from.
    pub fn partition(&self) -> i32 {
        self.inner.partition()
    }

    fn check_partition<K: TableKey>(&self, table: &str, key: &K) -> Result<Vec<u8>> {
        let bytes = key.encode_key();
        let key_partition = partition_for_key(&bytes, self.inner.partitions());
        if key_partition != self.partition() {
            return Err(Error::CoPartition {
                table: table.to_owned(),
                key_partition,
                partition: self.partition(),
            });
        }
        Ok(bytes)
    }

    /// The value of `key` in `table`, or the table's default.
    pub async fn get<K: TableKey, V: DeserializeOwned>(
        &self,
        table: &Table<K, V>,
        key: &K,
    ) -> Result<V> {
        let bytes = key.encode_key();
        let stored = self.inner.get(&table.name, &bytes).await?;
        match stored {
            Some(v) => match serde_json::from_slice(&v) {
                Ok(v) => Ok(v),
                Err(e) => Err(self.damaged(&table.name, &bytes, e).await),
            },
            None => Ok((table.default)()),
        }
    }

    /// A stored value that does not decode is damaged state, not the
    /// agent's error (see [`strom_worker::Context::damaged`]).
    async fn damaged(&self, table: &str, key: &[u8], e: serde_json::Error) -> Error {
        self.inner.damaged(table, key, &e.to_string()).await.into()
    }

    /// Sets `key` in `table` to `value`. The key must belong to this event's
    /// partition (see [`Error::CoPartition`]).
    pub async fn set<K: TableKey, V: Serialize>(
        &self,
        table: &Table<K, V>,
        key: &K,
        value: &V,
    ) -> Result<()> {
        let bytes = self.check_partition(&table.name, key)?;
        let value = serde_json::to_vec(value).map_err(|e| value_error(&table.name, e))?;
        self.inner.put(&table.name, bytes, value).await?;
        Ok(())
    }

    /// Replaces the value of `key` with `f(old or default)` and returns it.
    /// Atomic: no other event of this partition reads or writes `table` in
    /// between, so agents with [`concurrency`](crate::Stream::concurrency)
    /// lose no update.
    pub async fn update<K, V, F>(&self, table: &Table<K, V>, key: &K, f: F) -> Result<V>
    where
        K: TableKey,
        V: Serialize + DeserializeOwned,
        F: FnOnce(V) -> V,
    {
        let bytes = self.check_partition(&table.name, key)?;
        /// Why an update wrote nothing.
        enum Refused {
            /// The stored value does not decode.
            Stored(serde_json::Error),
            /// The new value does not encode.
            New(Error),
        }
        let updated = self
            .inner
            .update(&table.name, bytes, |old| {
                let old = match old {
                    Some(v) => serde_json::from_slice(&v).map_err(Refused::Stored)?,
                    None => (table.default)(),
                };
                let new = f(old);
                let encoded = serde_json::to_vec(&new)
                    .map_err(|e| Refused::New(value_error(&table.name, e)))?;
                Ok::<_, Refused>((encoded, new))
            })
            .await?;
        match updated {
            Ok(v) => Ok(v),
            // The key went into the update; encode it again only here.
            Err(Refused::Stored(e)) => Err(self.damaged(&table.name, &key.encode_key(), e).await),
            Err(Refused::New(e)) => Err(e),
        }
    }

    /// Deletes `key` from `table`.
    pub async fn delete<K: TableKey, V>(&self, table: &Table<K, V>, key: &K) -> Result<()> {
        let bytes = self.check_partition(&table.name, key)?;
        self.inner.delete(&table.name, bytes).await?;
        Ok(())
    }

    /// Sends `key` → `value` to `topic` (partitioned by the key, as Java does).
    pub async fn send<K, V>(&self, topic: &Topic<K, V>, key: &K, value: &V) -> Result<()> {
        self.send_with_headers(topic, key, value, &[]).await
    }

    /// Sends `event` on to `topic` as it is: its key, value and headers
    /// (Faust's `forward`).
    pub async fn forward<K, V>(&self, topic: &Topic<K, V>, event: &Event<K, V>) -> Result<()> {
        self.send_with_headers(topic, &event.key, &event.value, &event.headers)
            .await
    }

    async fn send_with_headers<K, V>(
        &self,
        topic: &Topic<K, V>,
        key: &K,
        value: &V,
        headers: &[Header],
    ) -> Result<()> {
        let (key, value) = encode(topic, key, value)?;
        let mut record = ProducerRecord::to(&topic.name);
        record.key = key.as_deref();
        record.value = value.as_deref();
        record.headers = headers;
        record.timestamp = self.event_time.filter(|&t| t >= 0);
        self.inner.send(record).await?;
        Ok(())
    }
}

/// `key` and `value` in `topic`'s codecs.
pub(crate) fn encode<K, V>(
    topic: &Topic<K, V>,
    key: &K,
    value: &V,
) -> Result<(Option<Bytes>, Option<Bytes>)> {
    let codec = |e| Error::Codec {
        topic: topic.name.to_string(),
        source: e,
    };
    Ok((
        topic.key.encode(key).map_err(codec)?,
        topic.value.encode(value).map_err(codec)?,
    ))
}

/// What a timer sees: typed sends, each acknowledged before it returns.
#[derive(Debug, Clone)]
pub struct TimerCtx {
    pub(crate) inner: strom_worker::TimerContext,
}

impl TimerCtx {
    /// Sends `key` → `value` to `topic` and waits for the acknowledgement.
    pub async fn send<K, V>(&self, topic: &Topic<K, V>, key: &K, value: &V) -> Result<()> {
        let (key, value) = encode(topic, key, value)?;
        let mut record = ProducerRecord::to(&topic.name);
        record.key = key.as_deref();
        record.value = value.as_deref();
        self.inner.send(record).await?;
        Ok(())
    }

    /// Whether this worker leads the group (processes partition number 0).
    pub fn is_leader(&self) -> bool {
        self.inner.is_leader()
    }
}
