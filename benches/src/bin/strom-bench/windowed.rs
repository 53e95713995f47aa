//! `windowed` and `windowed-feed`: per-key counts in one-minute tumbling
//! windows, results on close, over N events of 1,000 keys whose event
//! times spread over 30 minutes. `benches/quix_windowed.py` runs the same
//! workload on Quix Streams (`tumbling_window(...).count().final()`) over
//! the topic `windowed-feed` fills.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use strom::codec::Utf8;
use strom::{App, StoreKind};
use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, Error, IsolationLevel, NewTopic};

use super::client_config;

/// Keys of the workload.
const KEYS: u64 = 1_000;
/// How far the event times spread.
const SPAN_MS: i64 = 30 * 60_000;
const MINUTE: i64 = 60_000;
const PARTITIONS: i32 = 6;

/// The `i`th of `n` events: its key and time (from `base`, a minute).
fn event(i: u64, n: u64, base: i64) -> (String, i64) {
    let key = format!("key{}", (i * 7919) % KEYS);
    let t = base + (i as i64 * SPAN_MS) / n.max(1) as i64;
    (key, t)
}

/// The closing events: one per key, two minutes after the span, so that
/// every window of the workload closes (whether windows close per
/// partition or per key).
fn closing(k: u64, base: i64) -> (String, i64) {
    (format!("key{k}"), base + SPAN_MS + 2 * MINUTE)
}

/// (key, window start) → count of the workload's windows.
pub(super) fn expected(n: u64, base: i64) -> BTreeMap<(String, i64), u64> {
    let mut truth = BTreeMap::new();
    for i in 0..n {
        let (key, t) = event(i, n, base);
        *truth.entry((key, t - t.rem_euclid(MINUTE))).or_default() += 1;
    }
    truth
}

/// Creates `topic` and sends the workload's `n` events, then the closing
/// ones: value `1`, time = the event time. Returns the base time.
pub(super) async fn feed(client: &Client, topic: &str, n: u64) -> Result<i64, Error> {
    // Retention given explicitly: Quix Streams derives its changelogs'
    // from the input's, which some brokers (tansu) report only when set.
    let new = NewTopic::new(topic, PARTITIONS, 1).config("retention.ms", "604800000");
    client.create_topic(new).await?;
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            buffer_memory: 64 << 20,
            ..ProducerConfig::default()
        },
    )?;
    // An hour ago, on a minute: recent enough for any retention.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let base = (now - 3_600_000) / MINUTE * MINUTE;
    let events = (0..n).map(|i| event(i, n, base));
    for (key, t) in events.chain((0..KEYS).map(|k| closing(k, base))) {
        let record = ProducerRecord::to(topic)
            .key(key.as_bytes())
            .value(b"1")
            .timestamp(t);
        producer.send(record).await?;
    }
    producer.flush().await?;
    Ok(base)
}

/// `windowed-feed`: fills `topic` and prints its base time for the Quix
/// script.
pub(super) async fn feed_only(brokers: &str, topic: &str, n: u64) -> Result<bool, Error> {
    let client = Client::connect(client_config(brokers)?).await?;
    let started = Instant::now();
    let base = feed(&client, topic, n).await?;
    super::print(json!({
        "op": "windowed-feed",
        "topic": topic,
        "events": n,
        "closing_events": KEYS,
        "base_ms": base,
        "windows": expected(n, base).len(),
        "seconds": started.elapsed().as_secs_f64(),
    }));
    Ok(true)
}

/// Every window result `topic` holds: (key, start) → counts.
async fn results(client: &Client, topic: &str) -> Result<BTreeMap<(String, i64), Vec<u64>>, Error> {
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            isolation: IsolationLevel::ReadCommitted,
            ..ConsumerConfig::default()
        },
    );
    consumer.assign((0..PARTITIONS).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))?;
    let mut out: BTreeMap<(String, i64), Vec<u64>> = BTreeMap::new();
    while let Ok(batch) = tokio::time::timeout(Duration::from_secs(3), consumer.poll()).await {
        for r in batch? {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let value: (i64, u64) = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
                .map_err(|e| Error::Config(format!("a result does not decode: {e}")))?;
            out.entry((key, value.0)).or_default().push(value.1);
        }
    }
    Ok(out)
}

