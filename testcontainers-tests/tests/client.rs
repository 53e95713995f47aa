//! strom-client against a real broker in a container: admin, produce, fetch,
//! offsets, failures.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use strom_client::consumer::{AutoOffsetReset, Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::partitioner::partition_for_key;
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Acks, Client, ClientConfig, Compression, Error, Header, NewTopic, OffsetSpec};
use strom_it::{unique_topic, BrokerKind, TestBroker};

const PARTITIONS: usize = 6;
const PER_CODEC: u64 = 200_000;

/// The value of record `i` sent with codec `c` (0 = none, 1 = lz4).
fn value_of(c: u64, i: u64) -> Vec<u8> {
    format!("{c}:{i}:{}", "v".repeat((i % 97) as usize)).into_bytes()
}

fn key_of(i: u64) -> String {
    format!("key-{}", i % 10_007)
}

/// Consumes `tps` from the earliest offset until `n` records arrived (or 120 s passed).
async fn consume_n(
    client: Client,
    tps: Vec<TopicPartition>,
    n: usize,
) -> Vec<strom_client::ConsumerRecord> {
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer
        .assign(tps.into_iter().map(|tp| (tp, Offset::Earliest)))
        .unwrap();
    let mut out = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, consumer.poll()).await {
            Ok(batch) => out.extend(batch.expect("poll failed")),
            Err(_) => panic!("only {} of {n} records arrived within 120 s", out.len()),
        }
    }
    // A short quiet period so duplicates would show.
    while let Ok(batch) = tokio::time::timeout(Duration::from_millis(500), consumer.poll()).await {
        out.extend(batch.expect("poll failed"));
    }
    out
}

/// 200,000 keyed records with lz4 and 200,000 without, acks=all, come back in
/// assign mode exactly once, in per-partition offset order, with key, value,
/// headers and timestamp intact, each at the offset its delivery future reported
/// and in the partition Java's partitioner picks for its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_round_trip_exactly_once_with_and_without_lz4() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = unique_topic("roundtrip");
    client
        .create_topic(NewTopic::new(&topic, PARTITIONS as i32, 1))
        .await
        .unwrap();

    let base_ts = 1_700_000_000_000i64;
    // (codec, i) -> (partition, offset) from the delivery futures.
    let mut placed: HashMap<(u64, u64), (i32, i64)> = HashMap::new();
    for (c, compression) in [(0u64, Compression::None), (1, Compression::Lz4)] {
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks: Acks::All,
                compression,
                batch_size: 64 * 1024,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        let mut futures = Vec::with_capacity(PER_CODEC as usize);
        for i in 0..PER_CODEC {
            let key = key_of(i);
            let value = value_of(c, i);
            let headers = [
                Header::new("i", i.to_string()),
                Header::new("codec", c.to_string()),
                Header::new("i", "dup"),
            ];
            let f = producer
                .send(
                    ProducerRecord::to(&topic)
                        .key(key.as_bytes())
                        .value(&value)
                        .headers(&headers)
                        .timestamp(base_ts + i as i64),
                )
                .await
                .unwrap();
            futures.push(f);
        }
        producer.flush().await.unwrap();
        for (i, f) in futures.into_iter().enumerate() {
            let m = f
                .await
                .unwrap_or_else(|e| panic!("record {c}:{i} failed: {e}"));
            placed.insert((c, i as u64), (m.partition, m.offset));
        }
    }

    let tps: Vec<_> = (0..PARTITIONS as i32)
        .map(|p| TopicPartition::new(&topic, p))
        .collect();
    let records = consume_n(client.clone(), tps, 2 * PER_CODEC as usize).await;
    assert_eq!(records.len(), 2 * PER_CODEC as usize, "duplicates arrived");

    let mut seen: HashMap<(u64, u64), ()> = HashMap::new();
    let mut last_offset: HashMap<i32, i64> = HashMap::new();
    let mut per_partition: HashMap<i32, i64> = HashMap::new();
    for r in &records {
        let header = |k: &str| -> Vec<&Bytes> {
            r.headers
                .iter()
                .filter(|h| &h.key[..] == k.as_bytes())
                .filter_map(|h| h.value.as_ref())
                .collect()
        };
        let i_values = header("i");
        assert_eq!(
            i_values.len(),
            2,
            "both `i` headers kept at {}@{}",
            r.partition,
            r.offset
        );
        let i: u64 = std::str::from_utf8(i_values[0]).unwrap().parse().unwrap();
        assert_eq!(&i_values[1][..], b"dup");
        let c: u64 = std::str::from_utf8(header("codec")[0])
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            seen.insert((c, i), ()).is_none(),
            "record {c}:{i} delivered twice"
        );
        let key = key_of(i);
        assert_eq!(r.key.as_deref(), Some(key.as_bytes()));
        assert_eq!(r.value.as_deref(), Some(&value_of(c, i)[..]));
        assert_eq!(r.timestamp, base_ts + i as i64);
        assert_eq!(
            r.partition,
            partition_for_key(key.as_bytes(), PARTITIONS),
            "key {key} in the wrong partition"
        );
        assert_eq!(
            placed[&(c, i)],
            (r.partition, r.offset),
            "record {c}:{i} not where its future said"
        );
        let last = last_offset.entry(r.partition).or_insert(-1);
        assert!(
            r.offset > *last,
            "partition {} went from {} to {}",
            r.partition,
            last,
            r.offset
        );
        *last = r.offset;
        *per_partition.entry(r.partition).or_default() += 1;
    }
    assert_eq!(seen.len(), 2 * PER_CODEC as usize);

    let earliest = client
        .list_offsets(&topic, OffsetSpec::Earliest)
        .await
        .unwrap();
    let latest = client
        .list_offsets(&topic, OffsetSpec::Latest)
        .await
        .unwrap();
    for p in 0..PARTITIONS as i32 {
        let count = per_partition.get(&p).copied().unwrap_or(0);
        assert_eq!(earliest[&p], 0, "earliest offset of partition {p}");
        assert_eq!(
            last_offset[&p] + 1,
            count,
            "offsets of partition {p} are not dense"
        );
        if broker.kind == BrokerKind::Tansu {
            // tansu reports the first offset of the last batch + 1 (DESIGN.md).
            assert!(
                latest[&p] > 0 && latest[&p] <= count,
                "partition {p}: latest {} for {count} records",
                latest[&p]
            );
        } else {
            assert_eq!(latest[&p], count, "latest offset of partition {p}");
        }
    }
}

