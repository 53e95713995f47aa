//! `strom-bench`: end-to-end throughput of strom-client against any broker.
//!
//! ```text
//! strom-bench produce --brokers 127.0.0.1:9092 --topic t --messages 1000000 --size 100 --compression lz4
//! strom-bench consume --brokers 127.0.0.1:9092 --topic t --messages 1000000
//! strom-bench group-consume --brokers 127.0.0.1:9092 --topic t --messages 1000000 --members 3
//! strom-bench delay-proxy --listen 127.0.0.1:19092 --upstream 127.0.0.1:9092 --delay-ms 10
//! ```
//!
//! Each command prints one JSON line. `consume` checks every value against its key
//! and exits non-zero if a record is missing, duplicated or corrupt.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use std::sync::Arc;

use strom_client::consumer::{
    AutoOffsetReset, Consumer, ConsumerConfig, ConsumerRecord, Offset, TopicPartition,
};
use strom_client::group::{GroupConfig, GroupConsumer, NoopListener};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Acks, Client, ClientConfig, Error, NewTopic};
use tokio::sync::mpsc;

#[derive(Parser)]
#[command(about = "Throughput benchmarks of strom-client against a Kafka broker")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where to read or write, and how many records.
#[derive(clap::Args)]
struct Target {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    #[arg(long, env = "STROM_BROKERS")]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    messages: u64,
}

/// Arguments of the state benchmarks.
#[derive(clap::Args)]
struct StateArgs {
    /// Bootstrap brokers (for the changelog).
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    messages: u64,
    /// Where the store files go; a fresh temporary directory by default.
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// The worker's memory budget in MiB (`pipeline`, `soak` and `join`;
    /// the worker's default, 256, if not given).
    #[arg(long)]
    memory_budget_mib: Option<usize>,
}

