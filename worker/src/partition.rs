//! One task per partition number: recover its tables, then process its events
//! in order, and take checkpoints on request.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use strom_client::consumer::{ConsumerRecord, TopicPartition};
use strom_client::producer::Producer;
use strom_client::Client;
use strom_state::{
    recover_with_progress, Durability, LoggedStore, MemoryStore, Recovery, RecoveryProgress,
    RedbStore, Standby, Store,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tracing::{info, warn};

use crate::error::WorkerError;
use crate::metrics::{EventMeters, Metrics};
use crate::policy;
use crate::processor::{Context, ErrorPolicy, Processor};
use crate::StoreKind;

/// Next offsets to commit: everything before them is processed and acknowledged.
pub(crate) type Offsets = Vec<(TopicPartition, i64)>;

pub(crate) enum Msg {
    Records(Vec<ConsumerRecord>),
    /// Flush tables, await every send, report the offsets.
    Checkpoint(oneshot::Sender<Result<Offsets, WorkerError>>),
    /// Like a checkpoint with durable tables, then stop.
    Close(oneshot::Sender<Result<Offsets, WorkerError>>),
}

/// What a partition task needs to know about the app.
pub(crate) struct Spec {
    pub client: Client,
    pub producer: Producer,
    /// Every agent, and which of them take each topic.
    pub processors: Vec<Arc<dyn Processor>>,
    pub by_topic: HashMap<String, Vec<usize>>,
    /// (table name, changelog topic).
    pub tables: Vec<(String, String)>,
    pub state_dir: PathBuf,
    pub store: StoreKind,
    /// Partition count of the source topics.
    pub partitions: usize,
    /// The first error that must stop the worker (a partition that cannot
    /// recover or process stalls otherwise).
    pub fatal: std::sync::Mutex<Option<WorkerError>>,
    pub metrics: Metrics,
    /// The policy of agents without their own.
    pub on_error: ErrorPolicy,
}

impl Spec {
    pub fn fail(&self, e: WorkerError) {
        warn!(error = %e, "worker stops");
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    pub fn take_fatal(&self) -> Option<WorkerError> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Opens the local store of `table`'s partition `partition`.
pub(crate) fn open_store(
    spec: &Spec,
    table: &str,
    partition: i32,
) -> Result<Arc<dyn Store>, WorkerError> {
    Ok(match spec.store {
        StoreKind::Redb => Arc::new(RedbStore::open(strom_state::store_path(
            &spec.state_dir,
            table,
            partition,
        ))?),
        StoreKind::Memory => Arc::new(MemoryStore::new()),
    })
}

/// Opens a store that a standby or an earlier task of this partition may
/// still be closing: retries for a few seconds before giving up.
async fn open_store_retrying(
    spec: &Spec,
    table: &str,
    partition: i32,
) -> Result<Arc<dyn Store>, WorkerError> {
    let mut attempts = 0;
    loop {
        match open_store(spec, table, partition) {
            Ok(store) => return Ok(store),
            Err(e) if attempts < 50 => {
                attempts += 1;
                tracing::debug!(partition, table, error = %e, "store not openable yet; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The way into a partition task: an unbounded queue, bounded in effect by
/// the worker pausing the partition's fetches while `queued` records wait.
pub(crate) struct Inbox {
    tx: mpsc::UnboundedSender<Msg>,
    queued: Arc<AtomicUsize>,
    /// Set once the partition's tables are recovered and it processes.
    ready: Arc<OnceLock<Context>>,
}

impl Inbox {
    /// Queues fetched records; returns how many bytes of records now wait.
    pub fn records(&self, records: Vec<ConsumerRecord>) -> usize {
        let n = buffered_bytes(&records);
        let queued = self.queued.fetch_add(n, Ordering::AcqRel) + n;
        if self.tx.send(Msg::Records(records)).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
        }
        queued
    }

    /// Bytes of records queued and not yet taken by the task.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// The partition's context once its tables are recovered.
    pub fn ready(&self) -> Option<&Context> {
        self.ready.get()
    }

    /// Sends a checkpoint or close request; false if the task is gone.
    pub fn send(&self, msg: Msg) -> bool {
        self.tx.send(msg).is_ok()
    }
}

/// Starts the task of partition number `partition`. When its queue drains to
/// `low` records it notifies `drained`, so the worker resumes fetching.
pub(crate) fn start(
    spec: Arc<Spec>,
    partition: i32,
    low: usize,
    drained: Arc<Notify>,
    warm: Vec<(String, Standby)>,
) -> (Inbox, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let ready = Arc::new(OnceLock::new());
    let inbox = Inbox {
        tx,
        queued: queued.clone(),
        ready: ready.clone(),
    };
    let task = tokio::spawn(async move {
        let backlog = Backlog {
            queued,
            low,
            drained,
        };
        if let Err(e) = run(spec.clone(), partition, rx, backlog, warm, ready).await {
            warn!(partition, error = %e, "partition task failed");
            spec.fail(e);
        }
    });
    (inbox, task)
}

/// What `records` cost in memory, roughly: their keys, values and headers
/// plus a fixed overhead per record.
fn buffered_bytes(records: &[ConsumerRecord]) -> usize {
    records
        .iter()
        .map(|r| {
            let fields =
                r.key.as_ref().map_or(0, |k| k.len()) + r.value.as_ref().map_or(0, |v| v.len());
            let headers: usize = r
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, |v| v.len()))
                .sum();
            fields + headers + 64
        })
        .sum()
}

/// The task's side of the queued-bytes count.
struct Backlog {
    queued: Arc<AtomicUsize>,
    low: usize,
    drained: Arc<Notify>,
}

impl Backlog {
    fn taken(&self, n: usize) {
        let before = self.queued.fetch_sub(n, Ordering::AcqRel);
        if before > self.low && before - n <= self.low {
            self.drained.notify_one();
        }
    }
}

/// Where a source partition stands: the next offset after the last event
/// handed to a processor, and the events still being processed concurrently.
#[derive(Default)]
struct Progress {
    next: i64,
    /// Offset → processors still working on it.
    running: BTreeMap<i64, usize>,
}

impl Progress {
    /// Everything before this offset is done.
    fn done_below(&self) -> i64 {
        self.running
            .first_key_value()
            .map_or(self.next, |(&o, _)| o)
    }
}

/// The agents of a topic and its per-event metric handles.
type Route = (Arc<[usize]>, Arc<EventMeters>);

/// An event processed on its own task (a processor with concurrency > 1).
struct Running {
    tp: TopicPartition,
    offset: i64,
    processor: usize,
}

struct Partition {
    spec: Arc<Spec>,
    ctx: Context,
    progress: BTreeMap<TopicPartition, Progress>,
    tasks: JoinSet<Result<(), WorkerError>>,
    running: HashMap<tokio::task::Id, Running>,
    /// Events running per processor.
    load: Vec<usize>,
    /// Per topic: its agents (indexes into the processors) and its per-event
    /// metric handles.
    routes: HashMap<Arc<str>, Route>,
}

async fn run(
    spec: Arc<Spec>,
    partition: i32,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    backlog: Backlog,
    mut warm: Vec<(String, Standby)>,
    ready: Arc<OnceLock<Context>>,
) -> Result<(), WorkerError> {
    spec.metrics.partition_ready(partition, false);
    let mut tables = BTreeMap::new();
    for (name, changelog) in &spec.tables {
        let standby = warm
            .iter()
            .position(|(t, _)| t == name)
            .map(|i| warm.swap_remove(i).1);
        let (store, recovery) = match standby {
            Some(standby) => standby.promote(&spec.client).await?,
            None => {
                let store = open_store_retrying(&spec, name, partition).await?;
                let recovery =
                    recover_reporting(&spec, store.clone(), name, changelog, partition).await?;
                (store, recovery)
            }
        };
        info!(partition, table = %name, replayed = recovery.replayed, "table ready");
        tables.insert(
            name.clone(),
            LoggedStore::new(store, spec.producer.clone(), changelog.clone(), partition),
        );
    }
    for p in &spec.processors {
        p.reset(partition);
    }
    let ctx = Context::new(
        partition,
        spec.partitions,
        tables,
        spec.producer.clone(),
        spec.metrics.clone(),
    );
    let _ = ready.set(ctx.clone());
    spec.metrics.partition_ready(partition, true);
    let mut task = Partition {
        load: vec![0; spec.processors.len()],
        spec,
        ctx,
        progress: BTreeMap::new(),
        tasks: JoinSet::new(),
        running: HashMap::new(),
        routes: HashMap::new(),
    };
    loop {
        let deadline = task.deadline();
        tokio::select! {
            msg = rx.recv() => match msg {
                None => return Ok(()),
                Some(Msg::Records(records)) => {
                    let n = buffered_bytes(&records);
                    let mut started = Instant::now();
                    for record in records {
                        started = task.process(record, started).await?;
                    }
                    backlog.taken(n);
                }
                Some(Msg::Checkpoint(reply)) => {
                    let _ = reply.send(task.checkpoint(Durability::Fast).await);
                }
                Some(Msg::Close(reply)) => {
                    task.flush_held().await?;
                    while task.finish_one().await {}
                    let _ = reply.send(task.checkpoint(Durability::Durable).await);
                    return Ok(());
                }
            },
            Some(done) = task.tasks.join_next_with_id(), if !task.tasks.is_empty() => task.finished(done),
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                task.flush_due().await?;
            }
        }
    }
}

impl Partition {
    /// Hands one event to each processor of its topic: inline when it keeps
    /// order, else on its own task once the processor has room.
    ///
    /// `started` is when the previous inline event ended (one clock read per
    /// event); returns when this one ended.
    async fn process(
        &mut self,
        record: ConsumerRecord,
        mut started: Instant,
    ) -> Result<Instant, WorkerError> {
        let tp = TopicPartition {
            topic: record.topic.clone(),
            partition: record.partition,
        };
        let offset = record.offset;
        let spec = self.spec.clone();
        let route = match self.routes.get(&*tp.topic) {
            Some(r) => r.clone(),
            None => {
                let agents: Arc<[usize]> = spec
                    .by_topic
                    .get(&*tp.topic)
                    .map_or_else(Vec::new, Clone::clone)
                    .into();
                if agents.is_empty() {
                    warn!(topic = %tp.topic, "no agent for this topic; its events are skipped");
                }
                let meters = Arc::new(spec.metrics.event_meters(&tp.topic, tp.partition));
                self.routes
                    .insert(tp.topic.clone(), (agents.clone(), meters.clone()));
                (agents, meters)
            }
        };
        let (agents, meters) = (&*route.0, &route.1);
        let mut record = Some(record);
        for (i, &index) in agents.iter().enumerate() {
            let record = if i + 1 == agents.len() {
                record.take()
            } else {
                record.clone()
            };
            let Some(record) = record else { break };
            let p = spec.processors[index].clone();
            let concurrency = p.concurrency();
            if concurrency <= 1 {
                let policy = p.error_policy().unwrap_or(&spec.on_error);
                started =
                    policy::handle(p.clone(), policy, self.ctx.clone(), record, meters, started)
                        .await?;
                continue;
            }
            while self.load[index] >= concurrency {
                self.finish_one().await;
            }
            let (ctx, spec, meters) = (self.ctx.clone(), spec.clone(), meters.clone());
            let handle = self.tasks.spawn(async move {
                let policy = p.error_policy().unwrap_or(&spec.on_error);
                policy::handle(p.clone(), policy, ctx, record, &meters, Instant::now())
                    .await
                    .map(drop)
            });
            self.load[index] += 1;
            *self
                .progress
                .entry(tp.clone())
                .or_default()
                .running
                .entry(offset)
                .or_default() += 1;
            self.running.insert(
                handle.id(),
                Running {
                    tp: tp.clone(),
                    offset,
                    processor: index,
                },
            );
        }
        self.progress.entry(tp).or_default().next = offset + 1;
        Ok(started)
    }

    /// Waits for one concurrently processed event; false when none runs.
    async fn finish_one(&mut self) -> bool {
        match self.tasks.join_next_with_id().await {
            Some(done) => {
                self.finished(done);
                true
            }
            None => false,
        }
    }

    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Result<(), WorkerError>), tokio::task::JoinError>,
    ) {
        let (id, result) = match done {
            Ok((id, result)) => (id, result),
            // Panics are caught inside; this is a task cancelled at shutdown.
            Err(e) => (e.id(), Ok(())),
        };
        if let Err(e) = result {
            // Its offset stays uncommitted: `running` keeps it below.
            self.spec.fail(e);
            return;
        }
        let Some(r) = self.running.remove(&id) else {
            return;
        };
        self.load[r.processor] -= 1;
        if let Some(p) = self.progress.get_mut(&r.tp) {
            if let Some(n) = p.running.get_mut(&r.offset) {
                *n -= 1;
                if *n == 0 {
                    p.running.remove(&r.offset);
                }
            }
        }
    }

    /// The earliest time some processor must flush what it holds.
    fn deadline(&self) -> Option<Instant> {
        self.spec
            .processors
            .iter()
            .filter_map(|p| p.deadline(self.ctx.partition()))
            .min()
    }

    async fn flush_due(&mut self) -> Result<(), WorkerError> {
        let now = Instant::now();
        let due: Vec<_> = self
            .spec
            .processors
            .iter()
            .filter(|p| p.deadline(self.ctx.partition()).is_some_and(|d| d <= now))
            .cloned()
            .collect();
        for p in due {
            self.flush_processor(&p).await?;
        }
        Ok(())
    }

    /// Hands on what `p` holds back. A failure there has no single event to
    /// dead-letter or retry: it is counted and skipped, or stops the worker
    /// under [`ErrorPolicy::Stop`].
    async fn flush_processor(&self, p: &Arc<dyn Processor>) -> Result<(), WorkerError> {
        let Err(e) = p.flush(self.ctx.clone()).await else {
            return Ok(());
        };
        let partition = self.ctx.partition();
        self.spec
            .metrics
            .event_meters(p.topic(), partition)
            .agent_errors
            .inc();
        if p.error_policy().unwrap_or(&self.spec.on_error) == &ErrorPolicy::Stop {
            let offset = p.held_from(partition).unwrap_or(-1);
            return Err(WorkerError::Agent {
                topic: p.topic().to_owned(),
                partition,
                offset,
                error: e.to_string(),
            });
        }
        warn!(topic = p.topic(), partition, error = %e, "agent failed on held-back events; skipped");
        Ok(())
    }

    /// Hands on every event a processor holds back.
    async fn flush_held(&self) -> Result<(), WorkerError> {
        for p in &self.spec.processors {
            self.flush_processor(p).await?;
        }
        Ok(())
    }

    /// Flushes the tables (waiting for their changelog records), waits for
    /// every other record sent, and returns the offsets that may now be
    /// committed: below the first event still running or held back.
    async fn checkpoint(&mut self, durability: Durability) -> Result<Offsets, WorkerError> {
        let partition = self.ctx.partition();
        let offsets = self
            .progress
            .iter()
            .map(|(tp, p)| {
                let held = self
                    .spec
                    .by_topic
                    .get(&*tp.topic)
                    .into_iter()
                    .flatten()
                    .filter_map(|&i| self.spec.processors[i].held_from(partition))
                    .min();
                let done = p.done_below();
                (tp.clone(), held.map_or(done, |h| h.min(done)))
            })
            .collect();
        flush_outputs(&self.ctx, durability).await?;
        Ok(offsets)
    }
}

/// Recovers `table`'s partition from its changelog, logging progress every few
/// seconds (records replayed / to replay, time left) and keeping the metrics
/// current.
async fn recover_reporting(
    spec: &Spec,
    store: Arc<dyn Store>,
    table: &str,
    changelog: &str,
    partition: i32,
) -> Result<Recovery, WorkerError> {
    const LOG_EVERY: u32 = 5;
    let progress = RecoveryProgress::default();
    let recovery = recover_with_progress(&spec.client, store, changelog, partition, &progress);
    tokio::pin!(recovery);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut ticks = 0u32;
    let report = |progress: &RecoveryProgress| {
        let replayed = progress.replayed.load(Ordering::Relaxed);
        let to_replay = progress.to_replay.load(Ordering::Relaxed);
        spec.metrics
            .recovery(table, partition, replayed, to_replay.max(replayed));
        (replayed, to_replay)
    };
    loop {
        tokio::select! {
            done = &mut recovery => {
                let done = done?;
                report(&progress);
                return Ok(done);
            }
            _ = tick.tick() => {
                let (replayed, to_replay) = report(&progress);
                ticks += 1;
                if ticks % LOG_EVERY == 0 {
                    let elapsed = started.elapsed().as_secs_f64();
                    let rate = replayed as f64 / elapsed.max(0.001);
                    let left = to_replay.saturating_sub(replayed) as f64;
                    let eta = (rate > 0.0).then(|| Duration::from_secs_f64(left / rate));
                    info!(partition, table, replayed, to_replay, eta = ?eta, "recovering");
                }
            }
        }
    }
}

/// Flushes the tables (waiting for their changelog records) and waits for
/// every other record sent.
async fn flush_outputs(ctx: &Context, durability: Durability) -> Result<(), WorkerError> {
    let mut state = ctx.state().await;
    for table in state.tables.values_mut() {
        table.store.flush(durability).await?;
    }
    if !state.deliveries.is_empty() {
        ctx.producer().flush().await?;
        for d in state.deliveries.drain(..) {
            if let Some(Err(source)) = d.try_result() {
                return Err(WorkerError::Delivery {
                    partition: ctx.partition(),
                    source,
                });
            }
        }
    }
    Ok(())
}
