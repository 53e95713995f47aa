//! Every compression codec, both ways, against a second client: librdkafka
//! (Python's `confluent-kafka`, installed by `strom_it::librdkafka_python`).
//! Each test also reads the raw batches back to check that they really carry
//! the codec under test, so no check passes on uncompressed data.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{BrokerId, FetchRequest, TopicName};
use kafka_protocol::protocol::StrBytes;
use strom::{App, ProcessingGuarantee};
use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::records::BatchDecoder;
use strom_client::{Client, Compression, NewTopic};
use strom_it::{unique_topic, TestBroker};

const RECORDS: usize = 3_000;
const PARTITIONS: i32 = 3;

/// The value of record `i`: compressible, of varying length.
fn value(i: usize) -> String {
    format!("value {i} {}", "abcdefgh".repeat(i % 7 + 1))
}

/// The same formula in Python, for the librdkafka side.
const PY_VALUE: &str = "def value(i): return f'value {i} ' + 'abcdefgh' * (i % 7 + 1)\n";

/// What librdkafka does, in Python: `produce CODEC` or `consume`.
const PY: &str = r#"
import json, sys, time
from confluent_kafka import Consumer, Producer, TopicPartition, OFFSET_BEGINNING
mode, bootstrap, topic, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == 'produce':
    failed = []
    p = Producer({'bootstrap.servers': bootstrap, 'compression.type': sys.argv[5],
                  'linger.ms': 50, 'enable.idempotence': True})
    for i in range(n):
        line = sys.argv[6] if len(sys.argv) > 6 else None
        if line is None:
            p.produce(topic, key=f'k{i}', value=value(i),
                      on_delivery=lambda e, m: e and failed.append(str(e)))
        else:
            p.produce(topic, value=line, on_delivery=lambda e, m: e and failed.append(str(e)))
        p.poll(0)
    left = p.flush(60)
    if failed or left:
        sys.exit(f'librdkafka could not deliver: {left} left, errors {failed[:3]}')
else:
    parts = int(sys.argv[5])
    c = Consumer({'bootstrap.servers': bootstrap, 'group.id': 'strom-it-' + topic,
                  'enable.auto.commit': False})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(parts)])
    got, deadline = 0, time.time() + 120
    while got < n and time.time() < deadline:
        m = c.poll(1.0)
        if m is None:
            continue
        if m.error():
            sys.exit(f'librdkafka could not read: {m.error()}')
        print(json.dumps([m.partition(), m.offset(), m.key().decode(), m.value().decode()]))
        got += 1
    c.close()
"#;

/// Runs the librdkafka script with `args`; its standard output.
fn librdkafka(args: &[&str]) -> String {
    let out = Command::new(strom_it::librdkafka_python())
        .arg("-c")
        .arg(format!("{PY_VALUE}{PY}"))
        .args(args)
        .output()
        .expect("cannot run python");
    assert!(
        out.status.success(),
        "librdkafka failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("librdkafka printed no UTF-8")
}

/// Creates `topic` and writes records `k{i}`/`value(i)` to it with Strom
/// (all to `partition` if given); returns the bytes of keys and values.
async fn strom_writes(
    client: &Client,
    topic: &str,
    config: ProducerConfig,
    partition: Option<i32>,
) -> usize {
    client
        .create_topic(NewTopic::new(topic, PARTITIONS, 1))
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), config).unwrap();
    let mut bytes = 0;
    for i in 0..RECORDS {
        let (key, v) = (format!("k{i}"), value(i));
        bytes += key.len() + v.len();
        let mut record = ProducerRecord::to(topic)
            .key(key.as_bytes())
            .value(v.as_bytes());
        if let Some(p) = partition {
            record = record.partition(p);
        }
        producer.send(record).await.unwrap();
    }
    producer.flush().await.unwrap();
    bytes
}

