//! The test driver on the examples: outputs, tables, restart.

#[path = "../examples/wordcount.rs"]
mod wordcount;

use std::collections::BTreeMap;

use strom::testing::TestDriver;

#[tokio::test]
async fn wordcount_counts_and_sends_each_new_count() {
    let wc = wordcount::wordcount(strom::App::new("wordcount"), "sentences", "word-counts-out");
    let mut driver = TestDriver::new(wc.app).await.unwrap();
    driver
        .send(&wc.sentences, &(), &"the cat and The hat".to_string())
        .await
        .unwrap();
    let out = driver.read(&wc.counts_out).unwrap();
    let mut pairs: Vec<(String, u64)> = out.into_iter().map(|r| (r.key, r.value)).collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [("and", 1), ("cat", 1), ("hat", 1), ("the", 1), ("the", 2)]
            .map(|(k, v)| (k.to_string(), v))
    );
    assert_eq!(driver.table(&wc.counts).get(&"the".into()).unwrap(), 2);
    driver.restart().await.unwrap();
    driver
        .send(&wc.sentences, &(), &"the end".to_string())
        .await
        .unwrap();
    assert_eq!(driver.table(&wc.counts).get(&"the".into()).unwrap(), 3);
    let out = driver.read(&wc.counts_out).unwrap();
    assert_eq!(out.len(), 2, "{out:?}");
    driver.close().await.unwrap();
}

#[path = "../examples/enrich.rs"]
mod enrich;

/// Page views are enriched from the global table of profiles: with the
/// profile their user had when the view was processed, whichever partition
/// either is in (3 partitions of users, 5 of views); a user without one gets
/// the default profile; a deleted profile is gone; the table survives a
/// restart.
#[tokio::test]
async fn enrich_joins_views_with_profiles() {
    let e = enrich::enrich(strom::App::new("enrich"), "");
    let users = e.users.clone().with_partitions(3);
    let views = e.views.clone().with_partitions(5);
    let mut driver = TestDriver::new(e.app).await.unwrap();
    let profile = |name: &str| enrich::Profile {
        name: name.into(),
        country: "UK".into(),
    };
    let view = |url: &str| enrich::PageView { url: url.into() };
    // Users on every partition of both topics.
    let ids: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
    for id in &ids[..10] {
        driver.send(&users, id, &profile(id)).await.unwrap();
    }
    for id in &ids {
        driver.send(&views, id, &view("/a")).await.unwrap();
    }
    driver.send(&users, &ids[0], &profile("Ada")).await.unwrap();
    driver
        .send_raw(users.name(), Some(b"u1"), None)
        .await
        .unwrap();
    driver.send(&views, &ids[0], &view("/b")).await.unwrap();
    driver.send(&views, &ids[1], &view("/b")).await.unwrap();
    driver.restart().await.unwrap();
    driver.send(&views, &ids[0], &view("/c")).await.unwrap();

    let mut expected: Vec<(String, String, String)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let name = if i < 10 { id.clone() } else { String::new() };
            (id.clone(), name, "/a".to_string())
        })
        .collect();
    for (id, name, url) in [("u0", "Ada", "/b"), ("u1", "", "/b"), ("u0", "Ada", "/c")] {
        expected.push((id.into(), name.into(), url.into()));
    }
    let mut got: Vec<(String, String, String)> = driver
        .read(&e.enriched)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value.name, r.value.url))
        .collect();
    // Each view's output is in its partition: compare as sets of outputs,
    // and the order per user.
    let per_user = |v: &[(String, String, String)], id: &str| -> Vec<(String, String)> {
        v.iter()
            .filter(|(u, _, _)| u == id)
            .map(|(_, n, url)| (n.clone(), url.clone()))
            .collect()
    };
    for id in &ids {
        assert_eq!(per_user(&got, id), per_user(&expected, id), "user {id}");
    }
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    let table = driver.global_table(&e.profiles);
    assert_eq!(table.entries().unwrap().len(), 9);
    assert_eq!(table.get(&"u0".to_string()).unwrap().unwrap().name, "Ada");
    assert!(table.get(&"u1".to_string()).unwrap().is_none());
    driver.close().await.unwrap();
}

