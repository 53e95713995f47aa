//! One task per partition number: it restores the number's tables from their
//! changelogs, then processes the number's events in order, and answers the
//! task manager's control messages ahead of its data.
//!
//! ```text
//!  Restoring ──tables ready──► Running ──Close / Prepare{close}──► Closed
//!      │                          │
//!      └──Close (revoked): restoration cancelled, nothing committed
//!  any state ──error──► Failed (the worker stops; nothing of the failed
//!                        event is committed)
//! ```
//!
//! A task reads two queues: control messages (checkpoints, commit rounds,
//! close) and fetched records. Control always goes first, also between the
//! records of one fetched batch, so a checkpoint never waits behind megabytes
//! of queued records, and a restoring task still answers at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use strom_client::consumer::{ConsumerRecord, IsolationLevel, TopicPartition};
use strom_client::producer::Producer;
use strom_client::Client;
use strom_state::window::Windowing;
use strom_state::{
    recover_with_progress, Durability, LoggedStore, MemoryStore, Recovery, RecoveryProgress,
    RedbStore, Standby, Store,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tracing::{info, warn};

use crate::config::{ProcessingGuarantee, StoreKind};
use crate::error::WorkerError;
use crate::global::GlobalTables;
use crate::metrics::{EventMeters, Metrics};
use crate::policy::{self, Undecodable};
use crate::processor::{Context, ErrorPolicy, Processor};

/// Next offsets to commit: everything before them is processed (and, at
/// least once, acknowledged).
pub(crate) type Offsets = Vec<(TopicPartition, i64)>;

/// Where a task stands (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum TaskState {
    Restoring = 0,
    Running = 1,
    Closed = 2,
    Failed = 3,
}

/// A task's state and, once it runs, its context (for table reads from the
/// web server), shared with the task manager.
#[derive(Debug)]
pub(crate) struct TaskStatus {
    state: AtomicU8,
    ctx: OnceLock<Context>,
}

impl TaskStatus {
    pub fn state(&self) -> TaskState {
        match self.state.load(Ordering::Acquire) {
            0 => TaskState::Restoring,
            1 => TaskState::Running,
            2 => TaskState::Closed,
            _ => TaskState::Failed,
        }
    }

    fn set(&self, state: TaskState) {
        self.state.store(state as u8, Ordering::Release);
    }

    /// The task's context once it runs.
    pub fn context(&self) -> Option<&Context> {
        self.ctx.get()
    }
}

/// What the task manager asks of a task.
pub(crate) enum Control {
    /// At least once: wait for this task's deliveries, commit its tables'
    /// writes, answer the offsets that may be committed.
    Checkpoint(oneshot::Sender<Result<Offsets, WorkerError>>),
    /// Exactly once: stop at an event boundary (finishing events in flight;
    /// with `close`, handing on batches held back first), answer the offsets,
    /// then do nothing until the transaction's outcome arrives.
    Prepare {
        close: bool,
        reply: oneshot::Sender<Result<Offsets, WorkerError>>,
        outcome: oneshot::Receiver<Outcome>,
    },
    /// At least once: hand on batches held back, finish events in flight,
    /// checkpoint durably, answer the offsets and end.
    Close(oneshot::Sender<Result<Offsets, WorkerError>>),
}

/// The epoch of [`Outcome::Aborted`] when nothing is read again (the worker
/// is stopping): every batch queued or routed later is dropped.
pub(crate) const DROP_ALL: u64 = u64::MAX;

/// How the transaction a task prepared for ended.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// Committed: the task's table writes go to its stores.
    Committed,
    /// Aborted: the task forgets everything since the last commit and reads
    /// again from it; records queued under older epochs are dropped.
    Aborted { epoch: u64 },
}

/// A table of the app.
#[derive(Debug, Clone)]
pub(crate) struct TableSpec {
    pub name: String,
    /// Its changelog topic.
    pub changelog: String,
    /// A windowed table's windows.
    pub windowing: Option<Windowing>,
}

