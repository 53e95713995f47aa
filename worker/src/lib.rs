//! `strom-worker`: the runtime that runs an app's agents against Kafka.
//!
//! # Layout
//!
//! - [`config`]: [`WorkerConfig`], [`StoreKind`], [`ProcessingGuarantee`].
//! - [`assignor`]: [`CopartitionedAssignor`] — partition number `p` of every
//!   source topic goes to one worker, with the tables of `p`; sticky.
//! - [`processor`]: the [`Processor`] contract agents compile down to, and the
//!   [`Context`] they see (tables, sends).
//! - `task`: one task per partition number — restore its tables, process its
//!   events in order, answer checkpoints and commit rounds ahead of its data.
//! - `manager`: the task manager — starts, routes to, commits and closes the
//!   tasks; derives readiness from their states.
//! - `eos`: exactly-once — the worker's transactional producer.
//! - `listener`, `standby`, `policy`: rebalance callbacks, standby replicas,
//!   error policies.
//! - [`timer`], [`web`], [`metrics`]: timers, the web server, `/metrics`.
//! - [`Worker`]: joins the group, runs the poll loop, the committer and the
//!   timers until shutdown.
//!
//! ```text
//!  GroupConsumer ──poll──► route by partition number ──► task p (tables of p,
//!       │ listener                                         events in order)
//!       ├─ assigned: start task p (restores its tables)        ▲ control first
//!       ├─ revoked: last commit → close task p                 │
//!       └─ lost: drop task p (nothing committed)               │
//!  committer, every commit interval: checkpoint / commit round ─┘ → commit
//! ```
//!
//! # Guarantees
//!
//! At least once (the default): an offset is committed only after everything
//! that processing the events before it caused — records sent, changelog
//! records of table writes — is acknowledged by the broker, and the tables
//! have stored it. A crash replays the events after the last commit; nothing
//! is lost.
//!
//! Exactly once: the outputs, changelog records and input offsets of a commit
//! interval commit in one Kafka transaction; a table applies its writes to its
//! store only after their transaction commits, so a store never holds an
//! aborted write and recovery (read-committed) replays exactly the committed
//! ones. See `eos` for fencing.
#![warn(missing_docs, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod assignor;
mod budget;
pub mod config;
mod eos;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod global;
mod listener;
mod manager;
pub mod metrics;
mod pattern;
mod policy;
pub mod processor;
mod standby;
mod task;
#[cfg(test)]
mod tests;
pub mod timer;
mod unfetched;
pub mod web;
pub mod windowed;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::consumer::{AutoOffsetReset, TopicPartition};
use strom_client::group::{GroupConfig, GroupConsumer, GroupHandle};
use strom_client::producer::{Producer, ProducerConfig};
use strom_client::Client;
use strom_state::changelog;
use strom_state::window::Windowing;
use tokio::sync::Notify;
use tracing::{info, warn};

pub use assignor::{CopartitionedAssignor, MemberPlacement, Placement};
pub use axum;
pub use config::{ProcessingGuarantee, StoreKind, WorkerConfig};
pub use error::WorkerError;
pub use metrics::Metrics;
pub use pattern::TopicPattern;
pub use processor::{AgentError, Context, DecodeError, ErrorPolicy, ProcessFuture, Processor};
pub use timer::{Schedule, Timer, TimerContext};
use web::TableRoute;
pub use web::{KeyParser, ParsedKey};
pub use windowed::{ClosedWindow, Emitting, Window, WindowUpdate};

use eos::Transactions;
use global::{GlobalSpec, GlobalTables};
use listener::Listener;
use manager::TaskManager;
use policy::Undecodable;
use task::{Spec, TableSpec};

