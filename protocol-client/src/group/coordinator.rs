//! The membership task of a group consumer: find the coordinator, join, sync,
//! hand partitions to the consumer, heartbeat, rejoin, leave.
//!
//! Error handling follows the Java client:
//!
//! | answer | what the member does |
//! |---|---|
//! | MEMBER_ID_REQUIRED | rejoins at once with the member id it was given |
//! | REBALANCE_IN_PROGRESS | rejoins (eager: revoking everything first) |
//! | ILLEGAL_GENERATION | partitions are lost (`on_lost`); rejoins with its member id |
//! | UNKNOWN_MEMBER_ID | partitions are lost; rejoins as a new member |
//! | FENCED_INSTANCE_ID | fatal: another process has this static instance id |
//! | NOT_COORDINATOR, COORDINATOR_NOT_AVAILABLE, COORDINATOR_LOAD_IN_PROGRESS | finds the coordinator again and retries |

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::StrBytes;
use tracing::{debug, info, warn};

use super::assignor::{
    decode_assignment, decode_subscription, encode_assignment, encode_subscription,
    RebalanceProtocol,
};
use super::{GroupHandle, GroupInner};
use crate::backoff::Backoff;
use crate::cluster::{ConnectionClass, CoordinatorKind};
use crate::connection::Connection;
use crate::consumer::{AutoOffsetReset, Offset};
use crate::error::{check_code, Error, Result};
use crate::types::TopicPartition;

/// Whether an error code means the coordinator moved or is not ready.
pub(super) fn coordinator_moved(code: i16) -> bool {
    matches!(
        ResponseError::try_from_code(code),
        Some(
            ResponseError::NotCoordinator
                | ResponseError::CoordinatorNotAvailable
                | ResponseError::CoordinatorLoadInProgress
        )
    )
}

fn group_id(inner: &GroupInner) -> GroupId {
    GroupId(StrBytes::from_string(inner.config.group_id.clone()))
}

fn instance_id(inner: &GroupInner) -> Option<StrBytes> {
    inner
        .config
        .group_instance_id
        .clone()
        .map(StrBytes::from_string)
}

/// A connection to the group's coordinator, found with FindCoordinator when not known.
pub(super) async fn connection(inner: &GroupInner, via: Via) -> Result<Arc<Connection>> {
    let known = inner.state().coordinator;
    let id = match known {
        Some(id) => id,
        None => {
            let id = inner
                .client
                .find_coordinator(&inner.config.group_id, CoordinatorKind::Group)
                .await?;
            inner.state().coordinator = Some(id);
            id
        }
    };
    let conn = match via {
        Via::Shared => inner.client.broker(id, ConnectionClass::Normal).await,
        Via::Member => member_connection(inner, id).await,
    };
    match conn {
        Ok(c) => Ok(c),
        Err(e) => {
            inner.state().coordinator = None;
            if let Err(r) = inner.client.refresh_metadata(&[]).await {
                debug!(error = %r, "metadata refresh failed");
            }
            Err(e)
        }
    }
}

/// Which connection to the coordinator a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// The member's own connection: membership requests the broker may hold.
    Member,
    /// The client's pooled connection: commits and offset look-ups.
    Shared,
}

async fn member_connection(inner: &GroupInner, id: i32) -> Result<Arc<Connection>> {
    let addr = match inner.client.broker_address(id) {
        Some(a) => a,
        None => {
            inner.client.refresh_metadata(&[]).await?;
            inner
                .client
                .broker_address(id)
                .ok_or_else(|| Error::Disconnected {
                    broker: format!("broker id {id}"),
                    reason: "the group coordinator is not in the cluster metadata".into(),
                })?
        }
    };
    let mut own = inner.membership.lock().await;
    if let Some(c) = own.as_ref() {
        if !c.is_closed() && c.broker() == addr {
            return Ok(c.clone());
        }
    }
    let c = Arc::new(inner.client.connect_to(&addr).await?);
    *own = Some(c.clone());
    Ok(c)
}