/// A value in a global table's topic that does not decode fails the event
/// that reads it, under the agent's error policy (here: skipped and
/// counted); the events after it go on.
#[tokio::test]
async fn a_global_value_that_does_not_decode_is_the_reading_events_error() {
    let e = enrich::enrich(strom::App::new("enrich-bad"), "");
    let mut driver = TestDriver::new(e.app).await.unwrap();
    driver
        .send_raw(e.users.name(), Some(b"u1"), Some(b"not json"))
        .await
        .unwrap();
    let view = enrich::PageView { url: "/a".into() };
    driver.send(&e.views, &"u1".into(), &view).await.unwrap();
    driver.send(&e.views, &"u2".into(), &view).await.unwrap();
    let got: Vec<String> = driver
        .read(&e.enriched)
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(got, ["u2"]);
    let metrics = driver.metrics();
    assert!(
        metrics.contains("strom_agent_errors_total{topic=\"page-views\"} 1"),
        "{metrics}"
    );
    driver.close().await.unwrap();
}

/// The driver pauses tokio's clock, which only the current-thread runtime
/// allows: on another it says so instead of panicking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_needs_the_current_thread_runtime() {
    let wc = wordcount::wordcount(strom::App::new("wc-mt"), "in", "out");
    let e = TestDriver::new(wc.app).await.unwrap_err();
    assert!(e.to_string().contains("current-thread"), "{e}");
}

/// Input for a topic the app did not declare is refused with an error
/// naming it, and the driver goes on.
#[tokio::test]
async fn sending_to_an_undeclared_topic_is_an_error() {
    let wc = wordcount::wordcount(strom::App::new("wc-undeclared"), "in", "out");
    let mut driver = TestDriver::new(wc.app).await.unwrap();
    let e = driver
        .send_raw("nowhere", None, Some(b"x"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nowhere"), "{e}");
    let e = driver.read_raw("nowhere").unwrap_err();
    assert!(e.to_string().contains("nowhere"), "{e}");
    driver
        .send(&wc.sentences, &(), &"still here".to_string())
        .await
        .unwrap();
    assert_eq!(driver.table(&wc.counts).get(&"here".into()).unwrap(), 1);
}

#[path = "../examples/pageviews.rs"]
mod pageviews;

/// A minute of 2026-01-01, in ms since the epoch.
fn minute(n: i64) -> i64 {
    1_767_225_600_000 + n * 60_000
}

/// Views are counted per page and minute of their event time; a minute's
/// final count goes out once, when the stream time passes its end plus the
/// 10 s grace, in window order per page; a view within the grace still
/// counts, one after it is dropped.
#[tokio::test]
async fn pageviews_emit_each_minute_once_when_it_closes() {
    let p = pageviews::pageviews(strom::App::new("pageviews"));
    let mut driver = TestDriver::new(p.app).await.unwrap();
    let home = "/home".to_string();
    let view = |user: &str| pageviews::PageView { user: user.into() };
    for (t, user) in [
        (minute(0) + 1_000, "a"),
        (minute(0) + 30_000, "b"),
        (minute(1) + 5_000, "c"),
    ] {
        driver
            .send_at(&p.views, &home, &view(user), t)
            .await
            .unwrap();
    }
    // Within the grace of minute 0: counts there.
    driver
        .send_at(&p.views, &home, &view("d"), minute(0) + 59_000)
        .await
        .unwrap();
    assert!(
        driver.read(&p.per_minute).unwrap().is_empty(),
        "nothing closed yet"
    );
    assert_eq!(
        driver
            .windowed_table(&p.counts)
            .get(&home, minute(0))
            .unwrap(),
        3
    );

    // Minute 1 + 10 s: minute 0 closes.
    driver
        .send_at(&p.views, &home, &view("e"), minute(1) + 10_000)
        .await
        .unwrap();
    let out = driver.read(&p.per_minute).unwrap();
    let counts: Vec<(String, pageviews::MinuteCount, i64)> = out
        .into_iter()
        .map(|r| (r.key, r.value, r.timestamp))
        .collect();
    let closed = pageviews::MinuteCount {
        start: minute(0),
        end: minute(1),
        count: 3,
    };
    assert_eq!(counts, [(home.clone(), closed, minute(1) - 1)]);

    // Late for minute 0: dropped, and it closes nothing again.
    driver
        .send_at(&p.views, &home, &view("f"), minute(0) + 2_000)
        .await
        .unwrap();
    assert!(driver.read(&p.per_minute).unwrap().is_empty());
    assert_eq!(
        driver
            .windowed_table(&p.counts)
            .get(&home, minute(0))
            .unwrap(),
        3
    );
    assert!(
        driver
            .metrics()
            .contains("strom_late_events_total{table=\"views-per-minute\"} 1"),
        "{}",
        driver.metrics()
    );

    // After a restart nothing closes twice; minute 1 closes once at 2:10.
    driver.restart().await.unwrap();
    let other = "/about".to_string();
    driver
        .send_at(&p.views, &other, &view("g"), minute(2) + 10_000)
        .await
        .unwrap();
    driver
        .send_at(&p.views, &home, &view("h"), minute(2) + 11_000)
        .await
        .unwrap();
    let out: Vec<(String, i64, u64)> = driver
        .read(&p.per_minute)
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.value.start, r.value.count))
        .collect();
    assert_eq!(
        out,
        [(home.clone(), minute(1), 2)],
        "only minute 1 of /home closed"
    );
    let windows = driver.windowed_table(&p.counts).windows(&home).unwrap();
    let starts: Vec<i64> = windows.iter().map(|(w, _)| w.start).collect();
    assert_eq!(starts, [minute(0), minute(1), minute(2)]);
    driver.close().await.unwrap();
}