/// A worker: the agents (processors) and tables of one app, run as a member
/// of the app's consumer group.
///
/// ```no_run
/// # async fn f(counter: std::sync::Arc<dyn strom_worker::Processor>) -> Result<(), strom_worker::WorkerError> {
/// use strom_worker::{Worker, WorkerConfig};
/// let worker = Worker::new(WorkerConfig::new("wordcount", ["127.0.0.1:9092"]))
///     .table("word-counts")
///     .processor(counter);
/// worker.run(async { tokio::signal::ctrl_c().await.ok(); }).await
/// # }
/// ```
pub struct Worker {
    config: WorkerConfig,
    processors: Vec<Arc<dyn Processor>>,
    /// Each table with its windows, if it is windowed.
    tables: Vec<(String, Option<Windowing>)>,
    globals: Vec<GlobalSpec>,
    patterns: Vec<TopicPattern>,
    keys: HashMap<String, KeyParser>,
    pages: Vec<axum::Router>,
    timers: Vec<Timer>,
    assignor: CopartitionedAssignor,
    metrics: Metrics,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("app_id", &self.config.app_id)
            .field(
                "topics",
                &self
                    .processors
                    .iter()
                    .map(|p| p.topic().to_owned())
                    .collect::<Vec<_>>(),
            )
            .field("tables", &self.tables)
            .finish()
    }
}

impl Worker {
    /// A worker with no agents yet.
    pub fn new(config: WorkerConfig) -> Self {
        Worker {
            assignor: CopartitionedAssignor::new(
                config.advertised_url.clone(),
                config.standby_replicas,
            ),
            config,
            processors: Vec::new(),
            tables: Vec::new(),
            globals: Vec::new(),
            patterns: Vec::new(),
            keys: HashMap::new(),
            pages: Vec::new(),
            timers: Vec::new(),
            metrics: Metrics::default(),
        }
    }

    /// The worker's metrics (served at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Adds a timer (see [`timer`]).
    pub fn timer(mut self, timer: Timer) -> Self {
        self.timers.push(timer);
        self
    }

    /// Adds the app's own web routes (Faust's `@app.page`).
    ///
    /// ```
    /// use strom_worker::axum::{routing::get, Router};
    /// use strom_worker::{Worker, WorkerConfig};
    /// let worker = Worker::new(WorkerConfig::new("shop", ["127.0.0.1:9092"]))
    ///     .page(Router::new().route("/hello", get(|| async { "hello" })));
    /// # let _ = worker;
    /// ```
    pub fn page(mut self, routes: axum::Router) -> Self {
        self.pages.push(routes);
        self
    }

    /// Where the group's partition numbers live, updated after each rebalance
    /// once the worker runs.
    pub fn placement(&self) -> tokio::sync::watch::Receiver<Placement> {
        self.assignor.placement()
    }

    /// Adds an agent.
    pub fn processor(mut self, processor: Arc<dyn Processor>) -> Self {
        self.processors.push(processor);
        self
    }

    /// Declares a table (co-partitioned with the source topics); on the web,
    /// its keys are the UTF-8 text of the URL.
    pub fn table(self, name: impl Into<String>) -> Self {
        self.table_with_key(
            name,
            Arc::new(|s: &str| Ok(ParsedKey::raw(s.as_bytes().to_vec()))),
        )
    }

    /// Declares a table whose keys the web server parses with `key`.
    pub fn table_with_key(mut self, name: impl Into<String>, key: KeyParser) -> Self {
        let name = name.into();
        self.keys.insert(name.clone(), key);
        self.tables.push((name, None));
        self
    }

    /// Declares a windowed table (see [`Context::update_windows`]): its
    /// changelog deletes what is older than its retention as well as
    /// compacting, and the web answers a key's live windows.
    pub fn windowed_table(
        mut self,
        name: impl Into<String>,
        key: KeyParser,
        windowing: Windowing,
    ) -> Self {
        let name = name.into();
        self.keys.insert(name.clone(), key);
        self.tables.push((name, Some(windowing)));
        self
    }

    /// Declares a global table `name` fed by `topic` (see `global`): every
    /// worker holds all of it, restored before the worker joins its group;
    /// agents read it with [`Context::global`], and the web answers its keys
    /// on every worker, without redirects. Its keys are the bytes the
    /// topic's records carry; the web reads them from a URL with `key`
    /// ([`ParsedKey::written`]).
    pub fn global_table(
        mut self,
        name: impl Into<String>,
        topic: impl Into<String>,
        key: KeyParser,
    ) -> Self {
        let name = name.into();
        self.keys.insert(name.clone(), key);
        self.globals.push(GlobalSpec {
            name,
            topic: topic.into(),
        });
        self
    }

