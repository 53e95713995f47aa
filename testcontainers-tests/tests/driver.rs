//! The test driver and a real worker on the broker give the same outputs for
//! the same input: the wordcount and enrich examples, run both ways.

#[path = "../../streams/examples/wordcount.rs"]
#[allow(dead_code)]
mod wordcount;

#[path = "../../streams/examples/enrich.rs"]
#[allow(dead_code)]
mod enrich;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use strom::testing::TestDriver;
use strom::{App, StoreKind};
use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::Client;
use strom_it::{unique_topic, TestBroker};

const PARTITIONS: i32 = 4;

/// An output record: (partition, key, value), as bytes.
type Output = (i32, Vec<u8>, Vec<u8>);

/// Runs `f` on a current-thread runtime of its own (the driver pauses its
/// clock), on another thread.
fn on_driver_runtime<F, T>(f: F) -> T
where
    F: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

/// Every record the app wrote to `topic` on the driver; closes it.
async fn outputs(mut driver: TestDriver, topic: &str) -> Vec<Output> {
    let out = driver
        .read_raw(topic)
        .unwrap()
        .into_iter()
        .map(|r| {
            (
                r.partition,
                r.key.unwrap().to_vec(),
                r.value.unwrap().to_vec(),
            )
        })
        .collect();
    driver.close().await.unwrap();
    out
}

fn broker_app(id: &str, broker: &TestBroker) -> App {
    App::new(id)
        .with_brokers([broker.bootstrap.clone()])
        .with_static_membership(broker.static_membership())
        .with_state_dir(std::env::temp_dir().join(unique_topic("driver-state")))
        .with_store(StoreKind::Memory)
        .with_partitions(PARTITIONS)
        .with_commit_interval(Duration::from_millis(200))
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1))
}

