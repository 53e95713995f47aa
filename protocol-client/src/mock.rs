//! An in-memory Kafka cluster for tests of the client and of everything built
//! on it (feature `testing`).
//!
//! One broker (node 0, `mock:9092`) holding topics with real RecordBatch logs,
//! consumer groups (join, sync, heartbeats, session expiry, leave, offsets)
//! and transactions (producer ids and epochs, markers, the last stable
//! offset, aborted-transaction lists, transactional offset commits). Clients
//! reach it through [`MockCluster::client_config`]: its connector opens
//! in-memory streams, so no socket is involved and a test may pause tokio's
//! clock (`tokio::time::pause()`); the cluster's own timers (sessions,
//! rebalance timeouts, fetch waits) follow that clock.
//!
//! Faults are injected with a [`Hook`] that sees each request ([`Call`]) and
//! says what to do with it ([`Action`]): answer, fail with a code, delay, or
//! never answer.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use strom_client::mock::MockCluster;
//! use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
//! let cluster = MockCluster::new();
//! cluster.create_topic("orders", 2);
//! let client = strom_client::Client::connect(cluster.client_config()).await.unwrap();
//! let producer = Producer::new(client, ProducerConfig::default()).unwrap();
//! let sent = producer
//!     .send(ProducerRecord::to("orders").partition(1).value(b"hi"))
//!     .await
//!     .unwrap()
//!     .await
//!     .unwrap();
//! assert_eq!(sent.offset, 0);
//! assert_eq!(cluster.records("orders", 1)[0].value.as_deref(), Some(&b"hi"[..]));
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::connection::{response_frame, ConnectionConfig, Connector, Transport};
use crate::records::{BatchBuilder, BatchDecoder, Compression, ProducerIdentity, Record};
use crate::{ClientConfig, TopicPartition};

pub use kafka_protocol::error::ResponseError;
pub use kafka_protocol::messages::ApiKey;

/// The broker's address.
pub const ADDRESS: &str = "mock:9092";
const HOST: &str = "mock";
const PORT: i32 = 9092;

/// A request as a [`Hook`] sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Call {
    /// The API.
    pub api: ApiKey,
    /// The partitions it is about (Produce, Fetch, offset commits); empty
    /// for the others.
    pub partitions: Vec<TopicPartition>,
    /// The topics it asks about (Metadata).
    pub topics: Vec<String>,
    /// The consumer group, for group requests.
    pub group: Option<String>,
    /// The member id, for group requests that carry one.
    pub member: Option<String>,
}

/// What the cluster does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Answer it normally.
    Answer,
    /// Answer with this error code (top level, or for every partition).
    Fail(ResponseError),
    /// Wait this long (on tokio's clock), then answer normally.
    Delay(Duration),
    /// Never answer (the request times out at the client).
    Hang,
    /// Fetch: answer these partitions with this error and the others
    /// normally (as a broker does for partitions whose leadership moved).
    /// Other requests: answer normally.
    FailPartitions(Vec<TopicPartition>, ResponseError),
    /// Fetch: cut each partition's data at the request's byte bounds, mid-batch
    /// if need be, as brokers before KIP-74 did (Kafka now always returns the
    /// first batch whole). Other requests: answer normally.
    CutFetches,
}

/// Decides the fate of each request.
pub type Hook = Arc<dyn Fn(&Call) -> Action + Send + Sync>;

/// A committed offset, as the cluster saw it arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// The group.
    pub group: String,
    /// The partition.
    pub tp: TopicPartition,
    /// The next offset to read.
    pub offset: i64,
    /// Through a transaction (TxnOffsetCommit + EndTxn) rather than OffsetCommit.
    pub transactional: bool,
}

/// A record in a log, with what its transaction became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedRecord {
    /// Its offset.
    pub offset: i64,
    /// Its key.
    pub key: Option<Bytes>,
    /// Its value.
    pub value: Option<Bytes>,
    /// Its headers.
    pub headers: Vec<crate::Header>,
    /// Its timestamp (ms since the epoch).
    pub timestamp: i64,
    /// When its batch was appended, counted across every log of every
    /// cluster in this process: orders records of different partitions.
    pub appended: u64,
    /// Committed or not transactional (`Some(true)`), aborted (`Some(false)`),
    /// or in a transaction still open (`None`).
    pub committed: Option<bool>,
}

/// The in-memory cluster. Clones share it.
#[derive(Clone)]
pub struct MockCluster {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MockCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockCluster").finish_non_exhaustive()
    }
}

struct Inner {
    state: Mutex<State>,
    /// Notified when a log grows or a transaction ends (wakes long-poll fetches).
    appended: Notify,
    /// Notified when a group changes (wakes held JoinGroups and SyncGroups).
    groups_changed: Notify,
    hook: Mutex<Option<Hook>>,
}

#[derive(Default)]
struct State {
    topics: BTreeMap<String, Vec<Log>>,
    groups: HashMap<String, Group>,
    /// Committed offsets by group and partition.
    offsets: HashMap<String, BTreeMap<TopicPartition, i64>>,
    commits: Vec<Commit>,
    /// Transactional id → (producer id, epoch).
    transactional: HashMap<String, (i64, i16)>,
    next_producer_id: i64,
    /// Open transactions by producer id.
    txns: HashMap<i64, Txn>,
    /// Requests received, by API.
    received: HashMap<i16, usize>,
    next_member: u64,
    /// The broker's advertised `host:port` when moved from [`ADDRESS`].
    advertised: Option<(String, i32)>,
}

impl State {
    /// The broker's advertised host and port.
    fn address(&self) -> (String, i32) {
        self.advertised
            .clone()
            .unwrap_or_else(|| (HOST.to_owned(), PORT))
    }
}

/// Counts batch appends across every log, for [`LoggedRecord::appended`].
static APPENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One record batch of a log.
struct Stored {
    base: i64,
    last: i64,
    /// Its place in [`APPENDS`].
    appended: u64,
    bytes: Bytes,
}

#[derive(Default)]
struct Log {
    batches: Vec<Stored>,
    next: i64,
    /// Producer id → first offset of its open transaction here.
    open: BTreeMap<i64, i64>,
    /// (producer id, first offset, marker offset) of aborted transactions.
    aborted: Vec<(i64, i64, i64)>,
}

impl Log {
    fn last_stable(&self) -> i64 {
        self.open.values().copied().min().unwrap_or(self.next)
    }
}

