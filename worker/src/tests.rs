//! Tests of the task state machine, the commit path and exactly-once, on the
//! in-memory cluster (`strom_client::mock`) with tokio's clock paused: no
//! broker, no sockets, no real sleeping.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use strom_client::consumer::ConsumerRecord;
use strom_client::mock::{Action, ApiKey, Call, MockCluster, ResponseError};
use strom_client::producer::ProducerRecord;
use strom_client::TopicPartition;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{
    Context, ErrorPolicy, ProcessFuture, ProcessingGuarantee, Processor, StoreKind, Worker,
    WorkerConfig, WorkerError,
};

const APP: &str = "app";
const CHANGELOG: &str = "app-counts-changelog";

type Behaviour = Arc<dyn Fn(Context, ConsumerRecord) -> ProcessFuture<'static> + Send + Sync>;

/// An agent of topic `in` made of a closure.
struct Agent {
    concurrency: usize,
    policy: Option<ErrorPolicy>,
    behave: Behaviour,
}

impl Processor for Agent {
    fn topic(&self) -> &str {
        "in"
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        (self.behave)(ctx, record)
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn error_policy(&self) -> Option<&ErrorPolicy> {
        self.policy.as_ref()
    }
}

/// Counts each value in table `counts` and sends the new count to `out`
/// (key: the value, value: the count in decimal).
fn counter() -> Agent {
    Agent {
        concurrency: 1,
        policy: None,
        behave: Arc::new(|ctx, record| {
            Box::pin(async move {
                let key = record.value.clone().unwrap_or_default().to_vec();
                let n = ctx
                    .update("counts", key.clone(), |old| {
                        let n = old
                            .map_or(0, |b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
                            + 1;
                        Ok::<_, String>((n.to_be_bytes().to_vec(), n))
                    })
                    .await??;
                let count = n.to_string();
                ctx.send(ProducerRecord::to("out").key(&key).value(count.as_bytes()))
                    .await?;
                Ok(())
            })
        }),
    }
}

fn config(cluster: &MockCluster, guarantee: ProcessingGuarantee) -> WorkerConfig {
    let mut config = WorkerConfig::new(APP, ["unused"]);
    config.client = cluster.client_config();
    config.store = StoreKind::Memory;
    config.session_timeout = Duration::from_secs(6);
    config.heartbeat_interval = Duration::from_secs(1);
    config.state_dir = std::env::temp_dir().join(format!(
        "strom-worker-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    config.commit_interval = Duration::from_millis(100);
    if guarantee == ProcessingGuarantee::ExactlyOnce {
        config = config.exactly_once();
    }
    config
}

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Runs the worker until the sender fires.
fn start(
    config: WorkerConfig,
    agent: Agent,
) -> (
    oneshot::Sender<()>,
    JoinHandle<Result<(), WorkerError>>,
    crate::Metrics,
) {
    let worker = Worker::new(config)
        .table("counts")
        .processor(Arc::new(agent));
    let metrics = worker.metrics().clone();
    let (stop, run) = spawn(worker);
    (stop, run, metrics)
}

/// Runs `worker` until the sender fires.
fn spawn(worker: Worker) -> (oneshot::Sender<()>, JoinHandle<Result<(), WorkerError>>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let run = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    (stop, run)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..6_000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened within 60 s: {what}");
}

/// The worker's outcome within `limit` (of tokio's clock).
async fn outcome(
    run: JoinHandle<Result<(), WorkerError>>,
    limit: Duration,
) -> Result<(), WorkerError> {
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("the worker did not stop within {limit:?}"))
        .unwrap_or_else(|e| panic!("the worker panicked: {e}"))
}

fn cluster() -> MockCluster {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cluster = MockCluster::new();
    cluster.create_topic("in", 2);
    cluster.create_topic("out", 2);
    cluster
}

/// The committed `out` records of `cluster`: every count sent per key.
fn committed_counts(cluster: &MockCluster) -> BTreeMap<String, Vec<u64>> {
    let mut counts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for p in 0..2 {
        for r in cluster.records("out", p) {
            if r.committed != Some(true) {
                continue;
            }
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let n = String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
                .parse()
                .unwrap_or_else(|e| panic!("count of {key:?} is not a number: {e}"));
            counts.entry(key).or_default().push(n);
        }
    }
    counts
}

/// A partition whose table cannot restore (its changelog fetch never
/// answers) delays neither the commits of the other partition nor the
/// worker's shutdown: a revoke during restoration returns at once.
#[tokio::test(start_paused = true)]
async fn a_restoring_partition_does_not_delay_the_others() {
    let cluster = cluster();
    let stuck = TopicPartition::new(CHANGELOG, 0);
    cluster.set_hook(move |call: &Call| {
        if call.api == ApiKey::Fetch && call.partitions.contains(&stuck) {
            Action::Hang
        } else {
            Action::Answer
        }
    });
    let (stop, run, metrics) = start(
        config(&cluster, ProcessingGuarantee::AtLeastOnce),
        counter(),
    );
    for word in ["a", "b", "c", "d", "e"] {
        cluster.append("in", 1, None, Some(word.as_bytes()));
    }
    cluster.append("in", 0, None, Some(b"never"));
    wait_until("partition 1 commits", || {
        cluster.committed(APP, "in", 1) == Some(5)
    })
    .await;
    let text = metrics.render();
    assert!(
        text.contains("strom_partition_ready{partition=\"0\"} 0"),
        "partition 0 is not restoring:\n{text}"
    );
    assert_eq!(
        cluster.committed(APP, "in", 0),
        None,
        "partition 0 committed while restoring"
    );
    let asked = tokio::time::Instant::now();
    let _ = stop.send(());
    outcome(run, Duration::from_secs(5)).await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "shutdown waited {:?} for the restoring partition",
        asked.elapsed()
    );
}

/// A fatal group error (the coordinator refuses the session timeout) stops
/// the worker with that error instead of being retried forever.
#[tokio::test(start_paused = true)]
async fn a_fatal_group_error_stops_the_worker() {
    let cluster = cluster();
    cluster.set_hook(|call: &Call| match call.api {
        ApiKey::JoinGroup => Action::Fail(ResponseError::InvalidSessionTimeout),
        _ => Action::Answer,
    });
    let (_stop, run, _) = start(
        config(&cluster, ProcessingGuarantee::AtLeastOnce),
        counter(),
    );
    let err = outcome(run, Duration::from_secs(30)).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::Client(e) if e.is_fatal()),
        "not the fatal group error: {err}"
    );
}

