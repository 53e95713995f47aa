//! Typed topics.

use std::sync::Arc;

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
}

impl<K, V> Clone for Topic<K, V> {
    fn clone(&self) -> Self {
        Topic {
            name: self.name.clone(),
            key: self.key.clone(),
            value: self.value.clone(),
        }
    }
}

impl<K, V> std::fmt::Debug for Topic<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topic").field("name", &self.name).finish()
    }
}

impl<K, V> Topic<K, V> {
    pub(crate) fn json(name: &str) -> Self
    where
        Json: Codec<K> + Codec<V>,
    {
        Topic {
            name: Arc::from(name),
            key: Arc::new(Json),
            value: Arc::new(Json),
        }
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