#[derive(Default)]
struct Txn {
    epoch: i16,
    partitions: BTreeSet<TopicPartition>,
    /// Offsets to commit with the transaction, by group.
    offsets: HashMap<String, BTreeMap<TopicPartition, i64>>,
}

struct Member {
    session_timeout: Duration,
    rebalance_timeout: Duration,
    last_seen: Instant,
    protocols: Vec<(String, Bytes)>,
    instance_id: Option<String>,
    /// Joined the round in progress.
    joined: bool,
}

#[derive(Default)]
struct Group {
    generation: i32,
    /// A join round is in progress (heartbeats answer REBALANCE_IN_PROGRESS).
    preparing: bool,
    /// The round ended and the leader has not synced yet.
    awaiting_sync: bool,
    rebalance_deadline: Option<Instant>,
    members: BTreeMap<String, Member>,
    leader: String,
    protocol: String,
    assignments: HashMap<String, Bytes>,
    /// Answers of the last completed round, by member, for held JoinGroups.
    joined: HashMap<String, JoinGroupResponse>,
}

impl Group {
    fn start_round(&mut self, now: Instant) {
        if !self.preparing {
            self.preparing = true;
            self.awaiting_sync = false;
            for m in self.members.values_mut() {
                m.joined = false;
            }
            let longest = self
                .members
                .values()
                .map(|m| m.rebalance_timeout)
                .max()
                .unwrap_or_default();
            self.rebalance_deadline = Some(now + longest);
        }
    }

    /// Completes the round if every member rejoined (or the deadline passed,
    /// dropping the rest).
    fn maybe_complete(&mut self, now: Instant) -> bool {
        if !self.preparing {
            return false;
        }
        let all = self.members.values().all(|m| m.joined);
        let late = self.rebalance_deadline.is_some_and(|d| d <= now);
        if !all && !late {
            return false;
        }
        self.members.retain(|_, m| m.joined);
        self.preparing = false;
        self.rebalance_deadline = None;
        self.joined.clear();
        if self.members.is_empty() {
            return true;
        }
        self.generation += 1;
        self.awaiting_sync = true;
        self.assignments.clear();
        if !self.members.contains_key(&self.leader) {
            self.leader = self.members.keys().next().cloned().unwrap_or_default();
        }
        let protocol = self.members[&self.leader]
            .protocols
            .iter()
            .map(|(n, _)| n.clone())
            .find(|n| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(p, _)| p == n))
            })
            .unwrap_or_default();
        self.protocol = protocol.clone();
        let everyone: Vec<JoinGroupResponseMember> = self
            .members
            .iter()
            .map(|(id, m)| {
                JoinGroupResponseMember::default()
                    .with_member_id(StrBytes::from_string(id.clone()))
                    .with_group_instance_id(m.instance_id.clone().map(StrBytes::from_string))
                    .with_metadata(
                        m.protocols
                            .iter()
                            .find(|(p, _)| *p == protocol)
                            .map(|(_, md)| md.clone())
                            .unwrap_or_default(),
                    )
            })
            .collect();
        for id in self.members.keys() {
            let mut resp = JoinGroupResponse::default()
                .with_generation_id(self.generation)
                .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                .with_protocol_name(Some(StrBytes::from_string(protocol.clone())))
                .with_leader(StrBytes::from_string(self.leader.clone()))
                .with_member_id(StrBytes::from_string(id.clone()));
            if *id == self.leader {
                resp.members = everyone.clone();
            }
            self.joined.insert(id.clone(), resp);
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_owned()))
}

impl Default for MockCluster {
    fn default() -> Self {
        Self::new()
    }
}