impl StateArgs {
    /// `app` under the memory budget asked for, if any.
    fn budget(&self, app: strom::App) -> strom::App {
        match self.memory_budget_mib {
            Some(mib) => app.with_memory_budget(mib << 20),
            None => app,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Produce N records with keys `key-{i}` and values `{i}:xxx…` of B bytes.
    Produce {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 100)]
        size: usize,
        /// none, gzip, snappy, lz4 or zstd.
        #[arg(long, env = "STROM_COMPRESSION_TYPE", default_value = "none")]
        compression: String,
        /// Partitions of the topic when it has to be created.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        #[arg(long, default_value_t = 5)]
        linger_ms: u64,
        #[arg(long, default_value = "all")]
        acks: String,
        /// Idempotent producer (producer id and sequences).
        #[arg(long)]
        idempotent: bool,
        /// Transactional producer: commits every `--txn-records` records.
        #[arg(long)]
        transactional: bool,
        /// Records per transaction with `--transactional`.
        #[arg(long, default_value_t = 10_000)]
        txn_records: u64,
        /// Records without keys, as `rdkafka_performance -P` sends them
        /// (spread by the sticky partitioner).
        #[arg(long)]
        no_keys: bool,
    },
    /// M group consumers in one process read the topic from the group's
    /// committed offsets (earliest for a new group) until N records arrived.
    GroupConsume {
        #[command(flatten)]
        target: Target,
        /// Members of the group.
        #[arg(long, default_value_t = 3)]
        members: usize,
        /// Group id; a fresh one per run by default.
        #[arg(long)]
        group: Option<String>,
        #[arg(long, default_value_t = 6000)]
        session_timeout_ms: u64,
        #[arg(long, default_value_t = 1000)]
        heartbeat_ms: u64,
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        #[arg(long, default_value_t = 1000)]
        quiet_ms: u64,
    },
    /// N writes of 100-byte values through a table with its changelog,
    /// flushing every 10,000.
    StateWrite {
        #[command(flatten)]
        state: StateArgs,
    },
    /// N random point reads from a warm store of N keys, on every core;
    /// then, on one tokio task as a partition task reads, N reads inline and
    /// N through `spawn_blocking` (is a read cheap enough to stay on the
    /// runtime thread?).
    StateRead {
        #[command(flatten)]
        state: StateArgs,
    },
    /// Writes a store of `--megabytes` of 1 KiB values (no Kafka), closes
    /// it, and times opening it again: the integrity check at open reads
    /// every page.
    StateOpen {
        #[arg(long, default_value_t = 1024)]
        megabytes: u64,
        /// Where the store file goes; a fresh temporary directory by default.
        #[arg(long)]
        state_dir: Option<std::path::PathBuf>,
    },
    /// Recovers N changelog records into an empty store.
    StateRecover {
        #[command(flatten)]
        state: StateArgs,
    },
    /// N single-word records (1,000-word vocabulary) through the wordcount
    /// pipeline (split, group_by, count in a table, send counts) with one
    /// worker in this process.
    Pipeline {
        #[command(flatten)]
        state: StateArgs,
        /// `at-least-once` or `exactly-once` (commits every 100 ms in one
        /// transaction).
        #[arg(long, default_value = "at-least-once")]
        guarantee: strom::ProcessingGuarantee,
        /// Feed the words while the worker runs (instead of all before it
        /// starts) and sample the process's resident memory every half
        /// second: a soak run, to see whether memory stays flat.
        #[arg(long)]
        soak: bool,
    },
    /// N page views enriched from a global table of 100,000 profiles (a
    /// stream–GlobalTable left join) by one worker in this process; and the
    /// time to restore that table from its topic.
    Join {
        #[command(flatten)]
        state: StateArgs,
    },
    /// A memory soak: N single-word records over a vocabulary of K words
    /// fed while the wordcount pipeline (as `pipeline`) runs, the process's
    /// resident memory printed to stderr every few seconds and summed up by
    /// quarter of the run at the end. Memory should level off with N, and
    /// grow only with K (the table).
    Soak {
        #[command(flatten)]
        state: StateArgs,
        /// Distinct words (keys of the table).
        #[arg(long, default_value_t = 1000)]
        keys: u64,
        /// `at-least-once` or `exactly-once`.
        #[arg(long, default_value = "at-least-once")]
        guarantee: strom::ProcessingGuarantee,
    },
    /// Per-key counts in one-minute tumbling windows, results on close: N
    /// events over 1,000 keys with event times spread over 30 minutes (plus
    /// one closing event per key) through one worker in this process.
    Windowed {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        messages: u64,
        /// A topic `windowed-feed` filled (with these messages), instead of
        /// a fresh one filled first.
        #[arg(long, requires = "base_ms")]
        topic: Option<String>,
        /// The base time `windowed-feed` printed for `--topic`.
        #[arg(long)]
        base_ms: Option<i64>,
        #[arg(long, default_value = "at-least-once")]
        guarantee: strom::ProcessingGuarantee,
        /// Keep windows this many minutes after their end (default: an
        /// hour, longer than the workload); the output then also gives the
        /// store files' size by quarter of the run, which must stop growing
        /// once windows expire.
        #[arg(long)]
        expires_minutes: Option<u64>,
    },
    /// Fills a topic with the `windowed` workload (for `windowed --topic`
    /// and `benches/quix_windowed.py`); prints its base time.
    WindowedFeed {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        messages: u64,
        #[arg(long)]
        topic: String,
    },
    /// Sends each line of standard input as one record value (no key), once the
    /// topic exists (waits up to 60 s for an app to create it).
    SendLines {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
    },
    /// Reads word counts (key: UTF-8 word, value: JSON number) until the last
    /// counts add up to `--expect-total` (or 120 s pass), then prints the top N.
    TopCounts {
        #[arg(long)]
        brokers: String,
        #[arg(long)]
        topic: String,
        #[arg(long)]
        expect_total: u64,
        #[arg(long, default_value_t = 10)]
        top: usize,
    },
    /// A TCP proxy that delays every chunk by D ms each way (a network with
    /// latency and no bandwidth limit, where there is no netem). Start the
    /// broker advertising the proxy's address so every connection of every
    /// client goes through it. Runs until killed.
    DelayProxy {
        /// `host:port` to listen on.
        #[arg(long)]
        listen: String,
        /// `host:port` of the broker.
        #[arg(long)]
        upstream: String,
        /// Delay added in each direction.
        #[arg(long)]
        delay_ms: u64,
    },
    /// Read every partition from the earliest offset until N records arrived.
    Consume {
        #[command(flatten)]
        target: Target,
        /// Give up waiting for missing records after this many seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
        /// After N records arrived, keep reading this long so duplicates show.
        #[arg(long, default_value_t = 1000)]
        quiet_ms: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strom-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Produce {
                target,
                size,
                compression,
                partitions,
                linger_ms,
                acks,
                idempotent,
                transactional,
                txn_records,
                no_keys,
            } => {
                let config = ProducerConfig {
                    acks: acks.parse()?,
                    compression: compression.parse()?,
                    linger: Duration::from_millis(linger_ms),
                    idempotence: idempotent || transactional,
                    transactional_id: transactional
                        .then(|| format!("strom-bench-{}", std::process::id())),
                    ..ProducerConfig::default()
                };
                let per_txn = transactional.then_some(txn_records.max(1));
                produce(&target, size, partitions, config, per_txn, !no_keys).await
            }
            Command::GroupConsume {
                target,
                members,
                group,
                session_timeout_ms,
                heartbeat_ms,
                timeout_secs,
                quiet_ms,
            } => {
                let id = group.unwrap_or_else(|| format!("strom-bench-{}", std::process::id()));
                let mut config = GroupConfig::new(id);
                config.session_timeout = Duration::from_millis(session_timeout_ms);
                config.heartbeat_interval = Duration::from_millis(heartbeat_ms);
                config.rebalance_timeout = config.session_timeout * 2;
                config.consumer.auto_offset_reset = AutoOffsetReset::Earliest;
                group_consume(
                    &target,
                    members,
                    config,
                    Duration::from_secs(timeout_secs),
                    Duration::from_millis(quiet_ms),
                )
                .await
            }
            Command::Pipeline {
                state,
                guarantee,
                soak,
            } => pipeline::run(&state, guarantee, soak, 1000).await,
            Command::Join { state } => join::run(&state).await,
            Command::Soak {
                state,
                keys,
                guarantee,
            } => pipeline::run(&state, guarantee, true, keys.max(1)).await,
            Command::Windowed {
                brokers,
                messages,
                topic,
                base_ms,
                guarantee,
                expires_minutes,
            } => {
                let fed = topic.zip(base_ms);
                let expires = expires_minutes.map(|m| Duration::from_secs(m * 60));
                windowed::run(&brokers, messages, fed, guarantee, expires).await
            }
            Command::WindowedFeed {
                brokers,
                messages,
                topic,
            } => windowed::feed_only(&brokers, &topic, messages).await,
            Command::SendLines { brokers, topic } => demo::send_lines(&brokers, &topic).await,
            Command::TopCounts {
                brokers,
                topic,
                expect_total,
                top,
            } => demo::top_counts(&brokers, &topic, expect_total, top).await,
            Command::DelayProxy {
                listen,
                upstream,
                delay_ms,
            } => delay_proxy::run(&listen, &upstream, Duration::from_millis(delay_ms)).await,
            Command::StateWrite { state } => state_bench::write(&state).await,
            Command::StateRead { state } => state_bench::read(&state).await,
            Command::StateRecover { state } => state_bench::recover(&state).await,
            Command::StateOpen {
                megabytes,
                state_dir,
            } => state_bench::open(megabytes, state_dir),
            Command::Consume {
                target,
                timeout_secs,
                quiet_ms,
            } => {
                consume(
                    &target,
                    Duration::from_secs(timeout_secs),
                    Duration::from_millis(quiet_ms),
                )
                .await
            }
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("strom-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The client settings: `brokers`, then every `STROM_<SETTING>` of the
/// environment (security, TLS, SASL).
fn client_config(brokers: &str) -> Result<ClientConfig, strom_client::Error> {
    let mut config = ClientConfig::new(brokers.split(',').map(str::trim));
    config.apply_env()?;
    Ok(config)
}

/// The value of record `i`: `{i}:` padded with `x` to `size` bytes.
fn fill_value(buf: &mut Vec<u8>, i: u64, size: usize) {
    buf.clear();
    let _ = write!(buf, "{i}:");
    if buf.len() < size {
        buf.resize(size, b'x');
    }
}

fn print(line: serde_json::Value) {
    println!("{line}");
}

/// Samples `(events processed, MB)` by quarter of `n` events processed, the
/// largest in each: flat means the last quarters are no higher.
fn by_quarter(samples: &[(u64, f64)], n: u64) -> Vec<f64> {
    (0..4)
        .map(|q| {
            samples
                .iter()
                .filter(|(at, _)| (*at * 4 / n.max(1)).min(3) == q)
                .map(|(_, mb)| *mb)
                .fold(f64::NAN, f64::max)
        })
        .collect()
}

async fn produce(
    target: &Target,
    size: usize,
    partitions: i32,
    config: ProducerConfig,
    per_txn: Option<u64>,
    keys: bool,
) -> Result<bool, Error> {
    let (topic, messages) = (target.topic.as_str(), target.messages);
    let client = Client::connect(client_config(&target.brokers)?).await?;
    match client
        .create_topic(NewTopic::new(topic, partitions, 1))
        .await
    {
        Ok(()) | Err(Error::TopicAlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    let acks = config.acks;
    let mode = match (per_txn, config.idempotence) {
        (Some(_), _) => "transactional",
        (None, true) => "idempotent",
        (None, false) => "plain",
    };
    let producer = Producer::new(client, config)?;
    if per_txn.is_some() {
        producer.init_transactions().await?;
        producer.begin_transaction()?;
    }
    let mut deliveries = Vec::with_capacity(messages as usize);
    let mut key = Vec::with_capacity(32);
    let mut value = Vec::with_capacity(size + 24);
    let mut bytes = 0u64;
    let started = Instant::now();
    for i in 0..messages {
        key.clear();
        let _ = write!(key, "key-{i}");
        fill_value(&mut value, i, size);
        bytes += value.len() as u64;
        let mut record = ProducerRecord::to(topic).value(&value);
        if keys {
            record = record.key(&key);
        }
        let d = producer.send(record).await?;
        deliveries.push(d);
        if per_txn.is_some_and(|k| (i + 1) % k == 0) {
            producer.commit_transaction().await?;
            if i + 1 < messages {
                producer.begin_transaction()?;
            }
        }
    }
    if per_txn.is_some_and(|k| messages % k != 0) {
        producer.commit_transaction().await?;
    }
    producer.flush().await?;
    let seconds = started.elapsed().as_secs_f64();
    let mut failed = 0u64;
    let mut first_error = None;
    for d in &deliveries {
        match d.try_result() {
            Some(Ok(m)) if m.offset >= 0 || acks == Acks::None => {}
            Some(Ok(_)) | None => failed += 1,
            Some(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    print(json!({
        "op": "produce",
        "mode": mode,
        "messages": messages,
        "bytes": bytes,
        "seconds": seconds,
        "msgs_per_s": messages as f64 / seconds,
        "mb_per_s": bytes as f64 / seconds / 1e6,
        "failed": failed,
    }));
    if let Some(e) = first_error {
        eprintln!("strom-bench: {failed} records failed; first error: {e}");
    }
    Ok(failed == 0)
}

/// Counts and checks consumed records: each value must match its key, each
/// key must arrive once.
struct Tally {
    seen: Vec<bool>,
    received: u64,
    duplicates: u64,
    corrupt: u64,
    bytes: u64,
    distinct: u64,
    expected: Vec<u8>,
}

impl Tally {
    fn new(messages: u64) -> Self {
        Tally {
            seen: vec![false; messages as usize],
            received: 0,
            duplicates: 0,
            corrupt: 0,
            bytes: 0,
            distinct: 0,
            expected: Vec::with_capacity(256),
        }
    }

    fn add(&mut self, batch: &[ConsumerRecord]) {
        for r in batch {
            self.received += 1;
            let value = r.value.as_deref().unwrap_or_default();
            self.bytes += value.len() as u64;
            // The key says which record it is, or, for records produced
            // without keys, the value's `{i}:` prefix.
            let index = match r.key.as_deref() {
                Some(k) => k.strip_prefix(b"key-"),
                None => value.split(|&b| b == b':').next(),
            };
            let index = index
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.parse::<usize>().ok())
                .filter(|&i| i < self.seen.len());
            let Some(i) = index else {
                self.corrupt += 1;
                continue;
            };
            fill_value(&mut self.expected, i as u64, value.len());
            if value != self.expected.as_slice() {
                self.corrupt += 1;
            } else if self.seen[i] {
                self.duplicates += 1;
            } else {
                self.seen[i] = true;
                self.distinct += 1;
            }
        }
    }

    fn complete(&self) -> bool {
        self.distinct == self.seen.len() as u64
    }

    /// Takes batches until every record arrived (then `quiet` longer, so
    /// duplicates show) or `timeout` passed; returns when the last one arrived.
    async fn drain(
        &mut self,
        rx: &mut mpsc::Receiver<Result<Vec<ConsumerRecord>, Error>>,
        started: Instant,
        timeout: Duration,
        quiet: Duration,
    ) -> Result<Instant, Error> {
        let mut finished_at: Option<Instant> = None;
        loop {
            let wait = match finished_at {
                Some(t) => quiet.saturating_sub(t.elapsed()),
                None => timeout.saturating_sub(started.elapsed()),
            };
            if wait.is_zero() {
                break;
            }
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(batch)) => self.add(&batch?),
                Ok(None) | Err(_) => break,
            }
            if self.complete() && finished_at.is_none() {
                finished_at = Some(Instant::now());
            }
        }
        Ok(finished_at.unwrap_or_else(Instant::now))
    }

    /// The JSON line every consume-like command prints.
    fn report(&self, op: &str, seconds: f64) -> serde_json::Value {
        json!({
            "op": op,
            "messages": self.received,
            "missing": self.seen.len() as u64 - self.distinct,
            "duplicates": self.duplicates,
            "corrupt": self.corrupt,
            "seconds": seconds,
            "msgs_per_s": self.distinct as f64 / seconds,
            "mb_per_s": self.bytes as f64 / seconds / 1e6,
        })
    }

    fn ok(&self) -> bool {
        self.complete() && self.duplicates == 0 && self.corrupt == 0
    }
}

async fn consume(target: &Target, timeout: Duration, quiet: Duration) -> Result<bool, Error> {
    let topic = target.topic.as_str();
    let client = Client::connect(client_config(&target.brokers)?).await?;
    let meta = client.topic_metadata(topic).await?;
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign(
        meta.partitions
            .iter()
            .map(|p| (TopicPartition::new(topic, p.partition), Offset::Earliest)),
    )?;
    let (tx, mut rx) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let batch = consumer.poll().await;
            let failed = batch.is_err();
            if tx.send(batch).await.is_err() || failed {
                return;
            }
        }
    });
    let started = Instant::now();
    let mut tally = Tally::new(target.messages);
    let end = tally.drain(&mut rx, started, timeout, quiet).await;
    reader.abort();
    let seconds = end?.duration_since(started).as_secs_f64();
    print(tally.report("consume", seconds));
    Ok(tally.ok())
}

/// `members` group consumers in one process, each with its own client as
/// separate workers would have; reports also how long the group took to
/// assign every partition after the last member started.
async fn group_consume(
    target: &Target,
    members: usize,
    group: GroupConfig,
    timeout: Duration,
    quiet: Duration,
) -> Result<bool, Error> {
    let topic = target.topic.as_str();
    let partitions = Client::connect(client_config(&target.brokers)?)
        .await?
        .topic_metadata(topic)
        .await?
        .partitions
        .len();
    let (tx, mut rx) = mpsc::channel(64);
    let mut handles = Vec::with_capacity(members);
    let mut readers = Vec::with_capacity(members);
    let started = Instant::now();
    for _ in 0..members {
        let client = Client::connect(client_config(&target.brokers)?).await?;
        let mut member =
            GroupConsumer::new(client, group.clone(), &[topic], Arc::new(NoopListener))?;
        handles.push(member.group().clone());
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            loop {
                let batch = member.poll().await;
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    break;
                }
            }
            let _ = member.close().await;
        }));
    }
    drop(tx);
    let last_started = Instant::now();
    let watch = handles.clone();
    let assigned = tokio::spawn(async move {
        loop {
            let mut all = std::collections::BTreeSet::new();
            let mut disjoint = true;
            for h in &watch {
                for tp in h.assignment() {
                    disjoint &= all.insert(tp);
                }
            }
            if disjoint && all.len() == partitions {
                return last_started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let mut tally = Tally::new(target.messages);
    let end = tally.drain(&mut rx, started, timeout, quiet).await;
    for r in &readers {
        r.abort();
    }
    let assign_seconds = match tokio::time::timeout(Duration::ZERO, assigned).await {
        Ok(Ok(d)) => Some(d.as_secs_f64()),
        _ => None,
    };
    let seconds = end?.duration_since(started).as_secs_f64();
    let mut line = tally.report("group-consume", seconds);
    line["members"] = json!(members);
    line["assign_seconds"] = json!(assign_seconds);
    print(line);
    Ok(tally.ok() && assign_seconds.is_some())
}

/// The state benchmarks: `state-write`, `state-read`, `state-recover`.
mod state_bench {
    use std::sync::Arc;
    use std::time::Instant;

    use serde_json::json;
    use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
    use strom_client::{Client, Error};
    use strom_state::{changelog, Durability, LoggedStore, RedbStore, Store, WriteBatch};

    use super::{client_config, StateArgs};

    /// Key `i`: its big-endian bytes. Value `i`: `{i}:` padded with `x` to 100 bytes.
    fn value(i: u64) -> Vec<u8> {
        let mut v = format!("{i}:").into_bytes();
        v.resize(100, b'x');
        v
    }

    pub(super) fn peak_rss_mb() -> f64 {
        status_mb("VmHWM:")
    }

    /// A memory figure of this process (`VmHWM:`, `VmRSS:`, …) in MB; -1
    /// where /proc does not tell.
    pub(super) fn status_mb(field: &str) -> f64 {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(field))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map_or(-1.0, |kb| kb / 1024.0)
    }

    /// CPU seconds (user + system) this process has used so far, from
    /// /proc/self/stat in clock ticks of 1/100 s (Linux's `USER_HZ`); -1
    /// where /proc does not tell.
    pub(super) fn cpu_seconds() -> f64 {
        std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| {
                // The fields after the command name, which is in parentheses.
                let rest = &s[s.rfind(')')? + 1..];
                let fields: Vec<&str> = rest.split_whitespace().collect();
                let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok();
                // utime and stime are fields 14 and 15 of stat(5); `rest`
                // starts at field 3.
                Some((ticks(11)? + ticks(12)?) / 100.0)
            })
            .unwrap_or(-1.0)
    }

    fn open_store(
        args: &StateArgs,
        name: &str,
    ) -> Result<(Arc<dyn Store>, std::path::PathBuf), Error> {
        let dir = args.state_dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("strom-bench-state-{}", std::process::id()))
        });
        let path = dir.join(format!("{name}.redb"));
        let store = RedbStore::open(&path).map_err(|e| Error::Config(e.to_string()))?;
        Ok((Arc::new(store), dir))
    }

    /// Every key 0..n holds its value.
    fn check(store: &dyn Store, n: u64) -> bool {
        store.len().ok() == Some(n)
            && (0..n).all(|i| store.get(&i.to_be_bytes()).ok().flatten() == Some(value(i)))
    }

    fn report(op: &str, n: u64, seconds: f64, correct: bool) -> bool {
        super::print(json!({
            "op": op,
            "records": n,
            "seconds": seconds,
            "records_per_s": n as f64 / seconds,
            "peak_rss_mb": peak_rss_mb(),
            "correct": correct,
        }));
        correct
    }

    fn state_error(e: strom_state::StateError) -> Error {
        match e {
            strom_state::StateError::Kafka(e) => e,
            other => Error::Config(other.to_string()),
        }
    }

    pub(super) async fn write(args: &StateArgs) -> Result<bool, Error> {
        let client = Client::connect(client_config(&args.brokers)?).await?;
        let topic = changelog::topic_name(&format!("strom-bench-{}", std::process::id()), "write");
        changelog::ensure_topic(&client, &topic, 1, 1, None)
            .await
            .map_err(state_error)?;
        let (store, dir) = open_store(args, "write")?;
        let producer = Producer::new(client, ProducerConfig::default())?;
        let mut logged = LoggedStore::new(store.clone(), producer, topic, 0);
        let started = Instant::now();
        for i in 0..args.messages {
            logged
                .put(i.to_be_bytes().to_vec(), value(i))
                .await
                .map_err(state_error)?;
            if i % 10_000 == 9_999 {
                logged.flush(Durability::Fast).await.map_err(state_error)?;
            }
        }
        logged
            .flush(Durability::Durable)
            .await
            .map_err(state_error)?;
        let seconds = started.elapsed().as_secs_f64();
        let correct = check(store.as_ref(), args.messages);
        drop((logged, store));
        let _ = std::fs::remove_dir_all(dir)
            .ok()
            .filter(|_| args.state_dir.is_none());
        Ok(report("state-write", args.messages, seconds, correct))
    }

    pub(super) fn open(megabytes: u64, dir: Option<std::path::PathBuf>) -> Result<bool, Error> {
        let dir = dir.unwrap_or_else(|| {
            std::env::temp_dir().join(format!("strom-bench-open-{}", std::process::id()))
        });
        let path = dir.join("open.redb");
        let failed = |e: strom_state::StateError| Error::Config(e.to_string());
        let n = megabytes * 1024;
        let started = Instant::now();
        {
            let store = RedbStore::open(&path).map_err(failed)?;
            let mut batch = WriteBatch::default();
            for i in 0..n {
                let mut v = value(i);
                v.resize(1024, b'x');
                batch.put(i.to_be_bytes().to_vec(), v);
                if batch.len() == 50_000 || i + 1 == n {
                    store
                        .apply(&batch, Some(i as i64), Durability::Durable)
                        .map_err(failed)?;
                    batch.clear();
                }
            }
        }
        let wrote = started.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let started = Instant::now();
        let store = RedbStore::open(&path).map_err(failed)?;
        let opened = started.elapsed().as_secs_f64();
        let correct = store.len().ok() == Some(n);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
        super::print(json!({
            "op": "state-open",
            "records": n,
            "file_bytes": bytes,
            "write_seconds": wrote,
            "open_seconds": opened,
            "correct": correct,
        }));
        Ok(correct)
    }

    pub(super) async fn read(args: &StateArgs) -> Result<bool, Error> {
        let (store, dir) = open_store(args, "read")?;
        let mut batch = WriteBatch::default();
        for i in 0..args.messages {
            batch.put(i.to_be_bytes().to_vec(), value(i));
            if batch.len() == 50_000 || i + 1 == args.messages {
                store
                    .apply(&batch, Some(i as i64), Durability::Fast)
                    .map_err(|e| Error::Config(e.to_string()))?;
                batch.clear();
            }
        }
        // Readers run on every core: redb serves concurrent readers, and a
        // worker reads tables from several tasks.
        let n = args.messages.max(1);
        let threads = std::thread::available_parallelism().map_or(2, |t| t.get()) as u64;
        let per_thread = args.messages / threads;
        let started = Instant::now();
        let correct = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let store = store.clone();
                    scope.spawn(move || {
                        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (t + 1);
                        let mut expected = Vec::with_capacity(128);
                        let mut ok = true;
                        for _ in 0..per_thread {
                            rng ^= rng << 13;
                            rng ^= rng >> 7;
                            rng ^= rng << 17;
                            let i = rng % n;
                            super::fill_value(&mut expected, i, 100);
                            ok &= store.get(&i.to_be_bytes()).ok().flatten().as_deref()
                                == Some(&expected[..]);
                        }
                        ok
                    })
                })
                .collect();
            workers.into_iter().all(|w| w.join().unwrap_or(false))
        });
        let seconds = started.elapsed().as_secs_f64();
        let mut correct = report("state-read", per_thread * threads, seconds, correct);
        for blocking in [false, true] {
            let started = Instant::now();
            let mut ok = true;
            for i in 0..n {
                let key = (i.wrapping_mul(0x9e37_79b9) % n).to_be_bytes();
                let got = if blocking {
                    let store = store.clone();
                    tokio::task::spawn_blocking(move || store.get(&key))
                        .await
                        .map_err(|e| Error::Config(e.to_string()))?
                } else {
                    store.get(&key)
                };
                ok &= got.ok().flatten().is_some();
            }
            let op = if blocking {
                "state-read-spawn-blocking"
            } else {
                "state-read-inline"
            };
            correct &= report(op, n, started.elapsed().as_secs_f64(), ok);
        }
        drop(store);
        let _ = std::fs::remove_dir_all(dir)
            .ok()
            .filter(|_| args.state_dir.is_none());
        Ok(correct)
    }

    pub(super) async fn recover(args: &StateArgs) -> Result<bool, Error> {
        let client = Client::connect(client_config(&args.brokers)?).await?;
        let topic =
            changelog::topic_name(&format!("strom-bench-{}", std::process::id()), "recover");
        changelog::ensure_topic(&client, &topic, 1, 1, None)
            .await
            .map_err(state_error)?;
        let producer = Producer::new(client.clone(), ProducerConfig::default())?;
        for i in 0..args.messages {
            let key = i.to_be_bytes();
            let v = value(i);
            producer
                .send(ProducerRecord::to(&topic).partition(0).key(&key).value(&v))
                .await?;
        }
        producer.flush().await?;
        let (store, dir) = open_store(args, "recover")?;
        let started = Instant::now();
        let recovery = strom_state::recover(&client, store.clone(), &topic, 0)
            .await
            .map_err(state_error)?;
        let seconds = started.elapsed().as_secs_f64();
        let correct = recovery.replayed == args.messages && check(store.as_ref(), args.messages);
        drop(store);
        let _ = std::fs::remove_dir_all(dir)
            .ok()
            .filter(|_| args.state_dir.is_none());
        Ok(report("state-recover", args.messages, seconds, correct))
    }
}

