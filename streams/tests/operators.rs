//! Operator, policy and timer semantics on the test driver: no broker, no
//! real sleeping (the clock is tokio's, paused).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom::codec::{NoKey, Utf8};
use strom::testing::TestDriver;
use strom::{App, ErrorPolicy, Header, Topic};

/// An app with one partition per topic it creates.
fn one_partition_app(id: &str) -> App {
    App::new(id).with_partitions(1)
}

fn text_topic(app: &mut App, name: &str) -> Topic<(), String> {
    app.topic::<(), String>(name)
        .with_key_codec(NoKey)
        .with_value_codec(Utf8)
}

/// The values of the records sent to `topic` since the last read.
fn values<K, V>(driver: &mut TestDriver, topic: &Topic<K, V>) -> Vec<V> {
    let records = driver.read(topic).unwrap();
    records.into_iter().map(|r| r.value).collect()
}

/// The keys and values of the records sent to `topic` since the last read.
fn pairs<K, V>(driver: &mut TestDriver, topic: &Topic<K, V>) -> Vec<(K, V)> {
    let records = driver.read(topic).unwrap();
    records.into_iter().map(|r| (r.key, r.value)).collect()
}

/// The sum of metric `name`'s samples whose labels include `label`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// filter, map, through and enumerate in one agent: empty lines are dropped,
/// the rest upper-cased, written to an intermediate topic, numbered in order.
#[tokio::test]
async fn filter_map_through_enumerate_in_order() {
    let mut app = one_partition_app("ops");
    let lines = text_topic(&mut app, "ops-in");
    let mid = text_topic(&mut app, "ops-mid");
    let out = text_topic(&mut app, "ops-out");
    let sent = out.clone();
    app.agent(&lines)
        .filter(|e| !e.value.is_empty())
        .map(|v: String| v.to_uppercase())
        .through(&mid)
        .enumerate()
        .for_each(move |ctx, e| {
            let out = sent.clone();
            async move {
                let (i, v) = e.value;
                ctx.send(&out, &(), &format!("{i}:{v}")).await?;
                Ok(())
            }
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    for line in ["a", "", "b", "c", "", "d"] {
        driver.send(&lines, &(), &line.to_string()).await.unwrap();
    }
    let got: Vec<String> = values(&mut driver, &out);
    assert_eq!(got, ["0:A", "1:B", "2:C", "3:D"]);
    let middle: Vec<String> = values(&mut driver, &mid);
    assert_eq!(middle, ["A", "B", "C", "D"]);
    assert!(driver.read(&out).unwrap().is_empty(), "read does not drain");
    driver.close().await.unwrap();
}

/// take(n, within) hands on full batches as they fill and the short tail
/// only once `within` passes on the virtual clock; forward keeps key, value and
/// headers; a concurrent agent works on several events at once, within its
/// limit; a sink agent on the same topic sees every event too.
#[tokio::test]
async fn take_forward_concurrency_and_sink() {
    let mut app = one_partition_app("batch");
    let numbers = app.topic::<String, u64>("batch-in").with_key_codec(Utf8);
    let fwd = app.topic::<String, u64>("batch-fwd").with_key_codec(Utf8);
    let out = app
        .topic::<String, u64>("batch-sunk")
        .with_key_codec(Utf8)
        .with_partitions(2);
    let batches: Arc<Mutex<Vec<usize>>> = Arc::default();
    app.agent(&numbers)
        .take(10, Duration::from_secs(5))
        .for_each({
            let (batches, fwd) = (batches.clone(), fwd.clone());
            move |ctx, batch| {
                batches.lock().unwrap().push(batch.len());
                let fwd = fwd.clone();
                async move {
                    for e in &batch {
                        ctx.forward(&fwd, e).await?;
                    }
                    Ok(())
                }
            }
        });
    let (running, peak, handled) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    app.agent(&fwd).concurrency(8).for_each({
        let (running, peak, handled) = (running.clone(), peak.clone(), handled.clone());
        move |_ctx, _e| {
            let (running, peak, handled) = (running.clone(), peak.clone(), handled.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }
    });
    app.agent(&fwd).map(|v: u64| v * 10).sink(&out);
    let mut driver = TestDriver::new(app).await.unwrap();
    let header = [Header::new("trace", "t-1")];
    for i in 0..45u64 {
        driver
            .send_with(&numbers, &"k".to_string(), &i, None, &header)
            .await
            .unwrap();
    }
    // The concurrent agent sleeps 50 ms per event on the virtual clock, and
    // with no slot free its partition waits: let a second pass.
    driver.advance(Duration::from_secs(1)).await.unwrap();
    assert_eq!(*batches.lock().unwrap(), [10, 10, 10, 10]);
    let sunk = driver.read(&out).unwrap();
    assert_eq!(sunk.len(), 40, "the tail of 5 went on before `within`");
    driver.advance(Duration::from_secs(5)).await.unwrap();
    assert_eq!(*batches.lock().unwrap(), [10, 10, 10, 10, 5]);
    let sunk = [sunk, driver.read(&out).unwrap()].concat();
    let values: Vec<u64> = sunk.iter().map(|r| r.value).collect();
    assert_eq!(values, (0..45u64).map(|i| i * 10).collect::<Vec<_>>());
    for r in &sunk {
        assert_eq!(r.key, "k");
        assert_eq!(r.headers, header, "headers lost on the way");
    }
    assert_eq!(handled.load(Ordering::SeqCst), 45);
    let peak = peak.load(Ordering::SeqCst);
    assert!(
        peak > 1,
        "the concurrent agent never ran two events at once"
    );
    assert!(peak <= 8, "concurrency limit exceeded: {peak}");
    driver.close().await.unwrap();
}

/// The event's timestamp and headers reach the agent as sent; records sent
/// without a timestamp carry the driver's clock.
#[tokio::test]
async fn event_time_and_headers_reach_the_agent() {
    let mut app = one_partition_app("meta");
    let input = app.topic::<String, u64>("meta-in").with_key_codec(Utf8);
    type Seen = Vec<(i64, Vec<Header>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    app.agent(&input).for_each({
        let seen = seen.clone();
        move |_ctx, e| {
            seen.lock().unwrap().push((e.timestamp, e.headers.clone()));
            async { Ok(()) }
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    let key = "k".to_string();
    driver.send_at(&input, &key, &1, 1_000).await.unwrap();
    let header = [Header::new("h", "v")];
    driver
        .send_with(&input, &key, &2, Some(2_000), &header)
        .await
        .unwrap();
    let before = driver.now();
    driver.send(&input, &key, &3).await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0], (1_000, vec![]));
    assert_eq!(seen[1], (2_000, header.to_vec()));
    assert!(
        seen[2].0 >= before && seen[2].0 <= driver.now(),
        "{} is not the driver's clock ({before}..)",
        seen[2].0
    );
}

/// The partition of `key` among 3, as a Kafka producer picks it.
fn partition_of(key: &str) -> i32 {
    strom_client::partitioner::partition_for_key(key.as_bytes(), 3)
}

/// Events seen per partition.
type PerPartition = Arc<Mutex<BTreeMap<i32, u64>>>;

/// An app whose agent on `policy-in` panics on key "boom" and counts the
/// rest per partition, under `policy`.
fn panicking_app(policy: ErrorPolicy) -> (App, Topic<String, u64>, PerPartition) {
    let mut app = App::new("policy").with_partitions(3);
    let input = app.topic::<String, u64>("policy-in").with_key_codec(Utf8);
    let seen: PerPartition = Arc::default();
    app.agent(&input).on_error(policy).for_each({
        let seen = seen.clone();
        move |_ctx, e| {
            assert_ne!(e.key, "boom", "told to panic");
            *seen.lock().unwrap().entry(e.partition).or_default() += 1;
            async { Ok(()) }
        }
    });
    (app, input, seen)
}

/// A panicking agent under each error policy: skip and retry (after its
/// back-offs on the virtual clock) step over the event and its partition goes
/// on, dead-letter sends it on with its coordinates, stop stops the app with
/// an error naming it.
#[tokio::test]
async fn a_panicking_agent_under_each_policy() {
    let policies = [
        ErrorPolicy::Skip,
        ErrorPolicy::Retry {
            attempts: 2,
            backoff: Duration::from_secs(1),
        },
        ErrorPolicy::DeadLetter("policy-dead".into()),
        ErrorPolicy::Stop,
    ];
    // Keys 0..30, then "boom", then 0..30 again: every partition, the
    // failed event's included, goes on after it.
    let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
    let mut want: BTreeMap<i32, u64> = BTreeMap::new();
    for key in &keys {
        *want.entry(partition_of(key)).or_default() += 2;
    }
    assert!(
        want.contains_key(&partition_of("boom")),
        "no key after boom shares its partition"
    );
    for policy in policies {
        let (app, input, seen) = panicking_app(policy.clone());
        let mut driver = TestDriver::new(app).await.unwrap();
        for (i, key) in keys.iter().enumerate() {
            driver.send(&input, key, &(i as u64)).await.unwrap();
        }
        let sent = driver.send(&input, &"boom".to_string(), &99).await;
        if policy == ErrorPolicy::Stop {
            let e = sent.expect_err("the stop policy did not stop the app");
            let text = e.to_string();
            assert!(
                text.contains("policy-in") && text.contains("told to panic"),
                "{text}"
            );
            let again = driver.send(&input, &"k1".to_string(), &1).await;
            assert!(again.is_err(), "a stopped app took more input");
            continue;
        }
        sent.unwrap();
        for (i, key) in keys.iter().enumerate() {
            driver.send(&input, key, &(i as u64)).await.unwrap();
        }
        assert_eq!(
            *seen.lock().unwrap(),
            want,
            "{policy:?}: events per partition"
        );
        let errors = metric(
            &driver.metrics(),
            "strom_agent_errors_total",
            "topic=\"policy-in\"",
        );
        let tries = if let ErrorPolicy::Retry { .. } = policy {
            3.0
        } else {
            1.0
        };
        assert_eq!(errors, tries, "{policy:?}");
        if let ErrorPolicy::DeadLetter(dead) = &policy {
            let letters = driver.read_raw(dead).unwrap();
            assert_eq!(letters.len(), 1, "{letters:?}");
            let letter = &letters[0];
            assert_eq!(letter.key.as_deref(), Some(&b"boom"[..]));
            assert_eq!(letter.value.as_deref(), Some(&b"99"[..]));
            let header = |k: &str| {
                letter
                    .headers
                    .iter()
                    .find(|h| &h.key[..] == k.as_bytes())
                    .and_then(|h| h.value.clone())
                    .map(|v| String::from_utf8(v.to_vec()).unwrap())
            };
            assert_eq!(header("strom.error.topic").as_deref(), Some("policy-in"));
            assert!(header("strom.error.offset").is_some());
        }
        driver.close().await.unwrap();
    }
}

/// Undecodable values land in the dead-letter topic with their
/// coordinates; every good value is processed; the app keeps running.
#[tokio::test]
async fn dead_letters_keep_bad_input_and_the_app_going() {
    let mut app =
        one_partition_app("dlq").with_error_policy(ErrorPolicy::DeadLetter("dlq-dead".into()));
    let numbers = app.topic::<String, u64>("dlq-in").with_key_codec(Utf8);
    let sum = Arc::new(AtomicUsize::new(0));
    app.agent(&numbers).for_each({
        let sum = sum.clone();
        move |_ctx, e| {
            sum.fetch_add(e.value as usize, Ordering::SeqCst);
            async { Ok(()) }
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut bad = Vec::new();
    for i in 1..=50u64 {
        driver.send(&numbers, &"k".to_string(), &i).await.unwrap();
        if i % 20 == 0 {
            let junk = format!("not json {i}");
            driver
                .send_raw("dlq-in", Some(b"k"), Some(junk.as_bytes()))
                .await
                .unwrap();
            bad.push(junk);
        }
    }
    assert_eq!(sum.load(Ordering::SeqCst), 50 * 51 / 2);
    let letters: Vec<String> = driver
        .read_raw("dlq-dead")
        .unwrap()
        .into_iter()
        .map(|r| String::from_utf8(r.value.unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(letters, bad);
    let metrics = driver.metrics();
    assert_eq!(metric(&metrics, "strom_dead_lettered_total", "dlq-in"), 2.0);
    assert_eq!(metric(&metrics, "strom_decode_errors_total", "dlq-in"), 2.0);
    driver.close().await.unwrap();
}

/// Under the retry policy an agent that fails twice on an event gets it a
/// third time and succeeds; one that keeps failing is skipped after its
/// retries, and the events after it are processed, in order; `send` waits
/// out the back-offs on the virtual clock, since later events queue behind.
#[tokio::test]
async fn retry_policy_retries_then_skips() {
    let mut app = one_partition_app("retry");
    let numbers = app.topic::<String, u64>("retry-in").with_key_codec(Utf8);
    let attempts: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let done: Arc<Mutex<Vec<u64>>> = Arc::default();
    app.agent(&numbers)
        .on_error(ErrorPolicy::Retry {
            attempts: 3,
            backoff: Duration::from_millis(20),
        })
        .for_each({
            let (attempts, done) = (attempts.clone(), done.clone());
            move |_ctx, e| {
                let tries = {
                    let mut a = attempts.lock().unwrap();
                    let n = a.entry(e.value).or_default();
                    *n += 1;
                    *n
                };
                let done = done.clone();
                async move {
                    // 7 fails twice then works; 9 never works.
                    if (e.value == 7 && tries <= 2) || e.value == 9 {
                        return Err(format!("{} failed on try {tries}", e.value).into());
                    }
                    done.lock().unwrap().push(e.value);
                    Ok(())
                }
            }
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    let before = driver.now();
    for i in 5..=11u64 {
        driver.send(&numbers, &"k".to_string(), &i).await.unwrap();
    }
    assert_eq!(*done.lock().unwrap(), [5, 6, 7, 8, 10, 11], "order or set");
    let backoffs = (20 + 40) + (20 + 40 + 80);
    assert!(
        driver.now() - before >= backoffs,
        "the back-offs did not pass on the virtual clock"
    );
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.get(&7), Some(&3));
    assert_eq!(attempts.get(&9), Some(&4), "9: one try and three retries");
    let errors = metric(&driver.metrics(), "strom_agent_errors_total", "retry-in");
    assert_eq!(errors, 6.0);
    driver.close().await.unwrap();
}

/// Interval timers (plain and leader-only: one worker leads) and cron
/// timers fire on the virtual clock, as often as it says, and their sends
/// reach their topic.
#[tokio::test]
async fn timers_fire_on_the_virtual_clock() {
    let mut app = one_partition_app("timers");
    let input = app.topic::<String, u64>("timers-in").with_key_codec(Utf8);
    let ticks = app
        .topic::<String, u64>("timers-ticks")
        .with_key_codec(Utf8);
    app.agent(&input).for_each(|_ctx, _e| async { Ok(()) });
    let sent = ticks.clone();
    app.timer(Duration::from_secs(10), move |ctx| {
        let ticks = sent.clone();
        async move { Ok(ctx.send(&ticks, &"every".to_string(), &1).await?) }
    });
    let leader_runs = Arc::new(AtomicUsize::new(0));
    let runs = leader_runs.clone();
    app.leader_timer(Duration::from_secs(60), move |ctx| {
        assert!(ctx.is_leader());
        runs.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    });
    let cron_runs = Arc::new(AtomicUsize::new(0));
    let runs = cron_runs.clone();
    app.crontab("*/5 * * * *", "Europe/Berlin", move |_ctx| {
        runs.fetch_add(1, Ordering::SeqCst);
        async { Ok(()) }
    })
    .unwrap();
    // 2026-01-01T00:00:30Z: the cron runs at 00:05, 00:10, 00:15, 00:20.
    let start = 1_767_225_630_000;
    let mut driver = TestDriver::starting_at(app, start).await.unwrap();
    assert!(driver.read(&ticks).unwrap().is_empty(), "fired at start");
    driver.advance(Duration::from_secs(10)).await.unwrap();
    let first = driver.read(&ticks).unwrap();
    assert_eq!(first.len(), 1);
    let ran = first[0].timestamp - start;
    assert!(
        (10_000..10_100).contains(&ran),
        "the tick carries {ran} ms after the start, not the driver's clock"
    );
    driver.advance(Duration::from_secs(50)).await.unwrap();
    assert_eq!(driver.read(&ticks).unwrap().len(), 5);
    assert_eq!(leader_runs.load(Ordering::SeqCst), 1);
    driver.advance(Duration::from_secs(20 * 60)).await.unwrap();
    assert_eq!(cron_runs.load(Ordering::SeqCst), 4, "00:00:30 to 00:21:30");
    assert_eq!(leader_runs.load(Ordering::SeqCst), 1 + 20);
    assert_eq!(driver.read(&ticks).unwrap().len(), 120);
    driver.close().await.unwrap();
}

/// An app the stop policy stopped starts again on `restart`, from its last
/// committed offsets: the event it stopped at is processed again (here the
/// agent no longer fails on it), and `enumerate` counts from 0 again, as in
/// a new process.
#[tokio::test]
async fn restart_after_a_stop_processes_the_event_again() {
    let mut app = one_partition_app("again").with_error_policy(ErrorPolicy::Stop);
    let input = text_topic(&mut app, "again-in");
    let out = text_topic(&mut app, "again-out");
    let failing = Arc::new(AtomicUsize::new(1));
    let (sent, fail) = (out.clone(), failing.clone());
    app.agent(&input).enumerate().for_each(move |ctx, e| {
        let (out, fail) = (sent.clone(), fail.clone());
        async move {
            let (i, line) = e.value;
            if line == "bad" && fail.fetch_sub(1, Ordering::SeqCst) > 0 {
                return Err("bad input".into());
            }
            ctx.send(&out, &(), &format!("{i}:{line}")).await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    driver.send(&input, &(), &"a".to_string()).await.unwrap();
    let e = driver.send(&input, &(), &"bad".to_string()).await;
    assert!(e.unwrap_err().to_string().contains("bad input"));
    driver.restart().await.unwrap();
    driver.send(&input, &(), &"b".to_string()).await.unwrap();
    let got: Vec<String> = values(&mut driver, &out);
    // After the restart: "a" again unless its offset was committed first,
    // then "bad" and "b", numbered from 0.
    let after: Vec<&str> = got[1..].iter().map(String::as_str).collect();
    assert!(
        after == ["0:bad", "1:b"] || after == ["0:a", "1:bad", "2:b"],
        "{got:?}"
    );
    assert_eq!(got[0], "0:a");
    driver.close().await.unwrap();
}

/// Records agents send carry the time of the event that caused them, not
/// the time they were sent (the event here is from 1970); `group_by` and
/// `through` keep the event's time and headers, so event time survives a
/// repartition.
#[tokio::test]
async fn outputs_carry_the_event_time() {
    let mut app = one_partition_app("evtime").with_partitions(3);
    let lines = text_topic(&mut app, "evtime-in");
    let mid = text_topic(&mut app, "evtime-mid");
    let out = app.topic::<String, i64>("evtime-out").with_key_codec(Utf8);
    let sent = out.clone();
    app.agent(&lines)
        .through(&mid)
        .flat_map(|line: String| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .group_by(|e| e.value.clone(), "words")
        .for_each(move |ctx, e| {
            let out = sent.clone();
            async move {
                assert_eq!(ctx.event_time(), Some(e.timestamp));
                ctx.send(&out, &e.key, &e.timestamp).await?;
                Ok(())
            }
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    let header = [Header::new("trace", "t-7")];
    let early = 1_000_000;
    driver
        .send_with(&lines, &(), &"a b c".to_string(), Some(early), &header)
        .await
        .unwrap();
    let got = driver.read(&out).unwrap();
    assert_eq!(got.len(), 3);
    for r in got {
        assert_eq!(r.value, early, "the agent saw another time for {}", r.key);
        assert_eq!(r.timestamp, early, "{} was sent with the wall time", r.key);
    }
    let repartitioned = driver
        .read_raw("evtime-evtime-mid-words-repartition")
        .unwrap();
    assert_eq!(repartitioned.len(), 3);
    for r in repartitioned {
        assert_eq!((r.timestamp, r.headers), (early, header.to_vec()));
    }
    // An event without a time (-1, as old clients write) goes on with the
    // current time.
    let before = driver.now();
    driver
        .send_at(&lines, &(), &"d".to_string(), -1)
        .await
        .unwrap();
    let late = driver.read(&out).unwrap();
    assert_eq!(late.len(), 1);
    assert!(late[0].timestamp >= before, "{late:?} carries no time");
    let through = driver.read_raw("evtime-mid").unwrap();
    assert_eq!(
        (through[0].timestamp, &through[0].headers),
        (early, &header.to_vec())
    );
}

/// A topic's timestamp extractor sets each event's time from the event; the
/// partition's stream time is the latest event time seen and a late event
/// does not move it back.
#[tokio::test]
async fn extracted_event_time_and_stream_time() {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Reading {
        at: i64,
    }
    let mut app = one_partition_app("stime");
    let readings = app
        .topic::<String, Reading>("stime-in")
        .with_key_codec(Utf8)
        .with_timestamp(|e| e.value.at);
    type Seen = Vec<(i64, i64, Option<i64>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let record = seen.clone();
    app.agent(&readings).for_each(move |ctx, e| {
        record.lock().unwrap().push((
            e.timestamp,
            ctx.event_time().unwrap_or(-1),
            ctx.stream_time(),
        ));
        async { Ok(()) }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    let key = "sensor".to_string();
    for at in [5_000, 3_000, 8_000] {
        // The record's own timestamp is not the event's time.
        driver
            .send_at(&readings, &key, &Reading { at }, 1)
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (5_000, 5_000, Some(5_000)),
            (3_000, 3_000, Some(5_000)),
            (8_000, 8_000, Some(8_000))
        ]
    );
}

/// map_event sees the whole event and changes key and value, keeping the
/// time and headers; the order id it keeps survives a group_by by the new
/// key; select_key and map_key change only the key.
#[tokio::test]
async fn map_event_select_key_and_map_key_rekey_events() {
    let mut app = App::new("rekey").with_partitions(3);
    // Orders keyed by order id, valued by customer.
    let orders = app.topic::<String, String>("orders");
    let by_customer = app.topic::<String, String>("orders-by-customer");
    let lengths = app.topic::<usize, String>("order-id-lengths");
    /// (key, value, partition, timestamp, headers) of each event handled.
    type Seen = Vec<(String, String, i32, i64, Vec<Header>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let sent = by_customer.clone();
    app.agent(&orders)
        .map_event(|e| (e.value, format!("{}@{}", e.key, e.timestamp)))
        .group_by(|e| e.key.clone(), "by-customer")
        .for_each({
            let seen = seen.clone();
            move |ctx, e| {
                seen.lock().unwrap().push((
                    e.key.clone(),
                    e.value.clone(),
                    e.partition,
                    e.timestamp,
                    e.headers.clone(),
                ));
                let sent = sent.clone();
                async move {
                    ctx.send(&sent, &e.key, &e.value).await?;
                    Ok(())
                }
            }
        });
    app.agent(&orders)
        .select_key(|e| e.value.clone())
        .map_key(|customer: String| customer.len())
        .sink(&lengths);
    let mut driver = TestDriver::new(app).await.unwrap();
    let header = Header {
        key: "source".into(),
        value: Some(bytes::Bytes::from_static(b"web")),
    };
    for (i, (order, customer)) in [("o1", "ada"), ("o2", "grace"), ("o3", "ada")]
        .into_iter()
        .enumerate()
    {
        let at = 1_000 + i as i64;
        driver
            .send_with(
                &orders,
                &order.to_string(),
                &customer.to_string(),
                Some(at),
                std::slice::from_ref(&header),
            )
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    let mut got: Vec<(String, String)> = seen.iter().map(|s| (s.0.clone(), s.1.clone())).collect();
    got.sort();
    assert_eq!(
        got,
        [("ada", "o1@1000"), ("ada", "o3@1002"), ("grace", "o2@1001")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    for (customer, _, partition, timestamp, headers) in &seen {
        let home =
            strom_client::partitioner::partition_for_key(format!("{customer:?}").as_bytes(), 3);
        assert_eq!(*partition, home, "{customer} not in its partition");
        assert!((1_000..1_003).contains(timestamp), "{timestamp}");
        assert_eq!(headers, std::slice::from_ref(&header));
    }
    let mut lengths: Vec<(usize, String)> = driver
        .read(&lengths)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    lengths.sort();
    assert_eq!(
        lengths,
        [(3, "ada"), (3, "ada"), (5, "grace")].map(|(k, v)| (k, v.to_string()))
    );
    driver.close().await.unwrap();
}

/// A wall-clock partition timer runs in every partition's task with that
/// partition's table: every 10 s each partition reports how many keys it
/// holds and forgets them. Nothing runs before the first 10 s; the counts
/// add up to the keys seen; the table is empty after; the next round finds
/// nothing.
#[tokio::test]
async fn a_wall_clock_partition_timer_sweeps_each_partitions_table() {
    use strom::Punctuation;
    let mut app = App::new("sweep").with_partitions(3);
    let events = app.topic::<String, u64>("sweep-in");
    let swept = app.topic::<i32, u64>("swept");
    let seen = app.table::<String, u64>("seen", 0);
    {
        let seen = seen.clone();
        app.agent(&events).for_each(move |ctx, e| {
            let seen = seen.clone();
            async move {
                ctx.update(&seen, &e.key, |n| n + e.value).await?;
                Ok(())
            }
        });
    }
    {
        let (seen, swept) = (seen.clone(), swept.clone());
        app.partition_timer(
            &events,
            Punctuation::WallClock(Duration::from_secs(10)),
            move |ctx| {
                let (seen, swept) = (seen.clone(), swept.clone());
                async move {
                    let entries = ctx.entries(&seen).await?;
                    for (key, _) in &entries {
                        ctx.delete(&seen, key).await?;
                    }
                    ctx.send(&swept, &ctx.partition(), &(entries.len() as u64))
                        .await?;
                    Ok(())
                }
            },
        );
    }
    let mut driver = TestDriver::new(app).await.unwrap();
    let keys = ["a", "b", "c", "d", "e", "f", "g"];
    for key in keys {
        driver.send(&events, &key.to_string(), &1).await.unwrap();
    }
    driver.advance(Duration::from_secs(5)).await.unwrap();
    assert!(driver.read(&swept).unwrap().is_empty(), "ran before 10 s");
    driver.advance(Duration::from_secs(6)).await.unwrap();
    let first = driver.read(&swept).unwrap();
    let mut partitions: Vec<i32> = first.iter().map(|r| r.key).collect();
    partitions.sort();
    assert_eq!(partitions, [0, 1, 2], "{first:?}");
    let total: u64 = first.iter().map(|r| r.value).sum();
    assert_eq!(total, keys.len() as u64);
    for key in keys {
        assert_eq!(driver.table(&seen).get(&key.to_string()).unwrap(), 0);
    }
    driver.advance(Duration::from_secs(10)).await.unwrap();
    let second = driver.read(&swept).unwrap();
    assert_eq!(second.len(), 3, "{second:?}");
    assert!(second.iter().all(|r| r.value == 0), "{second:?}");
    driver.close().await.unwrap();
}

/// A stream-time partition timer follows the events' time, not the clock:
/// with a one-minute interval it runs when the stream time reaches the next
/// whole minute, once for a jump over several, never for the clock alone,
/// and sees the stream time as its event time.
#[tokio::test]
async fn a_stream_time_partition_timer_follows_the_events() {
    use strom::Punctuation;
    let mut app = one_partition_app("minutes");
    let events = app.topic::<String, u64>("minutes-in");
    let ticks = app.topic::<String, i64>("minute-ticks");
    app.agent(&events).for_each(|_ctx, _e| async { Ok(()) });
    {
        let ticks = ticks.clone();
        app.partition_timer(
            &events,
            Punctuation::StreamTime(Duration::from_secs(60)),
            move |ctx| {
                let ticks = ticks.clone();
                async move {
                    let now = ctx.event_time().unwrap_or(-1);
                    ctx.send(&ticks, &"tick".to_string(), &now).await?;
                    Ok(())
                }
            },
        );
    }
    let mut driver = TestDriver::new(app).await.unwrap();
    let k = "k".to_string();
    let minute = |s: i64| 1_767_225_600_000 + s * 1000;
    for (at, ticked) in [
        (minute(10), None),
        (minute(50), None),
        (minute(61), Some(minute(61))),
        (minute(65), None),
        (minute(30), None), // late: the stream time stays
        (minute(250), Some(minute(250))),
        (minute(260), None),
    ] {
        driver.send_at(&events, &k, &1, at).await.unwrap();
        let got: Vec<i64> = driver
            .read(&ticks)
            .unwrap()
            .into_iter()
            .map(|r| r.value)
            .collect();
        assert_eq!(
            got,
            ticked.into_iter().collect::<Vec<_>>(),
            "after an event at {at}"
        );
    }
    driver.advance(Duration::from_secs(600)).await.unwrap();
    assert!(driver.read(&ticks).unwrap().is_empty(), "ran on the clock");
    driver.close().await.unwrap();
}

/// A partition timer whose run fails is logged, counted and run again at
/// its next time, even under the app's stop policy (it has no event to
/// stop on); an interval of zero counts as a millisecond instead of
/// spinning the task.
#[tokio::test]
async fn a_failing_partition_timer_is_counted_and_goes_on() {
    use strom::Punctuation;
    let mut app = one_partition_app("failing-timer").with_error_policy(ErrorPolicy::Stop);
    let events = app.topic::<String, u64>("failing-timer-in");
    let out = app.topic::<String, u64>("failing-timer-out");
    let runs = Arc::new(AtomicUsize::new(0));
    {
        let (runs, out) = (runs.clone(), out.clone());
        app.partition_timer(
            &events,
            Punctuation::WallClock(Duration::from_secs(10)),
            move |ctx| {
                let (n, out) = (runs.fetch_add(1, Ordering::SeqCst), out.clone());
                async move {
                    if n == 0 {
                        return Err("the first run fails".into());
                    }
                    ctx.send(&out, &"run".to_string(), &(n as u64)).await?;
                    Ok(())
                }
            },
        );
    }
    let ticks = app.topic::<String, u64>("zero-in");
    app.partition_timer(
        &ticks,
        Punctuation::WallClock(Duration::ZERO),
        |_ctx| async { Ok(()) },
    );
    let mut driver = TestDriver::new(app).await.unwrap();
    driver.send(&events, &"k".to_string(), &1).await.unwrap();
    // Runs at 10 s (fails), 20 s and 30 s.
    driver.advance(Duration::from_secs(35)).await.unwrap();
    let sent: Vec<u64> = values(&mut driver, &out);
    assert_eq!(sent, [1, 2], "the run after the failed one did not happen");
    let text = driver.metrics();
    assert!(
        metric(&text, "strom_agent_errors_total", "failing-timer-in") >= 1.0,
        "{text}"
    );
    driver.send(&ticks, &"k".to_string(), &1).await.unwrap();
    driver.close().await.unwrap();
}

/// Stream–GlobalTable joins, inner and left, against a model: orders (4
/// partitions, keyed by order id) name their customer in the value; the
/// customers topic has 3 partitions. Customers are added, changed and
/// deleted between orders; each order is joined with its customer as the
/// table held it then, and flat_map/filter before the join keep working.
#[tokio::test]
async fn stream_global_table_joins_follow_the_table() {
    let mut app = App::new("global-joins").with_partitions(4);
    let customers = app.topic::<String, String>("customers").with_partitions(3);
    let table = app.global_table("customers", &customers);
    // Order id -> "customer:cents"; a value "skip" is filtered out.
    let orders = app.topic::<u32, String>("orders");
    let inner = app.topic::<u32, (String, u64)>("inner");
    let left = app.topic::<u32, (String, Option<String>)>("left");
    let parse = |value: &String| -> (String, u64) {
        let (c, cents) = value.split_once(':').unwrap();
        (c.to_owned(), cents.parse().unwrap())
    };
    app.agent(&orders)
        .filter(|e| e.value != "skip")
        .join_global(
            &table,
            move |e| parse(&e.value).0,
            move |v, name| (name, parse(&v).1),
        )
        .sink(&inner);
    app.agent(&orders)
        .flat_map(|v: String| if v == "skip" { vec![] } else { vec![v] })
        .left_join_global(
            &table,
            |e| e.value.split(':').next().unwrap().to_owned(),
            |v, name| (v, name),
        )
        .sink(&left);
    let mut driver = TestDriver::new(app).await.unwrap();

    let mut model: BTreeMap<String, String> = BTreeMap::new();
    let (mut want_inner, mut want_left) = (BTreeMap::new(), BTreeMap::new());
    for i in 0..120u32 {
        let c = format!("c{}", i % 9);
        match i % 7 {
            0 => {
                let name = format!("name {i}");
                driver.send(&customers, &c, &name).await.unwrap();
                model.insert(c.clone(), name);
            }
            3 => {
                // A tombstone: the key as the topic's (JSON) key codec writes it.
                let key = format!("{c:?}");
                driver
                    .send_raw("customers", Some(key.as_bytes()), None)
                    .await
                    .unwrap();
                model.remove(&c);
            }
            _ => {}
        }
        let order = if i % 11 == 5 {
            "skip".to_owned()
        } else {
            format!("{c}:{i}")
        };
        driver.send(&orders, &i, &order).await.unwrap();
        if order == "skip" {
            continue;
        }
        if let Some(name) = model.get(&c) {
            want_inner.insert(i, (name.clone(), u64::from(i)));
        }
        want_left.insert(i, (order, model.get(&c).cloned()));
    }
    let got_inner: BTreeMap<u32, (String, u64)> = driver
        .read(&inner)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    let got_left: BTreeMap<u32, (String, Option<String>)> = driver
        .read(&left)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    assert!(want_inner.len() > 30 && want_inner.len() < want_left.len());
    assert_eq!(got_inner, want_inner);
    assert_eq!(got_left, want_left);
    driver.close().await.unwrap();
}

/// A merged agent reads two topics as one stream: every event of both is
/// handled once, a table written from both holds both's totals, and a
/// group_by after the merge brings each key's events of both topics to one
/// partition.
#[tokio::test]
async fn a_merged_agent_reads_every_event_of_both_topics() {
    let mut app = App::new("merged").with_partitions(3);
    let web = app.topic::<String, u64>("web-orders");
    let store = app.topic::<String, u64>("store-orders");
    let totals = app.table::<String, u64>("totals", 0);
    let by_item = app.table::<String, u64>("by-item", 0);
    let seen = app.topic::<String, u64>("seen");
    let table = totals.clone();
    app.agent_merged(&[&web, &store])
        .for_each(move |ctx, order| {
            let totals = table.clone();
            async move {
                ctx.update(&totals, &order.key, |t| t + order.value).await?;
                Ok(())
            }
        });
    let table = by_item.clone();
    app.agent_merged(&[&web, &store])
        .map_event(|e| (format!("item{}", e.value % 4), e.value))
        .group_by(|e| e.key.clone(), "items")
        .through(&seen)
        .for_each(move |ctx, e| {
            let by_item = table.clone();
            async move {
                ctx.update(&by_item, &e.key, |n| n + e.value).await?;
                Ok(())
            }
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    let mut want_items: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..90u64 {
        let customer = format!("c{}", i % 7);
        let topic = if i % 3 == 0 { &store } else { &web };
        driver.send(topic, &customer, &i).await.unwrap();
        *want.entry(customer).or_default() += i;
        *want_items.entry(format!("item{}", i % 4)).or_default() += i;
    }
    let got: BTreeMap<String, u64> = driver
        .table(&totals)
        .entries()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, want);
    let got: BTreeMap<String, u64> = driver
        .table(&by_item)
        .entries()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, want_items);
    assert_eq!(driver.read(&seen).unwrap().len(), 90);
    driver.close().await.unwrap();
}

/// take(n) after a join: a record whose second event fails (its global
/// value does not decode) is skipped whole, so nothing of it is held in a
/// batch; the next record's events fill the batch alone.
#[tokio::test]
async fn a_record_failing_midway_holds_nothing_in_a_batch() {
    let mut app = one_partition_app("take-join");
    let lines = text_topic(&mut app, "lines");
    let sizes = app.topic::<String, u64>("sizes");
    let table = app.global_table("sizes", &sizes);
    type Seen = Arc<Mutex<Vec<Vec<(String, u64)>>>>;
    let batches: Seen = Arc::default();
    let seen = batches.clone();
    app.agent(&lines)
        .on_error(ErrorPolicy::Skip)
        .flat_map(|line: String| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .left_join_global(
            &table,
            |e| e.value.clone(),
            |word, size| (word, size.unwrap_or(0)),
        )
        .take(2, Duration::from_secs(60))
        .for_each(move |_ctx, batch| {
            let seen = seen.clone();
            async move {
                let values = batch.into_iter().map(|e| e.value).collect();
                seen.lock().unwrap().push(values);
                Ok(())
            }
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    driver.send(&sizes, &"a".to_string(), &1).await.unwrap();
    driver
        .send_raw("sizes", Some(b"\"b\""), Some(b"not a number"))
        .await
        .unwrap();
    driver.send(&lines, &(), &"a b".to_string()).await.unwrap();
    driver.send(&lines, &(), &"c a".to_string()).await.unwrap();
    let got = batches.lock().unwrap().clone();
    assert_eq!(got, vec![vec![("c".to_string(), 0), ("a".to_string(), 1)]]);
    let errors = metric(&driver.metrics(), "strom_agent_errors_total", "lines");
    assert_eq!(errors, 1.0);
    driver.close().await.unwrap();
}

/// Stream–table joins, inner and left, against a model: an agent keeps
/// each customer's credit limit in a table (0 deletes it); orders keyed by
/// customer are joined with the limit their partition's table holds when
/// they are processed. Operators before (flat_map) and after (map, filter)
/// the join keep working, over 3 partitions.
#[tokio::test]
async fn stream_table_joins_follow_the_table() {
    let mut app = App::new("table-joins").with_partitions(3);
    let limits_in = app.topic::<String, u64>("limits-in");
    let limits = app.table::<String, u64>("limits", 1_000);
    let orders = app.topic::<String, Vec<u64>>("orders");
    let inner = app.topic::<String, (u64, bool)>("inner");
    let left = app.topic::<String, (u64, Option<u64>)>("left");
    let table = limits.clone();
    app.agent(&limits_in).for_each(move |ctx, e| {
        let limits = table.clone();
        async move {
            match e.value {
                0 => ctx.delete(&limits, &e.key).await?,
                limit => ctx.set(&limits, &e.key, &limit).await?,
            }
            Ok(())
        }
    });
    app.agent(&orders)
        .flat_map(|amounts: Vec<u64>| amounts)
        .join_table(&limits, |amount, limit| (amount, amount <= limit))
        .filter(|e| e.value.0 != 13)
        .sink(&inner);
    app.agent(&orders)
        .flat_map(|amounts: Vec<u64>| amounts)
        .left_join_table(&limits, |amount, limit| (amount, limit))
        .map(|(amount, limit)| (amount * 10, limit))
        .sink(&left);
    let mut driver = TestDriver::new(app).await.unwrap();

    let mut model: BTreeMap<String, u64> = BTreeMap::new();
    let (mut want_inner, mut want_left) = (Vec::new(), Vec::new());
    for i in 0..100u64 {
        let customer = format!("c{}", i % 8);
        if i % 5 == 0 {
            let limit = (i * 7) % 60;
            driver.send(&limits_in, &customer, &limit).await.unwrap();
            match limit {
                0 => model.remove(&customer),
                l => model.insert(customer.clone(), l),
            };
        }
        let amounts = vec![i % 50, 13];
        driver.send(&orders, &customer, &amounts).await.unwrap();
        for amount in amounts {
            let limit = model.get(&customer).copied();
            if let Some(l) = limit.filter(|_| amount != 13) {
                want_inner.push((customer.clone(), (amount, amount <= l)));
            }
            want_left.push((customer.clone(), (amount * 10, limit)));
        }
    }
    let got_inner: Vec<_> = driver
        .read(&inner)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    let got_left: Vec<_> = driver
        .read(&left)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    // Some orders find no limit (dropped by the inner join, kept by the left).
    let no_limit = want_left
        .iter()
        .filter(|(_, (a, l))| *a != 130 && l.is_none())
        .count();
    assert!(
        want_inner.len() > 40 && no_limit > 5,
        "{} {no_limit}",
        want_inner.len()
    );
    assert_eq!(sorted(got_inner), sorted(want_inner));
    assert_eq!(sorted(got_left), sorted(want_left));
    driver.close().await.unwrap();
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

/// A table–table join against a model: one agent adds orders to a
/// customer's spending, another sets (or, with 0, deletes) the customer's
/// limit; every update of either table gives the key's new result — over
/// the limit or not while both tables hold the customer, `None` otherwise —
/// in order per customer, over 3 partitions.
#[tokio::test]
async fn a_table_join_emits_on_updates_of_either_side() {
    let mut app = App::new("table-table").with_partitions(3);
    let orders = app.topic::<String, u64>("orders");
    let limits_in = app.topic::<String, u64>("limits-in");
    let spent = app.table::<String, u64>("spent", 0);
    let limits = app.table::<String, u64>("limits", 0);
    let over = app.topic::<String, Option<bool>>("over");
    let table = spent.clone();
    app.agent(&orders).for_each(move |ctx, e| {
        let spent = table.clone();
        async move {
            ctx.update(&spent, &e.key, |s| s + e.value).await?;
            Ok(())
        }
    });
    let table = limits.clone();
    app.agent(&limits_in).for_each(move |ctx, e| {
        let limits = table.clone();
        async move {
            match e.value {
                0 => ctx.delete(&limits, &e.key).await?,
                limit => ctx.set(&limits, &e.key, &limit).await?,
            }
            Ok(())
        }
    });
    app.join_tables(&spent, &limits, |spent, limit| Some(spent? > limit?))
        .sink(&over);
    let mut driver = TestDriver::new(app).await.unwrap();

    let (mut spent_model, mut limit_model) = (BTreeMap::new(), BTreeMap::new());
    let mut want: BTreeMap<String, Vec<Option<bool>>> = BTreeMap::new();
    for i in 0..120u64 {
        let customer = format!("c{}", i % 7);
        if i % 3 == 0 {
            // Every fourth limit update deletes the customer's limit.
            let limit = if i % 12 == 0 { 0 } else { 1 + (i * 13) % 50 };
            driver.send(&limits_in, &customer, &limit).await.unwrap();
            match limit {
                0 => limit_model.remove(&customer),
                l => limit_model.insert(customer.clone(), l),
            };
        } else {
            driver.send(&orders, &customer, &(i % 9)).await.unwrap();
            *spent_model.entry(customer.clone()).or_insert(0) += i % 9;
        }
        let result = match (spent_model.get(&customer), limit_model.get(&customer)) {
            (Some(s), Some(l)) => Some(s > l),
            _ => None,
        };
        want.entry(customer).or_default().push(result);
    }
    let mut got: BTreeMap<String, Vec<Option<bool>>> = BTreeMap::new();
    for r in driver.read(&over).unwrap() {
        got.entry(r.key).or_default().push(r.value);
    }
    assert!(want.values().flatten().filter(|r| r.is_some()).count() > 30);
    assert!(want.values().flatten().any(|r| *r == Some(true)));
    // Retractions: a result, then None after its limit was deleted.
    let retracted = want
        .values()
        .flat_map(|v| v.windows(2))
        .filter(|w| w[0].is_some() && w[1].is_none());
    assert!(retracted.count() > 2);
    assert_eq!(got, want);

    // A burst, not run to idle between records: the tables move on while
    // the updates are read, but each key's last result is its current one.
    let burst: Vec<(String, u64)> = (0..200u64)
        .map(|i| (format!("c{}", i % 7), i % 5))
        .collect();
    let limits_burst: Vec<(String, u64)> =
        (0..7u64).map(|c| (format!("c{c}"), 10 + c * 20)).collect();
    for (c, amount) in &burst {
        *spent_model.entry(c.clone()).or_insert(0) += amount;
    }
    for (c, limit) in &limits_burst {
        limit_model.insert(c.clone(), *limit);
    }
    driver.send_many(&orders, burst).await.unwrap();
    driver.send_many(&limits_in, limits_burst).await.unwrap();
    let mut last: BTreeMap<String, Option<bool>> = BTreeMap::new();
    for r in driver.read(&over).unwrap() {
        last.insert(r.key, r.value);
    }
    let current: BTreeMap<String, Option<bool>> = (0..7)
        .map(|c| {
            let c = format!("c{c}");
            let result = Some(spent_model[&c] > limit_model[&c]);
            (c, result)
        })
        .collect();
    assert!(
        current.values().any(|r| *r == Some(true)) && current.values().any(|r| *r == Some(false))
    );
    assert_eq!(last, current);
    driver.close().await.unwrap();
}

/// A table join can be repartitioned on a fresh cluster (its changelogs are
/// made before the repartition topic that reads them), and a windowed
/// table is refused before anything is created.
#[tokio::test]
async fn table_joins_are_checked_and_made_before_they_run() {
    let mut app = App::new("table-join-checks").with_partitions(2);
    let orders = app.topic::<String, u64>("orders");
    let spent = app.table::<String, u64>("spent", 0);
    let limits = app.table::<String, u64>("limits", 0);
    let flagged = app.table::<String, u64>("flagged", 0);
    let table = spent.clone();
    app.agent(&orders).for_each(move |ctx, e| {
        let spent = table.clone();
        async move {
            ctx.update(&spent, &e.key, |s| s + e.value).await?;
            Ok(())
        }
    });
    let counts = flagged.clone();
    app.join_tables(&spent, &limits, |s, l| {
        Some(s.unwrap_or(0) > l.unwrap_or(5))
    })
    .group_by(|e| (e.value == Some(true)).to_string(), "flag")
    .for_each(move |ctx, e| {
        let flagged = counts.clone();
        async move {
            ctx.update(&flagged, &e.key, |n| n + 1).await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    for (c, amount) in [("a", 3), ("b", 9), ("a", 4)] {
        driver.send(&orders, &c.to_string(), &amount).await.unwrap();
    }
    // a: 3 (not over 5), then 7 (over); b: 9 (over).
    assert_eq!(driver.table(&flagged).get(&"true".into()).unwrap(), 2);
    assert_eq!(driver.table(&flagged).get(&"false".into()).unwrap(), 1);
    driver.close().await.unwrap();

    let mut app = App::new("table-join-windowed");
    let per_minute = app.table::<String, u64>("per-minute", 0);
    let _windowed = per_minute.clone().tumbling(Duration::from_secs(60));
    let other = app.table::<String, u64>("other", 0);
    let out = app.topic::<String, Option<u64>>("out");
    app.join_tables(&per_minute, &other, |a, _| a).sink(&out);
    let e = TestDriver::new(app).await.unwrap_err();
    assert!(
        e.to_string().contains(r#"table "per-minute" is windowed"#),
        "{e}"
    );
}

/// One event of the windowed-join model: a side, key, time and value.
#[derive(Debug, Clone)]
struct Sent {
    order: bool,
    key: String,
    time: i64,
    value: u64,
    offset: i64,
}

/// What a windowed inner and left join of orders with payments emit, in
/// order, for events processed in `sent`'s order in one partition: the
/// rule of `Stream::join_stream` (pairs at most `d` apart while both
/// windows are open; late events dropped; a left join's unpaired orders
/// emitted once their windows close, in time order).
#[allow(clippy::type_complexity)]
fn window_join_model(
    sent: &[Sent],
    d: i64,
    grace: i64,
) -> (
    Vec<(String, (u64, u64), i64)>,
    Vec<(String, (u64, Option<u64>), i64)>,
) {
    let (mut inner, mut left) = (Vec::new(), Vec::new());
    let mut orders: Vec<&Sent> = Vec::new();
    let mut payments: Vec<&Sent> = Vec::new();
    let mut unpaired: Vec<&Sent> = Vec::new();
    let mut stream_time = i64::MIN;
    for e in sent {
        stream_time = stream_time.max(e.time);
        let open = stream_time - d - grace;
        if e.time >= open {
            let (from, to) = ((e.time - d).max(open), e.time + d);
            let within = |o: &&&Sent| o.key == e.key && o.time >= from && o.time <= to;
            if e.order {
                orders.push(e);
                let mut pairs: Vec<&&Sent> = payments.iter().filter(within).collect();
                pairs.sort_by_key(|p| (p.time, p.offset));
                for p in &pairs {
                    let time = e.time.max(p.time);
                    inner.push((e.key.clone(), (e.value, p.value), time));
                    left.push((e.key.clone(), (e.value, Some(p.value)), time));
                }
                if pairs.is_empty() {
                    unpaired.push(e);
                }
            } else {
                payments.push(e);
                let mut pairs: Vec<&&Sent> = orders.iter().filter(within).collect();
                pairs.sort_by_key(|o| (o.time, o.offset));
                for o in &pairs {
                    let time = e.time.max(o.time);
                    inner.push((e.key.clone(), (o.value, e.value), time));
                    left.push((e.key.clone(), (o.value, Some(e.value)), time));
                    unpaired.retain(|u| u.offset != o.offset);
                }
            }
        }
        let mut closed: Vec<&Sent> = unpaired.iter().copied().filter(|u| u.time < open).collect();
        closed.sort_by(|a, b| (a.time, &a.key, a.offset).cmp(&(b.time, &b.key, b.offset)));
        for u in closed {
            left.push((u.key.clone(), (u.value, None), u.time));
        }
        unpaired.retain(|u| u.time >= open);
    }
    (inner, left)
}

/// Windowed inner and left stream–stream joins against the model, in one
/// partition, with events out of order (within the grace and beyond it):
/// every pair, unpaired result and time, in order.
#[tokio::test]
async fn windowed_stream_joins_match_the_model() {
    use strom::JoinWindows;
    let (d, grace) = (5_000i64, 3_000i64);
    let windows =
        JoinWindows::of(Duration::from_millis(d as u64)).grace(Duration::from_millis(grace as u64));
    let mut app = one_partition_app("window-joins");
    let orders = app.topic::<String, u64>("orders");
    let payments = app.topic::<String, u64>("payments");
    let paired = app.topic::<String, (u64, u64)>("paired");
    let all = app.topic::<String, (u64, Option<u64>)>("all-orders");
    app.agent(&orders)
        .join_stream(&payments, "inner", windows, |o, p| (*o, *p))
        .sink(&paired);
    // The orders the inner join keeps, as its table holds them.
    let kept = app.table::<(String, i64, i64, u32), Option<(u64,)>>("inner-left", None);
    app.agent(&orders)
        .left_join_stream(&payments, "left", windows, |o, p| (*o, p.copied()))
        .sink(&all);
    let mut driver = TestDriver::new(app).await.unwrap();
    // A fixed pseudo-random walk of times, some events far out of order.
    let mut seed = 42u64;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let (mut sent, mut clock) = (Vec::new(), 1_000_000i64);
    let mut offsets = [0i64; 2];
    for i in 0..400u64 {
        clock += next(1_500) as i64;
        let late = next(10) == 0;
        let time = if late {
            clock - next(14_000) as i64
        } else {
            clock
        };
        let order = next(2) == 0;
        let key = format!("c{}", next(5));
        let topic = if order { &orders } else { &payments };
        driver.send_at(topic, &key, &i, time).await.unwrap();
        let offset = &mut offsets[usize::from(!order)];
        sent.push(Sent {
            order,
            key,
            time,
            value: i,
            offset: *offset,
        });
        *offset += 1;
    }
    let (want_inner, want_left) = window_join_model(&sent, d, grace);
    let got_inner: Vec<(String, (u64, u64), i64)> = (driver.read(&paired).unwrap().into_iter())
        .map(|r| (r.key, r.value, r.timestamp))
        .collect();
    let got_left: Vec<(String, (u64, Option<u64>), i64)> = (driver.read(&all).unwrap().into_iter())
        .map(|r| (r.key, r.value, r.timestamp))
        .collect();
    let unpaired = want_left
        .iter()
        .filter(|(_, (_, p), _)| p.is_none())
        .count();
    assert!(
        want_inner.len() > 50 && unpaired > 20,
        "a weak test: {} pairs, {unpaired} unpaired",
        want_inner.len()
    );
    assert_eq!(got_inner, want_inner);
    assert_eq!(got_left, want_left);
    // Orders whose windows closed are deleted as the stream time moves on
    // (every window's length of it, so none older than two lengths stay).
    let stream_time = sent.iter().map(|e| e.time).max().unwrap_or_default();
    let entries = driver.table(&kept).entries().unwrap();
    let orders_sent = sent.iter().filter(|e| e.order).count();
    assert!(
        !entries.is_empty() && entries.len() < orders_sent / 4,
        "{} of {orders_sent} orders kept",
        entries.len()
    );
    for ((key, time, _, _), _) in &entries {
        assert!(
            *time >= stream_time - 2 * (d + grace),
            "{key} at {time} is kept at stream time {stream_time}"
        );
    }
    driver.close().await.unwrap();
}

/// A windowed left join over 3 partitions keeps its state across a
/// restart: pairs whose order came before it and payment after are made,
/// every order gives its pairs or, once its window closes, one unpaired
/// result. Two joins of one name are refused.
#[tokio::test]
async fn a_windowed_left_join_pairs_across_a_restart() {
    use strom::JoinWindows;
    // A key's orders are 12 s apart: each pairs only with its own payment.
    let windows = JoinWindows::of(Duration::from_secs(3));
    let mut app = App::new("window-join-restart").with_partitions(3);
    let orders = app.topic::<String, u64>("orders");
    let payments = app.topic::<String, u64>("payments");
    let all = app.topic::<String, (u64, Option<u64>)>("all-orders");
    app.agent(&orders)
        .left_join_stream(&payments, "paid", windows, |o, p| (*o, p.copied()))
        .sink(&all);
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut want: Vec<(String, (u64, Option<u64>))> = Vec::new();
    let mut time = 5_000_000i64;
    for i in 0..60u64 {
        let key = format!("c{}", i % 12);
        time += 1_000;
        driver.send_at(&orders, &key, &i, time).await.unwrap();
        if i == 30 {
            driver.restart().await.unwrap();
        }
        // Every third order is paid 2 s later, after the next order.
        if i % 3 == 0 {
            driver
                .send_at(&payments, &key, &(1000 + i), time + 2_000)
                .await
                .unwrap();
            want.push((key, (i, Some(1000 + i))));
        } else {
            want.push((key, (i, None)));
        }
    }
    // Events far later in every partition close every window.
    for k in 0..30 {
        driver
            .send_at(&payments, &format!("z{k}"), &0, time + 60_000)
            .await
            .unwrap();
    }
    let mut got = pairs(&mut driver, &all);
    got.sort();
    want.sort();
    assert_eq!(got, want);
    driver.close().await.unwrap();

    let mut app = App::new("window-join-names");
    let orders = app.topic::<String, u64>("orders");
    let payments = app.topic::<String, u64>("payments");
    for _ in 0..2 {
        app.agent(&orders)
            .join_stream(&payments, "same", windows, |o, p| o + p)
            .for_each(|_ctx, _e| async { Ok(()) });
    }
    let e = TestDriver::new(app).await.unwrap_err().to_string();
    assert!(e.contains(r#"two windowed joins are named "same""#), "{e}");
}

/// An agent over a topic pattern reads every topic whose whole name
/// matches (of different partition counts), and no other; a pattern that
/// does not compile is an error, and sending to a pattern stops the app.
#[tokio::test]
async fn a_pattern_agent_reads_every_matching_topic() {
    let mut app = App::new("pattern").with_partitions(2);
    let eu = app.topic::<String, u64>("orders-eu").with_partitions(3);
    let us = app.topic::<String, u64>("orders-us");
    let archive = app.topic::<String, u64>("orders-eu-archive");
    let refunds = app.topic::<String, u64>("refunds");
    let seen = app.topic::<String, u64>("seen");
    let orders = app.topic_pattern::<String, u64>("orders-[a-z]{2}").unwrap();
    app.agent(&orders)
        .map_event(|e| (e.topic.to_string(), e.value))
        .sink(&seen);
    app.agent(&refunds).for_each(|_ctx, _e| async { Ok(()) });
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut want = Vec::new();
    for i in 0..30u64 {
        let (topic, name) = match i % 4 {
            0 => (&eu, "orders-eu"),
            1 => (&us, "orders-us"),
            2 => (&archive, ""),
            _ => (&refunds, ""),
        };
        driver.send(topic, &format!("o{i}"), &i).await.unwrap();
        if !name.is_empty() {
            want.push((name.to_string(), i));
        }
    }
    let mut got: Vec<(String, u64)> = (driver.read(&seen).unwrap().into_iter())
        .map(|r| (r.key, r.value))
        .collect();
    got.sort_by_key(|(_, i)| *i);
    assert_eq!(got, want);
    driver.close().await.unwrap();

    let mut app = App::new("bad-pattern");
    let e = app.topic_pattern::<String, u64>("orders-(").unwrap_err();
    assert!(e.to_string().contains(r#"topic pattern "orders-(""#), "{e}");

    let mut app = App::new("sink-to-pattern");
    let refunds = app.topic::<String, u64>("refunds");
    let orders = app.topic_pattern::<String, u64>("orders-.*").unwrap();
    app.agent(&refunds).sink(&orders);
    let e = TestDriver::new(app).await.unwrap_err();
    assert!(
        e.to_string()
            .contains(r#"an agent sends to "orders-.*", a pattern"#),
        "{e}"
    );

    let mut app = App::new("send-to-pattern");
    let refunds = app.topic::<String, u64>("refunds");
    let orders = app.topic_pattern::<String, u64>("orders-.*").unwrap();
    app.agent(&refunds)
        .for_each_with(orders, |ctx, refund, orders| async move {
            ctx.send(&orders, &refund.key, &refund.value).await?;
            Ok(())
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    let e = driver
        .send(&refunds, &"r1".to_string(), &1)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("is a pattern of topic names, read only"),
        "{e}"
    );
}

/// Counts as 8 big-endian bytes: a value codec of a user's own.
struct BigEndian;

impl strom::codec::Codec<u64> for BigEndian {
    fn encode(&self, n: &u64) -> Result<Option<bytes::Bytes>, strom::codec::CodecError> {
        Ok(Some(bytes::Bytes::copy_from_slice(&n.to_be_bytes())))
    }
    fn decode(&self, bytes: Option<&[u8]>) -> Result<u64, strom::codec::CodecError> {
        let array =
            bytes
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| strom::codec::CodecError {
                    what: format!("not 8 bytes: {bytes:?}"),
                })?;
        Ok(u64::from_be_bytes(array))
    }
}

/// Tables store their values in the codec they are given: a plain table
/// as UTF-8 text, a windowed one as big-endian numbers; the changelogs
/// carry those bytes, and reads, updates and closed windows decode them.
#[tokio::test]
async fn table_values_in_any_codec() {
    let mut app = one_partition_app("value-codecs");
    let names = app
        .table::<String, String>("names", String::new())
        .with_value_codec(Utf8);
    let per_minute = app
        .table::<String, u64>("per-minute", 0)
        .with_value_codec(BigEndian)
        .tumbling(Duration::from_secs(60));
    let closed = app.topic::<String, u64>("closed");
    let per_minute = per_minute.emit_on_close({
        let closed = closed.clone();
        move |ctx, key, _window, n| {
            let closed = closed.clone();
            async move { Ok(ctx.send(&closed, &key, &n).await?) }
        }
    });
    let people = app.topic::<String, String>("people");
    app.agent(&people).for_each_with(
        (names.clone(), per_minute.clone()),
        |ctx, e, (names, per_minute)| async move {
            let old = ctx.get(&names, &e.key).await?;
            ctx.set(&names, &e.key, &format!("{old}{}", e.value))
                .await?;
            ctx.update_windows(&per_minute, &e.key, |n| n + 1).await?;
            Ok(())
        },
    );
    let mut driver = TestDriver::new(app).await.unwrap();
    for (i, part) in ["Ad", "a"].iter().enumerate() {
        let time = 1_000_000 + i as i64;
        driver
            .send_at(&people, &"p1".into(), &part.to_string(), time)
            .await
            .unwrap();
    }
    driver
        .send_at(&people, &"p2".into(), &"x".into(), 1_200_000)
        .await
        .unwrap();
    assert_eq!(driver.table(&names).get(&"p1".into()).unwrap(), "Ada");
    let raw = driver.read_raw("value-codecs-names-changelog").unwrap();
    let last = raw
        .iter()
        .rev()
        .find(|r| r.key.as_deref() == Some(&b"p1"[..]))
        .unwrap();
    assert_eq!(
        last.value.as_deref(),
        Some(&b"Ada"[..]),
        "stored as UTF-8 text"
    );
    // p1's minute closed when p2's event moved the stream time on: 2 events.
    let sent: Vec<(String, u64)> = (driver.read(&closed).unwrap().into_iter())
        .map(|r| (r.key, r.value))
        .collect();
    assert_eq!(sent, [("p1".to_string(), 2)]);
    let windows = driver.windowed_table(&per_minute).entries().unwrap();
    assert!(
        windows.iter().any(|(k, _, n)| k == "p2" && *n == 1),
        "{windows:?}"
    );
    driver.close().await.unwrap();
}

/// A restart does not reopen closed windows: the stream time comes back
/// from what the join keeps, so an order emitted without a pair is never
/// paired afterwards. A windowed join's topics need one partition count
/// among themselves (not the largest topic's); a join over a pattern, or
/// over topics of different counts, is refused at start.
#[tokio::test]
async fn windowed_joins_keep_closed_windows_closed_and_check_their_topics() {
    use strom::JoinWindows;
    let windows = JoinWindows::of(Duration::from_millis(10));
    let mut app = one_partition_app("window-join-closed");
    let orders = app.topic::<String, u64>("orders");
    let payments = app.topic::<String, u64>("payments");
    let all = app.topic::<String, (u64, Option<u64>)>("all-orders");
    app.agent(&orders)
        .left_join_stream(&payments, "paid", windows, |o, p| (*o, p.copied()))
        .sink(&all);
    let mut driver = TestDriver::new(app).await.unwrap();
    driver
        .send_at(&orders, &"k".into(), &1, 1_000)
        .await
        .unwrap();
    driver
        .send_at(&orders, &"other".into(), &2, 1_015)
        .await
        .unwrap();
    let got = pairs(&mut driver, &all);
    assert_eq!(got, [("k".to_string(), (1, None))]);
    driver.restart().await.unwrap();
    // Within 10 ms of the order, but after its window closed.
    driver
        .send_at(&payments, &"k".into(), &7, 1_005)
        .await
        .unwrap();
    let got = pairs(&mut driver, &all);
    assert_eq!(got, [], "a closed window paired after the restart");
    driver.close().await.unwrap();

    // 3-partition join topics next to a 6-partition topic: fine.
    let mut app = App::new("window-join-counts").with_partitions(3);
    let orders = app.topic::<String, u64>("orders");
    let payments = app.topic::<String, u64>("payments");
    let clicks = app.topic::<String, u64>("clicks").with_partitions(6);
    let paired = app.topic::<String, u64>("paired");
    app.agent(&orders)
        .join_stream(&payments, "paid", windows, |o, p| o + p)
        .sink(&paired);
    app.agent(&clicks).for_each(|_ctx, _e| async { Ok(()) });
    let mut driver = TestDriver::new(app).await.unwrap();
    driver
        .send_at(&orders, &"k".into(), &1, 1_000)
        .await
        .unwrap();
    driver
        .send_at(&payments, &"k".into(), &2, 1_001)
        .await
        .unwrap();
    assert_eq!(values(&mut driver, &paired), [3]);
    driver.close().await.unwrap();

    let mut app = App::new("window-join-mismatch").with_partitions(3);
    let orders = app.topic::<String, u64>("orders");
    let payments = app.topic::<String, u64>("payments").with_partitions(4);
    app.agent(&orders)
        .join_stream(&payments, "paid", windows, |o, p| o + p)
        .for_each(|_ctx, _e| async { Ok(()) });
    let e = TestDriver::new(app).await.unwrap_err().to_string();
    assert!(
        e.contains("need one partition count")
            && e.contains(r#""payments" would be created with 4"#),
        "{e}"
    );

    let mut app = App::new("window-join-pattern");
    let orders = app.topic_pattern::<String, u64>("orders-.*").unwrap();
    let payments = app.topic::<String, u64>("payments");
    app.agent(&orders)
        .join_stream(&payments, "paid", windows, |o, p| o + p)
        .for_each(|_ctx, _e| async { Ok(()) });
    let e = TestDriver::new(app).await.unwrap_err().to_string();
    assert!(
        e.contains(r#"reads "orders-.*", a pattern of topic names"#),
        "{e}"
    );
}
