//! The changelog topic of a table: one compacted Kafka topic with as many
//! partitions as the table's source topic (co-partitioning).

use strom_client::{Client, NewTopic};

use crate::error::{Result, StateError};

/// The changelog topic of `table` in app `app_id`: `<app-id>-<table>-changelog`.
///
/// ```
/// assert_eq!(strom_state::changelog::topic_name("billing", "totals"), "billing-totals-changelog");
/// ```
pub fn topic_name(app_id: &str, table: &str) -> String {
    format!("{app_id}-{table}-changelog")
}

/// How much longer than its table's retention a windowed table's changelog
/// keeps records: a day, as Kafka Streams'
/// `windowstore.changelog.additional.retention.ms`.
pub const ADDITIONAL_RETENTION_MS: i64 = 24 * 3_600_000;

/// Creates the changelog topic (compacted, `partitions` partitions, each on
/// `replication` brokers) if it is missing; an existing one must have exactly
/// `partitions` partitions. The changelog of a windowed table, whose windows
/// are kept for `retention` ms, also deletes records older than that plus
/// [`ADDITIONAL_RETENTION_MS`] (`cleanup.policy=compact,delete`), so it stays
/// bounded even for keys whose tombstones were lost.
pub async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: usize,
    replication: i16,
    retention: Option<i64>,
) -> Result<()> {
    let new = NewTopic::new(topic, partitions as i32, replication);
    let new = match retention {
        None => new.config("cleanup.policy", "compact"),
        Some(ms) => new.config("cleanup.policy", "compact,delete").config(
            "retention.ms",
            ms.saturating_add(ADDITIONAL_RETENTION_MS).to_string(),
        ),
    };
    let found = client.ensure_topic(new).await?;
    if found != partitions {
        return Err(StateError::ChangelogPartitions {
            topic: topic.to_owned(),
            expected: partitions,
            found,
        });
    }
    Ok(())
}