impl MockCluster {
    /// An empty cluster. Starts its session reaper on the current runtime.
    pub fn new() -> MockCluster {
        let cluster = MockCluster {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    next_producer_id: 1000,
                    ..State::default()
                }),
                appended: Notify::new(),
                groups_changed: Notify::new(),
                hook: Mutex::new(None),
            }),
        };
        let weak = Arc::downgrade(&cluster.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(inner) = weak.upgrade() else { return };
                reap(&inner);
            }
        });
        cluster
    }

    /// A client configuration that reaches this cluster (and nothing else).
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new([ADDRESS]);
        config.connection = ConnectionConfig {
            connector: Some(self.connector()),
            ..ConnectionConfig::default()
        };
        config
    }

    /// Opens in-memory connections to the cluster.
    pub fn connector(&self) -> Connector {
        let inner = self.inner.clone();
        Arc::new(move |_addr: &str| {
            let inner = inner.clone();
            Box::pin(async move {
                let (client, server) = tokio::io::duplex(1 << 20);
                tokio::spawn(serve(inner, server));
                Ok(Box::new(client) as Box<dyn Transport>)
            })
        })
    }

    /// Sets the hook every request goes through (replacing any earlier one).
    pub fn set_hook(&self, hook: impl Fn(&Call) -> Action + Send + Sync + 'static) {
        *lock(&self.inner.hook) = Some(Arc::new(hook));
    }

    /// Removes the hook: every request is answered normally again.
    pub fn clear_hook(&self) {
        *lock(&self.inner.hook) = None;
    }

    /// Creates `topic` with `partitions` empty partitions (no-op if it exists).
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        lock(&self.inner.state)
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| (0..partitions).map(|_| Log::default()).collect());
    }

    /// Grows `topic` to `partitions` partitions (as CreatePartitions does).
    pub fn create_partitions(&self, topic: &str, partitions: i32) {
        let mut state = lock(&self.inner.state);
        let logs = state.topics.entry(topic.to_owned()).or_default();
        while logs.len() < partitions.max(0) as usize {
            logs.push(Log::default());
        }
    }

    /// Makes the broker advertise `host:port` instead of [`ADDRESS`] in
    /// metadata and coordinator answers, as a broker that moved does.
    pub fn move_broker(&self, host: &str, port: i32) {
        lock(&self.inner.state).advertised = Some((host.to_owned(), port));
    }

    /// Appends a plain (non-transactional) record; returns its offset.
    pub fn append(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> i64 {
        let mut b = BatchBuilder::new(64);
        b.push(0, key, value, &[]);
        let bytes = b
            .seal(Compression::None, ProducerIdentity::default())
            .unwrap_or_else(|e| panic!("mock: cannot build a batch: {e}"));
        self.append_raw(topic, partition, bytes)
    }

    /// Appends the bytes of one record batch as they are, whatever they hold
    /// (a damaged batch, say); returns its offset.
    pub fn append_raw(&self, topic: &str, partition: i32, batch: Bytes) -> i64 {
        let offset = {
            let mut state = lock(&self.inner.state);
            let log = state
                .topics
                .get_mut(topic)
                .and_then(|t| t.get_mut(partition as usize))
                .unwrap_or_else(|| panic!("mock: no partition {topic}-{partition}"));
            append_batch(log, batch, -1, false)
        };
        self.inner.appended.notify_waiters();
        offset
    }

    /// Every data record of a partition, in offset order, with its
    /// transaction's outcome.
    pub fn records(&self, topic: &str, partition: i32) -> Vec<LoggedRecord> {
        self.records_from(topic, partition, 0)
    }

    /// The data records of a partition from offset `from` on, as
    /// [`MockCluster::records`].
    pub fn records_from(&self, topic: &str, partition: i32, from: i64) -> Vec<LoggedRecord> {
        let state = lock(&self.inner.state);
        let Some(log) = state
            .topics
            .get(topic)
            .and_then(|t| t.get(partition as usize))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let first = log.batches.partition_point(|b| b.last < from);
        for stored in &log.batches[first..] {
            for batch in BatchDecoder::new(stored.bytes.clone(), true).flatten() {
                if batch.is_control() {
                    continue;
                }
                let committed = if !batch.is_transactional() {
                    Some(true)
                } else if log.aborted.iter().any(|&(pid, first, end)| {
                    pid == batch.producer_id && (first..end).contains(&batch.base_offset)
                }) {
                    Some(false)
                } else if log
                    .open
                    .get(&batch.producer_id)
                    .is_some_and(|&first| batch.base_offset >= first)
                {
                    None
                } else {
                    Some(true)
                };
                for r in batch.records().flatten().filter(|r| r.offset >= from) {
                    let Record {
                        offset,
                        timestamp,
                        key,
                        value,
                        headers,
                    } = r;
                    out.push(LoggedRecord {
                        offset,
                        key,
                        value,
                        headers,
                        timestamp,
                        appended: stored.appended,
                        committed,
                    });
                }
            }
        }
        out
    }

    /// How many partitions `topic` has (`None`: no such topic).
    pub fn partitions(&self, topic: &str) -> Option<i32> {
        lock(&self.inner.state)
            .topics
            .get(topic)
            .map(|t| t.len() as i32)
    }

    /// The offset after the last record of a partition (its high watermark).
    pub fn end_offset(&self, topic: &str, partition: i32) -> i64 {
        lock(&self.inner.state)
            .topics
            .get(topic)
            .and_then(|t| t.get(partition as usize))
            .map_or(0, |l| l.next)
    }

    /// The group's committed offset of `topic`-`partition`.
    pub fn committed(&self, group: &str, topic: &str, partition: i32) -> Option<i64> {
        lock(&self.inner.state)
            .offsets
            .get(group)
            .and_then(|o| o.get(&TopicPartition::new(topic, partition)))
            .copied()
    }

    /// Every offset commit that took effect, in order.
    pub fn commits(&self) -> Vec<Commit> {
        lock(&self.inner.state).commits.clone()
    }

    /// How many requests of `api` arrived.
    pub fn received(&self, api: ApiKey) -> usize {
        lock(&self.inner.state)
            .received
            .get(&(api as i16))
            .copied()
            .unwrap_or(0)
    }

    /// The members of `group` right now.
    pub fn members(&self, group: &str) -> Vec<String> {
        lock(&self.inner.state)
            .groups
            .get(group)
            .map(|g| g.members.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The current generation of `group` (0 before the first round ends).
    pub fn generation(&self, group: &str) -> i32 {
        lock(&self.inner.state)
            .groups
            .get(group)
            .map_or(0, |g| g.generation)
    }
}

/// Drops members whose session expired and ends join rounds past their
/// deadline.
fn reap(inner: &Inner) {
    let now = Instant::now();
    let mut changed = false;
    {
        let mut state = lock(&inner.state);
        for group in state.groups.values_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| {
                    !(group.preparing && m.joined) && m.last_seen + m.session_timeout < now
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &expired {
                tracing::debug!(member = %id, "mock: session expired");
                group.members.remove(id);
            }
            if !expired.is_empty() {
                group.start_round(now);
                changed = true;
            }
            changed |= group.maybe_complete(now);
        }
    }
    if changed {
        inner.groups_changed.notify_waiters();
    }
}

/// Serves one connection. Requests are answered concurrently (the client
/// matches responses by correlation id), so a request the hook holds back
/// holds back nothing else — unlike Kafka, which answers a connection's
/// requests in order.
async fn serve(inner: Arc<Inner>, stream: DuplexStream) {
    let (mut read, write) = tokio::io::split(stream);
    let write = Arc::new(tokio::sync::Mutex::new(write));
    loop {
        let Ok(len) = read.read_i32().await else {
            return;
        };
        let Ok(len) = usize::try_from(len) else {
            return;
        };
        let mut frame = vec![0u8; len];
        if read.read_exact(&mut frame).await.is_err() {
            return;
        }
        let (inner, write) = (inner.clone(), write.clone());
        tokio::spawn(async move {
            // `None`: never answer.
            if let Some(out) = handle(&inner, Bytes::from(frame)).await {
                let _ = write.lock().await.write_all(&out).await;
            }
        });
    }
}

fn hook(inner: &Inner, call: &Call) -> Action {
    let hook = lock(&inner.hook).clone();
    hook.map_or(Action::Answer, |h| h(call))
}

/// Answers one request frame; `None` means never.
async fn handle(inner: &Arc<Inner>, mut body: Bytes) -> Option<Vec<u8>> {
    if body.len() < 4 {
        return None;
    }
    let api = ApiKey::try_from(i16::from_be_bytes([body[0], body[1]])).ok()?;
    let version = i16::from_be_bytes([body[2], body[3]]);
    let header = RequestHeader::decode(&mut body, api.request_header_version(version)).ok()?;
    let cid = header.correlation_id;
    *lock(&inner.state).received.entry(api as i16).or_default() += 1;
    macro_rules! decode {
        ($t:ty) => {
            <$t>::decode(&mut body, version).ok()?
        };
    }
    macro_rules! reply {
        ($resp:expr) => {
            Some(response_frame(cid, version, $resp))
        };
    }
    match api {
        ApiKey::ApiVersions => reply!(api_versions()),
        ApiKey::Metadata => {
            let req = decode!(MetadataRequest);
            let mut call = plain_call(api);
            call.topics = req
                .topics
                .iter()
                .flatten()
                .filter_map(|t| t.name.as_ref().map(|n| n.0.as_str().to_owned()))
                .collect();
            let fail = act(inner, &call).await?;
            reply!(metadata(inner, req, fail))
        }
        ApiKey::FindCoordinator => {
            let (host, port) = lock(&inner.state).address();
            reply!(FindCoordinatorResponse::default()
                .with_node_id(BrokerId(0))
                .with_host(StrBytes::from_string(host))
                .with_port(port))
        }
        ApiKey::CreateTopics => reply!(create_topics(inner, decode!(CreateTopicsRequest))),
        ApiKey::CreatePartitions => {
            reply!(create_partitions(inner, decode!(CreatePartitionsRequest)))
        }
        ApiKey::Produce => {
            let req = decode!(ProduceRequest);
            let call = Call {
                api,
                partitions: req
                    .topic_data
                    .iter()
                    .flat_map(|t| {
                        t.partition_data
                            .iter()
                            .map(|p| TopicPartition::new(t.name.0.as_str(), p.index))
                    })
                    .collect(),
                topics: Vec::new(),
                group: None,
                member: None,
            };
            let fail = act(inner, &call).await?;
            reply!(produce(inner, req, fail))
        }
        ApiKey::Fetch => {
            let req = decode!(FetchRequest);
            let call = Call {
                api,
                partitions: req
                    .topics
                    .iter()
                    .flat_map(|t| {
                        t.partitions
                            .iter()
                            .map(|p| TopicPartition::new(t.topic.0.as_str(), p.partition))
                    })
                    .collect(),
                topics: Vec::new(),
                group: None,
                member: None,
            };
            let (fail, failing, cut) = match hook(inner, &call) {
                Action::FailPartitions(tps, code) => (None, Some((tps, code)), false),
                Action::CutFetches => (None, None, true),
                _ => (act(inner, &call).await?, None, false),
            };
            reply!(fetch(inner, req, fail, failing.as_ref(), cut).await)
        }
        ApiKey::ListOffsets => {
            let req = decode!(ListOffsetsRequest);
            reply!(list_offsets(inner, req))
        }
        ApiKey::JoinGroup => {
            let req = decode!(JoinGroupRequest);
            let call = group_call(api, &req.group_id.0, Some(&req.member_id));
            let fail = act(inner, &call).await?;
            reply!(join_group(inner, req, fail).await)
        }
        ApiKey::SyncGroup => {
            let req = decode!(SyncGroupRequest);
            let call = group_call(api, &req.group_id.0, Some(&req.member_id));
            let fail = act(inner, &call).await?;
            reply!(sync_group(inner, req, fail).await)
        }
        ApiKey::Heartbeat => {
            let req = decode!(HeartbeatRequest);
            let call = group_call(api, &req.group_id.0, Some(&req.member_id));
            let fail = act(inner, &call).await?;
            reply!(HeartbeatResponse::default().with_error_code(heartbeat(inner, &req, fail)))
        }
        ApiKey::LeaveGroup => {
            let req = decode!(LeaveGroupRequest);
            leave_group(inner, &req);
            reply!(LeaveGroupResponse::default())
        }
        ApiKey::OffsetCommit => {
            let req = decode!(OffsetCommitRequest);
            let mut call = group_call(api, &req.group_id.0, Some(&req.member_id));
            call.partitions = req
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(|p| TopicPartition::new(t.name.0.as_str(), p.partition_index))
                })
                .collect();
            let fail = act(inner, &call).await?;
            reply!(offset_commit(inner, req, fail))
        }
        ApiKey::OffsetFetch => {
            let req = decode!(OffsetFetchRequest);
            let call = group_call(api, &req.group_id.0, None);
            let fail = act(inner, &call).await?;
            reply!(offset_fetch(inner, req, fail))
        }
        ApiKey::InitProducerId => {
            let req = decode!(InitProducerIdRequest);
            let fail = act(inner, &plain_call(api)).await?;
            reply!(init_producer_id(inner, req, fail))
        }
        ApiKey::AddPartitionsToTxn => {
            let req = decode!(AddPartitionsToTxnRequest);
            let fail = act(inner, &plain_call(api)).await?;
            reply!(add_partitions(inner, req, fail))
        }
        ApiKey::AddOffsetsToTxn => {
            let req = decode!(AddOffsetsToTxnRequest);
            let fail = act(inner, &group_call(api, &req.group_id.0, None)).await?;
            let code = fail.map_or_else(
                || txn_check(inner, req.producer_id.0, req.producer_epoch),
                |c| c.code(),
            );
            reply!(AddOffsetsToTxnResponse::default().with_error_code(code))
        }
        ApiKey::TxnOffsetCommit => {
            let req = decode!(TxnOffsetCommitRequest);
            let mut call = group_call(api, &req.group_id.0, Some(&req.member_id));
            call.partitions = req
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions
                        .iter()
                        .map(|p| TopicPartition::new(t.name.0.as_str(), p.partition_index))
                })
                .collect();
            let fail = act(inner, &call).await?;
            reply!(txn_offset_commit(inner, req, fail))
        }
        ApiKey::EndTxn => {
            let req = decode!(EndTxnRequest);
            let fail = act(inner, &plain_call(api)).await?;
            let code = match fail {
                Some(c) => c.code(),
                None => end_txn(inner, &req),
            };
            reply!(EndTxnResponse::default().with_error_code(code))
        }
        _ => None,
    }
}

