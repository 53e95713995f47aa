//! Topic patterns: agents over every topic whose name matches a regular
//! expression (Kafka's pattern subscription, Faust's `app.topic(pattern=…)`).
//!
//! A worker reads the topics that match when it starts, and looks for new
//! ones every 30 s: it adds them to its group subscription (a rebalance),
//! and reads them from their start.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use regex_lite::Regex;
use strom_client::group::GroupHandle;
use strom_client::Client;
use tracing::{info, warn};

use crate::task::Spec;
use crate::WorkerError;

/// A regular expression a topic's whole name must match (Java's
/// `Pattern.matches`, as Kafka's pattern subscriptions use).
///
/// ```
/// use strom_worker::TopicPattern;
/// let orders = TopicPattern::new("orders-.*").unwrap();
/// assert!(orders.matches("orders-eu", "shop"));
/// assert!(!orders.matches("old-orders-eu", "shop"));
/// assert!(TopicPattern::new("orders-(").is_err());
/// ```
#[derive(Debug, Clone)]
pub struct TopicPattern {
    text: String,
    regex: Regex,
}

impl TopicPattern {
    /// The pattern `pattern` (regex syntax, matched against the whole name).
    pub fn new(pattern: &str) -> Result<TopicPattern, WorkerError> {
        let regex = Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| WorkerError::Config(format!("topic pattern {pattern:?}: {e}")))?;
        Ok(TopicPattern {
            text: pattern.to_owned(),
            regex,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether app `app_id` reads `topic` for this pattern: its whole name
    /// matches, and it is neither a broker's internal topic (`__…`) nor one
    /// of the app's own changelog or repartition topics.
    pub fn matches(&self, topic: &str, app_id: &str) -> bool {
        let own = topic.starts_with(&format!("{app_id}-"))
            && (topic.ends_with("-changelog") || topic.ends_with("-repartition"));
        !topic.starts_with("__") && !own && self.regex.is_match(topic)
    }
}

/// The topics each of `sources` (the names agents read) stands for: a
/// pattern's matches among the cluster's topics, any other name itself.
pub(crate) async fn resolve(
    client: &Client,
    sources: &[String],
    patterns: &[TopicPattern],
    app_id: &str,
) -> Result<BTreeMap<String, Vec<String>>, WorkerError> {
    let is_pattern = |s: &str| patterns.iter().find(|p| p.as_str() == s);
    let names = match sources.iter().any(|s| is_pattern(s).is_some()) {
        true => client.topic_names().await?,
        false => Vec::new(),
    };
    let mut resolved = BTreeMap::new();
    for source in sources {
        let topics = match is_pattern(source) {
            Some(p) => {
                let found: Vec<String> = (names.iter())
                    .filter(|t| p.matches(t, app_id))
                    .cloned()
                    .collect();
                match found.is_empty() {
                    true => warn!(pattern = %source, "no topic matches an agent's pattern yet"),
                    false => {
                        info!(pattern = %source, topics = ?found, "an agent's pattern matches")
                    }
                }
                found
            }
            None => vec![source.clone()],
        };
        resolved.insert(source.clone(), topics);
    }
    if resolved.values().all(Vec::is_empty) {
        return Err(WorkerError::Config(format!(
            "no topic matches the agents' patterns {sources:?}, and they read no other topic"
        )));
    }
    Ok(resolved)
}

/// Reads the topics created after the worker started that match
/// `patterns`, every `every`: adds them to the agents of their patterns
/// and to the group's subscription (a rebalance hands their partitions
/// out, read from the start). A new topic with more partitions than the
/// tables of a stateful app is not read (its keys have no tables): warned
/// once.
pub(crate) async fn watch(
    spec: Arc<Spec>,
    group: GroupHandle,
    patterns: Vec<TopicPattern>,
    app_id: String,
    every: Duration,
) {
    let mut refused = BTreeSet::new();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(names) = spec.client.topic_names().await else {
            continue;
        };
        let mut added = Vec::new();
        for topic in names {
            let agents: Vec<usize> = (spec.processors.iter().enumerate())
                .filter(|(_, p)| {
                    (patterns.iter())
                        .any(|pat| pat.as_str() == p.topic() && pat.matches(&topic, &app_id))
                })
                .map(|(i, _)| i)
                .collect();
            let known = spec
                .counts
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&topic);
            if agents.is_empty() || known || refused.contains(&topic) {
                continue;
            }
            let Ok(meta) = spec.client.topic_metadata(&topic).await else {
                continue;
            };
            let n = meta.partitions.len();
            if n > spec.partitions && !spec.tables.is_empty() {
                warn!(%topic, partitions = n, tables = spec.partitions, "a new topic matches an agent's pattern but has more partitions than the tables; not read");
                refused.insert(topic);
                continue;
            }
            spec.counts
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(topic.clone(), n);
            let mut by_topic = spec.by_topic.write().unwrap_or_else(|e| e.into_inner());
            by_topic.entry(topic.clone()).or_default().extend(agents);
            added.push(topic);
        }
        if !added.is_empty() {
            info!(topics = ?added, "new topics match agents' patterns; reading them");
            let mut topics: Vec<String> = (spec.by_topic.read().unwrap_or_else(|e| e.into_inner()))
                .keys()
                .cloned()
                .collect();
            topics.sort();
            group.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>());
        }
    }
}
