//! `strom-bench`: end-to-end throughput of strom-client against any broker.
//!
//! ```text
//! strom-bench produce --brokers 127.0.0.1:9092 --topic t --messages 1000000 --size 100 --compression lz4
//! strom-bench consume --brokers 127.0.0.1:9092 --topic t --messages 1000000
//! ```
//!
//! Each command prints one JSON line. `consume` checks every value against its key
//! and exits non-zero if a record is missing, duplicated or corrupt.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde_json::json;
use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Acks, Client, ClientConfig, Error, NewTopic};

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
    #[arg(long)]
    brokers: String,
    #[arg(long)]
    topic: String,
    #[arg(long)]
    messages: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Produce N records with keys `key-{i}` and values `{i}:xxx…` of B bytes.
    Produce {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 100)]
        size: usize,
        #[arg(long, default_value = "none")]
        compression: String,
        /// Partitions of the topic when it has to be created.
        #[arg(long, default_value_t = 6)]
        partitions: i32,
        #[arg(long, default_value_t = 5)]
        linger_ms: u64,
        #[arg(long, default_value = "all")]
        acks: String,
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
            } => {
                let config = ProducerConfig {
                    acks: acks.parse()?,
                    compression: compression.parse()?,
                    linger: Duration::from_millis(linger_ms),
                    ..ProducerConfig::default()
                };
                produce(&target, size, partitions, config).await
            }
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

fn client_config(brokers: &str) -> ClientConfig {
    ClientConfig::new(brokers.split(',').map(str::trim))
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

async fn produce(
    target: &Target,
    size: usize,
    partitions: i32,
    config: ProducerConfig,
) -> Result<bool, Error> {
    let (topic, messages) = (target.topic.as_str(), target.messages);
    let client = Client::connect(client_config(&target.brokers)).await?;
    match client
        .create_topic(NewTopic::new(topic, partitions, 1))
        .await
    {
        Ok(()) | Err(Error::TopicAlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    let acks = config.acks;
    let producer = Producer::new(client, config)?;
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
        let d = producer
            .send(ProducerRecord::to(topic).key(&key).value(&value))
            .await?;
        deliveries.push(d);
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

async fn consume(target: &Target, timeout: Duration, quiet: Duration) -> Result<bool, Error> {
    let (topic, messages) = (target.topic.as_str(), target.messages);
    let client = Client::connect(client_config(&target.brokers)).await?;
    let meta = client.topic_metadata(topic).await?;
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign(
        meta.partitions
            .iter()
            .map(|p| (TopicPartition::new(topic, p.partition), Offset::Earliest)),
    )?;
    let mut seen = vec![0u8; messages as usize];
    let (mut received, mut duplicates, mut corrupt, mut bytes, mut distinct) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let started = Instant::now();
    let mut finished_at: Option<Instant> = None;
    let mut expected = Vec::with_capacity(256);
    loop {
        let wait = match finished_at {
            Some(t) => quiet.saturating_sub(t.elapsed()),
            None => timeout.saturating_sub(started.elapsed()),
        };
        if wait.is_zero() {
            break;
        }
        let batch = match tokio::time::timeout(wait, consumer.poll()).await {
            Ok(batch) => batch?,
            Err(_) => break,
        };
        for r in batch {
            received += 1;
            let value = r.value.as_deref().unwrap_or_default();
            bytes += value.len() as u64;
            let index = r
                .key
                .as_deref()
                .and_then(|k| k.strip_prefix(b"key-"))
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.parse::<u64>().ok())
                .filter(|&i| i < messages);
            let Some(i) = index else {
                corrupt += 1;
                continue;
            };
            fill_value(&mut expected, i, value.len());
            if value != expected.as_slice() {
                corrupt += 1;
                continue;
            }
            match &mut seen[i as usize] {
                0 => {
                    seen[i as usize] = 1;
                    distinct += 1;
                }
                _ => duplicates += 1,
            }
        }
        if distinct == messages && finished_at.is_none() {
            finished_at = Some(Instant::now());
        }
    }
    let end = finished_at.unwrap_or_else(Instant::now);
    let seconds = end.duration_since(started).as_secs_f64();
    let missing = messages - distinct;
    print(json!({
        "op": "consume",
        "messages": received,
        "missing": missing,
        "duplicates": duplicates,
        "corrupt": corrupt,
        "seconds": seconds,
        "msgs_per_s": distinct as f64 / seconds,
        "mb_per_s": bytes as f64 / seconds / 1e6,
    }));
    Ok(missing == 0 && duplicates == 0 && corrupt == 0)
}