fn plain_call(api: ApiKey) -> Call {
    Call {
        api,
        partitions: Vec::new(),
        topics: Vec::new(),
        group: None,
        member: None,
    }
}

fn group_call(api: ApiKey, group: &StrBytes, member: Option<&StrBytes>) -> Call {
    Call {
        api,
        partitions: Vec::new(),
        topics: Vec::new(),
        group: Some(group.as_str().to_owned()),
        member: member.map(|m| m.as_str().to_owned()),
    }
}

/// Applies the hook: `None` = never answer, `Some(Some(code))` = fail.
async fn act(inner: &Inner, call: &Call) -> Option<Option<ResponseError>> {
    match hook(inner, call) {
        Action::Answer => Some(None),
        Action::Fail(code) => Some(Some(code)),
        Action::Delay(d) => {
            tokio::time::sleep(d).await;
            Some(None)
        }
        Action::Hang => None,
        Action::FailPartitions(..) | Action::CutFetches => Some(None),
    }
}

fn api_versions() -> ApiVersionsResponse {
    let apis: &[(ApiKey, i16)] = &[
        (ApiKey::Produce, 11),
        (ApiKey::Fetch, 12),
        (ApiKey::ListOffsets, 8),
        (ApiKey::Metadata, 12),
        (ApiKey::OffsetCommit, 8),
        (ApiKey::OffsetFetch, 7),
        (ApiKey::FindCoordinator, 3),
        (ApiKey::JoinGroup, 9),
        (ApiKey::Heartbeat, 4),
        (ApiKey::LeaveGroup, 5),
        (ApiKey::SyncGroup, 5),
        (ApiKey::ApiVersions, 3),
        (ApiKey::CreateTopics, 7),
        (ApiKey::CreatePartitions, 3),
        (ApiKey::InitProducerId, 4),
        (ApiKey::AddPartitionsToTxn, 3),
        (ApiKey::AddOffsetsToTxn, 3),
        (ApiKey::EndTxn, 3),
        (ApiKey::TxnOffsetCommit, 3),
    ];
    ApiVersionsResponse::default().with_api_keys(
        apis.iter()
            .map(|&(k, max)| {
                ApiVersion::default()
                    .with_api_key(k as i16)
                    .with_max_version(max)
            })
            .collect(),
    )
}

