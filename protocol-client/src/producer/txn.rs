//! Producer identity and transactions: InitProducerId, AddPartitionsToTxn,
//! AddOffsetsToTxn + TxnOffsetCommit, EndTxn.
//!
//! A transactional producer talks to its transaction coordinator (found with
//! FindCoordinator by transactional id). CONCURRENT_TRANSACTIONS and coordinator
//! moves are retried; PRODUCER_FENCED and INVALID_PRODUCER_EPOCH mean a newer
//! producer with the same transactional id exists, which is fatal for this one.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic;
use kafka_protocol::messages::txn_offset_commit_request::{
    TxnOffsetCommitRequestPartition, TxnOffsetCommitRequestTopic,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddPartitionsToTxnRequest, ApiKey, EndTxnRequest, GroupId,
    InitProducerIdRequest, ProducerId, TopicName, TransactionalId, TxnOffsetCommitRequest,
};
use kafka_protocol::protocol::StrBytes;
use tracing::{debug, info};

use super::Inner;
use crate::backoff::Backoff;
use crate::cluster::{ConnectionClass, CoordinatorKind};
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::group::GroupMetadata;
use crate::types::TopicPartition;

/// Where a transactional producer stands.
#[derive(Debug, Clone)]
pub(super) enum TxnState {
    /// `init_transactions` has not run.
    Uninitialized,
    /// Between transactions.
    Ready,
    /// `begin_transaction` was called.
    InTransaction,
    /// The current transaction hit an error; only `abort_transaction` helps.
    Abortable(Error),
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_owned())
}

/// Turns an error code of a transaction API into an error: fencing codes
/// become [`Error::ProducerFenced`].
fn txn_error(inner: &Inner, api: ApiKey, code: i16, what: Option<&str>) -> Result<()> {
    match ResponseError::try_from_code(code) {
        None => Ok(()),
        Some(c @ (ResponseError::ProducerFenced | ResponseError::InvalidProducerEpoch)) => {
            Err(Error::ProducerFenced {
                transactional_id: inner.config.transactional_id.clone(),
                reason: format!(
                    "{api:?} answered {c}: another producer with this transactional id took over"
                ),
            })
        }
        Some(c) => Err(Error::broker(api, c, what, None, None)),
    }
}

/// Whether a transaction API error is worth retrying (after a coordinator refresh).
fn retriable(e: &Error) -> bool {
    match e.code() {
        Some(
            ResponseError::ConcurrentTransactions
            | ResponseError::CoordinatorLoadInProgress
            | ResponseError::CoordinatorNotAvailable
            | ResponseError::NotCoordinator,
        ) => true,
        Some(_) => e.is_retriable(),
        None => e.is_retriable(),
    }
}

/// Runs `op` against the transaction coordinator until it succeeds, fails for
/// good, or the retry timeout passes.
async fn with_coordinator<T, F, Fut>(inner: &Inner, op: F) -> Result<T>
where
    F: Fn(Arc<Connection>) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let config = inner.client.config();
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(20), config.retry_backoff * 5);
    loop {
        let attempt = async { op(coordinator(inner).await?).await }.await;
        match attempt {
            Ok(v) => return Ok(v),
            Err(e) if retriable(&e) && started.elapsed() < config.retry_timeout => {
                debug!(error = %e, "transaction request retried");
                let moved = matches!(
                    e.code(),
                    Some(ResponseError::NotCoordinator | ResponseError::CoordinatorNotAvailable)
                );
                if moved || e.needs_metadata_refresh() {
                    *inner
                        .txn_coordinator
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = None;
                }
                backoff.wait().await;
            }
            Err(e) => return Err(e),
        }
    }
}

async fn coordinator(inner: &Inner) -> Result<Arc<Connection>> {
    let id = match inner.config.transactional_id.as_deref() {
        None => return inner.client.any_broker().await,
        Some(txn_id) => {
            let known = *inner
                .txn_coordinator
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match known {
                Some(id) => id,
                None => {
                    let id = inner
                        .client
                        .find_coordinator(txn_id, CoordinatorKind::Transaction)
                        .await?;
                    *inner
                        .txn_coordinator
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(id);
                    id
                }
            }
        }
    };
    inner.client.broker(id, ConnectionClass::Normal).await
}

/// Gets a producer id and epoch. With `current`, asks for the next epoch of
/// that producer id (KIP-360), which resets every partition's sequence.
pub(super) async fn init_producer_id(
    inner: &Inner,
    current: Option<(i64, i16)>,
) -> Result<(i64, i16)> {
    let txn_id = inner.config.transactional_id.clone();
    let resp = with_coordinator(inner, |conn| {
        let txn_id = txn_id.clone();
        async move {
            let mut req = InitProducerIdRequest::default()
                .with_transactional_id(txn_id.as_deref().map(|t| TransactionalId(str_bytes(t))))
                .with_transaction_timeout_ms(inner.config.transaction_timeout.as_millis() as i32);
            if conn.version::<InitProducerIdRequest>()? >= 3 {
                let (pid, epoch) = current.unwrap_or((-1, -1));
                req.producer_id = ProducerId(pid);
                req.producer_epoch = epoch;
            }
            let resp = conn.send(&req).await?;
            txn_error(inner, ApiKey::InitProducerId, resp.error_code, None)?;
            Ok(resp)
        }
    })
    .await?;
    info!(
        producer_id = resp.producer_id.0, epoch = resp.producer_epoch,
        transactional_id = ?inner.config.transactional_id, "producer id assigned"
    );
    Ok((resp.producer_id.0, resp.producer_epoch))
}