struct Joined {
    generation: i32,
    member_id: String,
    partitions: Vec<TopicPartition>,
}

enum Event {
    Rejoin,
    /// Membership lost; `unknown_member` also drops the member id.
    Lost {
        unknown_member: bool,
    },
    Fatal(Error),
    Close,
}

/// Sleeps for `d` unless the member starts closing; true when closing.
async fn pause(inner: &GroupInner, d: Duration) -> bool {
    let changed = inner.changed.notified();
    tokio::pin!(changed);
    changed.as_mut().enable();
    if inner.state().closing {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => inner.state().closing,
        _ = changed => inner.state().closing,
    }
}

pub(super) async fn run(group: GroupHandle) {
    let inner = group.inner.clone();
    let protocol = inner.config.protocol();
    let mut backoff = Backoff::new(inner.client.config().retry_backoff, Duration::from_secs(2));
    // Heartbeats of the current generation: from its SyncGroup until the next
    // JoinGroup (which keeps the session itself) or the loss of membership, so
    // slow rebalance callbacks never let the session expire.
    let mut heartbeats: Option<Heartbeats> = None;
    loop {
        if inner.state().closing {
            break;
        }
        if protocol == RebalanceProtocol::Eager {
            let owned: Vec<_> = inner.state().owned.iter().cloned().collect();
            revoke(&group, &owned).await;
        }
        heartbeats = None;
        let step = match join(&group, protocol).await {
            Ok(joined) => {
                heartbeats = Some(Heartbeats::start(&group));
                apply(&group, joined, protocol).await
            }
            Err(e) => Err(e),
        };
        match step {
            Ok(follow_up) => {
                backoff.reset();
                if follow_up {
                    continue; // cooperative: rejoin to hand out what was revoked
                }
            }
            Err(e) if e.is_fatal() => {
                warn!(group = %inner.config.group_id, error = %e, "group membership failed");
                inner.state().fatal = Some(e);
                inner.changed.notify_waiters();
                break;
            }
            Err(e) => {
                debug!(group = %inner.config.group_id, error = %e, "join failed; retrying");
                if pause(&inner, backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        }
        let Some(beating) = heartbeats.as_mut() else {
            continue;
        };
        match stable(&group, beating).await {
            Event::Rejoin => {}
            Event::Lost { unknown_member } => {
                heartbeats = None;
                lose(&group).await;
                if unknown_member {
                    inner.state().member_id.clear();
                }
            }
            Event::Fatal(e) => {
                warn!(group = %inner.config.group_id, error = %e, "group membership failed");
                inner.state().fatal = Some(e);
                inner.changed.notify_waiters();
                break;
            }
            Event::Close => break,
        }
    }
    leave(&group).await;
    drop(heartbeats);
}

async fn join(group: &GroupHandle, protocol: RebalanceProtocol) -> Result<Joined> {
    let inner = &group.inner;
    let conn = connection(inner, Via::Member).await?;
    let (owned, generation, mut member_id) = {
        let s = inner.state();
        (
            s.owned.iter().cloned().collect::<Vec<_>>(),
            s.generation,
            s.member_id.clone(),
        )
    };
    let advertised: &[TopicPartition] = match protocol {
        RebalanceProtocol::Cooperative => &owned,
        RebalanceProtocol::Eager => &[],
    };
    // Cleared before the topics are read: a subscribe in between sets it
    // again (a rejoin too many at worst, never a subscription lost).
    inner.state().resubscribed = false;
    let topics = group.subscription();
    let protocols = inner
        .config
        .assignors
        .iter()
        .map(|a| {
            Ok(JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_string(a.name().to_owned()))
                .with_metadata(encode_subscription(
                    &topics,
                    advertised,
                    generation,
                    a.user_data(&owned),
                )?))
        })
        .collect::<Result<Vec<_>>>()?;
    let timeout = inner.config.rebalance_timeout + inner.client.config().connection.request_timeout;
    let started = Instant::now();
    let resp = loop {
        let req = JoinGroupRequest::default()
            .with_group_id(group_id(inner))
            .with_session_timeout_ms(inner.config.session_timeout.as_millis() as i32)
            .with_rebalance_timeout_ms(inner.config.rebalance_timeout.as_millis() as i32)
            .with_member_id(StrBytes::from_string(member_id.clone()))
            .with_group_instance_id(instance_id(inner))
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(protocols.clone());
        let resp = conn.send_with_timeout(&req, timeout).await?;
        match ResponseError::try_from_code(resp.error_code) {
            None => break resp,
            Some(ResponseError::MemberIdRequired) => {
                member_id = resp.member_id.as_str().to_owned();
                inner.state().member_id = member_id.clone();
            }
            Some(code) => return Err(rejected(inner, ApiKey::JoinGroup, code)),
        }
    };
    let generation = resp.generation_id;
    let member_id = resp.member_id.as_str().to_owned();
    let protocol_name = resp
        .protocol_name
        .as_ref()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let leader = resp.leader.as_str() == member_id;
    debug!(
        group = %inner.config.group_id, generation, member = %member_id, leader,
        protocol = %protocol_name, waited = ?started.elapsed(), "joined"
    );
    let assignments = if leader {
        leader_assign(inner, &resp.members, &protocol_name).await?
    } else {
        inner.state().assigned_counts.clear();
        Vec::new()
    };
    let sync = SyncGroupRequest::default()
        .with_group_id(group_id(inner))
        .with_generation_id(generation)
        .with_member_id(StrBytes::from_string(member_id.clone()))
        .with_group_instance_id(instance_id(inner))
        .with_protocol_type(Some(StrBytes::from_static_str("consumer")))
        .with_protocol_name(Some(StrBytes::from_string(protocol_name.clone())))
        .with_assignments(assignments);
    let sresp = conn.send_with_timeout(&sync, timeout).await?;
    if let Some(code) = ResponseError::try_from_code(sresp.error_code) {
        return Err(rejected(inner, ApiKey::SyncGroup, code));
    }
    let assignment = decode_assignment(sresp.assignment)?;
    if let Some(a) = inner
        .config
        .assignors
        .iter()
        .find(|a| a.name() == protocol_name)
    {
        a.on_assignment(&assignment, generation);
    }
    Ok(Joined {
        generation,
        member_id,
        partitions: assignment.partitions,
    })
}

/// Records what an error code means for the member's state and turns it into an error.
fn rejected(inner: &GroupInner, api: ApiKey, code: ResponseError) -> Error {
    let mut s = inner.state();
    match code {
        ResponseError::UnknownMemberId => s.member_id.clear(),
        c if coordinator_moved(c.code()) => s.coordinator = None,
        _ => {}
    }
    let mut e = Error::broker(api, code, None, None, None);
    if let Error::Broker { message, .. } = &mut e {
        *message = Some(format!("group {:?}", inner.config.group_id));
    }
    e
}

/// The leader's part: run the chosen assignor over every member's subscription.
async fn leader_assign(
    inner: &GroupInner,
    members: &[JoinGroupResponseMember],
    protocol_name: &str,
) -> Result<Vec<SyncGroupRequestAssignment>> {
    let assignor = inner
        .config
        .assignors
        .iter()
        .find(|a| a.name() == protocol_name)
        .ok_or_else(|| Error::Protocol {
            broker: "group coordinator".into(),
            what: format!(
                "the coordinator chose assignor {protocol_name:?}, which this member did not offer"
            ),
        })?;
    let subscriptions = members
        .iter()
        .map(|m| {
            decode_subscription(
                m.member_id.as_str(),
                m.group_instance_id.as_ref().map(StrBytes::as_str),
                m.metadata.clone(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let topics: BTreeSet<&String> = subscriptions.iter().flat_map(|s| &s.topics).collect();
    let mut counts = BTreeMap::new();
    for topic in topics {
        match inner.client.topic_metadata(topic).await {
            Ok(meta) => {
                counts.insert(topic.clone(), meta.partitions.len() as i32);
            }
            Err(Error::UnknownTopic { .. }) => {
                warn!(group = %inner.config.group_id, %topic, "subscribed topic does not exist; nothing to assign for it");
            }
            Err(e) => return Err(e),
        }
    }
    let plan = assignor.assign(&subscriptions, &counts)?;
    inner.state().assigned_counts = counts;
    info!(
        group = %inner.config.group_id, assignor = %protocol_name, members = subscriptions.len(),
        "computed assignment"
    );
    subscriptions
        .iter()
        .map(|m| {
            let a = plan.get(&m.member_id).cloned().unwrap_or_default();
            Ok(SyncGroupRequestAssignment::default()
                .with_member_id(StrBytes::from_string(m.member_id.clone()))
                .with_assignment(encode_assignment(&a)?))
        })
        .collect()
}

/// Takes a new assignment: revoke what is gone, start what is new at its
/// committed offset. True when a cooperative follow-up rebalance is due.
async fn apply(group: &GroupHandle, joined: Joined, protocol: RebalanceProtocol) -> Result<bool> {
    let inner = &group.inner;
    let new: BTreeSet<TopicPartition> = joined.partitions.into_iter().collect();
    let owned = {
        let mut s = inner.state();
        s.generation = joined.generation;
        s.member_id = joined.member_id;
        s.owned.clone()
    };
    let revoked: Vec<_> = owned.difference(&new).cloned().collect();
    let added: Vec<_> = new.difference(&owned).cloned().collect();
    revoke(group, &revoked).await;
    if !added.is_empty() {
        let committed = group.committed(&added).await?;
        let mut starts = Vec::with_capacity(added.len());
        for tp in &added {
            let offset = match committed.get(tp).copied().flatten() {
                Some(o) => Offset::At(o),
                None => match inner.config.consumer.auto_offset_reset {
                    AutoOffsetReset::Earliest => Offset::Earliest,
                    AutoOffsetReset::Latest => Offset::Latest,
                    AutoOffsetReset::None => {
                        return Err(Error::NoCommittedOffset {
                            group: inner.config.group_id.clone(),
                            topic: tp.topic.to_string(),
                            partition: tp.partition,
                        })
                    }
                },
            };
            starts.push((tp.clone(), offset));
        }
        // The listener hears of the partitions before any of their records
        // can be polled: it can set up what processing them needs.
        inner.state().owned.extend(added.iter().cloned());
        let listener = inner.listener.on_assigned(group, &added);
        if bounded(inner, "on_assigned", listener).await.is_err() {
            warn!(group = %inner.config.group_id, "reading the new partitions anyway");
        }
        debug!(group = %inner.config.group_id, ?starts, "reading new partitions from");
        inner.consumer.add_partitions(starts);
    }
    let mut s = inner.state();
    s.rebalances += 1;
    s.assigned_at = Some(Instant::now());
    s.confirmed_at = s.assigned_at;
    info!(
        group = %inner.config.group_id, generation = s.generation, owned = s.owned.len(),
        added = added.len(), revoked = revoked.len(), "assignment applied"
    );
    Ok(protocol == RebalanceProtocol::Cooperative && !revoked.is_empty())
}

/// Gives partitions up cleanly: auto-commit, `on_revoked`, then stop reading them.
async fn revoke(group: &GroupHandle, partitions: &[TopicPartition]) {
    if partitions.is_empty() {
        return;
    }
    let inner = &group.inner;
    if inner.config.auto_commit_interval.is_some() {
        let positions: Vec<_> = inner
            .consumer
            .positions()
            .into_iter()
            .filter(|(tp, _)| partitions.contains(tp))
            .collect();
        if let Err(e) = group.commit(&positions).await {
            warn!(group = %inner.config.group_id, error = %e, "commit on revoke failed");
        }
    }
    let done = bounded(
        inner,
        "on_revoked",
        inner.listener.on_revoked(group, partitions),
    )
    .await;
    inner.consumer.remove_partitions(partitions);
    {
        let mut s = inner.state();
        for tp in partitions {
            s.owned.remove(tp);
        }
    }
    if done.is_err() {
        // The callback was cut short: whatever it did not finish (a commit,
        // say) did not happen, so the partitions count as lost.
        let lost = inner.listener.on_lost(group, partitions);
        let _ = bounded(inner, "on_lost", lost).await;
    }
}

/// Runs a rebalance callback for at most the rebalance timeout: the group
/// waits no longer than that for this member, so a callback that overruns it
/// is cut off (with an error in the log) rather than holding the group up.
async fn bounded(
    inner: &GroupInner,
    callback: &str,
    run: crate::group::ListenerFuture<'_>,
) -> std::result::Result<(), tokio::time::error::Elapsed> {
    let limit = inner.config.rebalance_timeout;
    tokio::time::timeout(limit, run).await.inspect_err(|_| {
        tracing::error!(
            group = %inner.config.group_id, callback, ?limit,
            "rebalance callback ran past the rebalance timeout and was cut off"
        );
    })
}

/// Membership is gone: stop reading everything, then tell the listener.
async fn lose(group: &GroupHandle) {
    let inner = &group.inner;
    let lost: Vec<TopicPartition> = {
        let mut s = inner.state();
        s.confirmed_at = None;
        std::mem::take(&mut s.owned).into_iter().collect()
    };
    inner.consumer.remove_partitions(&lost);
    warn!(group = %inner.config.group_id, partitions = lost.len(), "group membership lost");
    if !lost.is_empty() {
        let _ = bounded(inner, "on_lost", inner.listener.on_lost(group, &lost)).await;
    }
}

/// The stable phase: auto-commits here, until the heartbeats report a
/// rebalance or a loss, the leader sees the partition count of a subscribed
/// topic change, or the member closes.
async fn stable(group: &GroupHandle, heartbeats: &mut Heartbeats) -> Event {
    let inner = &group.inner;
    let mut metadata = inner.client.metadata_changes();
    loop {
        let changed = inner.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if inner.state().closing {
            return Event::Close;
        }
        if partitions_changed(inner) {
            return Event::Rejoin;
        }
        if inner.state().resubscribed {
            info!(group = %inner.config.group_id, topics = ?group.subscription(), "subscription changed; rejoining");
            return Event::Rejoin;
        }
        let auto_commit = inner.config.auto_commit_interval;
        tokio::select! {
            event = heartbeats.events.recv() => return event.unwrap_or(Event::Rejoin),
            _ = &mut changed => {}
            _ = metadata.changed() => {}
            _ = tokio::time::sleep(auto_commit.unwrap_or(Duration::MAX)), if auto_commit.is_some() => {
                if let Err(e) = group.commit_consumed().await {
                    debug!(group = %inner.config.group_id, error = %e, "auto-commit failed");
                }
            }
        }
    }
}

/// Whether the cached partition count of a topic the leader assigned differs
/// from the count it assigned (Java's leader does the same): the group must
/// rebalance to hand out the new partitions. Topics not in the cache right now
/// say nothing.
fn partitions_changed(inner: &GroupInner) -> bool {
    let counts = inner.state().assigned_counts.clone();
    for (topic, &assigned) in &counts {
        let Some(now) = inner.client.cached_topic(topic) else {
            continue;
        };
        if now.partitions.len() as i32 != assigned {
            info!(
                group = %inner.config.group_id, %topic, assigned, now = now.partitions.len(),
                "partition count changed; rejoining to reassign"
            );
            return true;
        }
    }
    false
}

/// The heartbeat task of one generation and what it reports.
struct Heartbeats {
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    _task: AbortOnDrop,
}

impl Heartbeats {
    fn start(group: &GroupHandle) -> Heartbeats {
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(heartbeat(group.clone(), tx));
        Heartbeats {
            events,
            _task: AbortOnDrop(task),
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends a heartbeat every `heartbeat_interval` for as long as the generation
/// lasts. A rebalance is reported once and heartbeats go on (they keep the
/// session while the member finishes its callbacks and rejoins); a lost
/// membership or a fatal error is reported and ends the task. If no heartbeat
/// succeeds for a whole session timeout the member counts itself gone: the
/// coordinator has dropped it by then.
async fn heartbeat(group: GroupHandle, tx: tokio::sync::mpsc::UnboundedSender<Event>) {
    let inner = &group.inner;
    let mut last_ok = Instant::now();
    let mut rebalancing = false;
    let last = loop {
        tokio::time::sleep(inner.config.heartbeat_interval).await;
        if last_ok.elapsed() > inner.config.session_timeout {
            break Event::Lost {
                unknown_member: true,
            };
        }
        let (generation, member_id) = {
            let s = inner.state();
            (s.generation, s.member_id.clone())
        };
        let req = HeartbeatRequest::default()
            .with_group_id(group_id(inner))
            .with_generation_id(generation)
            .with_member_id(StrBytes::from_string(member_id))
            .with_group_instance_id(instance_id(inner));
        // A good answer confirms the session as of when the request left: a
        // member frozen with its heartbeat in flight is not alive on waking
        // just because that old answer arrives then.
        let sent_at = Instant::now();
        // A broker that stops answering (frozen, partitioned away) must not
        // hold this heartbeat past the session: the member has to find
        // itself dropped when the coordinator drops it, not a request
        // timeout later.
        let left = inner
            .config
            .session_timeout
            .saturating_sub(last_ok.elapsed())
            .max(Duration::from_millis(10));
        let sent = tokio::time::timeout(left, async {
            connection(inner, Via::Member).await?.send(&req).await
        })
        .await
        .unwrap_or_else(|_| {
            Err(Error::RequestTimeout {
                broker: "group coordinator".into(),
                api: ApiKey::Heartbeat,
                after: left,
            })
        });
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                debug!(group = %inner.config.group_id, error = %e, "heartbeat failed");
                if e.needs_metadata_refresh() {
                    inner.state().coordinator = None;
                }
                continue;
            }
        };
        match ResponseError::try_from_code(resp.error_code) {
            None => {
                last_ok = sent_at;
                inner.state().confirmed_at = Some(sent_at);
            }
            Some(ResponseError::RebalanceInProgress) => {
                // The session is alive; the group waits for this member.
                last_ok = sent_at;
                inner.state().confirmed_at = Some(sent_at);
                if !rebalancing {
                    rebalancing = true;
                    let _ = tx.send(Event::Rejoin);
                }
            }
            Some(ResponseError::IllegalGeneration) => {
                break Event::Lost {
                    unknown_member: false,
                }
            }
            Some(ResponseError::UnknownMemberId) => {
                break Event::Lost {
                    unknown_member: true,
                }
            }
            Some(code @ ResponseError::FencedInstanceId) => {
                break Event::Fatal(rejected(inner, ApiKey::Heartbeat, code))
            }
            Some(code) if coordinator_moved(code.code()) => {
                inner.state().coordinator = None;
            }
            Some(code) => debug!(group = %inner.config.group_id, %code, "heartbeat error"),
        }
    };
    let _ = tx.send(last);
}

/// Leaves the group on close: a clean revoke and LeaveGroup (static members
/// only with `leave_on_close`), or just dropping everything after a fatal error.
async fn leave(group: &GroupHandle) {
    let inner = &group.inner;
    if inner.state().fatal.is_some() {
        lose(group).await;
        return;
    }
    let owned: Vec<_> = inner.state().owned.iter().cloned().collect();
    revoke(group, &owned).await;
    let member_id = inner.state().member_id.clone();
    if member_id.is_empty()
        || (inner.config.group_instance_id.is_some() && !inner.config.leave_on_close)
    {
        return;
    }
    let sent = async {
        let conn = connection(inner, Via::Member).await?;
        let mut req = LeaveGroupRequest::default().with_group_id(group_id(inner));
        if conn.version::<LeaveGroupRequest>()? >= 3 {
            req.members = vec![MemberIdentity::default()
                .with_member_id(StrBytes::from_string(member_id.clone()))
                .with_group_instance_id(instance_id(inner))];
        } else {
            req.member_id = StrBytes::from_string(member_id.clone());
        }
        let resp = conn.send(&req).await?;
        check_code(ApiKey::LeaveGroup, resp.error_code, None, None, None)
    }
    .await;
    match sent {
        Ok(()) => info!(group = %inner.config.group_id, member = %member_id, "left group"),
        Err(e) => {
            warn!(group = %inner.config.group_id, error = %e, "LeaveGroup failed; the coordinator will drop the member after its session timeout")
        }
    }
    let mut s = inner.state();
    s.member_id.clear();
    s.generation = -1;
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use kafka_protocol::messages::ApiKey;

    use crate::group::assignor::CooperativeSticky;
    use crate::group::{GroupConfig, GroupConsumer, ListenerFuture, RebalanceListener};
    use crate::mock::MockCluster;
    use crate::{Client, TopicPartition};

    /// A listener whose `on_revoked` takes `revoke_for` (forever when `None`)
    /// and which counts `on_lost` calls.
    struct Slow {
        revoke_for: Option<Duration>,
        revoked: AtomicUsize,
        lost: AtomicUsize,
    }

    impl RebalanceListener for Slow {
        fn on_revoked<'a>(
            &'a self,
            _group: &'a crate::GroupHandle,
            partitions: &'a [TopicPartition],
        ) -> ListenerFuture<'a> {
            Box::pin(async move {
                self.revoked.fetch_add(partitions.len(), Ordering::SeqCst);
                match self.revoke_for {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending().await,
                }
            })
        }

        fn on_lost<'a>(
            &'a self,
            _group: &'a crate::GroupHandle,
            _partitions: &'a [TopicPartition],
        ) -> ListenerFuture<'a> {
            self.lost.fetch_add(1, Ordering::SeqCst);
            Box::pin(async {})
        }
    }

    fn config() -> GroupConfig {
        let mut c = GroupConfig::new("g");
        c.session_timeout = Duration::from_secs(6);
        c.heartbeat_interval = Duration::from_secs(1);
        c.rebalance_timeout = Duration::from_secs(60);
        c.assignors = vec![Arc::new(CooperativeSticky)];
        c
    }

    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..2_000 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("never happened: {what}");
    }

    /// Starts member A (slow on_revoked) alone, then member B, which takes
    /// half of A's partitions away: A's `on_revoked` runs while B waits.
    async fn two_members(cluster: &MockCluster, slow: Arc<Slow>) -> (GroupConsumer, GroupConsumer) {
        cluster.create_topic("t", 4);
        let client = Client::connect(cluster.client_config()).await.unwrap();
        let a = GroupConsumer::new(client.clone(), config(), &["t"], slow).unwrap();
        wait_until("A owns everything", || a.group().assignment().len() == 4).await;
        let b = GroupConsumer::new(
            client,
            config(),
            &["t"],
            Arc::new(super::super::NoopListener),
        )
        .unwrap();
        (a, b)
    }

    /// A member that changes its subscription rejoins with it: it then owns
    /// the new topic's partitions too, and no longer the dropped one's.
    #[tokio::test(start_paused = true)]
    async fn a_new_subscription_rejoins_with_its_topics() {
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        cluster.create_topic("u", 3);
        let client = Client::connect(cluster.client_config()).await.unwrap();
        let listener = Arc::new(super::super::NoopListener);
        let a = GroupConsumer::new(client, config(), &["t"], listener).unwrap();
        wait_until("A owns t", || a.group().assignment().len() == 2).await;
        let joins = cluster.received(ApiKey::JoinGroup);
        a.group().subscribe(&["t", "u"]);
        wait_until("A owns t and u", || a.group().assignment().len() == 5).await;
        assert!(cluster.received(ApiKey::JoinGroup) > joins, "no rejoin");
        // The same subscription again: no rejoin.
        let joins = cluster.received(ApiKey::JoinGroup);
        a.group().subscribe(&["t", "u"]);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            cluster.received(ApiKey::JoinGroup),
            joins,
            "rejoined for no change"
        );
        a.group().subscribe(&["u"]);
        wait_until("A owns only u", || {
            let owned = a.group().assignment();
            owned.len() == 3 && owned.iter().all(|tp| &*tp.topic == "u")
        })
        .await;
    }

    /// A coordinator that stops answering (a frozen broker) does not hold
    /// the member's heartbeat for the request timeout (30 s): the member
    /// counts its partitions lost once its session has run out.
    #[tokio::test(start_paused = true)]
    async fn a_silent_coordinator_loses_the_member_at_the_session_timeout() {
        let cluster = MockCluster::new();
        cluster.create_topic("t", 2);
        let client = Client::connect(cluster.client_config()).await.unwrap();
        let slow = Arc::new(Slow {
            revoke_for: Some(Duration::ZERO),
            revoked: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
        });
        let a = GroupConsumer::new(client, config(), &["t"], slow.clone()).unwrap();
        wait_until("A owns everything", || a.group().assignment().len() == 2).await;
        cluster.set_hook(|call: &crate::mock::Call| match call.api {
            ApiKey::Heartbeat | ApiKey::JoinGroup => crate::mock::Action::Hang,
            _ => crate::mock::Action::Answer,
        });
        let silent = tokio::time::Instant::now();
        wait_until("A loses its partitions", || {
            slow.lost.load(Ordering::SeqCst) > 0
        })
        .await;
        assert!(
            silent.elapsed() <= Duration::from_secs(8),
            "lost only after {:?} with a 6 s session",
            silent.elapsed()
        );
        assert!(!a.group().session_alive());
    }

    /// A member whose `on_revoked` takes 20 s (three session timeouts) keeps
    /// heartbeating meanwhile, so the coordinator never drops it.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_continue_during_a_slow_on_revoked() {
        let cluster = MockCluster::new();
        let slow = Arc::new(Slow {
            revoke_for: Some(Duration::from_secs(20)),
            revoked: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
        });
        let (a, b) = two_members(&cluster, slow.clone()).await;
        wait_until("A revokes", || slow.revoked.load(Ordering::SeqCst) > 0).await;
        let beats = cluster.received(ApiKey::Heartbeat);
        tokio::time::sleep(Duration::from_secs(15)).await;
        assert!(
            cluster.received(ApiKey::Heartbeat) >= beats + 10,
            "no heartbeats while on_revoked ran"
        );
        assert_eq!(
            cluster.members("g").len(),
            2,
            "A was dropped from the group"
        );
        wait_until("the partitions move", || {
            a.group().assignment().len() == 2 && b.group().assignment().len() == 2
        })
        .await;
        assert_eq!(slow.lost.load(Ordering::SeqCst), 0, "A lost its partitions");
    }

    /// An `on_revoked` that never returns is cut off at the rebalance timeout:
    /// its partitions count as lost and the group moves on.
    #[tokio::test(start_paused = true)]
    async fn a_hung_on_revoked_is_cut_off_at_the_rebalance_timeout() {
        let cluster = MockCluster::new();
        let slow = Arc::new(Slow {
            revoke_for: None,
            revoked: AtomicUsize::new(0),
            lost: AtomicUsize::new(0),
        });
        let (a, b) = two_members(&cluster, slow.clone()).await;
        wait_until("A revokes", || slow.revoked.load(Ordering::SeqCst) > 0).await;
        let started = tokio::time::Instant::now();
        wait_until("on_lost after the cut-off", || {
            slow.lost.load(Ordering::SeqCst) == 1
        })
        .await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(59) && waited <= Duration::from_secs(62),
            "cut off after {waited:?}, not at the 60 s rebalance timeout"
        );
        wait_until("the partitions move", || {
            a.group().assignment().len() == 2 && b.group().assignment().len() == 2
        })
        .await;
    }
}
