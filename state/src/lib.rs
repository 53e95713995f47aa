//! `strom-state`: durable, queryable state for agents — Faust's tables.
//!
//! # Layout
//!
//! - [`store`]: the [`Store`] contract — bytes in key order plus the changelog
//!   offset the contents reflect, changed atomically by [`WriteBatch`]es.
//! - [`redb_store`]: [`RedbStore`], one redb file per (table, partition).
//! - [`memory`]: [`MemoryStore`], the same contract in memory.
//! - [`error`]: the one error type, [`StateError`].
#![warn(missing_docs, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod error;
pub mod memory;
pub mod redb_store;
pub mod store;

pub use error::{Result, StateError};
pub use memory::MemoryStore;
pub use redb_store::RedbStore;
pub use store::{Durability, Store, WriteBatch};