/// Every record of `topic` as librdkafka reads it: (partition, offset,
/// key, value).
fn librdkafka_reads(bootstrap: &str, topic: &str) -> Vec<(i32, i64, String, String)> {
    let out = librdkafka(&[
        "consume",
        bootstrap,
        topic,
        &RECORDS.to_string(),
        &PARTITIONS.to_string(),
    ]);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The codec ids of every data batch of `topic`, read raw.
async fn codecs_in(client: &Client, topic: &str) -> BTreeSet<i16> {
    batches_in(client, topic)
        .await
        .into_iter()
        .map(|(_, codec)| codec)
        .collect()
}

/// Every data batch of `topic`, read raw: (partition, codec id).
async fn batches_in(client: &Client, topic: &str) -> Vec<(i32, i16)> {
    let conn = client.any_broker().await.unwrap();
    let mut batches = Vec::new();
    for p in 0..PARTITIONS {
        let mut offset = 0;
        loop {
            let req = FetchRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_max_wait_ms(100)
                .with_min_bytes(1)
                .with_max_bytes(16 << 20)
                .with_isolation_level(0)
                .with_session_epoch(-1)
                .with_topics(vec![FetchTopic::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.to_owned())))
                    .with_partitions(vec![FetchPartition::default()
                        .with_partition(p)
                        .with_fetch_offset(offset)
                        .with_current_leader_epoch(-1)
                        .with_log_start_offset(-1)
                        .with_partition_max_bytes(8 << 20)])]);
            let resp = conn.send(&req).await.unwrap();
            let data = resp.responses[0].partitions[0]
                .records
                .clone()
                .unwrap_or_default();
            let before = offset;
            for batch in BatchDecoder::new(data, true) {
                let batch = batch.unwrap();
                if batch.last_offset() >= offset {
                    offset = batch.last_offset() + 1;
                    if !batch.is_control() {
                        batches.push((p, batch.attributes & 7));
                    }
                }
            }
            if offset == before {
                break;
            }
        }
    }
    batches
}

/// Every record of `topic` as Strom's consumer reads it: (partition,
/// offset, key, value), in offset order per partition.
async fn strom_reads(client: &Client, topic: &str, n: usize) -> Vec<(i32, i64, String, String)> {
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign((0..PARTITIONS).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))
        .unwrap();
    let mut out = Vec::new();
    while out.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(60), consumer.poll())
            .await
            .unwrap_or_else(|_| panic!("Strom read {} of {n} records of {topic}", out.len()))
            .unwrap();
        for r in batch {
            let text = |b: Option<bytes::Bytes>| {
                String::from_utf8(b.unwrap_or_default().to_vec()).unwrap()
            };
            out.push((r.partition, r.offset, text(r.key), text(r.value)));
        }
    }
    out
}

/// Checks that `got` holds each record `k{i}`/`value(i)` exactly once and
/// that offsets rise within each partition.
fn assert_exact(codec: Compression, got: &[(i32, i64, String, String)]) {
    let mut last: BTreeMap<i32, i64> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for (p, offset, key, v) in got {
        assert!(
            last.insert(*p, *offset)
                .is_none_or(|before| before < *offset),
            "{codec}: offsets out of order in partition {p}"
        );
        let i: usize = key[1..]
            .parse()
            .unwrap_or_else(|_| panic!("{codec}: bad key {key:?}"));
        assert_eq!(v, &value(i), "{codec}: value of {key}");
        assert!(seen.insert(i), "{codec}: {key} read twice");
    }
    assert_eq!(seen.len(), RECORDS, "{codec}: records missing");
}

/// Records Strom writes with each codec are read exactly by librdkafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_reads_what_strom_writes_with_every_codec() {
    let broker = TestBroker::start().await;
    eprintln!("broker: {:?}", broker.kind);
    let client = broker.client().await;
    for codec in Compression::ALL {
        let topic = unique_topic(&format!("from-strom-{codec}"));
        let config = ProducerConfig {
            compression: codec,
            ..ProducerConfig::default()
        };
        strom_writes(&client, &topic, config, None).await;
        assert_eq!(
            codecs_in(&client, &topic).await,
            BTreeSet::from([codec.id()]),
            "{codec}: the batches do not carry the codec"
        );
        assert_exact(codec, &librdkafka_reads(&broker.bootstrap, &topic));
        eprintln!("{codec}: librdkafka read all {RECORDS} records Strom wrote");
    }
}

