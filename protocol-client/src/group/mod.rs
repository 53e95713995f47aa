//! Consumer groups: membership, rebalancing, assignors and committed offsets.
//!
//! ```text
//!  GroupConsumer::poll ──► Consumer (assign mode: fetcher, byte budget, records)
//!                              ▲ add / remove partitions
//!  membership task ────────────┘  FindCoordinator, JoinGroup, SyncGroup,
//!     │                           listener (revoked → assigned), OffsetFetch
//!     └─► heartbeat task          Heartbeat every heartbeat_interval
//! ```
//!
//! The membership task runs on its own: a rebalance never waits for the caller to
//! poll, and polling never blocks heartbeats. It awaits the
//! [`RebalanceListener`] before giving partitions up (so the caller can finish
//! and commit) and calls it after new partitions arrive. Commits go through a
//! [`GroupHandle`], are stamped with the member's generation, and are refused
//! for partitions the member no longer owns.

pub mod assignor;
mod coordinator;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::{ApiKey, GroupId, OffsetCommitRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::cluster::Client;
use crate::consumer::{Consumer, ConsumerConfig, ConsumerRecord};
use crate::error::{check_code, Error, Result};
use crate::types::TopicPartition;
use assignor::{Assignor, RebalanceProtocol};

/// Settings of a group member.
#[derive(Clone)]
pub struct GroupConfig {
    /// The consumer group (Java's `group.id`).
    pub group_id: String,
    /// How long the coordinator waits for a heartbeat before it drops the member
    /// (Java's `session.timeout.ms`). Default 45 s.
    pub session_timeout: Duration,
    /// How long the coordinator waits for members to rejoin during a rebalance
    /// (Java's `max.poll.interval.ms` plays this role). Default 60 s.
    pub rebalance_timeout: Duration,
    /// Pause between heartbeats (Java's `heartbeat.interval.ms`). Default 3 s.
    pub heartbeat_interval: Duration,
    /// Static membership (Java's `group.instance.id`): a member that restarts
    /// with the same id within the session timeout gets its partitions back
    /// without a rebalance. Default none.
    pub group_instance_id: Option<String>,
    /// Whether a static member sends LeaveGroup when it closes, so its
    /// partitions move to the other members at once (KIP-812). Default false,
    /// as in Java: a static member that restarts within the session timeout
    /// then gets its partitions back without a rebalance, and one that stays
    /// away holds them until the session times out. Dynamic members always
    /// leave.
    pub leave_on_close: bool,
    /// Assignors offered, in preference order. Default range, then
    /// cooperative-sticky (Java's default).
    pub assignors: Vec<Arc<dyn Assignor>>,
    /// Commit consumed positions this often, on revoke and on close; `None`
    /// leaves committing to the caller. Default `None`.
    pub auto_commit_interval: Option<Duration>,
    /// Fetch settings and the reset policy for partitions without a committed offset.
    pub consumer: ConsumerConfig,
}

impl std::fmt::Debug for GroupConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConfig")
            .field("group_id", &self.group_id)
            .field("session_timeout", &self.session_timeout)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("group_instance_id", &self.group_instance_id)
            .field("leave_on_close", &self.leave_on_close)
            .field(
                "assignors",
                &self
                    .assignors
                    .iter()
                    .map(|a| a.name().to_owned())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl GroupConfig {
    /// Defaults for group `group_id`.
    pub fn new(group_id: impl Into<String>) -> Self {
        GroupConfig {
            group_id: group_id.into(),
            session_timeout: Duration::from_secs(45),
            rebalance_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(3),
            group_instance_id: None,
            leave_on_close: false,
            assignors: assignor::default_assignors(),
            auto_commit_interval: None,
            consumer: ConsumerConfig::default(),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.group_id.is_empty() {
            return Err(Error::Config("group_id is empty".into()));
        }
        if self.assignors.is_empty() {
            return Err(Error::Config("no assignor configured".into()));
        }
        if self.heartbeat_interval >= self.session_timeout {
            return Err(Error::Config(format!(
                "heartbeat_interval {:?} must be below session_timeout {:?}",
                self.heartbeat_interval, self.session_timeout
            )));
        }
        Ok(())
    }

    /// Cooperative only when every offered assignor is (as in the Java client).
    fn protocol(&self) -> RebalanceProtocol {
        if self
            .assignors
            .iter()
            .all(|a| a.protocol() == RebalanceProtocol::Cooperative)
        {
            RebalanceProtocol::Cooperative
        } else {
            RebalanceProtocol::Eager
        }
    }
}

/// The future a [`RebalanceListener`] callback returns.
pub type ListenerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Told about partitions coming and going. Each callback is awaited before the
/// group moves on: `on_revoked` before the partitions are given up, so the
/// caller can finish their events and commit through `group`.
pub trait RebalanceListener: Send + Sync {
    /// These partitions are about to be given up.
    fn on_revoked<'a>(
        &'a self,
        group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        let _ = (group, partitions);
        Box::pin(async {})
    }

    /// These partitions were just assigned. It is called before any of their
    /// records can be polled; reading them starts at the committed offsets.
    fn on_assigned<'a>(
        &'a self,
        group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        let _ = (group, partitions);
        Box::pin(async {})
    }

    /// Membership was lost without a clean revoke (session expired, fenced
    /// generation): these partitions may already belong to another member, and
    /// commits for them will be refused.
    fn on_lost<'a>(
        &'a self,
        group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        let _ = (group, partitions);
        Box::pin(async {})
    }
}

