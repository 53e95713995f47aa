//! The app binary's command line: `worker`, `send`, `tail`, `tables`,
//! `agents`, `topics`, `reset`.

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use strom_client::consumer::{Consumer, ConsumerConfig, ConsumerRecord, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, OffsetSpec};
use strom_state::changelog;
use tracing::info;

use crate::app::App;
use crate::error::{Error, Result};
use crate::topic::{Declared, Show};

#[derive(Parser)]
#[command(
    about = "A Strom stream-processing app",
    long_about = "A Strom stream-processing app. Run it as `worker` (start more workers with the same \
                  app id and they share the partitions); the other subcommands inspect what the app \
                  declares or feed it."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a worker of the app until SIGTERM or SIGINT (a second signal exits at once).
    Worker {
        /// Bootstrap brokers, `host:port[,host:port…]` (default: STROM_BROKERS).
        #[arg(long)]
        brokers: Option<String>,
        /// Where tables keep their files (default: STROM_STATE_DIR, else ./strom-state/<app-id>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Port of the web server (health, readiness, metrics, table lookups). Default 6066; 0 picks a free one.
        #[arg(long)]
        web_port: Option<u16>,
        /// Address the web server listens on. Default 0.0.0.0.
        #[arg(long)]
        web_bind: Option<IpAddr>,
        /// Host name other workers reach this one at (for table lookup redirects). Default: this machine's host name.
        #[arg(long)]
        web_host: Option<String>,
        /// Runs no web server.
        #[arg(long)]
        without_web: bool,
        /// Log filter, e.g. `info` or `strom_worker=debug`.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// `at_least_once` (the default) or `exactly_once` (default: STROM_PROCESSING_GUARANTEE).
        #[arg(long)]
        processing_guarantee: Option<strom_worker::ProcessingGuarantee>,
        /// This worker's stable identity (default: STROM_INSTANCE_ID, else one kept in the state directory).
        #[arg(long)]
        instance_id: Option<String>,
        /// The worker's memory budget, e.g. `128MiB` or `1GiB` (bytes without a unit), shared by the table
        /// stores' caches, the producer's buffers and fetched records (default: STROM_MEMORY_BUDGET, else 256MiB).
        #[arg(long, value_parser = parse_size)]
        memory_budget: Option<usize>,
        /// How the worker compresses what it writes: none, gzip, snappy, lz4 or zstd (default: STROM_COMPRESSION_TYPE, else none).
        #[arg(long)]
        compression_type: Option<strom_client::Compression>,
        /// A client setting by its Kafka name, e.g. `-X security.protocol=SASL_SSL -X sasl.mechanism=SCRAM-SHA-512`
        /// (repeatable; each also read from STROM_<NAME>, e.g. STROM_SASL_PASSWORD, which keeps secrets off the command line).
        #[arg(short = 'X', value_name = "NAME=VALUE")]
        settings: Vec<String>,
    },
    /// Sends VALUE (and --key) to TOPIC, checked with the topic's codecs: JSON text for JSON topics, text for UTF-8 ones.
    Send {
        /// A topic the app declares.
        topic: String,
        /// The record's value, as the topic's codec writes it.
        value: String,
        /// The record's key (default: none).
        #[arg(long)]
        key: Option<String>,
        /// The partition (default: by key).
        #[arg(long)]
        partition: Option<i32>,
        /// Sends the record this many times.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Bootstrap brokers (default: STROM_BROKERS).
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Prints the records of TOPIC decoded with its codecs, one JSON object per line
    /// (partition, offset, timestamp, key, value, headers; `error` and the raw bytes
    /// for a record that does not decode).
    Tail {
        /// A topic the app declares.
        topic: String,
        /// Starts at each partition's first record (default: only records produced from now on).
        #[arg(long)]
        from_beginning: bool,
        /// Keeps waiting for new records until interrupted (default: stops at the end of every partition).
        #[arg(long)]
        follow: bool,
        /// Bootstrap brokers (default: STROM_BROKERS).
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Lists the app's tables with their changelog topics and partition counts.
    Tables,
    /// Lists the app's agents: the topic each reads, what it does, its concurrency and error policy.
    Agents,
    /// Lists the topics the app declares and creates, with their settings.
    Topics,
    /// Deletes this worker's local table files (nothing in Kafka: the next start rebuilds them from the changelogs).
    Reset {
        /// Does not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// The state directory (default: STROM_STATE_DIR, else ./strom-state/<app-id>).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
}

/// Parses the command line and runs the subcommand.
pub(crate) fn main(app: App) -> ExitCode {
    let cli = Cli::parse();
    let log_level = match &cli.command {
        Command::Worker { log_level, .. } => log_level.clone(),
        _ => "warn".to_owned(),
    };
    // The log goes to stderr (stdout is for what a command prints), in
    // colour only on a terminal and without NO_COLOR set.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_level))
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
    let outcome = match cli.command {
        Command::Worker {
            brokers,
            state_dir,
            web_port,
            web_bind,
            web_host,
            without_web,
            log_level: _,
            processing_guarantee,
            instance_id,
            memory_budget,
            compression_type,
            settings,
        } => {
            let mut app = app;
            for setting in settings {
                let Some((name, value)) = setting.split_once('=') else {
                    eprintln!("-X {setting:?}: expected NAME=VALUE");
                    return ExitCode::from(2);
                };
                app = match app.with_client_setting(name.trim(), value.trim()) {
                    Ok(app) => app,
                    Err(e) => {
                        eprintln!("-X {name}: {e}");
                        return ExitCode::from(2);
                    }
                };
            }
            if let Some(g) = processing_guarantee {
                app = app.with_processing_guarantee(g);
            }
            if let Some(c) = compression_type {
                app = app.with_compression(c);
            }
            if let Some(id) = instance_id {
                app = app.with_instance_id(id);
            }
            let from_env = std::env::var("STROM_MEMORY_BUDGET").ok();
            match memory_budget.map(Ok).or(from_env.map(|s| parse_size(&s))) {
                Some(Ok(bytes)) => app = app.with_memory_budget(bytes),
                Some(Err(e)) => {
                    eprintln!("STROM_MEMORY_BUDGET: {e}");
                    return ExitCode::from(2);
                }
                None => {}
            }
            worker(
                app,
                brokers,
                state_dir,
                web(web_port, web_bind, web_host, without_web),
            )
        }
        Command::Send {
            topic,
            value,
            key,
            partition,
            repeat,
            brokers,
        } => block_on(send(app, brokers, &topic, key, &value, partition, repeat)),
        Command::Tail {
            topic,
            from_beginning,
            follow,
            brokers,
        } => block_on(tail(app, brokers, &topic, from_beginning, follow)),
        Command::Tables => {
            tables(&app);
            Ok(())
        }
        Command::Agents => {
            agents(&app);
            Ok(())
        }
        Command::Topics => {
            topics(&app);
            Ok(())
        }
        Command::Reset { yes, state_dir } => reset(app, yes, state_dir),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the web server listens (none with `--without-web`) and the URL it
/// advertises when `--web-host` names one.
type Web = (Option<SocketAddr>, Option<String>);

/// A size in bytes: a number with an optional unit, `K`, `M` or `G` (powers
/// of 1024, also written `KiB`, `MB` and so on).
fn parse_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(digits);
    let number: usize = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size such as 128MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("{other:?} is not a unit of size (K, M or G)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn web(port: Option<u16>, bind: Option<IpAddr>, host: Option<String>, without: bool) -> Web {
    if without {
        return (None, None);
    }
    let port = port.unwrap_or(6066);
    let addr = SocketAddr::new(bind.unwrap_or(IpAddr::from([0, 0, 0, 0])), port);
    (Some(addr), host.map(|h| format!("http://{h}:{port}")))
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Config(format!("cannot start the runtime: {e}")))?
        .block_on(f)
}

fn brokers(app: App, brokers: Option<String>) -> App {
    match brokers {
        Some(b) => app.with_brokers(b.split(',').map(str::trim)),
        None => app,
    }
}

fn worker(
    app: App,
    brokers_flag: Option<String>,
    state_dir: Option<PathBuf>,
    (listen, url): Web,
) -> Result<()> {
    let mut app = brokers(app, brokers_flag);
    if let Some(d) = state_dir {
        app = app.with_state_dir(d);
    }
    app = app.with_web(listen);
    if let Some(url) = url {
        app = app.with_advertised_url(url);
    }
    block_on(app.run(shutdown_signal()))
}

async fn send(
    app: App,
    brokers_flag: Option<String>,
    topic: &str,
    key: Option<String>,
    value: &str,
    partition: Option<i32>,
    repeat: usize,
) -> Result<()> {
    let app = brokers(app, brokers_flag);
    let declared = declared(&app, topic)?;
    let (show, key_codec) = {
        let d = declared.lock().unwrap_or_else(|e| e.into_inner());
        (d.show.clone(), d.key_codec)
    };
    if key.is_some() && key_codec == "NoKey" {
        return Err(Error::Config(format!(
            "topic {topic:?} has no keys; drop --key"
        )));
    }
    show(key.as_deref().map(str::as_bytes), Some(value.as_bytes())).map_err(|source| {
        Error::Codec {
            topic: topic.to_owned(),
            source,
        }
    })?;
    let client = Client::connect(app.config.client.clone()).await?;
    let producer = Producer::new(client, ProducerConfig::default())?;
    let mut deliveries = Vec::with_capacity(repeat);
    for _ in 0..repeat {
        let mut record = ProducerRecord::to(topic).value(value.as_bytes());
        record.key = key.as_deref().map(str::as_bytes);
        record.partition = partition;
        deliveries.push(producer.send(record).await?);
    }
    producer.flush().await?;
    for d in deliveries {
        d.await?;
    }
    println!("sent {repeat} record(s) to {topic}");
    Ok(())
}

/// The codecs of `topic`, or an error naming the app's topics.
fn declared(app: &App, topic: &str) -> Result<Arc<Mutex<Declared>>> {
    match app.topics.iter().find(|(t, _)| t == topic) {
        Some((_, declared)) => Ok(declared.clone()),
        None => {
            let known: Vec<&str> = app.topics.iter().map(|(t, _)| t.as_str()).collect();
            Err(Error::Config(format!(
                "the app declares no topic {topic:?}; it declares {known:?}"
            )))
        }
    }
}

async fn tail(
    app: App,
    brokers_flag: Option<String>,
    topic: &str,
    from_beginning: bool,
    follow: bool,
) -> Result<()> {
    let app = brokers(app, brokers_flag);
    let show = declared(&app, topic)?
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .show
        .clone();
    let client = Client::connect(app.config.client.clone()).await?;
    let partitions = client.topic_metadata(topic).await?.partitions.len() as i32;
    // Where "the end" is, for a tail that stops there: a hint (a broker may
    // report less), so it also waits for a quiet second at or past it.
    let ends = match follow {
        true => None,
        false => Some(client.list_offsets(topic, OffsetSpec::Latest).await?),
    };
    let start = if from_beginning {
        Offset::Earliest
    } else {
        Offset::Latest
    };
    let tps: Vec<TopicPartition> = (0..partitions)
        .map(|p| TopicPartition::new(topic, p))
        .collect();
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer.assign(tps.iter().map(|tp| (tp.clone(), start)))?;
    let mut out = std::io::stdout().lock();
    loop {
        let polled = tokio::time::timeout(Duration::from_secs(1), consumer.poll()).await;
        let records = match (polled, &ends) {
            (Ok(records), _) => records?,
            (Err(_), None) => continue,
            (Err(_), Some(ends)) => {
                let at_end = |tp: &TopicPartition| {
                    let end = ends.get(&tp.partition).copied().unwrap_or(0);
                    consumer.position(tp).is_some_and(|p| p >= end)
                };
                if tps.iter().all(at_end) {
                    return Ok(());
                }
                continue;
            }
        };
        for r in records {
            let line = record_json(&show, &r);
            if writeln!(out, "{line}").is_err() {
                return Ok(()); // stdout closed (e.g. piped into `head`)
            }
        }
        let _ = out.flush();
    }
}

/// One record as a line of `tail`: decoded with the topic's codecs, or, if
/// it does not decode, the error and its bytes as (lossy) text.
fn record_json(show: &Show, r: &ConsumerRecord) -> serde_json::Value {
    let text = |b: &Option<bytes::Bytes>| match b {
        Some(b) => serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
        None => serde_json::Value::Null,
    };
    let mut line = serde_json::json!({
        "partition": r.partition,
        "offset": r.offset,
        "timestamp": r.timestamp,
    });
    match show(r.key.as_deref(), r.value.as_deref()) {
        Ok((key, value)) => {
            line["key"] = key;
            line["value"] = value;
        }
        Err(e) => {
            line["error"] = serde_json::Value::String(e.to_string());
            line["key_bytes"] = text(&r.key);
            line["value_bytes"] = text(&r.value);
        }
    }
    if !r.headers.is_empty() {
        let headers: Vec<serde_json::Value> = (r.headers.iter())
            .map(|h| serde_json::json!([String::from_utf8_lossy(&h.key), text(&h.value)]))
            .collect();
        line["headers"] = serde_json::Value::Array(headers);
    }
    line
}

fn tables(app: &App) {
    // As declared: the largest count of the topics agents read.
    let read: Vec<&str> = app.processors.iter().map(|p| p.topic()).collect();
    let partitions = (app.topics.iter())
        .filter(|(t, _)| read.contains(&t.as_str()))
        .map(|(_, d)| {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.settings.partitions.unwrap_or(app.partitions)
        })
        .max()
        .unwrap_or(app.partitions);
    for table in &app.tables {
        let windows = match table.windowing() {
            Some(w) => format!("  windows: {}", w.describe()),
            None => String::new(),
        };
        println!(
            "{:<30} changelog={}  partitions={partitions} (the largest count of the topics agents read, as declared){windows}",
            table.name,
            changelog::topic_name(app.id(), &table.name)
        );
    }
    for (name, topic, _) in &app.globals {
        println!("{name:<30} global: all of topic {topic} on every worker");
    }
}

/// One line per agent stage: its topic, what it does, its concurrency and its
/// error policy (read now, so a policy set after the agent shows).
fn agents(app: &App) {
    let punctuators = app.punctuators.iter().map(|(p, what)| (p, what));
    for (p, what) in app.processors.iter().zip(&app.agents).chain(punctuators) {
        let policy = match p.error_policy() {
            Some(policy) => format!("{policy:?}"),
            None => format!("{:?} (the app's)", app.config.on_error),
        };
        println!(
            "{:<40} {what}  concurrency={}  on_error={policy}",
            p.topic(),
            p.concurrency()
        );
    }
}

fn topics(app: &App) {
    for (topic, declared) in &app.topics {
        let d = declared.lock().unwrap_or_else(|e| e.into_inner());
        let partitions = d
            .settings
            .partitions
            .map_or(format!("{} (app default)", app.partitions), |p| {
                p.to_string()
            });
        let replicas = d
            .settings
            .replication
            .map_or(format!("{} (app default)", app.config.replication), |r| {
                r.to_string()
            });
        println!(
            "{topic:<40} partitions={partitions}  replicas={replicas}  key={}  value={}  configs={:?}",
            d.key_codec, d.value_codec, d.settings.configs
        );
    }
    for (topic, source) in &app.repartitions {
        println!("{topic:<40} repartition of {source} (with the tables' partition count)");
    }
    for table in &app.tables {
        let cleanup = match table.windowing() {
            Some(_) => "compacted, and deleted after the windows' retention",
            None => "compacted",
        };
        println!(
            "{:<40} changelog of table {} ({cleanup})",
            changelog::topic_name(app.id(), &table.name),
            table.name
        );
    }
}

fn reset(app: App, yes: bool, state_dir: Option<PathBuf>) -> Result<()> {
    let app = match state_dir {
        Some(d) => app.with_state_dir(d),
        None => app,
    };
    let dir = app.config.state_dir.clone();
    let globals = app.globals.iter().map(|(name, _, _)| name.as_str());
    let names: Vec<&str> = (app.tables.iter().map(|t| t.name.as_str()))
        .chain(globals)
        .collect();
    if !yes {
        print!(
            "Delete the local files of tables {names:?} under {}? Kafka keeps the changelogs. [y/N] ",
            dir.display()
        );
        let _ = std::io::stdout().flush();
        let mut answer = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut answer)
            .map_err(|e| Error::Config(format!("cannot read the answer: {e}")))?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            println!("nothing deleted");
            return Ok(());
        }
    }
    for table in &names {
        strom_state::reset(&dir, table)?;
        println!("deleted {}", dir.join(table).display());
    }
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits the process.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
    info!("stopping: finishing events, flushing tables, committing; a second signal exits at once");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64kb"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
