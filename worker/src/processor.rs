//! What the runtime runs: processors (the streams crate's agents, compiled down
//! to bytes) and the context they run in.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::ops::Bound;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use strom_client::backoff::Backoff;
use strom_client::consumer::ConsumerRecord;
use strom_client::producer::{DeliveryFuture, Producer, ProducerRecord};
use strom_state::window::Windowing;
use strom_state::{Durability, LoggedStore, StateError};
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};

use crate::error::WorkerError;
use crate::global::GlobalTables;
use crate::metrics::{Metrics, PartitionCounter};
use crate::windowed::{self, Emitting, Plan, PlanError, Window, WindowUpdate, Windowed};

/// What an agent's failure looks like to the runtime.
pub type AgentError = Box<dyn std::error::Error + Send + Sync>;

/// The error a processor returns for an event whose key or value does not
/// decode: counted as a decode error, never retried.
#[derive(Debug, thiserror::Error)]
#[error("undecodable event: {0}")]
pub struct DecodeError(pub String);

/// What happens to an event an agent fails on (an error, a panic, or an
/// undecodable key or value), and to a record batch of its topic that does
/// not decode however often it is fetched (a damaged batch, an unknown
/// codec): `Stop` stops the worker at it; `DeadLetter` sends one record
/// without key or value whose headers give the batch's coordinates
/// (`strom.error.topic`, `strom.error.partition`, `strom.error.offset`,
/// `strom.error.last_offset`, `strom.error.message`) and steps over it;
/// `Skip` and `Retry` log it and step over it. `/metrics` counts such
/// batches in `strom_corrupt_batches_total`. A batch whose header is damaged
/// too cannot be stepped over (its offsets are unknown) and always stops the
/// worker.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ErrorPolicy {
    /// Log it, count it, go on with the next event (its offset is committed).
    #[default]
    Skip,
    /// Send the event's original key, value and headers to this topic, with
    /// headers `strom.error.topic`, `strom.error.partition`,
    /// `strom.error.offset` and `strom.error.message`, then go on. The send is
    /// acknowledged before the offset is committed.
    DeadLetter(String),
    /// Process the event again up to `attempts` more times, waiting `backoff`
    /// before the first retry and twice as long before each next one; then
    /// skip it. Undecodable events are skipped at once.
    Retry {
        /// Retries after the first failure.
        attempts: u32,
        /// Wait before the first retry.
        backoff: std::time::Duration,
    },
    /// Stop the worker with an error naming the event (it is processed again
    /// after a restart: its offset is not committed).
    Stop,
}

/// The future of processing one event.
pub type ProcessFuture<'a> = Pin<Box<dyn Future<Output = Result<(), AgentError>> + Send + 'a>>;

/// Processes the events of one source topic: in order per partition, or up
/// to [`Processor::concurrency`] at once.
///
/// An error (or a panic) is handled by the processor's [`ErrorPolicy`]: skip,
/// dead-letter, retry or stop. A failure of the framework's own calls made
/// through the [`Context`] (a send, a table write) is not the processor's
/// error: no policy skips it, and the worker stops without committing the
/// event.
///
/// A processor may hold events back (batching): it reports the earliest one in
/// [`Processor::held_from`], so no offset is committed past an event still
/// held, and hands them on in [`Processor::flush`], which the runtime calls
/// when [`Processor::deadline`] passes and before the partition closes.
pub trait Processor: Send + Sync {
    /// The topic whose events this processor takes.
    fn topic(&self) -> &str;

    /// Processes one event.
    fn process(&self, ctx: Context, record: ConsumerRecord) -> ProcessFuture<'_>;

    /// How many events of one partition may be processed at once. With more
    /// than one their order is not kept, and offsets are committed up to the
    /// first event not yet done. Default 1: in order.
    fn concurrency(&self) -> usize {
        1
    }

    /// The offset (in [`Processor::topic`]) of the earliest event held back
    /// for `partition`, if any.
    fn held_from(&self, _partition: i32) -> Option<i64> {
        None
    }

