//! The fetcher: the consumer's background task. It resolves resets with
//! ListOffsets, keeps one Fetch in flight per broker while the buffer has room,
//! advances fetch positions from batch headers and passes each partition's bytes on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::debug;

use super::{bump, AutoOffsetReset, ConsumerConfig, Fetched, Handle, Offset, TopicPartition};
use crate::cluster::{Client, ConnectionClass};
use crate::error::{Error, Result};
use crate::types::OffsetSpec;

/// How far a partition's fetch size may grow when a broker that cuts
/// responses at the byte bounds (as before KIP-74) returned not even one
/// whole batch: past any batch a broker takes by default. The response
/// bound grows with it, even past `fetch_max_bytes`, or such a batch could
/// never be read.
const MAX_GROWN_FETCH: i32 = 256 << 20;

/// One partition of an outstanding Fetch: which epoch and offset it asked for.
struct Asked {
    tp: TopicPartition,
    epoch: u64,
    offset: i64,
    max_bytes: i32,
}

struct Done {
    broker: i32,
    asked: Vec<Asked>,
    response: Result<FetchResponse>,
}

pub(super) async fn run(
    client: Client,
    config: ConsumerConfig,
    handle: Arc<Handle>,
    tx: mpsc::UnboundedSender<Fetched>,
) {
    let mut fetches: JoinSet<Done> = JoinSet::new();
    let mut busy: HashSet<i32> = HashSet::new();
    let mut pause_until: Option<Instant> = None;
    let backoff = client.config().retry_backoff;
    loop {
        if handle.lock().closed || tx.is_closed() {
            fetches.abort_all();
            return;
        }
        let now = Instant::now();
        let ready = pause_until.is_none_or(|t| t <= now);
        if ready {
            pause_until = None;
            if let Err(e) = resolve_resets(&client, &handle, &tx).await {
                debug!(error = %e, "offset reset failed; retrying");
                pause_until = Some(Instant::now() + backoff);
            }
            let Plan {
                fetches: plan,
                stale,
                held,
            } = plan_fetches(&client, &config, &handle, &busy);
            if !stale.is_empty() {
                refresh(&client, stale).await;
            }
            for (broker, asked) in plan {
                busy.insert(broker);
                // While a partition of this broker waits for the consumer to
                // take up its slice, a Fetch must not sit out the whole
                // `fetch_max_wait` on the others' empty logs: the next one
                // could not include that partition until it returns.
                let max_wait = if held.contains(&broker) {
                    config.fetch_max_wait.min(HELD_MAX_WAIT)
                } else {
                    config.fetch_max_wait
                };
                fetches.spawn(fetch(
                    client.clone(),
                    config.clone(),
                    broker,
                    asked,
                    max_wait,
                ));
            }
        }
        tokio::select! {
            _ = handle.wake_fetcher.notified() => {}
            _ = tokio::time::sleep_until(pause_until.unwrap_or(now)), if pause_until.is_some() => {}
            Some(done) = fetches.join_next(), if !fetches.is_empty() => {
                // A fetch task that died has lost nothing: its partitions are
                // fetched again from the same positions once unmarked.
                match done {
                    Ok(done) => {
                        busy.remove(&done.broker);
                        if handle_done(&client, &config, &handle, &tx, done).await {
                            pause_until = Some(Instant::now() + backoff);
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "fetch task failed");
                        busy.clear();
                        for s in handle.lock().partitions.values_mut() {
                            s.in_flight = false;
                        }
                    }
                }
            }
        }
    }
}

async fn refresh(client: &Client, topics: HashSet<Arc<str>>) {
    let names: Vec<&str> = topics.iter().map(|t| &**t).collect();
    if let Err(e) = client.refresh_metadata(&names).await {
        debug!(error = %e, "metadata refresh for fetcher failed");
    }
}

