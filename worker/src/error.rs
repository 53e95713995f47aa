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