fn metadata(inner: &Inner, req: MetadataRequest, fail: Option<ResponseError>) -> MetadataResponse {
    let state = lock(&inner.state);
    let names: Vec<String> = match &req.topics {
        Some(ts) => ts
            .iter()
            .filter_map(|t| t.name.as_ref().map(|n| n.0.as_str().to_owned()))
            .collect(),
        None => state.topics.keys().cloned().collect(),
    };
    let topics = names
        .into_iter()
        .map(|t| match state.topics.get(&t).filter(|_| fail.is_none()) {
            None => MetadataResponseTopic::default()
                .with_name(Some(name(&t)))
                .with_error_code(
                    fail.unwrap_or(ResponseError::UnknownTopicOrPartition)
                        .code(),
                ),
            Some(logs) => MetadataResponseTopic::default()
                .with_name(Some(name(&t)))
                .with_partitions(
                    (0..logs.len() as i32)
                        .map(|p| {
                            MetadataResponsePartition::default()
                                .with_partition_index(p)
                                .with_leader_id(BrokerId(0))
                                .with_replica_nodes(vec![BrokerId(0)])
                                .with_isr_nodes(vec![BrokerId(0)])
                        })
                        .collect(),
                ),
        })
        .collect();
    let (host, port) = state.address();
    MetadataResponse::default()
        .with_brokers(vec![MetadataResponseBroker::default()
            .with_node_id(BrokerId(0))
            .with_host(StrBytes::from_string(host))
            .with_port(port)])
        .with_controller_id(BrokerId(0))
        .with_topics(topics)
}

fn create_topics(inner: &Inner, req: CreateTopicsRequest) -> CreateTopicsResponse {
    let mut state = lock(&inner.state);
    let topics = req
        .topics
        .into_iter()
        .map(|t| {
            let topic = t.name.0.as_str().to_owned();
            let code = if state.topics.contains_key(&topic) {
                ResponseError::TopicAlreadyExists.code()
            } else {
                let n = t.num_partitions.max(1);
                state
                    .topics
                    .insert(topic.clone(), (0..n).map(|_| Log::default()).collect());
                0
            };
            CreatableTopicResult::default()
                .with_name(name(&topic))
                .with_error_code(code)
                .with_num_partitions(t.num_partitions)
                .with_replication_factor(1)
        })
        .collect();
    CreateTopicsResponse::default().with_topics(topics)
}

fn create_partitions(inner: &Inner, req: CreatePartitionsRequest) -> CreatePartitionsResponse {
    let mut state = lock(&inner.state);
    let results = req
        .topics
        .into_iter()
        .map(|t| {
            let code = match state.topics.get_mut(t.name.0.as_str()) {
                None => ResponseError::UnknownTopicOrPartition.code(),
                Some(logs) if t.count as usize <= logs.len() => {
                    ResponseError::InvalidPartitions.code()
                }
                Some(logs) => {
                    logs.resize_with(t.count as usize, Log::default);
                    0
                }
            };
            CreatePartitionsTopicResult::default()
                .with_name(t.name)
                .with_error_code(code)
        })
        .collect();
    CreatePartitionsResponse::default().with_results(results)
}

/// Appends a batch at the log end; returns its base offset.
fn append_batch(log: &mut Log, mut bytes: Bytes, pid: i64, transactional: bool) -> i64 {
    let count = BatchDecoder::new(bytes.clone(), false)
        .next()
        .and_then(|b| b.ok())
        .map_or(1, |b| i64::from(b.last_offset_delta) + 1);
    let base = log.next;
    let mut owned = BytesMut::from(&bytes[..]);
    owned[..8].copy_from_slice(&base.to_be_bytes());
    bytes = owned.freeze();
    log.batches.push(Stored {
        base,
        last: base + count - 1,
        appended: APPENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        bytes,
    });
    log.next = base + count;
    if transactional {
        log.open.entry(pid).or_insert(base);
    }
    base
}

fn produce(inner: &Inner, req: ProduceRequest, fail: Option<ResponseError>) -> ProduceResponse {
    let mut responses = Vec::new();
    {
        let mut state = lock(&inner.state);
        for t in req.topic_data {
            let topic = t.name.0.as_str().to_owned();
            let mut parts = Vec::new();
            for p in t.partition_data {
                let mut resp = PartitionProduceResponse::default().with_index(p.index);
                if let Some(code) = fail {
                    resp.error_code = code.code();
                    resp.base_offset = -1;
                    parts.push(resp);
                    continue;
                }
                let Some(log) = state
                    .topics
                    .get_mut(&topic)
                    .and_then(|l| l.get_mut(p.index as usize))
                else {
                    resp.error_code = ResponseError::UnknownTopicOrPartition.code();
                    parts.push(resp);
                    continue;
                };
                // One batch per partition and request, as the client sends.
                let raw = p.records.clone().unwrap_or_default();
                match BatchDecoder::new(raw.clone(), true).next() {
                    Some(Ok(batch)) => {
                        resp.base_offset =
                            append_batch(log, raw, batch.producer_id, batch.is_transactional());
                    }
                    _ => {
                        resp.error_code = ResponseError::CorruptMessage.code();
                        resp.base_offset = -1;
                    }
                }
                parts.push(resp);
            }
            responses.push(
                TopicProduceResponse::default()
                    .with_name(name(&topic))
                    .with_partition_responses(parts),
            );
        }
    }
    inner.appended.notify_waiters();
    ProduceResponse::default().with_responses(responses)
}