/// A one-record batch of `value` whose codec bits say 5 (no client knows
/// it); with `fix_crc` the CRC is made valid again, so only the codec is
/// wrong and the header can be trusted.
fn undecodable_batch(value: &[u8], fix_crc: bool) -> bytes::Bytes {
    let mut b = strom_client::records::BatchBuilder::new(64);
    b.push(0, None, Some(value), &[]);
    let sealed = b
        .seal(
            strom_client::Compression::None,
            strom_client::records::ProducerIdentity::default(),
        )
        .unwrap();
    let mut damaged = bytes::BytesMut::from(&sealed[..]);
    damaged[22] = 5; // the codec bits of the attributes
    if fix_crc {
        let crc = crc32c::crc32c(&damaged[21..]);
        damaged[17..21].copy_from_slice(&crc.to_be_bytes());
    }
    damaged.freeze()
}

/// `word`, a batch that does not decode, then `after`, on partition 0 of
/// `in`; returns the bad batch's offset.
fn words_around_a_bad_batch(cluster: &MockCluster, fix_crc: bool) -> i64 {
    cluster.append("in", 0, None, Some(b"word"));
    let bad = cluster.append_raw("in", 0, undecodable_batch(b"lost", fix_crc));
    cluster.append("in", 0, None, Some(b"after"));
    bad
}

/// `word` on partition 0 of `in`, waited for until the running worker has
/// committed it, then a batch that does not decode and `after`; returns the
/// bad batch's offset. (Whether a commit falls between a record and a bad
/// batch fetched with it is a matter of timing: this one is certain.)
async fn bad_batch_after_a_committed_word(cluster: &MockCluster, fix_crc: bool) -> i64 {
    cluster.append("in", 0, None, Some(b"word"));
    for _ in 0..600 {
        if cluster.committed(APP, "in", 0) == Some(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cluster.committed(APP, "in", 0),
        Some(1),
        "the word not committed"
    );
    let bad = cluster.append_raw("in", 0, undecodable_batch(b"lost", fix_crc));
    cluster.append("in", 0, None, Some(b"after"));
    bad
}

fn counter_with(policy: ErrorPolicy) -> Agent {
    Agent {
        policy: Some(policy),
        ..counter()
    }
}

/// A batch that does not decode (a codec id no client knows, under a valid
/// CRC) is fetched again, counted in the metrics, and then, under the Stop
/// policy, stops the worker with its coordinates; the records before it are
/// processed and committed, it is not.
#[tokio::test(start_paused = true)]
async fn a_batch_that_does_not_decode_stops_a_worker_under_the_stop_policy() {
    let cluster = cluster();
    let config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    let (_stop, run, metrics) = start(config, counter_with(ErrorPolicy::Stop));
    let bad = bad_batch_after_a_committed_word(&cluster, true).await;
    let err = outcome(run, Duration::from_secs(60)).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::CorruptBatch { topic, partition: 0, offset, attempts: 3, .. }
            if topic == "in" && *offset == bad),
        "not the corrupt batch: {err}"
    );
    assert!(err.to_string().contains("codec 5 is unknown"), "{err}");
    assert_eq!(
        cluster.committed(APP, "in", 0),
        Some(bad),
        "the record before it is committed"
    );
    let text = metrics.render();
    assert!(
        text.contains(r#"strom_corrupt_batches_total{topic="in",partition="0"} 3"#),
        "{text}"
    );
}