    /// Makes the agents whose topic is `pattern`'s text read every topic
    /// that matches it when the worker starts (see [`TopicPattern`]).
    pub fn topic_pattern(mut self, pattern: TopicPattern) -> Self {
        self.patterns.retain(|p| p.as_str() != pattern.as_str());
        self.patterns.push(pattern);
        self
    }

    /// Runs until `shutdown` completes, then stops cleanly: stops fetching,
    /// finishes queued events, commits, closes stores, leaves the group.
    /// Returns the error that stopped it early, if one did (a fatal client
    /// error, an agent under the stop policy, a framework call that failed
    /// for good); nothing of the event that met it is committed.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let Worker {
            config,
            processors,
            tables: table_names,
            globals,
            patterns,
            keys,
            pages,
            timers,
            assignor,
            metrics,
        } = self;
        distinct_table_names(&table_names, &globals)?;
        let client = Client::connect(config.client.clone()).await?;
        let by_source =
            pattern::resolve(&client, &sources(&processors)?, &patterns, &config.app_id).await?;
        let sources: Vec<String> = (by_source.values().flatten().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let counts = source_counts(&client, &sources).await?;
        let partitions = counts.values().copied().max().unwrap_or(0);
        let tables = ensure_topics(&client, &config, &processors, &table_names, partitions).await?;
        let shares = budget::Shares::new(
            &config,
            tables.len() * partitions + globals.len(),
            partitions,
        );
        metrics.memory_limits(&shares);
        let mut config = config;
        config.max_buffered_bytes = shares.fetched_per_partition;
        let instance = instance_id(&config)?;
        let txn = match config.guarantee {
            ProcessingGuarantee::ExactlyOnce => Some(Arc::new(
                Transactions::start(client.clone(), &config, &instance).await?,
            )),
            _ => None,
        };
        let mut spec = spec(
            &config,
            client.clone(),
            processors,
            tables,
            Subscription { by_source, counts },
            txn.as_deref(),
            metrics.clone(),
        )?;
        spec.store_cache = shares.store_cache;
        let spec = Arc::new(spec);
        let manager = Arc::new(TaskManager::new(
            spec.clone(),
            config.max_buffered_bytes,
            txn.clone(),
        ));
        let web = match config.web {
            Some(addr) => Some(
                web::serve(
                    addr,
                    &config,
                    &assignor,
                    manager.clone(),
                    metrics.clone(),
                    routes(keys, &globals),
                    pages,
                )
                .await?,
            ),
            None => None,
        };
        tokio::pin!(shutdown);
        if !globals.is_empty() {
            let restored = tokio::select! {
                restored = GlobalTables::restore(&spec, &globals) => Some(restored),
                _ = &mut shutdown => None,
            };
            let restored = match restored {
                Some(Ok(restored)) => restored,
                stopped => {
                    stop_web(web).await;
                    info!(app = %config.app_id, "stopped while restoring global tables");
                    return stopped.map_or(Ok(()), |r| r.map(drop));
                }
            };
            let _ = spec.globals.set(Arc::new(restored));
        }
        let mut consumer = GroupConsumer::new(
            client.clone(),
            group_config(&config, &instance, &assignor, &spec),
            &sources.iter().map(String::as_str).collect::<Vec<_>>(),
            Arc::new(Listener(manager.clone())),
        )?;
        info!(
            app = %config.app_id, topics = ?sources, partitions, guarantee = %config.guarantee,
            "worker started"
        );
        let placement = assignor.placement();
        let timers = start_timers(timers, txn.as_ref(), &spec, &placement, config.wall_clock);
        let watcher = (!patterns.is_empty()).then(|| {
            let (group, app_id) = (consumer.group().clone(), config.app_id.clone());
            let every = Duration::from_secs(30);
            tokio::spawn(pattern::watch(spec.clone(), group, patterns, app_id, every))
        });
        let committer = Committer::start(
            manager.clone(),
            consumer.group().clone(),
            placement.clone(),
            config.commit_interval,
        );

        let outcome = poll_loop(&manager, &mut consumer, placement, txn.is_some(), shutdown).await;
        if outcome.is_err() {
            metrics.failed();
        }
        info!(app = %config.app_id, "worker stopping");
        committer.stop().await;
        for t in timers.into_iter().chain(watcher) {
            t.abort();
        }
        // Leaving the group revokes every partition: a last commit, then the
        // tasks close their tables (see Listener::on_revoked).
        let left = consumer.close().await;
        manager.stop_standbys().await;
        if let Some(globals) = spec.globals.get() {
            globals.stop().await;
        }
        stop_web(web).await;
        outcome?;
        left?;
        match spec.take_fatal() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// How the web answers the keys of each table.
fn routes(keys: HashMap<String, KeyParser>, globals: &[GlobalSpec]) -> HashMap<String, TableRoute> {
    keys.into_iter()
        .map(|(name, parse)| {
            let global = globals.iter().any(|g| g.name == name);
            (name, TableRoute { parse, global })
        })
        .collect()
}

/// Stops the web server and waits until its port is free again (so a
/// worker started next in this process can listen on it).
async fn stop_web(web: Option<tokio::task::JoinHandle<()>>) {
    if let Some(web) = web {
        web.abort();
        let _ = web.await;
    }
}

/// Tables share the web's routes, metrics and state directory by name: one
/// name, one table.
fn distinct_table_names(
    tables: &[(String, Option<Windowing>)],
    globals: &[GlobalSpec],
) -> Result<(), WorkerError> {
    let mut seen = BTreeSet::new();
    let names = tables
        .iter()
        .map(|(n, _)| n)
        .chain(globals.iter().map(|g| &g.name));
    for name in names {
        if !seen.insert(name) {
            return Err(WorkerError::Config(format!(
                "two tables are named {name:?} (a table and a global table, or two of either): give each its own name"
            )));
        }
    }
    Ok(())
}

/// The topics the agents read, sorted, once each.
fn sources(processors: &[Arc<dyn Processor>]) -> Result<Vec<String>, WorkerError> {
    let sources: Vec<String> = processors
        .iter()
        .map(|p| p.topic().to_owned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if sources.is_empty() {
        return Err(WorkerError::Config("the app has no agents".into()));
    }
    Ok(sources)
}

/// The dead-letter topics of every error policy in use.
fn dead_letter_topics<'a>(
    processors: &'a [Arc<dyn Processor>],
    config: &'a WorkerConfig,
) -> BTreeSet<&'a str> {
    processors
        .iter()
        .filter_map(|p| p.error_policy())
        .chain([&config.on_error])
        .filter_map(|policy| match policy {
            ErrorPolicy::DeadLetter(topic) => Some(topic.as_str()),
            _ => None,
        })
        .collect()
}

