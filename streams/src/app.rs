//! The app: its settings, topics, tables and agents, and how it runs.

use std::marker::PhantomData;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Parser, Subcommand};
use strom_client::{Client, ClientConfig, NewTopic};
use strom_state::TableKey;
use strom_worker::{ProcessingGuarantee, Processor, StoreKind, Worker, WorkerConfig};
use tracing::{info, warn};

use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::stream::{decode_step, Stream};
use crate::table::Table;
use crate::topic::{Topic, TopicSettings};

/// A stream-processing app: declare topics, tables and agents, then run it as
/// a worker. Start more workers with the same id and they share the partitions.
///
/// Settings come from the builder methods, or from the environment:
/// `STROM_BROKERS` (comma-separated, default `127.0.0.1:9092`) and
/// `STROM_STATE_DIR` (default `./strom-state/<id>`).
///
/// ```no_run
/// use strom::{App, codec::{NoKey, Utf8}};
/// let mut app = App::new("shout");
/// let input = app.topic::<(), String>("lines").with_key_codec(NoKey).with_value_codec(Utf8);
/// let output = app.topic::<(), String>("shouted").with_key_codec(NoKey).with_value_codec(Utf8);
/// app.agent(&input)
///     .map(|line: String| line.to_uppercase())
///     .for_each(move |ctx, event| {
///         let output = output.clone();
///         async move { Ok(ctx.send(&output, &(), &event.value).await?) }
///     });
/// std::process::exit(if app.main() == std::process::ExitCode::SUCCESS { 0 } else { 1 });
/// ```
pub struct App {
    config: WorkerConfig,
    partitions: i32,
    topics: Vec<(String, Arc<Mutex<TopicSettings>>)>,
    /// (repartition topic, its source topic)
    repartitions: Vec<(String, String)>,
    tables: Vec<String>,
    processors: Vec<Arc<dyn Processor>>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("id", &self.config.app_id)
            .field(
                "topics",
                &self.topics.iter().map(|(t, _)| t).collect::<Vec<_>>(),
            )
            .field("tables", &self.tables)
            .finish()
    }
}

impl App {
    /// An app with id `id`: its consumer group and the prefix of its internal topics.
    pub fn new(id: &str) -> App {
        let brokers = std::env::var("STROM_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        let mut config = WorkerConfig::new(id, brokers.split(',').map(|b| b.trim().to_owned()));
        if let Ok(dir) = std::env::var("STROM_STATE_DIR") {
            config.state_dir = PathBuf::from(dir);
        }
        App {
            config,
            partitions: 8,
            topics: Vec::new(),
            repartitions: Vec::new(),
            tables: Vec::new(),
            processors: Vec::new(),
        }
    }

    /// The app id.
    pub fn id(&self) -> &str {
        &self.config.app_id
    }

    /// Bootstrap brokers (overrides `STROM_BROKERS`).
    pub fn with_brokers<S: Into<String>>(mut self, brokers: impl IntoIterator<Item = S>) -> Self {
        self.config.brokers = brokers.into_iter().map(Into::into).collect();
        self
    }

    /// Where tables keep their files (overrides `STROM_STATE_DIR`).
    pub fn with_state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.state_dir = dir.into();
        self
    }

    /// Table storage: redb (default) or memory.
    pub fn with_store(mut self, store: StoreKind) -> Self {
        self.config.store = store;
        self
    }

    /// Partitions of the topics the app creates. Default 8.
    pub fn with_partitions(mut self, partitions: i32) -> Self {
        self.partitions = partitions;
        self
    }

    /// Replication factor of the topics the app creates: declared topics
    /// without their own, repartition topics and changelogs. Default 1.
    pub fn with_replication(mut self, replication: i16) -> Self {
        self.config.replication = replication;
        self
    }

    /// The processing guarantee (at-least-once, the default and for now the
    /// only one).
    pub fn with_processing_guarantee(mut self, guarantee: ProcessingGuarantee) -> Self {
        self.config.guarantee = guarantee;
        self
    }

