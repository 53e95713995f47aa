//! Typed topics.

use std::sync::{Arc, Mutex};

use crate::codec::{Codec, Json};

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
    pub(crate) name: Arc<str>,
    pub(crate) key: Arc<dyn Codec<K>>,
    pub(crate) value: Arc<dyn Codec<V>>,
    /// Shared with the app, which creates the topic at start.
    pub(crate) settings: Arc<Mutex<TopicSettings>>,
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
            name: self.name.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("name", &self.name).finish()
    }
}

impl<K, V> Topic<K, V> {
    pub(crate) fn json(name: &str, settings: Arc<Mutex<TopicSettings>>) -> Self
    where
        Json: Codec<K> + Codec<V>,
    {
        Topic {
            name: Arc::from(name),
            key: Arc::new(Json),
            value: Arc::new(Json),
            settings,
        }
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, TopicSettings> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
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
        self.settings().partitions = Some(n);
        self
    }

    /// Creates the topic with each partition on `n` brokers (default: the app's).
    pub fn with_replicas(self, n: i16) -> Self {
        self.settings().replication = Some(n);
        self
    }

    /// Creates the topic with config `key=value` (e.g. `cleanup.policy`).
    pub fn with_config(self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings().configs.push((key.into(), value.into()));
        self
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Uses `codec` for keys.
    pub fn with_key_codec(mut self, codec: impl Codec<K> + 'static) -> Self {
        self.key = Arc::new(codec);
        self
    }

    /// Uses `codec` for values.
    pub fn with_value_codec(mut self, codec: impl Codec<V> + 'static) -> Self {
        self.value = Arc::new(codec);
        self
    }
}
