//! `strom-worker`: the runtime that runs an app's agents against Kafka.
//!
//! # Layout
//!
//! - [`assignor`]: [`CopartitionedAssignor`] — partition number `p` of every
//!   source topic goes to one worker, with the tables of `p`; sticky.
//! - [`processor`]: the [`Processor`] contract agents compile down to, and the
//!   [`Context`] they see (tables, sends).
//! - `partition`: one task per partition number — recover its tables, process
//!   its events in order, checkpoint on request.
//! - [`Worker`]: joins the group, routes events to partition tasks, commits.
//!
//! ```text
//!  GroupConsumer ──poll──► route by partition number ──► partition task p
//!       │ listener                                         (tables of p,
//!       ├─ assigned: start task p (recovers tables)         events in order)
//!       └─ revoked: close task p → flush tables, await sends → commit
//!  every commit interval: checkpoint every task → commit
//! ```
//!
//! # Guarantee: at-least-once
//!
//! An offset is committed only after everything that processing the events
//! before it caused — records sent, changelog records of table writes — is
//! acknowledged by the broker, and the tables are flushed. A crash replays the
//! events after the last commit; nothing is lost.
#![warn(missing_docs, missing_debug_implementations)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod assignor;
mod error;
pub mod metrics;
mod partition;
mod policy;
pub mod processor;
pub mod timer;
pub mod web;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::consumer::{AutoOffsetReset, TopicPartition};
use strom_client::group::{
    GroupConfig, GroupConsumer, GroupHandle, ListenerFuture, RebalanceListener,
};
use strom_client::producer::{Producer, ProducerConfig};
use strom_client::{Client, ClientConfig};
use strom_state::{changelog, Standby};
use tokio::sync::{oneshot, Notify};
use tracing::{info, warn};

pub use assignor::{CopartitionedAssignor, MemberPlacement, Placement};
pub use axum;
pub use error::WorkerError;
pub use metrics::Metrics;
pub use processor::{AgentError, Context, DecodeError, ErrorPolicy, ProcessFuture, Processor};
pub use timer::{Schedule, Timer, TimerContext};
pub use web::KeyParser;

use partition::{Inbox, Msg, Offsets, Spec};

/// Where tables keep their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// One redb file per table partition under the state directory: a restart
    /// replays only the changelog records since the last flush.
    #[default]
    Redb,
    /// In memory: every start replays the whole changelog.
    Memory,
}

/// What a worker guarantees about events and their effects across crashes
/// and rebalances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProcessingGuarantee {
    /// Every event's effects (sends, table writes) are acknowledged before its
    /// offset is committed: after a crash, the events since the last commit
    /// are processed again, so an effect may happen twice but never not at all.
    /// The one commit path is `checkpoint` → `commit`; exactly-once will put
    /// that checkpoint in a transaction.
    #[default]
    AtLeastOnce,
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The app id: the consumer group, and the prefix of internal topics.
    pub app_id: String,
    /// Bootstrap brokers.
    pub brokers: Vec<String>,
    /// Where redb tables live. Default `./strom-state/<app-id>`.
    pub state_dir: PathBuf,
    /// Table storage. Default redb.
    pub store: StoreKind,
    /// What survives a crash. Default (and for now only) at-least-once.
    pub guarantee: ProcessingGuarantee,
    /// Standby replicas: how many other workers keep each partition's tables
    /// warm by tailing their changelogs, so a failover replays little. Default 0.
    pub standby_replicas: usize,
    /// Where the web server listens; `None` (the default) runs none. The app
    /// binary's `worker` command listens on `0.0.0.0:6066` (Faust's port)
    /// unless told otherwise.
    pub web: Option<SocketAddr>,
    /// The URL other workers and clients reach this worker's web server at,
    /// shared with the group in the assignment. Default
    /// `http://<hostname>:<port>` (or `127.0.0.1` when the server listens
    /// there).
    pub advertised_url: Option<String>,
    /// The error policy of agents without their own. Default skip.
    pub on_error: ErrorPolicy,
    /// Replication factor of the topics the app creates (changelogs,
    /// repartition topics, declared topics without their own). Default 1.
    pub replication: i16,
    /// How often processed offsets are committed. Default 1 s.
    pub commit_interval: Duration,
    /// Group session timeout. Default 10 s.
    pub session_timeout: Duration,
    /// Group heartbeat interval. Default 3 s.
    pub heartbeat_interval: Duration,
    /// Bytes of fetched records (keys, values, headers, plus 64 per record)
    /// waiting per partition number before its fetches pause; they resume
    /// when half of that is processed. Default 4 MiB.
    pub max_buffered_bytes: usize,
}

