//! Rebuilding a store from its changelog, and standbys that keep one warm.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strom_client::consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset, TopicPartition};
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
/// How long the log must stay quiet past the high watermark to count as read.
const QUIET: Duration = Duration::from_millis(300);

fn recovery_consumer(client: &Client) -> Consumer {
    Consumer::new(
        client.clone(),
        ConsumerConfig {
            fetch_max_wait: Duration::from_millis(100),
            ..ConsumerConfig::default()
        },
    )
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
fn add_changes(batch: &mut WriteBatch, records: Vec<ConsumerRecord>) -> Option<i64> {
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
/// the one it reflects (from the start for a fresh store) to the end of the log.
///
/// "The end" is the high watermark found at the start, used as a hint only:
/// reading goes on until the position is at or past it and the log has been
/// quiet for a moment, so a broker that under-reports the watermark loses
/// nothing. Progress is logged every few seconds.
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
        &RecoveryProgress::default(),
    )
    .await
}

/// [`recover`], counting into `progress` as it goes.
pub async fn recover_with_progress(
    client: &Client,
    store: Arc<dyn Store>,
    topic: &str,
    partition: i32,
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
    let mut consumer = recovery_consumer(client);
    consumer.assign([(tp.clone(), Offset::At(from))])?;
    progress
        .to_replay
        .store((high_watermark - from).max(0) as u64, Ordering::Relaxed);

    let mut batch = WriteBatch::default();
    let (mut replayed, mut last) = (0u64, reflected.unwrap_or(-1));
    let mut next_report = Instant::now() + Duration::from_secs(2);
    loop {
        let position = consumer.position(&tp).unwrap_or(from);
        let wait = if position >= high_watermark {
            QUIET
        } else {
            Duration::from_secs(30)
        };
        let records = match tokio::time::timeout(wait, consumer.poll()).await {
            Ok(records) => records?,
            Err(_) if position >= high_watermark => break,
            Err(_) => {
                return Err(StateError::Kafka(strom_client::Error::Disconnected {
                    broker: format!("leader of {tp}"),
                    reason: format!("no changelog records for {wait:?} at offset {position}, below the high watermark {high_watermark}"),
                }))
            }
        };
        replayed += records.len() as u64;
        if let Some(offset) = add_changes(&mut batch, records) {
            last = offset;
        }
        progress.replayed.store(replayed, Ordering::Relaxed);
        if batch.len() >= REPLAY_BATCH {
            apply(&store, std::mem::take(&mut batch), last, Durability::Fast).await?;
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
}

impl Standby {
    /// Starts tailing `topic`'s partition `partition` into `store`.
    pub fn start(client: &Client, store: Arc<dyn Store>, topic: &str, partition: i32) -> Standby {
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
                let mut consumer = recovery_consumer(&client);
                let start = reflected.map_or(Offset::Earliest, |o| Offset::At(o + 1));
                consumer.assign([(tp, start)])?;
                loop {
                    let records = tokio::select! {
                        r = consumer.poll() => r?,
                        _ = stopped.changed() => return Ok(()),
                    };
                    let mut batch = WriteBatch::default();
                    let last = add_changes(&mut batch, records).unwrap_or(-1);
                    apply(&store, batch, last, Durability::Fast).await?;
                    applied.store(last, Ordering::SeqCst);
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
        }
    }

    /// The changelog offset the standby has applied (-1 before any).
    pub fn applied_offset(&self) -> i64 {
        self.applied.load(Ordering::SeqCst)
    }

    /// The standby's store (read-only use while it tails).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Stops tailing and replays whatever is left, making the store ready to
    /// serve as the active one.
    pub async fn promote(self, client: &Client) -> Result<(Arc<dyn Store>, Recovery)> {
        let (topic, partition) = (self.topic.clone(), self.partition);
        let store = self.stop().await?;
        let recovery = recover(client, store.clone(), &topic, partition).await?;
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