/// A lookup of a key that belongs to another partition is an error naming
/// the table, the key and both partitions — not the table's default, which
/// is what the other partition's task would never have told this one.
#[tokio::test]
async fn a_lookup_on_another_partition_is_an_error() {
    use std::sync::{Arc, Mutex};
    use strom::codec::Utf8;

    let mut app = strom::App::new("lookup").with_partitions(4);
    let orders = app.topic::<String, String>("orders").with_key_codec(Utf8);
    let profiles = app
        .table::<String, String>("profiles", String::new())
        .with_key_codec(Utf8);
    /// (order key, customer, the lookup's profile or error)
    type Seen = Vec<(String, String, Result<String, String>)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    {
        let seen = seen.clone();
        app.agent(&orders).for_each(move |ctx, event| {
            let (profiles, seen) = (profiles.clone(), seen.clone());
            async move {
                let got = ctx.get(&profiles, &event.value).await;
                let got = got.map_err(|e| e.to_string());
                seen.lock().unwrap().push((event.key, event.value, got));
                Ok(())
            }
        });
    }
    let mut driver = TestDriver::new(app).await.unwrap();
    for i in 0..20 {
        let customer = format!("customer-{i}");
        // Keyed by the customer: the lookup is on the event's own partition.
        driver.send(&orders, &customer, &customer).await.unwrap();
        // Keyed by an order id: mostly another partition.
        driver
            .send(&orders, &format!("order-{i}"), &customer)
            .await
            .unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 40);
    let mut foreign = 0;
    for (key, customer, got) in &seen {
        match got {
            Ok(profile) => assert_eq!(profile, "", "{key} -> {customer}"),
            Err(e) => {
                assert_ne!(key, customer, "a lookup on its own partition failed: {e}");
                assert!(
                    e.contains("\"profiles\"") && e.contains(&format!("key {customer:?}")),
                    "{e}"
                );
                foreign += 1;
            }
        }
    }
    // 20 order ids over 4 partitions: about 15 land away from their customer.
    assert!(
        foreign >= 5,
        "only {foreign} foreign lookups failed: {seen:?}"
    );
    driver.close().await.unwrap();
}