/// What a partition task needs to know about the app.
pub(crate) struct Spec {
    pub client: Client,
    /// The worker's producer: transactional under exactly-once.
    pub producer: Producer,
    /// Every agent, and which of them take each topic.
    pub processors: Vec<Arc<dyn Processor>>,
    /// (Topics matching an agent's pattern join while it runs.)
    pub by_topic: std::sync::RwLock<HashMap<String, Vec<usize>>>,
    pub tables: Vec<TableSpec>,
    pub state_dir: PathBuf,
    pub store: StoreKind,
    /// The page cache of each redb store (its share of the memory budget).
    pub store_cache: usize,
    pub guarantee: ProcessingGuarantee,
    /// The tables' partition count (of their changelogs, and the partition
    /// numbers the group shares out): the largest source topic's.
    pub partitions: usize,
    /// Tasks read their topics in step by record time (see
    /// [`WorkerConfig::time_ordered`](crate::WorkerConfig::time_ordered)).
    pub time_ordered: bool,
    /// In time order: how long a task waits at most for a topic's records
    /// the broker holds and it has not been handed yet.
    pub time_order_wait: Duration,
    /// In time order: the source partitions' lags, and what tasks wait for.
    pub unfetched: crate::unfetched::Unfetched,
    /// Each source topic's partition count when the worker started reading
    /// it.
    pub counts: std::sync::RwLock<HashMap<String, usize>>,
    pub metrics: Metrics,
    /// The policy of agents without their own.
    pub on_error: ErrorPolicy,
    pub durable_interval: Duration,
    pub durable_changes: u64,
    /// Exactly-once: the transactions' round gate (see `eos`).
    pub round_gate: Option<Arc<tokio::sync::RwLock<()>>>,
    /// The global tables, once restored (before the worker joins its group).
    pub globals: std::sync::OnceLock<Arc<GlobalTables>>,
    /// The first error that stops the worker.
    pub fatal: std::sync::Mutex<Option<WorkerError>>,
    /// Woken when `fatal` is set.
    pub stopped: Notify,
}

impl Spec {
    /// The agents (indexes into `processors`) of `topic`.
    pub fn agents_of(&self, topic: &str) -> Vec<usize> {
        let by_topic = self.by_topic.read().unwrap_or_else(|e| e.into_inner());
        by_topic.get(topic).cloned().unwrap_or_default()
    }

    /// Records an error that stops the worker (the first one wins).
    pub fn fail(&self, e: WorkerError) {
        warn!(error = %e, "worker stops");
        self.metrics.failed();
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
        self.stopped.notify_waiters();
        self.stopped.notify_one();
    }

    pub fn take_fatal(&self) -> Option<WorkerError> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The error that stops the worker, as text, if there is one.
    pub fn fatal_message(&self) -> Option<String> {
        self.fatal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(ToString::to_string)
    }

    /// How tables read their changelogs: only committed records under
    /// exactly-once.
    pub fn isolation(&self) -> IsolationLevel {
        match self.guarantee {
            ProcessingGuarantee::ExactlyOnce => IsolationLevel::ReadCommitted,
            _ => IsolationLevel::ReadUncommitted,
        }
    }
}