fn txn_id(inner: &Inner) -> Result<&str> {
    inner
        .config
        .transactional_id
        .as_deref()
        .ok_or_else(|| Error::Config("this producer has no transactional_id".into()))
}

/// Registers partitions with the current transaction before records go to them.
pub(super) async fn add_partitions(
    inner: &Inner,
    identity: (i64, i16),
    partitions: &[(Arc<str>, i32)],
) -> Result<()> {
    let id = txn_id(inner)?;
    let mut topics: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (t, p) in partitions {
        topics.entry(t).or_default().push(*p);
    }
    let req = AddPartitionsToTxnRequest::default()
        .with_v3_and_below_transactional_id(TransactionalId(str_bytes(id)))
        .with_v3_and_below_producer_id(ProducerId(identity.0))
        .with_v3_and_below_producer_epoch(identity.1)
        .with_v3_and_below_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    AddPartitionsToTxnTopic::default()
                        .with_name(TopicName(str_bytes(t)))
                        .with_partitions(ps)
                })
                .collect(),
        );
    with_coordinator(inner, |conn| {
        let req = &req;
        async move {
            let resp = conn.send(req).await?;
            for t in &resp.results_by_topic_v3_and_below {
                for p in &t.results_by_partition {
                    txn_error(
                        inner,
                        ApiKey::AddPartitionsToTxn,
                        p.partition_error_code,
                        Some(t.name.0.as_str()),
                    )?;
                }
            }
            Ok(())
        }
    })
    .await
}

/// Adds consumed offsets to the transaction: AddOffsetsToTxn to the
/// transaction coordinator, then TxnOffsetCommit to the group coordinator with
/// the member's generation (KIP-447: a zombie of an old generation is refused).
pub(super) async fn send_offsets(
    inner: &Inner,
    identity: (i64, i16),
    offsets: &[(TopicPartition, i64)],
    group: &GroupMetadata,
) -> Result<()> {
    let id = txn_id(inner)?;
    let add = AddOffsetsToTxnRequest::default()
        .with_transactional_id(TransactionalId(str_bytes(id)))
        .with_producer_id(ProducerId(identity.0))
        .with_producer_epoch(identity.1)
        .with_group_id(GroupId(str_bytes(&group.group_id)));
    with_coordinator(inner, |conn| {
        let add = &add;
        async move {
            let resp = conn.send(add).await?;
            txn_error(inner, ApiKey::AddOffsetsToTxn, resp.error_code, None)
        }
    })
    .await?;

    let mut topics: BTreeMap<&str, Vec<TxnOffsetCommitRequestPartition>> = BTreeMap::new();
    for (tp, offset) in offsets {
        topics.entry(&tp.topic).or_default().push(
            TxnOffsetCommitRequestPartition::default()
                .with_partition_index(tp.partition)
                .with_committed_offset(*offset)
                .with_committed_leader_epoch(-1),
        );
    }
    let commit = TxnOffsetCommitRequest::default()
        .with_transactional_id(TransactionalId(str_bytes(id)))
        .with_group_id(GroupId(str_bytes(&group.group_id)))
        .with_producer_id(ProducerId(identity.0))
        .with_producer_epoch(identity.1)
        .with_generation_id(group.generation_id)
        .with_member_id(str_bytes(&group.member_id))
        .with_group_instance_id(group.group_instance_id.as_deref().map(str_bytes))
        .with_topics(
            topics
                .into_iter()
                .map(|(t, ps)| {
                    TxnOffsetCommitRequestTopic::default()
                        .with_name(TopicName(str_bytes(t)))
                        .with_partitions(ps)
                })
                .collect(),
        );
    let client = &inner.client;
    let started = Instant::now();
    let mut backoff = client.config().backoff();
    loop {
        let attempt = async {
            let coordinator = client
                .find_coordinator(&group.group_id, CoordinatorKind::Group)
                .await?;
            let resp = client
                .broker(coordinator, ConnectionClass::Normal)
                .await?
                .send(&commit)
                .await?;
            for t in &resp.topics {
                for p in &t.partitions {
                    match ResponseError::try_from_code(p.error_code) {
                        Some(
                            c @ (ResponseError::IllegalGeneration
                            | ResponseError::UnknownMemberId
                            | ResponseError::FencedInstanceId),
                        ) => {
                            return Err(Error::CommitFailed {
                                group: group.group_id.clone(),
                                reason: format!(
                                "TxnOffsetCommit answered {c} for member {:?} of generation {}: \
                                     the group has rebalanced; abort the transaction",
                                group.member_id, group.generation_id
                            ),
                            })
                        }
                        _ => txn_error(
                            inner,
                            ApiKey::TxnOffsetCommit,
                            p.error_code,
                            Some(t.name.0.as_str()),
                        )?,
                    }
                }
            }
            Ok(())
        }
        .await;
        match attempt {
            Err(e) if retriable(&e) && started.elapsed() < client.config().retry_timeout => {
                debug!(error = %e, "TxnOffsetCommit retried");
                backoff.wait().await;
            }
            other => return other,
        }
    }
}

/// Ends the transaction: commit or abort (EndTxn).
pub(super) async fn end(inner: &Inner, identity: (i64, i16), commit: bool) -> Result<()> {
    let id = txn_id(inner)?;
    let req = EndTxnRequest::default()
        .with_transactional_id(TransactionalId(str_bytes(id)))
        .with_producer_id(ProducerId(identity.0))
        .with_producer_epoch(identity.1)
        .with_committed(commit);
    with_coordinator(inner, |conn| {
        let req = &req;
        async move {
            let resp = conn.send(req).await?;
            txn_error(inner, ApiKey::EndTxn, resp.error_code, None)
        }
    })
    .await
}