/// Starts the app's timers, cron ones reading `clock`; under exactly-once
/// their sends join the worker's transactions.
fn start_timers(
    timers: Vec<Timer>,
    txn: Option<&Arc<Transactions>>,
    spec: &Spec,
    placement: &tokio::sync::watch::Receiver<Placement>,
    clock: timer::WallClock,
) -> Vec<tokio::task::JoinHandle<()>> {
    timers
        .into_iter()
        .map(|t| {
            let sender = match txn {
                Some(txn) => timer::Sender::Transactional(txn.clone()),
                None => timer::Sender::Plain(spec.producer.clone()),
            };
            timer::spawn(t, sender, placement.clone(), clock)
        })
        .collect()
}

/// What the partition tasks need to know about the app.
fn spec(
    config: &WorkerConfig,
    client: Client,
    processors: Vec<Arc<dyn Processor>>,
    tables: Vec<TableSpec>,
    subscription: Subscription,
    txn: Option<&Transactions>,
    metrics: Metrics,
) -> Result<Spec, WorkerError> {
    let Subscription { by_source, counts } = subscription;
    let partitions = counts.values().copied().max().unwrap_or(0);
    let producer = match txn {
        Some(t) => t.producer().clone(),
        None => Producer::new(
            client.clone(),
            ProducerConfig {
                compression: config.compression,
                linger: config.linger,
                buffer_memory: budget::Shares::producer(config),
                ..ProducerConfig::default()
            },
        )?,
    };
    let mut by_topic: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, p) in processors.iter().enumerate() {
        for topic in by_source.get(p.topic()).into_iter().flatten() {
            by_topic.entry(topic.clone()).or_default().push(i);
        }
    }
    Ok(Spec {
        client,
        producer,
        by_topic: std::sync::RwLock::new(by_topic),
        processors,
        tables,
        state_dir: config.state_dir.clone(),
        store: config.store,
        // Set by the caller, which knows the global tables too.
        store_cache: budget::MIN_STORE_CACHE,
        guarantee: config.guarantee,
        partitions,
        counts: std::sync::RwLock::new(counts),
        time_ordered: config.time_ordered,
        time_order_wait: config.time_order_wait,
        unfetched: Default::default(),
        metrics,
        on_error: config.on_error.clone(),
        durable_interval: config.durable_checkpoint_interval,
        durable_changes: config.durable_checkpoint_changes,
        round_gate: txn.map(|t| t.gate().clone()),
        globals: std::sync::OnceLock::new(),
        fatal: Mutex::new(None),
        stopped: Notify::new(),
    })
}

