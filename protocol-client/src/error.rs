//! The one error type of the client: what failed, where, and whether a retry can help.

use std::sync::Arc;
use std::time::Duration;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::ApiKey;

/// A `Result` whose error is the client's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking to Kafka.
///
/// Each variant names the broker, topic or partition involved where there is one.
/// [`Error::is_retriable`] says whether the same operation may succeed if tried
/// again (after a metadata refresh or a reconnect).
///
/// The error is `Clone` so one failure can be handed to every record of a batch.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A socket operation failed.
    #[error("I/O error talking to broker {broker}: {source}")]
    Io {
        /// `host:port` of the broker.
        broker: String,
        /// The underlying error.
        #[source]
        source: Arc<std::io::Error>,
    },

    /// A TCP connection could not be opened in time.
    #[error("could not connect to broker {broker} within {after:?}")]
    ConnectTimeout {
        /// `host:port` of the broker.
        broker: String,
        /// The configured connect timeout.
        after: Duration,
    },

    /// None of the bootstrap brokers could be reached.
    #[error("no bootstrap broker of {brokers:?} answered within {after:?}; last error: {last}")]
    NoBrokerReachable {
        /// The bootstrap list that was tried.
        brokers: Vec<String>,
        /// How long it was tried.
        after: Duration,
        /// The last error seen.
        last: Box<Error>,
    },

    /// The broker did not answer a request within the request timeout.
    #[error("{api:?} request to broker {broker} timed out after {after:?}")]
    RequestTimeout {
        /// `host:port` of the broker.
        broker: String,
        /// The API of the request.
        api: ApiKey,
        /// The configured request timeout.
        after: Duration,
    },

    /// The connection was closed while a request was waiting for its response,
    /// or a request was sent on a connection that had already failed.
    #[error("connection to broker {broker} is closed: {reason}")]
    Disconnected {
        /// `host:port` of the broker.
        broker: String,
        /// Why the connection closed.
        reason: String,
    },

    /// The broker sent bytes that are not a valid Kafka response.
    #[error("malformed response from broker {broker}: {what}")]
    Protocol {
        /// `host:port` of the broker.
        broker: String,
        /// What was wrong with it.
        what: String,
    },

    /// Client and broker share no version of an API the client needs.
    #[error("broker {broker} supports {api:?} versions {broker_min}..={broker_max}, this client needs {ours_min}..={ours_max}")]
    UnsupportedVersion {
        /// `host:port` of the broker.
        broker: String,
        /// The API.
        api: ApiKey,
        /// The lowest version the broker supports.
        broker_min: i16,
        /// The highest version the broker supports (-1 when it does not support the API at all).
        broker_max: i16,
        /// The lowest version this client speaks.
        ours_min: i16,
        /// The highest version this client speaks.
        ours_max: i16,
    },

    /// The broker answered with an error code.
    #[error("{api:?} failed with {code}{}{}{}", fmt_where(topic, *partition), fmt_msg(message), fmt_broker(broker))]
    Broker {
        /// The API of the request.
        api: ApiKey,
        /// The Kafka error code.
        code: ResponseError,
        /// The topic the error is about, if any.
        topic: Option<String>,
        /// The partition the error is about, if any.
        partition: Option<i32>,
        /// The broker's error message, if it sent one.
        message: Option<String>,
        /// `host:port` of the broker, when known.
        broker: Option<String>,
    },

    /// `create_topics` was asked for a topic that already exists.
    #[error("topic {topic:?} already exists")]
    TopicAlreadyExists {
        /// The topic.
        topic: String,
    },

    /// The topic does not exist in the cluster (and was not auto-created).
    #[error("topic {topic:?} does not exist")]
    UnknownTopic {
        /// The topic.
        topic: String,
    },

    /// The partition is outside the topic's partition count.
    #[error(
        "partition {partition} of topic {topic:?} does not exist (the topic has {partitions})"
    )]
    UnknownPartition {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: i32,
        /// The topic's partition count.
        partitions: usize,
    },

    /// A record batch could not be decoded or encoded.
    #[error("corrupt record batch{} at offset {offset}: {what}", fmt_where(topic, *partition))]
    CorruptRecord {
        /// The topic, when known.
        topic: Option<String>,
        /// The partition, when known.
        partition: Option<i32>,
        /// The batch's base offset (or the record's offset).
        offset: i64,
        /// The offset of the batch's last record, when its header passed the
        /// CRC check: the batch can then be stepped over. `None` when the
        /// header itself may be damaged.
        last_offset: Option<i64>,
        /// What is wrong.
        what: String,
    },

    /// Records could not be compressed for a batch being written.
    #[error("{codec} compression failed: {what}")]
    Compression {
        /// The codec's name.
        codec: &'static str,
        /// What went wrong.
        what: String,
    },

    /// The TLS handshake with a broker failed.
    #[error("TLS with {broker}: {what}")]
    Tls {
        /// The broker's address.
        broker: String,
        /// Why.
        what: String,
    },

    /// SASL authentication with a broker failed.
    #[error("{mechanism} authentication with {broker} failed: {what}")]
    Authentication {
        /// The broker's address.
        broker: String,
        /// The SASL mechanism.
        mechanism: &'static str,
        /// Why.
        what: String,
    },

    /// A consumer's fetch position is outside the log and the reset policy is `None`.
    #[error(
        "offset {offset} is out of range for {topic}-{partition} and the reset policy is none"
    )]
    OffsetOutOfRange {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The position that was out of range.
        offset: i64,
    },

    /// A record did not get acknowledged within the producer's delivery timeout.
    #[error("record for {topic}-{partition} not delivered within {after:?}: {last}")]
    DeliveryTimeout {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The delivery timeout.
        after: Duration,
        /// The last error that was retried.
        last: Box<Error>,
    },

    /// An offset commit was refused: the member no longer owns the partition or
    /// the group has moved to a newer generation.
    #[error("offset commit to group {group:?} refused: {reason}")]
    CommitFailed {
        /// The consumer group.
        group: String,
        /// Why.
        reason: String,
    },

    /// A newly assigned partition has no committed offset and the reset policy is `None`.
    #[error("group {group:?} has no committed offset for {topic}-{partition} and the reset policy is none")]
    NoCommittedOffset {
        /// The consumer group.
        group: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },

    /// Another producer with the same transactional id (or a newer epoch of this
    /// one) has taken over: this producer can do nothing more and must be dropped.
    #[error("producer fenced{}: {reason}", match transactional_id { Some(t) => format!(" (transactional id {t:?})"), None => String::new() })]
    ProducerFenced {
        /// The transactional id, if any.
        transactional_id: Option<String>,
        /// What the broker said.
        reason: String,
    },

    /// A transaction operation was called in the wrong state, or the current
    /// transaction hit an error and can only be aborted.
    #[error("transaction {transactional_id:?}: {what}")]
    Transaction {
        /// The transactional id.
        transactional_id: String,
        /// What is wrong.
        what: String,
    },

    /// A configuration value is invalid or contradicts another.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The producer or consumer has been closed.
    #[error("{0} is closed")]
    Closed(&'static str),
}