/// A listener that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopListener;

impl RebalanceListener for NoopListener {}

/// This member's identity in its group, as transactional offset commits need it
/// (KIP-447).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMetadata {
    /// The group.
    pub group_id: String,
    /// The current generation, -1 before the first join.
    pub generation_id: i32,
    /// The member id, empty before the first join.
    pub member_id: String,
    /// The static instance id, if any.
    pub group_instance_id: Option<String>,
}

#[derive(Debug, Default)]
struct GroupState {
    generation: i32,
    member_id: String,
    owned: BTreeSet<TopicPartition>,
    coordinator: Option<i32>,
    fatal: Option<Error>,
    closing: bool,
    /// Completed joins, for tests and metrics.
    rebalances: u64,
    /// When the last assignment was applied.
    assigned_at: Option<Instant>,
    /// When the coordinator last confirmed the membership (SyncGroup or a
    /// heartbeat); `None` once it is lost.
    confirmed_at: Option<Instant>,
    /// The partition counts the last assignment was computed from, when this
    /// member is the leader (empty otherwise): a change means rejoin.
    assigned_counts: BTreeMap<String, i32>,
    /// The subscription changed since the last join: rejoin.
    resubscribed: bool,
}

struct GroupInner {
    client: Client,
    config: GroupConfig,
    /// The topics subscribed to (changed by [`GroupHandle::subscribe`]).
    topics: Mutex<Vec<String>>,
    consumer: Arc<crate::consumer::Handle>,
    listener: Arc<dyn RebalanceListener>,
    state: Mutex<GroupState>,
    /// This member's own connection to the coordinator, for JoinGroup, SyncGroup,
    /// Heartbeat and LeaveGroup. Not from the client's pool: the broker serves a
    /// connection's requests one at a time and holds a JoinGroup until the round
    /// completes, so members sharing a connection would wait on each other.
    membership: tokio::sync::Mutex<Option<Arc<crate::connection::Connection>>>,
    /// Wakes the membership task (close) and pollers (fatal error).
    changed: Notify,
}

impl GroupInner {
    fn state(&self) -> std::sync::MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A cloneable handle on a group member: its assignment, its identity and
/// offset commits. Listener callbacks receive one.
#[derive(Clone)]
pub struct GroupHandle {
    inner: Arc<GroupInner>,
}

impl std::fmt::Debug for GroupHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupHandle")
            .field("group", &self.inner.config.group_id)
            .field("metadata", &self.metadata())
            .finish()
    }
}

impl GroupHandle {
    /// The group id.
    pub fn group_id(&self) -> &str {
        &self.inner.config.group_id
    }

    /// Generation, member id and instance id as of now.
    pub fn metadata(&self) -> GroupMetadata {
        let s = self.inner.state();
        GroupMetadata {
            group_id: self.inner.config.group_id.clone(),
            generation_id: s.generation,
            member_id: s.member_id.clone(),
            group_instance_id: self.inner.config.group_instance_id.clone(),
        }
    }

