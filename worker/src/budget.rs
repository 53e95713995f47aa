//! One memory budget per worker ([`WorkerConfig::memory_budget`]), shared
//! out before the worker starts:
//!
//! - a quarter to the page caches of the table stores the worker may open
//!   (every table's partitions, and each global table's one store), in
//!   equal parts of at least [`MIN_STORE_CACHE`];
//! - a quarter to the producer's buffers (Kafka's `buffer.memory`): a full
//!   buffer makes sends wait (backpressure), it never fails the worker;
//! - a quarter to fetched records not yet processed: the consumer's
//!   read-ahead and each partition number's queue, each bounded by the
//!   share over the partition numbers plus one (and by
//!   [`WorkerConfig::max_buffered_bytes`]); past its bound a partition's
//!   fetches pause until its task catches up;
//! - a quarter left for what the worker holds otherwise: events being
//!   processed, the global tables' read caches (16 MiB each at most), the
//!   runtime.
//!
//! `/metrics` shows each part's share (`strom_memory_limit_bytes`) and what
//! the producer and the fetched records hold (`strom_memory_held_bytes`).
//! A redb cache fills up to its share as pages are read; redb does not say
//! how full it is, so only its share is shown.

use crate::config::WorkerConfig;

/// The smallest page cache a store gets, however small the budget (a
/// store's pages are then mostly read from the operating system's cache).
pub const MIN_STORE_CACHE: usize = 64 << 10;

/// The smallest bound of fetched records per partition number (below it,
/// fetches would pause after almost every batch).
const MIN_FETCHED: usize = 256 << 10;

/// How a worker's memory budget is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shares {
    /// Page cache of each table store.
    pub store_cache: usize,
    /// All the stores' caches.
    pub stores: usize,
    /// The producer's buffer memory.
    pub producer: usize,
    /// Fetched records per partition number (and the consumer's read-ahead).
    pub fetched_per_partition: usize,
    /// All fetched records.
    pub fetched: usize,
}

impl Shares {
    /// The shares of `config`'s budget for a worker of `stores` table
    /// stores at most over `partitions` partition numbers.
    pub fn new(config: &WorkerConfig, stores: usize, partitions: usize) -> Shares {
        let quarter = config.memory_budget / 4;
        let store_cache = (quarter / stores.max(1)).max(MIN_STORE_CACHE);
        let fetched_per_partition = (quarter / (partitions + 1))
            .min(config.max_buffered_bytes)
            .max(MIN_FETCHED);
        Shares {
            store_cache,
            stores: store_cache * stores,
            producer: Shares::producer(config),
            fetched_per_partition,
            fetched: fetched_per_partition * (partitions + 1),
        }
    }

    /// The producer's buffer memory under `config`'s budget.
    pub fn producer(config: &WorkerConfig) -> usize {
        // The producer refuses a buffer smaller than one batch (1 MiB).
        (config.memory_budget / 4).clamp(1 << 20, u32::MAX as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(budget: usize) -> WorkerConfig {
        let mut config = WorkerConfig::new("app", ["unused"]);
        config.memory_budget = budget;
        config
    }

    #[test]
    fn the_default_budget_is_shared_in_quarters() {
        const MIB: usize = 1 << 20;
        // 2 tables over 8 partitions: 16 stores.
        let shares = Shares::new(&config(256 * MIB), 16, 8);
        assert_eq!(shares.store_cache, 4 * MIB);
        assert_eq!(shares.stores, 64 * MIB);
        assert_eq!(shares.producer, 64 * MIB);
        // 64 MiB over 9 queues is more than the 4 MiB per partition bound.
        assert_eq!(shares.fetched_per_partition, 4 * MIB);
        let parts = shares.stores + shares.producer + shares.fetched;
        assert!(parts <= 3 * 64 * MIB, "{shares:?}");
    }

    #[test]
    fn a_larger_app_gets_smaller_parts_within_the_budget() {
        const MIB: usize = 1 << 20;
        // 4 tables over 64 partitions, 128 MiB.
        let shares = Shares::new(&config(128 * MIB), 256, 64);
        assert_eq!(shares.store_cache, 128 << 10);
        assert_eq!(shares.fetched_per_partition, 32 * MIB / 65);
        assert!(shares.stores + shares.producer + shares.fetched <= 96 * MIB);
    }

    #[test]
    fn tiny_budgets_keep_working_minimums() {
        let shares = Shares::new(&config(1 << 20), 1_000, 100);
        assert_eq!(shares.store_cache, MIN_STORE_CACHE);
        assert_eq!(shares.fetched_per_partition, MIN_FETCHED);
        assert_eq!(shares.producer, 1 << 20);
    }
}
