//! Operating workers: the web server (tables with redirects, readiness,
//! metrics, the app's pages), timers across workers, a frozen broker, lost
//! connections. Error policies and timers of one worker are tested without a
//! broker, on the test driver (streams/tests/operators.rs).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom::axum::routing::get;
use strom::axum::Router;
use strom::codec::Utf8;
use strom::{App, StoreKind};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_it::{free_port, http_get, metric_sum, parse_metrics, unique_topic, TestBroker};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// An app with the test's timings, its web server on 127.0.0.1:`port`.
fn app(id: &str, broker: &TestBroker, port: u16, partitions: i32) -> App {
    App::new(id)
        .with_brokers([broker.bootstrap.clone()])
        .with_static_membership(broker.static_membership())
        .with_state_dir(std::env::temp_dir().join(unique_topic("operate-state")))
        .with_store(StoreKind::Redb)
        .with_partitions(partitions)
        .with_commit_interval(Duration::from_millis(200))
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1))
        .with_web(Some(SocketAddr::from(([127, 0, 0, 1], port))))
        .with_advertised_url(format!("http://127.0.0.1:{port}"))
}

async fn stop(worker: (oneshot::Sender<()>, tokio::task::JoinHandle<()>)) {
    let _ = worker.0.send(());
    worker.1.await.unwrap();
}

/// Waits until `check` holds, polling; panics with `what` after 90 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(90);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn metrics(port: u16) -> Vec<(String, std::collections::HashMap<String, String>, f64)> {
    let r = http_get(&format!("http://127.0.0.1:{port}/metrics"))
        .await
        .expect("no metrics endpoint");
    assert_eq!(r.status, 200);
    assert!(
        r.headers
            .get("content-type")
            .is_some_and(|t| t.contains("openmetrics-text")),
        "metrics content type: {:?}",
        r.headers
    );
    parse_metrics(&r.body)
}

/// Both workers' `/assignment` list two members, each processing something.
async fn settled(ports: &[u16]) -> bool {
    for port in ports {
        let Some(r) = http_get(&format!("http://127.0.0.1:{port}/assignment")).await else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let members = v["members"].as_array().cloned().unwrap_or_default();
        if members.len() != ports.len()
            || members
                .iter()
                .any(|m| m["active"].as_array().is_none_or(Vec::is_empty))
        {
            return false;
        }
    }
    true
}

/// The value of `word` in table word-counts asked of the worker on `port`:
/// (answered directly, the count) or through a redirect.
async fn lookup(port: u16, word: &str, other: u16) -> (bool, Option<u64>) {
    let url = format!("http://127.0.0.1:{port}/tables/word-counts/{word}");
    let first = http_get(&url).await.expect("no table endpoint");
    let (direct, answer) = match first.status {
        307 => {
            let location = first
                .headers
                .get("location")
                .expect("redirect without location");
            assert!(
                location.starts_with(&format!("http://127.0.0.1:{other}/tables/word-counts/")),
                "redirected to {location}, not to the other worker"
            );
            (
                false,
                http_get(location).await.expect("redirect target down"),
            )
        }
        _ => (true, first),
    };
    match answer.status {
        200 => (direct, Some(answer.body.trim().parse().unwrap())),
        404 => (direct, None),
        s => panic!("lookup of {word} on {port}: status {s}: {}", answer.body),
    }
}

