//! Global tables (Faust's `GlobalTable`, Kafka Streams' `GlobalKTable`): the
//! whole of a topic on every worker, read by key from any agent.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::{Codec, CodecError};
use crate::error::{Error, Result};
use crate::topic::Topic;

/// A table holding every record of a topic, on every worker: the latest
/// value of each key (a null value deletes it), whichever partition it was
/// written to. Declared with [`App::global_table`](crate::App::global_table),
/// read with [`Ctx::get_global`](crate::Ctx::get_global).
///
/// Unlike a [`Table`](crate::Table), it needs no common partitioning with
/// the streams that read it: a stream of page views keyed by anything can
/// look up user profiles from a topic with another partition count. Its
/// source topic is its changelog (nothing else is written); each worker
/// keeps it in a local store with the offset of every partition it read.
///
/// # When an update is seen
///
/// A worker restores the table to the end of its topic before it joins its
/// group, so its agents start on a full table. After that each worker reads
/// the topic as it grows: an event sees the updates its worker had read when
/// it was processed. There is no order between an update and the events of
/// another topic, as in Kafka Streams.
///
/// # Keys
///
/// Looked up by the bytes the topic's key codec writes for a key, so they
/// are the keys of the topic's records, whoever wrote them. A key written to
/// two partitions holds the value read last.
pub struct GlobalTable<K, V> {
    pub(crate) name: Arc<str>,
    pub(crate) topic: Arc<str>,
    pub(crate) key: Arc<dyn Codec<K>>,
    pub(crate) value: Arc<dyn Codec<V>>,
}

impl<K, V> Clone for GlobalTable<K, V> {
    fn clone(&self) -> Self {
        GlobalTable {
            name: self.name.clone(),
            topic: self.topic.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for GlobalTable<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalTable")
            .field("name", &self.name)
            .field("topic", &self.topic)
            .finish()
    }
}

impl<K, V> GlobalTable<K, V> {
    pub(crate) fn new(name: &str, topic: &Topic<K, V>) -> GlobalTable<K, V> {
        GlobalTable {
            name: Arc::from(name),
            topic: topic.spec.name.clone(),
            key: topic.spec.key.clone(),
            value: topic.spec.value.clone(),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic it holds.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The bytes `key` is stored under: what the topic's key codec writes
    /// (`None` for a codec that writes no key, whose table holds nothing).
    pub(crate) fn key_bytes(&self, key: &K) -> Result<Option<Bytes>> {
        self.key
            .encode(key)
            .map_err(|source: CodecError| Error::Codec {
                topic: format!("global table {:?} (topic {:?})", self.name, self.topic),
                source,
            })
    }

    /// Why a key cannot be looked up when the topic's key codec writes none.
    pub(crate) fn keyless(&self) -> String {
        format!(
            "global table {:?}: the key codec of topic {:?} writes no key, so the table holds nothing to look up",
            self.name, self.topic
        )
    }

    /// A stored value of the key stored as `key`, decoded with the topic's
    /// value codec: one that does not is a bad record of the topic, the
    /// reading event's error (its agent's error policy decides).
    pub(crate) fn decode(&self, key: &[u8], bytes: &[u8]) -> Result<V> {
        self.value
            .decode(Some(bytes))
            .map_err(|source| Error::Codec {
                topic: format!(
                    "global table {:?} (topic {:?}), key {}",
                    self.name,
                    self.topic,
                    crate::context::key_text(key)
                ),
                source,
            })
    }
}
