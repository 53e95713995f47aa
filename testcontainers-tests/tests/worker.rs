//! The worker runtime end to end: a word count over a keyed topic, with a
//! table and an output topic, run by one or two workers.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use strom_client::consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, NewTopic};
use strom_it::{unique_topic, TestBroker};
use strom_state::{changelog, recover, MemoryStore, Store};
use strom_worker::{Context, Placement, ProcessFuture, Processor, StoreKind, Worker, WorkerConfig};
use tokio::sync::oneshot;

const PARTITIONS: i32 = 6;

/// Counts words (the record keys) in table `counts` and sends each new count
/// to the output topic.
struct CountWords {
    source: String,
    output: String,
}

impl Processor for CountWords {
    fn topic(&self) -> &str {
        &self.source
    }

    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_> {
        Box::pin(async move {
            let word = record.key.ok_or("an event without a word")?;
            let now = {
                let mut table = ctx.table("counts").await?;
                let now = match table.get(&word)? {
                    Some(b) => u64::from_be_bytes(b.as_slice().try_into()?),
                    None => 0,
                } + 1;
                table.put(word.to_vec(), now.to_be_bytes().to_vec()).await?;
                now
            };
            let partition = ctx.partition();
            ctx.send(
                ProducerRecord::to(&self.output)
                    .partition(partition)
                    .key(&word)
                    .value(&now.to_be_bytes()),
            )
            .await?;
            Ok(())
        })
    }
}

struct App {
    id: String,
    source: String,
    output: String,
}

async fn app(client: &Client) -> App {
    let app = App {
        id: unique_topic("wc"),
        source: unique_topic("words"),
        output: unique_topic("counts-out"),
    };
    for t in [&app.source, &app.output] {
        client
            .create_topic(NewTopic::new(t, PARTITIONS, 1))
            .await
            .unwrap();
    }
    app
}

/// Starts a worker; dropping or firing the sender stops it cleanly.
fn start_worker(
    broker: &TestBroker,
    app: &App,
    n: usize,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    spawn(worker(broker, app, n, 0).0, n)
}

/// Worker `n` of the app (not started), with its state directory.
fn worker(broker: &TestBroker, app: &App, n: usize, standbys: usize) -> (Worker, PathBuf) {
    let mut config = WorkerConfig::new(&app.id, [broker.bootstrap.clone()]);
    config.state_dir = std::env::temp_dir().join(unique_topic(&format!("worker{n}")));
    config.store = StoreKind::Redb;
    config.session_timeout = Duration::from_secs(6);
    config.static_membership = broker.static_membership();
    config.heartbeat_interval = Duration::from_secs(1);
    config.commit_interval = Duration::from_millis(200);
    config.standby_replicas = standbys;
    // Small, so fetching pauses and resumes all through these tests.
    config.max_buffered_bytes = 20_000;
    let dir = config.state_dir.clone();
    let worker = Worker::new(config)
        .table("counts")
        .processor(Arc::new(CountWords {
            source: app.source.clone(),
            output: app.output.clone(),
        }));
    (worker, dir)
}

fn spawn(worker: Worker, n: usize) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        worker
            .run(async {
                let _ = stopped.await;
            })
            .await
            .unwrap_or_else(|e| panic!("worker {n} failed: {e}"));
    });
    (stop, task)
}

/// Produces `n` words from a vocabulary of 300, keyed by the word; returns the
/// true counts.
async fn produce_words(
    client: &Client,
    topic: &str,
    n: usize,
    pause_every: Option<usize>,
) -> BTreeMap<String, u64> {
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let word = format!("w{}", (i * 7919) % 300);
        *counts.entry(word.clone()).or_default() += 1;
        producer
            .send(ProducerRecord::to(topic).key(word.as_bytes()).value(b"1"))
            .await
            .unwrap();
        if pause_every.is_some_and(|k| i % k == k - 1) {
            producer.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    producer.flush().await.unwrap();
    counts
}

/// The last count sent per word, from the output topic.
async fn last_outputs(client: &Client, topic: &str) -> HashMap<String, u64> {
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign((0..PARTITIONS).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))
        .unwrap();
    let mut last = HashMap::new();
    while let Ok(batch) = tokio::time::timeout(Duration::from_secs(2), consumer.poll()).await {
        for r in batch.unwrap() {
            let word = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
            let n = u64::from_be_bytes(r.value.unwrap().as_ref().try_into().unwrap());
            last.insert(word, n);
        }
    }
    last
}

