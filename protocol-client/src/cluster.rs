//! The cluster as the client sees it: bootstrap brokers, a metadata cache of
//! topics, partitions, leaders and broker addresses, and a pool of connections.
//!
//! [`Client`] is the entry point: cheap to clone, shared by producers, consumers
//! and admin calls. Connections are opened lazily, one per broker and
//! [`ConnectionClass`], and replaced when they fail. Metadata is refreshed when an
//! operation reports a stale leader or a lost connection ([`Client::retry`] wraps
//! an operation in that refresh-and-backoff loop), and every
//! `metadata_max_age` in the background, so partitions added to a topic and
//! brokers that move are picked up ([`Client::metadata_changes`] says when).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::time::Instant;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::connection::{Connection, ConnectionConfig};
use crate::error::{Error, Result};
use crate::security::{SaslConfig, SaslMechanism, Security};

/// Settings of a [`Client`].
///
/// ```
/// let config = strom_client::ClientConfig::new(["127.0.0.1:9092"]);
/// assert_eq!(config.bootstrap, vec!["127.0.0.1:9092".to_string()]);
/// ```
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `host:port` of one or more brokers to learn the cluster from
    /// (Java's `bootstrap.servers`).
    pub bootstrap: Vec<String>,
    /// Client id, timeouts of each connection.
    pub connection: ConnectionConfig,
    /// How long [`Client::connect`] keeps trying the bootstrap brokers before it
    /// gives up. Default 10 s.
    pub bootstrap_timeout: Duration,
    /// Pause before the first retry, doubled each time up to
    /// `retry_backoff_max`, ±20% (Java's `retry.backoff.ms`). Default 100 ms.
    pub retry_backoff: Duration,
    /// Longest pause between retries (Java's `retry.backoff.max.ms`). Default 1 s.
    pub retry_backoff_max: Duration,
    /// How long [`Client::retry`] keeps retrying a retriable failure. Default 30 s.
    pub retry_timeout: Duration,
    /// How often the cached metadata of every known topic is reloaded even
    /// when nothing failed (Java's `metadata.max.age.ms`). Default 5 min.
    pub metadata_max_age: Duration,
}

impl ClientConfig {
    /// Defaults with the given bootstrap brokers.
    pub fn new<S: Into<String>>(bootstrap: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            bootstrap: bootstrap.into_iter().map(Into::into).collect(),
            connection: ConnectionConfig::default(),
            bootstrap_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(100),
            retry_backoff_max: Duration::from_secs(1),
            retry_timeout: Duration::from_secs(30),
            metadata_max_age: Duration::from_secs(300),
        }
    }
}

/// The settings [`ClientConfig::set`] takes, by Kafka's names (plus
/// `ssl.server.name`, Strom's own: the name brokers' certificates must carry
/// in place of their host).
pub const SETTINGS: &[&str] = &[
    "bootstrap.servers",
    "client.id",
    "security.protocol",
    "sasl.mechanism",
    "sasl.username",
    "sasl.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.server.name",
    "request.timeout.ms",
    "metadata.max.age.ms",
];

fn millis(name: &str, value: &str) -> Result<Duration> {
    match value.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(Error::Config(format!(
            "{name} {value:?} is not a positive number of milliseconds"
        ))),
    }
}

/// The environment variable of a setting: `STROM_` and the name upper-cased,
/// dots as underscores (`security.protocol` → `STROM_SECURITY_PROTOCOL`).
pub fn env_var(setting: &str) -> String {
    format!("STROM_{}", setting.to_ascii_uppercase().replace('.', "_"))
}