    /// Changes the topics this member subscribes to; it rejoins the group
    /// with them (a rebalance), as Java's `subscribe` does when called again.
    /// No change, no rejoin.
    pub fn subscribe(&self, topics: &[&str]) {
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        {
            let mut subscribed = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
            if *subscribed == topics {
                return;
            }
            *subscribed = topics;
        }
        self.inner.state().resubscribed = true;
        self.inner.changed.notify_waiters();
    }

    /// The topics this member subscribes to.
    pub fn subscription(&self) -> Vec<String> {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The partitions this member owns, sorted.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.inner.state().owned.iter().cloned().collect()
    }

    /// Number of rebalances this member has completed.
    pub fn rebalances(&self) -> u64 {
        self.inner.state().rebalances
    }

    /// When this member last received an assignment.
    pub fn assigned_at(&self) -> Option<std::time::Instant> {
        self.inner.state().assigned_at.map(Instant::into_std)
    }

    /// Whether this member may still act for its generation: it has one, and
    /// the coordinator confirmed it (SyncGroup, or a heartbeat counted from
    /// when it was sent) less than a session timeout ago, less one heartbeat
    /// interval of margin for what is sent next to arrive. A member frozen
    /// longer than that has been dropped by the coordinator even if it has not
    /// heard so yet; transactional commits check this before they go out, so
    /// a zombie does not commit on brokers that do not check the generation
    /// themselves. A healthy member, confirmed every heartbeat interval,
    /// always passes.
    pub fn session_alive(&self) -> bool {
        let config = &self.inner.config;
        let limit = config
            .session_timeout
            .saturating_sub(config.heartbeat_interval);
        let s = self.inner.state();
        s.generation >= 0
            && !s.member_id.is_empty()
            && s.confirmed_at.is_some_and(|t| t.elapsed() < limit)
    }