/// One zstd batch bigger than a zstd block (128 KiB), so its frame has
/// several blocks whose matches reach back across them, is read exactly by
/// librdkafka (libzstd).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn librdkafka_reads_a_zstd_batch_of_several_blocks() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let topic = unique_topic("from-strom-zstd-blocks");
    let config = ProducerConfig {
        compression: Compression::Zstd,
        linger: Duration::from_secs(30),
        ..ProducerConfig::default()
    };
    let bytes = strom_writes(&client, &topic, config, Some(0)).await;
    assert!(bytes > 128 << 10, "only {bytes} bytes: one block");
    assert_eq!(
        batches_in(&client, &topic).await,
        [(0, Compression::Zstd.id())]
    );
    assert_exact(
        Compression::Zstd,
        &librdkafka_reads(&broker.bootstrap, &topic),
    );
    eprintln!("librdkafka read one zstd batch of {bytes} bytes of keys and values exactly");
}

/// Records librdkafka writes with each codec are read exactly by Strom.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strom_reads_what_librdkafka_writes_with_every_codec() {
    let broker = TestBroker::start().await;
    eprintln!("broker: {:?}", broker.kind);
    let client = broker.client().await;
    for codec in Compression::ALL {
        let topic = unique_topic(&format!("from-librdkafka-{codec}"));
        client
            .create_topic(NewTopic::new(&topic, PARTITIONS, 1))
            .await
            .unwrap();
        librdkafka(&[
            "produce",
            &broker.bootstrap,
            &topic,
            &RECORDS.to_string(),
            codec.name(),
        ]);
        // librdkafka sends a batch uncompressed when compressing does not
        // make it smaller (a lone record, say): most carry the codec.
        let codecs = codecs_in(&client, &topic).await;
        assert!(
            codecs.contains(&codec.id()) && codecs.iter().all(|&c| c == codec.id() || c == 0),
            "{codec}: librdkafka's batches carry codecs {codecs:?}"
        );
        assert_exact(codec, &strom_reads(&client, &topic, RECORDS).await);
        eprintln!("{codec}: Strom read all {RECORDS} records librdkafka wrote");
    }
}

/// A zstd-compressed source topic, written by librdkafka, through the
/// wordcount worker: every word is counted exactly. The worker, told to
/// compress with snappy, writes its outputs and its changelog in snappy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordcount_counts_a_zstd_topic_exactly() {
    let broker = TestBroker::start().await;
    eprintln!("broker: {:?}", broker.kind);
    let client = broker.client().await;
    let (input, output) = (unique_topic("zstd-lines"), unique_topic("zstd-counts"));
    client
        .create_topic(NewTopic::new(&input, PARTITIONS, 1))
        .await
        .unwrap();
    let line = "the quick brown fox jumps over the lazy dog";
    librdkafka(&["produce", &broker.bootstrap, &input, "2000", "zstd", line]);
    let codecs = codecs_in(&client, &input).await;
    assert!(codecs.contains(&4), "the input is not zstd: {codecs:?}");
    let id = unique_topic("zstd-wc");
    let app = App::new(&id)
        .with_compression(Compression::Snappy)
        .with_brokers([broker.bootstrap.clone()])
        .with_static_membership(broker.static_membership())
        .with_partitions(PARTITIONS)
        .with_processing_guarantee(ProcessingGuarantee::AtLeastOnce)
        .with_state_dir(std::env::temp_dir().join(unique_topic("zstd-state")));
    let (stop, worker) = strom_it::spawn_app(strom_it::wordcount(app, &input, &output));
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for w in line.split_whitespace() {
        *truth.entry(w.to_owned()).or_default() += 2000;
    }
    strom_it::wait_for_topic(&client, &output).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let counts = strom_it::last_counts(&client, &output).await;
        let got: BTreeMap<String, u64> = counts.into_iter().collect();
        if got == truth {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts of the zstd topic: {got:?}, expected {truth:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop.send(());
    worker.await.unwrap();
    eprintln!("the wordcount worker counted 2000 zstd-compressed lines exactly");
    let changelog = strom_state::changelog::topic_name(&id, "word-counts");
    for topic in [&output, &changelog] {
        assert_eq!(
            codecs_in(&client, topic).await,
            BTreeSet::from([Compression::Snappy.id()]),
            "{topic} is not written with the worker's codec"
        );
    }
}