    /// How often processed offsets are committed. Default 1 s.
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.config.commit_interval = interval;
        self
    }

    /// Group session timeout and heartbeat interval (defaults 10 s and 3 s).
    pub fn with_session_timeout(mut self, session: Duration, heartbeat: Duration) -> Self {
        self.config.session_timeout = session;
        self.config.heartbeat_interval = heartbeat;
        self
    }

    /// Declares a topic of `K` keys and `V` values (JSON codecs by default);
    /// the app creates it at start when it is missing.
    pub fn topic<K, V>(&mut self, name: &str) -> Topic<K, V>
    where
        Json: Codec<K> + Codec<V>,
    {
        let settings = match self.topics.iter().find(|(t, _)| t == name) {
            Some((_, s)) => s.clone(),
            None => {
                let s = Arc::new(Mutex::new(TopicSettings::default()));
                self.topics.push((name.to_owned(), s.clone()));
                s
            }
        };
        Topic::json(name, settings)
    }

    /// Declares a table: `default()` is the value of a missing key.
    pub fn table<K: TableKey, V: Clone + Send + Sync + 'static>(
        &mut self,
        name: &str,
        default: V,
    ) -> Table<K, V> {
        if !self.tables.iter().any(|t| t == name) {
            self.tables.push(name.to_owned());
        }
        Table {
            name: Arc::from(name),
            default: Arc::new(move || default.clone()),
            types: PhantomData,
        }
    }

    /// Starts defining an agent over `topic`'s events.
    pub fn agent<K, V>(&mut self, topic: &Topic<K, V>) -> Stream<'_, K, V>
    where
        K: 'static,
        V: 'static,
    {
        Stream {
            source: topic.name.clone(),
            step: decode_step(topic.key.clone(), topic.value.clone()),
            app: self,
            concurrency: 1,
        }
    }

    pub(crate) fn declare_repartition(&mut self, topic: &str, source: &str) {
        self.repartitions
            .push((topic.to_owned(), source.to_owned()));
    }

    pub(crate) fn add_processor(&mut self, processor: Arc<dyn Processor>) {
        self.processors.push(processor);
    }

    /// Creates missing topics, then runs a worker until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        let client =
            Client::connect(ClientConfig::new(self.config.brokers.iter().cloned())).await?;
        let replication = self.config.replication;
        for (topic, settings) in &self.topics {
            let settings = settings.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let new = NewTopic {
                name: topic.clone(),
                partitions: settings.partitions.unwrap_or(self.partitions),
                replication_factor: settings.replication.unwrap_or(replication),
                configs: settings.configs,
            };
            ensure(&client, new, settings.partitions.is_some()).await?;
        }
        for (topic, source) in &self.repartitions {
            let partitions = client.topic_metadata(source).await?.partitions.len() as i32;
            ensure(&client, NewTopic::new(topic, partitions, replication), true).await?;
        }
        let mut worker = Worker::new(self.config);
        for t in self.tables {
            worker = worker.table(t);
        }
        for p in self.processors {
            worker = worker.processor(p);
        }
        Ok(worker.run(shutdown).await?)
    }

    /// The app's command line: `APP worker [--brokers B] [--state-dir D]
    /// [--web-port P] [--log-level L]`. Runs until SIGTERM or SIGINT, then stops
    /// cleanly; a second signal exits at once.
    pub fn main(mut self) -> ExitCode {
        let cli = Cli::parse();
        let Command::Worker {
            brokers,
            state_dir,
            web_port,
            log_level,
        } = cli.command;
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(log_level))
            .try_init();
        if let Some(b) = brokers {
            self.config.brokers = b.split(',').map(|b| b.trim().to_owned()).collect();
        }
        if let Some(d) = state_dir {
            self.config.state_dir = d;
        }
        if let Some(port) = web_port {
            warn!(
                port,
                "the web server is not built yet; --web-port is ignored"
            );
        }
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        match runtime.block_on(self.run(shutdown_signal())) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("worker failed: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

/// Creates `new` unless it exists; an existing topic with another partition
/// count than an explicitly declared one is reported (the worker refuses to
/// start where co-partitioning needs the counts to match).
async fn ensure(client: &Client, new: NewTopic, explicit_partitions: bool) -> Result<()> {
    let (topic, partitions) = (new.name.clone(), new.partitions);
    match client.create_topic(new).await {
        Ok(()) => {
            info!(%topic, partitions, "created topic");
            Ok(())
        }
        Err(strom_client::Error::TopicAlreadyExists { .. }) => {
            let found = client.topic_metadata(&topic).await?.partitions.len() as i32;
            if explicit_partitions && found != partitions {
                warn!(%topic, declared = partitions, found, "topic exists with another partition count than declared; using it as it is");
            }
            Ok(())
        }
        Err(e) => Err(Error::Client(e)),
    }
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

#[derive(Parser)]
#[command(about = "A Strom stream-processing app")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a worker of the app.
    Worker {
        /// Bootstrap brokers, `host:port[,host:port…]` (default: STROM_BROKERS).
        #[arg(long)]
        brokers: Option<String>,
        /// Where tables keep their files (default: STROM_STATE_DIR).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Port of the web server (not built yet).
        #[arg(long)]
        web_port: Option<u16>,
        /// Log filter, e.g. `info` or `strom=debug`.
        #[arg(long, default_value = "info")]
        log_level: String,
    },
}
