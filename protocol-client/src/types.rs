//! The client's shared vocabulary: [`TopicPartition`] and [`OffsetSpec`],
//! used by the admin calls, the consumer, the groups and the producer alike
//! (so none of those modules imports another for them).

use std::sync::Arc;

/// A topic and a partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
}

impl TopicPartition {
    /// `topic`-`partition`.
    pub fn new(topic: &str, partition: i32) -> Self {
        TopicPartition {
            topic: Arc::from(topic),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

/// Which offset [`Client::list_offsets`](crate::Client::list_offsets) looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The log start offset.
    Earliest,
    /// The log end offset (high watermark): the offset the next record gets.
    Latest,
    /// The first offset whose timestamp is at or after this many ms since the epoch
    /// (-1 in the result when there is none).
    Timestamp(i64),
}

impl OffsetSpec {
    pub(crate) fn timestamp(self) -> i64 {
        match self {
            OffsetSpec::Earliest => -2,
            OffsetSpec::Latest => -1,
            OffsetSpec::Timestamp(t) => t,
        }
    }
}
