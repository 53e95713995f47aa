//! Topic patterns: agents over every topic whose name matches a regular
//! expression (Kafka's pattern subscription, Faust's `app.topic(pattern=…)`).
//!
//! A worker reads the topics that match when it starts. A matching topic
//! created later is read from the next start of the workers: the worker
//! logs a warning naming it when it sees it (it looks every 30 s).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use regex_lite::Regex;
use strom_client::Client;
use tracing::{info, warn};

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

/// Warns, once per topic, of topics created after the worker started that
/// match `patterns`: read from the workers' next start.
pub(crate) async fn watch(
    client: Client,
    patterns: Vec<TopicPattern>,
    app_id: String,
    read: BTreeSet<String>,
) {
    let mut warned = BTreeSet::new();
    let mut every = tokio::time::interval(Duration::from_secs(30));
    every.tick().await;
    loop {
        every.tick().await;
        let Ok(names) = client.topic_names().await else {
            continue;
        };
        for topic in names {
            let Some(p) = patterns.iter().find(|p| p.matches(&topic, &app_id)) else {
                continue;
            };
            if !read.contains(&topic) && warned.insert(topic.clone()) {
                warn!(%topic, pattern = p.as_str(), "a new topic matches an agent's pattern; the workers read it from their next start");
            }
        }
    }
}
