//! Typed topics.

use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{Codec, CodecError, Json};

/// A topic whose keys are `K` and values `V`, with the codecs that turn them
/// into bytes (JSON by default).
///
/// ```
/// use strom::codec::{NoKey, Utf8};
/// let mut app = strom::App::new("demo");
/// let lines = app.topic::<(), String>("lines").with_key_codec(NoKey).with_value_codec(Utf8);
/// assert_eq!(lines.name(), "lines");
/// ```
pub struct Topic<K, V> {
    /// One allocation, so a clone per event costs one reference count.
    pub(crate) spec: Arc<TopicSpec<K, V>>,
}

/// What a [`Topic`] handle holds.
pub(crate) struct TopicSpec<K, V> {
    pub(crate) name: Arc<str>,
    pub(crate) key: Arc<dyn Codec<K>>,
    pub(crate) value: Arc<dyn Codec<V>>,
    /// The event time of a decoded event (`None`: the record's timestamp).
    pub(crate) timestamp: Option<TimestampFn<K, V>>,
    /// Shared with the app, which creates the topic at start and checks
    /// what the command line sends to it.
    pub(crate) declared: Arc<Mutex<Declared>>,
    /// Keys and values as JSON, for the command line to show them.
    as_json: AsJson<K, V>,
    /// A pattern of topic names (see [`App::topic_pattern`](crate::App::topic_pattern)):
    /// read only.
    pub(crate) pattern: bool,
}

/// A topic's keys and values as JSON values.
struct AsJson<K, V> {
    key: fn(&K) -> serde_json::Value,
    value: fn(&V) -> serde_json::Value,
}

impl<K, V> Clone for AsJson<K, V> {
    fn clone(&self) -> Self {
        AsJson {
            key: self.key,
            value: self.value,
        }
    }
}

fn as_json<T: Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t)
        .unwrap_or_else(|e| serde_json::Value::String(format!("(not shown as JSON: {e})")))
}

/// Reads an event's time from the event.
pub(crate) type TimestampFn<K, V> = Arc<dyn Fn(&crate::Event<K, V>) -> i64 + Send + Sync>;

/// What the app knows of a topic it declared.
pub(crate) struct Declared {
    pub settings: TopicSettings,
    pub key_codec: &'static str,
    pub value_codec: &'static str,
    /// Decodes a key and a value with the topic's codecs.
    pub show: Show,
}

/// A key and a value decoded with a topic's codecs, as JSON (or why they
/// do not decode).
pub(crate) type Show = Arc<
    dyn Fn(
            Option<&[u8]>,
            Option<&[u8]>,
        ) -> Result<(serde_json::Value, serde_json::Value), CodecError>
        + Send
        + Sync,
>;

impl Default for Declared {
    fn default() -> Self {
        Declared {
            settings: TopicSettings::default(),
            key_codec: "Json",
            value_codec: "Json",
            show: Arc::new(|_, _| Ok((serde_json::Value::Null, serde_json::Value::Null))),
        }
    }
}

/// The short name of codec type `C`, e.g. `Utf8`.
fn codec_name<C>() -> &'static str {
    let full = std::any::type_name::<C>();
    full.rsplit("::").next().unwrap_or(full)
}

/// How the app creates a topic it declares, when the topic is missing.
#[derive(Debug, Clone, Default)]
pub struct TopicSettings {
    /// Partitions; `None` takes the app's default.
    pub partitions: Option<i32>,
    /// Replication factor; `None` takes the app's default.
    pub replication: Option<i16>,
    /// Topic configs such as `retention.ms`.
    pub configs: Vec<(String, String)>,
}

impl<K, V> Clone for Topic<K, V> {
    fn clone(&self) -> Self {
        Topic {
            spec: self.spec.clone(),
        }
    }
}

impl<K, V> Clone for TopicSpec<K, V> {
    fn clone(&self) -> Self {
        TopicSpec {
            name: self.name.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
            timestamp: self.timestamp.clone(),
            declared: self.declared.clone(),
            as_json: self.as_json.clone(),
            pattern: self.pattern,
        }
    }
}

impl<K, V> std::fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic")
            .field("name", &self.spec.name)
            .finish()
    }
}

impl<K: 'static, V: 'static> Topic<K, V> {
    pub(crate) fn json(name: &str, declared: Arc<Mutex<Declared>>) -> Self
    where
        K: Serialize + DeserializeOwned,
        V: Serialize + DeserializeOwned,
    {
        let spec = TopicSpec {
            name: Arc::from(name),
            key: Arc::new(Json),
            value: Arc::new(Json),
            timestamp: None,
            declared,
            as_json: AsJson {
                key: as_json::<K>,
                value: as_json::<V>,
            },
            pattern: false,
        };
        let topic = Topic {
            spec: Arc::new(spec),
        };
        topic.codecs_changed();
        topic
    }

    fn declared(&self) -> std::sync::MutexGuard<'_, Declared> {
        self.spec.declared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the app the codecs now in use (for `APP send` and `APP topics`).
    fn codecs_changed(&self) {
        let spec = &self.spec;
        let (key, value, json) = (spec.key.clone(), spec.value.clone(), spec.as_json.clone());
        self.declared().show = Arc::new(move |k, v| {
            let (k, v) = (key.decode(k)?, value.decode(v)?);
            Ok(((json.key)(&k), (json.value)(&v)))
        });
    }

    /// Creates the topic with `n` partitions (default: the app's).
    ///
    /// ```
    /// let mut app = strom::App::new("demo");
    /// let orders = app.topic::<String, u64>("orders")
    ///     .with_partitions(12)
    ///     .with_replicas(3)
    ///     .with_config("retention.ms", "86400000");
    /// assert_eq!(orders.name(), "orders");
    /// ```
    pub fn with_partitions(self, n: i32) -> Self {
        self.declared().settings.partitions = Some(n);
        self
    }

    /// Creates the topic with each partition on `n` brokers (default: the app's).
    pub fn with_replicas(self, n: i16) -> Self {
        self.declared().settings.replication = Some(n);
        self
    }

    /// Creates the topic with config `key=value` (e.g. `cleanup.policy`).
    pub fn with_config(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.declared()
            .settings
            .configs
            .push((key.into(), value.into()));
        self
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Takes each event's time (ms since the epoch) from the event itself,
    /// e.g. a field of its value, instead of the record's timestamp: what
    /// agents see as `Event::timestamp`, what the partition's stream time
    /// follows, and what the records they send carry.
    ///
    /// ```
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Order { placed_at: i64 }
    /// let mut app = strom::App::new("shop");
    /// let orders = app.topic::<String, Order>("orders").with_timestamp(|e| e.value.placed_at);
    /// # let _ = orders;
    /// ```
    pub fn with_timestamp(
        mut self,
        f: impl Fn(&crate::Event<K, V>) -> i64 + Send + Sync + 'static,
    ) -> Self {
        Arc::make_mut(&mut self.spec).timestamp = Some(Arc::new(f));
        self
    }

    /// Uses `codec` for keys.
    pub fn with_key_codec<C: Codec<K> + 'static>(mut self, codec: C) -> Self {
        Arc::make_mut(&mut self.spec).key = Arc::new(codec);
        self.declared().key_codec = codec_name::<C>();
        self.codecs_changed();
        self
    }

    /// Uses `codec` for values.
    pub fn with_value_codec<C: Codec<V> + 'static>(mut self, codec: C) -> Self {
        Arc::make_mut(&mut self.spec).value = Arc::new(codec);
        self.declared().value_codec = codec_name::<C>();
        self.codecs_changed();
        self
    }
}