/// Partitions a fetch answers with an error, and the error.
type Failing = (Vec<TopicPartition>, ResponseError);

async fn fetch(
    inner: &Inner,
    req: FetchRequest,
    fail: Option<ResponseError>,
    failing: Option<&Failing>,
    cut: bool,
) -> FetchResponse {
    let deadline = Instant::now() + Duration::from_millis(req.max_wait_ms.max(0) as u64);
    loop {
        let notified = inner.appended.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (resp, bytes) = fetch_now(inner, &req, fail, failing, cut);
        if bytes > 0 || fail.is_some() || Instant::now() >= deadline {
            return resp;
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

fn fetch_now(
    inner: &Inner,
    req: &FetchRequest,
    fail: Option<ResponseError>,
    failing: Option<&Failing>,
    cut: bool,
) -> (FetchResponse, usize) {
    let state = lock(&inner.state);
    let committed_only = req.isolation_level == 1;
    let mut total = 0;
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let topic = t.topic.0.as_str();
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let mut data = PartitionData::default().with_partition_index(p.partition);
                    let failed = failing.and_then(|(tps, code)| {
                        let tp = |tp: &&TopicPartition| {
                            *tp.topic == *topic && tp.partition == p.partition
                        };
                        tps.iter().find(tp).map(|_| *code)
                    });
                    if let Some(code) = fail.or(failed) {
                        data.error_code = code.code();
                        return data;
                    }
                    let Some(log) = state
                        .topics
                        .get(topic)
                        .and_then(|l| l.get(p.partition as usize))
                    else {
                        data.error_code = ResponseError::UnknownTopicOrPartition.code();
                        return data;
                    };
                    data.high_watermark = log.next;
                    data.last_stable_offset = log.last_stable();
                    data.log_start_offset = 0;
                    if p.fetch_offset < 0 || p.fetch_offset > log.next {
                        data.error_code = ResponseError::OffsetOutOfRange.code();
                        return data;
                    }
                    let bound = if committed_only {
                        log.last_stable()
                    } else {
                        log.next
                    };
                    let mut out = BytesMut::new();
                    let first = log.batches.partition_point(|b| b.last < p.fetch_offset);
                    let limit = p.partition_max_bytes.min(req.max_bytes).max(0) as usize;
                    for b in log.batches[first..].iter().take_while(|b| b.base < bound) {
                        if cut {
                            let room = limit.saturating_sub(out.len());
                            out.extend_from_slice(&b.bytes[..b.bytes.len().min(room)]);
                            continue;
                        }
                        if !out.is_empty()
                            && out.len() + b.bytes.len() > p.partition_max_bytes.max(0) as usize
                        {
                            break;
                        }
                        out.extend_from_slice(&b.bytes);
                    }
                    total += out.len();
                    if committed_only {
                        data.aborted_transactions = Some(
                            log.aborted
                                .iter()
                                .filter(|&&(_, first, end)| end >= p.fetch_offset && first < bound)
                                .map(|&(pid, first, _)| {
                                    AbortedTransaction::default()
                                        .with_producer_id(ProducerId(pid))
                                        .with_first_offset(first)
                                })
                                .collect(),
                        );
                    }
                    data.records = Some(out.freeze());
                    data
                })
                .collect();
            FetchableTopicResponse::default()
                .with_topic(name(topic))
                .with_partitions(partitions)
        })
        .collect();
    (FetchResponse::default().with_responses(topics), total)
}

fn list_offsets(inner: &Inner, req: ListOffsetsRequest) -> ListOffsetsResponse {
    let state = lock(&inner.state);
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let topic = t.name.0.as_str();
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let mut resp = ListOffsetsPartitionResponse::default()
                        .with_partition_index(p.partition_index);
                    match state
                        .topics
                        .get(topic)
                        .and_then(|l| l.get(p.partition_index as usize))
                    {
                        None => resp.error_code = ResponseError::UnknownTopicOrPartition.code(),
                        Some(log) => {
                            resp.offset = match p.timestamp {
                                -2 => 0,
                                _ if req.isolation_level == 1 => log.last_stable(),
                                _ => log.next,
                            };
                            resp.timestamp = -1;
                        }
                    }
                    resp
                })
                .collect();
            ListOffsetsTopicResponse::default()
                .with_name(name(topic))
                .with_partitions(partitions)
        })
        .collect();
    ListOffsetsResponse::default().with_topics(topics)
}

async fn join_group(
    inner: &Inner,
    req: JoinGroupRequest,
    fail: Option<ResponseError>,
) -> JoinGroupResponse {
    let refuse = |code: ResponseError| JoinGroupResponse::default().with_error_code(code.code());
    if let Some(code) = fail {
        return refuse(code);
    }
    let group_id = req.group_id.0.as_str().to_owned();
    let member_id =
        {
            let now = Instant::now();
            let mut state = lock(&inner.state);
            let next = state.next_member;
            let group = state.groups.entry(group_id.clone()).or_default();
            let mut id = req.member_id.as_str().to_owned();
            if id.is_empty() {
                id = format!("member-{next}");
            } else if !group.members.contains_key(&id) {
                return refuse(ResponseError::UnknownMemberId);
            }
            let protocols = req
                .protocols
                .iter()
                .map(|p| (p.name.as_str().to_owned(), p.metadata.clone()))
                .collect();
            group.members.insert(
            id.clone(),
            Member {
                session_timeout: Duration::from_millis(req.session_timeout_ms.max(0) as u64),
                rebalance_timeout: Duration::from_millis(req.rebalance_timeout_ms.max(0) as u64),
                last_seen: now,
                protocols,
                instance_id: req.group_instance_id.as_ref().map(|s| s.as_str().to_owned()),
                joined: false,
            },
        );
            group.start_round(now);
            if let Some(m) = group.members.get_mut(&id) {
                m.joined = true;
            }
            group.maybe_complete(now);
            state.next_member += 1;
            id
        };
    inner.groups_changed.notify_waiters();
    loop {
        let changed = inner.groups_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut state = lock(&inner.state);
            let Some(group) = state.groups.get_mut(&group_id) else {
                return refuse(ResponseError::UnknownMemberId);
            };
            if let Some(resp) = group.joined.remove(&member_id) {
                return resp;
            }
            if !group.members.contains_key(&member_id) {
                return refuse(ResponseError::UnknownMemberId);
            }
        }
        changed.await;
    }
}

