//! `strom-bench join`: N page views enriched from a global table of 100,000
//! user profiles (stream–GlobalTable left join), one worker in this process;
//! and, before it, the time to restore that table from its topic.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use strom::codec::Utf8;
use strom::{App, StoreKind};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::IsolationLevel;
use strom_client::{Client, Error, NewTopic};
use strom_state::global::GlobalStore;
use strom_state::{recover_with_progress, RecoveryProgress, RedbStore};

use super::{client_config, StateArgs};

/// Profiles in the global table.
const USERS: u64 = 100_000;

#[derive(Serialize, Deserialize, Default)]
struct Profile {
    name: String,
    country: String,
}

#[derive(Serialize, Deserialize)]
struct View {
    url: String,
}

fn user(i: u64) -> String {
    format!("u{i}")
}

/// Sends the profiles (3 partitions) and the `n` views (6 partitions).
async fn feed(client: &Client, profiles: &str, views: &str, n: u64) -> Result<(), Error> {
    client.create_topic(NewTopic::new(profiles, 3, 1)).await?;
    client.create_topic(NewTopic::new(views, 6, 1)).await?;
    let producer = Producer::new(client.clone(), ProducerConfig::default())?;
    for i in 0..USERS {
        let profile = Profile {
            name: format!("user {i}"),
            country: ["DE", "IN", "BR", "US"][(i % 4) as usize].into(),
        };
        let value = serde_json::to_vec(&profile).map_err(|e| Error::Config(e.to_string()))?;
        let key = user(i);
        let record = ProducerRecord::to(profiles)
            .key(key.as_bytes())
            .value(&value);
        producer.send(record).await?;
    }
    for i in 0..n {
        // 1 view in 50 of a user without a profile.
        let key = user((i * 7919) % (USERS + USERS / 50));
        let value = serde_json::to_vec(&View {
            url: format!("/page/{}", i % 1000),
        })
        .map_err(|e| Error::Config(e.to_string()))?;
        producer
            .send(ProducerRecord::to(views).key(key.as_bytes()).value(&value))
            .await?;
    }
    producer.flush().await
}

/// Restores the profiles into a fresh store, as a worker does at start:
/// (records, seconds).
async fn restore(client: &Client, topic: &str, dir: &std::path::Path) -> Result<(u64, f64), Error> {
    let err = |e: strom_state::StateError| Error::Config(e.to_string());
    let store = RedbStore::open(dir.join("restore-bench.redb")).map_err(err)?;
    let global = GlobalStore::new(Arc::new(store));
    let started = Instant::now();
    let mut restoring = tokio::task::JoinSet::new();
    for p in 0..3 {
        let (client, part, topic) = (client.clone(), global.partition(p), topic.to_owned());
        restoring.spawn(async move {
            let progress = RecoveryProgress::default();
            let isolation = IsolationLevel::ReadUncommitted;
            recover_with_progress(&client, part, &topic, p, isolation, &progress).await
        });
    }
    let mut records = 0;
    while let Some(done) = restoring.join_next().await {
        let done = done.map_err(|e| Error::Config(e.to_string()))?;
        records += done.map_err(err)?.replayed;
    }
    let seconds = started.elapsed().as_secs_f64();
    let held = global.len().map_err(err)?;
    if held != USERS {
        return Err(Error::Config(format!(
            "restored {held} profiles, not {USERS}"
        )));
    }
    Ok((records, seconds))
}

pub(super) async fn run(args: &StateArgs) -> Result<bool, Error> {
    let n = args.messages;
    if n == 0 {
        return Err(Error::Config("--messages must be at least 1".into()));
    }
    let run_id = std::process::id();
    let (id, profiles, views, enriched) = (
        format!("strom-join-{run_id}"),
        format!("join-profiles-{run_id}"),
        format!("join-views-{run_id}"),
        format!("join-enriched-{run_id}"),
    );
    let client = Client::connect(client_config(&args.brokers)?).await?;
    feed(&client, &profiles, &views, n).await?;
    let state_dir = args
        .state_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("strom-join-{run_id}")));
    std::fs::create_dir_all(&state_dir).map_err(|e| Error::Config(e.to_string()))?;
    let (restored, restore_seconds) = restore(&client, &profiles, &state_dir).await?;

    let app = App::new(&id)
        .with_brokers(args.brokers.split(',').map(str::trim))
        .with_state_dir(&state_dir)
        .with_store(StoreKind::Redb)
        .with_partitions(6)
        .with_web(None)
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
    let mut app = args.budget(app);
    let users = app.topic::<String, Profile>(&profiles).with_key_codec(Utf8);
    let table = app.global_table("profiles", &users);
    let views = app.topic::<String, View>(&views).with_key_codec(Utf8);
    let out = app
        .topic::<String, (String, String, String)>(&enriched)
        .with_key_codec(Utf8);
    let processed = Arc::new(AtomicU64::new(0));
    let wrong = Arc::new(AtomicU64::new(0));
    let first: Arc<Mutex<Option<Instant>>> = Arc::default();
    let (done_tx, mut done_rx) = tokio::sync::watch::channel(false);
    {
        let (processed, wrong, first) = (processed.clone(), wrong.clone(), first.clone());
        app.agent(&views)
            .left_join_global(
                &table,
                |e| e.key.clone(),
                |view, profile| (view.url, profile.unwrap_or_default()),
            )
            .for_each(move |ctx, e| {
                let (out, processed, wrong, first, done_tx) = (
                    out.clone(),
                    processed.clone(),
                    wrong.clone(),
                    first.clone(),
                    done_tx.clone(),
                );
                async move {
                    first
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(Instant::now);
                    let (url, profile) = e.value;
                    let i: u64 = e.key[1..].parse().unwrap_or(u64::MAX);
                    let expected = if i < USERS {
                        format!("user {i}")
                    } else {
                        String::new()
                    };
                    if profile.name != expected {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    let value = (profile.name, profile.country, url);
                    ctx.send(&out, &e.key, &value).await?;
                    if processed.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        let _ = done_tx.send(true);
                    }
                    Ok(())
                }
            });
    }
    let started = Instant::now();
    app.run(async move {
        let _ = done_rx.wait_for(|d| *d).await;
    })
    .await
    .map_err(|e| Error::Config(e.to_string()))?;
    let end = Instant::now();
    let first = first
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or(end);
    let seconds = end.duration_since(first).as_secs_f64();
    let wrong = wrong.load(Ordering::Relaxed);
    let processed = processed.load(Ordering::Relaxed);
    let correct = wrong == 0 && processed == n;
    let _ = std::fs::remove_dir_all(&state_dir)
        .ok()
        .filter(|_| args.state_dir.is_none());
    super::print(json!({
        "op": "join",
        "events": n,
        "seconds": seconds,
        "events_per_s": n as f64 / seconds,
        "peak_rss_mb": super::state_bench::peak_rss_mb(),
        "table_keys": USERS,
        "restore_records": restored,
        "restore_seconds": restore_seconds,
        "restore_records_per_s": restored as f64 / restore_seconds,
        "start_to_first_event_seconds": first.duration_since(started).as_secs_f64(),
        "wrong_profiles": wrong,
        "correct": correct,
    }));
    Ok(correct)
}
