//! The sink: the producer's background task that turns ready batches into
//! ProduceRequests, one per broker at a time for every partition it leads, and
//! completes or retries batches from the responses.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::accumulator::{Outgoing, ProducerBatch};
use super::{Acks, Inner};
use crate::cluster::ConnectionClass;
use crate::error::{Error, Result};
use crate::records::BatchBuilder;

/// What a request task hands back: the batches it carried and how it went.
struct Sent {
    broker: i32,
    batches: Vec<Outgoing>,
    /// `None` for acks=0 (no response).
    response: Result<Option<ProduceResponse>>,
}

pub(super) async fn run(inner: Arc<Inner>) {
    let mut requests: JoinSet<Sent> = JoinSet::new();
    // Completions of the batches each request task carries, to fail them should
    // the task itself die.
    let mut carried: HashMap<tokio::task::Id, (i32, Vec<Outgoing>)> = HashMap::new();
    let mut in_flight: HashMap<i32, usize> = HashMap::new();
    let mut refresh: HashSet<Arc<str>> = HashSet::new();
    let mut last_refresh = Instant::now() - Duration::from_secs(60);
    let mut identity_retry_at: Option<Instant> = None;
    let mut identity_backoff = inner.client.config().backoff();
    loop {
        // A fenced producer fails everything that waits.
        if let Some(err) = inner.accumulator.fatal() {
            let waiting = inner.accumulator.take_waiting(|_, _| true);
            for out in waiting {
                fail(&inner, out, err.clone());
            }
        }
        // An idempotent producer needs its id (and, after a sequence error, a
        // new epoch) before anything is sent.
        let need_identity = {
            let control = inner.control();
            let plain_idempotent =
                inner.config.idempotence && inner.config.transactional_id.is_none();
            let missing = control.identity.is_none()
                && inner.accumulator.pending_batches() > 0
                && plain_idempotent;
            (missing || control.bump_epoch).then(|| control.identity.filter(|_| control.bump_epoch))
        };
        if let Some(current) = need_identity {
            if identity_retry_at.is_none_or(|t| t <= Instant::now()) {
                match super::txn::init_producer_id(&inner, current).await {
                    Ok(id) => {
                        let mut control = inner.control();
                        control.identity = Some(id);
                        control.bump_epoch = false;
                        identity_retry_at = None;
                        identity_backoff.reset();
                    }
                    Err(e @ Error::ProducerFenced { .. }) => inner.fence(e),
                    Err(e) => {
                        warn!(error = %e, "cannot get a producer id; retrying");
                        identity_retry_at = Some(Instant::now() + identity_backoff.next_delay());
                    }
                }
                continue;
            }
        }
        let now = Instant::now();
        let (deadline, sendable, expired, finished) = {
            let control = inner.control();
            let acc = &inner.accumulator;
            let force = control.flushes > 0 || control.closing;
            let deadline = acc.collect_ready(now, force);
            let expired = acc.take_expired(now, inner.config.delivery_timeout);
            let max = inner.config.max_in_flight;
            let mut topics = HashMap::new();
            let sendable = acc.take_sendable(&control, now, |topic, partition| {
                let meta = topics
                    .entry(topic.to_owned())
                    .or_insert_with(|| inner.client.cached_topic(topic));
                let leader = meta
                    .as_ref()
                    .and_then(|m| m.partitions.get(partition as usize))
                    .map(|p| p.leader)
                    .filter(|&l| l >= 0);
                match leader {
                    None => {
                        refresh.insert(Arc::from(topic));
                        None
                    }
                    Some(l) if in_flight.get(&l).copied().unwrap_or(0) >= max => None,
                    Some(l) => Some(l),
                }
            });
            let finished = control.closing && acc.pending_batches() == 0;
            (deadline, sendable, expired, finished)
        };
        let super::accumulator::Sendable {
            by_broker: sendable,
            to_add,
        } = sendable;
        for out in expired {
            let err = Error::DeliveryTimeout {
                topic: out.topic.to_string(),
                partition: out.partition,
                after: inner.config.delivery_timeout,
                last: Box::new(Error::Disconnected {
                    broker: "leader".into(),
                    reason: "no leader could be reached for the partition".into(),
                }),
            };
            fail(&inner, out, err);
        }
        for (broker, batches) in sendable {
            let busy = in_flight.get(&broker).copied().unwrap_or(0);
            let free = inner.config.max_in_flight.saturating_sub(busy).max(1);
            for batches in split_requests(batches, inner.config.max_request_size, free) {
                *in_flight.entry(broker).or_default() += 1;
                let completions = batches
                    .iter()
                    .map(|o| Outgoing {
                        topic: o.topic.clone(),
                        partition: o.partition,
                        batch: shadow(&o.batch),
                    })
                    .collect();
                let handle = requests.spawn(produce(inner.clone(), broker, batches));
                carried.insert(handle.id(), (broker, completions));
            }
        }
        if !to_add.is_empty() {
            let identity = inner.control().identity;
            if let Some(identity) = identity {
                match super::txn::add_partitions(&inner, identity, &to_add).await {
                    Ok(()) => inner.control().txn_partitions.extend(to_add),
                    Err(e @ Error::ProducerFenced { .. }) => inner.fence(e),
                    Err(e) => {
                        let waiting = inner.accumulator.take_waiting(|t, p| {
                            to_add.iter().any(|(tt, pp)| **tt == *t && *pp == p)
                        });
                        for out in waiting {
                            fail(&inner, out, e.clone());
                        }
                    }
                }
            }
            // Those partitions can go now: look again without waiting.
            continue;
        }
        if finished && requests.is_empty() {
            debug!("producer closed");
            return;
        }
        let mut next = deadline;
        if let Some(at) = identity_retry_at {
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        if !refresh.is_empty() {
            let backoff = inner.client.config().retry_backoff;
            if last_refresh.elapsed() >= backoff {
                last_refresh = Instant::now();
                let topics: Vec<Arc<str>> = refresh.drain().collect();
                let names: Vec<&str> = topics.iter().map(|t| &**t).collect();
                if let Err(e) = inner.client.refresh_metadata(&names).await {
                    debug!(error = %e, "metadata refresh for producer failed");
                }
                continue;
            }
            let at = last_refresh + backoff;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        tokio::select! {
            _ = inner.wake_sink.notified() => {}
            _ = sleep_until(next), if next.is_some() => {}
            Some(joined) = requests.join_next_with_id(), if !requests.is_empty() => {
                match joined {
                    Ok((id, sent)) => {
                        carried.remove(&id);
                        if let Some(n) = in_flight.get_mut(&sent.broker) {
                            *n -= 1;
                        }
                        handle_response(&inner, sent, &mut refresh);
                    }
                    Err(e) => {
                        // A request task died (it does not panic by design): fail
                        // its records rather than leave their futures hanging.
                        warn!(error = %e, "produce request task failed");
                        if let Some((broker, outs)) = carried.remove(&e.id()) {
                            if let Some(n) = in_flight.get_mut(&broker) {
                                *n -= 1;
                            }
                            for out in outs {
                                inner.accumulator.unmute(&out.topic, out.partition);
                                fail(&inner, out, Error::Closed("produce request task"));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The batches ready for one broker as requests of at most `max_bytes`
/// each (a bigger batch alone), no more than `slots` of them: what would
/// need more goes in the last one.
fn split_requests(batches: Vec<Outgoing>, max_bytes: usize, slots: usize) -> Vec<Vec<Outgoing>> {
    let mut requests: Vec<Vec<Outgoing>> = Vec::new();
    let mut size = 0;
    for out in batches {
        let bytes = out
            .batch
            .sealed
            .as_ref()
            .map_or_else(|| out.batch.builder.size(), |b| b.len());
        let full = requests.len() >= slots;
        match requests.last_mut() {
            Some(last) if size + bytes <= max_bytes || full => {
                size += bytes;
                last.push(out);
            }
            _ => {
                size = bytes;
                requests.push(vec![out]);
            }
        }
    }
    requests
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// A stand-in holding a batch's completion and accounting, kept by the sink while
/// the real batch travels with its request task.
fn shadow(b: &ProducerBatch) -> ProducerBatch {
    ProducerBatch {
        builder: BatchBuilder::new(0),
        completion: b.completion.clone(),
        reserved: b.reserved,
        spare: b.spare,
        records: b.records,
        created: b.created,
        sealed: None,
        identity: b.identity,
        retry_at: None,
        attempts: b.attempts,
    }
}

/// One request task: seal (compress) the batches that are not sealed yet, send
/// them to `broker` in one ProduceRequest, hand everything back.
async fn produce(inner: Arc<Inner>, broker: i32, mut batches: Vec<Outgoing>) -> Sent {
    let config = &inner.config;
    let mut seal_error = None;
    for out in &mut batches {
        if out.batch.sealed.is_none() {
            let identity = out.batch.identity.unwrap_or_default();
            // Sealed, the batch is kept once, as its bytes: a new epoch's
            // sequences are stamped onto them (`records::restamp`).
            let builder = std::mem::replace(&mut out.batch.builder, BatchBuilder::new(0));
            match builder.seal(config.compression, identity) {
                Ok(bytes) => out.batch.sealed = Some(bytes),
                // Not retriable: the batch fails, so its records are not needed.
                Err(e) => seal_error = Some(e),
            }
        }
    }
    if let Some(e) = seal_error {
        return Sent {
            broker,
            batches,
            response: Err(e),
        };
    }
    let response = send(&inner, broker, &batches).await;
    Sent {
        broker,
        batches,
        response,
    }
}

async fn send(inner: &Inner, broker: i32, batches: &[Outgoing]) -> Result<Option<ProduceResponse>> {
    let mut topics: Vec<TopicProduceData> = Vec::new();
    for out in batches {
        let data = PartitionProduceData::default()
            .with_index(out.partition)
            .with_records(out.batch.sealed.clone());
        match topics.iter_mut().find(|t| *t.name.0 == *out.topic) {
            Some(t) => t.partition_data.push(data),
            None => topics.push(
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(out.topic.to_string())))
                    .with_partition_data(vec![data]),
            ),
        }
    }
    let timeout = inner.client.config().connection.request_timeout;
    let req = ProduceRequest::default()
        .with_transactional_id(
            inner
                .config
                .transactional_id
                .clone()
                .map(|t| kafka_protocol::messages::TransactionalId(StrBytes::from_string(t))),
        )
        .with_acks(inner.config.acks.code())
        .with_timeout_ms(timeout.as_millis().min(i32::MAX as u128) as i32)
        .with_topic_data(topics);
    let conn = inner
        .client
        .broker(broker, ConnectionClass::Produce)
        .await?;
    if inner.config.acks == Acks::None {
        conn.send_without_response(&req).await?;
        return Ok(None);
    }
    conn.send(&req).await.map(Some)
}

fn handle_response(inner: &Inner, sent: Sent, refresh: &mut HashSet<Arc<str>>) {
    let Sent {
        batches, response, ..
    } = sent;
    let response = match response {
        Ok(r) => r,
        Err(e) => {
            for out in batches {
                retry_or_fail(inner, out, e.clone(), refresh);
            }
            inner.wake_sink.notify_one();
            return;
        }
    };
    let Some(response) = response else {
        for out in batches {
            inner.accumulator.unmute(&out.topic, out.partition);
            succeed(inner, out, -1);
        }
        return;
    };
    let mut results: HashMap<(&str, i32), (i16, i64, Option<&str>)> = HashMap::new();
    for t in &response.responses {
        for p in &t.partition_responses {
            results.insert(
                (t.name.0.as_str(), p.index),
                (
                    p.error_code,
                    p.base_offset,
                    p.error_message.as_ref().map(StrBytes::as_str),
                ),
            );
        }
    }
    let mut owned = Vec::with_capacity(batches.len());
    for out in batches {
        let result = results.get(&(&*out.topic, out.partition)).copied();
        owned.push((out, result.map(|(c, o, m)| (c, o, m.map(str::to_owned)))));
    }
    for (out, result) in owned {
        match result {
            // A duplicate is a batch the broker already has: delivered.
            Some((0 | 46, base, _)) => {
                inner.accumulator.unmute(&out.topic, out.partition);
                succeed(inner, out, base);
            }
            Some((code @ (45 | 47 | 59 | 90), _, message)) if inner.config.idempotence => {
                sequence_error(inner, out, code, message);
            }
            Some((code, _, message)) => {
                let code =
                    ResponseError::try_from_code(code).unwrap_or(ResponseError::Unknown(code));
                let err = Error::broker(
                    ApiKey::Produce,
                    code,
                    Some(&out.topic),
                    Some(out.partition),
                    message.as_deref(),
                );
                retry_or_fail(inner, out, err, refresh);
            }
            None => {
                let err = Error::Protocol {
                    broker: format!("leader of {}-{}", out.topic, out.partition),
                    what: "Produce response left out a partition it was sent".into(),
                };
                retry_or_fail(inner, out, err, refresh);
            }
        }
    }
    inner.wake_sink.notify_one();
}

/// OUT_OF_ORDER_SEQUENCE_NUMBER, INVALID_PRODUCER_EPOCH, UNKNOWN_PRODUCER_ID or
/// PRODUCER_FENCED for an idempotent producer, handled as the Java client does.
fn sequence_error(inner: &Inner, mut out: Outgoing, code: i16, message: Option<String>) {
    let code = ResponseError::try_from_code(code).unwrap_or(ResponseError::Unknown(code));
    let err = Error::broker(
        ApiKey::Produce,
        code,
        Some(&out.topic),
        Some(out.partition),
        message.as_deref(),
    );
    inner.accumulator.unmute(&out.topic, out.partition);
    let sent_under = out
        .batch
        .identity
        .map(|i| (i.producer_id, i.producer_epoch));
    let mut control = inner.control();
    let stale = sent_under.is_some() && sent_under != control.identity;
    let transactional = inner.config.transactional_id.is_some();
    match code {
        // Sent under an epoch that has since been bumped: sequence it anew.
        _ if stale && !transactional => {
            out.batch.identity = None;
            inner.accumulator.requeue(out);
        }
        ResponseError::ProducerFenced | ResponseError::InvalidProducerEpoch => {
            let fenced = Error::ProducerFenced {
                transactional_id: inner.config.transactional_id.clone(),
                reason: format!("Produce to {}-{} answered {code}", out.topic, out.partition),
            };
            drop(control);
            inner.fence(fenced.clone());
            fail(inner, out, fenced);
        }
        // The broker lost this producer's state or a sequence: outside a
        // transaction, bump the epoch (KIP-360) and send again from sequence 0.
        _ if !transactional => {
            warn!(topic = %out.topic, partition = out.partition, error = %err, "sequence error; bumping the producer epoch");
            control.bump_epoch = true;
            out.batch.identity = None;
            inner.accumulator.requeue(out);
        }
        // Inside a transaction the records cannot be resent safely: the
        // transaction has to abort.
        _ => {
            drop(control);
            fail(inner, out, err);
        }
    }
}

fn retry_or_fail(inner: &Inner, mut out: Outgoing, err: Error, refresh: &mut HashSet<Arc<str>>) {
    let config = &inner.config;
    let age = out.batch.created.elapsed();
    if !err.is_retriable() {
        inner.accumulator.unmute(&out.topic, out.partition);
        fail(inner, out, err);
        return;
    }
    if age >= config.delivery_timeout {
        inner.accumulator.unmute(&out.topic, out.partition);
        let e = Error::DeliveryTimeout {
            topic: out.topic.to_string(),
            partition: out.partition,
            after: config.delivery_timeout,
            last: Box::new(err),
        };
        fail(inner, out, e);
        return;
    }
    if err.needs_metadata_refresh() {
        inner.client.invalidate_topic(&out.topic);
        refresh.insert(out.topic.clone());
    }
    let config = inner.client.config();
    let backoff = crate::backoff::delay(
        config.retry_backoff,
        config.retry_backoff_max,
        out.batch.attempts,
    );
    out.batch.attempts += 1;
    out.batch.retry_at = Some(Instant::now() + backoff);
    debug!(topic = %out.topic, partition = out.partition, attempt = out.batch.attempts, error = %err, "retrying batch");
    inner.accumulator.requeue(out);
}

fn succeed(inner: &Inner, out: Outgoing, base_offset: i64) {
    out.batch.completion.complete(Ok(base_offset));
    release(inner, &out.batch);
}

fn fail(inner: &Inner, out: Outgoing, err: Error) {
    debug!(topic = %out.topic, partition = out.partition, error = %err, "batch failed");
    inner.transaction_failed(&err);
    out.batch.completion.complete(Err(err));
    release(inner, &out.batch);
}

fn release(inner: &Inner, batch: &ProducerBatch) {
    inner.accumulator.memory.add_permits(batch.reserved);
    if inner.accumulator.batch_done(batch) {
        inner.idle.notify_waiters();
    }
}
