//! The user API end to end on the broker: the word count pipeline of the
//! example run by two app instances (workers) in one group, a damaged table
//! file, a full disk. Operators are tested without a broker, on the test
//! driver (streams/tests/operators.rs).

use std::collections::BTreeMap;
use std::time::Duration;

use strom::{App, ProcessingGuarantee, StoreKind};
use strom_client::consumer::{Consumer, ConsumerConfig, IsolationLevel, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_it::{unique_topic, TestBroker};

/// The word count app of `streams/examples/wordcount.rs`, with test names.
fn wordcount(id: &str, broker: &TestBroker, input: &str, output: &str) -> App {
    let app = App::new(id)
        .with_brokers([broker.bootstrap.clone()])
        .with_static_membership(broker.static_membership())
        .with_state_dir(std::env::temp_dir().join(unique_topic("wc-state")))
        .with_store(StoreKind::Redb)
        .with_partitions(4)
        .with_commit_interval(Duration::from_millis(200))
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
    strom_it::wordcount(app, input, output)
}

/// Two workers count the words of 100,000 sentences (with undecodable lines
/// mixed in, which are skipped): the last count sent per word and the table
/// (as its changelog holds it) equal the truth.
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
        workers.push(strom_it::spawn_app(wordcount(
            &id, &broker, &input, &output,
        )));
    }
    strom_it::wait_for_topic(&client, &input).await;

    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..100_000u64 {
        let line = format!("The w{} W{} and w{}", i % 17, i % 101, (i * 7) % 53);
        for w in line.split_whitespace() {
            *truth.entry(w.to_lowercase()).or_default() += 1;
        }
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
        if i % 10_000 == 0 {
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
    let table = strom_it::last_counts(&client, &format!("{id}-word-counts-changelog")).await;
    assert_eq!(
        table.into_iter().collect::<BTreeMap<_, _>>(),
        truth,
        "the table differs from the true counts"
    );
}

/// Every count written to `topic` per word, in offset order.
async fn all_counts(client: &strom_client::Client, topic: &str) -> BTreeMap<String, Vec<u64>> {
    all_counts_read(client, topic, IsolationLevel::ReadUncommitted).await
}

/// Every count of every word in `topic`, in order, as read with `isolation`.
async fn all_counts_read(
    client: &strom_client::Client,
    topic: &str,
    isolation: IsolationLevel,
) -> BTreeMap<String, Vec<u64>> {
    let partitions = client.topic_metadata(topic).await.unwrap().partitions.len() as i32;
    let mut consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            isolation,
            ..ConsumerConfig::default()
        },
    );
    consumer
        .assign((0..partitions).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))
        .unwrap();
    let mut all: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    while let Ok(batch) = tokio::time::timeout(Duration::from_secs(2), consumer.poll()).await {
        for r in batch.unwrap() {
            let word = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            all.entry(word)
                .or_default()
                .push(serde_json::from_slice(r.value.as_deref().unwrap_or_default()).unwrap());
        }
    }
    all
}