impl ClientConfig {
    /// Sets one setting by its Kafka name (see [`SETTINGS`]).
    ///
    /// ```
    /// let mut config = strom_client::ClientConfig::new(["broker:9093"]);
    /// config.set("security.protocol", "SASL_SSL").unwrap();
    /// config.set("sasl.mechanism", "SCRAM-SHA-512").unwrap();
    /// config.set("sasl.username", "alice").unwrap();
    /// config.set("sasl.password", "s3cret").unwrap();
    /// assert!(!format!("{config:?}").contains("s3cret"));
    /// assert!(config.set("sasl.mechanism", "GSSAPI").is_err());
    /// ```
    pub fn set(&mut self, name: &str, value: &str) -> Result<()> {
        fn sasl(security: &mut Security) -> &mut SaslConfig {
            security
                .sasl
                .get_or_insert_with(|| SaslConfig::password(SaslMechanism::Plain, "", ""))
        }
        let security = &mut self.connection.security;
        match name {
            "bootstrap.servers" => {
                self.bootstrap = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "client.id" => self.connection.client_id = value.to_owned(),
            "security.protocol" => security.protocol = value.parse()?,
            "sasl.mechanism" | "sasl.mechanisms" => sasl(security).mechanism = value.parse()?,
            "sasl.username" => sasl(security).username = value.to_owned(),
            "sasl.password" => sasl(security).password = value.to_owned(),
            "ssl.ca.location" => security.tls.ca_location = Some(value.into()),
            "ssl.certificate.location" => security.tls.certificate_location = Some(value.into()),
            "ssl.key.location" => security.tls.key_location = Some(value.into()),
            "ssl.server.name" => security.tls.server_name = Some(value.to_owned()),
            "request.timeout.ms" => self.connection.request_timeout = millis(name, value)?,
            "metadata.max.age.ms" => self.metadata_max_age = millis(name, value)?,
            other => {
                return Err(Error::Config(format!(
                    "unknown setting {other:?}; known: {}",
                    SETTINGS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// Sets every setting whose environment variable ([`env_var`]) is set.
    /// The error names the variable.
    pub fn apply_env(&mut self) -> Result<()> {
        for name in SETTINGS {
            let var = env_var(name);
            if let Ok(value) = std::env::var(&var) {
                self.set(name, &value).map_err(|e| match e {
                    Error::Config(what) => Error::Config(format!("{var}: {what}")),
                    e => e,
                })?;
            }
        }
        Ok(())
    }

    /// The retry schedule these settings describe.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.retry_backoff, self.retry_backoff_max)
    }
}

/// Which of a broker's connections a request travels on.
///
/// Kafka serves the requests of one connection one at a time, so a long-poll
/// Fetch would hold up a Produce behind it: each class gets its own connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnectionClass {
    /// Metadata, admin and offset look-ups.
    Normal,
    /// Produce requests.
    Produce,
    /// Fetch requests.
    Fetch,
}

/// What [`Client::find_coordinator`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordinatorKind {
    /// A consumer group's coordinator.
    Group = 0,
    /// A transactional id's transaction coordinator.
    Transaction = 1,
}

/// One partition's entry in the metadata cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionMetadata {
    /// The partition index.
    pub partition: i32,
    /// The leader's broker id, -1 when the partition has no leader right now.
    pub leader: i32,
    /// The leader epoch.
    pub leader_epoch: i32,
}

/// One topic's entry in the metadata cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    /// The topic name.
    pub name: String,
    /// Its partitions, indexed by partition number.
    pub partitions: Vec<PartitionMetadata>,
}

#[derive(Debug, Default)]
struct Metadata {
    brokers: HashMap<i32, String>,
    controller: Option<i32>,
    topics: HashMap<String, Arc<TopicMetadata>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Arc<Connection>>>>;

struct Inner {
    config: ClientConfig,
    /// Read from the `ssl.*` files once, for every connection.
    tls: Option<crate::security::TlsClientConfig>,
    metadata: RwLock<Metadata>,
    pool: Mutex<HashMap<(i32, ConnectionClass), Slot>>,
    /// Connections to bootstrap addresses, used until broker ids are known.
    bootstrap: Slot,
    /// Single-flight metadata refreshes.
    refresh: tokio::sync::Mutex<()>,
    /// Bumped whenever a refresh changes a topic's partition count or the
    /// broker list.
    changes: tokio::sync::watch::Sender<u64>,
    /// The same count, cheap to read on every record.
    epoch: std::sync::atomic::AtomicU64,
    /// Brokers that cannot be reached right now, for logging once per incident.
    incidents: crate::health::Incidents,
}

/// A handle to a Kafka cluster: metadata and connections, shared by the
/// producer, the consumer and admin calls.
///
/// ```no_run
/// # async fn example() -> strom_client::Result<()> {
/// use strom_client::{Client, ClientConfig};
/// let client = Client::connect(ClientConfig::new(["127.0.0.1:9092"])).await?;
/// let topic = client.topic_metadata("orders").await?;
/// println!("orders has {} partitions", topic.partitions.len());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bootstrap", &self.inner.config.bootstrap)
            .finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

impl Client {
    /// Connects to the cluster: keeps trying the bootstrap brokers until one
    /// answers or `bootstrap_timeout` passes, then loads the broker list.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        if config.bootstrap.is_empty() {
            return Err(Error::Config("the bootstrap broker list is empty".into()));
        }
        config.connection.security.validate()?;
        let tls = config.connection.security.tls_client_config()?;
        let client = Client {
            inner: Arc::new(Inner {
                config,
                tls,
                metadata: RwLock::default(),
                pool: Mutex::default(),
                bootstrap: Slot::default(),
                refresh: tokio::sync::Mutex::new(()),
                changes: tokio::sync::watch::Sender::new(0),
                epoch: std::sync::atomic::AtomicU64::new(0),
                incidents: crate::health::Incidents::default(),
            }),
        };
        client.refresh_metadata(&[]).await?;
        tokio::spawn(refresh_periodically(Arc::downgrade(&client.inner)));
        Ok(client)
    }

    /// A receiver that sees a new value whenever a metadata refresh changed
    /// the partition count of a cached topic, added a topic to the cache, or
    /// changed the broker list (ids or addresses).
    ///
    /// ```no_run
    /// # async fn example(client: strom_client::Client) {
    /// let mut changes = client.metadata_changes();
    /// while changes.changed().await.is_ok() {
    ///     let orders = client.cached_topic("orders").map(|t| t.partitions.len());
    ///     println!("orders now has {orders:?} partitions");
    /// }
    /// # }
    /// ```
    pub fn metadata_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// How many times a refresh changed the metadata (see
    /// [`Client::metadata_changes`]): what was derived from the cache under
    /// the same value still holds. One atomic load.
    pub fn metadata_epoch(&self) -> u64 {
        self.inner.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// A connection of the given class to broker `id`, opened if needed.
    pub async fn broker(&self, id: i32, class: ConnectionClass) -> Result<Arc<Connection>> {
        let addr = read(&self.inner.metadata).brokers.get(&id).cloned();
        let Some(addr) = addr else {
            return Err(Error::Disconnected {
                broker: format!("broker id {id}"),
                reason: "the broker is not in the cluster metadata".into(),
            });
        };
        let slot = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
            pool.entry((id, class)).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.is_closed() && conn.broker() == addr {
                return Ok(conn.clone());
            }
        }
        debug!(broker = %addr, id, ?class, "connecting");
        let conn = Arc::new(self.connect_to(&addr).await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Opens a connection to `addr`, noting how the attempt went (see
    /// [`crate::health`]).
    pub(crate) async fn connect_to(&self, addr: &str) -> Result<Connection> {
        let incidents = &self.inner.incidents;
        let (config, tls) = (&self.inner.config.connection, self.inner.tls.clone());
        match Connection::open(addr, config, tls).await {
            Ok(conn) => {
                incidents.connected(addr);
                Ok(conn)
            }
            Err(e) => {
                incidents.failed(addr, &e);
                Err(e)
            }
        }
    }

    /// The broker id of the coordinator for a consumer group or a
    /// transactional id (FindCoordinator).
    pub async fn find_coordinator(&self, key: &str, kind: CoordinatorKind) -> Result<i32> {
        let conn = self.any_broker().await?;
        let req = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(key.to_owned()))
            .with_key_type(kind as i8);
        let resp = conn.send(&req).await?;
        crate::error::check_code(
            ApiKey::FindCoordinator,
            resp.error_code,
            None,
            None,
            resp.error_message.as_ref().map(StrBytes::as_str),
        )?;
        if !read(&self.inner.metadata)
            .brokers
            .contains_key(&resp.node_id.0)
        {
            self.refresh_metadata(&[]).await?;
        }
        debug!(%key, ?kind, coordinator = resp.node_id.0, "found coordinator");
        Ok(resp.node_id.0)
    }

    /// `host:port` of broker `id`, if the metadata knows it.
    pub fn broker_address(&self, id: i32) -> Option<String> {
        read(&self.inner.metadata).brokers.get(&id).cloned()
    }

    /// Any working connection: a known broker's, else a bootstrap broker's, tried
    /// until one answers or `bootstrap_timeout` passes.
    pub async fn any_broker(&self) -> Result<Arc<Connection>> {
        let ids: Vec<i32> = read(&self.inner.metadata).brokers.keys().copied().collect();
        for id in ids {
            match self.broker(id, ConnectionClass::Normal).await {
                Ok(c) => return Ok(c),
                Err(e) => debug!(id, error = %e, "broker unreachable, trying another"),
            }
        }
        let mut slot = self.inner.bootstrap.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
        }
        let config = &self.inner.config;
        let started = Instant::now();
        let mut backoff = config.backoff();
        loop {
            let mut last = None;
            for addr in &config.bootstrap {
                match self.connect_to(addr).await {
                    Ok(c) => {
                        let c = Arc::new(c);
                        *slot = Some(c.clone());
                        return Ok(c);
                    }
                    // A refused certificate or password is refused by every
                    // broker, and again later: say so at once.
                    Err(e) if e.is_fatal() => return Err(e),
                    Err(e) => {
                        debug!(broker = %addr, error = %e, "bootstrap broker unreachable");
                        last = Some(e);
                    }
                }
            }
            let elapsed = started.elapsed();
            if elapsed >= config.bootstrap_timeout {
                return Err(Error::NoBrokerReachable {
                    brokers: config.bootstrap.clone(),
                    after: config.bootstrap_timeout,
                    last: Box::new(last.unwrap_or(Error::Config("no bootstrap broker".into()))),
                });
            }
            tokio::time::sleep(backoff.next_delay().min(config.bootstrap_timeout - elapsed)).await;
        }
    }

    /// A connection to the controller (for topic administration), falling back to
    /// any broker when the controller is unknown.
    pub async fn controller(&self) -> Result<Arc<Connection>> {
        let controller = read(&self.inner.metadata).controller;
        match controller {
            Some(id) => self.broker(id, ConnectionClass::Normal).await,
            None => self.any_broker().await,
        }
    }

    /// Reloads metadata for `topics` (only brokers and controller when empty).
    ///
    /// Topics the broker reports as unknown are dropped from the cache.
    pub async fn refresh_metadata(&self, topics: &[&str]) -> Result<()> {
        let _single = self.inner.refresh.lock().await;
        let conn = self.any_broker().await?;
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| {
                        MetadataRequestTopic::default()
                            .with_name(Some(TopicName(StrBytes::from_string((*t).to_owned()))))
                    })
                    .collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let resp = conn.send(&req).await.inspect_err(|e| {
            debug!(error = %e, "metadata request failed");
        })?;
        self.apply_metadata(resp);
        Ok(())
    }

    /// The names of every topic in the cluster, sorted (a Metadata request
    /// for all topics; their metadata is cached too).
    pub async fn topic_names(&self) -> Result<Vec<String>> {
        let _single = self.inner.refresh.lock().await;
        let conn = self.any_broker().await?;
        let req = MetadataRequest::default()
            .with_topics(None)
            .with_allow_auto_topic_creation(false);
        let resp = conn.send(&req).await?;
        let mut names: Vec<String> = (resp.topics.iter())
            .filter(|t| t.error_code == 0)
            .filter_map(|t| t.name.as_ref().map(|n| n.0.as_str().to_owned()))
            .collect();
        names.sort();
        self.apply_metadata(resp);
        Ok(names)
    }

    fn apply_metadata(&self, resp: MetadataResponse) {
        let mut md = write(&self.inner.metadata);
        let brokers: HashMap<i32, String> = resp
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host.as_str(), b.port)))
            .collect();
        let mut changed = !md.brokers.is_empty() && md.brokers != brokers;
        if changed {
            info!(before = ?md.brokers, after = ?brokers, "the cluster's brokers changed");
        }
        md.brokers = brokers;
        md.controller = (resp.controller_id.0 >= 0).then_some(resp.controller_id.0);
        for t in resp.topics {
            let Some(name) = t.name.map(|n| n.0.as_str().to_owned()) else {
                continue;
            };
            if t.error_code != 0 {
                debug!(topic = %name, code = t.error_code, "topic metadata error");
                md.topics.remove(&name);
                continue;
            }
            let mut partitions: Vec<PartitionMetadata> = t
                .partitions
                .iter()
                .map(|p| PartitionMetadata {
                    partition: p.partition_index,
                    leader: if p.error_code == 0 || p.leader_id.0 >= 0 {
                        p.leader_id.0
                    } else {
                        -1
                    },
                    leader_epoch: p.leader_epoch,
                })
                .collect();
            partitions.sort_by_key(|p| p.partition);
            let dense = partitions
                .iter()
                .enumerate()
                .all(|(i, p)| p.partition == i as i32);
            if !dense {
                warn!(topic = %name, "metadata lists partitions with gaps; ignoring it");
                continue;
            }
            let before = md.topics.get(&name).map(|t| t.partitions.len());
            if before != Some(partitions.len()) {
                if let Some(before) = before {
                    info!(topic = %name, before, after = partitions.len(), "partition count changed");
                }
                changed = true;
            }
            md.topics
                .insert(name.clone(), Arc::new(TopicMetadata { name, partitions }));
        }
        drop(md);
        if changed {
            self.inner
                .epoch
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            self.inner.changes.send_modify(|v| *v += 1);
        }
    }

    /// The cached metadata of `topic`, if any.
    pub fn cached_topic(&self, topic: &str) -> Option<Arc<TopicMetadata>> {
        read(&self.inner.metadata).topics.get(topic).cloned()
    }

    /// Metadata of `topic`, loaded when not cached, waiting (up to the retry
    /// timeout) for every partition to have a leader. [`Error::UnknownTopic`]
    /// when the topic does not exist.
    pub async fn topic_metadata(&self, topic: &str) -> Result<Arc<TopicMetadata>> {
        if let Some(t) = self.cached_topic(topic) {
            if t.partitions.iter().all(|p| p.leader >= 0) {
                return Ok(t);
            }
        }
        self.retry(&[topic], || async {
            self.refresh_metadata(&[topic]).await?;
            match self.cached_topic(topic) {
                None => Err(Error::UnknownTopic {
                    topic: topic.to_owned(),
                }),
                Some(t) if t.partitions.iter().any(|p| p.leader < 0) => Err(Error::broker(
                    ApiKey::Metadata,
                    ResponseError::LeaderNotAvailable,
                    Some(topic),
                    None,
                    None,
                )),
                Some(t) => Ok(t),
            }
        })
        .await
    }

    /// The leader of a partition from the cache (refreshing it once when the
    /// partition is unknown or leaderless).
    pub async fn leader(&self, topic: &str, partition: i32) -> Result<i32> {
        let t = self.topic_metadata(topic).await?;
        match t.partitions.get(partition as usize) {
            Some(p) if partition >= 0 && p.leader >= 0 => Ok(p.leader),
            Some(_) => Err(Error::broker(
                ApiKey::Metadata,
                ResponseError::LeaderNotAvailable,
                Some(topic),
                Some(partition),
                None,
            )),
            None => Err(Error::UnknownPartition {
                topic: topic.to_owned(),
                partition,
                partitions: t.partitions.len(),
            }),
        }
    }

    /// Forgets a cached topic so the next look-up asks the cluster.
    pub fn invalidate_topic(&self, topic: &str) {
        write(&self.inner.metadata).topics.remove(topic);
    }

    /// Runs `op` until it succeeds, fails with a non-retriable error, or the
    /// retry timeout passes; between attempts it backs off and, when the error
    /// says metadata is stale, refreshes the metadata of `topics`.
    pub async fn retry<T, F, Fut>(&self, topics: &[&str], mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let config = &self.inner.config;
        let started = Instant::now();
        let mut backoff = config.backoff();
        loop {
            let err = match op().await {
                Ok(v) => return Ok(v),
                Err(e) => e,
            };
            let pause = backoff.next_delay();
            if !err.is_retriable() || started.elapsed() + pause > config.retry_timeout {
                return Err(err);
            }
            debug!(error = %err, ?pause, "retrying");
            tokio::time::sleep(pause).await;
            if err.needs_metadata_refresh() {
                for t in topics {
                    self.invalidate_topic(t);
                }
                if let Err(e) = self.refresh_metadata(topics).await {
                    debug!(error = %e, "metadata refresh failed");
                }
            }
        }
    }
}

