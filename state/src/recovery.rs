//! Rebuilding a store from its changelog, and standbys that keep one warm.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use strom_client::consumer::{
    Consumer, ConsumerConfig, ConsumerRecord, IsolationLevel, Offset, TopicPartition,
};
use strom_client::{Client, OffsetSpec};
use tokio::sync::watch;
use tracing::info;

use crate::error::{Result, StateError};
use crate::store::{Durability, Store, WriteBatch};

/// What a recovery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// Changelog records applied.
    pub replayed: u64,
    /// The first offset read.
    pub from: i64,
    /// The changelog offset the store reflects afterwards (-1 if none).
    pub to: i64,
    /// The high watermark found at the start (a hint: see [`recover`]).
    pub high_watermark: i64,
}

/// Live progress of recoveries, for logs and a metrics endpoint: records
/// replayed so far and records expected (from the high watermark hint).
#[derive(Debug, Default)]
pub struct RecoveryProgress {
    /// Changelog records applied.
    pub replayed: std::sync::atomic::AtomicU64,
    /// Records expected to be replayed (a hint, see [`recover`]).
    pub to_replay: std::sync::atomic::AtomicU64,
}

/// Records applied per store transaction during replay.
const REPLAY_BATCH: usize = 20_000;
/// How long the log must stay quiet at its end to count as read.
const QUIET: Duration = Duration::from_millis(300);
/// How long replay may make no progress below the end before it fails.
const STALL: Duration = Duration::from_secs(30);
/// How often a standby (or a long replay) writes what it applied to disk:
/// bounds both what a promotion (or a replay) after a crash replays and the
/// memory redb keeps until a durable commit.
const STANDBY_DURABLE_EVERY: Duration = Duration::from_secs(5);

/// A consumer reading a changelog. An offset the log no longer has (its
/// start moved past it, or the topic was made anew) reads from the start:
/// nothing is skipped.
fn recovery_consumer(client: &Client, isolation: IsolationLevel) -> Consumer {
    Consumer::new(
        client.clone(),
        ConsumerConfig {
            fetch_max_wait: Duration::from_millis(100),
            isolation,
            auto_offset_reset: strom_client::consumer::AutoOffsetReset::Earliest,
            ..ConsumerConfig::default()
        },
    )
}

/// Where the log of `tp` ends for `consumer`, as its last fetch said: the
/// last stable offset when it reads committed records only (records of an
/// open transaction are not there yet), else the high watermark; -1 before
/// the first fetch.
fn log_end(consumer: &Consumer, tp: &TopicPartition, isolation: IsolationLevel) -> i64 {
    match isolation {
        IsolationLevel::ReadCommitted => consumer.last_stable_offset(tp),
        IsolationLevel::ReadUncommitted => consumer.high_watermark(tp),
    }
}

/// The changelog offset the store reflects, read off the async runtime (redb blocks).
async fn reflected_offset(store: &Arc<dyn Store>) -> Result<Option<i64>> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.changelog_offset())
        .await
        .map_err(|e| StateError::Codec {
            what: format!("store task failed: {e}"),
        })?
}

async fn apply(
    store: &Arc<dyn Store>,
    batch: WriteBatch,
    offset: i64,
    durability: Durability,
) -> Result<()> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.apply(&batch, Some(offset), durability))
        .await
        .map_err(|e| StateError::Codec {
            what: format!("store task failed: {e}"),
        })?
}

/// Adds changelog records to `batch` (a null value deletes its key); returns
/// the offset of the last one.
pub(crate) fn add_changes(batch: &mut WriteBatch, records: Vec<ConsumerRecord>) -> Option<i64> {
    let mut last = None;
    for r in records {
        if let Some(key) = r.key {
            match r.value {
                Some(v) => batch.put(key.to_vec(), v.to_vec()),
                None => batch.delete(key.to_vec()),
            }
        }
        last = Some(r.offset);
    }
    last
}