/// Two workers answer table lookups with the true counts, one of them through
/// a redirect to the owner; the app's own page answers; `/metrics` parses
/// and counts every event in;
/// a worker joining later is 503 on `/ready` while it recovers, 200 after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_tables_redirect_readiness_and_metrics() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("web"),
        unique_topic("web-in"),
        unique_topic("web-out"),
    );
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let a = strom_it::spawn_app(strom_it::wordcount(
        app(&id, &broker, pa, 4)
            .page(Router::new().route("/hello", get(|| async { "hello from the app" }))),
        &input,
        &output,
    ));
    strom_it::wait_for_topic(&client, &input).await;
    let health = http_get(&format!("http://127.0.0.1:{pa}/health"))
        .await
        .unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok"));
    let page = http_get(&format!("http://127.0.0.1:{pa}/hello"))
        .await
        .unwrap();
    assert_eq!(
        (page.status, page.body.as_str()),
        (200, "hello from the app")
    );

    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let sentences = 2_000;
    for i in 0..sentences {
        let line = format!("w{} w{}", i % 37, (i * 3) % 11);
        for w in line.split_whitespace() {
            *truth.entry(w.to_owned()).or_default() += 1;
        }
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    eventually("worker a counted every word", || async {
        let last = strom_it::last_counts(&client, &output).await;
        truth.iter().all(|(w, n)| last.get(w) == Some(n))
    })
    .await;

    let samples = metrics(pa).await;
    assert_eq!(
        metric_sum(&samples, "strom_events_in_total", ("topic", &input)),
        f64::from(sentences),
        "events in"
    );
    assert!(
        metric_sum(
            &samples,
            "strom_table_writes_total",
            ("table", "word-counts")
        ) > 0.0
    );
    assert!(samples
        .iter()
        .any(|(n, _, v)| n == "strom_processing_seconds_count" && *v > 0.0));

    let b = strom_it::spawn_app(strom_it::wordcount(
        app(&id, &broker, pb, 4),
        &input,
        &output,
    ));
    let both = [pa, pb];
    eventually("both workers process partitions", || settled(&both)).await;
    eventually("worker b ready", || async {
        http_get(&format!("http://127.0.0.1:{pb}/ready"))
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;
    let (mut direct, mut redirected) = (0, 0);
    for (word, n) in &truth {
        let (was_direct, got) = lookup(pa, word, pb).await;
        assert_eq!(got, Some(*n), "{word} asked of worker a");
        if was_direct {
            direct += 1;
        } else {
            redirected += 1;
        }
        assert_eq!(
            lookup(pb, word, pa).await.1,
            Some(*n),
            "{word} asked of worker b"
        );
    }
    assert!(
        direct > 0 && redirected > 0,
        "direct {direct}, redirected {redirected}"
    );
    assert_eq!(lookup(pa, "never-sent", pb).await.1, None);
    let missing = http_get(&format!("http://127.0.0.1:{pa}/tables/no-such-table/x"))
        .await
        .unwrap();
    assert_eq!(missing.status, 404);

    // A third worker with nothing on disk: 503 while it recovers, then 200.
    let c = strom_it::spawn_app(strom_it::wordcount(
        app(&id, &broker, pc, 4).with_store(StoreKind::Memory),
        &input,
        &output,
    ));
    let (mut saw_recovering, deadline) = (false, Instant::now() + Duration::from_secs(90));
    loop {
        if let Some(r) = http_get(&format!("http://127.0.0.1:{pc}/ready")).await {
            if r.status == 503 && r.body.contains("recovering") {
                saw_recovering = true;
            }
            if r.status == 200 && saw_recovering {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "worker c never became ready after recovering"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let samples = metrics(pc).await;
    assert!(
        metric_sum(
            &samples,
            "strom_recovery_replayed",
            ("table", "word-counts")
        ) > 0.0,
        "worker c replayed nothing into its in-memory tables"
    );
    assert!(
        samples
            .iter()
            .any(|(n, l, _)| n == "strom_partition_ready" && l.contains_key("partition")),
        "no partition readiness"
    );
    eventually("consumer lag reported", || async {
        metrics(pc)
            .await
            .iter()
            .any(|(n, l, _)| n == "strom_consumer_lag" && l.get("topic") == Some(&input))
    })
    .await;
    for w in [c, b, a] {
        stop(w).await;
    }
}

/// A leader-only timer runs on exactly one of two workers, and on the other
/// once that one stops; a plain timer runs on both; a cron timer fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_timer_runs_once_and_moves() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input) = (unique_topic("timers"), unique_topic("timers-in"));
    let leader_runs: Arc<Mutex<Vec<usize>>> = Arc::default();
    let every_runs: Arc<Mutex<Vec<usize>>> = Arc::default();
    let cron_runs = Arc::new(AtomicU64::new(0));
    let ports = [free_port(), free_port()];
    let mut workers = Vec::new();
    for (n, port) in ports.iter().enumerate() {
        let mut app = app(&id, &broker, *port, 2);
        let numbers = app.topic::<String, u64>(&input).with_key_codec(Utf8);
        app.agent(&numbers).for_each(|_ctx, _e| async { Ok(()) });
        let runs = leader_runs.clone();
        app.leader_timer(Duration::from_millis(100), move |ctx| {
            assert!(ctx.is_leader());
            runs.lock().unwrap().push(n);
            async { Ok(()) }
        });
        let runs = every_runs.clone();
        app.timer(Duration::from_millis(100), move |_ctx| {
            runs.lock().unwrap().push(n);
            async { Ok(()) }
        });
        let runs = cron_runs.clone();
        app.crontab("* * * * * *", "Europe/Berlin", move |_ctx| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        })
        .unwrap();
        workers.push(Some(strom_it::spawn_app(app)));
        if n == 0 {
            strom_it::wait_for_topic(&client, &input).await;
        }
    }
    eventually("both workers process partitions", || settled(&ports)).await;
    leader_runs.lock().unwrap().clear();
    every_runs.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let leaders: std::collections::BTreeSet<usize> =
        leader_runs.lock().unwrap().iter().copied().collect();
    assert_eq!(leaders.len(), 1, "leader timer ran on {leaders:?}");
    let everyone: std::collections::BTreeSet<usize> =
        every_runs.lock().unwrap().iter().copied().collect();
    assert_eq!(everyone, [0, 1].into(), "plain timer ran on {everyone:?}");
    assert!(
        cron_runs.load(Ordering::SeqCst) >= 1,
        "the cron timer never fired"
    );

    let leader = *leaders.iter().next().unwrap();
    let other = 1 - leader;
    stop(workers[leader].take().unwrap()).await;
    leader_runs.lock().unwrap().clear();
    eventually("the other worker takes the leader timer over", || async {
        leader_runs.lock().unwrap().contains(&other)
    })
    .await;
    stop(workers[other].take().unwrap()).await;
}

/// The broker frozen (`docker pause`) for longer than the session timeout
/// while words keep coming: the worker counts itself out of the group, so
/// `/ready` answers 503; once the broker is back it rejoins, `/ready` is 200
/// again, and no word is under-counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_broker_makes_the_worker_unready_then_it_recovers_exactly() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("frozen"),
        unique_topic("frozen-in"),
        unique_topic("frozen-out"),
    );
    let port = free_port();
    let worker = strom_it::spawn_app(strom_it::wordcount(
        app(&id, &broker, port, 2),
        &input,
        &output,
    ));
    strom_it::wait_for_topic(&client, &input).await;
    let ready = || async move {
        http_get(&format!("http://127.0.0.1:{port}/ready"))
            .await
            .map(|r| r.status)
    };
    eventually("the worker is ready", || async {
        ready().await == Some(200)
    })
    .await;

    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    let mut send = |from: u64, to: u64| {
        let mut lines = Vec::new();
        for i in from..to {
            let line = format!("f{} g{}", i % 13, i % 7);
            for w in line.split_whitespace() {
                *truth.entry(w.to_owned()).or_default() += 1;
            }
            lines.push(line);
        }
        lines
    };
    for line in send(0, 2_000) {
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let later = send(2_000, 4_000);

    if !broker.freeze().await {
        println!("a_frozen_broker…: NOT checked (an external broker cannot be frozen)");
        stop(worker).await;
        return;
    }
    let frozen = Instant::now();
    // The session (6 s) runs out without heartbeats: the worker owns nothing.
    let mut unready = false;
    while frozen.elapsed() < Duration::from_secs(15) {
        if ready().await == Some(503) {
            unready = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    broker.thaw().await;
    assert!(
        unready,
        "/ready never answered 503 while the broker was frozen for 15 s"
    );
    for line in later {
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    eventually("the worker is ready again", || async {
        ready().await == Some(200)
    })
    .await;
    eventually("every word counted", || async {
        let last = strom_it::last_counts(&client, &output).await;
        truth
            .iter()
            .all(|(w, n)| last.get(w).is_some_and(|c| c >= n))
    })
    .await;
    stop(worker).await;
    let table = strom_it::last_counts(&client, &format!("{id}-word-counts-changelog")).await;
    for (w, n) in &truth {
        assert!(
            table.get(w).is_some_and(|c| c >= n),
            "{w}: {:?} < {n}",
            table.get(w)
        );
    }
}

/// The sum of the unlabelled metric `name` on the worker at `port`.
async fn counter(port: u16, name: &str) -> f64 {
    metrics(port)
        .await
        .iter()
        .filter(|(n, _, _)| n == name)
        .map(|(_, _, v)| v)
        .sum()
}

/// Every connection through the fault proxy reset three times, then stalled
/// for 8 s (longer than the 6 s session), while words keep coming: no word is
/// under-counted, and the lost connections are counted in `/metrics`
/// (`strom_client_connections_lost_total`; the client also logs each at WARN
/// once per incident).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_stalls_under_load_lose_nothing_and_are_counted() {
    let Some((broker, proxy)) = TestBroker::start_behind_proxy().await else {
        println!("resets_and_stalls…: NOT checked (an external broker cannot be put behind the fault proxy)");
        return;
    };
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("faults"),
        unique_topic("faults-in"),
        unique_topic("faults-out"),
    );
    let port = free_port();
    let worker = strom_it::spawn_app(strom_it::wordcount(
        app(&id, &broker, port, 2),
        &input,
        &output,
    ));
    strom_it::wait_for_topic(&client, &input).await;
    eventually("the worker is ready", || async {
        http_get(&format!("http://127.0.0.1:{port}/ready"))
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;
    let lost_before = counter(port, "strom_client_connections_lost_total").await;

    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for round in 0..5u64 {
        for i in round * 1_500..(round + 1) * 1_500 {
            let line = format!("r{} s{}", i % 11, i % 17);
            for w in line.split_whitespace() {
                *truth.entry(w.to_owned()).or_default() += 1;
            }
            producer
                .send(ProducerRecord::to(&input).value(line.as_bytes()))
                .await
                .unwrap();
        }
        match round {
            0..=2 => proxy.reset_connections(),
            3 => proxy.stall(Duration::from_secs(8)),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    producer.flush().await.unwrap();
    eventually("every word counted", || async {
        let last = strom_it::last_counts(&client, &output).await;
        truth
            .iter()
            .all(|(w, n)| last.get(w).is_some_and(|c| c >= n))
    })
    .await;
    let lost = counter(port, "strom_client_connections_lost_total").await - lost_before;
    assert!(
        lost >= 3.0,
        "only {lost} lost connections counted after 3 resets"
    );
    println!("lost connections counted: {lost}");
    stop(worker).await;
    let table = strom_it::last_counts(&client, &format!("{id}-word-counts-changelog")).await;
    for (w, n) in &truth {
        assert!(
            table.get(w).is_some_and(|c| c >= n),
            "{w}: {:?} < {n}",
            table.get(w)
        );
    }
}
