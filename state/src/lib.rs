//! `strom-state`: durable, queryable state for agents — Faust's tables.
//!
//! # Layout
//!
//! - [`store`]: the [`Store`] contract — bytes in key order plus the changelog
//!   offset the contents reflect, changed atomically by [`WriteBatch`]es.
//! - [`redb_store`]: [`RedbStore`], one redb file per (table, partition).
//! - [`memory`]: [`MemoryStore`], the same contract in memory.
//! - [`changelog`]: the changelog topic (`<app-id>-<table>-changelog`).
//! - [`logged`]: [`LoggedStore`], a partition's store plus its changelog:
//!   writes go to both, a flush commits data and changelog offset together.
//! - [`recovery`]: [`recover`] a store from its changelog; [`Standby`] stores
//!   kept warm by tailing it.
//! - [`table`]: [`Table<K, V>`](Table), typed keys (ordered encodings) and
//!   serde values over a [`LoggedStore`].
//! - [`window`]: windowed tables — window assignment, keys, close and expiry.
//! - [`error`]: the one error type, [`StateError`].
#![warn(missing_docs, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod changelog;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod global;
pub mod logged;
pub mod memory;
pub mod recovery;
pub mod redb_store;
pub mod store;
pub mod table;
pub mod window;

pub use error::{Result, StateError};
pub use logged::{LoggedStore, Refused};
pub use memory::MemoryStore;
pub use recovery::{recover, recover_with_progress, Recovery, RecoveryProgress, Standby};
pub use redb_store::{reset, store_path, RedbStore};
pub use store::{Durability, Store, WriteBatch};
pub use table::{Table, TableKey};