/// Creates the changelog topics (returned with their tables) and the
/// dead-letter topics the app needs, with the sources' partition count.
async fn ensure_topics(
    client: &Client,
    config: &WorkerConfig,
    processors: &[Arc<dyn Processor>],
    tables: &[(String, Option<Windowing>)],
    partitions: usize,
) -> Result<Vec<TableSpec>, WorkerError> {
    let mut changelogs = Vec::new();
    for (table, windowing) in tables {
        let topic = changelog::topic_name(&config.app_id, table);
        let retention = windowing.as_ref().map(Windowing::retention);
        changelog::ensure_topic(client, &topic, partitions, config.replication, retention).await?;
        changelogs.push(TableSpec {
            name: table.clone(),
            changelog: topic,
            windowing: *windowing,
        });
    }
    for topic in dead_letter_topics(processors, config) {
        let new = strom_client::NewTopic::new(topic, partitions as i32, config.replication);
        client.ensure_topic(new).await?;
    }
    Ok(changelogs)
}

/// The worker's group membership: the app's group, static as `instance`
/// (leaving on a clean shutdown) unless turned off, the co-partitioning
/// assignor, new partitions read from the start, read-ahead bounded like the
/// tasks' queues, read-committed under exactly-once.
fn group_config(
    config: &WorkerConfig,
    instance: &str,
    assignor: &CopartitionedAssignor,
    spec: &Spec,
) -> GroupConfig {
    let mut group = GroupConfig::new(config.app_id.clone());
    if config.static_membership {
        group.group_instance_id = Some(instance.to_owned());
        group.leave_on_close = true;
    }
    group.session_timeout = config.session_timeout;
    group.heartbeat_interval = config.heartbeat_interval;
    group.rebalance_timeout = config.rebalance_timeout;
    group.assignors = vec![Arc::new(assignor.clone())];
    group.consumer.auto_offset_reset = AutoOffsetReset::Earliest;
    // Fetched bytes not yet handed to the tasks are bounded as tightly as
    // the tasks' queues: the consumer hands out what it buffered even for a
    // partition the worker paused, so a larger read-ahead (the client's
    // 64 MiB) would pass the tasks' bound by that much.
    group.consumer.max_buffered_bytes = config.max_buffered_bytes;
    // One Fetch response is within that bound too: the client's 50 MiB
    // would let a catching-up worker hold a response many times its share
    // (a broker still returns a first batch larger than this, as Kafka does).
    group.consumer.fetch_max_bytes = i32::try_from(config.max_buffered_bytes)
        .unwrap_or(i32::MAX)
        .min(group.consumer.fetch_max_bytes);
    // One poll goes to one partition's queue: within its bound too (plus
    // the record that reaches it), however large the records.
    group.consumer.max_poll_bytes = config.max_buffered_bytes;
    group.consumer.isolation = spec.isolation();
    group
}

