//! The user API end to end: the word count pipeline of the example, run by two
//! app instances (workers) in one group.

use std::collections::BTreeMap;
use std::time::Duration;

use strom::codec::{NoKey, Utf8};
use strom::{App, StoreKind};
use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_it::{unique_topic, TestBroker};
use tokio::sync::oneshot;

/// The word count app of `streams/examples/wordcount.rs`, with test names.
fn wordcount(id: &str, broker: &TestBroker, input: &str, output: &str) -> App {
    let app = App::new(id)
        .with_brokers([broker.bootstrap.clone()])
        .with_state_dir(std::env::temp_dir().join(unique_topic("wc-state")))
        .with_store(StoreKind::Redb)
        .with_partitions(4)
        .with_commit_interval(Duration::from_millis(200))
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
    strom_it::wordcount(app, input, output)
}

/// Two workers count the words of 10,000 sentences (with undecodable lines
/// mixed in, which are skipped): the last count sent per word equals the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordcount_app_counts_exactly_and_skips_bad_input() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("wordcount"),
        unique_topic("sentences"),
        unique_topic("counts-out"),
    );

    let mut workers = vec![];
    for _ in 0..2 {
        let app = wordcount(&id, &broker, &input, &output);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            app.run(async {
                let _ = stopped.await;
            })
            .await
            .expect("worker failed");
        });
        workers.push((stop, task));
    }
    strom_it::wait_for_topic(&client, &input).await;

    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..10_000u64 {
        let line = format!("The w{} W{} and w{}", i % 17, i % 101, (i * 7) % 53);
        for w in line.split_whitespace() {
            *truth.entry(w.to_lowercase()).or_default() += 1;
        }
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
        if i % 1000 == 0 {
            // Not UTF-8: logged and skipped by the agent.
            producer
                .send(ProducerRecord::to(&input).value(&[0xff, 0xfe, 0x00]))
                .await
                .unwrap();
        }
    }
    producer.flush().await.unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let last = strom_it::last_counts(&client, &output).await;
        if truth.iter().all(|(w, n)| last.get(w) == Some(n)) {
            assert_eq!(
                last.len(),
                truth.len(),
                "words that were never sent were counted"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts never reached the truth"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for (stop, task) in workers {
        let _ = stop.send(());
        task.await.unwrap();
    }
}

/// filter, map, through and enumerate in one agent: empty lines are dropped,
/// the rest upper-cased, written to an intermediate topic, numbered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_map_through_enumerate_in_order() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, middle, output) = (
        unique_topic("ops"),
        unique_topic("ops-in"),
        unique_topic("ops-mid"),
        unique_topic("ops-out"),
    );
    let mut app = App::new(&id)
        .with_brokers([broker.bootstrap.clone()])
        .with_store(StoreKind::Memory)
        .with_partitions(1)
        .with_commit_interval(Duration::from_millis(200))
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
    let lines = app
        .topic::<(), String>(&input)
        .with_key_codec(NoKey)
        .with_value_codec(Utf8);
    let mid = app
        .topic::<(), String>(&middle)
        .with_key_codec(NoKey)
        .with_value_codec(Utf8);
    let out = app
        .topic::<(), String>(&output)
        .with_key_codec(NoKey)
        .with_value_codec(Utf8);
    app.agent(&lines)
        .filter(|e| !e.value.is_empty())
        .map(|v: String| v.to_uppercase())
        .through(&mid)
        .enumerate()
        .for_each(move |ctx, e| {
            let out = out.clone();
            async move {
                let (i, v) = e.value;
                ctx.send(&out, &(), &format!("{i}:{v}")).await?;
                Ok(())
            }
        });
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(async move {
        app.run(async {
            let _ = stopped.await;
        })
        .await
        .expect("worker failed");
    });
    strom_it::wait_for_topic(&client, &input).await;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for line in ["a", "", "b", "c", "", "d"] {
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();

    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    strom_it::wait_for_topic(&client, &output).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    consumer
        .assign([(TopicPartition::new(&output, 0), Offset::Earliest)])
        .unwrap();
    let mut got = vec![];
    while got.len() < 4 {
        let r = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .expect("outputs missing")
            .unwrap();
        got.push(String::from_utf8(r.value.unwrap().to_vec()).unwrap());
    }
    assert_eq!(got, ["0:A", "1:B", "2:C", "3:D"]);
    let _ = stop.send(());
    worker.await.unwrap();
}