/// Replays `topic`'s partition `partition` into `store` from the offset after
/// the one it reflects (from the start for a fresh store) to the end of the
/// log, reading every record (see [`recover_with_progress`] for only
/// committed ones).
///
/// "The end" is where the last fetch response says the log ends, once the
/// log has been quiet there for a moment; the high watermark that ListOffsets
/// reports at the start is only a hint for progress reports (some brokers
/// under-report it). Progress is logged every few seconds.
pub async fn recover(
    client: &Client,
    store: Arc<dyn Store>,
    topic: &str,
    partition: i32,
) -> Result<Recovery> {
    recover_with_progress(
        client,
        store,
        topic,
        partition,
        IsolationLevel::ReadUncommitted,
        &RecoveryProgress::default(),
    )
    .await
}

/// [`recover`], reading with `isolation` and counting into `progress` as it
/// goes. With [`IsolationLevel::ReadCommitted`] (exactly-once) records of
/// aborted transactions are never applied, and replay ends at the last
/// stable offset: the records of a transaction still open are not there yet.
pub async fn recover_with_progress(
    client: &Client,
    store: Arc<dyn Store>,
    topic: &str,
    partition: i32,
    isolation: IsolationLevel,
    progress: &RecoveryProgress,
) -> Result<Recovery> {
    let started = Instant::now();
    let reflected = reflected_offset(&store).await?;
    let earliest = client
        .list_partition_offsets(topic, &[partition], OffsetSpec::Earliest)
        .await?;
    let latest = client
        .list_partition_offsets(topic, &[partition], OffsetSpec::Latest)
        .await?;
    let earliest = earliest.get(&partition).copied().unwrap_or(0);
    let high_watermark = latest.get(&partition).copied().unwrap_or(0);
    let from = reflected.map_or(earliest, |o| (o + 1).max(earliest));
    let tp = TopicPartition::new(topic, partition);
    let mut consumer = recovery_consumer(client, isolation);
    consumer.assign([(tp.clone(), Offset::At(from))])?;
    progress
        .to_replay
        .store((high_watermark - from).max(0) as u64, Ordering::Relaxed);

    let mut batch = WriteBatch::default();
    let (mut replayed, mut last) = (0u64, reflected.unwrap_or(-1));
    let mut next_report = Instant::now() + Duration::from_secs(2);
    // Written to disk now and then, so a replay killed midway resumes
    // where it was rather than from the start.
    let mut last_durable = Instant::now();
    let mut last_news = Instant::now();
    loop {
        let polled = tokio::time::timeout(Duration::from_millis(100), consumer.poll()).await;
        let position = consumer.position(&tp).unwrap_or(from);
        let end = log_end(&consumer, &tp, isolation);
        let records = match polled {
            // A lost connection or a moving leader: fetched again, until
            // replay stalls for too long (below).
            Ok(Err(e)) if e.is_retriable() && last_news.elapsed() < STALL => {
                tracing::debug!(%tp, error = %e, "replay fetch failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(records) => records?,
            Err(_) if end >= 0 && position >= end => {
                if last_news.elapsed() >= QUIET {
                    break;
                }
                continue;
            }
            Err(_) if last_news.elapsed() >= STALL => {
                return Err(StateError::Kafka(strom_client::Error::Disconnected {
                    broker: format!("leader of {tp}"),
                    reason: format!(
                        "no changelog records for {STALL:?} at offset {position}, below the end {end}"
                    ),
                }))
            }
            Err(_) => continue,
        };
        last_news = Instant::now();
        replayed += records.len() as u64;
        if let Some(offset) = add_changes(&mut batch, records) {
            last = offset;
        }
        progress.replayed.store(replayed, Ordering::Relaxed);
        if batch.len() >= REPLAY_BATCH {
            let durability = if last_durable.elapsed() >= STANDBY_DURABLE_EVERY {
                last_durable = Instant::now();
                Durability::Durable
            } else {
                Durability::Fast
            };
            apply(&store, std::mem::take(&mut batch), last, durability).await?;
        }
        if Instant::now() >= next_report {
            info!(%tp, replayed, to_replay = (high_watermark - from).max(0), "recovering");
            next_report += Duration::from_secs(2);
        }
    }
    if replayed > 0 {
        apply(&store, batch, last, Durability::Durable).await?;
    }
    info!(%tp, replayed, from, to = last, seconds = started.elapsed().as_secs_f64(), "recovered");
    Ok(Recovery {
        replayed,
        from,
        to: last,
        high_watermark,
    })
}

/// A store kept warm by tailing the changelog of a partition this worker does
/// not own, so that taking the partition over replays only the last few records.
#[derive(Debug)]
pub struct Standby {
    store: Arc<dyn Store>,
    applied: Arc<AtomicI64>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
    topic: String,
    partition: i32,
    isolation: IsolationLevel,
}

impl Standby {
    /// Starts tailing `topic`'s partition `partition` into `store`, reading
    /// with `isolation` (committed records only under exactly-once).
    pub fn start(
        client: &Client,
        store: Arc<dyn Store>,
        topic: &str,
        partition: i32,
        isolation: IsolationLevel,
    ) -> Standby {
        Self::start_observed(client, store, topic, partition, isolation, |_| {})
    }

    /// [`Standby::start`], calling `observe(offset)` after each batch of
    /// records it applies (with the offset of the last one).
    pub fn start_observed(
        client: &Client,
        store: Arc<dyn Store>,
        topic: &str,
        partition: i32,
        isolation: IsolationLevel,
        observe: impl Fn(i64) + Send + 'static,
    ) -> Standby {
        let (stop, mut stopped) = watch::channel(false);
        let applied = Arc::new(AtomicI64::new(-1));
        let task = tokio::spawn({
            let (client, store, applied, topic) = (
                client.clone(),
                store.clone(),
                applied.clone(),
                topic.to_owned(),
            );
            async move {
                let reflected = reflected_offset(&store).await?;
                applied.store(reflected.unwrap_or(-1), Ordering::SeqCst);
                let tp = TopicPartition::new(&topic, partition);
                let mut consumer = recovery_consumer(&client, isolation);
                let start = reflected.map_or(Offset::Earliest, |o| Offset::At(o + 1));
                consumer.assign([(tp, start)])?;
                let mut last_durable = Instant::now();
                let mut failing = false;
                loop {
                    let polled = tokio::select! {
                        r = consumer.poll() => r,
                        _ = stopped.changed() => return Ok(()),
                    };
                    let records = match polled {
                        Ok(records) => records,
                        // A lost connection, a moving leader, a cluster
                        // that does not answer for a while: the standby goes
                        // on reading once it answers again, as the worker's
                        // own consumer does (warned once per incident).
                        Err(e) if e.is_retriable() => {
                            if !failing {
                                tracing::warn!(%topic, partition, error = %e, "standby fetch failed; retrying");
                                failing = true;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    failing = false;
                    let mut batch = WriteBatch::default();
                    // Nothing to apply (only control records): an offset of
                    // -1 must not overwrite the one the store holds.
                    let Some(last) = add_changes(&mut batch, records) else {
                        continue;
                    };
                    let durability = if last_durable.elapsed() >= STANDBY_DURABLE_EVERY {
                        last_durable = Instant::now();
                        Durability::Durable
                    } else {
                        Durability::Fast
                    };
                    apply(&store, batch, last, durability).await?;
                    applied.store(last, Ordering::SeqCst);
                    observe(last);
                }
            }
        });
        Standby {
            store,
            applied,
            stop,
            task,
            topic: topic.to_owned(),
            partition,
            isolation,
        }
    }

    /// The changelog offset the standby has applied (-1 before any).
    pub fn applied_offset(&self) -> i64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// Whether it stopped tailing on its own, which only an error makes it
    /// do: [`Standby::stop`] returns the error.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// The standby's store (read-only use while it tails).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stops tailing and replays whatever is left, making the store ready to
    /// serve as the active one.
    pub async fn promote(self, client: &Client) -> Result<(Arc<dyn Store>, Recovery)> {
        let (topic, partition, isolation) = (self.topic.clone(), self.partition, self.isolation);
        let store = self.stop().await?;
        let progress = RecoveryProgress::default();
        let recovery = recover_with_progress(
            client,
            store.clone(),
            &topic,
            partition,
            isolation,
            &progress,
        )
        .await?;
        Ok((store, recovery))
    }

    /// Stops tailing; the store reflects what was applied so far.
    pub async fn stop(self) -> Result<Arc<dyn Store>> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result?,
            Err(e) => {
                return Err(StateError::Codec {
                    what: format!("standby task failed: {e}"),
                })
            }
        }
        Ok(self.store)
    }
}