/// Under the Skip policy the batch is stepped over after its fetches: the
/// records after it are processed and the committed offset moves past it.
#[tokio::test(start_paused = true)]
async fn a_batch_that_does_not_decode_is_stepped_over_under_the_skip_policy() {
    let cluster = cluster();
    let bad = words_around_a_bad_batch(&cluster, true);
    let config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    let (stop, run, metrics) = start(config, counter_with(ErrorPolicy::Skip));
    wait_until("the record after it is committed", || {
        cluster.committed(APP, "in", 0) == Some(bad + 2)
    })
    .await;
    let counts = committed_counts(&cluster);
    assert_eq!(counts.get("after"), Some(&vec![1]), "{counts:?}");
    assert_eq!(counts.get("lost"), None, "{counts:?}");
    let _ = stop.send(());
    outcome(run, Duration::from_secs(10)).await.unwrap();
    assert!(metrics
        .render()
        .contains(r#"strom_corrupt_batches_total{topic="in",partition="0"} 3"#));
}

/// Under the dead-letter policy, exactly once: one dead letter carries the
/// batch's coordinates, it is committed with the offsets past the batch, and
/// processing goes on.
#[tokio::test(start_paused = true)]
async fn a_batch_that_does_not_decode_is_dead_lettered_with_its_coordinates() {
    let cluster = cluster();
    cluster.create_topic("dlq", 1);
    let bad = words_around_a_bad_batch(&cluster, true);
    let config = config(&cluster, ProcessingGuarantee::ExactlyOnce);
    let (stop, run, _metrics) = start(config, counter_with(ErrorPolicy::DeadLetter("dlq".into())));
    wait_until("the record after it is committed", || {
        cluster.committed(APP, "in", 0) == Some(bad + 2)
    })
    .await;
    let letters: Vec<_> = cluster
        .records("dlq", 0)
        .into_iter()
        .filter(|r| r.committed == Some(true))
        .collect();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let header = |name: &str| {
        letters[0]
            .headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("strom.error.topic").as_deref(), Some("in"));
    assert_eq!(header("strom.error.partition").as_deref(), Some("0"));
    assert_eq!(header("strom.error.offset"), Some(bad.to_string()));
    assert_eq!(header("strom.error.last_offset"), Some(bad.to_string()));
    assert!(header("strom.error.message").is_some_and(|m| m.contains("codec 5")));
    assert_eq!(committed_counts(&cluster).get("after"), Some(&vec![1]));
    let _ = stop.send(());
    outcome(run, Duration::from_secs(10)).await.unwrap();
}

/// A batch whose header is damaged too (its CRC does not match) cannot be
/// stepped over, since its offsets are unknown: even under Skip the worker
/// stops, committing nothing past the records before it.
#[tokio::test(start_paused = true)]
async fn a_batch_with_a_damaged_header_stops_the_worker_even_under_skip() {
    let cluster = cluster();
    let config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    let (_stop, run, _metrics) = start(config, counter_with(ErrorPolicy::Skip));
    let bad = bad_batch_after_a_committed_word(&cluster, false).await;
    let err = outcome(run, Duration::from_secs(60)).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::CorruptBatch { offset, .. } if *offset == bad),
        "{err}"
    );
    assert!(err.to_string().contains("cannot be stepped over"), "{err}");
    assert_eq!(cluster.committed(APP, "in", 0), Some(bad));
}

/// A stored value that does not decode is damaged state, not the agent's
/// error: even under Skip the worker stops at that event without committing
/// it, and the redb store is marked so its next open moves it aside.
#[tokio::test(start_paused = true)]
async fn a_stored_value_that_does_not_decode_stops_the_worker_and_marks_the_store() {
    let cluster = cluster();
    let mut config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    config.store = StoreKind::Redb;
    let state_dir = config.state_dir.clone();
    let agent = Agent {
        concurrency: 1,
        policy: Some(ErrorPolicy::Skip),
        behave: Arc::new(|ctx, record| {
            Box::pin(async move {
                let key = b"word".to_vec();
                if record.value.as_deref() == Some(&b"damage"[..]) {
                    ctx.put("counts", key, b"xx".to_vec()).await?;
                    return Ok(());
                }
                let stored = ctx.get("counts", &key).await?.unwrap_or_default();
                if stored.len() != 8 {
                    return Err(ctx.damaged("counts", &key, "not 8 bytes").await.into());
                }
                Ok(())
            })
        }),
    };
    cluster.append("in", 0, None, Some(b"damage"));
    let read = cluster.append("in", 0, None, Some(b"read"));
    let (_stop, run, _metrics) = start(config, agent);
    let err = outcome(run, Duration::from_secs(30)).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::DamagedState { table, partition: 0, .. } if table == "counts"),
        "{err}"
    );
    assert!(
        cluster.committed(APP, "in", 0) <= Some(read),
        "the damaged event was committed"
    );
    let marker = strom_state::redb_store::store_path(&state_dir, "counts", 0);
    let marker = std::path::PathBuf::from(format!("{}.damaged", marker.display()));
    assert!(marker.exists(), "{} is missing", marker.display());
    std::fs::remove_dir_all(state_dir).ok();
}

/// A source topic that gains partitions under a stateful app stops the
/// worker with an error saying why (the keys would leave their state), and
/// nothing after the change is processed into the wrong partition's table.
#[tokio::test(start_paused = true)]
async fn a_stateful_worker_stops_when_its_source_gains_partitions() {
    let cluster = cluster();
    let mut config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    config.client.metadata_max_age = Duration::from_secs(5);
    cluster.append("in", 0, None, Some(b"word"));
    let (_stop, run, _metrics) = start(config, counter());
    wait_until("the first count", || {
        !cluster.records("out", 0).is_empty() || !cluster.records("out", 1).is_empty()
    })
    .await;
    cluster.create_partitions("in", 3);
    let err = outcome(run, Duration::from_secs(30)).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(r#"source topic "in" now has 3 partitions, not 2"#) && text.contains("reset"),
        "{text}"
    );
}

/// A send that keeps failing (the output topic's metadata never comes: three
/// request timeouts) is not the agent's error: even under the skip
/// policy the worker stops, and the event is not committed.
#[tokio::test(start_paused = true)]
async fn a_send_failing_three_times_stops_the_worker_without_committing() {
    let cluster = cluster();
    cluster.set_hook(|call: &Call| {
        if call.api == ApiKey::Metadata && call.topics.iter().any(|t| t == "out") {
            Action::Hang
        } else {
            Action::Answer
        }
    });
    let mut config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    config.client.retry_timeout = Duration::from_secs(2);
    config.client.connection.request_timeout = Duration::from_secs(5);
    let (_stop, run, _) = start(config, counter());
    cluster.append("in", 0, None, Some(b"word"));
    let err = outcome(run, Duration::from_secs(120)).await.unwrap_err();
    assert!(
        matches!(&err, WorkerError::Framework { attempts: 3, what, .. } if what == "a send"),
        "not a send failing three times: {err}"
    );
    assert_eq!(
        cluster.committed(APP, "in", 0),
        None,
        "the failed event was committed"
    );
}

