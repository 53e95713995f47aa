//! The one error type of the user API.

/// What can go wrong in an app.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A key or value did not encode or decode.
    #[error("{topic}: {source}")]
    Codec {
        /// The topic or table.
        topic: String,
        /// What failed.
        #[source]
        source: crate::codec::CodecError,
    },
    /// A table read or write for a key of another partition: the key's
    /// value lives in that partition's task, so this event's cannot see it.
    #[error("table {table:?}: key {key} belongs to partition {key_partition} (by the bytes the table's key codec writes for it) but this event is from partition {partition}. group_by the stream by the table's key first; or, if the stream is keyed by it already, give the table the key codec of the stream's topic (Table::with_key_codec) and have the topic's producers partition by murmur2 of the key as the Java client does (librdkafka's default partitioner does not: set partitioner=murmur2_random). Tables have {partitions} partitions, as many as the largest topic agents read: an agent over a topic with fewer partitions that uses a table group_bys first")]
    CoPartition {
        /// The table.
        table: String,
        /// The key, as text (UTF-8 shown as a string, anything else as bytes).
        key: String,
        /// The partition the key belongs to.
        key_partition: i32,
        /// The event's partition.
        partition: i32,
        /// The tables' partition count.
        partitions: usize,
    },
    /// A windowed table was updated by an event without a time.
    #[error("table {table:?} is windowed but the event has no time (a negative timestamp); give its topic a timestamp extractor (Topic::with_timestamp)")]
    NoEventTime {
        /// The table.
        table: String,
    },
    /// The runtime failed.
    #[error(transparent)]
    Worker(#[from] strom_worker::WorkerError),
    /// Kafka said no.
    #[error(transparent)]
    Client(#[from] strom_client::Error),
    /// A table's store failed.
    #[error(transparent)]
    State(#[from] strom_state::StateError),
    /// The app stopped earlier on this error (test driver).
    #[error("the app stopped earlier: {0}")]
    Stopped(String),
    /// The app is declared or configured inconsistently.
    #[error("{0}")]
    Config(String),
}

/// A `Result` whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