    /// Processes whatever this processor holds back for `ctx`'s partition.
    fn flush(&self, _ctx: Context) -> ProcessFuture<'_> {
        Box::pin(async { Ok(()) })
    }

    /// When the events held back for `partition` must be flushed at the
    /// latest, if any are held.
    fn deadline(&self, _partition: i32) -> Option<tokio::time::Instant> {
        None
    }

    /// This processor's error policy; `None` takes the worker's.
    fn error_policy(&self) -> Option<&ErrorPolicy> {
        None
    }

    /// Forgets anything held for `partition`: called when this worker starts
    /// on it, since what was held before it was lost is processed again from
    /// the committed offset.
    fn reset(&self, _partition: i32) {}
}

/// One table of a partition with its access counters.
#[derive(Debug)]
pub(crate) struct TableSlot {
    pub store: LoggedStore,
    pub reads: PartitionCounter,
    pub writes: PartitionCounter,
    /// A windowed table's windows.
    pub windows: Option<Windowed>,
}

/// The tables of one partition.
#[derive(Debug)]
pub(crate) struct PartitionState {
    pub tables: BTreeMap<String, TableSlot>,
}

/// What one partition's sends book: apart from the tables' lock, and never
/// held across an await (a send takes it once its record is in the
/// producer).
#[derive(Debug, Default)]
struct Sends {
    /// Deliveries of the records sent since the last checkpoint, one per
    /// batch.
    deliveries: Vec<DeliveryFuture>,
    /// The counter of records sent, by topic.
    sent: HashMap<String, PartitionCounter>,
}

/// How many of the latest deliveries a send looks through for one of its
/// batch (see [`Context::send`]).
const RECENT_BATCHES: usize = 16;

/// Attempts a framework call (a send, a table write) gets before the worker
/// gives up on it.
const ATTEMPTS: u32 = 3;

/// What a processor sees while it handles an event of one partition: that
/// partition's tables and a producer. Everything sent or written through it
/// is acknowledged before the event's offset is committed (or, under
/// exactly-once, commits in the same transaction as the offset).
///
/// Its own calls are retried when the failure is retriable; one that still
/// fails is not the agent's error: the event is not committed, whatever the
/// agent's error policy, and the worker stops.
///
/// A cheap handle: clone it into the futures an agent spawns.
#[derive(Debug, Clone)]
pub struct Context {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    partition: i32,
    partitions: usize,
    state: Mutex<PartitionState>,
    sends: std::sync::Mutex<Sends>,
    /// The worker's global tables.
    globals: Arc<GlobalTables>,
    producer: Producer,
    metrics: Metrics,
    /// The first framework call that failed for good since the last event
    /// boundary the task looked at.
    failure: std::sync::Mutex<Option<WorkerError>>,
    /// `failure` holds one: the task looks after every event, and
    /// almost always finds none, without taking the lock.
    failed: std::sync::atomic::AtomicBool,
    /// The latest event time seen (`i64::MIN`: none yet).
    stream_time: std::sync::atomic::AtomicI64,
    /// Updates of windowed tables whose closed windows are still being
    /// emitted (see [`WindowUpdate`]).
    emitting: Arc<std::sync::atomic::AtomicUsize>,
    /// The stream time at the last checkpoint: where an aborted
    /// transaction's events are processed again from.
    checkpointed_time: std::sync::atomic::AtomicI64,
}

impl Context {
    pub(crate) fn new(
        partition: i32,
        partitions: usize,
        tables: BTreeMap<String, (LoggedStore, Option<Windowing>)>,
        globals: Arc<GlobalTables>,
        producer: Producer,
        metrics: Metrics,
        exactly_once: bool,
    ) -> Context {
        let tables = tables
            .into_iter()
            .map(|(name, (store, windowing))| {
                let (reads, writes) = metrics.table_counters(&name);
                let windows =
                    windowing.map(|w| Windowed::new(w, metrics.late_events(&name), exactly_once));
                let slot = TableSlot {
                    store,
                    reads: PartitionCounter::new(reads),
                    writes: PartitionCounter::new(writes),
                    windows,
                };
                (name, slot)
            })
            .collect();
        Context {
            inner: Arc::new(Shared {
                partition,
                partitions,
                state: Mutex::new(PartitionState { tables }),
                sends: std::sync::Mutex::default(),
                globals,
                producer,
                metrics,
                failure: std::sync::Mutex::new(None),
                failed: std::sync::atomic::AtomicBool::new(false),
                stream_time: std::sync::atomic::AtomicI64::new(i64::MIN),
                emitting: Arc::default(),
                checkpointed_time: std::sync::atomic::AtomicI64::new(i64::MIN),
            }),
        }
    }

