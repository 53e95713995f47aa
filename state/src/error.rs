//! Errors of the state layer.

use std::path::PathBuf;

/// A `Result` whose error is [`StateError`].
pub type Result<T, E = StateError> = std::result::Result<T, E>;

/// What can go wrong with a state store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The store's file could not be read or written.
    #[error("state store {path}: {what}")]
    Storage {
        /// The store's file.
        path: PathBuf,
        /// What failed.
        what: String,
    },
    /// A file operation on the state directory failed.
    #[error("state directory {path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Talking to Kafka failed (changelog produce or recovery).
    #[error("changelog: {0}")]
    Kafka(#[from] strom_client::Error),
    /// The changelog topic exists with a partition count other than the table's.
    #[error("changelog topic {topic:?} has {found} partitions but the table has {expected}; delete it or fix the source topic")]
    ChangelogPartitions {
        /// The changelog topic.
        topic: String,
        /// The table's partition count.
        expected: usize,
        /// The changelog's partition count.
        found: usize,
    },
    /// A key or value could not be encoded or decoded.
    #[error("{what}")]
    Codec {
        /// What was wrong.
        what: String,
    },
}

impl StateError {
    pub(crate) fn storage(path: &std::path::Path, what: impl std::fmt::Display) -> StateError {
        StateError::Storage {
            path: path.to_owned(),
            what: what.to_string(),
        }
    }
}