impl WorkerConfig {
    /// Defaults for app `app_id` on `brokers`.
    pub fn new<S: Into<String>>(
        app_id: impl Into<String>,
        brokers: impl IntoIterator<Item = S>,
    ) -> Self {
        let app_id = app_id.into();
        WorkerConfig {
            state_dir: PathBuf::from("strom-state").join(&app_id),
            app_id,
            brokers: brokers.into_iter().map(Into::into).collect(),
            store: StoreKind::Redb,
            replication: 1,
            standby_replicas: 0,
            web: None,
            advertised_url: None,
            on_error: ErrorPolicy::Skip,
            guarantee: ProcessingGuarantee::AtLeastOnce,
            commit_interval: Duration::from_secs(1),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            max_buffered_bytes: 4 * 1024 * 1024,
        }
    }
}

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
    tables: Vec<String>,
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
        self.table_with_key(name, Arc::new(|s: &str| Ok(s.as_bytes().to_vec())))
    }

    /// Declares a table whose keys the web server parses with `key`.
    pub fn table_with_key(mut self, name: impl Into<String>, key: KeyParser) -> Self {
        let name = name.into();
        self.keys.insert(name.clone(), key);
        self.tables.push(name);
        self
    }

    /// Runs until `shutdown` completes, then stops cleanly: finishes queued
    /// events, flushes tables, commits, leaves the group, closes stores.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
        let config = self.config;
        let client = Client::connect(ClientConfig::new(config.brokers.iter().cloned())).await?;
        let sources: Vec<String> = self
            .processors
            .iter()
            .map(|p| p.topic().to_owned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if sources.is_empty() {
            return Err(WorkerError::Config("the app has no agents".into()));
        }
        let mut partitions = None;
        for topic in &sources {
            let n = client.topic_metadata(topic).await?.partitions.len();
            match partitions {
                Some((first, m)) if m != n => {
                    return Err(WorkerError::Config(format!(
                        "topic {topic:?} has {n} partitions but {first:?} has {m}: co-partitioned topics need the same count"
                    )))
                }
                None => partitions = Some((topic.clone(), n)),
                _ => {}
            }
        }
        let partitions = partitions.map_or(0, |(_, n)| n);
        let mut tables = Vec::new();
        for table in &self.tables {
            let topic = changelog::topic_name(&config.app_id, table);
            changelog::ensure_topic(&client, &topic, partitions, config.replication).await?;
            tables.push((table.clone(), topic));
        }
        let dead_letters: BTreeSet<&str> = self
            .processors
            .iter()
            .filter_map(|p| p.error_policy())
            .chain([&config.on_error])
            .filter_map(|policy| match policy {
                ErrorPolicy::DeadLetter(topic) => Some(topic.as_str()),
                _ => None,
            })
            .collect();
        for topic in dead_letters {
            let new = strom_client::NewTopic::new(topic, partitions as i32, config.replication);
            client.ensure_topic(new).await?;
        }
        let producer = Producer::new(client.clone(), ProducerConfig::default())?;
        let spec = Arc::new(Spec {
            client: client.clone(),
            producer,
            by_topic: self.processors.iter().enumerate().fold(
                HashMap::new(),
                |mut by: HashMap<String, Vec<usize>>, (i, p)| {
                    by.entry(p.topic().to_owned()).or_default().push(i);
                    by
                },
            ),
            processors: self.processors.clone(),
            tables,
            state_dir: config.state_dir.clone(),
            store: config.store,
            partitions,
            fatal: Mutex::new(None),
            metrics: self.metrics.clone(),
            on_error: config.on_error.clone(),
        });
        let assignor = self.assignor;
        let mut placement = assignor.placement();
        let runtime = Arc::new(Runtime {
            spec,
            standbys: Mutex::new(HashMap::new()),
            max_buffered: config.max_buffered_bytes.max(1),
            drained: Arc::new(Notify::new()),
            tasks: Mutex::new(HashMap::new()),
            commits: tokio::sync::Mutex::new(()),
        });

        let web = match config.web {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                    WorkerError::Config(format!("cannot listen for the web server on {addr}: {e}"))
                })?;
                let bound = listener
                    .local_addr()
                    .map_err(|e| WorkerError::Config(format!("web server address unknown: {e}")))?;
                let url = config
                    .advertised_url
                    .clone()
                    .unwrap_or_else(|| default_url(bound));
                assignor.set_url(Some(url.clone()));
                let state = web::WebState {
                    runtime: runtime.clone(),
                    placement: assignor.placement(),
                    metrics: self.metrics.clone(),
                    tables: Arc::new(self.keys),
                };
                let app = web::router(state, self.pages);
                info!(%bound, %url, "web server listening");
                Some(tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        warn!(error = %e, "web server stopped");
                    }
                }))
            }
            None => None,
        };

        let mut group = GroupConfig::new(&config.app_id);
        group.assignors = vec![Arc::new(assignor)];
        group.session_timeout = config.session_timeout;
        group.heartbeat_interval = config.heartbeat_interval;
        group.rebalance_timeout = config.session_timeout * 3;
        group.consumer.auto_offset_reset = AutoOffsetReset::Earliest;
        let source_refs: Vec<&str> = sources.iter().map(String::as_str).collect();
        let mut consumer = GroupConsumer::new(
            client,
            group,
            &source_refs,
            Arc::new(Listener(runtime.clone())),
        )?;
        info!(app = %config.app_id, topics = ?sources, partitions, "worker started");
        let timers: Vec<_> = self
            .timers
            .into_iter()
            .map(|t| timer::spawn(t, runtime.spec.producer.clone(), placement.clone()))
            .collect();

        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut paused = BTreeSet::new();
        let outcome = loop {
            if let Some(e) = runtime.take_fatal() {
                break Err(e);
            }
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = runtime.drained.notified() => runtime.resume(&mut consumer, &mut paused),
                _ = tick.tick() => {
                    if let Err(e) = runtime.commit_all(consumer.group()).await {
                        break Err(e);
                    }
                    let now = placement.borrow().clone();
                    runtime.reconcile_standbys(&now).await;
                    runtime.measure_lag(&consumer);
                }
                Ok(()) = placement.changed() => {
                    self.metrics.rebalanced();
                    let now = placement.borrow_and_update().clone();
                    runtime.reconcile_standbys(&now).await;
                }
                polled = consumer.poll() => match polled {
                    Ok(records) => runtime.route(records, &mut consumer, &mut paused),
                    Err(e @ (strom_client::Error::ProducerFenced { .. } | strom_client::Error::Config(_))) => break Err(e.into()),
                    Err(e) => {
                        warn!(error = %e, "poll failed; going on");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        };
        info!(app = %config.app_id, "worker stopping");
        for t in timers {
            t.abort();
        }
        // Leaving the group revokes every partition: tasks close, tables flush,
        // offsets commit (see Listener::on_revoked).
        let left = consumer.close().await;
        runtime.reconcile_standbys(&Placement::default()).await;
        if let Some(web) = web {
            web.abort();
        }
        outcome?;
        left?;
        match runtime.take_fatal() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct Task {
    inbox: Inbox,
    join: tokio::task::JoinHandle<()>,
}

/// The worker's shared state: the partition tasks, started and stopped by the
/// group listener, fed by the poll loop.
struct Runtime {
    spec: Arc<Spec>,
    /// Bytes of records waiting per partition number before its fetches pause.
    max_buffered: usize,
    /// Notified when a partition task's queue drains below half the bound.
    drained: Arc<Notify>,
    tasks: Mutex<HashMap<i32, Task>>,
    /// Warm tables of partition numbers other workers process, by table name.
    standbys: Mutex<HashMap<i32, Vec<(String, Standby)>>>,
    /// One commit at a time.
    commits: tokio::sync::Mutex<()>,
}

impl Runtime {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Task>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partition numbers assigned here whose tables are still recovering.
    fn recovering(&self) -> Vec<i32> {
        let mut numbers: Vec<i32> = self
            .tasks()
            .iter()
            .filter(|(_, t)| t.inbox.ready().is_none())
            .map(|(n, _)| *n)
            .collect();
        numbers.sort_unstable();
        numbers
    }

    /// The context of partition number `n`, once it is recovered.
    fn context(&self, n: i32) -> Option<Context> {
        self.tasks().get(&n).and_then(|t| t.inbox.ready().cloned())
    }

    /// Updates the lag of every partition being read.
    fn measure_lag(&self, consumer: &GroupConsumer) {
        for tp in consumer.group().assignment() {
            if let Some(position) = consumer.position(&tp) {
                let end = consumer.high_watermark(&tp);
                self.spec
                    .metrics
                    .lag(&tp.topic, tp.partition, (end - position).max(0));
            }
        }
    }

    fn take_fatal(&self) -> Option<WorkerError> {
        self.spec.take_fatal()
    }

    fn set_fatal(&self, e: WorkerError) {
        self.spec.fail(e);
    }

    /// Hands fetched records to their partition's task, and pauses fetching
    /// that partition while too many wait (backpressure; heartbeats and the
    /// other partitions go on). Records of a partition without a task (being
    /// revoked) are dropped: they come after the offset its revocation
    /// committed, so the next owner processes them.
    fn route(
        &self,
        records: Vec<strom_client::ConsumerRecord>,
        consumer: &mut GroupConsumer,
        paused: &mut BTreeSet<TopicPartition>,
    ) {
        let Some(first) = records.first() else { return };
        let tp = TopicPartition::new(&first.topic, first.partition);
        let queued = match self.tasks().get(&tp.partition) {
            Some(task) => task.inbox.records(records),
            None => {
                tracing::debug!(
                    partition = tp.partition,
                    "records of a partition no longer owned dropped"
                );
                return;
            }
        };
        if queued > self.max_buffered && consumer.pause(&tp).is_ok() {
            tracing::debug!(topic = %tp.topic, partition = tp.partition, queued, "fetching paused");
            paused.insert(tp);
        }
    }

    /// Starts standbys for the numbers the placement gives this worker to keep
    /// warm, and stops those it no longer does (a number this worker now
    /// processes has had its standby taken over by its partition task).
    async fn reconcile_standbys(&self, placement: &Placement) {
        let (wanted, active_soon): (BTreeSet<i32>, BTreeSet<i32>) = placement
            .mine()
            .map(|m| {
                (
                    m.standby.iter().copied().collect(),
                    m.active.iter().copied().collect(),
                )
            })
            .unwrap_or_default();
        let stale: Vec<(i32, Vec<(String, Standby)>)> = {
            let mut standbys = self.standbys();
            // A number about to be processed here keeps its standby for the
            // partition task to take over.
            let stale: Vec<i32> = standbys
                .keys()
                .filter(|n| !wanted.contains(n) && !active_soon.contains(n))
                .copied()
                .collect();
            stale
                .into_iter()
                .filter_map(|n| standbys.remove(&n).map(|s| (n, s)))
                .collect()
        };
        for (n, tables) in stale {
            for (table, standby) in tables {
                if let Err(e) = standby.stop().await {
                    warn!(partition = n, %table, error = %e, "standby stopped with an error");
                }
            }
            info!(partition = n, "standby stopped");
        }
        // Both locks, tasks first as the listener takes them: a partition task
        // cannot start for a number while its standby is being started.
        let tasks = self.tasks();
        let mut standbys = self.standbys();
        for &n in wanted.iter().filter(|n| !tasks.contains_key(n)) {
            for (table, changelog) in &self.spec.tables {
                let warm = standbys.entry(n).or_default();
                if warm.iter().any(|(t, _)| t == table) {
                    continue;
                }
                match partition::open_store(&self.spec, table, n) {
                    Ok(store) => {
                        info!(partition = n, %table, "standby started");
                        let standby = Standby::start(&self.spec.client, store, changelog, n);
                        warm.push((table.clone(), standby));
                    }
                    // Still open by a task closing: the next tick tries again.
                    Err(e) => warn!(partition = n, %table, error = %e, "standby not started yet"),
                }
            }
        }
    }

    fn standbys(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Vec<(String, Standby)>>> {
        self.standbys.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resumes fetching the paused partitions whose tasks have caught up.
    fn resume(&self, consumer: &mut GroupConsumer, paused: &mut BTreeSet<TopicPartition>) {
        let low = self.max_buffered / 2;
        let tasks = self.tasks();
        paused.retain(|tp| {
            let caught_up = tasks
                .get(&tp.partition)
                .is_none_or(|t| t.inbox.queued() <= low);
            if caught_up {
                // A partition moved away meanwhile has no pause left to lift.
                let _ = consumer.resume(tp);
                tracing::debug!(topic = %tp.topic, partition = tp.partition, "fetching resumed");
            }
            !caught_up
        });
    }

    async fn request(&self, numbers: &[i32], close: bool) -> Result<Offsets, WorkerError> {
        let mut replies = Vec::new();
        let mut joins = Vec::new();
        {
            let mut tasks = self.tasks();
            for n in numbers {
                let task = if close { tasks.remove(n) } else { None };
                let Some(inbox) = task
                    .as_ref()
                    .map(|t| &t.inbox)
                    .or_else(|| tasks.get(n).map(|t| &t.inbox))
                else {
                    continue;
                };
                let (reply, rx) = oneshot::channel();
                let msg = if close {
                    Msg::Close(reply)
                } else {
                    Msg::Checkpoint(reply)
                };
                let sent = inbox.send(msg);
                replies.push((n, sent, rx));
                joins.extend(task.map(|t| t.join));
            }
        }
        let mut offsets = Vec::new();
        for (n, sent, rx) in replies {
            if !sent {
                warn!(partition = n, "partition task is gone; its events since the last commit will be processed again");
                continue;
            }
            match rx.await {
                Ok(Ok(o)) => offsets.extend(o),
                Ok(Err(e)) => return Err(e),
                Err(_) => warn!(
                    partition = n,
                    "partition task stopped before its checkpoint"
                ),
            }
        }
        for j in joins {
            let _ = j.await;
        }
        Ok(offsets)
    }

    /// Checkpoints every task and commits what they report.
    async fn commit_all(&self, group: &GroupHandle) -> Result<(), WorkerError> {
        let _one = self.commits.lock().await;
        let started = std::time::Instant::now();
        let numbers: Vec<i32> = self.tasks().keys().copied().collect();
        let offsets = self.request(&numbers, false).await?;
        if commit(group, offsets).await {
            self.spec.metrics.committed(started.elapsed());
        }
        Ok(())
    }
}

/// Commits what this member still owns; a refusal (the group moved on) only
/// means those events are processed again by their next owner.
async fn commit(group: &GroupHandle, offsets: Offsets) -> bool {
    let owned: BTreeSet<TopicPartition> = group.assignment().into_iter().collect();
    let offsets: Offsets = offsets
        .into_iter()
        .filter(|(tp, _)| owned.contains(tp))
        .collect();
    if offsets.is_empty() {
        return false;
    }
    match group.commit(&offsets).await {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "commit failed; the events since the last commit will be processed again");
            false
        }
    }
}

/// Drops the per-partition metrics of partitions this worker gave up.
fn forget(metrics: &Metrics, partitions: &[TopicPartition]) {
    for tp in partitions {
        metrics.forget_lag(&tp.topic, tp.partition);
    }
    for n in numbers(partitions) {
        metrics.forget_partition(n);
    }
}

/// `http://<host>:<port>` for a server bound to `bound`: its own address, or
/// the machine's host name when it listens on every interface.
fn default_url(bound: SocketAddr) -> String {
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

fn numbers(partitions: &[TopicPartition]) -> Vec<i32> {
    partitions
        .iter()
        .map(|tp| tp.partition)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Starts and stops partition tasks as the group assigns and revokes.
struct Listener(Arc<Runtime>);

impl RebalanceListener for Listener {
    fn on_assigned<'a>(
        &'a self,
        _group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        let runtime = &self.0;
        let mut tasks = runtime.tasks();
        for n in numbers(partitions) {
            tasks.entry(n).or_insert_with(|| {
                info!(partition = n, "partition assigned");
                let warm = runtime.standbys().remove(&n).unwrap_or_default();
                let (inbox, join) = partition::start(
                    runtime.spec.clone(),
                    n,
                    runtime.max_buffered / 2,
                    runtime.drained.clone(),
                    warm,
                );
                Task { inbox, join }
            });
        }
        Box::pin(async {})
    }

    fn on_revoked<'a>(
        &'a self,
        group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        Box::pin(async move {
            let runtime = &self.0;
            let _one = runtime.commits.lock().await;
            let numbers = numbers(partitions);
            forget(&runtime.spec.metrics, partitions);
            match runtime.request(&numbers, true).await {
                Ok(offsets) => {
                    commit(group, offsets).await;
                }
                Err(e) => runtime.set_fatal(e),
            }
            info!(partitions = ?numbers, "partitions revoked");
        })
    }

    fn on_lost<'a>(
        &'a self,
        _group: &'a GroupHandle,
        partitions: &'a [TopicPartition],
    ) -> ListenerFuture<'a> {
        let runtime = &self.0;
        let mut tasks = runtime.tasks();
        forget(&runtime.spec.metrics, partitions);
        for n in numbers(partitions) {
            if let Some(task) = tasks.remove(&n) {
                // Another member may own it already: stop without committing.
                task.join.abort();
                warn!(
                    partition = n,
                    "partition lost; its events since the last commit will be processed again"
                );
            }
        }
        Box::pin(async {})
    }
}