/// Opens the local store of `table`'s partition `partition`.
pub(crate) fn open_store(
    spec: &Spec,
    table: &str,
    partition: i32,
) -> Result<Arc<dyn Store>, WorkerError> {
    Ok(match spec.store {
        StoreKind::Redb => Arc::new(RedbStore::open_with_cache(
            strom_state::store_path(&spec.state_dir, table, partition),
            spec.store_cache,
        )?),
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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Fetched records of one partition, routed under a task epoch, with their
/// size in the backpressure count.
pub(crate) struct Batch {
    epoch: u64,
    bytes: usize,
    records: Vec<ConsumerRecord>,
    /// A batch that does not decode, to be stepped over after the records
    /// before it (then `records` is empty).
    undecodable: Option<Undecodable>,
}

/// The task manager's handle on a task.
pub(crate) struct TaskHandle {
    control: mpsc::UnboundedSender<Control>,
    data: mpsc::UnboundedSender<Batch>,
    pub status: Arc<TaskStatus>,
    /// Bytes of records queued and not yet taken by the task.
    queued: Arc<AtomicUsize>,
    /// Bumped by a rewind: records routed before it are dropped.
    epoch: Arc<AtomicU64>,
    /// Per source partition, the offset reading restarts from after an
    /// aborted transaction: the last committed offset, or the first offset
    /// routed to the task before any commit.
    restart: Arc<Mutex<HashMap<TopicPartition, i64>>>,
    pub join: tokio::task::JoinHandle<()>,
}

impl TaskHandle {
    /// Queues fetched records; returns how many bytes of records now wait.
    pub fn route(&self, records: Vec<ConsumerRecord>) -> usize {
        if let Some(first) = records.first() {
            self.restart_at(&first.topic, first.partition, first.offset);
        }
        let bytes = buffered_bytes(&records);
        self.queue(records, bytes, None)
    }

    /// Queues a batch that does not decode, to be stepped over in order.
    pub fn route_undecodable(&self, batch: Undecodable) {
        self.restart_at(&batch.tp.topic, batch.tp.partition, batch.from);
        self.queue(Vec::new(), 0, Some(batch));
    }

    /// Notes where a partition restarts after an aborted transaction, if
    /// nothing was routed from it before.
    fn restart_at(&self, topic: &str, partition: i32, offset: i64) {
        let mut restart = self.restart.lock().unwrap_or_else(|e| e.into_inner());
        if !restart
            .keys()
            .any(|tp| *tp.topic == *topic && tp.partition == partition)
        {
            restart.insert(TopicPartition::new(topic, partition), offset);
        }
    }

    fn queue(
        &self,
        records: Vec<ConsumerRecord>,
        bytes: usize,
        undecodable: Option<Undecodable>,
    ) -> usize {
        let queued = self.queued.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let batch = Batch {
            epoch: self.epoch.load(Ordering::Acquire),
            bytes,
            records,
            undecodable,
        };
        if self.data.send(batch).is_err() {
            self.queued.fetch_sub(bytes, Ordering::AcqRel);
        }
        queued
    }

    /// Bytes of records queued and not yet taken by the task.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Sends a control message; false if the task is gone.
    pub fn send(&self, msg: Control) -> bool {
        self.control.send(msg).is_ok()
    }

    /// Where each source partition restarts after an aborted transaction.
    pub fn restart_points(&self) -> Vec<(TopicPartition, i64)> {
        let restart = self.restart.lock().unwrap_or_else(|e| e.into_inner());
        restart.iter().map(|(tp, o)| (tp.clone(), *o)).collect()
    }

    /// Starts a new epoch: records routed from now on are the ones read
    /// after a rewind. Returns it.
    pub fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }
}

/// Starts the task of partition number `partition`. When its queue drains to
/// `low` bytes it notifies `drained`, so the worker resumes fetching.
pub(crate) fn spawn(
    spec: Arc<Spec>,
    partition: i32,
    low: usize,
    drained: Arc<Notify>,
    warm: Vec<(String, Standby)>,
) -> TaskHandle {
    let (control, control_rx) = mpsc::unbounded_channel();
    let (data, data_rx) = mpsc::unbounded_channel();
    let status = Arc::new(TaskStatus {
        state: AtomicU8::new(TaskState::Restoring as u8),
        ctx: OnceLock::new(),
    });
    let queued = Arc::new(AtomicUsize::new(0));
    let restart = Arc::new(Mutex::new(HashMap::new()));
    let backlog = Backlog {
        queued: queued.clone(),
        low,
        drained,
    };
    let inboxes = Inboxes {
        control: control_rx,
        data: data_rx,
    };
    let (st, rs) = (status.clone(), restart.clone());
    let join = tokio::spawn(async move {
        let mut ending = Ending {
            spec: spec.clone(),
            status: st.clone(),
            partition,
            ended: false,
        };
        let outcome = run(spec.clone(), partition, inboxes, backlog, warm, &st, rs).await;
        ending.ended = true;
        match outcome {
            Ok(()) => st.set(TaskState::Closed),
            Err(e) => {
                st.set(TaskState::Failed);
                warn!(partition, error = %e, "partition task failed");
                spec.fail(e);
            }
        }
    });
    TaskHandle {
        control,
        data,
        status,
        queued,
        epoch: Arc::new(AtomicU64::new(0)),
        restart,
        join,
    }
}

/// Notices a task that ends without returning: aborted (its partition was
/// lost: closed quietly) or panicked in the runtime's own code (the worker
/// stops; a task that vanished would stall its partition and, under
/// exactly-once, let a round commit without its offsets).
struct Ending {
    spec: Arc<Spec>,
    status: Arc<TaskStatus>,
    partition: i32,
    ended: bool,
}

impl Drop for Ending {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if std::thread::panicking() {
            self.status.set(TaskState::Failed);
            self.spec.fail(WorkerError::Framework {
                partition: self.partition,
                what: "the partition task".into(),
                attempts: 1,
                error: "it panicked".into(),
            });
        } else {
            self.status.set(TaskState::Closed);
        }
    }
}

/// What `records` cost in memory, roughly (see [`ConsumerRecord::size`]).
fn buffered_bytes(records: &[ConsumerRecord]) -> usize {
    records.iter().map(ConsumerRecord::size).sum()
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

struct Inboxes {
    control: mpsc::UnboundedReceiver<Control>,
    data: mpsc::UnboundedReceiver<Batch>,
}

async fn run(
    spec: Arc<Spec>,
    partition: i32,
    mut inboxes: Inboxes,
    backlog: Backlog,
    warm: Vec<(String, Standby)>,
    status: &TaskStatus,
    restart: Arc<Mutex<HashMap<TopicPartition, i64>>>,
) -> Result<(), WorkerError> {
    spec.metrics.partition_ready(partition, false);
    let Some(tables) = restore(&spec, partition, warm, &mut inboxes.control).await? else {
        info!(
            partition,
            "restoration cancelled: the partition was revoked"
        );
        return Ok(());
    };
    for p in &spec.processors {
        p.reset(partition);
    }
    let ctx = Context::new(
        partition,
        spec.partitions,
        tables,
        spec.globals.get().cloned().unwrap_or_default(),
        spec.producer.clone(),
        spec.metrics.clone(),
        spec.guarantee == ProcessingGuarantee::ExactlyOnce,
    );
    let _ = status.ctx.set(ctx.clone());
    if !enter(&spec, status, &mut inboxes.control).await {
        info!(partition, "closed before it ran: the partition was revoked");
        return Ok(());
    }
    spec.metrics.partition_ready(partition, true);
    let mut task = Task {
        load: vec![0; spec.processors.len()],
        spec,
        ctx,
        progress: BTreeMap::new(),
        concurrent: JoinSet::new(),
        running: HashMap::new(),
        routes: Vec::new(),
        epoch: 0,
        current: Current::default(),
        waiting: None,
        idle: None,
        backlog,
        restart,
        last_durable: Instant::now(),
        changes: 0,
    };
    task.run(inboxes).await
}

/// Turns the task running. Exactly once, not while a commit round runs
/// (that round did not ask this task to prepare; the next one will): it waits
/// for the round gate, answering meanwhile what a round may ask of a task that
/// is not running — to close. False when it was closed.
async fn enter(
    spec: &Spec,
    status: &TaskStatus,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> bool {
    let Some(gate) = &spec.round_gate else {
        status.set(TaskState::Running);
        return true;
    };
    let entering = gate.read();
    tokio::pin!(entering);
    loop {
        tokio::select! {
            biased;
            msg = control.recv() => match msg {
                None => return false,
                Some(Control::Close(reply)) => {
                    let _ = reply.send(Ok(Vec::new()));
                    return false;
                }
                Some(Control::Prepare { close, reply, .. }) => {
                    let _ = reply.send(Ok(Vec::new()));
                    if close {
                        return false;
                    }
                }
                Some(Control::Checkpoint(reply)) => {
                    let _ = reply.send(Ok(Vec::new()));
                }
            },
            _guard = &mut entering => {
                status.set(TaskState::Running);
                return true;
            }
        }
    }
}

/// Restores every table of `partition` (from a warm standby when there is
/// one), answering control messages meanwhile. `None` when the task was
/// closed before it finished: the stores are left as restoration last wrote
/// them, which is consistent.
async fn restore(
    spec: &Spec,
    partition: i32,
    mut warm: Vec<(String, Standby)>,
    control: &mut mpsc::UnboundedReceiver<Control>,
) -> Result<Option<BTreeMap<String, (LoggedStore, Option<Windowing>)>>, WorkerError> {
    let mut tables = BTreeMap::new();
    for TableSpec {
        name,
        changelog,
        windowing,
    } in &spec.tables
    {
        let standby = warm
            .iter()
            .position(|(t, _)| t == name)
            .map(|i| warm.swap_remove(i).1);
        let restored = async {
            match standby {
                Some(standby) => Ok(standby.promote(&spec.client).await?),
                None => {
                    let store = open_store_retrying(spec, name, partition).await?;
                    let recovery =
                        recover_reporting(spec, store.clone(), name, changelog, partition).await?;
                    Ok::<_, WorkerError>((store, recovery))
                }
            }
        };
        tokio::pin!(restored);
        let (store, recovery) = loop {
            tokio::select! {
                biased;
                msg = control.recv() => match msg {
                    None => return Ok(None),
                    Some(Control::Close(reply)) => {
                        let _ = reply.send(Ok(Vec::new()));
                        return Ok(None);
                    }
                    Some(Control::Prepare { close, reply, .. }) => {
                        let _ = reply.send(Ok(Vec::new()));
                        if close {
                            return Ok(None);
                        }
                    }
                    Some(Control::Checkpoint(reply)) => {
                        let _ = reply.send(Ok(Vec::new()));
                    }
                },
                done = &mut restored => break done?,
            }
        };
        info!(partition, table = %name, replayed = recovery.replayed, "table ready");
        let store = LoggedStore::new(store, spec.producer.clone(), changelog.clone(), partition);
        tables.insert(name.clone(), (store, *windowing));
    }
    Ok(Some(tables))
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

/// The agents of a topic and the meters of its partition.
struct Routed {
    agents: Vec<usize>,
    meters: EventMeters,
}

/// A [`Routed`], shared: one reference count per event.
type Route = Arc<Routed>;

/// An event processed on its own task (a processor with concurrency > 1).
struct Running {
    tp: TopicPartition,
    offset: i64,
    processor: usize,
}

/// Bytes of records a task takes from its inbox ahead of processing them,
/// to choose among its topics by time: beyond this it takes more only as
/// it runs out (taking everything at once held more memory for nothing).
const TAKE_AHEAD: usize = 256 << 10;

/// Records processed before the task looks at its control queue again.
const BURST: usize = 64;

/// How often a task waiting for records the broker holds looks at the
/// partitions' lags again.
const IDLE_RECHECK: Duration = Duration::from_millis(20);

/// A running task.
struct Task {
    spec: Arc<Spec>,
    ctx: Context,
    progress: BTreeMap<TopicPartition, Progress>,
    concurrent: JoinSet<Result<(), WorkerError>>,
    running: HashMap<tokio::task::Id, Running>,
    /// Events running per processor.
    load: Vec<usize>,
    /// Per topic: its agents (indexes into the processors) and its per-event
    /// metric handles. A few topics each: a scan beats hashing the name.
    routes: Vec<Route>,
    /// Batches routed under an older epoch were read before a rewind.
    epoch: u64,
    /// The records taken from the inbox, not yet processed.
    current: Current,
    /// A batch that does not decode, taken while records were current: it
    /// is stepped over once they are processed.
    waiting: Option<Undecodable>,
    /// In time order: since when the task waits for a topic's records the
    /// broker holds (see [`Task::waits_for_fetch`]), and whether it gave up.
    idle: Option<(Instant, bool)>,
    backlog: Backlog,
    restart: Arc<Mutex<HashMap<TopicPartition, i64>>>,
    last_durable: Instant,
    /// Table changes since the last durable checkpoint.
    changes: u64,
}

/// The records a task has taken from its inbox and not yet processed: one
/// queue per topic partition, in offset order. The next record is the
/// earliest head by record time (the first queue's on a tie), as Kafka
/// Streams picks among a task's partitions: the topics of one partition
/// number are processed in step by time as far as they are fetched, so a
/// windowed join or table over several topics sees their events in time
/// order rather than one topic's backlog before the other's.
#[derive(Default)]
struct Current {
    queues: Vec<VecDeque<ConsumerRecord>>,
    /// Their bytes in the backpressure count.
    bytes: usize,
}

impl Current {
    fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Whether records of `tp` are queued.
    fn has(&self, tp: &TopicPartition) -> bool {
        self.queues.iter().any(|q| {
            q.front()
                .is_some_and(|r| r.partition == tp.partition && r.topic == tp.topic)
        })
    }

    fn add(&mut self, records: Vec<ConsumerRecord>, bytes: usize) {
        self.bytes += bytes;
        // The common case: a batch of one partition that has no queue yet
        // becomes one as it is, without copying.
        let one = |r: &ConsumerRecord| (r.partition, r.topic.clone());
        let single = records.first().map(one).filter(|first| {
            let (partition, topic) = first;
            records
                .iter()
                .all(|r| r.partition == *partition && r.topic == *topic)
                && !(self.queues.iter()).any(|q| {
                    q.back()
                        .is_some_and(|b| b.partition == *partition && b.topic == *topic)
                })
        });
        if single.is_some() {
            self.queues.push(records.into());
            return;
        }
        let mut last = None;
        for r in records {
            let same = |q: &VecDeque<ConsumerRecord>| {
                q.back()
                    .is_some_and(|b| b.partition == r.partition && b.topic == r.topic)
            };
            let i = match last.filter(|&i| same(&self.queues[i])) {
                Some(i) => i,
                None => match self.queues.iter().position(same) {
                    Some(i) => i,
                    None => {
                        self.queues.push(VecDeque::new());
                        self.queues.len() - 1
                    }
                },
            };
            self.queues[i].push_back(r);
            last = Some(i);
        }
    }

    /// The next record to process.
    fn next(&mut self) -> Option<ConsumerRecord> {
        let i = match self.queues.len() {
            0 => return None,
            1 => 0,
            n => {
                (0..n).min_by_key(|&i| self.queues[i].front().map_or(i64::MAX, |r| r.timestamp))?
            }
        };
        let record = self.queues[i].pop_front()?;
        if self.queues[i].is_empty() {
            self.queues.remove(i);
        }
        let size = buffered_bytes(std::slice::from_ref(&record));
        self.bytes = self.bytes.saturating_sub(size);
        Some(record)
    }

    /// Drops every record; returns their bytes.
    fn clear(&mut self) -> usize {
        self.queues.clear();
        std::mem::take(&mut self.bytes)
    }
}

/// What the run loop does next.
enum Step {
    Go,
    End,
}

impl Task {
    async fn run(&mut self, mut inboxes: Inboxes) -> Result<(), WorkerError> {
        loop {
            let mut idle = false;
            if !self.current.is_empty() && inboxes.control.is_empty() {
                self.take_ready(&mut inboxes.data);
                idle = self.waits_for_fetch();
                if !idle {
                    self.burst(&inboxes.control).await?;
                }
            }
            if self.current.is_empty() {
                if let Some(bad) = self.waiting.take() {
                    self.step_over(bad).await?;
                }
            }
            let deadline = self.deadline();
            let busy = !self.current.is_empty() && !idle;
            tokio::select! {
                biased;
                msg = inboxes.control.recv() => match msg {
                    None => return Ok(()),
                    Some(msg) => if let Step::End = self.control(msg).await? {
                        return Ok(());
                    },
                },
                Some(done) = self.concurrent.join_next_with_id(), if !self.concurrent.is_empty() => {
                    self.finished(done)?;
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    self.flush_due().await?;
                }
                _ = std::future::ready(()), if busy => {}
                // While it waits, a new batch wakes it, or a look at the
                // lags again.
                _ = tokio::time::sleep(IDLE_RECHECK), if idle => {}
                batch = inboxes.data.recv(), if !busy => match batch {
                    None => return Ok(()),
                    Some(batch) if batch.epoch < self.epoch => self.backlog.taken(batch.bytes),
                    Some(batch) => {
                        if let Some(bad) = batch.undecodable {
                            self.step_over(bad).await?;
                        }
                        self.current.add(batch.records, batch.bytes);
                        self.take_ready(&mut inboxes.data);
                    }
                },
            }
        }
    }

    /// In time order (`Spec::time_ordered`), takes the batches already in
    /// the inbox (up to one that does not decode), so the current records
    /// of every topic of the partition number are chosen from by time.
    fn take_ready(&mut self, data: &mut mpsc::UnboundedReceiver<Batch>) {
        if !self.spec.time_ordered {
            return;
        }
        let sources = self.sources().len();
        while self.waiting.is_none()
            && (self.current.bytes < TAKE_AHEAD || self.current.queues.len() < sources)
        {
            let Ok(batch) = data.try_recv() else {
                return;
            };
            if batch.epoch < self.epoch {
                self.backlog.taken(batch.bytes);
                continue;
            }
            self.current.add(batch.records, batch.bytes);
            self.waiting = batch.undecodable;
        }
    }

    /// The partitions of this task's number of every topic its agents read.
    fn sources(&self) -> Vec<TopicPartition> {
        let n = self.ctx.partition();
        let counts = self.spec.counts.read().unwrap_or_else(|e| e.into_inner());
        let by_topic = self.spec.by_topic.read().unwrap_or_else(|e| e.into_inner());
        by_topic
            .keys()
            .filter(|t| counts.get(*t).is_some_and(|&c| c > n as usize))
            .map(|t| TopicPartition::new(t, n))
            .collect()
    }

    /// In time order: whether the task waits before its next record
    /// because one of its partitions has none queued while the broker holds
    /// records of it not handed over yet (or its lag is not known yet), as
    /// Kafka Streams does; otherwise that partition's earlier records would
    /// come after the other topics' later ones. The wait lasts at most
    /// `Spec::time_order_wait`; then the task goes on without them until
    /// they come (or the partition is known to be caught up).
    fn waits_for_fetch(&mut self) -> bool {
        if !self.spec.time_ordered {
            return false;
        }
        let n = self.ctx.partition();
        let unfetched = &self.spec.unfetched;
        let missing: Vec<TopicPartition> = (self.sources().into_iter())
            .filter(|tp| !self.current.has(tp) && unfetched.lag(tp) != Some(0))
            .collect();
        if missing.is_empty() {
            if self.idle.take().is_some() {
                unfetched.set_waiting(n, &[]);
            }
            return false;
        }
        let now = Instant::now();
        let (since, gave_up) = self.idle.get_or_insert((now, false));
        if *gave_up {
            return false;
        }
        if now.duration_since(*since) < self.spec.time_order_wait {
            // Lifts the missing partitions' backpressure pauses (which may
            // change while it waits).
            unfetched.set_waiting(n, &missing);
            self.backlog.drained.notify_one();
            return true;
        }
        unfetched.set_waiting(n, &[]);
        *gave_up = true;
        let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
        warn!(
            partition = n,
            ?missing,
            waited = ?self.spec.time_order_wait,
            "records the broker holds did not come in time: processing the other topics without them, out of time order"
        );
        false
    }

    /// Processes up to [`BURST`] current records, stopping early when a
    /// control message arrives (or, in time order, when a partition's
    /// queue runs empty: the task may have to wait for it).
    async fn burst(
        &mut self,
        control: &mpsc::UnboundedReceiver<Control>,
    ) -> Result<(), WorkerError> {
        let mut started = Instant::now();
        let before = self.current.bytes;
        for _ in 0..BURST {
            let queues = self.current.queues.len();
            let Some(record) = self.current.next() else {
                break;
            };
            started = self.process(record, started).await?;
            let ran_out = self.spec.time_ordered && self.current.queues.len() < queues;
            if ran_out || !control.is_empty() {
                break;
            }
        }
        self.backlog
            .taken(before.saturating_sub(self.current.bytes));
        Ok(())
    }

    async fn control(&mut self, msg: Control) -> Result<Step, WorkerError> {
        match msg {
            Control::Checkpoint(reply) => {
                let _ = reply.send(self.checkpoint(false).await);
                Ok(Step::Go)
            }
            Control::Close(reply) => {
                let closed = match self.drain(true).await {
                    Ok(()) => self.checkpoint(true).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(closed);
                Ok(Step::End)
            }
            Control::Prepare {
                close,
                reply,
                outcome,
            } => {
                let prepared = match self.drain(close).await {
                    Ok(()) => Ok(self.offsets()),
                    Err(e) => Err(e),
                };
                let ok = prepared.is_ok();
                let offsets = prepared.as_ref().map(Clone::clone).unwrap_or_default();
                let _ = reply.send(prepared);
                if !ok {
                    return Ok(Step::End);
                }
                match outcome.await {
                    Ok(Outcome::Committed) => {
                        self.committed(&offsets, close).await?;
                        Ok(if close { Step::End } else { Step::Go })
                    }
                    Ok(Outcome::Aborted { epoch }) => {
                        self.aborted(epoch).await;
                        Ok(if close { Step::End } else { Step::Go })
                    }
                    // Cannot happen while rounds run to the end on their own
                    // task; if it does, how the transaction ended is unknown.
                    Err(_) => Err(WorkerError::Framework {
                        partition: self.ctx.partition(),
                        what: "a commit round".into(),
                        attempts: 1,
                        error: "it ended without saying how its transaction ended".into(),
                    }),
                }
            }
        }
    }

    /// Brings the task to an event boundary: with `hand_on`, processors hand
    /// on what they hold back first; then every event in flight finishes.
    async fn drain(&mut self, hand_on: bool) -> Result<(), WorkerError> {
        if hand_on {
            for p in self.spec.processors.clone() {
                self.flush_processor(&p).await?;
            }
        }
        while self.finish_one().await? {}
        match self.ctx.take_failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

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
        let route = self.route(&tp);
        let (agents, meters) = (&*route.agents, &route.meters);
        let mut record = Some(record);
        for (i, &index) in agents.iter().enumerate() {
            let record = if i + 1 == agents.len() {
                record.take()
            } else {
                record.clone()
            };
            let Some(record) = record else { break };
            let p = &self.spec.processors[index];
            let concurrency = p.concurrency();
            if concurrency <= 1 {
                let policy = p.error_policy().unwrap_or(&self.spec.on_error);
                started = policy::handle(&**p, policy, &self.ctx, record, meters, started).await?;
                continue;
            }
            let p = p.clone();
            while self.load[index] >= concurrency && self.finish_one().await? {}
            let (ctx, spec, route) = (self.ctx.clone(), self.spec.clone(), route.clone());
            let handle = self.concurrent.spawn(async move {
                let policy = p.error_policy().unwrap_or(&spec.on_error);
                policy::handle(&*p, policy, &ctx, record, &route.meters, Instant::now())
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

    /// Applies the agents' policies to a batch that does not decode and, unless
    /// one says stop, moves the partition's progress past it.
    async fn step_over(&mut self, batch: Undecodable) -> Result<(), WorkerError> {
        let route = self.route(&batch.tp);
        let policies: Vec<&ErrorPolicy> = (route.agents.iter())
            .map(|&i| {
                self.spec.processors[i]
                    .error_policy()
                    .unwrap_or(&self.spec.on_error)
            })
            .collect();
        policy::undecodable(&policies, &self.ctx, &batch, &route.meters).await?;
        let progress = self.progress.entry(batch.tp).or_default();
        progress.next = progress.next.max(batch.to);
        Ok(())
    }

    /// The agents of `tp`'s topic and its meters, resolved once per topic.
    fn route(&mut self, tp: &TopicPartition) -> Route {
        if let Some(r) = self.routes.iter().find(|r| r.meters.topic == tp.topic) {
            return r.clone();
        }
        let agents = self.spec.agents_of(&tp.topic);
        if agents.is_empty() {
            warn!(topic = %tp.topic, "no agent for this topic; its events are skipped");
        }
        let meters = self.spec.metrics.event_meters(&tp.topic, tp.partition);
        let route = Arc::new(Routed { agents, meters });
        self.routes.push(route.clone());
        route
    }

    /// Waits for one concurrently processed event; false when none runs.
    async fn finish_one(&mut self) -> Result<bool, WorkerError> {
        match self.concurrent.join_next_with_id().await {
            Some(done) => self.finished(done).map(|()| true),
            None => Ok(false),
        }
    }

    /// Books a concurrently processed event as done, whatever its outcome:
    /// its slot is released and, if it failed in a way that stops the worker,
    /// the error is returned (its offset stays uncommitted: the task ends).
    fn finished(
        &mut self,
        done: Result<(tokio::task::Id, Result<(), WorkerError>), tokio::task::JoinError>,
    ) -> Result<(), WorkerError> {
        let (id, result) = match done {
            Ok((id, result)) => (id, result),
            // Panics of the agent are caught inside; this is one of the
            // runtime's own code, or a cancellation: not to be skipped.
            Err(e) => (
                e.id(),
                Err(WorkerError::Framework {
                    partition: self.ctx.partition(),
                    what: "processing an event on its own task".into(),
                    attempts: 1,
                    error: e.to_string(),
                }),
            ),
        };
        if let Some(r) = self.running.remove(&id) {
            self.load[r.processor] = self.load[r.processor].saturating_sub(1);
            if let Some(p) = self.progress.get_mut(&r.tp) {
                if let Some(n) = p.running.get_mut(&r.offset) {
                    *n -= 1;
                    if *n == 0 {
                        p.running.remove(&r.offset);
                    }
                }
            }
        }
        result
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
    /// under [`ErrorPolicy::Stop`]; a framework failure always stops it.
    async fn flush_processor(&self, p: &Arc<dyn Processor>) -> Result<(), WorkerError> {
        let flushed = policy::guarded_flush(&**p, self.ctx.clone()).await;
        if let Some(e) = self.ctx.take_failure() {
            return Err(e);
        }
        let Err(e) = flushed else {
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

    /// The offsets that may be committed: below the first event still running
    /// or held back.
    fn offsets(&self) -> Offsets {
        let partition = self.ctx.partition();
        self.progress
            .iter()
            .map(|(tp, p)| {
                let held = (self.spec.agents_of(&tp.topic).into_iter())
                    .filter_map(|i| self.spec.processors[i].held_from(partition))
                    .min();
                let done = p.done_below();
                (tp.clone(), held.map_or(done, |h| h.min(done)))
            })
            .collect()
    }

    /// At least once: waits for this task's deliveries, commits its tables'
    /// writes (durably when due, or with `durable`), and answers the offsets.
    async fn checkpoint(&mut self, durable: bool) -> Result<Offsets, WorkerError> {
        if let Some(e) = self.ctx.take_failure() {
            return Err(e);
        }
        let offsets = self.offsets();
        self.store(durable).await?;
        Ok(offsets)
    }

    /// Commits the tables' pending writes to their stores: durably when the
    /// last durable checkpoint is old enough or enough changes piled up.
    async fn store(&mut self, durable: bool) -> Result<(), WorkerError> {
        self.changes += self.ctx.pending_changes().await as u64;
        let due = self.changes > 0
            && (self.last_durable.elapsed() >= self.spec.durable_interval
                || self.changes >= self.spec.durable_changes);
        let durability = if durable || due {
            Durability::Durable
        } else {
            Durability::Fast
        };
        self.ctx.checkpoint(durability).await?;
        if durability == Durability::Durable {
            self.last_durable = Instant::now();
            self.changes = 0;
        }
        Ok(())
    }

    /// Exactly once, the transaction committed: the tables take its writes,
    /// and reading would restart from the committed offsets.
    async fn committed(&mut self, offsets: &Offsets, close: bool) -> Result<(), WorkerError> {
        self.store(close).await?;
        let mut restart = self.restart.lock().unwrap_or_else(|e| e.into_inner());
        for (tp, offset) in offsets {
            restart.insert(tp.clone(), *offset);
        }
        Ok(())
    }

    /// Exactly once, the transaction aborted: forget what happened since the
    /// last commit; the records are read again under `epoch`.
    async fn aborted(&mut self, epoch: u64) {
        self.ctx.discard().await;
        let partition = self.ctx.partition();
        for p in &self.spec.processors {
            p.reset(partition);
        }
        self.progress.clear();
        self.backlog.taken(self.current.clear());
        self.waiting = None;
        self.epoch = epoch;
    }
}

/// Recovers `table`'s partition from its changelog, logging progress every few
/// seconds (records replayed / to replay, time left) and keeping the metrics
/// current.
pub(crate) async fn recover_reporting(
    spec: &Spec,
    store: Arc<dyn Store>,
    table: &str,
    changelog: &str,
    partition: i32,
) -> Result<Recovery, WorkerError> {
    const LOG_EVERY: u32 = 5;
    let progress = RecoveryProgress::default();
    let recovery = recover_with_progress(
        &spec.client,
        store,
        changelog,
        partition,
        spec.isolation(),
        &progress,
    );
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