/// With `concurrency(4)` and the stop policy, four (and more) failing events
/// end the worker with the agent's error; nothing hangs.
#[tokio::test(start_paused = true)]
async fn failing_concurrent_events_under_stop_end_the_worker() {
    let cluster = cluster();
    let agent = Agent {
        concurrency: 4,
        policy: Some(ErrorPolicy::Stop),
        behave: Arc::new(|_, record| {
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Err(format!("refused {}", record.offset).into())
            })
        }),
    };
    let (_stop, run, _) = start(config(&cluster, ProcessingGuarantee::AtLeastOnce), agent);
    for i in 0..8 {
        cluster.append("in", 0, None, Some(format!("{i}").as_bytes()));
    }
    let err = outcome(run, Duration::from_secs(30)).await.unwrap_err();
    assert!(
        matches!(err, WorkerError::Agent { partition: 0, .. }),
        "{err}"
    );
    assert_eq!(cluster.committed(APP, "in", 0), None);
}

/// Concurrent events updating one key lose no update: `Context::update` is
/// atomic per partition.
#[tokio::test(start_paused = true)]
async fn concurrent_updates_of_one_key_lose_nothing() {
    let cluster = cluster();
    let mut agent = counter();
    agent.concurrency = 8;
    let (stop, run, _) = start(config(&cluster, ProcessingGuarantee::AtLeastOnce), agent);
    for _ in 0..40 {
        cluster.append("in", 0, None, Some(b"same"));
    }
    wait_until("all 40 committed", || {
        cluster.committed(APP, "in", 0) == Some(40)
    })
    .await;
    let _ = stop.send(());
    outcome(run, Duration::from_secs(10)).await.unwrap();
    let mut counts = committed_counts(&cluster)
        .remove("same")
        .unwrap_or_default();
    counts.sort_unstable();
    assert_eq!(counts, (1..=40).collect::<Vec<_>>());
}

/// Exactly once: when a transaction cannot commit (TxnOffsetCommit refused
/// twice), it aborts, the tasks forget their uncommitted table writes and
/// read again from the last commit: the committed output holds each count
/// exactly once, 1..=n, and the aborted records are there but never
/// committed.
#[tokio::test(start_paused = true)]
async fn an_aborted_transaction_is_processed_again_exactly_once() {
    let cluster = cluster();
    let refusals = Arc::new(AtomicUsize::new(0));
    let r = refusals.clone();
    cluster.set_hook(move |call: &Call| {
        let refuse = call.api == ApiKey::TxnOffsetCommit
            && r.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < 2).then_some(n + 1)
            })
            .is_ok();
        if refuse {
            Action::Fail(ResponseError::IllegalGeneration)
        } else {
            Action::Answer
        }
    });
    let (stop, run, metrics) = start(
        config(&cluster, ProcessingGuarantee::ExactlyOnce),
        counter(),
    );
    // A word keeps to one partition, as a table's key does.
    for i in 0..30 {
        let word = ["x", "y", "z"][i % 3];
        cluster.append("in", i32::from(word == "z"), None, Some(word.as_bytes()));
    }
    wait_until("everything committed", || {
        cluster.committed(APP, "in", 0) == Some(20) && cluster.committed(APP, "in", 1) == Some(10)
    })
    .await;
    let _ = stop.send(());
    outcome(run, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        refusals.load(Ordering::SeqCst),
        2,
        "the refusals never happened"
    );
    let text = metrics.render();
    assert!(
        text.contains("strom_aborted_transactions_total 2"),
        "two aborts not counted:\n{text}"
    );
    let aborted = (0..2)
        .flat_map(|p| cluster.records("out", p))
        .filter(|r| r.committed == Some(false))
        .count();
    assert!(
        aborted > 0,
        "no aborted output: the transactions aborted before sending anything"
    );
    for (word, counts) in committed_counts(&cluster) {
        assert_eq!(counts, (1..=10).collect::<Vec<_>>(), "counts of {word:?}");
    }
    // The changelog's committed records end at the true counts too.
    for p in 0..2 {
        let mut last = BTreeMap::new();
        for r in cluster.records(CHANGELOG, p) {
            if r.committed == Some(true) {
                last.insert(r.key.clone(), r.value.clone());
            }
        }
        for (key, value) in last {
            let n = u64::from_be_bytes(
                value
                    .unwrap_or_default()
                    .as_ref()
                    .try_into()
                    .unwrap_or_default(),
            );
            assert_eq!(n, 10, "changelog count of {key:?}");
        }
    }
}

/// Per partition, the events held back: (offset, value).
type Held = std::sync::Mutex<BTreeMap<i32, Vec<(i64, Vec<u8>)>>>;

/// Holds events of a partition until it has three, then sends their values
/// joined to `batches` (a minimal `take(3, …)`); fails on the value `bad`.
struct Batcher {
    held: Held,
    policy: ErrorPolicy,
}