    /// Commits `offsets` (the next offset to read, i.e. last processed + 1) and
    /// waits for the coordinator's answer.
    ///
    /// Refused with [`Error::CommitFailed`] when a partition is not owned by
    /// this member, or when the coordinator says the generation is over: a
    /// member never commits into a generation it is not part of.
    pub async fn commit(&self, offsets: &[(TopicPartition, i64)]) -> Result<()> {
        let inner = &self.inner;
        let group = &inner.config.group_id;
        let (generation, member_id) = {
            let s = inner.state();
            if let Some(tp) = offsets
                .iter()
                .map(|(tp, _)| tp)
                .find(|tp| !s.owned.contains(*tp))
            {
                return Err(Error::CommitFailed {
                    group: group.clone(),
                    reason: format!(
                        "{tp} is not assigned to member {:?} (generation {})",
                        s.member_id, s.generation
                    ),
                });
            }
            (s.generation, s.member_id.clone())
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let mut topics: BTreeMap<&str, Vec<OffsetCommitRequestPartition>> = BTreeMap::new();
        for (tp, offset) in offsets {
            topics.entry(&tp.topic).or_default().push(
                OffsetCommitRequestPartition::default()
                    .with_partition_index(tp.partition)
                    .with_committed_offset(*offset)
                    .with_committed_leader_epoch(-1),
            );
        }
        let req = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.clone())))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(StrBytes::from_string(member_id.clone()))
            .with_group_instance_id(
                inner
                    .config
                    .group_instance_id
                    .clone()
                    .map(StrBytes::from_string),
            )
            .with_retention_time_ms(-1)
            .with_topics(
                topics
                    .into_iter()
                    .map(|(t, ps)| {
                        OffsetCommitRequestTopic::default()
                            .with_name(TopicName(StrBytes::from_string(t.to_owned())))
                            .with_partitions(ps)
                    })
                    .collect(),
            );
        let resp = self
            .with_coordinator(|conn| {
                let req = &req;
                async move {
                    let resp = conn.send(req).await?;
                    // Coordinator moves are retried; everything else is answered below.
                    for t in &resp.topics {
                        for p in &t.partitions {
                            if coordinator::coordinator_moved(p.error_code) {
                                check_code(
                                    ApiKey::OffsetCommit,
                                    p.error_code,
                                    Some(t.name.0.as_str()),
                                    Some(p.partition_index),
                                    None,
                                )?;
                            }
                        }
                    }
                    Ok(resp)
                }
            })
            .await?;
        for t in &resp.topics {
            for p in &t.partitions {
                match ResponseError::try_from_code(p.error_code) {
                    None => {}
                    Some(
                        code @ (ResponseError::IllegalGeneration
                        | ResponseError::UnknownMemberId
                        | ResponseError::RebalanceInProgress
                        | ResponseError::FencedInstanceId),
                    ) => {
                        return Err(Error::CommitFailed {
                            group: group.clone(),
                            reason: format!(
                                "the coordinator answered {code} for member {member_id:?} of generation {generation}: \
                                 the group has rebalanced and {}-{} may belong to another member now",
                                t.name.0.as_str(),
                                p.partition_index
                            ),
                        })
                    }
                    Some(_) => check_code(
                        ApiKey::OffsetCommit,
                        p.error_code,
                        Some(t.name.0.as_str()),
                        Some(p.partition_index),
                        None,
                    )?,
                }
            }
        }
        Ok(())
    }

    /// Commits the consumer's position (the offset after the last record handed
    /// out) of every owned partition.
    pub async fn commit_consumed(&self) -> Result<()> {
        let owned = self.inner.state().owned.clone();
        let positions: Vec<_> = self
            .inner
            .consumer
            .positions()
            .into_iter()
            .filter(|(tp, _)| owned.contains(tp))
            .collect();
        self.commit(&positions).await
    }

    /// Starts a commit in the background; the handle yields its outcome.
    pub fn commit_async(&self, offsets: Vec<(TopicPartition, i64)>) -> JoinHandle<Result<()>> {
        let handle = self.clone();
        tokio::spawn(async move { handle.commit(&offsets).await })
    }

    /// The group's committed offsets for `partitions` (`None`: nothing committed).
    pub async fn committed(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<BTreeMap<TopicPartition, Option<i64>>> {
        let req = crate::admin::offset_fetch_request(&self.inner.config.group_id, partitions);
        self.with_coordinator(|conn| {
            let req = &req;
            async move { crate::admin::offset_fetch(&conn, req).await }
        })
        .await
    }

    /// Runs `op` against the coordinator, rediscovering it and retrying on
    /// retriable errors within the client's retry timeout.
    async fn with_coordinator<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Arc<crate::connection::Connection>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let inner = &*self.inner;
        let op = &op;
        inner
            .client
            .retry(&[], || async move {
                let conn = coordinator::connection(inner, coordinator::Via::Shared).await?;
                let result = op(conn).await;
                if let Err(e) = &result {
                    let moved = e
                        .code()
                        .is_some_and(|c| coordinator::coordinator_moved(c.code()));
                    if moved || e.needs_metadata_refresh() {
                        inner.state().coordinator = None;
                    }
                }
                result
            })
            .await
    }
}

/// A consumer in a consumer group: partitions come from the group's assignment,
/// positions from the group's committed offsets.
///
/// ```no_run
/// # async fn f() -> strom_client::Result<()> {
/// use std::sync::Arc;
/// use strom_client::{Client, ClientConfig};
/// use strom_client::group::{GroupConfig, GroupConsumer, NoopListener};
/// let client = Client::connect(ClientConfig::new(["127.0.0.1:9092"])).await?;
/// let mut consumer = GroupConsumer::new(client, GroupConfig::new("billing"), &["orders"], Arc::new(NoopListener))?;
/// loop {
///     let records = consumer.poll().await?;
///     // ... process ...
///     let last = records.last().expect("poll returns at least one record");
///     let tp = strom_client::TopicPartition::new(&last.topic, last.partition);
///     consumer.group().commit(&[(tp, last.offset + 1)]).await?;
/// }
/// # }
/// ```
pub struct GroupConsumer {
    consumer: Consumer,
    group: GroupHandle,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for GroupConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupConsumer")
            .field("group", &self.group)
            .finish()
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        // Not closed explicitly: the membership task still leaves the group.
        self.group.inner.state().closing = true;
        self.group.inner.changed.notify_waiters();
    }
}