/// The obvious program is right: a topic and a table, both with the default
/// key codecs, and an agent keeping a running total per key of the stream.
/// Each key's events land where its table entry lives (its partition is
/// murmur2 of its JSON bytes on both sides), so no update is refused, even
/// for keys whose raw UTF-8 bytes would belong elsewhere.
#[tokio::test]
async fn a_table_with_the_default_key_codec_follows_its_topic() {
    let mut app = strom::App::new("totals").with_partitions(4);
    let orders = app.topic::<String, u64>("orders");
    let totals = app.table::<String, u64>("totals", 0);
    let table = totals.clone();
    app.agent(&orders).for_each(move |ctx, event| {
        let table = table.clone();
        async move {
            ctx.update(&table, &event.key, |t| t + event.value).await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    let customers: Vec<String> = (0..30).map(|i| format!("customer-{i}")).collect();
    let partition = |bytes: &[u8]| strom_client::partitioner::partition_for_key(bytes, 4);
    let elsewhere = customers
        .iter()
        .filter(|c| partition(c.as_bytes()) != partition(format!("{c:?}").as_bytes()))
        .count();
    assert!(
        elsewhere >= 10,
        "only {elsewhere} keys tell the rules apart"
    );
    for (i, customer) in customers.iter().enumerate() {
        for amount in [1, i as u64] {
            driver.send(&orders, customer, &amount).await.unwrap();
        }
    }
    let view = driver.table(&totals);
    for (i, customer) in customers.iter().enumerate() {
        assert_eq!(view.get(customer).unwrap(), 1 + i as u64, "{customer}");
    }
    driver.close().await.unwrap();
}

/// A composite key partitioned by its first part: orders counted per
/// customer and day over 3 partitions; after each order the agent reads the
/// customer's days back by prefix (every one, in day order), a range of
/// days, and the whole partition, which holds only its own customers.
#[tokio::test]
async fn composite_keys_scan_by_prefix_and_range() {
    use std::sync::{Arc, Mutex};
    use strom::codec::Json;

    let mut app = strom::App::new("per-day").with_partitions(3);
    let orders = app.topic::<String, u32>("orders");
    let per_day = app
        .table::<(String, u32), u64>("orders-per-day", 0)
        .partitioned_by(|(customer, _): &(String, u32)| customer.clone(), Json);
    /// Per order: (customer, its days by prefix, days 2 and 3 by range,
    /// whether every entry of the partition is a customer of it).
    type Seen = Vec<(String, Vec<(u32, u64)>, Vec<u32>, bool)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    {
        let (table, seen) = (per_day.clone(), seen.clone());
        app.agent(&orders).for_each(move |ctx, event| {
            let (table, seen) = (table.clone(), seen.clone());
            async move {
                let customer = event.key;
                ctx.update(&table, &(customer.clone(), event.value), |n| n + 1)
                    .await?;
                let days = ctx.prefix(&table, &customer).await?;
                let days: Vec<(u32, u64)> = days.into_iter().map(|((_, d), n)| (d, n)).collect();
                let span = ctx
                    .range(&table, (customer.clone(), 2)..(customer.clone(), 4))
                    .await?;
                let span = span.into_iter().map(|((_, d), _)| d).collect();
                let all = ctx.entries(&table).await?;
                let own = all.iter().all(|((c, _), _)| {
                    strom_client::partitioner::partition_for_key(format!("{c:?}").as_bytes(), 3)
                        == ctx.partition()
                });
                seen.lock().unwrap().push((customer, days, span, own));
                Ok(())
            }
        });
    }
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut truth: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    let customers = ["ada", "grace", "alan", "barbara", "edsger", "ken"];
    for i in 0..60u32 {
        let customer = customers[(i * 7 % 6) as usize].to_string();
        let day = (i * 5) % 6;
        *truth
            .entry(customer.clone())
            .or_default()
            .entry(day)
            .or_default() += 1;
        driver.send(&orders, &customer, &day).await.unwrap();
        let seen = seen.lock().unwrap();
        let (who, days, span, own) = seen.last().expect("the order was handled");
        assert_eq!(who, &customer);
        let want: Vec<(u32, u64)> = truth[&customer].iter().map(|(d, n)| (*d, *n)).collect();
        assert_eq!(days, &want, "{customer} by prefix");
        let want: Vec<u32> = truth[&customer]
            .keys()
            .copied()
            .filter(|d| (2..4).contains(d))
            .collect();
        assert_eq!(span, &want, "{customer} by range");
        assert!(own, "a partition held another's customer");
    }
    assert_eq!(seen.lock().unwrap().len(), 60);
    let view = driver.table(&per_day);
    assert_eq!(view.get(&("ada".into(), 0)).unwrap(), truth["ada"][&0]);
    driver.close().await.unwrap();
}

/// A struct key (table_key!): a customer's days read back by prefix in
/// day order, and a range of days, over 3 partitions; the web's text of a
/// key (a JSON array of its fields) reads it too.
#[tokio::test]
async fn struct_keys_scan_by_prefix_and_range() {
    use std::sync::{Arc, Mutex};
    use strom::codec::Json;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Day {
        customer: String,
        day: u32,
    }
    strom::table_key!(Day {
        customer: String,
        day: u32
    });

    let mut app = strom::App::new("struct-keys").with_partitions(3);
    let orders = app.topic::<String, u32>("orders");
    let per_day = app
        .table::<Day, u64>("orders-per-day", 0)
        .partitioned_by(|d: &Day| d.customer.clone(), Json);
    type Seen = Arc<Mutex<Vec<(Vec<(u32, u64)>, Vec<u32>)>>>;
    let seen: Seen = Arc::default();
    app.agent(&orders).for_each_with(
        (per_day.clone(), seen.clone()),
        |ctx, order, (per_day, seen)| async move {
            let key = Day {
                customer: order.key.clone(),
                day: order.value,
            };
            ctx.update(&per_day, &key, |n| n + 1).await?;
            let days = ctx.prefix(&per_day, &order.key).await?;
            let days = days.into_iter().map(|(d, n)| (d.day, n)).collect();
            let from = Day {
                customer: order.key.clone(),
                day: 2,
            };
            let to = Day {
                customer: order.key.clone(),
                day: 4,
            };
            let span = ctx.range(&per_day, from..to).await?;
            let span = span.into_iter().map(|(d, _)| d.day).collect();
            seen.lock().unwrap().push((days, span));
            Ok(())
        },
    );
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut truth: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    // Names where one begins another, to catch a prefix that runs over.
    let customers = ["ada", "adam", "al", "alan", "barbara"];
    for i in 0..60u32 {
        let customer = customers[(i * 7 % 5) as usize].to_string();
        let day = (i * 5) % 7;
        *truth
            .entry(customer.clone())
            .or_default()
            .entry(day)
            .or_default() += 1;
        driver.send(&orders, &customer, &day).await.unwrap();
        let (days, span) = seen.lock().unwrap().last().cloned().unwrap();
        let want: Vec<(u32, u64)> = truth[&customer].iter().map(|(d, n)| (*d, *n)).collect();
        assert_eq!(days, want, "{customer} by prefix");
        let want: Vec<u32> = (truth[&customer].keys().copied())
            .filter(|d| (2..4).contains(d))
            .collect();
        assert_eq!(span, want, "{customer} by range");
    }
    let key = Day {
        customer: "adam".into(),
        day: 3,
    };
    assert_eq!(driver.table(&per_day).get(&key).unwrap(), truth["adam"][&3]);
    use strom::table::TableKey;
    assert_eq!(Day::parse_key(r#"["adam", 3]"#).unwrap(), key);
    driver.close().await.unwrap();
}

/// A set table: products viewed per customer over 3 partitions, "+p" adds
/// and "-p" discards. After every event the agent's view of the set is the
/// model's; the changelog holds one record per add or discard (a delta
/// keyed by customer and product, a tombstone for a discard), not whole
/// sets; and the sets come back after a restart.
#[tokio::test]
async fn a_set_table_adds_and_discards_members_as_deltas() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::{Arc, Mutex};
    use strom::table::TableKey;

    let mut app = strom::App::new("viewed").with_partitions(3);
    let views = app.topic::<String, String>("views");
    let viewed = app.set_table::<String, String>("viewed-products");
    /// Per event: (customer, its members, whether "lamp" is in).
    type Seen = Vec<(String, Vec<String>, bool)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    {
        let (set, seen) = (viewed.clone(), seen.clone());
        app.agent(&views).for_each(move |ctx, event| {
            let (set, seen) = (set.clone(), seen.clone());
            async move {
                let (op, product) = event.value.split_at(1);
                let product = product.to_string();
                match op {
                    "+" => ctx.add(&set, &event.key, &product).await?,
                    _ => ctx.discard(&set, &event.key, &product).await?,
                }
                let members = ctx.members(&set, &event.key).await?;
                let lamp = ctx.contains(&set, &event.key, &"lamp".to_string()).await?;
                seen.lock().unwrap().push((event.key, members, lamp));
                Ok(())
            }
        });
    }
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut model: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let customers = ["ada", "grace", "alan", "barbara", "edsger"];
    let products = ["lamp", "desk", "chair", "a\0b"];
    let mut ops = 0;
    for i in 0..40usize {
        let customer = customers[i * 3 % 5].to_string();
        let product = products[i * 7 % 4].to_string();
        let add = i % 3 != 2;
        let set = model.entry(customer.clone()).or_default();
        if add {
            set.insert(product.clone());
        } else {
            set.remove(&product);
        }
        let op = if add { "+" } else { "-" };
        driver
            .send(&views, &customer, &format!("{op}{product}"))
            .await
            .unwrap();
        ops += 1;
        let seen = seen.lock().unwrap();
        let (who, members, lamp) = seen.last().expect("the view was handled");
        assert_eq!(who, &customer);
        let want: Vec<String> = model[&customer].iter().cloned().collect();
        assert_eq!(members, &want, "{customer} after {op}{product}");
        assert_eq!(*lamp, model[&customer].contains("lamp"), "{customer}");
    }
    let changelog = driver.read_raw("viewed-viewed-products-changelog").unwrap();
    assert_eq!(
        changelog.len(),
        ops,
        "one changelog record per add or discard"
    );
    for r in &changelog {
        let key = r.key.as_deref().expect("a keyed delta");
        let (customer, product) = <(String, String)>::decode_key(key).unwrap();
        assert!(customers.contains(&customer.as_str()) && products.contains(&product.as_str()));
    }
    assert!(changelog.iter().any(|r| r.value.is_none()), "no tombstone");
    driver.restart().await.unwrap();
    for customer in customers {
        let want: Vec<String> = model[customer].iter().cloned().collect();
        let members = driver
            .set_table(&viewed)
            .members(&customer.to_string())
            .unwrap();
        assert_eq!(members, want, "{customer} after the restart");
    }
    driver
        .send(&views, &"ada".to_string(), &"+zebra".to_string())
        .await
        .unwrap();
    let (_, members, _) = seen.lock().unwrap().last().cloned().unwrap();
    let mut want: Vec<String> = model["ada"].iter().cloned().collect();
    want.push("zebra".into());
    assert_eq!(members, want, "restored from the changelog");
    driver.close().await.unwrap();
}

/// An app reading a 12-partition and a 3-partition topic with no table
/// shared between them starts and processes every event of both: the table
/// of the 12-partition topic's agent counts every click, the other agent
/// forwards every order.
#[tokio::test]
async fn topics_of_different_counts_without_a_shared_table_are_processed() {
    let mut app = strom::App::new("counts").with_partitions(4);
    let clicks = app.topic::<String, String>("clicks").with_partitions(12);
    let orders = app.topic::<String, u64>("orders").with_partitions(3);
    let out = app.topic::<String, u64>("out").with_partitions(2);
    let per_page = app.table::<String, u64>("per-page", 0);
    let table = per_page.clone();
    app.agent(&clicks).for_each(move |ctx, click| {
        let per_page = table.clone();
        async move {
            ctx.update(&per_page, &click.key, |n| n + 1).await?;
            Ok(())
        }
    });
    app.agent(&orders).map(|cents| cents * 2).sink(&out);
    let mut driver = TestDriver::new(app).await.unwrap();
    let mut want: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..240u64 {
        let page = format!("page{}", i % 37);
        driver.send(&clicks, &page, &"u1".into()).await.unwrap();
        *want.entry(page).or_default() += 1;
        driver.send(&orders, &format!("o{i}"), &i).await.unwrap();
    }
    driver.run_until_idle().await.unwrap();
    let got: BTreeMap<String, u64> = driver
        .table(&per_page)
        .entries()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(got, want);
    let mut sent: Vec<(String, u64)> = (driver.read(&out).unwrap().into_iter())
        .map(|r| (r.key, r.value))
        .collect();
    sent.sort();
    let mut expected: Vec<(String, u64)> = (0..240u64).map(|i| (format!("o{i}"), i * 2)).collect();
    expected.sort();
    assert_eq!(sent, expected);
    driver.close().await.unwrap();
}

/// A join of a topic with fewer partitions than the largest one agents read
/// (the tables' count) is refused before any topic is created, naming the
/// counts; a table used from such a topic's handler fails the event with an
/// error that says the tables' count.
#[tokio::test]
async fn a_join_needs_the_tables_partition_count() {
    let mut app = strom::App::new("join-counts").with_partitions(4);
    let clicks = app
        .topic::<String, String>("clicks-12p")
        .with_partitions(12);
    let orders = app.topic::<String, u64>("orders-3p").with_partitions(3);
    let out = app.topic::<String, u64>("out-2p").with_partitions(2);
    let limits = app.table::<String, u64>("limits", 0);
    app.agent(&clicks).for_each(|_ctx, _e| async { Ok(()) });
    app.agent(&orders)
        .join_table(&limits, |amount, limit| amount.min(limit))
        .sink(&out);
    let e = TestDriver::new(app).await.unwrap_err().to_string();
    assert!(
        e.contains("the tables' partition count, 12 (of \"clicks-12p\"")
            && e.contains("\"orders-3p\" would be created with 3")
            && e.contains("nothing was created"),
        "{e}"
    );
    assert!(!e.contains("out-2p"), "an output topic was checked: {e}");

    let mut app = strom::App::new("handler-counts")
        .with_partitions(4)
        .with_error_policy(strom::ErrorPolicy::Stop);
    let clicks = app
        .topic::<String, String>("clicks-12p")
        .with_partitions(12);
    let orders = app.topic::<String, u64>("orders-3p").with_partitions(3);
    let spent = app.table::<String, u64>("spent", 0);
    app.agent(&clicks).for_each(|_ctx, _e| async { Ok(()) });
    app.agent(&orders).for_each(move |ctx, order| {
        let spent = spent.clone();
        async move {
            ctx.update(&spent, &order.key, |s| s + order.value).await?;
            Ok(())
        }
    });
    let mut driver = TestDriver::new(app).await.unwrap();
    // Some of these keys belong to another of the tables' 12 partitions
    // than the order's partition of 3.
    let mut failed = None;
    for i in 0..12 {
        if let Err(e) = driver.send(&orders, &format!("c{i}"), &1).await {
            failed = Some(e.to_string());
            break;
        }
    }
    let e = failed.expect("no order met the tables' other partition count");
    assert!(e.contains("Tables have 12 partitions"), "{e}");
}