/// The topics the worker reads: what each name agents read stands for (a
/// pattern's matches), and each topic's partition count.
struct Subscription {
    by_source: std::collections::BTreeMap<String, Vec<String>>,
    counts: HashMap<String, usize>,
}

/// Each source topic's partition count. Topics may differ: a task processes
/// one partition number of every topic that has it, and the tables have the
/// largest count (see [`Spec::partitions`](task::Spec)); the streams layer
/// demands equal counts where a join needs them.
async fn source_counts(
    client: &Client,
    sources: &[String],
) -> Result<HashMap<String, usize>, WorkerError> {
    let mut counts = HashMap::new();
    for topic in sources {
        let n = client.topic_metadata(topic).await?.partitions.len();
        counts.insert(topic.clone(), n);
    }
    Ok(counts)
}

/// This worker's stable identity: the configured one, or the one kept in
/// `<state_dir>/worker.id` (made on the first start).
fn instance_id(config: &WorkerConfig) -> Result<String, WorkerError> {
    if let Some(id) = &config.instance_id {
        return Ok(id.clone());
    }
    let path = config.state_dir.join("worker.id");
    let io = |e: std::io::Error| {
        WorkerError::Config(format!("worker identity file {}: {e}", path.display()))
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(&config.state_dir).map_err(io)?;
    let id = format!("w{:016x}", random_u64());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &id).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    info!(instance_id = %id, path = %path.display(), "made this worker's identity");
    Ok(id)
}

/// 64 random bits without a random-number crate: std's hasher keys are
/// random per process, and the time tells two ids of one process apart.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(now);
    h.finish()
}