impl Processor for Batcher {
    fn topic(&self) -> &str {
        "in"
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        let value = record.value.clone().unwrap_or_default().to_vec();
        if value == b"bad" {
            return Box::pin(async { Err("bad event".into()) });
        }
        let full = {
            let mut held = self.held.lock().unwrap();
            let batch = held.entry(ctx.partition()).or_default();
            batch.push((record.offset, value));
            (batch.len() == 3).then(|| std::mem::take(batch))
        };
        Box::pin(async move {
            if let Some(batch) = full {
                let joined: Vec<u8> = batch
                    .iter()
                    .flat_map(|(_, v)| v.iter().copied().chain([b',']))
                    .collect();
                ctx.send(
                    ProducerRecord::to("batches")
                        .partition(ctx.partition())
                        .value(&joined),
                )
                .await?;
            }
            Ok(())
        })
    }

    fn held_from(&self, partition: i32) -> Option<i64> {
        let held = self.held.lock().unwrap();
        held.get(&partition)
            .and_then(|b| b.first().map(|(o, _)| *o))
    }

    fn error_policy(&self) -> Option<&ErrorPolicy> {
        Some(&self.policy)
    }

    fn reset(&self, partition: i32) {
        self.held.lock().unwrap().remove(&partition);
    }
}

/// Exactly once, across an aborted transaction: batches held back are
/// emptied and built again from the re-read events (each event in exactly
/// one committed batch, nothing committed past a held event), a dead letter
/// is part of the transaction (exactly one committed per bad event), and a
/// timer's send returns once its transaction committed.
#[tokio::test(start_paused = true)]
async fn dead_letters_held_batches_and_timers_are_exactly_once() {
    let cluster = cluster();
    cluster.create_topic("batches", 2);
    cluster.create_topic("dead", 2);
    cluster.create_topic("ticks", 1);
    let refusals = Arc::new(AtomicUsize::new(0));
    let r = refusals.clone();
    cluster.set_hook(move |call: &Call| {
        let refuse = call.api == ApiKey::TxnOffsetCommit
            && r.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < 2).then_some(n + 1)
            })
            .is_ok();
        if refuse {
            Action::Fail(ResponseError::IllegalGeneration)
        } else {
            Action::Answer
        }
    });
    let ticks = Arc::new(AtomicUsize::new(0));
    let t = ticks.clone();
    let timer = crate::Timer {
        name: "tick".into(),
        schedule: crate::Schedule::Every(Duration::from_millis(250)),
        on_leader: false,
        run: Arc::new(move |ctx| {
            let t = t.clone();
            Box::pin(async move {
                ctx.send(ProducerRecord::to("ticks").partition(0).value(b"tick"))
                    .await?;
                t.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        }),
    };
    let agent = Batcher {
        held: std::sync::Mutex::new(BTreeMap::new()),
        policy: ErrorPolicy::DeadLetter("dead".into()),
    };
    let worker = Worker::new(config(&cluster, ProcessingGuarantee::ExactlyOnce))
        .processor(Arc::new(agent))
        .timer(timer);
    let (stop, run) = spawn(worker);
    // Partition 0: 9 good events and one bad; partition 1: 4 good (one held).
    for v in ["a", "b", "bad", "c", "d", "e", "f", "g", "h", "i"] {
        cluster.append("in", 0, None, Some(v.as_bytes()));
    }
    for v in ["p", "q", "r", "s"] {
        cluster.append("in", 1, None, Some(v.as_bytes()));
    }
    wait_until("partition 0 committed", || {
        cluster.committed(APP, "in", 0) == Some(10)
    })
    .await;
    wait_until("three ticks", || ticks.load(Ordering::SeqCst) >= 3).await;
    assert_eq!(
        cluster.committed(APP, "in", 1),
        Some(3),
        "committed past the event still held back"
    );
    let _ = stop.send(());
    outcome(run, Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        refusals.load(Ordering::SeqCst),
        2,
        "the refusals never happened"
    );
    let committed = |topic: &str, p: i32| -> Vec<String> {
        cluster
            .records(topic, p)
            .into_iter()
            .filter(|r| r.committed == Some(true))
            .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
            .collect()
    };
    assert_eq!(committed("batches", 0), ["a,b,c,", "d,e,f,", "g,h,i,"]);
    assert_eq!(committed("batches", 1), ["p,q,r,"]);
    // A dead letter keeps the event's key (none here): any partition.
    let dead: Vec<String> = (0..2).flat_map(|p| committed("dead", p)).collect();
    assert_eq!(dead, ["bad"], "committed dead letters");
    let aborted = ["batches", "dead"]
        .iter()
        .flat_map(|t| (0..2).flat_map(|p| cluster.records(t, p)))
        .filter(|r| r.committed == Some(false))
        .count();
    assert!(
        aborted > 0,
        "nothing was aborted: the refusals came before any send"
    );
    // Every tick the timer saw return is committed.
    assert!(committed("ticks", 0).len() >= ticks.load(Ordering::SeqCst));
}

/// Looks each `in` value up in global table `profiles` and sends what it
/// found (or `-`) to `out`.
fn looker() -> Agent {
    Agent {
        concurrency: 1,
        policy: None,
        behave: Arc::new(|ctx, record| {
            Box::pin(async move {
                let key = record.value.clone().unwrap_or_default();
                let found = ctx
                    .global("profiles", &key)?
                    .unwrap_or_else(|| b"-".to_vec());
                ctx.send(ProducerRecord::to("out").key(&key).value(&found))
                    .await?;
                Ok(())
            })
        }),
    }
}

/// The values sent to `out`, by key.
fn outputs(cluster: &MockCluster) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in 0..2 {
        for r in cluster.records("out", p) {
            let text = |b: Option<bytes::Bytes>| {
                String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()
            };
            out.entry(text(r.key)).or_default().push(text(r.value));
        }
    }
    out
}