#[path = "strom-bench/join.rs"]
mod join;
#[path = "strom-bench/windowed.rs"]
mod windowed;

/// `pipeline`: the wordcount app over N single-word records, one worker.
mod pipeline {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    use serde_json::json;
    use strom::codec::{NoKey, Utf8};
    use strom::{App, StoreKind};
    use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
    use strom_client::IsolationLevel;
    use strom_client::{Client, Error, NewTopic};
    use strom_state::{changelog, recover_with_progress, MemoryStore, RecoveryProgress, Store};

    use super::{client_config, StateArgs};

    /// How far the pipeline's handler has come.
    struct Progress {
        processed: AtomicU64,
        /// When the first event was handled.
        first: OnceLock<Instant>,
        /// Set once the last event is handled.
        done: tokio::sync::watch::Sender<bool>,
    }

    /// Sends the `n` words of the run (a vocabulary of `keys` words, in an
    /// order that visits them all: 7919 is prime); returns the true count
    /// of each.
    async fn feed(
        producer: Producer,
        input: String,
        n: u64,
        keys: u64,
    ) -> Result<BTreeMap<String, u64>, Error> {
        let mut truth: BTreeMap<String, u64> = BTreeMap::new();
        let stride = if keys.is_multiple_of(7919) { 1 } else { 7919 };
        for i in 0..n {
            let word = format!("word{}", (i.wrapping_mul(stride)) % keys);
            producer
                .send(ProducerRecord::to(&input).value(word.as_bytes()))
                .await?;
            *truth.entry(word).or_default() += 1;
        }
        producer.flush().await?;
        Ok(truth)
    }