    /// Notes that an event of time `timestamp` (ms since the epoch) is being
    /// processed; returns the partition's stream time, which includes it.
    pub fn observe_event_time(&self, timestamp: i64) -> i64 {
        let before = self
            .inner
            .stream_time
            .fetch_max(timestamp, Ordering::AcqRel);
        before.max(timestamp)
    }

    /// The partition's stream time: the latest event time its task has seen
    /// (`None` before its first event), or, once a windowed table is used,
    /// the one its windows record, if later. A late event leaves it where
    /// it is; it goes back only when an aborted transaction's events are
    /// read again (to where it was at the last checkpoint).
    pub fn stream_time(&self) -> Option<i64> {
        let t = self.inner.stream_time.load(Ordering::Acquire);
        (t != i64::MIN).then_some(t)
    }

    /// The partition being processed.
    pub fn partition(&self) -> i32 {
        self.inner.partition
    }

    /// The partition count of the source topics (and the tables).
    pub fn partitions(&self) -> usize {
        self.inner.partitions
    }

    pub(crate) async fn state(&self) -> MutexGuard<'_, PartitionState> {
        self.inner.state.lock().await
    }

    /// Adds the counts this partition held back to the metrics.
    fn flush_counters(&self, state: &PartitionState) {
        for table in state.tables.values() {
            table.reads.flush();
            table.writes.flush();
        }
        self.sends().sent.values().for_each(PartitionCounter::flush);
    }

    fn sends(&self) -> std::sync::MutexGuard<'_, Sends> {
        self.inner.sends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The framework failure met since the last call, if any (see [`Context`]).
    pub(crate) fn take_failure(&self) -> Option<WorkerError> {
        if !self.inner.failed.load(Ordering::Acquire) {
            return None;
        }
        let mut failure = self.inner.failure.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.failed.store(false, Ordering::Release);
        failure.take()
    }

    /// Records a framework failure (the first since the task last looked
    /// stays).
    fn record_failure(&self, failure: impl FnOnce() -> WorkerError) {
        let mut first = self.inner.failure.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert_with(failure);
        self.inner.failed.store(true, Ordering::Release);
    }

    /// After a framework call failed with `e`: `Ok` to try it again (after a
    /// pause) when the failure is retriable and attempts are left; otherwise
    /// the failure is recorded (see [`Context::take_failure`]) and returned.
    async fn retry(
        &self,
        what: &str,
        attempts: &mut Backoff,
        e: WorkerError,
    ) -> Result<(), WorkerError> {
        let attempt = attempts.attempts() + 1;
        if e.is_retriable() && attempt < ATTEMPTS {
            tracing::warn!(partition = self.partition(), what, attempt, error = %e, "retrying");
            attempts.wait().await;
            return Ok(());
        }
        let failed = |error: String| WorkerError::Framework {
            partition: self.partition(),
            what: what.to_owned(),
            attempts: attempt,
            error,
        };
        let text = e.to_string();
        self.record_failure(|| failed(text.clone()));
        Err(failed(text))
    }

    /// This partition of table `name`, locked for the caller (reads and
    /// writes through it are not counted in the metrics; [`Context::get`],
    /// [`Context::put`] and [`Context::delete`] are).
    pub async fn table(
        &self,
        name: &str,
    ) -> Result<MappedMutexGuard<'_, LoggedStore>, WorkerError> {
        MutexGuard::try_map(self.state().await, |s| {
            s.tables.get_mut(name).map(|t| &mut t.store)
        })
        .map_err(|_| no_table(name))
    }

    /// The value of `key` in this partition of table `name`.
    pub async fn get(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, WorkerError> {
        let state = self.state().await;
        let table = plain(&state.tables, name)?;
        table.reads.inc();
        Ok(table.store.get(key)?)
    }

    /// The value of `key` in global table `name`: `key` as its source
    /// topic's records carry it (the bytes its key codec writes). Read from
    /// this worker's copy of the whole table, whatever the partition. A
    /// store that cannot be read fails the event as a framework call does
    /// (see [`Context`]).
    pub fn global(&self, name: &str, key: &[u8]) -> Result<Option<Vec<u8>>, WorkerError> {
        match self.inner.globals.get(name, key) {
            Some(Ok(value)) => Ok(value),
            Some(Err(e)) => Err(self.fail(&format!("read global table {name:?}"), e.to_string())),
            // The app's declaration is wrong, not the event: stop.
            None => Err(self.fail(
                "read a global table",
                format!("no global table named {name:?}"),
            )),
        }
    }

    /// The entries of this partition of table `name` with keys within the
    /// bounds, in key order (changes not flushed yet included). Read at
    /// once, under the partition's lock: for bounded scans.
    pub async fn range(
        &self,
        name: &str,
        from: Bound<&[u8]>,
        to: Bound<&[u8]>,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, WorkerError> {
        let state = self.state().await;
        let table = plain(&state.tables, name)?;
        table.reads.inc();
        Ok(table.store.range(from, to)?)
    }

    /// Records that `what` failed for good with `error`, like a framework
    /// call that did (see [`Context`]): the event is not committed and the
    /// worker stops, whatever the agent's error policy. Returns the failure
    /// for the agent to pass on. For failures that must not be skipped,
    /// such as emitting a closed window, which is handed out only once.
    pub fn fail(&self, what: &str, error: String) -> WorkerError {
        let failed = || WorkerError::Framework {
            partition: self.partition(),
            what: what.to_owned(),
            attempts: 1,
            error: error.clone(),
        };
        self.record_failure(failed);
        failed()
    }

    /// Reports that table `name` holds a value at `key` that does not decode
    /// (`what` says why): damaged state, not the agent's error. The store is
    /// marked so that its next open moves it aside and rebuilds it from the
    /// changelog, and the failure is recorded like a framework call that
    /// failed for good: the event is not committed and the worker stops,
    /// whatever the agent's error policy. Returns that failure for the agent
    /// to pass on.
    pub async fn damaged(&self, name: &str, key: &[u8], what: &str) -> WorkerError {
        let damaged = || WorkerError::DamagedState {
            table: name.to_owned(),
            partition: self.partition(),
            key: String::from_utf8_lossy(key).into_owned(),
            what: what.to_owned(),
        };
        let error = damaged();
        let state = self.state().await;
        if let Some(table) = state.tables.get(name) {
            if let Err(e) = table.store.store().mark_damaged(&error.to_string()) {
                tracing::warn!(table = name, partition = self.partition(), error = %e,
                    "cannot mark the damaged store; it is checked again at its next open");
            }
        }
        drop(state);
        tracing::error!(error = %error, "damaged table state");
        self.record_failure(damaged);
        error
    }

    /// Sets `key` to `value` in this partition of table `name`.
    pub async fn put(&self, name: &str, key: Vec<u8>, value: Vec<u8>) -> Result<(), WorkerError> {
        self.write(name, key, Some(value)).await
    }

    /// Deletes `key` from this partition of table `name`.
    pub async fn delete(&self, name: &str, key: Vec<u8>) -> Result<(), WorkerError> {
        self.write(name, key, None).await
    }

    async fn write(
        &self,
        name: &str,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), WorkerError> {
        let mut state = self.state().await;
        plain(&state.tables, name)?;
        let table = state.tables.get_mut(name).ok_or_else(|| no_table(name))?;
        table.writes.inc();
        self.write_to(&mut table.store, key, value).await
    }

    /// Writes `key` to `store` (deletes it when `value` is `None`), retrying
    /// as framework calls do.
    async fn write_to(
        &self,
        store: &mut LoggedStore,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), WorkerError> {
        let (mut key, mut value) = (key, value);
        let mut attempts = attempts();
        loop {
            match store.write(key, value).await {
                Ok(()) => return Ok(()),
                Err(refused) => {
                    self.retry("a table write", &mut attempts, refused.error.into())
                        .await?;
                    (key, value) = (refused.key, refused.value);
                }
            }
        }
    }

    /// Replaces the value of `key` in table `name` with the bytes `f` makes
    /// of the old value, atomically: no other event of this partition reads or
    /// writes the table in between (so concurrent events lose no update).
    /// Returns the rest of what `f` returned; when `f` fails nothing is written.
    ///
    /// ```no_run
    /// # async fn f(ctx: strom_worker::Context) -> Result<(), strom_worker::WorkerError> {
    /// let n = ctx
    ///     .update("counts", b"word".to_vec(), |old| {
    ///         let n = old.map_or(0, |b| b.len() as u64) + 1;
    ///         Ok::<_, String>((vec![0; n as usize], n))
    ///     })
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn update<R, E>(
        &self,
        name: &str,
        key: Vec<u8>,
        f: impl FnOnce(Option<Vec<u8>>) -> Result<(Vec<u8>, R), E>,
    ) -> Result<Result<R, E>, WorkerError> {
        let mut state = self.state().await;
        plain(&state.tables, name)?;
        let table = state.tables.get_mut(name).ok_or_else(|| no_table(name))?;
        table.reads.inc();
        let (new, out) = match f(table.store.get(&key)?) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
        table.writes.inc();
        self.write_to(&mut table.store, key, Some(new)).await?;
        Ok(Ok(out))
    }

    /// Updates `key`'s windows in windowed table `name` for an event of time
    /// `event_time` (ms since the epoch): each of the event's windows that
    /// has not closed gets the bytes `f` makes of its old value, atomically
    /// as [`Context::update`] does. The partition's stream time moves on to
    /// `event_time` if it is later; the windows of any key that close with it
    /// come back with their final values, each once, and those older than
    /// the retention are deleted. An event whose every window had closed is
    /// late: nothing is written, it is counted in
    /// `strom_late_events_total{table}`, and `current` is `None`.
    ///
    /// Of a session table, the event's session takes in the open sessions
    /// of `key` it falls in or within the gap of: `f` gets the value
    /// `merge` makes of theirs (in time order), and the merged ones'
    /// entries are deleted. Other tables never call `merge`.
    ///
    /// When `f` or `merge` fails nothing is written and nothing closes. A stored value
    /// that is no window's is damaged state (see [`Context::damaged`]).
    pub async fn update_windows<R, E>(
        &self,
        name: &str,
        key: &[u8],
        event_time: i64,
        f: impl FnMut(Option<&[u8]>) -> Result<(Vec<u8>, R), E>,
        merge: impl FnMut(&[u8], &[u8]) -> Result<Vec<u8>, E>,
    ) -> Result<Result<WindowUpdate<R>, E>, WorkerError> {
        let mut state = self.state().await;
        let table = state.tables.get_mut(name).ok_or_else(|| no_table(name))?;
        let Some(windows) = table.windows.as_mut() else {
            return Err(not_windowed(name));
        };
        let planned = match windows.open(&table.store) {
            Ok(restored) => {
                if let Some(t) = restored {
                    self.observe_event_time(t);
                }
                let stream_time = self.observe_event_time(event_time);
                table.reads.inc();
                windows
                    .plan(&table.store, key, event_time, stream_time, f, merge)
                    .map(|plan| (plan, stream_time))
            }
            Err(e) => Err(PlanError::Store(e)),
        };
        let (
            Plan {
                writes,
                merged,
                deletes,
                current,
            },
            stream_time,
        ) = match planned {
            Ok(p) => p,
            Err(PlanError::Update(e)) => return Ok(Err(e)),
            Err(PlanError::Store(e)) => {
                drop(state);
                return Err(self.state_error(name, key, e).await);
            }
        };
        if current.is_none() {
            windows.late.inc();
        }
        for window in merged {
            windows.merged(key, window);
        }
        // The merged session reaches the changelog before the tombstones of
        // the ones it takes in: a crash between them counts twice at least
        // once, never loses a session.
        for (window, (store_key, value)) in writes {
            table.writes.inc();
            self.write_to(&mut table.store, store_key, value).await?;
            windows.written(key, window);
        }
        for (store_key, value) in deletes {
            self.write_to(&mut table.store, store_key, value).await?;
        }
        let (closed, changes) = match windows.close(&table.store, stream_time) {
            Ok(c) => c,
            Err(e) => {
                drop(state);
                return Err(self.state_error(name, key, e).await);
            }
        };
        for (store_key, value) in changes {
            self.write_to(&mut table.store, store_key, value).await?;
        }
        let emitting = (!closed.is_empty()).then(|| Emitting::start(&self.inner.emitting));
        Ok(Ok(WindowUpdate {
            current,
            closed,
            emitting,
        }))
    }

    /// A store error met by a windowed table: a codec error is damaged state.
    async fn state_error(&self, name: &str, key: &[u8], e: StateError) -> WorkerError {
        match e {
            StateError::Codec { what } => self.damaged(name, key, &what).await,
            e => e.into(),
        }
    }

    /// The value of `key` in windowed table `name` at time `time`, if it
    /// has one (including writes not checkpointed yet): of the window
    /// [`Windowing::holding`](strom_state::window::Windowing::holding) picks
    /// (the latest aligned window holding `time`, the session holding it, or
    /// the sliding window holding exactly the events within the difference
    /// up to it).
    pub async fn value_at(
        &self,
        name: &str,
        key: &[u8],
        time: i64,
    ) -> Result<Option<Vec<u8>>, WorkerError> {
        let state = self.state().await;
        let table = state.tables.get(name).ok_or_else(|| no_table(name))?;
        let Some(windowing) = table.windows.as_ref().map(|w| w.windowing) else {
            return Err(not_windowed(name));
        };
        table.reads.inc();
        let found = windowed::value_at(&table.store, &windowing, key, time);
        drop(state);
        match found {
            Ok(value) => Ok(value),
            Err(e) => Err(self.state_error(name, key, e).await),
        }
    }

    /// The live windows of `key` in windowed table `name`, with their
    /// values, in time order (including writes not checkpointed yet);
    /// `None` when the table is not windowed.
    pub async fn windows(
        &self,
        name: &str,
        key: &[u8],
    ) -> Result<Option<Vec<(Window, Vec<u8>)>>, WorkerError> {
        let state = self.state().await;
        let table = state.tables.get(name).ok_or_else(|| no_table(name))?;
        let Some(windows) = &table.windows else {
            return Ok(None);
        };
        table.reads.inc();
        Ok(Some(windowed::windows_of_key(
            &table.store,
            &windows.windowing,
            key,
        )?))
    }

    /// Sends a record; its acknowledgement is awaited before the current
    /// event's offset is committed.
    pub async fn send(&self, record: ProducerRecord<'_>) -> Result<(), WorkerError> {
        let topic = record.topic;
        let mut attempts = attempts();
        let delivery = loop {
            match self.inner.producer.send(record).await {
                Ok(d) => break d,
                Err(e) => self.retry("a send", &mut attempts, e.into()).await?,
            }
        };
        let mut sends = self.sends();
        match sends.sent.get(topic) {
            Some(c) => {
                c.inc();
            }
            None => {
                let c = PartitionCounter::new(self.inner.metrics.events_out(topic));
                c.inc();
                sends.sent.insert(topic.to_owned(), c);
            }
        }
        // Waiting for one record of a batch waits for all of it: keep one
        // future per batch (sends spread over partitions interleave, so look
        // a few back), so an event that sends millions of records holds
        // futures for its batches, not its records.
        let known = sends
            .deliveries
            .iter()
            .rev()
            .take(RECENT_BATCHES)
            .any(|d| d.same_batch(&delivery));
        if !known {
            sends.deliveries.push(delivery);
        }
        Ok(())
    }

    /// Waits for every record this partition's finished events sent since
    /// the last checkpoint (a send of an event still running, with
    /// `concurrency`, may go to the next one: that event's offset is not
    /// committed by this one), then commits the tables' pending writes
    /// (with their changelog offsets) to their stores. Waits for nothing of
    /// other partitions.
    pub(crate) async fn checkpoint(&self, durability: Durability) -> Result<(), WorkerError> {
        let mut state = self.state().await;
        // Closed windows still being emitted are not marked as emitted. Read
        // before the deliveries are taken: an emission starts only under the
        // tables' lock (held here), and one that ended has booked all its
        // sends, so they are among the deliveries waited for below. Read
        // after, an emission that ended meanwhile would be marked while its
        // last sends go to the next checkpoint.
        let emitting = self.inner.emitting.load(Ordering::Acquire) > 0;
        let deliveries = std::mem::take(&mut self.sends().deliveries);
        self.flush_counters(&state);
        for d in deliveries {
            let done = match d.try_result() {
                Some(done) => done,
                None => d.await,
            };
            if let Err(source) = done {
                return Err(WorkerError::Delivery {
                    partition: self.partition(),
                    source,
                });
            }
        }
        for table in state.tables.values_mut() {
            let marks = match &mut table.windows {
                Some(windows) if !emitting => windows.checkpoint(),
                _ => Vec::new(),
            };
            for (key, value) in marks {
                self.write_to(&mut table.store, key, value).await?;
            }
            table.store.flush(durability).await?;
        }
        let time = self.inner.stream_time.load(Ordering::Acquire);
        self.inner.checkpointed_time.store(time, Ordering::Release);
        Ok(())
    }

    /// Forgets everything written since the last checkpoint (its transaction
    /// was aborted): pending table writes and deliveries.
    pub(crate) async fn discard(&self) {
        let mut state = self.state().await;
        self.sends().deliveries.clear();
        self.flush_counters(&state);
        for table in state.tables.values_mut() {
            table.store.discard();
            if let Some(windows) = &mut table.windows {
                windows.forget();
            }
        }
        let time = self.inner.checkpointed_time.load(Ordering::Acquire);
        self.inner.stream_time.store(time, Ordering::Release);
        self.take_failure();
    }

    /// Table changes waiting for the next checkpoint.
    pub(crate) async fn pending_changes(&self) -> usize {
        let state = self.state().await;
        state.tables.values().map(|t| t.store.pending()).sum()
    }
}

/// The pauses between attempts of a framework call.
fn attempts() -> Backoff {
    Backoff::new(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(1),
    )
}

fn no_table(name: &str) -> WorkerError {
    WorkerError::Config(format!("no table named {name:?} is declared"))
}

fn not_windowed(name: &str) -> WorkerError {
    WorkerError::Config(format!("table {name:?} is not windowed"))
}

/// Table `name`, which must not be windowed (its entries are windows').
fn plain<'a>(
    tables: &'a BTreeMap<String, TableSlot>,
    name: &str,
) -> Result<&'a TableSlot, WorkerError> {
    let table = tables.get(name).ok_or_else(|| no_table(name))?;
    if table.windows.is_some() {
        return Err(WorkerError::Config(format!(
            "table {name:?} is windowed: read and update it by window"
        )));
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strom_client::mock::MockCluster;
    use strom_client::producer::ProducerConfig;

    /// An event that sends many records holds a future per batch, not per
    /// record, and its checkpoint still waits for every one of them.
    #[tokio::test]
    async fn one_future_per_batch_is_kept() {
        let cluster = MockCluster::new();
        cluster.create_topic("out", 2);
        let client = strom_client::Client::connect(cluster.client_config())
            .await
            .unwrap();
        let producer = Producer::new(client, ProducerConfig::default()).unwrap();
        let ctx = Context::new(
            0,
            2,
            BTreeMap::new(),
            Arc::default(),
            producer,
            Metrics::default(),
            false,
        );
        for i in 0..20_000u32 {
            let key = i.to_string();
            ctx.send(ProducerRecord::to("out").key(key.as_bytes()).value(b"v"))
                .await
                .unwrap();
        }
        let held = ctx.sends().deliveries.len();
        assert!(held < 200, "{held} futures held for 20,000 records");
        ctx.checkpoint(Durability::Fast).await.unwrap();
        let written = cluster.records("out", 0).len() + cluster.records("out", 1).len();
        assert_eq!(
            written, 20_000,
            "the checkpoint returned before every record was written"
        );
    }
}