/// A global table is restored before the first event (a key of either
/// partition is found), follows updates and deletes, and reads a partition
/// its topic gains once the metadata shows it.
#[tokio::test(start_paused = true)]
async fn a_global_table_follows_its_topic_and_its_new_partitions() {
    let cluster = cluster();
    cluster.create_topic("users", 2);
    cluster.append("users", 0, Some(b"a"), Some(b"A"));
    cluster.append("users", 1, Some(b"b"), Some(b"B"));
    let mut config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    config.client.metadata_max_age = Duration::from_secs(5);
    let worker = Worker::new(config)
        .global_table(
            "profiles",
            "users",
            Arc::new(|s: &str| Ok(crate::ParsedKey::raw(s.into()))),
        )
        .processor(Arc::new(looker()));
    let metrics = worker.metrics().clone();
    let (stop, run) = spawn(worker);
    for key in [b"a", b"b", b"c"] {
        cluster.append("in", 0, None, Some(key));
    }
    wait_until("three lookups", || outputs(&cluster).len() == 3).await;
    cluster.append("users", 1, Some(b"b"), Some(b"B2"));
    cluster.append("users", 0, Some(b"a"), None);
    wait_until("the update read", || {
        metrics.global_offset("profiles", 1) == Some(1)
    })
    .await;
    wait_until("the delete read", || {
        metrics.global_offset("profiles", 0) == Some(1)
    })
    .await;
    cluster.create_partitions("users", 3);
    cluster.append("users", 2, Some(b"c"), Some(b"C"));
    wait_until("the new partition read", || {
        metrics.global_offset("profiles", 2) == Some(0)
    })
    .await;
    for key in [b"a", b"b", b"c"] {
        cluster.append("in", 1, None, Some(key));
    }
    wait_until("six lookups", || {
        outputs(&cluster).values().map(Vec::len).sum::<usize>() == 6
    })
    .await;
    let got = outputs(&cluster);
    let want: BTreeMap<String, Vec<String>> =
        [("a", ["A", "-"]), ("b", ["B", "B2"]), ("c", ["-", "C"])]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.map(str::to_owned).to_vec()))
            .collect();
    assert_eq!(got, want);
    let _ = stop.send(());
    outcome(run, Duration::from_secs(30)).await.unwrap();
}

/// A global table and a table of one name are refused before anything
/// starts: they would share the web's route, metrics and files.
#[tokio::test(start_paused = true)]
async fn two_tables_of_one_name_are_refused() {
    let cluster = cluster();
    let config = config(&cluster, ProcessingGuarantee::AtLeastOnce);
    let worker = Worker::new(config)
        .table("profiles")
        .global_table(
            "profiles",
            "in",
            Arc::new(|s: &str| Ok(crate::ParsedKey::raw(s.into()))),
        )
        .processor(Arc::new(looker()));
    let err = worker.run(async {}).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(r#"two tables are named "profiles""#),
        "{err}"
    );
}

/// An agent of one topic that notes each record's (topic, timestamp).
struct Noter {
    topic: &'static str,
    seen: Arc<std::sync::Mutex<Vec<(String, i64)>>>,
}

impl Processor for Noter {
    fn topic(&self) -> &str {
        self.topic
    }

    fn process(&self, _ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        let seen = self.seen.clone();
        Box::pin(async move {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.push((record.topic.to_string(), record.timestamp));
            Ok(())
        })
    }
}

/// Appends a record at `timestamp` to partition 0 of `topic`.
fn append_at(cluster: &MockCluster, topic: &str, timestamp: i64) {
    append_to(cluster, topic, 0, timestamp);
}

/// Appends a record at `timestamp` to partition `partition` of `topic`.
fn append_to(cluster: &MockCluster, topic: &str, partition: i32, timestamp: i64) {
    append_value(cluster, topic, partition, timestamp, b"x");
}

/// Appends a record at `timestamp` with `value` to partition `partition` of
/// `topic`, in a batch of its own.
fn append_value(cluster: &MockCluster, topic: &str, partition: i32, timestamp: i64, value: &[u8]) {
    let mut b = strom_client::records::BatchBuilder::new(64);
    b.push(timestamp, None, Some(value), &[]);
    let batch = b
        .seal(
            strom_client::Compression::None,
            strom_client::records::ProducerIdentity::default(),
        )
        .unwrap();
    cluster.append_raw(topic, partition, batch);
}

/// With `time_ordered`, a task reads the topics of its partition number in
/// step by record time:
/// two topics' backlogs, fetched together, are processed in time order, not
/// one topic's before the other's (what a windowed join needs).
#[tokio::test(start_paused = true)]
async fn a_task_processes_its_topics_in_time_order() {
    let cluster = interleaved(50);
    let seen: Seen = Default::default();
    let (stop, run) = spawn(orders_and_payments(&cluster, &seen));
    wait_until("every record", || seen.lock().unwrap().len() == 100).await;
    let times: Vec<i64> = seen.lock().unwrap().iter().map(|(_, t)| *t).collect();
    let mut sorted = times.clone();
    sorted.sort();
    assert_eq!(times, sorted, "processed out of time order");
    let _ = stop.send(());
    outcome(run, Duration::from_secs(30)).await.unwrap();
}

/// A cluster with one-partition topics `orders` and `payments` holding `n`
/// records each, a payment 10 ms after each order, 20 ms apart from 1,000.
fn interleaved(n: i64) -> MockCluster {
    let cluster = cluster();
    cluster.create_topic("orders", 1);
    cluster.create_topic("payments", 1);
    for i in 0..n {
        append_at(&cluster, "orders", 1_000 + 20 * i);
        append_at(&cluster, "payments", 1_010 + 20 * i);
    }
    cluster
}