async fn sync_group(
    inner: &Inner,
    req: SyncGroupRequest,
    fail: Option<ResponseError>,
) -> SyncGroupResponse {
    let refuse = |code: ResponseError| SyncGroupResponse::default().with_error_code(code.code());
    if let Some(code) = fail {
        return refuse(code);
    }
    let group_id = req.group_id.0.as_str().to_owned();
    let member_id = req.member_id.as_str().to_owned();
    {
        let mut state = lock(&inner.state);
        let Some(group) = state.groups.get_mut(&group_id) else {
            return refuse(ResponseError::UnknownMemberId);
        };
        if !group.members.contains_key(&member_id) {
            return refuse(ResponseError::UnknownMemberId);
        }
        if req.generation_id != group.generation {
            return refuse(ResponseError::IllegalGeneration);
        }
        if group.preparing {
            return refuse(ResponseError::RebalanceInProgress);
        }
        if member_id == group.leader && group.awaiting_sync {
            group.assignments = req
                .assignments
                .iter()
                .map(|a| (a.member_id.as_str().to_owned(), a.assignment.clone()))
                .collect();
            group.awaiting_sync = false;
        }
    }
    inner.groups_changed.notify_waiters();
    loop {
        let changed = inner.groups_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let state = lock(&inner.state);
            let Some(group) = state.groups.get(&group_id) else {
                return refuse(ResponseError::UnknownMemberId);
            };
            if group.generation != req.generation_id || group.preparing {
                return refuse(ResponseError::RebalanceInProgress);
            }
            if !group.awaiting_sync {
                let assignment = group
                    .assignments
                    .get(&member_id)
                    .cloned()
                    .unwrap_or_default();
                return SyncGroupResponse::default()
                    .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
                    .with_protocol_name(Some(StrBytes::from_string(group.protocol.clone())))
                    .with_assignment(assignment);
            }
        }
        changed.await;
    }
}

fn heartbeat(inner: &Inner, req: &HeartbeatRequest, fail: Option<ResponseError>) -> i16 {
    if let Some(code) = fail {
        return code.code();
    }
    let mut state = lock(&inner.state);
    let Some(group) = state.groups.get_mut(req.group_id.0.as_str()) else {
        return ResponseError::UnknownMemberId.code();
    };
    let preparing = group.preparing;
    let generation = group.generation;
    let Some(member) = group.members.get_mut(req.member_id.as_str()) else {
        return ResponseError::UnknownMemberId.code();
    };
    member.last_seen = Instant::now();
    if preparing {
        ResponseError::RebalanceInProgress.code()
    } else if req.generation_id != generation {
        ResponseError::IllegalGeneration.code()
    } else {
        0
    }
}

fn leave_group(inner: &Inner, req: &LeaveGroupRequest) {
    {
        let now = Instant::now();
        let mut state = lock(&inner.state);
        let Some(group) = state.groups.get_mut(req.group_id.0.as_str()) else {
            return;
        };
        let mut ids: Vec<String> = req
            .members
            .iter()
            .map(|m| m.member_id.as_str().to_owned())
            .collect();
        if !req.member_id.is_empty() {
            ids.push(req.member_id.as_str().to_owned());
        }
        let before = group.members.len();
        for id in &ids {
            group.members.remove(id);
        }
        if group.members.len() != before {
            group.start_round(now);
            group.maybe_complete(now);
        }
    }
    inner.groups_changed.notify_waiters();
}

/// The error of a commit by `member` of `generation`, if any.
fn member_check(group: Option<&Group>, member: &str, generation: i32) -> Option<ResponseError> {
    if generation < 0 {
        return None; // a simple (non-member) commit
    }
    let Some(group) = group else {
        return Some(ResponseError::IllegalGeneration);
    };
    if !group.members.contains_key(member) {
        Some(ResponseError::UnknownMemberId)
    } else if generation != group.generation {
        Some(ResponseError::IllegalGeneration)
    } else if group.preparing {
        Some(ResponseError::RebalanceInProgress)
    } else {
        None
    }
}