/// Sends `lines` lines of the damage test's vocabulary, adding to `truth`.
async fn send_lines(
    producer: &Producer,
    input: &str,
    from: u64,
    lines: u64,
    truth: &mut BTreeMap<String, u64>,
) {
    for i in from..from + lines {
        let line = format!("alpha{} beta{}", i % 17, i % 31);
        for w in line.split_whitespace() {
            *truth.entry(w.to_owned()).or_default() += 1;
        }
        producer
            .send(ProducerRecord::to(input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
}

async fn wait_for_truth(
    client: &strom_client::Client,
    output: &str,
    truth: &BTreeMap<String, u64>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let last = strom_it::last_counts(client, output).await;
        if truth.iter().all(|(w, n)| last.get(w) == Some(n)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts never reached the truth"
        );
    }
}

/// A table file damaged while the worker is stopped (one key's bytes changed
/// in place, so every page still parses) is found at the next start, moved
/// aside and rebuilt from the changelog: the counts go on exactly, and the
/// changelog never receives a lowered or phantom count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_file_is_rebuilt_and_counts_stay_exact() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("damage"),
        unique_topic("damage-in"),
        unique_topic("damage-out"),
    );
    let state_dir = std::env::temp_dir().join(unique_topic("damage-state"));
    let app = || {
        let app = App::new(&id)
            .with_brokers([broker.bootstrap.clone()])
            .with_static_membership(broker.static_membership())
            .with_state_dir(&state_dir)
            .with_store(StoreKind::Redb)
            .with_partitions(2)
            .with_commit_interval(Duration::from_millis(200))
            .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
        strom_it::wordcount(app, &input, &output)
    };
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let mut truth = BTreeMap::new();

    let (stop, task) = strom_it::spawn_app(app());
    strom_it::wait_for_topic(&client, &input).await;
    send_lines(&producer, &input, 0, 5_000, &mut truth).await;
    wait_for_truth(&client, &output, &truth).await;
    let _ = stop.send(());
    task.await.unwrap();

    // Change the key "alpha13" to "alphb13" in whichever store holds it.
    let mut damaged = 0;
    for entry in std::fs::read_dir(state_dir.join("word-counts")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "redb") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        // redb copies pages on write: older copies of the key may sit in
        // free pages, so change every copy; one of them is live.
        let copies: Vec<usize> = (0..bytes.len().saturating_sub(6))
            .filter(|&at| &bytes[at..at + 7] == b"alpha13")
            .collect();
        if !copies.is_empty() {
            for at in copies {
                bytes[at + 4] = b'b';
            }
            std::fs::write(&path, &bytes).unwrap();
            damaged += 1;
        }
    }
    assert_eq!(
        damaged, 1,
        "the key was not found in exactly one store file"
    );

    let (stop, task) = strom_it::spawn_app(app());
    send_lines(&producer, &input, 5_000, 5_000, &mut truth).await;
    wait_for_truth(&client, &output, &truth).await;
    let _ = stop.send(());
    task.await.unwrap();

    let aside = std::fs::read_dir(state_dir.join("word-counts"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        })
        .count();
    assert_eq!(aside, 1, "the damaged store was not moved aside");
    let changelog = all_counts(&client, &format!("{id}-word-counts-changelog")).await;
    assert!(
        !changelog.contains_key("alphb13"),
        "a phantom key reached the changelog"
    );
    for (word, counts) in &changelog {
        assert!(
            counts.windows(2).all(|w| w[1] > w[0]),
            "{word}: the changelog went back: {counts:?}"
        );
        assert_eq!(counts.last(), truth.get(word), "{word}");
    }
    assert_eq!(changelog.len(), truth.len());
    std::fs::remove_dir_all(&state_dir).ok();
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// A tmpfs of `size` (as mount takes it, e.g. `1m`) at a fresh
    /// directory; `None` where mounting is not allowed (it needs root).
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = std::env::temp_dir().join(unique_topic("tmpfs"));
        std::fs::create_dir_all(&dir).ok()?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then_some(Tmpfs(dir))
    }

    /// Changes the size of the mounted tmpfs, keeping its files.
    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "cannot resize the tmpfs at {}",
            self.0.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The state directory on a 1 MiB tmpfs that the table outgrows: the worker