/// The poll loop: fetched records to their tasks, backpressure, rewinds after
/// aborted transactions, lag. Ends on `shutdown` or an error that stops the
/// worker.
async fn poll_loop(
    manager: &Arc<TaskManager>,
    consumer: &mut GroupConsumer,
    mut placement: tokio::sync::watch::Receiver<Placement>,
    exactly_once: bool,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkerError> {
    let spec = &manager.spec;
    let (rewind_tx, mut rewinds) = tokio::sync::mpsc::unbounded_channel();
    if exactly_once {
        manager.set_rewinds(Some(rewind_tx));
    }
    tokio::pin!(shutdown);
    let mut lag = tokio::time::interval(Duration::from_secs(1));
    lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut paused = BTreeSet::new();
    let mut failing_since: Option<std::time::Instant> = None;
    // Per partition: the batch that did not decode, and how often in a row.
    let mut corrupt: HashMap<(String, i32), (i64, u32)> = HashMap::new();
    let mut metadata = spec.client.metadata_changes();
    let outcome = loop {
        let stopped = spec.stopped.notified();
        tokio::pin!(stopped);
        stopped.as_mut().enable();
        if spec.fatal_message().is_some() {
            break Ok(());
        }
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = &mut stopped => {}
            Some(rewind) = rewinds.recv() => manager.apply_rewind(rewind, consumer),
            _ = manager.drained.notified() => manager.resume(consumer, &mut paused),
            _ = lag.tick() => {
                measure_lag(&spec.metrics, consumer);
                spec.metrics.memory_held("producer", spec.producer.buffered_bytes());
                spec.metrics.memory_held("fetched", consumer.buffered_bytes() + manager.queued_bytes());
                if spec.time_ordered {
                    spec.unfetched.publish(consumer, spec.isolation());
                }
                if let Some(globals) = spec.globals.get() {
                    if let Err(e) = globals.check(spec).await {
                        break Err(e);
                    }
                }
            }
            Ok(()) = placement.changed() => {
                placement.borrow_and_update();
                spec.metrics.rebalanced();
            }
            Ok(()) = metadata.changed() => {
                if let Err(e) = check_source_partitions(spec) {
                    break Err(e);
                }
            }
            polled = consumer.poll() => match polled {
                Ok(records) => {
                    failing_since = None;
                    if let Some(r) = records.first() {
                        corrupt.remove(&(r.topic.to_string(), r.partition));
                    }
                    manager.route(records, consumer, &mut paused);
                    if spec.time_ordered {
                        spec.unfetched.publish(consumer, spec.isolation());
                    }
                }
                Err(e) if e.is_fatal() => break Err(e.into()),
                Err(strom_client::Error::CorruptRecord { topic: Some(topic), partition: Some(partition), offset, last_offset, what }) => {
                    spec.metrics.corrupt_batch(&topic, partition);
                    let seen = corrupt.entry((topic.clone(), partition)).or_insert((offset, 0));
                    if seen.0 != offset {
                        *seen = (offset, 0);
                    }
                    seen.1 += 1;
                    let attempts = seen.1;
                    if attempts < CORRUPT_BATCH_FETCHES {
                        warn!(%topic, partition, offset, %what, "a fetched batch does not decode; fetching it again");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                    corrupt.remove(&(topic.clone(), partition));
                    let Some(last) = last_offset else {
                        let what = format!("{what}; its header is damaged too, so it cannot be stepped over");
                        break Err(WorkerError::CorruptBatch { topic, partition, offset, attempts, what });
                    };
                    let tp = TopicPartition::new(&topic, partition);
                    let to = last.saturating_add(1).max(offset + 1);
                    manager.step_over(Undecodable { tp, from: offset, to, attempts, what }, consumer);
                }
                Err(e) => {
                    // Logged once per incident, then quietly retried.
                    if failing_since.is_none() {
                        warn!(error = %e, "polling failed; retrying");
                        failing_since = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    };
    manager.set_rewinds(None);
    outcome
}

/// Source topics that gained partitions while the worker runs: the group
/// reassigns and a stateless app reads the new partitions, but the keys of a
/// stateful app's tables would move away from their state (their changelogs
/// keep the old count), so it stops — as Kafka Streams does, this needs an
/// application reset.
fn check_source_partitions(spec: &Spec) -> Result<(), WorkerError> {
    let counts = spec
        .counts
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (topic, &before) in &counts {
        let Some(now) = spec.client.cached_topic(topic).map(|t| t.partitions.len()) else {
            continue;
        };
        if now == before {
            continue;
        }
        if spec.tables.is_empty() {
            info!(%topic, before, now, "source topic gained partitions; the group reassigns them");
            continue;
        }
        let tables: Vec<&str> = spec.tables.iter().map(|t| t.name.as_str()).collect();
        return Err(WorkerError::Config(format!(
            "source topic {topic:?} now has {now} partitions, not {before}: keys would move to \
             partitions whose tables {tables:?} do not hold their state. Adding partitions \
             to a stateful app's topics needs a reset: stop every worker, delete the app's \
             changelog topics and state directories, and start again"
        )));
    }
    Ok(())
}

/// How often in a row a batch is fetched and found not to decode before the
/// worker stops: a batch damaged in transit decodes when fetched again.
const CORRUPT_BATCH_FETCHES: u32 = 3;

/// Updates the lag of every partition being read.
fn measure_lag(metrics: &Metrics, consumer: &GroupConsumer) {
    for tp in consumer.group().assignment() {
        if let Some(position) = consumer.position(&tp) {
            let end = consumer.high_watermark(&tp);
            metrics.lag(&tp.topic, tp.partition, (end - position).max(0));
        }
    }
}

/// The committer: a commit every commit interval, off the poll loop, and the
/// standbys kept in line with the placement. Stopped between commits.
struct Committer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Committer {
    fn start(
        manager: Arc<TaskManager>,
        group: GroupHandle,
        placement: tokio::sync::watch::Receiver<Placement>,
        interval: Duration,
    ) -> Committer {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.changed() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = manager.commit(&group).await {
                    manager.spec.fail(e);
                    return;
                }
                let now = placement.borrow().clone();
                manager.reconcile_standbys(&now).await;
            }
        });
        Committer { stop, task }
    }

    /// Stops after the commit under way, if any.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// `http://<host>:<port>` for a server bound to `bound`: its own address, or
/// the machine's host name when it listens on every interface.
pub(crate) fn default_url(bound: SocketAddr) -> String {
    let host = if bound.ip().is_unspecified() {
        std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "127.0.0.1".to_owned())
    } else {
        bound.ip().to_string()
    };
    format!("http://{host}:{}", bound.port())
}