fn offset_commit(
    inner: &Inner,
    req: OffsetCommitRequest,
    fail: Option<ResponseError>,
) -> OffsetCommitResponse {
    let mut state = lock(&inner.state);
    let group_id = req.group_id.0.as_str().to_owned();
    let refused = fail.or_else(|| {
        member_check(
            state.groups.get(&group_id),
            req.member_id.as_str(),
            req.generation_id_or_member_epoch,
        )
    });
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    let tp = TopicPartition::new(t.name.0.as_str(), p.partition_index);
                    if refused.is_none() {
                        state
                            .offsets
                            .entry(group_id.clone())
                            .or_default()
                            .insert(tp.clone(), p.committed_offset);
                        state.commits.push(Commit {
                            group: group_id.clone(),
                            tp,
                            offset: p.committed_offset,
                            transactional: false,
                        });
                    }
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(refused.map_or(0, |c| c.code()))
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

fn offset_fetch(
    inner: &Inner,
    req: OffsetFetchRequest,
    fail: Option<ResponseError>,
) -> OffsetFetchResponse {
    if let Some(code) = fail {
        return OffsetFetchResponse::default().with_error_code(code.code());
    }
    let state = lock(&inner.state);
    let group = req.group_id.0.as_str();
    let pending: BTreeSet<&TopicPartition> = state
        .txns
        .values()
        .filter_map(|t| t.offsets.get(group))
        .flat_map(|o| o.keys())
        .collect();
    let topics = req
        .topics
        .iter()
        .flatten()
        .map(|t| {
            let partitions = t
                .partition_indexes
                .iter()
                .map(|&p| {
                    let tp = TopicPartition::new(t.name.0.as_str(), p);
                    let mut resp = OffsetFetchResponsePartition::default()
                        .with_partition_index(p)
                        .with_committed_offset(
                            state
                                .offsets
                                .get(group)
                                .and_then(|o| o.get(&tp))
                                .copied()
                                .unwrap_or(-1),
                        );
                    if req.require_stable && pending.contains(&tp) {
                        resp.error_code = ResponseError::UnstableOffsetCommit.code();
                    }
                    resp
                })
                .collect();
            OffsetFetchResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    OffsetFetchResponse::default().with_topics(topics)
}

/// Writes a transaction marker for `pid` into `log`.
fn write_marker(log: &mut Log, pid: i64, epoch: i16, commit: bool) -> i64 {
    let mut b = BatchBuilder::new(32);
    let key = [0u8, 0, 0, u8::from(commit)];
    b.push(0, Some(&key), Some(&[0, 0, 0, 0, 0, 0]), &[]);
    let identity = ProducerIdentity {
        producer_id: pid,
        producer_epoch: epoch,
        base_sequence: -1,
        transactional: true,
    };
    let bytes = b
        .seal(Compression::None, identity)
        .unwrap_or_else(|e| panic!("mock: cannot build a marker: {e}"));
    let mut owned = BytesMut::from(&bytes[..]);
    owned[22] |= 0x20; // the control flag, low byte of the attributes
    let crc = crc32c::crc32c(&owned[21..]);
    owned[17..21].copy_from_slice(&crc.to_be_bytes());
    append_batch(log, owned.freeze(), pid, false)
}

/// Ends `pid`'s open transaction: markers in its partitions, offsets applied
/// or dropped.
fn finish_txn(state: &mut State, pid: i64, commit: bool) {
    let Some(txn) = state.txns.remove(&pid) else {
        return;
    };
    for tp in &txn.partitions {
        let Some(log) = state
            .topics
            .get_mut(&*tp.topic)
            .and_then(|l| l.get_mut(tp.partition as usize))
        else {
            continue;
        };
        let first = log.open.remove(&pid);
        let marker = write_marker(log, pid, txn.epoch, commit);
        if let (false, Some(first)) = (commit, first) {
            log.aborted.push((pid, first, marker));
        }
    }
    if commit {
        for (group, offsets) in txn.offsets {
            for (tp, offset) in offsets {
                state
                    .offsets
                    .entry(group.clone())
                    .or_default()
                    .insert(tp.clone(), offset);
                state.commits.push(Commit {
                    group: group.clone(),
                    tp,
                    offset,
                    transactional: true,
                });
            }
        }
    }
}

fn init_producer_id(
    inner: &Inner,
    req: InitProducerIdRequest,
    fail: Option<ResponseError>,
) -> InitProducerIdResponse {
    if let Some(code) = fail {
        return InitProducerIdResponse::default().with_error_code(code.code());
    }
    let (pid, epoch) = {
        let mut state = lock(&inner.state);
        match req
            .transactional_id
            .as_ref()
            .map(|t| t.0.as_str().to_owned())
        {
            None => {
                state.next_producer_id += 1;
                (state.next_producer_id, 0)
            }
            Some(txn_id) => {
                let known = state.transactional.get(&txn_id).copied();
                let (pid, epoch) = match known {
                    Some((pid, epoch)) => {
                        // A new incarnation: its predecessor's transaction aborts.
                        finish_txn(&mut state, pid, false);
                        (pid, epoch + 1)
                    }
                    None => {
                        state.next_producer_id += 1;
                        (state.next_producer_id, 0)
                    }
                };
                state.transactional.insert(txn_id, (pid, epoch));
                (pid, epoch)
            }
        }
    };
    inner.appended.notify_waiters();
    InitProducerIdResponse::default()
        .with_producer_id(ProducerId(pid))
        .with_producer_epoch(epoch)
}

/// PRODUCER_FENCED unless `epoch` is the current epoch of `pid`.
fn txn_check(inner: &Inner, pid: i64, epoch: i16) -> i16 {
    let state = lock(&inner.state);
    let current = state
        .transactional
        .values()
        .find(|(p, _)| *p == pid)
        .map(|(_, e)| *e);
    match current {
        Some(e) if e == epoch => 0,
        _ => ResponseError::ProducerFenced.code(),
    }
}

fn add_partitions(
    inner: &Inner,
    req: AddPartitionsToTxnRequest,
    fail: Option<ResponseError>,
) -> AddPartitionsToTxnResponse {
    let pid = req.v3_and_below_producer_id.0;
    let epoch = req.v3_and_below_producer_epoch;
    let code = fail.map_or_else(|| txn_check(inner, pid, epoch), |c| c.code());
    let mut state = lock(&inner.state);
    let results = req
        .v3_and_below_topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|&p| {
                    if code == 0 {
                        let txn = state.txns.entry(pid).or_default();
                        txn.epoch = epoch;
                        txn.partitions
                            .insert(TopicPartition::new(t.name.0.as_str(), p));
                    }
                    AddPartitionsToTxnPartitionResult::default()
                        .with_partition_index(p)
                        .with_partition_error_code(code)
                })
                .collect();
            AddPartitionsToTxnTopicResult::default()
                .with_name(t.name.clone())
                .with_results_by_partition(partitions)
        })
        .collect();
    AddPartitionsToTxnResponse::default().with_results_by_topic_v3_and_below(results)
}

fn txn_offset_commit(
    inner: &Inner,
    req: TxnOffsetCommitRequest,
    fail: Option<ResponseError>,
) -> TxnOffsetCommitResponse {
    let pid = req.producer_id.0;
    let group_id = req.group_id.0.as_str().to_owned();
    let fenced = txn_check(inner, pid, req.producer_epoch);
    let mut state = lock(&inner.state);
    let refused = fail
        .or_else(|| ResponseError::try_from_code(fenced))
        .or_else(|| {
            member_check(
                state.groups.get(&group_id),
                req.member_id.as_str(),
                req.generation_id,
            )
            .filter(|c| *c != ResponseError::RebalanceInProgress)
        });
    let topics = req
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    if refused.is_none() {
                        let txn = state.txns.entry(pid).or_default();
                        txn.epoch = req.producer_epoch;
                        txn.offsets.entry(group_id.clone()).or_default().insert(
                            TopicPartition::new(t.name.0.as_str(), p.partition_index),
                            p.committed_offset,
                        );
                    }
                    TxnOffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(refused.map_or(0, |c| c.code()))
                })
                .collect();
            TxnOffsetCommitResponseTopic::default()
                .with_name(t.name.clone())
                .with_partitions(partitions)
        })
        .collect();
    TxnOffsetCommitResponse::default().with_topics(topics)
}

fn end_txn(inner: &Inner, req: &EndTxnRequest) -> i16 {
    let pid = req.producer_id.0;
    let code = txn_check(inner, pid, req.producer_epoch);
    if code != 0 {
        return code;
    }
    finish_txn(&mut lock(&inner.state), pid, req.committed);
    inner.appended.notify_waiters();
    0
}