    /// This process's resident memory now, in MB.
    fn rss_mb() -> f64 {
        super::state_bench::status_mb("VmRSS:")
    }

    pub(super) async fn run(
        args: &StateArgs,
        guarantee: strom::ProcessingGuarantee,
        soak: bool,
        keys: u64,
    ) -> Result<bool, Error> {
        let n = args.messages;
        let run_id = std::process::id();
        let (id, input, output) = (
            format!("strom-pipeline-{run_id}"),
            format!("pipeline-words-{run_id}"),
            format!("pipeline-counts-{run_id}"),
        );
        let client = Client::connect(client_config(&args.brokers)?).await?;
        client.create_topic(NewTopic::new(&input, 6, 1)).await?;
        // A soak run's feeder shares the process: its buffer is kept small.
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                buffer_memory: if soak { 4 << 20 } else { 64 << 20 },
                ..ProducerConfig::default()
            },
        )?;
        let fed = if soak {
            tokio::spawn(feed(producer, input.clone(), n, keys))
        } else {
            let truth = feed(producer, input.clone(), n, keys).await?;
            tokio::spawn(async move { Ok(truth) })
        };

        let state_dir = args
            .state_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(format!("strom-pipeline-{run_id}")));
        let app = App::new(&id)
            .with_brokers(args.brokers.split(',').map(str::trim))
            .with_state_dir(&state_dir)
            .with_store(StoreKind::Redb)
            .with_partitions(6)
            .with_processing_guarantee(guarantee)
            .with_session_timeout(Duration::from_secs(6), Duration::from_secs(1));
        let mut app = args.budget(app);
        let words = app
            .topic::<(), String>(&input)
            .with_key_codec(NoKey)
            .with_value_codec(Utf8);
        let counts_out = app.topic::<String, u64>(&output).with_key_codec(Utf8);
        let counts = app.table::<String, u64>("counts", 0);
        // The bench's own bookkeeping, one handle cloned per event.
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let progress = Arc::new(Progress {
            processed: AtomicU64::new(0),
            first: OnceLock::new(),
            done: done_tx,
        });
        app.agent(&words)
            .flat_map(|line: String| {
                line.split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .group_by(|e| e.value.clone(), "by-word")
            .for_each_with(
                (counts, counts_out, progress.clone()),
                move |ctx, event, (counts, counts_out, progress)| async move {
                    progress.first.get_or_init(Instant::now);
                    let c = ctx.update(&counts, &event.key, |c| c + 1).await?;
                    ctx.send(&counts_out, &event.key, &c).await?;
                    if progress.processed.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        let _ = progress.done.send(true);
                    }
                    Ok(())
                },
            );
        let samples: Arc<Mutex<Vec<(u64, f64)>>> = Arc::default();
        let sampler = {
            let (samples, progress, mut done) =
                (samples.clone(), progress.clone(), done_rx.clone());
            tokio::spawn(async move {
                let mut next_line = Instant::now();
                while !*done.borrow() {
                    let (at, rss) = (progress.processed.load(Ordering::Relaxed), rss_mb());
                    samples
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((at, rss));
                    if soak && Instant::now() >= next_line {
                        eprintln!("{}", json!({ "processed": at, "rss_mb": rss }));
                        next_line += Duration::from_secs(5);
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(500), done.changed()).await;
                }
            })
        };
        let mut done = done_rx.clone();
        let cpu_before = super::state_bench::cpu_seconds();
        app.run(async move {
            let _ = done.wait_for(|d| *d).await;
        })
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
        let _ = sampler.await;
        let cpu = super::state_bench::cpu_seconds() - cpu_before;
        let truth = fed
            .await
            .map_err(|e| Error::Config(format!("the feeder failed: {e}")))??;
        // run() returns after the final checkpoint: tables flushed, every
        // output and changelog record acknowledged, offsets committed.
        let end = Instant::now();
        let start = progress.first.get().copied().unwrap_or(end);
        let seconds = end.duration_since(start).as_secs_f64();

        let topic = changelog::topic_name(&id, "counts");
        let mut table = BTreeMap::new();
        for p in 0..6 {
            let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
            let progress = RecoveryProgress::default();
            let isolation = IsolationLevel::ReadCommitted;
            recover_with_progress(&client, store.clone(), &topic, p, isolation, &progress)
                .await
                .map_err(|e| Error::Config(e.to_string()))?;
            for (k, v) in store
                .range(
                    std::ops::Bound::Unbounded,
                    std::ops::Bound::Unbounded,
                    usize::MAX,
                )
                .map_err(|e| Error::Config(e.to_string()))?
            {
                let count: u64 = serde_json::from_slice(&v).unwrap_or(0);
                table.insert(String::from_utf8_lossy(&k).into_owned(), count);
            }
        }
        let correct = table == truth;
        let _ = std::fs::remove_dir_all(&state_dir)
            .ok()
            .filter(|_| args.state_dir.is_none());
        let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let quarters = super::by_quarter(&samples, n);
        super::print(json!({
            "op": if soak { "soak" } else { "pipeline" },
            "events": n,
            "seconds": seconds,
            "events_per_s": n as f64 / seconds,
            "peak_rss_mb": super::state_bench::peak_rss_mb(),
            // The worker's run, from its start to its final checkpoint (and a
            // soak run's feeder, which runs alongside).
            "cpu_s_per_million_events": cpu * 1e6 / n as f64,
            "rss_mb_by_quarter": quarters,
            "rss_samples": samples.len(),
            "keys": keys,
            "guarantee": guarantee.to_string(),
            "correct": correct,
        }));
        Ok(correct)
    }
}

