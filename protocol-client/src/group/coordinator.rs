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
use std::time::{Duration, Instant};

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, GroupId, HeartbeatRequest, JoinGroupRequest, LeaveGroupRequest, SyncGroupRequest,
};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::assignor::{
    decode_assignment, decode_subscription, encode_assignment, encode_subscription,
    RebalanceProtocol,
};
use super::{GroupHandle, GroupInner};
use crate::cluster::{ConnectionClass, CoordinatorKind};
use crate::connection::Connection;
use crate::consumer::{AutoOffsetReset, Offset, TopicPartition};
use crate::error::{check_code, Error, Result};

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
    let c = Arc::new(Connection::connect(&addr, &inner.client.config().connection).await?);
    *own = Some(c.clone());
    Ok(c)
}

/// Errors after which retrying cannot help: the member stops and reports them.
fn is_fatal(e: &Error) -> bool {
    match e {
        Error::Broker { code, .. } => matches!(
            code,
            ResponseError::FencedInstanceId
                | ResponseError::GroupAuthorizationFailed
                | ResponseError::InvalidSessionTimeout
                | ResponseError::InconsistentGroupProtocol
                | ResponseError::GroupMaxSizeReached
                | ResponseError::InvalidGroupId
                | ResponseError::UnsupportedVersion
        ),
        Error::UnsupportedVersion { .. } | Error::NoCommittedOffset { .. } | Error::Config(_) => {
            true
        }
        _ => false,
    }
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
    let base_backoff = inner.client.config().retry_backoff;
    let mut backoff = base_backoff;
    loop {
        if inner.state().closing {
            break;
        }
        if protocol == RebalanceProtocol::Eager {
            let owned: Vec<_> = inner.state().owned.iter().cloned().collect();
            revoke(&group, &owned).await;
        }
        let step = match join(&group, protocol).await {
            Ok(joined) => apply(&group, joined, protocol).await,
            Err(e) => Err(e),
        };
        match step {
            Ok(follow_up) => {
                backoff = base_backoff;
                if follow_up {
                    continue; // cooperative: rejoin to hand out what was revoked
                }
            }
            Err(e) if is_fatal(&e) => {
                warn!(group = %inner.config.group_id, error = %e, "group membership failed");
                inner.state().fatal = Some(e);
                inner.changed.notify_waiters();
                break;
            }
            Err(e) => {
                debug!(group = %inner.config.group_id, error = %e, "join failed; retrying");
                if pause(&inner, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        }
        match stable(&group).await {
            Event::Rejoin => {}
            Event::Lost { unknown_member } => {
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
    let protocols = inner
        .config
        .assignors
        .iter()
        .map(|a| {
            Ok(JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_string(a.name().to_owned()))
                .with_metadata(encode_subscription(
                    &inner.topics,
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
        inner.listener.on_assigned(group, &added).await;
        inner.consumer.add_partitions(starts);
    }
    let mut s = inner.state();
    s.rebalances += 1;
    s.assigned_at = Some(Instant::now());
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
    inner.listener.on_revoked(group, partitions).await;
    inner.consumer.remove_partitions(partitions);
    let mut s = inner.state();
    for tp in partitions {
        s.owned.remove(tp);
    }
}

/// Membership is gone: stop reading everything, then tell the listener.
async fn lose(group: &GroupHandle) {
    let inner = &group.inner;
    let lost: Vec<TopicPartition> = std::mem::take(&mut inner.state().owned)
        .into_iter()
        .collect();
    inner.consumer.remove_partitions(&lost);
    warn!(group = %inner.config.group_id, partitions = lost.len(), "group membership lost");
    if !lost.is_empty() {
        inner.listener.on_lost(group, &lost).await;
    }
}

/// The stable phase: heartbeats on their own task, auto-commits here, until the
/// heartbeat reports a rebalance or a loss, or the member closes.
async fn stable(group: &GroupHandle) -> Event {
    let inner = &group.inner;
    let (tx, mut rx) = oneshot::channel();
    let heartbeats = tokio::spawn(heartbeat(group.clone(), tx));
    let _stop = AbortOnDrop(heartbeats);
    loop {
        let changed = inner.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if inner.state().closing {
            return Event::Close;
        }
        let auto_commit = inner.config.auto_commit_interval;
        tokio::select! {
            event = &mut rx => return event.unwrap_or(Event::Rejoin),
            _ = &mut changed => {}
            _ = tokio::time::sleep(auto_commit.unwrap_or(Duration::MAX)), if auto_commit.is_some() => {
                if let Err(e) = group.commit_consumed().await {
                    debug!(group = %inner.config.group_id, error = %e, "auto-commit failed");
                }
            }
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends a heartbeat every `heartbeat_interval` until the coordinator says
/// something other than "fine"; reports that once and ends. If no heartbeat
/// succeeds for a whole session timeout the member counts itself gone: the
/// coordinator has dropped it by then.
async fn heartbeat(group: GroupHandle, tx: oneshot::Sender<Event>) {
    let inner = &group.inner;
    let mut last_ok = Instant::now();
    let event = loop {
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
        let sent = async { connection(inner, Via::Member).await?.send(&req).await }.await;
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
            None => last_ok = Instant::now(),
            Some(ResponseError::RebalanceInProgress) => break Event::Rejoin,
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
    let _ = tx.send(event);
}

/// Leaves the group on close: a clean revoke and LeaveGroup (dynamic members
/// only), or just dropping everything after a fatal error.
async fn leave(group: &GroupHandle) {
    let inner = &group.inner;
    if inner.state().fatal.is_some() {
        lose(group).await;
        return;
    }
    let owned: Vec<_> = inner.state().owned.iter().cloned().collect();
    revoke(group, &owned).await;
    let member_id = inner.state().member_id.clone();
    if member_id.is_empty() || inner.config.group_instance_id.is_some() {
        return;
    }
    let sent = async {
        let conn = connection(inner, Via::Member).await?;
        let mut req = LeaveGroupRequest::default().with_group_id(group_id(inner));
        if conn.version::<LeaveGroupRequest>()? >= 3 {
            req.members =
                vec![MemberIdentity::default()
                    .with_member_id(StrBytes::from_string(member_id.clone()))];
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
