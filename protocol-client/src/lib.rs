//! `strom-client`: a pure-Rust async Kafka client that speaks the wire protocol
//! itself (no librdkafka, no C).
//!
//! # Layout
//!
//! - [`connection`]: one TCP connection to one broker — framing, correlation ids,
//!   pipelining, timeouts, API version negotiation.
//! - [`cluster`]: [`Client`], the bootstrap list, the metadata cache and the
//!   connection pool; retries with metadata refresh.
//! - [`admin`]: create and delete topics, list offsets.
//! - [`records`]: the RecordBatch v2 codec (CRC-32C, LZ4 frames, zero-copy decode).
//! - [`partitioner`]: Java-compatible murmur2 partitioning and sticky partitioning.
//! - [`producer`]: per-partition batching, one produce request per broker,
//!   acks, ordered retries, delivery futures, `flush()`; idempotence and
//!   transactions.
//! - [`consumer`]: assign mode — seek, reset policy, prefetching fetcher,
//!   pause/resume, read-committed filtering.
//! - [`group`]: consumer groups — coordinator, join/sync/heartbeat, assignors,
//!   rebalance listener, committed offsets.
//! - [`backoff`]: the retry schedule every retry loop uses.
//! - `types`: the shared vocabulary, [`TopicPartition`] and [`OffsetSpec`].
//! - [`error`]: the one [`Error`] type.
//! - `mock` (feature `testing`): an in-memory cluster for tests.
//!
//! Message types come from the `kafka-protocol` crate; everything above the
//! message level is here.
//!
//! # Example
//!
//! ```no_run
//! use strom_client::{Client, ClientConfig, Compression, NewTopic};
//! use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
//! use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
//!
//! # async fn run() -> strom_client::Result<()> {
//! let client = Client::connect(ClientConfig::new(["127.0.0.1:9092"])).await?;
//! client.create_topic(NewTopic::new("greetings", 3, 1)).await?;
//!
//! let producer = Producer::new(
//!     client.clone(),
//!     ProducerConfig { compression: Compression::Lz4, ..ProducerConfig::default() },
//! )?;
//! let delivery = producer
//!     .send(ProducerRecord::to("greetings").key(b"alice").value(b"hello"))
//!     .await?;
//! let written = delivery.await?; // acknowledged: partition and offset
//!
//! let mut consumer = Consumer::new(client, ConsumerConfig::default());
//! let tp = TopicPartition::new("greetings", written.partition);
//! consumer.assign([(tp, Offset::At(written.offset))])?;
//! let record = consumer.recv().await?;
//! assert_eq!(record.value.as_deref(), Some(&b"hello"[..]));
//! # Ok(()) }
//! ```
#![warn(missing_docs, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod admin;
pub mod backoff;
pub mod cluster;
pub mod compression;
pub mod connection;
pub mod consumer;
pub mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod group;
pub mod health;
#[cfg(any(test, feature = "testing"))]
pub mod mock;
pub mod partitioner;
pub mod producer;
pub mod records;
pub mod security;
#[cfg(test)]
mod testing;
mod types;

pub use admin::{NewTopic, OffsetSpec};
pub use cluster::{Client, ClientConfig, ConnectionClass};
pub use connection::ConnectionConfig;
pub use consumer::{
    AutoOffsetReset, Consumer, ConsumerConfig, ConsumerRecord, IsolationLevel, Offset,
    TopicPartition,
};
pub use error::{Error, Result};
pub use group::{GroupConfig, GroupConsumer, GroupHandle, RebalanceListener};
pub use producer::{
    Acks, DeliveryFuture, Producer, ProducerConfig, ProducerRecord, RecordMetadata,
};
pub use records::{Compression, Header, Record};