/// The tools `scripts/wordcount-demo.sh` drives the wordcount example with.
mod demo {
    use std::collections::HashMap;
    use std::io::BufRead;
    use std::time::{Duration, Instant};

    use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
    use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
    use strom_client::{Client, Error};

    use super::client_config;

    pub(super) async fn send_lines(brokers: &str, topic: &str) -> Result<bool, Error> {
        let client = Client::connect(client_config(brokers)?).await?;
        let started = Instant::now();
        while let Err(e) = client.topic_metadata(topic).await {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(e);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let producer = Producer::new(client, ProducerConfig::default())?;
        let mut sent = 0u64;
        for line in std::io::stdin().lock().lines() {
            let line =
                line.map_err(|e| Error::Config(format!("cannot read standard input: {e}")))?;
            producer
                .send(ProducerRecord::to(topic).value(line.as_bytes()))
                .await?;
            sent += 1;
        }
        producer.flush().await?;
        eprintln!("sent {sent} lines to {topic}");
        Ok(true)
    }

    pub(super) async fn top_counts(
        brokers: &str,
        topic: &str,
        expect_total: u64,
        top: usize,
    ) -> Result<bool, Error> {
        let client = Client::connect(client_config(brokers)?).await?;
        let started = Instant::now();
        loop {
            let mut last: HashMap<String, u64> = HashMap::new();
            if let Ok(meta) = client.topic_metadata(topic).await {
                let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
                consumer.assign(
                    meta.partitions
                        .iter()
                        .map(|p| (TopicPartition::new(topic, p.partition), Offset::Earliest)),
                )?;
                while let Ok(batch) =
                    tokio::time::timeout(Duration::from_secs(1), consumer.poll()).await
                {
                    for r in batch? {
                        let word = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default())
                            .into_owned();
                        let n = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
                            .unwrap_or(0);
                        last.insert(word, n);
                    }
                }
            }
            let total: u64 = last.values().sum();
            if total >= expect_total || started.elapsed() > Duration::from_secs(120) {
                let mut words: Vec<_> = last.into_iter().collect();
                words.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
                for (word, n) in words.iter().take(top) {
                    println!("{n:>6}  {word}");
                }
                println!("{total} of {expect_total} words counted");
                return Ok(total == expect_total);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

mod delay_proxy {
    use std::time::Duration;

    use strom_client::Error;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::time::{sleep_until, Instant};

    /// Chunks in flight per direction (of up to 64 KiB each): enough for
    /// hundreds of MB/s at tens of ms without being the bottleneck.
    const IN_FLIGHT: usize = 4096;

    pub(super) async fn run(listen: &str, upstream: &str, delay: Duration) -> Result<bool, Error> {
        let io = |e: std::io::Error| Error::Io {
            broker: listen.to_owned(),
            source: std::sync::Arc::new(e),
        };
        let listener = TcpListener::bind(listen).await.map_err(io)?;
        eprintln!("strom-bench: delaying {listen} -> {upstream} by {delay:?} each way");
        loop {
            let (client, _) = listener.accept().await.map_err(io)?;
            let upstream = upstream.to_owned();
            tokio::spawn(async move {
                match TcpStream::connect(&upstream).await {
                    Ok(server) => relay(client, server, delay).await,
                    Err(e) => eprintln!("strom-bench: cannot reach {upstream}: {e}"),
                }
            });
        }
    }

    async fn relay(client: TcpStream, server: TcpStream, delay: Duration) {
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (sr, sw) = server.into_split();
        tokio::join!(direction(cr, sw, delay), direction(sr, cw, delay));
    }

    /// Copies `from` to `to`, each chunk sent `delay` after it arrived; the
    /// reading side never waits for the delay, so throughput is not capped.
    async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
        let reader = async move {
            loop {
                let mut buf = vec![0u8; 64 * 1024];
                match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        buf.truncate(n);
                        if tx.send((Instant::now() + delay, buf)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        };
        let writer = async move {
            while let Some((due, chunk)) = rx.recv().await {
                sleep_until(due).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        };
        tokio::join!(reader, writer);
    }
}