/// Every record of `topic` on the broker, read until `n` arrived.
async fn read_all(client: &Client, topic: &str, n: usize) -> Vec<Output> {
    strom_it::wait_for_topic(client, topic).await;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign((0..PARTITIONS).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut got = Vec::new();
    while got.len() < n {
        let batch = tokio::time::timeout_at(deadline, consumer.poll())
            .await
            .unwrap_or_else(|_| panic!("{topic}: {} of {n} records after 120 s", got.len()))
            .unwrap();
        for r in batch {
            got.push((
                r.partition,
                r.key.unwrap_or_default().to_vec(),
                r.value.unwrap_or_default().to_vec(),
            ));
        }
    }
    got
}

/// Sends every (key, value) to `topic` on the broker, in order.
async fn produce(client: &Client, topic: &str, records: &[(Vec<u8>, Vec<u8>)]) {
    use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for (key, value) in records {
        let mut record = ProducerRecord::to(topic).value(value);
        if !key.is_empty() {
            record = record.key(key);
        }
        producer.send(record).await.unwrap();
    }
    producer.flush().await.unwrap();
}

/// Each key's values, in order.
type PerKey = BTreeMap<Vec<u8>, Vec<Vec<u8>>>;

/// Sorted, and each key's values in the order they came (per partition,
/// where Kafka keeps order).
fn canonical(mut records: Vec<Output>) -> (Vec<Output>, PerKey) {
    let mut per_key = PerKey::new();
    for (_, k, v) in &records {
        per_key.entry(k.clone()).or_default().push(v.clone());
    }
    records.sort();
    (records, per_key)
}

/// The driver and the broker gave the same records, and each key's
/// (`each` says what they are) in the same order.
fn assert_agree(from_driver: Vec<Output>, from_broker: Vec<Output>, each: &str) {
    let (driver, driver_per_key) = canonical(from_driver);
    let (broker, broker_per_key) = canonical(from_broker);
    assert!(driver == broker, "the outputs differ");
    assert!(
        driver_per_key == broker_per_key,
        "{each} came in another order"
    );
}

fn sentences(n: usize) -> Vec<String> {
    let mut seed = 11u64;
    (0..n)
        .map(|_| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let words = 1 + (seed >> 60) as usize % 6;
            (0..words)
                .map(|i| format!("w{}", (seed >> (i * 8)) % 97))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Word count over 3,000 generated sentences: every count record (its
/// partition, key and value) is the same from the driver and from a worker
/// on the broker, and each word's counts come in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordcount_driver_and_broker_agree() {
    let lines = sentences(3_000);
    let words: usize = lines.iter().map(|l| l.split_whitespace().count()).sum();

    let input = lines.clone();
    let from_driver = on_driver_runtime(async move {
        let app = App::new("wc-driver").with_partitions(PARTITIONS);
        let wc = wordcount::wordcount(app, "sentences", "counts");
        let mut driver = TestDriver::new(wc.app).await.unwrap();
        driver
            .send_many(&wc.sentences, input.into_iter().map(|l| ((), l)))
            .await
            .unwrap();
        outputs(driver, "counts").await
    });

    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("wc-vs"),
        unique_topic("wc-vs-in"),
        unique_topic("wc-vs-out"),
    );
    let wc = wordcount::wordcount(broker_app(&id, &broker), &input, &output);
    let (stop, worker) = strom_it::spawn_app(wc.app);
    strom_it::wait_for_topic(&client, &input).await;
    let records: Vec<(Vec<u8>, Vec<u8>)> = lines
        .iter()
        .map(|l| (vec![], l.clone().into_bytes()))
        .collect();
    produce(&client, &input, &records).await;
    let from_broker = read_all(&client, &output, words).await;
    let _ = stop.send(());
    worker.await.unwrap();

    assert_eq!(from_driver.len(), words, "the driver's outputs");
    assert_eq!(from_broker.len(), words, "the broker's outputs");
    assert_agree(from_driver, from_broker, "a word's counts");
}

/// Enrich: 300 profiles, then 3,000 page views (some of users without a
/// profile): every enriched view is the same from the driver and from a
/// worker on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrich_driver_and_broker_agree() {
    let profiles: Vec<(String, enrich::Profile)> = (0..300)
        .map(|i| {
            let profile = enrich::Profile {
                name: format!("user {i}"),
                country: ["DE", "IN", "BR"][i % 3].into(),
            };
            (format!("u{i}"), profile)
        })
        .collect();
    let views: Vec<(String, enrich::PageView)> = (0..3_000)
        .map(|i| {
            let view = enrich::PageView {
                url: format!("/page/{}", i % 17),
            };
            (format!("u{}", (i * 7) % 330), view)
        })
        .collect();

    let (p, v) = (profiles.clone(), views.clone());
    let from_driver = on_driver_runtime(async move {
        let app = App::new("enrich-driver").with_partitions(PARTITIONS);
        let e = enrich::enrich(app, "");
        let mut driver = TestDriver::new(e.app).await.unwrap();
        driver.send_many(&e.users, p).await.unwrap();
        driver.send_many(&e.views, v).await.unwrap();
        outputs(driver, "enriched-views").await
    });

    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, prefix) = (unique_topic("enrich-vs"), unique_topic("enrich-vs-"));
    let e = enrich::enrich(broker_app(&id, &broker), &prefix);
    let (users, page_views, enriched) = (e.users.clone(), e.views.clone(), e.enriched.clone());
    // Every profile is in the topic before the worker starts: it restores
    // the global table before its agent reads the first view.
    let new = strom_client::NewTopic::new(users.name(), PARTITIONS, 1);
    client.ensure_topic(new).await.unwrap();
    let records: Vec<_> = profiles.iter().map(|(k, v)| json(k, v)).collect();
    produce(&client, users.name(), &records).await;
    let (stop, worker) = strom_it::spawn_app(e.app);
    strom_it::wait_for_topic(&client, page_views.name()).await;
    let records: Vec<_> = views.iter().map(|(k, v)| json(k, v)).collect();
    produce(&client, page_views.name(), &records).await;
    let from_broker = read_all(&client, enriched.name(), views.len()).await;
    let _ = stop.send(());
    worker.await.unwrap();

    assert_eq!(from_driver.len(), views.len(), "the driver's outputs");
    assert_agree(from_driver, from_broker, "a user's views");
}

/// A record of a UTF-8 key and a JSON value, as bytes.
fn json(key: &str, value: &impl serde::Serialize) -> (Vec<u8>, Vec<u8>) {
    (key.as_bytes().to_vec(), serde_json::to_vec(value).unwrap())
}
