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

/// Creates the changelog topic (compacted, `partitions` partitions, each on
/// `replication` brokers) if it is missing; an existing one must have exactly
/// `partitions` partitions.
pub async fn ensure_topic(
    client: &Client,
    topic: &str,
    partitions: usize,
    replication: i16,
) -> Result<()> {
    let new =
        NewTopic::new(topic, partitions as i32, replication).config("cleanup.policy", "compact");
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