/// stops with an error that says the disk is full; once the tmpfs is bigger,
/// a restart counts every word exactly (exactly-once: nothing past what the
/// stopped worker stored and committed counts twice or goes missing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stops_the_worker_and_a_restart_counts_exactly() {
    let Some(disk) = Tmpfs::mount("1m") else {
        println!("a_full_disk…: NOT checked (cannot mount a tmpfs here; it needs root)");
        return;
    };
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, input, output) = (
        unique_topic("full"),
        unique_topic("full-in"),
        unique_topic("full-out"),
    );
    let app = || {
        let app = App::new(&id)
            .with_brokers([broker.bootstrap.clone()])
            .with_static_membership(broker.static_membership())
            .with_state_dir(&disk.0)
            .with_store(StoreKind::Redb)
            .with_partitions(2)
            .with_processing_guarantee(ProcessingGuarantee::ExactlyOnce)
            .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
        strom_it::wordcount(app, &input, &output)
    };
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    // 60,000 distinct words, each counted twice: far more than 1 MiB of table.
    let lines: Vec<String> = (0..2)
        .flat_map(|_| (0..15_000).map(|i| format!("w{i}a w{i}b w{i}c w{i}d")))
        .collect();
    let mut truth: BTreeMap<String, u64> = BTreeMap::new();
    for line in &lines {
        for w in line.split_whitespace() {
            *truth.entry(w.to_owned()).or_default() += 1;
        }
    }

    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first = tokio::spawn(app().run(async {
        let _ = stopped.await;
    }));
    strom_it::wait_for_topic(&client, &input).await;
    for line in &lines {
        producer
            .send(ProducerRecord::to(&input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let result = tokio::time::timeout(Duration::from_secs(180), first)
        .await
        .expect("the worker still runs on a full disk after 180 s")
        .unwrap();
    let err = result.expect_err("the worker stopped cleanly on a full disk");
    println!("the worker stopped: {err}");
    assert!(
        err.to_string().contains("No space left") || err.to_string().contains("os error 28"),
        "the error does not say the disk is full: {err}"
    );

    disk.resize("256m");
    let (stop, task) = strom_it::spawn_app(app());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
    loop {
        let counts = all_counts_read(&client, &output, IsolationLevel::ReadCommitted).await;
        if truth
            .iter()
            .all(|(w, n)| counts.get(w).and_then(|c| c.last()) == Some(n))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted worker never reached the true counts"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let _ = stop.send(());
    task.await.unwrap();
    let changelog = all_counts_read(
        &client,
        &format!("{id}-word-counts-changelog"),
        IsolationLevel::ReadCommitted,
    )
    .await;
    assert_eq!(changelog.len(), truth.len());
    for (word, counts) in &changelog {
        assert_eq!(counts, &[1, 2], "{word}: committed counts");
    }
}

#[path = "../../streams/examples/enrich.rs"]
#[allow(dead_code)]
mod enrich;

/// A profile of customer `i`, version `v`.
fn customer(i: usize, v: u32) -> enrich::Profile {
    enrich::Profile {
        name: format!("c{i} v{v}"),
        country: ["DE", "IN", "BR"][i % 3].into(),
    }
}

/// A worker of the enrich example over 3 partitions of customers and 12 of
/// orders (page views), with its web server on `port`, keeping its state in
/// `state` (a fresh directory for `None`).
fn enrich_worker(
    id: &str,
    prefix: &str,
    broker: &TestBroker,
    port: u16,
    state: Option<&std::path::Path>,
) -> App {
    let state = state.map_or_else(
        || std::env::temp_dir().join(unique_topic("global-state")),
        std::path::Path::to_path_buf,
    );
    let app = App::new(id)
        .with_brokers([broker.bootstrap.clone()])
        .with_static_membership(broker.static_membership())
        .with_state_dir(state)
        .with_store(StoreKind::Redb)
        .with_commit_interval(Duration::from_millis(200))
        .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1))
        .with_web(Some(([127, 0, 0, 1], port).into()));
    let e = enrich::enrich(app, prefix);
    let _ = e.users.clone().with_partitions(3);
    let _ = e.views.clone().with_partitions(12);
    e.app
}

/// Sends `n` orders (views) of customers `0..customers`, from order `from`.
async fn send_orders(producer: &Producer, topic: &str, from: usize, n: usize, customers: usize) {
    for i in from..from + n {
        let key = format!("c{}", i % customers);
        let value = serde_json::to_vec(&enrich::PageView {
            url: format!("/order/{i}"),
        })
        .unwrap();
        let record = ProducerRecord::to(topic).key(key.as_bytes()).value(&value);
        producer.send(record).await.unwrap();
    }
    producer.flush().await.unwrap();
}

/// The enriched orders of `topic` from order `from` on, by order number:
/// (customer, name).
async fn enriched_orders(
    client: &strom_client::Client,
    topic: &str,
    from: usize,
    n: usize,
) -> BTreeMap<usize, (String, String)> {
    let partitions = client.topic_metadata(topic).await.unwrap().partitions.len() as i32;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign((0..partitions).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut got = BTreeMap::new();
    while got.len() < n {
        let batch = tokio::time::timeout_at(deadline, consumer.poll())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} enriched orders after 120 s", got.len()))
            .unwrap();
        for r in batch {
            let view: enrich::EnrichedView =
                serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            let order: usize = view.url.trim_start_matches("/order/").parse().unwrap();
            if order >= from {
                let old = got.insert(order, (view.user, view.name));
                assert!(old.is_none(), "order {order} enriched twice");
            }
        }
    }
    got
}

/// Waits until `url` answers 200 with a body containing `text`; every
/// answer before is a 503 (not ready, or restoring) or, when `stale` is
/// given, a 200 containing it.
async fn wait_for_answer(url: &str, text: &str, stale: Option<&str>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(r) = strom_it::http_get(url).await {
            match r.status {
                200 if r.body.contains(text) => return,
                200 if stale.is_some_and(|s| r.body.contains(s)) => {}
                503 => {}
                _ => panic!("{url}: unexpected answer {} {}", r.status, r.body),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url}: no 200 with {text:?} within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GlobalTable: three workers enrich a 12-partition orders stream from a
/// 3-partition customers topic. Every output equals the expectation; an
/// update of every customer, once each worker has read it (its web answers
/// it), is in every later order, on every worker; a fourth worker answers
/// lookups only once restored (503 before, never a wrong value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_enrich_orders_from_a_global_table() {
    const CUSTOMERS: usize = 60;
    const ORDERS: usize = 1_200;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let (id, prefix) = (unique_topic("global"), unique_topic("global-"));
    let (users, views, enriched) = (
        format!("{prefix}users"),
        format!("{prefix}page-views"),
        format!("{prefix}enriched-views"),
    );
    client
        .ensure_topic(strom_client::NewTopic::new(&users, 3, 1))
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let put_customers = |v: u32| {
        let (producer, users) = (producer.clone(), users.clone());
        async move {
            for i in 0..CUSTOMERS {
                let value = serde_json::to_vec(&customer(i, v)).unwrap();
                let key = format!("c{i}");
                let record = ProducerRecord::to(&users).key(key.as_bytes()).value(&value);
                producer.send(record).await.unwrap();
            }
            producer.flush().await.unwrap();
        }
    };
    put_customers(1).await;

    let ports: Vec<u16> = (0..4).map(|_| strom_it::free_port()).collect();
    let workers: Vec<_> = ports[..3]
        .iter()
        .map(|&port| strom_it::spawn_app(enrich_worker(&id, &prefix, &broker, port, None)))
        .collect();
    for port in &ports[..3] {
        wait_for_answer(&format!("http://127.0.0.1:{port}/ready"), "true", None).await;
    }
    // Orders of 66 customers: the last 6 have no profile.
    send_orders(&producer, &views, 0, ORDERS, CUSTOMERS + 6).await;
    let first = enriched_orders(&client, &enriched, 0, ORDERS).await;
    for (order, (user, name)) in &first {
        let i = order % (CUSTOMERS + 6);
        assert_eq!(user, &format!("c{i}"));
        let expected = if i < CUSTOMERS {
            customer(i, 1).name
        } else {
            String::new()
        };
        assert_eq!(name, &expected, "order {order}");
    }

    // Every customer updated; each worker answers the update once read.
    put_customers(2).await;
    for port in &ports[..3] {
        for i in 0..CUSTOMERS {
            let url = format!("http://127.0.0.1:{port}/tables/profiles/c{i}");
            wait_for_answer(&url, &customer(i, 2).name, Some(&customer(i, 1).name)).await;
        }
    }
    send_orders(&producer, &views, ORDERS, ORDERS, CUSTOMERS).await;
    let second = enriched_orders(&client, &enriched, ORDERS, ORDERS).await;
    for (order, (_, name)) in &second {
        assert_eq!(name, &customer(order % CUSTOMERS, 2).name, "order {order}");
    }

    // A fourth worker: 503 until restored, then the latest profile, never
    // an older one or a 404.
    let state = std::env::temp_dir().join(unique_topic("global-fourth"));
    let fourth = enrich_worker(&id, &prefix, &broker, ports[3], Some(&state));
    let fourth = strom_it::spawn_app(fourth);
    let url = format!("http://127.0.0.1:{}/tables/profiles/c7", ports[3]);
    wait_for_answer(&url, &customer(7, 2).name, None).await;
    let replayed = |metrics: &str| {
        let samples = strom_it::parse_metrics(metrics);
        (samples.iter())
            .filter(|(name, labels, _)| {
                name == "strom_recovery_replayed"
                    && labels.get("table").map(String::as_str) == Some("profiles")
            })
            .map(|(_, _, v)| *v)
            .sum::<f64>()
    };
    let metrics_url = format!("http://127.0.0.1:{}/metrics", ports[3]);
    let metrics = strom_it::http_get(&metrics_url).await.unwrap().body;
    assert_eq!(replayed(&metrics), (2 * CUSTOMERS) as f64, "{metrics}");

    // Restarted on its files, it replays nothing: every partition's offset
    // was stored with the data.
    let (stop, task) = fourth;
    let _ = stop.send(());
    task.await.unwrap();
    let again = strom_it::spawn_app(enrich_worker(&id, &prefix, &broker, ports[3], Some(&state)));
    wait_for_answer(&url, &customer(7, 2).name, None).await;
    let metrics = strom_it::http_get(&metrics_url).await.unwrap().body;
    assert_eq!(replayed(&metrics), 0.0, "{metrics}");

    for (stop, task) in workers.into_iter().chain([again]) {
        let _ = stop.send(());
        task.await.unwrap();
    }
}

/// A windowed left join of orders with payments by two workers with redb
/// stores, on 4 partitions, from records with their own timestamps, placed
/// by another partitioner than murmur2 (the same for both topics, as
/// librdkafka's default CRC32 one would be): every
/// paid order gives its pair and every unpaid one, once its window closes,
/// one result without a pair (duplicates of a result are allowed, as
/// at-least-once may repeat one across a rebalance; no other result is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_join_orders_with_payments_in_windows() {
    use std::collections::BTreeSet;
    use strom::JoinWindows;
    const ORDERS: u64 = 1_500;
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let id = unique_topic("window-join");
    let (orders, payments, out) = (
        unique_topic("orders"),
        unique_topic("payments"),
        unique_topic("order-payments"),
    );
    let app = |state: std::path::PathBuf| {
        let mut app = App::new(&id)
            .with_brokers([broker.bootstrap.clone()])
            .with_static_membership(broker.static_membership())
            .with_state_dir(state)
            .with_store(StoreKind::Redb)
            .with_partitions(4)
            .with_commit_interval(Duration::from_millis(200))
            .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
        let o = app.topic::<String, u64>(&orders);
        let p = app.topic::<String, u64>(&payments);
        let results = app.topic::<String, (u64, Option<u64>)>(&out);
        let windows = JoinWindows::of(Duration::from_secs(10));
        app.agent(&o)
            .left_join_stream(&p, "paid", windows, |o, p| (*o, p.copied()))
            .sink(&results);
        app
    };
    let workers: Vec<_> = (0..2)
        .map(|_| strom_it::spawn_app(app(std::env::temp_dir().join(unique_topic("join-state")))))
        .collect();
    strom_it::wait_for_topic(&client, &orders).await;
    strom_it::wait_for_topic(&client, &payments).await;

    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    let base = 1_700_000_000_000i64;
    let mut want = BTreeSet::new();
    // Not murmur2: a key's partition by the sum of its bytes.
    let partition = |key: &str| (key.bytes().map(u32::from).sum::<u32>() % 4) as i32;
    for i in 0..ORDERS {
        let (key, t) = (format!("o{i}"), base + i as i64 * 100);
        // JSON keys and values, as the app's topics' codecs write them.
        let (json_key, value) = (format!("\"{key}\""), i.to_string());
        let record = ProducerRecord::to(&orders)
            .partition(partition(&key))
            .key(json_key.as_bytes())
            .value(value.as_bytes())
            .timestamp(t);
        producer.send(record).await.unwrap();
        // Two of three orders are paid 3 s later.
        if i % 3 != 0 {
            let paid = (10_000 + i).to_string();
            let record = ProducerRecord::to(&payments)
                .partition(partition(&key))
                .key(json_key.as_bytes())
                .value(paid.as_bytes())
                .timestamp(t + 3_000);
            producer.send(record).await.unwrap();
            want.insert((key, (i, Some(10_000 + i))));
        } else {
            want.insert((key, (i, None)));
        }
    }
    // Far later payments of other keys close every window in every partition.
    for k in 0..40 {
        let key = format!("\"late-{k}\"");
        let record = ProducerRecord::to(&payments)
            .partition(k % 4)
            .key(key.as_bytes())
            .value(b"0")
            .timestamp(base + 3_600_000);
        producer.send(record).await.unwrap();
    }
    producer.flush().await.unwrap();

    let partitions = client.topic_metadata(&out).await.unwrap().partitions.len() as i32;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign((0..partitions).map(|p| (TopicPartition::new(&out, p), Offset::Earliest)))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let (mut got, mut records) = (BTreeSet::new(), 0usize);
    while got.len() < want.len() {
        let batch = tokio::time::timeout_at(deadline, consumer.poll())
            .await
            .unwrap_or_else(|_| panic!("{} of {} results after 120 s", got.len(), want.len()))
            .unwrap();
        for r in batch {
            let key: String = serde_json::from_slice(r.key.as_deref().unwrap()).unwrap();
            let value: (u64, Option<u64>) =
                serde_json::from_slice(r.value.as_deref().unwrap()).unwrap();
            assert!(
                want.contains(&(key.clone(), value)),
                "unexpected result {key} {value:?}"
            );
            got.insert((key, value));
            records += 1;
        }
    }
    assert_eq!(got, want);
    println!(
        "{} results, {} records ({} repeated)",
        want.len(),
        records,
        records - want.len()
    );
    for (stop, task) in workers {
        let _ = stop.send(());
        task.await.unwrap();
    }
}