/// The table's contents as its changelog says, all partitions.
async fn table_from_changelog(client: &Client, app: &App) -> BTreeMap<String, u64> {
    let topic = changelog::topic_name(&app.id, "counts");
    let mut out = BTreeMap::new();
    for p in 0..PARTITIONS {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        recover(client, store.clone(), &topic, p).await.unwrap();
        for (k, v) in store
            .range(
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                usize::MAX,
            )
            .unwrap()
        {
            out.insert(
                String::from_utf8(k).unwrap(),
                u64::from_be_bytes(v.as_slice().try_into().unwrap()),
            );
        }
    }
    out
}

async fn wait_for_outputs(client: &Client, app: &App, expected: &BTreeMap<String, u64>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let last = last_outputs(client, &app.output).await;
        if expected.iter().all(|(w, n)| last.get(w) == Some(n)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outputs never reached the true counts"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Two workers in one group count 20,000 words: the table (as its changelog
/// says) and the last output per word equal the true counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_count_words_exactly() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let app = app(&client).await;
    let expected = produce_words(&client, &app.source, 20_000, None).await;
    let workers = [
        start_worker(&broker, &app, 1),
        start_worker(&broker, &app, 2),
    ];
    wait_for_outputs(&client, &app, &expected).await;
    for (stop, task) in workers {
        let _ = stop.send(());
        task.await.unwrap();
    }
    assert_eq!(table_from_changelog(&client, &app).await, expected);
}

/// One worker starts, a second joins mid-stream, the first stops cleanly:
/// counts stay exact, because a handoff flushes tables and commits first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handoff_between_workers_keeps_counts_exact() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let app = app(&client).await;
    let first = start_worker(&broker, &app, 1);
    let producing = {
        let (client, topic) = (client.clone(), app.source.clone());
        tokio::spawn(async move { produce_words(&client, &topic, 30_000, Some(1_000)).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let second = start_worker(&broker, &app, 2);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _ = first.0.send(());
    first.1.await.unwrap();
    let expected = producing.await.unwrap();
    wait_for_outputs(&client, &app, &expected).await;
    let _ = second.0.send(());
    second.1.await.unwrap();
    assert_eq!(
        table_from_changelog(&client, &app).await,
        expected,
        "a word was counted twice or missed"
    );
}

/// Each worker's active numbers are the other's standbys, as `placement` says.
fn standbys_mirror(placement: &Placement) -> bool {
    let m = &placement.members;
    m.len() == 2
        && m.iter().all(|x| !x.active.is_empty())
        && m.iter().zip(m.iter().rev()).all(|(x, y)| {
            let (mut s, mut a) = (x.standby.clone(), y.active.clone());
            s.sort();
            a.sort();
            s == a
        })
}

/// With one standby replica each worker keeps the other's tables warm (its
/// state directory holds their stores); when one stops, the other takes its
/// partitions over from those stores and the counts stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_replicas_keep_tables_warm_and_take_over() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let app = app(&client).await;
    let mut expected = produce_words(&client, &app.source, 10_000, None).await;
    let (a, a_dir) = worker(&broker, &app, 1, 1);
    let (b, _) = worker(&broker, &app, 2, 1);
    let (mut a_placement, b_placement) = (a.placement(), b.placement());
    let a = spawn(a, 1);
    let b = spawn(b, 2);
    wait_for_outputs(&client, &app, &expected).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let placement = loop {
        let p = a_placement.borrow_and_update().clone();
        if standbys_mirror(&p) {
            break p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "standbys never mirrored the active partitions: {p:?}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), a_placement.changed()).await;
    };
    assert_eq!(
        placement.members,
        b_placement.borrow().members,
        "the workers disagree on the placement"
    );
    let mine = placement.mine().expect("worker 1 not in its placement");
    for n in &mine.standby {
        let path = strom_state::store_path(&a_dir, "counts", *n);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !path.exists() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no standby store for partition {n} at {}",
                path.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let _ = b.0.send(());
    b.1.await.unwrap();
    for (word, n) in produce_words(&client, &app.source, 5_000, None).await {
        *expected.entry(word).or_default() += n;
    }
    wait_for_outputs(&client, &app, &expected).await;
    let _ = a.0.send(());
    a.1.await.unwrap();
    assert_eq!(table_from_changelog(&client, &app).await, expected);
}
