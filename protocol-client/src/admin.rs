//! Topic administration and offset look-ups: CreateTopics, DeleteTopics,
//! ListOffsets.

use std::collections::{BTreeMap, HashMap};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreatePartitionsRequest, CreateTopicsRequest, DeleteTopicsRequest, GroupId,
    ListOffsetsRequest, OffsetFetchRequest, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::cluster::{Client, ConnectionClass, CoordinatorKind};
use crate::connection::Connection;
use crate::error::{check_code, Error, Result};
pub use crate::types::OffsetSpec;
use crate::types::TopicPartition;

/// A topic to create.
///
/// ```
/// use strom_client::NewTopic;
/// let t = NewTopic::new("orders", 6, 1).config("cleanup.policy", "compact");
/// assert_eq!(t.partitions, 6);
/// ```
#[derive(Debug, Clone)]
pub struct NewTopic {
    /// The topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i16,
    /// Topic configs such as `cleanup.policy=compact`.
    pub configs: Vec<(String, String)>,
}

impl NewTopic {
    /// A topic with `partitions` partitions, each on `replication_factor` brokers.
    pub fn new(name: impl Into<String>, partitions: i32, replication_factor: i16) -> Self {
        NewTopic {
            name: name.into(),
            partitions,
            replication_factor,
            configs: Vec::new(),
        }
    }

    /// Adds a topic config.
    pub fn config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.configs.push((key.into(), value.into()));
        self
    }
}

fn topic_name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