/// Sending to a topic that does not exist fails at once, naming the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producing_to_a_missing_topic_is_a_clear_error() {
    let broker = TestBroker::start().await;
    let producer = Producer::new(broker.client().await, ProducerConfig::default()).unwrap();
    let topic = unique_topic("missing");
    let err = producer
        .send(ProducerRecord::to(&topic).value(b"x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownTopic { .. }), "{err}");
    assert!(err.to_string().contains(&topic), "{err}");
}

/// Creating an existing topic is its own error; a deleted topic is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_existing_and_deleted_topics() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = unique_topic("admin");
    client
        .create_topic(NewTopic::new(&topic, 3, 1).config("cleanup.policy", "compact"))
        .await
        .unwrap();
    assert_eq!(
        client
            .topic_metadata(&topic)
            .await
            .unwrap()
            .partitions
            .len(),
        3
    );
    let err = client
        .create_topic(NewTopic::new(&topic, 3, 1))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TopicAlreadyExists { .. }), "{err}");
    client.delete_topics(&[&topic]).await.unwrap();
    let err = client.topic_metadata(&topic).await.unwrap_err();
    assert!(matches!(err, Error::UnknownTopic { .. }), "{err}");
}

/// Seek, pause and resume move and stop reading; an out-of-range position is
/// reset by the policy, or reported when the policy is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_seeks_pauses_resumes_and_resets() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = unique_topic("seek");
    client
        .create_topic(NewTopic::new(&topic, 1, 1))
        .await
        .unwrap();
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            batch_size: 4096,
            compression: Compression::Lz4,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    for i in 0..1000u32 {
        producer
            .send(ProducerRecord::to(&topic).value(i.to_string().as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let tp = TopicPartition::new(&topic, 0);
    let config = ConsumerConfig {
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..ConsumerConfig::default()
    };
    let mut consumer = Consumer::new(client.clone(), config.clone());

    // Starting inside a compressed batch skips the records before the offset.
    consumer.assign([(tp.clone(), Offset::At(500))]).unwrap();
    let r = consumer.recv().await.unwrap();
    assert_eq!((r.offset, r.value.as_deref()), (500, Some(&b"500"[..])));

    consumer.seek(&tp, Offset::Earliest).unwrap();
    assert_eq!(consumer.recv().await.unwrap().offset, 0);
    assert_eq!(consumer.position(&tp), Some(1));

    // Paused: nothing new is fetched (what was already buffered may still come).
    consumer.seek(&tp, Offset::At(990)).unwrap();
    consumer.pause(&tp).unwrap();
    let got = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await;
    assert!(got.is_err(), "a paused partition delivered {got:?}");
    consumer.resume(&tp).unwrap();
    assert_eq!(consumer.recv().await.unwrap().offset, 990);

    if broker.kind == BrokerKind::Tansu {
        // tansu answers a fetch past the log end with an empty, error-free
        // response instead of OFFSET_OUT_OF_RANGE (measured; DESIGN.md), so
        // the reset path can only be proven against Apache Kafka.
        eprintln!("consumer_seeks_pauses_resumes_and_resets: out-of-range reset NOT checked (tansu never reports OFFSET_OUT_OF_RANGE)");
        return;
    }
    // Far past the end: the reset policy (earliest) takes the consumer back to 0.
    consumer.seek(&tp, Offset::At(1_000_000)).unwrap();
    let r = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("no record after an out-of-range reset")
        .unwrap();
    assert_eq!(r.offset, 0);

    // With no reset policy the consumer reports the position instead.
    let mut strict = Consumer::new(
        client,
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::None,
            ..config
        },
    );
    strict
        .assign([(tp.clone(), Offset::At(1_000_000))])
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), strict.recv())
        .await
        .expect("no error for an out-of-range position")
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OffsetOutOfRange {
                offset: 1_000_000,
                ..
            }
        ),
        "{err}"
    );
}

