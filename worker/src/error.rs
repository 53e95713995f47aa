//! Errors of the worker runtime.

/// What stops a worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Kafka said no.
    #[error(transparent)]
    Client(#[from] strom_client::Error),
    /// A table's store or changelog failed.
    #[error(transparent)]
    State(#[from] strom_state::StateError),
    /// The app is declared inconsistently (a missing table, topic counts that
    /// do not match).
    #[error("{0}")]
    Config(String),
    /// An agent failed on an event under [`ErrorPolicy::Stop`](crate::ErrorPolicy::Stop).
    #[error(
        "agent failed on {topic}-{partition} at offset {offset}: {error} (error policy: stop)"
    )]
    Agent {
        /// The event's topic.
        topic: String,
        /// Its partition.
        partition: i32,
        /// Its offset.
        offset: i64,
        /// What the agent said (or the panic message).
        error: String,
    },
    /// A table holds a value that does not decode as the table's type: the
    /// store is damaged (or was written by another version of the app). Not
    /// the agent's error: the event is not committed, the worker stops, and
    /// the store is moved aside at its next open and rebuilt from the
    /// changelog.
    #[error("table {table:?} partition {partition} holds a value at key {key:?} that does not decode ({what}); the store will be moved aside and rebuilt from its changelog when the worker starts again")]
    DamagedState {
        /// The table.
        table: String,
        /// The partition number.
        partition: i32,
        /// The key, as text where it is (lossy UTF-8).
        key: String,
        /// What the decoder said.
        what: String,
    },
    /// A call of the framework itself while processing an event (a send, a
    /// table write and its changelog record) still failed after retries. It
    /// is not the agent's error and no error policy skips it: the event is
    /// not committed and the worker stops.
    #[error(
        "partition {partition}: {what} failed {attempts} time(s), the last time with: {error}"
    )]
    Framework {
        /// The partition number.
        partition: i32,
        /// What failed.
        what: String,
        /// How often it was tried.
        attempts: u32,
        /// The last error.
        error: String,
    },
    /// A fetched record batch does not decode, fetched again and again (its
    /// bytes are damaged, or its codec is unknown), and an agent of its topic
    /// has the [`crate::ErrorPolicy::Stop`] policy, or its header is damaged
    /// too so its offsets are unknown and it cannot be stepped over.
    #[error("the record batch of {topic}-{partition} at offset {offset} does not decode ({attempts} fetches): {what}")]
    CorruptBatch {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The batch's offset.
        offset: i64,
        /// How often it was fetched.
        attempts: u32,
        /// What is wrong with it.
        what: String,
    },
    /// Another worker uses this worker's transactional id (exactly-once):
    /// two workers share an instance id or a state directory.
    #[error("transactional id {transactional_id:?} was taken over by another worker ({reason}); give each worker its own --instance-id or state directory")]
    Fenced {
        /// The transactional id.
        transactional_id: String,
        /// What the broker said.
        reason: String,
    },
    /// A global table stopped reading its topic (its store failed, or a
    /// batch does not decode): it would fall behind without a word, so the
    /// worker stops.
    #[error("global table {table:?} stopped reading partition {partition} of its topic: {error}")]
    GlobalTable {
        /// The table.
        table: String,
        /// The partition of its topic.
        partition: i32,
        /// Why.
        error: String,
    },
    /// A record that processing an event caused was not acknowledged: the
    /// event's offset is not committed and the worker stops, so a restart
    /// processes it again (at-least-once).
    #[error("partition {partition}: an output or changelog record failed: {source}")]
    Delivery {
        /// The partition number.
        partition: i32,
        /// The producer's error.
        #[source]
        source: strom_client::Error,
    },
}

impl WorkerError {
    /// Whether trying the same call again may succeed (a lost connection, a
    /// leader moving, a timeout).
    pub fn is_retriable(&self) -> bool {
        match self {
            WorkerError::Client(e) => e.is_retriable(),
            WorkerError::State(strom_state::StateError::Kafka(e)) => e.is_retriable(),
            _ => false,
        }
    }
}