/// Looks up start offsets for partitions whose position is not known yet.
async fn resolve_resets(
    client: &Client,
    handle: &Handle,
    tx: &mpsc::UnboundedSender<Fetched>,
) -> Result<()> {
    let mut wanted: BTreeMap<_, Vec<(i32, u64)>> = BTreeMap::new();
    for (tp, s) in handle.lock().partitions.iter() {
        if s.fetch_position.is_none() && !s.failed {
            let earliest = match s.reset {
                Offset::Earliest => true,
                Offset::Latest => false,
                Offset::At(_) => continue,
            };
            wanted
                .entry((tp.topic.clone(), earliest))
                .or_default()
                .push((tp.partition, s.epoch));
        }
    }
    for ((topic, earliest), parts) in wanted {
        let spec = if earliest {
            OffsetSpec::Earliest
        } else {
            OffsetSpec::Latest
        };
        let partitions: Vec<i32> = parts.iter().map(|(p, _)| *p).collect();
        let offsets = match client
            .list_partition_offsets(&topic, &partitions, spec)
            .await
        {
            Ok(o) => o,
            Err(e) if !e.is_retriable() => {
                let mut shared = handle.lock();
                for (p, epoch) in &parts {
                    let tp = TopicPartition {
                        topic: topic.clone(),
                        partition: *p,
                    };
                    if let Some(s) = shared.partitions.get_mut(&tp) {
                        s.failed = true;
                    }
                    let _ = tx.send(Fetched {
                        tp,
                        epoch: *epoch,
                        fetch_offset: 0,
                        aborted: Vec::new(),
                        result: Err(e.clone()),
                    });
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut shared = handle.lock();
        for (p, epoch) in parts {
            let tp = TopicPartition {
                topic: topic.clone(),
                partition: p,
            };
            if let (Some(s), Some(&o)) = (shared.partitions.get_mut(&tp), offsets.get(&p)) {
                if s.epoch == epoch {
                    debug!(%tp, offset = o, ?spec, "reset fetch position");
                    s.fetch_position = Some(o);
                    s.position = Some(o);
                }
            }
        }
    }
    Ok(())
}

/// The longest a Fetch waits for data while a partition of its broker is
/// held back (see [`Plan::held`]).
const HELD_MAX_WAIT: Duration = Duration::from_millis(10);

/// What to fetch now.
#[derive(Default)]
struct Plan {
    /// Per broker not already fetching: every partition it leads that is
    /// assigned, not paused, has a position and has no fetched slice waiting
    /// with the consumer.
    fetches: HashMap<i32, Vec<Asked>>,
    /// Topics whose leaders are unknown.
    stale: HashSet<Arc<str>>,
    /// Brokers leading a partition held back only by its slice waiting with
    /// the consumer: it is due as soon as the consumer takes the slice up.
    held: HashSet<i32>,
}

/// Plans the next fetches, while the buffer has room.
fn plan_fetches(
    client: &Client,
    config: &ConsumerConfig,
    handle: &Handle,
    busy: &HashSet<i32>,
) -> Plan {
    let mut plan = Plan::default();
    let mut shared = handle.lock();
    if shared.buffered >= config.max_buffered_bytes {
        return plan;
    }
    let mut topics = HashMap::new();
    for (tp, s) in shared.partitions.iter_mut() {
        if s.paused || s.failed || s.in_flight {
            continue;
        }
        let Some(offset) = s.fetch_position else {
            continue;
        };
        let meta = topics
            .entry(tp.topic.clone())
            .or_insert_with(|| client.cached_topic(&tp.topic));
        let leader = meta
            .as_ref()
            .and_then(|m| m.partitions.get(tp.partition as usize))
            .map(|p| p.leader)
            .filter(|&l| l >= 0);
        let Some(leader) = leader else {
            plan.stale.insert(tp.topic.clone());
            continue;
        };
        if s.slice_out == Some(s.epoch) {
            plan.held.insert(leader);
            continue;
        }
        if busy.contains(&leader) {
            continue;
        }
        s.in_flight = true;
        plan.fetches.entry(leader).or_default().push(Asked {
            tp: tp.clone(),
            epoch: s.epoch,
            offset,
            max_bytes: s.max_bytes,
        });
    }
    plan
}

async fn fetch(
    client: Client,
    config: ConsumerConfig,
    broker: i32,
    asked: Vec<Asked>,
    max_wait: Duration,
) -> Done {
    let mut topics: Vec<FetchTopic> = Vec::new();
    for a in &asked {
        let p = FetchPartition::default()
            .with_partition(a.tp.partition)
            .with_fetch_offset(a.offset)
            .with_current_leader_epoch(-1)
            .with_log_start_offset(-1)
            .with_partition_max_bytes(a.max_bytes);
        match topics.iter_mut().find(|t| *t.topic.0 == *a.tp.topic) {
            Some(t) => t.partitions.push(p),
            None => topics.push(
                FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(a.tp.topic.to_string())))
                    .with_partitions(vec![p]),
            ),
        }
    }
    let req = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(max_wait.as_millis() as i32)
        .with_min_bytes(config.fetch_min_bytes)
        .with_max_bytes(
            asked
                .iter()
                .map(|a| a.max_bytes)
                .fold(config.fetch_max_bytes, i32::max),
        )
        .with_isolation_level(match config.isolation {
            super::IsolationLevel::ReadUncommitted => 0,
            super::IsolationLevel::ReadCommitted => 1,
        })
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(topics);
    let timeout = client.config().connection.request_timeout + max_wait;
    let response = async {
        let conn = client.broker(broker, ConnectionClass::Fetch).await?;
        conn.send_with_timeout(&req, timeout).await
    }
    .await;
    Done {
        broker,
        asked,
        response,
    }
}

/// Applies a Fetch response. Returns true when the fetcher should back off
/// before fetching again (an error that a retry may cure).
async fn handle_done(
    client: &Client,
    config: &ConsumerConfig,
    handle: &Handle,
    tx: &mpsc::UnboundedSender<Fetched>,
    done: Done,
) -> bool {
    let response = match done.response {
        Ok(r) => r,
        Err(e) => {
            debug!(broker = done.broker, error = %e, "fetch failed");
            {
                let mut shared = handle.lock();
                for a in &done.asked {
                    if let Some(s) = shared.partitions.get_mut(&a.tp) {
                        s.in_flight = false;
                    }
                }
            }
            if e.needs_metadata_refresh() {
                let topics = done.asked.iter().map(|a| a.tp.topic.clone()).collect();
                refresh(client, topics).await;
            }
            return true;
        }
    };
    let mut data: HashMap<(&str, i32), _> = HashMap::new();
    for t in &response.responses {
        for p in &t.partitions {
            data.insert((t.topic.0.as_str(), p.partition_index), p);
        }
    }
    let mut back_off = false;
    let mut stale = HashSet::new();
    {
        let mut shared = handle.lock();
        for a in &done.asked {
            let p = data.get(&(&*a.tp.topic, a.tp.partition)).copied();
            let epoch_now = match shared.partitions.get_mut(&a.tp) {
                Some(s) => {
                    s.in_flight = false;
                    s.epoch
                }
                None => continue,
            };
            if epoch_now != a.epoch {
                continue; // sought elsewhere meanwhile
            }
            let Some(p) = p else { continue };
            let code = ResponseError::try_from_code(p.error_code);
            match code {
                None => {
                    let records = p.records.clone().unwrap_or_default();
                    // Records are slices of what they were decoded from, and
                    // a frame is a slice of the connection's read buffer,
                    // which holds other frames too: a partition's own copy
                    // lets all of that go now, instead of living as long as
                    // the last queued record of any partition fetched with it.
                    let records = Bytes::copy_from_slice(&records);
                    let next = next_offset(&records);
                    let Some(s) = shared.partitions.get_mut(&a.tp) else {
                        continue;
                    };
                    s.high_watermark = p.high_watermark;
                    s.last_stable_offset = if p.last_stable_offset >= 0 {
                        p.last_stable_offset
                    } else {
                        p.high_watermark
                    };
                    match next {
                        Some(next) => {
                            s.fetch_position = Some(next);
                            s.max_bytes = config.max_partition_fetch_bytes;
                            s.slice_out = Some(a.epoch);
                            shared.buffered += records.len();
                            let _ = tx.send(Fetched {
                                tp: a.tp.clone(),
                                epoch: a.epoch,
                                fetch_offset: a.offset,
                                aborted: p
                                    .aborted_transactions
                                    .iter()
                                    .flatten()
                                    .map(|t| (t.producer_id.0, t.first_offset))
                                    .collect(),
                                result: Ok(records),
                            });
                        }
                        None if !records.is_empty() => {
                            // Not even one whole batch fit: ask for more next time.
                            let most = config.fetch_max_bytes.max(MAX_GROWN_FETCH);
                            s.max_bytes = s.max_bytes.saturating_mul(2).min(most);
                            debug!(tp = %a.tp, max_bytes = s.max_bytes, "batch larger than the partition fetch size");
                        }
                        None => {}
                    }
                }
                Some(ResponseError::OffsetOutOfRange) => {
                    let epoch = bump(&mut shared);
                    let Some(s) = shared.partitions.get_mut(&a.tp) else {
                        continue;
                    };
                    let reset = match config.auto_offset_reset {
                        AutoOffsetReset::Earliest => Offset::Earliest,
                        AutoOffsetReset::Latest => Offset::Latest,
                        AutoOffsetReset::None => {
                            s.failed = true;
                            report(
                                tx,
                                a,
                                Error::OffsetOutOfRange {
                                    topic: a.tp.topic.to_string(),
                                    partition: a.tp.partition,
                                    offset: a.offset,
                                },
                            );
                            continue;
                        }
                    };
                    debug!(tp = %a.tp, offset = a.offset, ?reset, "offset out of range; resetting");
                    s.reset = reset;
                    s.fetch_position = None;
                    s.position = None;
                    s.epoch = epoch;
                    s.committed = None;
                }
                Some(code) => {
                    let err = Error::broker(
                        ApiKey::Fetch,
                        code,
                        Some(&a.tp.topic),
                        Some(a.tp.partition),
                        None,
                    );
                    if err.is_retriable() {
                        debug!(tp = %a.tp, error = %err, "retriable fetch error");
                        back_off = true;
                        if err.needs_metadata_refresh() {
                            client.invalidate_topic(&a.tp.topic);
                            stale.insert(a.tp.topic.clone());
                        }
                    } else {
                        if let Some(s) = shared.partitions.get_mut(&a.tp) {
                            s.failed = true;
                        }
                        report(tx, a, err);
                    }
                }
            }
        }
    }
    if !stale.is_empty() {
        refresh(client, stale).await;
    }
    back_off
}

/// Hands a partition's error to the consumer, which returns it from `poll`.
fn report(tx: &mpsc::UnboundedSender<Fetched>, asked: &Asked, err: Error) {
    let _ = tx.send(Fetched {
        tp: asked.tp.clone(),
        epoch: asked.epoch,
        fetch_offset: asked.offset,
        aborted: Vec::new(),
        result: Err(err),
    });
}

/// The offset after the last whole batch in `records`, from batch headers only.
fn next_offset(records: &Bytes) -> Option<i64> {
    let mut rest = &records[..];
    let mut next = None;
    while rest.len() >= crate::records::BATCH_HEADER_LEN {
        let base = i64::from_be_bytes(rest[0..8].try_into().ok()?);
        let len = i32::from_be_bytes(rest[8..12].try_into().ok()?);
        if len < 0 || rest.len() < 12 + len as usize {
            break;
        }
        let delta = i32::from_be_bytes(rest[23..27].try_into().ok()?);
        next = Some(base.saturating_add(delta as i64 + 1));
        rest = &rest[12 + len as usize..];
    }
    next
}