/// Two agents noting what they see, of orders and of payments, in a worker
/// that reads in time order.
fn orders_and_payments(cluster: &MockCluster, seen: &Seen) -> Worker {
    let mut config = config(cluster, ProcessingGuarantee::AtLeastOnce);
    config.time_ordered = true;
    Worker::new(config)
        .processor(Arc::new(Noter {
            topic: "orders",
            seen: seen.clone(),
        }))
        .processor(Arc::new(Noter {
            topic: "payments",
            seen: seen.clone(),
        }))
}

type Seen = Arc<std::sync::Mutex<Vec<(String, i64)>>>;

/// Fetches of `payments-0` fail once `failing` is set (after the first,
/// with `first_too` unset).
fn fail_payments(
    cluster: &MockCluster,
    failing: Arc<std::sync::atomic::AtomicBool>,
    first_too: bool,
) {
    let payments = TopicPartition::new("payments", 0);
    let fetched = AtomicUsize::new(0);
    cluster.set_hook(move |call: &Call| {
        if call.api != ApiKey::Fetch || !call.partitions.contains(&payments) {
            return Action::Answer;
        }
        let first = fetched.fetch_add(1, Ordering::SeqCst) == 0;
        if failing.load(Ordering::SeqCst) && (first_too || !first) {
            Action::FailPartitions(vec![payments.clone()], ResponseError::NotLeaderOrFollower)
        } else {
            Action::Answer
        }
    });
}

/// In time order, a task whose topic has nothing queued waits while the
/// broker holds records of it the worker has not fetched: here the
/// payments partition's fetches fail after the first, which brought one of
/// its three (large) records and its high watermark. Without the wait, the
/// orders' backlog would all be processed before the payments.
#[tokio::test(start_paused = true)]
async fn a_task_waits_for_records_the_broker_holds() {
    let cluster = cluster();
    cluster.create_topic("orders", 1);
    cluster.create_topic("payments", 1);
    // Two payments do not fit one partition fetch (1 MiB).
    let large = vec![b'p'; 600 << 10];
    for i in 0..5 {
        append_at(&cluster, "orders", 1_000 + 20 * i);
    }
    for i in 0..3 {
        append_value(&cluster, "payments", 0, 1_010 + 20 * i, &large);
    }
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    fail_payments(&cluster, failing.clone(), false);
    let seen: Seen = Default::default();
    let (stop, run) = spawn(orders_and_payments(&cluster, &seen));
    // It cannot know the next payment's time, so it waits as soon as the
    // payments run out (as Kafka Streams does).
    wait_until("the records up to the fetched payment", || {
        seen.lock().unwrap().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let times =
        |seen: &Seen| -> Vec<i64> { seen.lock().unwrap().iter().map(|(_, t)| *t).collect() };
    assert_eq!(times(&seen), [1_000, 1_010], "went on without the payments");
    failing.store(false, Ordering::SeqCst);
    wait_until("every record", || seen.lock().unwrap().len() == 8).await;
    assert_eq!(
        times(&seen),
        [1_000, 1_010, 1_020, 1_030, 1_040, 1_050, 1_060, 1_080]
    );
    let _ = stop.send(());
    outcome(run, Duration::from_secs(30)).await.unwrap();
}

/// A task waits for a topic's unfetched records at most
/// `time_order_wait`, then processes the others without them: here the
/// payments partition is never fetched, so its lag is never known.
#[tokio::test(start_paused = true)]
async fn a_task_waits_for_unfetched_records_within_its_bound() {
    let cluster = interleaved(5);
    fail_payments(&cluster, Arc::new(true.into()), true);
    let seen: Seen = Default::default();
    let started = tokio::time::Instant::now();
    let (stop, run) = spawn(orders_and_payments(&cluster, &seen));
    wait_until("the orders", || seen.lock().unwrap().len() == 5).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10) && waited < Duration::from_secs(12),
        "processed after {waited:?}, not after the 10 s bound"
    );
    assert!(seen
        .lock()
        .unwrap()
        .iter()
        .all(|(topic, _)| topic == "orders"));
    let _ = stop.send(());
    outcome(run, Duration::from_secs(30)).await.unwrap();
}

/// An agent over a topic pattern reads the matching topics there are when
/// the worker starts, then a matching topic created while it runs (the
/// group rejoins with it), from its start; a topic that does not match
/// whole is not read.
#[tokio::test(start_paused = true)]
async fn a_pattern_agent_reads_matching_topics_created_later() {
    let cluster = cluster();
    cluster.create_topic("orders-eu", 1);
    cluster.create_topic("orders-eu-old", 1);
    append_at(&cluster, "orders-eu", 1);
    append_at(&cluster, "orders-eu-old", 2);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let worker = Worker::new(config(&cluster, ProcessingGuarantee::AtLeastOnce))
        .topic_pattern(crate::TopicPattern::new("orders-[a-z]+").unwrap())
        .processor(Arc::new(Noter {
            topic: "orders-[a-z]+",
            seen: seen.clone(),
        }));
    let (stop, run) = spawn(worker);
    wait_until("the first topic's record", || {
        seen.lock().unwrap().len() == 1
    })
    .await;
    cluster.create_topic("orders-us", 2);
    append_at(&cluster, "orders-us", 3);
    append_to(&cluster, "orders-us", 1, 4);
    wait_until("the new topic's records", || {
        seen.lock().unwrap().len() == 3
    })
    .await;
    append_at(&cluster, "orders-eu", 5);
    wait_until("the first topic still read", || {
        seen.lock().unwrap().len() == 4
    })
    .await;
    let mut got = seen.lock().unwrap().clone();
    got.sort();
    let want: Vec<(String, i64)> = [
        ("orders-eu", 1),
        ("orders-eu", 5),
        ("orders-us", 3),
        ("orders-us", 4),
    ]
    .into_iter()
    .map(|(t, n)| (t.to_owned(), n))
    .collect();
    assert_eq!(got, want);
    let _ = stop.send(());
    outcome(run, Duration::from_secs(30)).await.unwrap();
}

