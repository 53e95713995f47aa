//! Windowed tables through the test driver: hopping windows, Faust's reads,
//! events without a time, plain reads of a windowed table.

use std::time::Duration;

use strom::codec::Utf8;
use strom::testing::TestDriver;
use strom::App;

/// Sums per key in 60 s windows every 30 s; after each update the agent
/// sends what it reads: the update's result, `current`, `delta(30s)` and
/// the number of live windows.
struct Sums {
    app: App,
    amounts: strom::Topic<String, u64>,
    reads: strom::Topic<String, Vec<i64>>,
    sums: strom::WindowedTable<String, u64>,
}

fn sums() -> Sums {
    let mut app = App::new("sums");
    let amounts = app.topic::<String, u64>("amounts").with_key_codec(Utf8);
    let reads = app.topic::<String, Vec<i64>>("reads").with_key_codec(Utf8);
    let sums = app
        .table::<String, u64>("sums", 0)
        .with_key_codec(Utf8)
        .hopping(Duration::from_secs(60), Duration::from_secs(30));
    let (table, out) = (sums.clone(), reads.clone());
    app.agent(&amounts).for_each(move |ctx, event| {
        let (sums, reads) = (table.clone(), out.clone());
        async move {
            let amount = event.value;
            let updated = ctx
                .update_windows(&sums, &event.key, |s| s + amount)
                .await?;
            let current = ctx.current(&sums, &event.key).await?;
            let before = ctx
                .delta(&sums, &event.key, Duration::from_secs(30))
                .await?;
            let windows = ctx.windows(&sums, &event.key).await?;
            let read = vec![
                updated.map_or(-1, |v| v as i64),
                current as i64,
                before as i64,
                windows.len() as i64,
            ];
            ctx.send(&reads, &event.key, &read).await?;
            Ok(())
        }
    });
    Sums {
        app,
        amounts,
        reads,
        sums,
    }
}

#[tokio::test]
async fn hopping_windows_sum_and_read() {
    let Sums {
        app,
        amounts,
        reads,
        sums,
    } = sums();
    let mut driver = TestDriver::new(app).await.unwrap();
    let k = "k".to_string();
    // 40 s: in [0, 60) and [30, 90).
    driver.send_at(&amounts, &k, &5, 40_000).await.unwrap();
    // 70 s: in [30, 90) and [60, 120); [0, 60) has closed (no grace).
    driver.send_at(&amounts, &k, &7, 70_000).await.unwrap();
    // 50 s: late for [0, 60) but [30, 90) is open: not late.
    driver.send_at(&amounts, &k, &1, 50_000).await.unwrap();
    let got: Vec<Vec<i64>> = driver
        .read(&reads)
        .unwrap()
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(
        got,
        [
            // [30, 90) = 5; the window 30 s before, [0, 60) = 5; 2 windows.
            vec![5, 5, 5, 2],
            // [60, 120) = 7; [30, 90) = 12; 3 windows.
            vec![7, 7, 12, 3],
            // [30, 90) = 13; [0, 60) = 5 (closed, kept).
            vec![13, 13, 5, 3],
        ]
    );
    let view = driver.windowed_table(&sums);
    let windows: Vec<(i64, u64)> = view
        .windows(&k)
        .unwrap()
        .into_iter()
        .map(|(w, v)| (w.start, v))
        .collect();
    assert_eq!(windows, [(0, 5), (30_000, 13), (60_000, 7)]);
    assert!(!driver
        .metrics()
        .contains("strom_late_events_total{table=\"sums\"} 1"));
    driver.close().await.unwrap();
}

/// An event without a time cannot be placed in a window: the agent's
/// error, handled by its policy (here: skipped), never a silent default.
#[tokio::test]
async fn an_event_without_a_time_is_the_agents_error() {
    let Sums {
        app,
        amounts,
        reads,
        sums,
    } = sums();
    let mut driver = TestDriver::new(app).await.unwrap();
    let k = "k".to_string();
    driver.send_at(&amounts, &k, &5, -1).await.unwrap();
    assert!(driver.read(&reads).unwrap().is_empty());
    assert!(driver.windowed_table(&sums).entries().unwrap().is_empty());
    assert!(
        driver
            .metrics()
            .contains("strom_agent_errors_total{topic=\"amounts\"} 1"),
        "{}",
        driver.metrics()
    );
    driver.send_at(&amounts, &k, &5, 1_000).await.unwrap();
    assert_eq!(driver.read(&reads).unwrap().len(), 1);
    driver.close().await.unwrap();
}