fn fmt_where(topic: &Option<String>, partition: Option<i32>) -> String {
    match (topic, partition) {
        (Some(t), Some(p)) => format!(" for {t}-{p}"),
        (Some(t), None) => format!(" for topic {t:?}"),
        (None, Some(p)) => format!(" for partition {p}"),
        (None, None) => String::new(),
    }
}

fn fmt_msg(message: &Option<String>) -> String {
    match message {
        Some(m) if !m.is_empty() => format!(": {m}"),
        _ => String::new(),
    }
}

fn fmt_broker(broker: &Option<String>) -> String {
    match broker {
        Some(b) => format!(" (broker {b})"),
        None => String::new(),
    }
}

impl Error {
    /// Whether trying the same operation again may succeed.
    ///
    /// True for lost connections, timeouts and the broker error codes Kafka marks
    /// as retriable (e.g. `NOT_LEADER_OR_FOLLOWER`, `UNKNOWN_TOPIC_OR_PARTITION`).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Io { .. }
            | Error::ConnectTimeout { .. }
            | Error::RequestTimeout { .. }
            | Error::Disconnected { .. }
            | Error::NoBrokerReachable { .. } => true,
            Error::Broker { code, .. } => code.is_retriable(),
            _ => false,
        }
    }

    /// Whether the error can never go away by trying again, so whatever met it
    /// must stop and report it: failed authentication or authorization, an API
    /// version the broker does not speak, a fenced producer or static member,
    /// an invalid setting (a session timeout the broker refuses, a bad group
    /// id), or a partition without a committed offset under reset policy none.
    ///
    /// ```
    /// use strom_client::Error;
    /// assert!(Error::Config("acks must be 0, 1 or all".into()).is_fatal());
    /// assert!(!Error::Closed("producer").is_fatal());
    /// ```
    pub fn is_fatal(&self) -> bool {
        match self {
            Error::ProducerFenced { .. }
            | Error::Tls { .. }
            | Error::Authentication { .. }
            | Error::Config(_)
            | Error::UnsupportedVersion { .. }
            | Error::NoCommittedOffset { .. } => true,
            Error::NoBrokerReachable { last, .. } => last.is_fatal(),
            Error::Broker { code, .. } => matches!(
                code,
                ResponseError::SaslAuthenticationFailed
                    | ResponseError::UnsupportedSaslMechanism
                    | ResponseError::IllegalSaslState
                    | ResponseError::TopicAuthorizationFailed
                    | ResponseError::GroupAuthorizationFailed
                    | ResponseError::ClusterAuthorizationFailed
                    | ResponseError::TransactionalIdAuthorizationFailed
                    | ResponseError::UnsupportedVersion
                    | ResponseError::InvalidSessionTimeout
                    | ResponseError::InconsistentGroupProtocol
                    | ResponseError::GroupMaxSizeReached
                    | ResponseError::InvalidGroupId
                    | ResponseError::FencedInstanceId
                    | ResponseError::ProducerFenced
                    | ResponseError::InvalidProducerEpoch
                    | ResponseError::InvalidTransactionTimeout
                    | ResponseError::InvalidRequiredAcks
            ),
            _ => false,
        }
    }

    /// Whether the error means the client's metadata (leaders, partitions) is stale
    /// and should be refreshed before retrying.
    pub fn needs_metadata_refresh(&self) -> bool {
        match self {
            Error::Io { .. } | Error::Disconnected { .. } | Error::ConnectTimeout { .. } => true,
            Error::Broker { code, .. } => matches!(
                code,
                ResponseError::NotLeaderOrFollower
                    | ResponseError::UnknownTopicOrPartition
                    | ResponseError::LeaderNotAvailable
                    | ResponseError::FencedLeaderEpoch
                    | ResponseError::UnknownLeaderEpoch
                    | ResponseError::NotCoordinator
                    | ResponseError::NotController
            ),
            _ => false,
        }
    }

    /// The Kafka error code, if the broker sent one.
    pub fn code(&self) -> Option<ResponseError> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// An error for a broker error code in a response.
    pub(crate) fn broker(
        api: ApiKey,
        code: ResponseError,
        topic: Option<&str>,
        partition: Option<i32>,
        message: Option<&str>,
    ) -> Error {
        Error::Broker {
            api,
            code,
            topic: topic.map(str::to_owned),
            partition,
            message: message.map(str::to_owned),
            broker: None,
        }
    }

    /// An I/O error talking to `broker`; a refusal by the broker's TLS
    /// layer carried in it (a client certificate it does not accept) is an
    /// [`Error::Tls`], which is fatal.
    pub(crate) fn io(broker: &str, source: std::io::Error) -> Error {
        if let Some(what) = crate::security::refusal(&source) {
            return Error::Tls {
                broker: broker.to_owned(),
                what,
            };
        }
        Error::Io {
            broker: broker.to_owned(),
            source: Arc::new(source),
        }
    }
}