/// Reloads the metadata of every cached topic each `metadata_max_age`, for as
/// long as a [`Client`] handle exists.
async fn refresh_periodically(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(age) = inner.upgrade().map(|i| i.config.metadata_max_age) else {
            return;
        };
        tokio::time::sleep(age).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let client = Client { inner };
        let topics: Vec<String> = read(&client.inner.metadata)
            .topics
            .keys()
            .cloned()
            .collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = client.refresh_metadata(&names).await {
            debug!(error = %e, "periodic metadata refresh failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;
    use crate::connection::Connector;
    use crate::group::{GroupConfig, GroupConsumer, NoopListener};
    use crate::mock::MockCluster;
    use crate::producer::{Producer, ProducerConfig, ProducerRecord};

    fn config(cluster: &MockCluster) -> ClientConfig {
        let mut config = cluster.client_config();
        config.metadata_max_age = Duration::from_secs(5);
        config
    }

    async fn send_keyed(producer: &Producer, n: usize) {
        for i in 0..n {
            let key = format!("key-{i}");
            producer
                .send(ProducerRecord::to("t").key(key.as_bytes()).value(b"v"))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }

    /// Partitions added to a topic are used by the producer's partitioner
    /// after the next periodic refresh, without any error to provoke one.
    #[tokio::test(start_paused = true)]
    async fn the_producer_uses_partitions_added_within_the_metadata_max_age() {
        let cluster = MockCluster::new();
        cluster.create_topic("t", 1);
        let client = Client::connect(config(&cluster)).await.unwrap();
        let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
        send_keyed(&producer, 20).await;
        assert_eq!(cluster.records("t", 0).len(), 20);
        let mut changes = client.metadata_changes();

        // Another client adds the partitions, as an operator would.
        let admin = Client::connect(config(&cluster)).await.unwrap();
        admin.create_partitions("t", 4).await.unwrap();
        assert!(admin.create_partitions("t", 2).await.is_err(), "shrunk");
        send_keyed(&producer, 20).await;
        assert_eq!(cluster.records("t", 0).len(), 40, "used before any refresh");

        tokio::time::timeout(Duration::from_secs(6), changes.changed())
            .await
            .expect("no refresh within the metadata max age")
            .unwrap();
        send_keyed(&producer, 100).await;
        let spread: Vec<usize> = (0..4).map(|p| cluster.records("t", p).len()).collect();
        assert!(
            spread[1..].iter().all(|&n| n > 0),
            "new partitions unused: {spread:?}"
        );
        assert_eq!(spread.iter().sum::<usize>(), 140);
    }

    /// The group leader sees a subscribed topic grow and rejoins, so the new
    /// partitions are assigned and read.
    #[tokio::test(start_paused = true)]
    async fn the_group_leader_rebalances_when_partitions_are_added() {
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        let client = Client::connect(config(&cluster)).await.unwrap();
        let mut group = GroupConfig::new("g");
        group.heartbeat_interval = Duration::from_secs(1);
        group.consumer.auto_offset_reset = crate::AutoOffsetReset::Earliest;
        let mut member = GroupConsumer::new(client, group, &["t"], Arc::new(NoopListener)).unwrap();
        for _ in 0..100 {
            if member.group().assignment().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(member.group().assignment().len(), 2);
        let generation = cluster.generation("g");

        cluster.create_partitions("t", 3);
        cluster.append("t", 2, None, Some(b"new"));
        let records = tokio::time::timeout(Duration::from_secs(10), member.poll())
            .await
            .expect("the new partition was never read")
            .unwrap();
        assert_eq!(records[0].partition, 2);
        assert_eq!(records[0].value.as_deref(), Some(&b"new"[..]));
        assert!(cluster.generation("g") > generation);
        assert_eq!(member.group().assignment().len(), 3);
    }

    /// A broker that moves to a new address (the old one refusing
    /// connections) is used at the new one after the next refresh.
    #[tokio::test(start_paused = true)]
    async fn a_broker_that_moved_is_reached_at_its_new_address() {
        let cluster = MockCluster::new();
        cluster.create_topic("t", 1);
        let dead: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mock = cluster.connector();
        let refusing = dead.clone();
        let connector: Connector = Arc::new(move |addr: &str| {
            if refusing.lock().unwrap().contains(addr) {
                return Box::pin(async {
                    Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                });
            }
            mock(addr)
        });
        let mut config = config(&cluster);
        config.bootstrap = vec!["bootstrap:9092".into()];
        config.connection.connector = Some(connector);
        let client = Client::connect(config).await.unwrap();
        let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
        send_keyed(&producer, 1).await;
        assert_eq!(
            client.broker_address(0).as_deref(),
            Some(crate::mock::ADDRESS)
        );

        cluster.move_broker("moved", 9093);
        dead.lock().unwrap().insert(crate::mock::ADDRESS.to_owned());
        tokio::time::sleep(Duration::from_secs(6)).await;
        send_keyed(&producer, 1).await;
        assert_eq!(client.broker_address(0).as_deref(), Some("moved:9093"));
        assert_eq!(cluster.records("t", 0).len(), 2);
    }
}