/// A failing `emit_on_close` callback (an error, then a panic) is not
/// skipped like an agent's error: the app stops without committing the
/// event, and after a restart the window closes again and is emitted once.
#[tokio::test]
async fn a_failing_close_callback_stops_the_app_and_the_window_closes_again() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let mut app = App::new("closing");
    let amounts = app.topic::<String, u64>("amounts").with_key_codec(Utf8);
    let out = app.topic::<String, u64>("closed").with_key_codec(Utf8);
    let calls = Arc::new(AtomicU32::new(0));
    let (topic, seen) = (out.clone(), calls.clone());
    let sums = app
        .table::<String, u64>("sums", 0)
        .with_key_codec(Utf8)
        .tumbling(Duration::from_secs(60))
        .emit_on_close(move |ctx, key, _window, sum| {
            let (out, call) = (topic.clone(), seen.fetch_add(1, Ordering::SeqCst));
            async move {
                match call {
                    0 => return Err("the sink is down".into()),
                    1 => panic!("the sink fell over"),
                    _ => ctx.send(&out, &key, &sum).await?,
                }
                Ok(())
            }
        });
    app.agent(&amounts).for_each(move |ctx, event| {
        let sums = sums.clone();
        async move {
            let amount = event.value;
            ctx.update_windows(&sums, &event.key, |s| s + amount)
                .await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    let k = "k".to_string();
    driver.send_at(&amounts, &k, &5, 1_000).await.unwrap();
    let stopped = driver.send_at(&amounts, &k, &7, 61_000).await;
    let error = stopped
        .expect_err("the app went on past a failed close")
        .to_string();
    assert!(error.contains("the sink is down"), "{error}");
    // The restart processes the event again: the window closes again, and
    // the callback panics.
    let error = driver
        .restart()
        .await
        .expect_err("went on past a panic")
        .to_string();
    assert!(error.contains("panicked"), "{error}");
    driver.restart().await.unwrap();
    driver.run_until_idle().await.unwrap();
    let sent: Vec<(String, u64)> = driver
        .read(&out)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    assert_eq!(
        sent,
        [(k, 5)],
        "the window closed again, once, with its sum"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    driver.close().await.unwrap();
}

/// Session windows through the driver: clicks per visit, a visit ending
/// after 10 s without a click, results on close. Events come out of order
/// by less than the grace, so every session is what the clicks sorted by
/// time make: split wherever two clicks are more than the gap apart.
#[tokio::test]
async fn sessions_equal_the_sorted_clicks_split_at_the_gap() {
    const GAP: i64 = 10_000;
    let mut app = App::new("visits");
    let clicks = app.topic::<String, ()>("clicks").with_key_codec(Utf8);
    let visits = app
        .topic::<String, (i64, i64, u64)>("visits")
        .with_key_codec(Utf8);
    let out = visits.clone();
    let per_visit = app
        .table::<String, u64>("clicks-per-visit", 0)
        .with_key_codec(Utf8)
        .session(Duration::from_millis(GAP as u64), |a, b| a + b)
        .grace(Duration::from_secs(6))
        .emit_on_close(move |ctx, user, window, n| {
            let out = out.clone();
            async move {
                Ok(ctx
                    .send(&out, &user, &(window.start, window.end, n))
                    .await?)
            }
        });
    let table = per_visit.clone();
    app.agent(&clicks).for_each(move |ctx, event| {
        let table = table.clone();
        async move {
            ctx.update_windows(&table, &event.key, |n| n + 1).await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();

    // Clicks of three users at steps of 0 to 25 s, sent in the order of
    // their time plus up to 5 s of jitter.
    let mut next = xorshift(0x2545_f491_4f6c_dd1d);
    let mut times: Vec<(String, i64)> = Vec::new();
    for user in ["ann", "bob", "cy"] {
        let mut t = 1_000_000;
        for _ in 0..120 {
            t += next(25_001) as i64;
            times.push((user.to_string(), t));
        }
    }
    let mut sending: Vec<(i64, String, i64)> = times
        .iter()
        .map(|(u, t)| (t + next(5_000) as i64, u.clone(), *t))
        .collect();
    sending.sort();
    for (_, user, t) in &sending {
        driver.send_at(&clicks, user, &(), *t).await.unwrap();
    }
    // A last click of each user, far past every session's end + gap +
    // grace, closes the rest (windows close by partition).
    for user in ["ann", "bob", "cy"] {
        let user = user.to_string();
        driver
            .send_at(&clicks, &user, &(), 100_000_000)
            .await
            .unwrap();
    }

    let mut expected: Vec<(String, i64, i64, u64)> = Vec::new();
    times.sort();
    for (user, t) in &times {
        match expected.last_mut() {
            Some((u, _, end, n)) if u == user && *t <= *end - 1 + GAP => {
                *end = t + 1;
                *n += 1;
            }
            _ => expected.push((user.clone(), *t, t + 1, 1)),
        }
    }
    let got: Vec<(String, i64, i64, u64)> = driver
        .read(&visits)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value.0, r.value.1, r.value.2))
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert!(expected.len() > 30, "{} sessions only", expected.len());
    assert_eq!(sorted, expected);
    for user in ["ann", "bob", "cy"] {
        let starts: Vec<i64> = got.iter().filter(|v| v.0 == user).map(|v| v.1).collect();
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{user}: in order");
    }
    assert!(driver
        .metrics()
        .contains("strom_late_events_total{table=\"clicks-per-visit\"} 0"));
    driver.close().await.unwrap();
}

/// A late event's record goes to the table's late-events topic as it was
/// read, with headers saying where from; a record whose several events are
/// late goes there once.
#[tokio::test]
async fn late_records_go_to_the_late_events_topic_once() {
    let mut app = App::new("late");
    let lines = app.topic::<String, String>("lines").with_key_codec(Utf8);
    let late = app
        .topic::<String, String>("lines-late")
        .with_key_codec(Utf8);
    let counts = app
        .table::<String, u64>("word-minutes", 0)
        .with_key_codec(Utf8)
        .tumbling(Duration::from_secs(60))
        .late_events(&late);
    let table = counts.clone();
    app.agent(&lines)
        .flat_map(|line: String| {
            line.split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .for_each(move |ctx, event| {
            let table = table.clone();
            async move {
                ctx.update_windows(&table, &event.key, |n| n + 1).await?;
                Ok(())
            }
        });
    let mut driver = TestDriver::new(app).await.unwrap();
    let k = "k".to_string();
    driver
        .send_at(&lines, &k, &"a b".into(), 10_000)
        .await
        .unwrap();
    driver
        .send_at(&lines, &k, &"c".into(), 70_000)
        .await
        .unwrap();
    // [0, 60 s) has closed: both words are late, the record goes once.
    driver
        .send_at(&lines, &k, &"a b".into(), 20_000)
        .await
        .unwrap();
    driver
        .send_at(&lines, &k, &"d".into(), 80_000)
        .await
        .unwrap();

    let got = driver.read(&late).unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    let record = &got[0];
    assert_eq!((record.key.as_str(), record.value.as_str()), ("k", "a b"));
    assert_eq!(record.timestamp, 20_000);
    let header = |name: &str| {
        record
            .headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value.as_deref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(header("strom.late.table").as_deref(), Some("word-minutes"));
    assert_eq!(header("strom.late.topic").as_deref(), Some("lines"));
    assert_eq!(header("strom.late.offset").as_deref(), Some("2"));
    assert_eq!(header("strom.late.stream_time").as_deref(), Some("70000"));
    assert!(driver
        .metrics()
        .contains("strom_late_events_total{table=\"word-minutes\"} 2"));
    driver.close().await.unwrap();
}

/// Sliding windows through the driver: payments per card in any 10 s.
/// Payments come out of order by less than the grace. What each update
/// returns is the count of the 10 s up to the payment among those sent so
/// far; the windows emitted on close are Kafka Streams' (one ending at each
/// payment, one just after each payment that a later one falls within 10 s
/// of), each once, with every payment in it; and the table answers the
/// count of the 10 s up to any time.
#[tokio::test]
async fn sliding_windows_count_every_ten_seconds_of_payments() {
    const D: i64 = 10_000;
    let mut app = App::new("cards");
    let payments = app.topic::<String, i64>("payments").with_key_codec(Utf8);
    let counts = app
        .topic::<String, (i64, u64)>("counts")
        .with_key_codec(Utf8);
    let windows = app
        .topic::<String, (i64, i64, u64)>("windows")
        .with_key_codec(Utf8);
    let out = windows.clone();
    let recent = app
        .table::<String, u64>("payments-per-card", 0)
        .with_key_codec(Utf8)
        .sliding(Duration::from_millis(D as u64))
        .grace(Duration::from_secs(5))
        .emit_on_close(move |ctx, card, window, n| {
            let out = out.clone();
            async move {
                Ok(ctx
                    .send(&out, &card, &(window.start, window.end, n))
                    .await?)
            }
        });
    let (table, sent) = (recent.clone(), counts.clone());
    app.agent(&payments).for_each(move |ctx, event| {
        let (table, sent) = (table.clone(), sent.clone());
        async move {
            let n = ctx.update_windows(&table, &event.key, |n| n + 1).await?;
            let n = n.expect("no payment is late");
            ctx.send(&sent, &event.key, &(event.value, n)).await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();

    let mut next = xorshift(0x5851_f42d_4c95_7f2d);
    let mut times: Vec<(String, i64)> = Vec::new();
    for card in ["4111", "5500"] {
        let mut t = 1_000_000;
        for _ in 0..150 {
            t += next(8_001) as i64;
            times.push((card.to_string(), t));
        }
    }
    let mut sending: Vec<(i64, String, i64)> = times
        .iter()
        .map(|(c, t)| (t + next(3_000) as i64, c.clone(), *t))
        .collect();
    sending.sort();
    let mut expected_counts = Vec::new();
    for (i, (_, card, t)) in sending.iter().enumerate() {
        driver.send_at(&payments, card, t, *t).await.unwrap();
        let so_far = sending[..=i]
            .iter()
            .filter(|(_, c, e)| c == card && t - D <= *e && e <= t)
            .count() as u64;
        expected_counts.push((card.clone(), (*t, so_far)));
    }
    let got: Vec<(String, (i64, u64))> = driver
        .read(&counts)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value))
        .collect();
    assert_eq!(got, expected_counts);

    // The table at any time: the payments of the 10 s up to it.
    let view = driver.windowed_table(&recent);
    for card in ["4111", "5500"] {
        let card = card.to_string();
        let mine: Vec<i64> = times
            .iter()
            .filter(|(c, _)| *c == card)
            .map(|(_, t)| *t)
            .collect();
        for at in (990_000..mine[mine.len() - 1] + 2 * D).step_by(997) {
            let want = mine.iter().filter(|&&e| at - D <= e && e <= at).count() as u64;
            assert_eq!(view.get(&card, at).unwrap(), want, "{card} at {at}");
        }
    }

    // A last payment far ahead closes every window, each once.
    for card in ["4111", "5500"] {
        let card = card.to_string();
        driver
            .send_at(&payments, &card, &0, 100_000_000)
            .await
            .unwrap();
    }
    let mut expected: Vec<(String, i64, i64, u64)> = Vec::new();
    for (card, t) in &times {
        let mine = || times.iter().filter(|(c, _)| c == card).map(|(_, e)| *e);
        let count = |from: i64, to: i64| mine().filter(|&e| from <= e && e <= to).count() as u64;
        expected.push((card.clone(), t - D, t + 1, count(t - D, *t)));
        if mine().any(|e| *t < e && e <= t + 1 + D) {
            expected.push((card.clone(), t + 1, t + 2 + D, count(t + 1, t + 1 + D)));
        }
    }
    expected.sort();
    expected.dedup();
    let mut closed: Vec<(String, i64, i64, u64)> = driver
        .read(&windows)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value.0, r.value.1, r.value.2))
        .collect();
    closed.sort();
    assert!(expected.len() > 400, "{} windows only", expected.len());
    assert_eq!(closed, expected);
    assert!(driver
        .metrics()
        .contains("strom_late_events_total{table=\"payments-per-card\"} 0"));
    driver.close().await.unwrap();
}

/// A small seeded pseudo-random generator: `next(n)` is below `n`.
fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}