/// Turns a response error code into `Ok(())` or an [`Error::Broker`].
pub(crate) fn check_code(
    api: ApiKey,
    code: i16,
    topic: Option<&str>,
    partition: Option<i32>,
    message: Option<&str>,
) -> Result<()> {
    match ResponseError::try_from_code(code) {
        None => Ok(()),
        Some(e) => Err(Error::broker(api, e, topic, partition, message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message names the API, the code, the topic-partition and the broker's text.
    #[test]
    fn broker_error_says_what_and_where() {
        let e = Error::broker(
            ApiKey::Produce,
            ResponseError::NotLeaderOrFollower,
            Some("orders"),
            Some(3),
            Some("leader moved"),
        );
        let text = e.to_string();
        assert!(text.contains("Produce"), "{text}");
        assert!(text.contains("orders-3"), "{text}");
        assert!(text.contains("leader moved"), "{text}");
        assert!(e.is_retriable());
        assert!(e.needs_metadata_refresh());
    }

    /// Authorization, fencing and refused settings are fatal; lost
    /// connections and leader moves are not.
    #[test]
    fn fatal_errors_are_told_apart() {
        for code in [
            ResponseError::GroupAuthorizationFailed,
            ResponseError::InvalidSessionTimeout,
            ResponseError::FencedInstanceId,
        ] {
            let e = Error::broker(ApiKey::JoinGroup, code, None, None, None);
            assert!(e.is_fatal() && !e.is_retriable(), "{e}");
        }
        let moved = Error::broker(
            ApiKey::Produce,
            ResponseError::NotLeaderOrFollower,
            None,
            None,
            None,
        );
        assert!(!moved.is_fatal());
        assert!(!Error::io("b:1", std::io::Error::other("reset")).is_fatal());
    }

    /// Fatal broker codes are not retried.
    #[test]
    fn fatal_codes_are_not_retriable() {
        let e = Error::broker(
            ApiKey::Produce,
            ResponseError::MessageTooLarge,
            None,
            None,
            None,
        );
        assert!(!e.is_retriable());
        assert!(check_code(ApiKey::Produce, 0, None, None, None).is_ok());
        assert!(check_code(ApiKey::Produce, 10, None, None, None).is_err());
    }
}