/// A client whose broker goes away gets retriable errors, not a hang, and works
/// again on the same `Client` once the broker is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_after_the_broker_restarts() {
    let broker = TestBroker::start().await;
    if broker.kind == BrokerKind::External {
        eprintln!("client_reconnects_after_the_broker_restarts: an external broker cannot be restarted; checking only that it answers");
    }
    let mut config = broker.client_config();
    config.retry_timeout = Duration::from_secs(2);
    config.bootstrap_timeout = Duration::from_secs(2);
    let client = Client::connect(config).await.unwrap();
    let first = unique_topic("restart");
    client
        .create_topic(NewTopic::new(&first, 1, 1))
        .await
        .unwrap();
    if broker.kind == BrokerKind::External {
        return;
    }

    broker.stop().await;
    let err = client
        .list_offsets(&first, OffsetSpec::Latest)
        .await
        .unwrap_err();
    assert!(err.is_retriable(), "{err}");

    broker.restart().await;
    // The in-memory broker comes back empty: create anew on the same client.
    let second = unique_topic("restart");
    client
        .create_topic(NewTopic::new(&second, 1, 1))
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let f = producer
        .send(ProducerRecord::to(&second).value(b"after restart"))
        .await
        .unwrap();
    assert_eq!(f.await.unwrap().offset, 0);
}

/// A bootstrap address where nothing listens fails after the configured
/// timeout with an error that names it.
#[tokio::test]
async fn unreachable_broker_is_a_clear_error_after_the_timeout() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut config = ClientConfig::new([addr.clone()]);
    config.bootstrap_timeout = Duration::from_millis(800);
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(30), Client::connect(config))
        .await
        .expect("connect hung")
        .unwrap_err();
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "gave up before the timeout"
    );
    assert!(matches!(err, Error::NoBrokerReachable { .. }), "{err}");
    assert!(err.to_string().contains(&addr), "{err}");
}

/// A broker that accepts the connection but never answers gives a request
/// timeout, not a hang.
#[tokio::test]
async fn silent_broker_is_a_request_timeout() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let _hold = tokio::spawn(async move {
        let mut socks = vec![];
        while let Ok((s, _)) = listener.accept().await {
            socks.push(s);
        }
    });
    let mut config = ClientConfig::new([addr.clone()]);
    config.connection.request_timeout = Duration::from_millis(300);
    config.bootstrap_timeout = Duration::from_millis(500);
    let err = tokio::time::timeout(Duration::from_secs(30), Client::connect(config))
        .await
        .expect("connect hung")
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("timed out"), "{text}");
}

/// With acks=1 and acks=0 every record still arrives; acks=0 reports no offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acks_mode_delivers() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    for (acks, name) in [(Acks::Leader, "acks1"), (Acks::None, "acks0")] {
        let topic = unique_topic(name);
        client
            .create_topic(NewTopic::new(&topic, 2, 1))
            .await
            .unwrap();
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                acks,
                idempotence: false,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        let mut futures = vec![];
        for i in 0..5_000u32 {
            let v = i.to_string();
            futures.push(
                producer
                    .send(
                        ProducerRecord::to(&topic)
                            .key(v.as_bytes())
                            .value(v.as_bytes()),
                    )
                    .await
                    .unwrap(),
            );
        }
        producer.flush().await.unwrap();
        for f in futures {
            let m = f.await.unwrap();
            assert_eq!(
                m.offset < 0,
                acks == Acks::None,
                "{name}: offset {}",
                m.offset
            );
        }
        let tps = (0..2).map(|p| TopicPartition::new(&topic, p)).collect();
        let mut values: Vec<u32> = consume_n(client.clone(), tps, 5_000)
            .await
            .iter()
            .map(|r| {
                std::str::from_utf8(r.value.as_deref().unwrap())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect();
        values.sort_unstable();
        assert_eq!(values, (0..5_000).collect::<Vec<_>>(), "{name}");
    }
}