/// An agent that holds every event until `open` is set, counting them.
struct Gate {
    open: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<AtomicUsize>,
}

impl Processor for Gate {
    fn topic(&self) -> &str {
        "in"
    }

    fn process(&self, _ctx: Context, _record: ConsumerRecord) -> ProcessFuture<'_> {
        Box::pin(async move {
            while !self.open.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            self.done.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

/// The value of `name{part="part"}` in `metrics`.
fn memory_gauge(metrics: &crate::Metrics, name: &str, part: &str) -> usize {
    let prefix = format!("{name}{{part=\"{part}\"}} ");
    (metrics.render().lines())
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no {prefix} in {}", metrics.render()))
}

/// The memory budget bounds what the worker fetches ahead of a stuck agent
/// (its share over the partition numbers, below `max_buffered_bytes`), and
/// `/metrics` shows each part's share and what the fetched records hold.
#[tokio::test(start_paused = true)]
async fn the_memory_budget_bounds_fetched_records() {
    let cluster = cluster();
    cluster.create_topic("in", 1);
    let value = vec![b'v'; 1_000];
    for i in 0..6_000 {
        append_value(&cluster, "in", 0, i, &value);
    }
    fetched_records_stay_within_the_budget(&cluster, 6_000).await;
}

/// The same for lz4 batches that decompress to 200 times their size: the
/// consumer decodes a batch only as it hands its records out, and the
/// tasks count them decompressed, so 20 MB of records in 100 KB of batches
/// are not all taken in.
#[tokio::test(start_paused = true)]
async fn the_memory_budget_counts_records_decompressed() {
    let cluster = cluster();
    cluster.create_topic("in", 1);
    let events = append_lz4_batches(&cluster, 200, 50, &[0u8; 2_000], 1_000);
    fetched_records_stay_within_the_budget(&cluster, events).await;
}

/// The same for large records: lz4 batches of twenty 200 KB records, 4 MB
/// decompressed each. A poll takes up to a partition queue's share of
/// them, not a whole batch (500 records would be allowed by count).
#[tokio::test(start_paused = true)]
async fn the_memory_budget_bounds_large_records() {
    let cluster = cluster();
    cluster.create_topic("in", 1);
    let events = append_lz4_batches(&cluster, 10, 20, &[7u8; 200_000], 100_000);
    fetched_records_stay_within_the_budget(&cluster, events).await;
}

/// Appends `batches` lz4 batches of `per_batch` records of `value` to
/// topic `in`, each under `max_len` bytes once compressed; returns how many
/// records.
fn append_lz4_batches(
    cluster: &MockCluster,
    batches: i64,
    per_batch: i64,
    value: &[u8],
    max_len: usize,
) -> usize {
    for batch in 0..batches {
        let mut b = strom_client::records::BatchBuilder::new(64);
        for i in 0..per_batch {
            b.push(batch * per_batch + i, None, Some(value), &[]);
        }
        let sealed = b
            .seal(
                strom_client::Compression::Lz4,
                strom_client::records::ProducerIdentity::default(),
            )
            .unwrap();
        assert!(sealed.len() < max_len, "lz4 made {} bytes", sealed.len());
        cluster.append_raw("in", 0, sealed);
    }
    (batches * per_batch) as usize
}

/// Runs a worker with a 4 MiB budget and an agent stuck until the fetched
/// records are measured, then lets all `events` of topic `in` through.
async fn fetched_records_stay_within_the_budget(cluster: &MockCluster, events: usize) {
    let mut config = config(cluster, ProcessingGuarantee::AtLeastOnce);
    // A quarter (1 MiB) for fetched records, over one partition number and
    // the consumer's read-ahead: 512 KiB each.
    config.memory_budget = 4 << 20;
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let worker = Worker::new(config)
        .table("counts")
        .processor(Arc::new(Gate {
            open: open.clone(),
            done: done.clone(),
        }));
    let metrics = worker.metrics().clone();
    let (stop, run) = spawn(worker);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let limit = memory_gauge(&metrics, "strom_memory_limit_bytes", "fetched");
    // (Rounded down to a multiple of the queues.)
    assert!(limit <= 1 << 20 && limit > (1 << 20) - 16, "{limit}");
    assert_eq!(
        memory_gauge(&metrics, "strom_memory_limit_bytes", "producer"),
        1 << 20
    );
    let stores = memory_gauge(&metrics, "strom_memory_limit_bytes", "stores");
    assert!(stores <= 1 << 20 && stores > (1 << 20) - 16, "{stores}");
    let held = memory_gauge(&metrics, "strom_memory_held_bytes", "fetched");
    // Each bound may be passed by the one fetched slice that crossed it.
    assert!(
        held > 0 && held <= limit + (2 << 20),
        "{held} bytes of fetched records held"
    );
    open.store(true, Ordering::SeqCst);
    wait_until("every event", || done.load(Ordering::SeqCst) == events).await;
    let _ = stop.send(());
    outcome(run, Duration::from_secs(30)).await.unwrap();
}