/// `windowed`: the workload through one Strom worker in this process, over
/// `topic` as `windowed-feed` filled it (with `base`), or over a topic it
/// fills first.
pub(super) async fn run(
    brokers: &str,
    n: u64,
    fed: Option<(String, i64)>,
    guarantee: strom::ProcessingGuarantee,
    expires: Option<Duration>,
) -> Result<bool, Error> {
    let run_id = std::process::id();
    let client = Client::connect(client_config(brokers)?).await?;
    let (input, base) = match fed {
        Some(fed) => fed,
        None => {
            let topic = format!("windowed-events-{run_id}");
            let base = feed(&client, &topic, n).await?;
            (topic, base)
        }
    };
    let truth = expected(n, base);
    let (id, output) = (
        format!("strom-windowed-{run_id}"),
        format!("windowed-results-{run_id}"),
    );
    let state_dir = std::env::temp_dir().join(&id);
    let mut app = App::new(&id)
        .with_brokers(brokers.split(',').map(str::trim))
        .with_state_dir(&state_dir)
        .with_store(StoreKind::Redb)
        .with_partitions(PARTITIONS)
        .with_processing_guarantee(guarantee)
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
    let events = app.topic::<String, u64>(&input).with_key_codec(Utf8);
    let results_topic = app
        .topic::<String, (i64, u64)>(&output)
        .with_key_codec(Utf8);
    let emitted = Arc::new(AtomicU64::new(0));
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    let windows = truth.len() as u64;
    let counts = {
        let emitted = emitted.clone();
        let table = app
            .table::<String, u64>("counts", 0)
            .with_key_codec(Utf8)
            .tumbling(Duration::from_millis(MINUTE as u64));
        match expires {
            Some(d) => table.expires(d),
            None => table,
        }
        .emit_on_close(move |ctx, key, window, count| {
            let (out, emitted, done_tx) = (results_topic.clone(), emitted.clone(), done_tx.clone());
            async move {
                ctx.send(&out, &key, &(window.start, count)).await?;
                if emitted.fetch_add(1, Ordering::Relaxed) + 1 == windows {
                    let _ = done_tx.send(true);
                }
                Ok(())
            }
        })
    };
    let processed = Arc::new(AtomicU64::new(0));
    {
        let (first, processed) = (first.clone(), processed.clone());
        app.agent(&events).for_each(move |ctx, event| {
            let (counts, first, processed) = (counts.clone(), first.clone(), processed.clone());
            async move {
                first
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(Instant::now);
                ctx.update_windows(&counts, &event.key, |c| c + 1).await?;
                processed.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        });
    }
    // The store files' size every half second, by events processed.
    let samples: Arc<Mutex<Vec<(u64, f64)>>> = Arc::default();
    let sampler = {
        let (samples, dir, mut done) = (samples.clone(), state_dir.clone(), done_rx.clone());
        tokio::spawn(async move {
            while !*done.borrow() {
                let mb = files_size(&dir) as f64 / 1e6;
                let at = processed.load(Ordering::Relaxed);
                samples
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((at, mb));
                let _ = tokio::time::timeout(Duration::from_millis(500), done.changed()).await;
            }
        })
    };
    app.run(async move {
        let _ = done_rx.wait_for(|d| *d).await;
    })
    .await
    .map_err(|e| Error::Config(e.to_string()))?;
    let _ = sampler.await;
    let store_mb = super::by_quarter(&samples.lock().unwrap_or_else(|e| e.into_inner()), n);
    // run() returns after the final checkpoint: every result acknowledged.
    let end = Instant::now();
    let start = first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(end);
    let seconds = end.duration_since(start).as_secs_f64();
    let got = results(&client, &output).await?;
    let once: BTreeMap<(String, i64), u64> = got
        .iter()
        .filter(|(_, v)| v.len() == 1)
        .map(|(k, v)| (k.clone(), v[0]))
        .collect();
    let correct = once == truth && got.len() == truth.len();
    let _ = std::fs::remove_dir_all(&state_dir);
    super::print(json!({
        "op": "windowed",
        "events": n + KEYS,
        "windows": truth.len(),
        "windows_sent": got.values().map(Vec::len).sum::<usize>(),
        "seconds": seconds,
        "events_per_s": (n + KEYS) as f64 / seconds,
        "peak_rss_mb": super::state_bench::peak_rss_mb(),
        "guarantee": guarantee.to_string(),
        "store_mb_by_quarter": store_mb,
        "correct": correct,
    }));
    Ok(correct)
}

/// Bytes of the files under `dir`, its subdirectories' included.
fn files_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => files_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