impl Client {
    /// Creates a topic. An existing topic is [`Error::TopicAlreadyExists`].
    ///
    /// ```no_run
    /// # async fn f(client: strom_client::Client) -> strom_client::Result<()> {
    /// use strom_client::NewTopic;
    /// client.create_topic(NewTopic::new("orders", 6, 1)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_topic(&self, topic: NewTopic) -> Result<()> {
        let timeout_ms = self.config().connection.request_timeout.as_millis() as i32;
        let req = CreateTopicsRequest::default()
            .with_timeout_ms(timeout_ms)
            .with_topics(vec![CreatableTopic::default()
                .with_name(topic_name(&topic.name))
                .with_num_partitions(topic.partitions)
                .with_replication_factor(topic.replication_factor)
                .with_configs(
                    topic
                        .configs
                        .iter()
                        .map(|(k, v)| {
                            CreatableTopicConfig::default()
                                .with_name(StrBytes::from_string(k.clone()))
                                .with_value(Some(StrBytes::from_string(v.clone())))
                        })
                        .collect(),
                )]);
        let resp = self
            .retry(&[], || async { self.controller().await?.send(&req).await })
            .await?;
        for t in &resp.topics {
            if t.error_code == ResponseError::TopicAlreadyExists.code() {
                return Err(Error::TopicAlreadyExists {
                    topic: topic.name.clone(),
                });
            }
            check_code(
                ApiKey::CreateTopics,
                t.error_code,
                Some(t.name.0.as_str()),
                None,
                t.error_message.as_ref().map(StrBytes::as_str),
            )?;
        }
        // Wait until the new topic's partitions have leaders.
        self.invalidate_topic(&topic.name);
        self.topic_metadata(&topic.name).await?;
        Ok(())
    }

    /// Creates `topic` unless it exists; returns the partition count the
    /// topic has (created or found) — compare it with `topic.partitions`
    /// where the count matters.
    ///
    /// ```no_run
    /// # async fn f(client: strom_client::Client) -> strom_client::Result<()> {
    /// use strom_client::NewTopic;
    /// let partitions = client.ensure_topic(NewTopic::new("orders", 6, 1)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure_topic(&self, topic: NewTopic) -> Result<usize> {
        let (name, partitions) = (topic.name.clone(), topic.partitions);
        match self.create_topic(topic).await {
            Ok(()) => {
                tracing::info!(topic = %name, partitions, "created topic");
                Ok(partitions.max(0) as usize)
            }
            Err(Error::TopicAlreadyExists { .. }) => {
                Ok(self.topic_metadata(&name).await?.partitions.len())
            }
            Err(e) => Err(e),
        }
    }

    /// Grows `topic` to `partitions` partitions in all (CreatePartitions).
    /// Producers and group consumers pick the new partitions up at their next
    /// metadata refresh (`metadata_max_age`).
    ///
    /// ```no_run
    /// # async fn f(client: strom_client::Client) -> strom_client::Result<()> {
    /// client.create_partitions("orders", 12).await?;
    /// # Ok(()) }
    /// ```
    pub async fn create_partitions(&self, topic: &str, partitions: i32) -> Result<()> {
        let timeout_ms = self.config().connection.request_timeout.as_millis() as i32;
        let req = CreatePartitionsRequest::default()
            .with_timeout_ms(timeout_ms)
            .with_topics(vec![CreatePartitionsTopic::default()
                .with_name(topic_name(topic))
                .with_count(partitions)]);
        let resp = self
            .retry(&[], || async { self.controller().await?.send(&req).await })
            .await?;
        for t in &resp.results {
            check_code(
                ApiKey::CreatePartitions,
                t.error_code,
                Some(t.name.0.as_str()),
                None,
                t.error_message.as_ref().map(StrBytes::as_str),
            )?;
        }
        self.invalidate_topic(topic);
        self.topic_metadata(topic).await?;
        Ok(())
    }

    /// Deletes topics by name.
    pub async fn delete_topics(&self, topics: &[&str]) -> Result<()> {
        let timeout_ms = self.config().connection.request_timeout.as_millis() as i32;
        let resp = self
            .retry(&[], || async {
                let conn = self.controller().await?;
                let mut req = DeleteTopicsRequest::default().with_timeout_ms(timeout_ms);
                if conn.version::<DeleteTopicsRequest>()? >= 6 {
                    req.topics = topics
                        .iter()
                        .map(|t| DeleteTopicState::default().with_name(Some(topic_name(t))))
                        .collect();
                } else {
                    req.topic_names = topics.iter().map(|t| topic_name(t)).collect();
                }
                conn.send(&req).await
            })
            .await?;
        for t in &resp.responses {
            let name = t.name.as_ref().map(|n| n.0.as_str().to_owned());
            if t.error_code == ResponseError::UnknownTopicOrPartition.code() {
                return Err(Error::UnknownTopic {
                    topic: name.unwrap_or_default(),
                });
            }
            check_code(
                ApiKey::DeleteTopics,
                t.error_code,
                name.as_deref(),
                None,
                t.error_message.as_ref().map(StrBytes::as_str),
            )?;
            if let Some(name) = &name {
                self.invalidate_topic(name);
            }
        }
        Ok(())
    }

    /// Looks up an offset for every partition of `topic`, asking each
    /// partition's leader. Returns partition → offset.
    ///
    /// ```no_run
    /// # async fn f(client: strom_client::Client) -> strom_client::Result<()> {
    /// use strom_client::OffsetSpec;
    /// let ends = client.list_offsets("orders", OffsetSpec::Latest).await?;
    /// let total: i64 = ends.values().sum();
    /// # Ok(()) }
    /// ```
    pub async fn list_offsets(&self, topic: &str, spec: OffsetSpec) -> Result<BTreeMap<i32, i64>> {
        let meta = self.topic_metadata(topic).await?;
        let partitions: Vec<i32> = meta.partitions.iter().map(|p| p.partition).collect();
        self.list_partition_offsets(topic, &partitions, spec).await
    }

    /// Like [`Client::list_offsets`] for chosen partitions of `topic`.
    pub async fn list_partition_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
        spec: OffsetSpec,
    ) -> Result<BTreeMap<i32, i64>> {
        self.retry(&[topic], || async {
            let mut by_leader: HashMap<i32, Vec<i32>> = HashMap::new();
            for &p in partitions {
                by_leader
                    .entry(self.leader(topic, p).await?)
                    .or_default()
                    .push(p);
            }
            let mut out = BTreeMap::new();
            for (leader, parts) in by_leader {
                let conn = self.broker(leader, ConnectionClass::Normal).await?;
                let req = ListOffsetsRequest::default()
                    .with_replica_id(BrokerId(-1))
                    .with_topics(vec![ListOffsetsTopic::default()
                        .with_name(topic_name(topic))
                        .with_partitions(
                            parts
                                .iter()
                                .map(|&p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(p)
                                        .with_current_leader_epoch(-1)
                                        .with_timestamp(spec.timestamp())
                                })
                                .collect(),
                        )]);
                let resp = conn.send(&req).await?;
                for t in resp.topics {
                    for p in t.partitions {
                        check_code(
                            ApiKey::ListOffsets,
                            p.error_code,
                            Some(topic),
                            Some(p.partition_index),
                            None,
                        )?;
                        out.insert(p.partition_index, p.offset);
                    }
                }
            }
            for p in partitions {
                if !out.contains_key(p) {
                    return Err(Error::Protocol {
                        broker: format!("leader of {topic}-{p}"),
                        what: "ListOffsets response left out a partition".into(),
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    /// Group `group_id`'s committed offsets for `partitions` (`None`: nothing
    /// committed), asked of its coordinator without joining the group (Java's
    /// `Admin.listConsumerGroupOffsets`): for lag and tooling.
    ///
    /// ```no_run
    /// # async fn f(client: strom_client::Client) -> strom_client::Result<()> {
    /// use strom_client::TopicPartition;
    /// let committed = client.committed_offsets("billing", &[TopicPartition::new("orders", 0)]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn committed_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<BTreeMap<TopicPartition, Option<i64>>> {
        let req = offset_fetch_request(group_id, partitions);
        self.retry(&[], || async {
            let coordinator = self
                .find_coordinator(group_id, CoordinatorKind::Group)
                .await?;
            let conn = self.broker(coordinator, ConnectionClass::Normal).await?;
            offset_fetch(&conn, &req).await
        })
        .await
    }
}

/// An OffsetFetch of `partitions` for `group_id`.
pub(crate) fn offset_fetch_request(
    group_id: &str,
    partitions: &[TopicPartition],
) -> OffsetFetchRequest {
    let mut topics: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for tp in partitions {
        topics.entry(&tp.topic).or_default().push(tp.partition);
    }
    OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group_id.to_owned())))
        .with_topics(Some(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    OffsetFetchRequestTopic::default()
                        .with_name(topic_name(t))
                        .with_partition_indexes(ps)
                })
                .collect(),
        ))
}

/// Sends `req` to a group coordinator and reads the committed offsets.
pub(crate) async fn offset_fetch(
    conn: &Connection,
    req: &OffsetFetchRequest,
) -> Result<BTreeMap<TopicPartition, Option<i64>>> {
    let mut req = req.clone();
    if conn.version::<OffsetFetchRequest>()? >= 7 {
        req.require_stable = true;
    }
    let resp = conn.send(&req).await?;
    check_code(ApiKey::OffsetFetch, resp.error_code, None, None, None)?;
    let mut out = BTreeMap::new();
    for t in &resp.topics {
        for p in &t.partitions {
            check_code(
                ApiKey::OffsetFetch,
                p.error_code,
                Some(t.name.0.as_str()),
                Some(p.partition_index),
                None,
            )?;
            let tp = TopicPartition::new(t.name.0.as_str(), p.partition_index);
            out.insert(tp, (p.committed_offset >= 0).then_some(p.committed_offset));
        }
    }
    Ok(out)
}
