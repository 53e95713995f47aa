//! Typed tables used from agents through [`Ctx`](crate::Ctx).

use std::marker::PhantomData;
use std::sync::Arc;

/// A table of `K` to `V`: partitioned like the stream that writes it, stored in
/// strom-state with a Kafka changelog, read and written from agents through
/// [`Ctx`](crate::Ctx). A missing key reads as the table's default.
pub struct Table<K, V> {
    pub(crate) name: Arc<str>,
    pub(crate) default: Arc<dyn Fn() -> V + Send + Sync>,
    pub(crate) types: PhantomData<fn() -> K>,
}

impl<K, V> Clone for Table<K, V> {
    fn clone(&self) -> Self {
        Table {
            name: self.name.clone(),
            default: self.default.clone(),
            types: PhantomData,
        }
    }
}

impl<K, V> std::fmt::Debug for Table<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("name", &self.name).finish()
    }
}

impl<K, V> Table<K, V> {
    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
