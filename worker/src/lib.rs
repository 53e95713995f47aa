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
mod partition;
pub mod processor;

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::consumer::{AutoOffsetReset, TopicPartition};
use strom_client::group::{
    GroupConfig, GroupConsumer, GroupHandle, ListenerFuture, RebalanceListener,
};
use strom_client::producer::{Producer, ProducerConfig};
use strom_client::{Client, ClientConfig};
use strom_state::changelog;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

pub use assignor::CopartitionedAssignor;
pub use error::WorkerError;
pub use processor::{AgentError, Context, ProcessFuture, Processor};

use partition::{Msg, Offsets, Spec};

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
    /// How often processed offsets are committed. Default 1 s.
    pub commit_interval: Duration,
    /// Group session timeout. Default 10 s.
    pub session_timeout: Duration,
    /// Group heartbeat interval. Default 3 s.
    pub heartbeat_interval: Duration,
    /// Fetched batches queued per partition before fetching pauses. Default 16.
    pub queue: usize,
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
            commit_interval: Duration::from_secs(1),
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            queue: 16,
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
            config,
            processors: Vec::new(),
            tables: Vec::new(),
        }
    }

    /// Adds an agent.
    pub fn processor(mut self, processor: Arc<dyn Processor>) -> Self {
        self.processors.push(processor);
        self
    }

    /// Declares a table (co-partitioned with the source topics).
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.tables.push(name.into());
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
            changelog::ensure_topic(&client, &topic, partitions).await?;
            tables.push((table.clone(), topic));
        }
        let producer = Producer::new(client.clone(), ProducerConfig::default())?;
        let spec = Arc::new(Spec {
            client: client.clone(),
            producer,
            processors: self
                .processors
                .iter()
                .map(|p| (p.topic().to_owned(), p.clone()))
                .collect(),
            tables,
            state_dir: config.state_dir.clone(),
            store: config.store,
            partitions,
            fatal: Mutex::new(None),
        });
        let runtime = Arc::new(Runtime {
            spec,
            queue: config.queue,
            tasks: Mutex::new(HashMap::new()),
            commits: tokio::sync::Mutex::new(()),
        });

        let mut group = GroupConfig::new(&config.app_id);
        group.assignors = vec![Arc::new(CopartitionedAssignor)];
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

        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(config.commit_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            if let Some(e) = runtime.take_fatal() {
                break Err(e);
            }
            tokio::select! {
                _ = &mut shutdown => break Ok(()),
                _ = tick.tick() => {
                    if let Err(e) = runtime.commit_all(consumer.group()).await {
                        break Err(e);
                    }
                }
                polled = consumer.poll() => match polled {
                    Ok(records) => runtime.route(records).await,
                    Err(e @ (strom_client::Error::ProducerFenced { .. } | strom_client::Error::Config(_))) => break Err(e.into()),
                    Err(e) => {
                        warn!(error = %e, "poll failed; going on");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        };
        info!(app = %config.app_id, "worker stopping");
        // Leaving the group revokes every partition: tasks close, tables flush,
        // offsets commit (see Listener::on_revoked).
        let left = consumer.close().await;
        outcome?;
        left?;
        match runtime.take_fatal() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

struct Task {
    tx: mpsc::Sender<Msg>,
    join: tokio::task::JoinHandle<()>,
}

/// The worker's shared state: the partition tasks, started and stopped by the
/// group listener, fed by the poll loop.
struct Runtime {
    spec: Arc<Spec>,
    queue: usize,
    tasks: Mutex<HashMap<i32, Task>>,
    /// One commit at a time.
    commits: tokio::sync::Mutex<()>,
}

impl Runtime {
    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Task>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_fatal(&self) -> Option<WorkerError> {
        self.spec.take_fatal()
    }

    fn set_fatal(&self, e: WorkerError) {
        self.spec.fail(e);
    }

    /// Hands fetched records to their partition's task. Records of a partition
    /// without a task (being revoked) are dropped: they come after the offset
    /// its revocation committed, so the next owner processes them.
    async fn route(&self, records: Vec<strom_client::ConsumerRecord>) {
        let Some(first) = records.first() else { return };
        let number = first.partition;
        let tx = self.tasks().get(&number).map(|t| t.tx.clone());
        match tx {
            Some(tx) => {
                // A full queue waits here: fetching pauses, heartbeats go on.
                let _ = tx.send(Msg::Records(records)).await;
            }
            None => tracing::debug!(
                partition = number,
                "records of a partition no longer owned dropped"
            ),
        }
    }

    async fn request(&self, numbers: &[i32], close: bool) -> Result<Offsets, WorkerError> {
        let mut replies = Vec::new();
        let mut joins = Vec::new();
        {
            let mut tasks = self.tasks();
            for n in numbers {
                let (tx, join) = if close {
                    match tasks.remove(n) {
                        Some(t) => (t.tx, Some(t.join)),
                        None => continue,
                    }
                } else {
                    match tasks.get(n) {
                        Some(t) => (t.tx.clone(), None),
                        None => continue,
                    }
                };
                let (reply, rx) = oneshot::channel();
                replies.push((
                    n,
                    tx,
                    if close {
                        Msg::Close(reply)
                    } else {
                        Msg::Checkpoint(reply)
                    },
                    rx,
                ));
                joins.extend(join);
            }
        }
        let mut offsets = Vec::new();
        for (n, tx, msg, rx) in replies {
            if tx.send(msg).await.is_err() {
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
        let numbers: Vec<i32> = self.tasks().keys().copied().collect();
        let offsets = self.request(&numbers, false).await?;
        commit(group, offsets).await;
        Ok(())
    }
}

/// Commits what this member still owns; a refusal (the group moved on) only
/// means those events are processed again by their next owner.
async fn commit(group: &GroupHandle, offsets: Offsets) {
    let owned: BTreeSet<TopicPartition> = group.assignment().into_iter().collect();
    let offsets: Offsets = offsets
        .into_iter()
        .filter(|(tp, _)| owned.contains(tp))
        .collect();
    if offsets.is_empty() {
        return;
    }
    if let Err(e) = group.commit(&offsets).await {
        warn!(error = %e, "commit failed; the events since the last commit will be processed again");
    }
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
                let (tx, join) = partition::start(runtime.spec.clone(), n, runtime.queue);
                Task { tx, join }
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
            match runtime.request(&numbers, true).await {
                Ok(offsets) => commit(group, offsets).await,
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