impl GroupConsumer {
    /// Joins group `config.group_id` subscribed to `topics`. Membership runs in
    /// the background from here on; records flow once partitions are assigned.
    pub fn new(
        client: Client,
        config: GroupConfig,
        topics: &[&str],
        listener: Arc<dyn RebalanceListener>,
    ) -> Result<GroupConsumer> {
        config.validate()?;
        if topics.is_empty() {
            return Err(Error::Config(
                "a group consumer needs at least one topic".into(),
            ));
        }
        let consumer = Consumer::new(client.clone(), config.consumer.clone());
        let inner = Arc::new(GroupInner {
            client,
            topics: Mutex::new(topics.iter().map(|t| (*t).to_owned()).collect()),
            consumer: consumer.handle().clone(),
            listener,
            state: Mutex::new(GroupState {
                generation: -1,
                ..GroupState::default()
            }),
            membership: tokio::sync::Mutex::new(None),
            changed: Notify::new(),
            config,
        });
        let group = GroupHandle { inner };
        let task = tokio::spawn(coordinator::run(group.clone()));
        Ok(GroupConsumer {
            consumer,
            group,
            task: Some(task),
        })
    }

    /// The group handle: assignment, identity, commits.
    pub fn group(&self) -> &GroupHandle {
        &self.group
    }

    /// The next records of one owned partition (see [`Consumer::poll`]). Fails
    /// with the group's fatal error, if it has one (e.g. a fenced static member).
    ///
    /// Cancel-safe.
    pub async fn poll(&mut self) -> Result<Vec<ConsumerRecord>> {
        loop {
            let changed = self.group.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(e) = self.group.inner.state().fatal.clone() {
                return Err(e);
            }
            tokio::select! {
                records = self.consumer.poll() => return records,
                _ = &mut changed => {}
            }
        }
    }

    /// The next record (see [`Consumer::recv`]).
    pub async fn recv(&mut self) -> Result<ConsumerRecord> {
        loop {
            let changed = self.group.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(e) = self.group.inner.state().fatal.clone() {
                return Err(e);
            }
            tokio::select! {
                record = self.consumer.recv() => return record,
                _ = &mut changed => {}
            }
        }
    }

    /// Stops fetching `tp` (owned by this member) until [`GroupConsumer::resume`]
    /// (see [`Consumer::pause`](crate::consumer::Consumer::pause)). A
    /// rebalance that moves `tp` away forgets the pause.
    pub fn pause(&mut self, tp: &TopicPartition) -> Result<()> {
        self.consumer.pause(tp)
    }

    /// Fetches `tp` again after [`GroupConsumer::pause`].
    pub fn resume(&mut self, tp: &TopicPartition) -> Result<()> {
        self.consumer.resume(tp)
    }

    /// The last high watermark seen for `tp` (see [`Consumer::high_watermark`]).
    pub fn high_watermark(&self, tp: &TopicPartition) -> i64 {
        self.consumer.high_watermark(tp)
    }

    /// The last stable offset seen for `tp` (see [`Consumer::last_stable_offset`]).
    pub fn last_stable_offset(&self, tp: &TopicPartition) -> i64 {
        self.consumer.last_stable_offset(tp)
    }

    /// Fetched bytes not yet polled (see [`Consumer::buffered_bytes`]).
    pub fn buffered_bytes(&self) -> usize {
        self.consumer.buffered_bytes()
    }

    /// The next offset [`GroupConsumer::poll`] returns for `tp`.
    pub fn position(&self, tp: &TopicPartition) -> Option<i64> {
        self.consumer.position(tp)
    }

    /// Moves the next read of `tp` (owned by this member) to `offset`;
    /// records fetched beyond it are dropped (see [`Consumer::seek`]).
    pub fn seek(&mut self, tp: &TopicPartition, offset: i64) -> Result<()> {
        self.consumer.seek(tp, crate::consumer::Offset::At(offset))
    }

    /// Leaves the group: commits consumed positions if auto-commit is on, calls
    /// `on_revoked` for every owned partition, sends LeaveGroup (not for static
    /// members, whose point is to come back), and waits for all of it.
    pub async fn close(mut self) -> Result<()> {
        self.group.inner.state().closing = true;
        self.group.inner.changed.notify_waiters();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        match self.group.inner.state().fatal.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
