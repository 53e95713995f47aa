//! Testing an app without a broker (feature `testing`): [`TestDriver`] runs
//! the app's real worker — the same agents, operators, error policies,
//! tables, changelogs and timers — against an in-memory Kafka cluster
//! (`strom_client::mock`), on tokio's paused clock.
//!
//! ```
//! use strom::codec::{NoKey, Utf8};
//! use strom::testing::TestDriver;
//! use strom::App;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> strom::Result<()> {
//! // The app, declared as in production.
//! let mut app = App::new("wordcount");
//! let sentences = app.topic::<(), String>("sentences").with_key_codec(NoKey).with_value_codec(Utf8);
//! let counts = app.table::<String, u64>("word-counts", 0);
//! let table = counts.clone();
//! app.agent(&sentences)
//!     .flat_map(|line: String| line.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>())
//!     .group_by(|event| event.value.clone(), "words")
//!     .for_each(move |ctx, event| {
//!         let counts = table.clone();
//!         async move {
//!             ctx.update(&counts, &event.key, |n| n + 1).await?;
//!             Ok(())
//!         }
//!     });
//!
//! // The test: in `#[tokio::test] async fn ...`.
//! let mut driver = TestDriver::new(app).await?;
//! driver.send(&sentences, &(), &"the cat and the hat".to_string()).await?;
//! assert_eq!(driver.table(&counts).get(&"the".to_string())?, 2);
//! assert_eq!(driver.table(&counts).get(&"dog".to_string())?, 0);
//! # Ok(()) }
//! ```
//!
//! # What is the same as in production, and what is not
//!
//! Topics are created with their declared partition counts, keys are
//! partitioned by Kafka's rule, `group_by` goes through its repartition
//! topic, tables write their changelogs and [`TestDriver::restart`] restores
//! them from there. The differences: one worker, stores in memory, the
//! producer sends at once (no linger), and the app runs at least once
//! whatever its guarantee (exactly-once commits on an interval, which would
//! hide outputs until the clock moves). The outputs are the same as long as
//! nothing fails: where exactly-once would abort what an event that stopped
//! the app had sent and written, the driver still shows it in `read` and
//! `table`.
//!
//! # Time
//!
//! The driver pauses tokio's clock (`tokio::time::pause`; the test runs on
//! the current-thread runtime, `#[tokio::test]`'s default). Time moves when
//! the test says so ([`TestDriver::advance`]) and, by a millisecond or more,
//! each time the driver waits for the app to be done with what was sent
//! ([`TestDriver::send`], [`TestDriver::run_until_idle`]): as long as an
//! agent is not done with some record — it sleeps, or waits out a retry's
//! back-off — the clock goes on. Interval and cron timers and
//! `take(n, within)` deadlines run on that clock: advance it to let them
//! fire. Records sent without a timestamp
//! carry the driver's clock ([`TestDriver::now`]): the wall time when the
//! driver started, plus the virtual time since; so do records timers send.
//! Records agents send carry the time of the event that caused them.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use strom_client::mock::{LoggedRecord, MockCluster};
use strom_client::partitioner::partition_for_key;
use strom_client::producer::{DeliveryFuture, Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, Header};
use strom_state::window;
use strom_state::TableKey;
use strom_worker::timer::WallClock;
use strom_worker::{Metrics, ProcessingGuarantee, StoreKind, WorkerConfig, WorkerError};
use tokio::runtime::RuntimeFlavor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::app::App;
use crate::error::{Error, Result};
use crate::global::GlobalTable;
use crate::table::{SetTable, Table, Window, WindowedTable};
use crate::topic::Topic;

/// How long (of the virtual clock) the app may take to start: join its
/// group and restore its tables.
const START_LIMIT: Duration = Duration::from_secs(120);

/// How long (of the virtual clock) [`TestDriver::run_until_idle`] waits for
/// the app to be done with the records sent.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// How long (of the virtual clock) the app may take to stop.
const STOP_LIMIT: Duration = Duration::from_secs(120);

/// Runs an [`App`] in the test, without a broker (see the [module
/// docs](self)).
pub struct TestDriver {
    app: App,
    cluster: MockCluster,
    client: Client,
    input: Producer,
    worker: Option<Running>,
    /// Per topic partition, the offset [`TestDriver::read`] goes on from.
    cursors: HashMap<(String, i32), i64>,
    /// Why the worker stopped, once it stopped on an error.
    stopped: Option<String>,
    /// Wall time (ms since the epoch) when the driver started, and the
    /// virtual instant it corresponds to.
    epoch: (i64, Instant),
}

impl std::fmt::Debug for TestDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDriver")
            .field("app", &self.app.id())
            .field("running", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// The worker the driver runs.
struct Running {
    stop: oneshot::Sender<()>,
    join: JoinHandle<Result<(), WorkerError>>,
    metrics: Metrics,
    /// Per topic partition the app reads, the offset it starts from (the
    /// group's committed offset when it started): its metrics count the
    /// events handed to agents from there.
    start: HashMap<(String, i32), i64>,
    /// The topics the app reads (patterns as their matches), with how many
    /// agents (and partition timers, which count an event done too) read
    /// each.
    agents: HashMap<String, u64>,
}

/// A record of a topic, as [`TestDriver::read`] returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct TestRecord<K, V> {
    /// The key.
    pub key: K,
    /// The value.
    pub value: V,
    /// Milliseconds since the epoch.
    pub timestamp: i64,
    /// The headers.
    pub headers: Vec<Header>,
    /// The partition it went to.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

/// A record's key and value as bytes (`None`: null), for
/// [`TestDriver::read_raw`].
pub type RawRecord = TestRecord<Option<Bytes>, Option<Bytes>>;

impl TestDriver {
    /// Starts `app` on an in-memory cluster and waits until it processes
    /// every partition. Must be called on tokio's current-thread runtime
    /// (`#[tokio::test]`); pauses its clock. The driver's clock starts at
    /// the system's time ([`TestDriver::starting_at`] sets it).
    pub async fn new(app: App) -> Result<TestDriver> {
        Self::starting_at(app, wall_ms()).await
    }

    /// [`TestDriver::new`] with the driver's clock starting at `wall_ms`
    /// (ms since the epoch): for tests of cron timers or of timestamps that
    /// must not depend on when the test runs.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> strom::Result<()> {
    /// let mut app = strom::App::new("clock");
    /// let input = app.topic::<String, u64>("input");
    /// app.agent(&input).for_each(|_ctx, _event| async { Ok(()) });
    /// let new_year = 1_767_225_600_000; // 2026-01-01T00:00:00Z
    /// let driver = strom::testing::TestDriver::starting_at(app, new_year).await?;
    /// assert!(driver.now() - new_year < 1_000);
    /// # Ok(()) }
    /// ```
    pub async fn starting_at(app: App, wall_ms: i64) -> Result<TestDriver> {
        pause_clock()?;
        let cluster = MockCluster::new();
        let client = Client::connect(cluster.client_config()).await?;
        app.create_topics(&client).await?;
        let input = Producer::new(
            client.clone(),
            ProducerConfig {
                linger: Duration::ZERO,
                ..ProducerConfig::default()
            },
        )?;
        let mut driver = TestDriver {
            app,
            cluster,
            client,
            input,
            worker: None,
            cursors: HashMap::new(),
            stopped: None,
            epoch: (wall_ms, Instant::now()),
        };
        driver.start().await?;
        Ok(driver)
    }

    /// The worker's settings: the app's, on the in-memory cluster.
    fn config(&self) -> WorkerConfig {
        let mut config = self.app.config.clone();
        config.client = self.cluster.client_config();
        config.store = StoreKind::Memory;
        config.instance_id = Some(format!("{}-test-driver", self.app.id()));
        config.static_membership = false;
        config.standby_replicas = 0;
        config.web = None;
        config.linger = Duration::ZERO;
        config.guarantee = ProcessingGuarantee::AtLeastOnce;
        config.wall_clock = WallClock::Tokio {
            start: self.epoch.0,
            at: self.epoch.1,
        };
        config
    }

    async fn start(&mut self) -> Result<()> {
        let worker = self.app.worker(self.config());
        let metrics = worker.metrics().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(worker.run(async {
            let _ = stopped.await;
        }));
        let agents = self.agents().await?;
        let mut start = HashMap::new();
        let mut partitions = 0;
        for topic in agents.keys() {
            let count = self.cluster.partitions(topic).unwrap_or(0);
            partitions = partitions.max(count as usize);
            for p in 0..count {
                let committed = self.cluster.committed(self.app.id(), topic, p);
                start.insert((topic.to_owned(), p), committed.unwrap_or(0));
            }
        }
        self.worker = Some(Running {
            stop,
            join,
            metrics,
            start,
            agents,
        });
        if partitions == 0 {
            return Err(Error::Config("the app reads no topic".into()));
        }
        let started = Instant::now();
        while started.elapsed() < START_LIMIT {
            self.run_until_idle().await?;
            if self.ready_partitions(partitions) == partitions {
                return Ok(());
            }
        }
        Err(Error::Config(format!(
            "the test driver's worker did not process all {partitions} partitions within {START_LIMIT:?} (of the virtual clock)"
        )))
    }

    /// Partition numbers the worker processes (done restoring).
    fn ready_partitions(&self, partitions: usize) -> usize {
        let Some(running) = &self.worker else {
            return 0;
        };
        (0..partitions as i32)
            .filter(|&p| running.metrics.is_ready(p) == Some(true))
            .count()
    }

    /// Sends `key` → `value` to `topic`, partitioned by the key as a Kafka
    /// producer does, and returns when the app has done everything it
    /// caused (see [`TestDriver::run_until_idle`]). Its timestamp is
    /// [`TestDriver::now`].
    pub async fn send<K, V>(&mut self, topic: &Topic<K, V>, key: &K, value: &V) -> Result<()> {
        self.send_with(topic, key, value, None, &[]).await
    }

    /// [`TestDriver::send`] with the record timestamp `timestamp` (ms since
    /// the epoch): the event time of the event.
    pub async fn send_at<K, V>(
        &mut self,
        topic: &Topic<K, V>,
        key: &K,
        value: &V,
        timestamp: i64,
    ) -> Result<()> {
        self.send_with(topic, key, value, Some(timestamp), &[])
            .await
    }

    /// [`TestDriver::send`] with a timestamp (`None`: [`TestDriver::now`])
    /// and headers.
    pub async fn send_with<K, V>(
        &mut self,
        topic: &Topic<K, V>,
        key: &K,
        value: &V,
        timestamp: Option<i64>,
        headers: &[Header],
    ) -> Result<()> {
        self.check().await?;
        self.enqueue(topic, key, value, timestamp, headers)
            .await?
            .await?;
        self.run_until_idle().await
    }

    /// Sends every (key, value) of `records` to `topic`, as [`TestDriver::send`]
    /// does one, without waiting for the app in between: then returns when
    /// it has done everything they caused. For large inputs.
    pub async fn send_many<K, V>(
        &mut self,
        topic: &Topic<K, V>,
        records: impl IntoIterator<Item = (K, V)>,
    ) -> Result<()> {
        self.check().await?;
        let mut deliveries = Vec::new();
        for (key, value) in records {
            deliveries.push(self.enqueue(topic, &key, &value, None, &[]).await?);
        }
        for delivery in deliveries {
            delivery.await?;
        }
        self.run_until_idle().await
    }

    /// Hands one typed record to the input producer (`timestamp` `None`:
    /// [`TestDriver::now`]).
    async fn enqueue<K, V>(
        &self,
        topic: &Topic<K, V>,
        key: &K,
        value: &V,
        timestamp: Option<i64>,
        headers: &[Header],
    ) -> Result<DeliveryFuture> {
        let (key, value) = crate::context::encode(topic, key, value)?;
        let mut record = ProducerRecord::to(&topic.spec.name);
        record.key = key.as_deref();
        record.value = value.as_deref();
        record.headers = headers;
        record.timestamp = Some(timestamp.unwrap_or_else(|| self.now()));
        Ok(self.input.send(record).await?)
    }

    /// Sends a record of bytes to `topic` by name (`None`: a null key or
    /// value), partitioned by its key: for input that the topic's codecs
    /// would refuse to encode, such as a value that does not decode.
    pub async fn send_raw(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<()> {
        self.check().await?;
        let mut record = ProducerRecord::to(topic);
        record.key = key;
        record.value = value;
        record.timestamp = Some(self.now());
        self.input.send(record).await?.await?;
        self.run_until_idle().await
    }

    /// The worker's metrics as its `/metrics` page shows them (Prometheus
    /// text): events in and out, agent and decode errors, dead letters, ….
    pub fn metrics(&self) -> String {
        self.worker
            .as_ref()
            .map(|r| r.metrics.render())
            .unwrap_or_default()
    }

    /// Lets the app run until every agent is done with every record sent
    /// to a topic it reads, and nothing is left to do but wait for time to
    /// pass: outputs, repartitioned events and what they caused, table
    /// writes, retries — all done. An error that stopped the app (an agent
    /// under [`ErrorPolicy::Stop`], a framework failure) is returned here.
    ///
    /// The paused clock moves only when no task can run, so once it moved,
    /// what is left waits on a timer. Usually a millisecond does; while an
    /// agent is not done with some record (it sleeps, it waits out a retry's
    /// back-off, or a fetch waits out its long poll after reading paused for
    /// backpressure), the clock goes on, in growing steps of up to 100 ms,
    /// until it is — for up to a minute of virtual time, then this fails.
    /// Events `take(n, within)` holds count as done: `within` passes only
    /// when the test advances the clock.
    ///
    /// [`ErrorPolicy::Stop`]: crate::ErrorPolicy::Stop
    pub async fn run_until_idle(&mut self) -> Result<()> {
        let started = Instant::now();
        let mut step = Duration::from_millis(1);
        loop {
            tokio::time::sleep(step).await;
            self.check().await?;
            if self.caught_up() {
                return Ok(());
            }
            if started.elapsed() > SETTLE_LIMIT {
                return Err(Error::Config(format!(
                    "the app was not done with every record sent within {SETTLE_LIMIT:?} of the virtual clock"
                )));
            }
            step = (step * 2).min(Duration::from_millis(100));
        }
    }

    /// Whether each agent is done with every record of its topic since the
    /// worker started, and each global table has read all of its topic.
    fn caught_up(&self) -> bool {
        let Some(running) = &self.worker else {
            return true;
        };
        let globals_read = self.app.globals.iter().all(|(table, topic, _)| {
            (0..self.cluster.partitions(topic).unwrap_or(0)).all(|partition| {
                let end = self.cluster.end_offset(topic, partition);
                let applied = running.metrics.global_offset(table, partition);
                end == 0 || applied.is_some_and(|o| o + 1 >= end)
            })
        });
        globals_read
            && running.agents.iter().all(|(topic, &agents)| {
                (0..self.cluster.partitions(topic).unwrap_or(0)).all(|partition| {
                    let from = running.start.get(&(topic.to_owned(), partition));
                    let records = self.cluster.end_offset(topic, partition) - from.unwrap_or(&0);
                    running.metrics.events_done(topic, partition) >= records.max(0) as u64 * agents
                })
            })
    }

    /// The topics the app reads (patterns as their matches), with how many
    /// agents (and partition timers, which count an event done too) read
    /// each.
    async fn agents(&self) -> Result<HashMap<String, u64>> {
        let sources = self.app.source_topics(&self.client).await?;
        let mut agents: HashMap<String, u64> = HashMap::new();
        let punctuators = self.app.punctuators.iter().map(|(p, _)| p);
        for p in self.app.processors.iter().chain(punctuators) {
            for topic in sources.get(p.topic()).into_iter().flatten() {
                *agents.entry(topic.clone()).or_default() += 1;
            }
        }
        Ok(agents)
    }

    /// Moves the virtual clock by `by`, firing every timer, deadline and
    /// back-off that falls due, in order, then runs until idle.
    pub async fn advance(&mut self, by: Duration) -> Result<()> {
        self.check().await?;
        tokio::time::sleep(by).await;
        self.run_until_idle().await
    }

    /// The driver's wall clock (ms since the epoch): the time it started
    /// plus the virtual time since.
    pub fn now(&self) -> i64 {
        self.epoch.0 + self.epoch.1.elapsed().as_millis() as i64
    }

    /// The records sent to `topic` since the last `read` of it, decoded:
    /// in order within a partition, and across partitions in the order they
    /// were written. When one does not decode, the error says so and
    /// nothing is taken: the next read returns the same records.
    pub fn read<K, V>(&mut self, topic: &Topic<K, V>) -> Result<Vec<TestRecord<K, V>>> {
        let codec = |e| Error::Codec {
            topic: topic.spec.name.to_string(),
            source: e,
        };
        let (records, read_to) = self.unread(&topic.spec.name)?;
        let decoded = records
            .into_iter()
            .map(|r| {
                Ok(TestRecord {
                    key: topic.spec.key.decode(r.key.as_deref()).map_err(codec)?,
                    value: topic.spec.value.decode(r.value.as_deref()).map_err(codec)?,
                    timestamp: r.timestamp,
                    headers: r.headers,
                    partition: r.partition,
                    offset: r.offset,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.cursors.extend(read_to);
        Ok(decoded)
    }

    /// [`TestDriver::read`] without decoding, by topic name: for dead-letter
    /// topics, changelogs, or any topic the app writes.
    pub fn read_raw(&mut self, topic: &str) -> Result<Vec<RawRecord>> {
        let (records, read_to) = self.unread(topic)?;
        self.cursors.extend(read_to);
        Ok(records)
    }

    /// The records of `topic` after the cursors, in the order they were
    /// written, and where the cursors go once they are taken.
    #[allow(clippy::type_complexity)]
    fn unread(&self, topic: &str) -> Result<(Vec<RawRecord>, Vec<((String, i32), i64)>)> {
        let mut out: Vec<(u64, RawRecord)> = Vec::new();
        let mut read_to = Vec::new();
        for partition in 0..self.partitions(topic)? {
            let key = (topic.to_owned(), partition);
            let mut cursor = self.cursors.get(&key).copied().unwrap_or(0);
            for r in self.cluster.records_from(topic, partition, cursor) {
                cursor = r.offset + 1;
                if r.committed == Some(true) {
                    out.push((r.appended, raw(r, partition)));
                }
            }
            read_to.push((key, cursor));
        }
        out.sort_by_key(|(appended, r)| (*appended, r.partition, r.offset));
        Ok((out.into_iter().map(|(_, r)| r).collect(), read_to))
    }

    fn partitions(&self, topic: &str) -> Result<i32> {
        self.cluster
            .partitions(topic)
            .ok_or_else(|| Error::Config(format!("the test driver has no topic {topic:?}")))
    }

    /// Reads `table` (see [`TableView`]).
    pub fn table<'a, K, V>(&'a self, table: &'a Table<K, V>) -> TableView<'a, K, V> {
        TableView {
            driver: self,
            table,
            types: PhantomData,
        }
    }

    /// A [`GlobalTable`] as the test sees it: the latest value of each key
    /// of its topic.
    pub fn global_table<'a, K, V>(
        &'a self,
        table: &'a GlobalTable<K, V>,
    ) -> GlobalTableView<'a, K, V> {
        GlobalTableView {
            driver: self,
            table,
        }
    }

    /// Reads set table `set` (see [`SetTableView`]).
    pub fn set_table<'a, K, T>(&'a self, set: &'a SetTable<K, T>) -> SetTableView<'a, K, T> {
        SetTableView { driver: self, set }
    }

    /// Reads windowed table `table` (see [`WindowedTableView`]).
    pub fn windowed_table<'a, K, V>(
        &'a self,
        table: &'a WindowedTable<K, V>,
    ) -> WindowedTableView<'a, K, V> {
        WindowedTableView {
            driver: self,
            table,
        }
    }

    /// Stops the app cleanly (as on SIGTERM: its offsets committed, its
    /// tables closed) and starts it again: every table is restored from its
    /// changelog into new, empty stores, and operators start afresh (as in
    /// a new process). An app an error stopped — already returned by the
    /// call that met it — starts again too, from its last committed offsets
    /// (the event it stopped at is processed again); an error not returned
    /// yet is returned instead, and the app stays stopped.
    pub async fn restart(&mut self) -> Result<()> {
        if self.stopped.take().is_none() {
            self.stop().await?;
        }
        self.start().await
    }

    /// Stops the app cleanly; returns the error that stopped it earlier,
    /// if one did.
    pub async fn close(mut self) -> Result<()> {
        self.stop().await
    }

    async fn stop(&mut self) -> Result<()> {
        self.check().await?;
        let Some(running) = self.worker.take() else {
            return Ok(());
        };
        let _ = running.stop.send(());
        match tokio::time::timeout(STOP_LIMIT, running.join).await {
            Ok(joined_result) => joined(joined_result),
            Err(_) => Err(Error::Config(format!(
                "the app did not stop within {STOP_LIMIT:?} of the virtual clock"
            ))),
        }
    }

    /// The error that stopped the worker, if it stopped: the error itself
    /// the first time, its text after that.
    async fn check(&mut self) -> Result<()> {
        if let Some(why) = &self.stopped {
            return Err(Error::Stopped(why.clone()));
        }
        // A worker an error stops may still be finishing events in flight:
        // wait for it, so the error comes from the call that caused it.
        let ending = self
            .worker
            .as_ref()
            .is_some_and(|r| r.join.is_finished() || r.metrics.has_failed());
        if !ending {
            return Ok(());
        }
        let Some(running) = self.worker.take() else {
            return Ok(());
        };
        let outcome = match tokio::time::timeout(STOP_LIMIT, running.join).await {
            Ok(joined_result) => joined(joined_result),
            Err(_) => Err(Error::Config(format!(
                "the app failed and did not stop within {STOP_LIMIT:?} of the virtual clock"
            ))),
        };
        let e = match outcome {
            Ok(()) => Error::Config("the app's worker stopped by itself".into()),
            Err(e) => e,
        };
        self.stopped = Some(e.to_string());
        Err(e)
    }
}

/// The worker's result as the driver's.
fn joined(
    result: std::result::Result<std::result::Result<(), WorkerError>, tokio::task::JoinError>,
) -> Result<()> {
    match result {
        Ok(outcome) => Ok(outcome?),
        Err(e) => Err(Error::Config(format!("the app's worker panicked: {e}"))),
    }
}

fn raw(r: LoggedRecord, partition: i32) -> RawRecord {
    TestRecord {
        key: r.key,
        value: r.value,
        timestamp: r.timestamp,
        headers: r.headers,
        partition,
        offset: r.offset,
    }
}

/// A table as the test sees it: every write the app made, read from the
/// table's changelog (which each write goes to as it happens).
pub struct TableView<'a, K, V> {
    driver: &'a TestDriver,
    table: &'a Table<K, V>,
    types: PhantomData<fn() -> K>,
}

impl<K, V> std::fmt::Debug for TableView<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableView")
            .field("table", &self.table.spec.name)
            .finish()
    }
}

impl<K: TableKey, V> TableView<'_, K, V> {
    fn changelog(&self) -> String {
        strom_state::changelog::topic_name(self.driver.app.id(), &self.table.spec.name)
    }

    /// The value of `key`, or the table's default.
    pub fn get(&self, key: &K) -> Result<V> {
        let topic = self.changelog();
        let partitions = self.driver.partitions(&topic)?;
        let bytes = key.encode_key();
        let written = self.table.spec.key.of(key).map_err(|source| Error::Codec {
            topic: self.table.spec.name.to_string(),
            source,
        })?;
        let partition =
            partition_for_key(written.as_deref().unwrap_or_default(), partitions as usize);
        let last = self
            .driver
            .cluster
            .records(&topic, partition)
            .into_iter()
            .filter(|r| r.committed == Some(true) && r.key.as_deref() == Some(&bytes[..]))
            .last();
        match last.and_then(|r| r.value) {
            Some(v) => self.decode(&v),
            None => Ok((self.table.spec.default)()),
        }
    }

    /// Every key the table holds, with its value, in the order of the
    /// keys' bytes.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        live_entries(self.driver, &self.changelog())?
            .into_iter()
            .map(|(k, v)| Ok((K::decode_key(&k)?, self.decode(&v)?)))
            .collect()
    }

    fn decode(&self, value: &[u8]) -> Result<V> {
        decode(&self.table.spec.name, &*self.table.spec.value, value)
    }
}

/// A set table as the test sees it: every add and discard the app made,
/// read from the table's changelog.
pub struct SetTableView<'a, K, T> {
    driver: &'a TestDriver,
    set: &'a SetTable<K, T>,
}

impl<K, T> std::fmt::Debug for SetTableView<'_, K, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetTableView")
            .field("set", &self.set.name())
            .finish()
    }
}

impl<K: TableKey, T: TableKey> SetTableView<'_, K, T> {
    /// The members of `key`'s set, in their order.
    pub fn members(&self, key: &K) -> Result<Vec<T>> {
        let changelog =
            strom_state::changelog::topic_name(self.driver.app.id(), &self.set.entries.spec.name);
        let (from, to) = strom_state::table::prefix_bounds(key);
        live_entries(self.driver, &changelog)?
            .range::<[u8], _>((
                from.as_ref().map(Vec::as_slice),
                to.as_ref().map(Vec::as_slice),
            ))
            .map(|(k, _)| Ok(<(K, T)>::decode_key(k)?.1))
            .collect()
    }
}

/// A windowed table as the test sees it: every write the app made, read
/// from the table's changelog (which each write goes to as it happens).
pub struct WindowedTableView<'a, K, V> {
    driver: &'a TestDriver,
    table: &'a WindowedTable<K, V>,
}

impl<K, V> std::fmt::Debug for WindowedTableView<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowedTableView")
            .field("table", &self.table.spec.name)
            .finish()
    }
}

impl<K: TableKey, V> WindowedTableView<'_, K, V> {
    /// Every live window of every key, with its value, in the order of the
    /// keys' bytes, then time. Expired windows are gone (their tombstones
    /// are in the changelog).
    pub fn entries(&self) -> Result<Vec<(K, Window, V)>> {
        let entries = self.entries_with_latest()?;
        Ok(entries.into_iter().map(|(k, w, _, v)| (k, w, v)).collect())
    }

    /// [`WindowedTableView::entries`], with the time of each sliding
    /// window's latest event (0 for other windows).
    fn entries_with_latest(&self) -> Result<Vec<(K, Window, i64, V)>> {
        let topic = strom_state::changelog::topic_name(self.driver.app.id(), &self.table.spec.name);
        let mut entries = Vec::new();
        for (k, v) in live_entries(self.driver, &topic)? {
            if k.as_ref() == window::STREAM_TIME_KEY {
                continue;
            }
            let (key, start) = window::split_window_key(&k).ok_or_else(|| Error::Codec {
                topic: topic.clone(),
                source: crate::codec::CodecError {
                    what: format!("a key of {} bytes is no window's", k.len()),
                },
            })?;
            let (window, latest, value) = self
                .table
                .spec
                .windowing
                .entry_with_latest(start, window::unstamp(&v)?.1)?;
            entries.push((
                K::decode_key(key)?,
                window,
                latest.unwrap_or(0),
                decode(&self.table.spec.name, &*self.table.spec.value, value)?,
            ));
        }
        Ok(entries)
    }

    /// The live windows of `key` with their values, in time order.
    pub fn windows(&self, key: &K) -> Result<Vec<(Window, V)>> {
        let bytes = key.encode_key();
        Ok(self
            .entries()?
            .into_iter()
            .filter(|(k, _, _)| k.encode_key() == bytes)
            .map(|(_, w, v)| (w, v))
            .collect())
    }

    /// The value of `key` in the window holding `time` (the latest such
    /// window of a hopping table; the session holding it; of a sliding
    /// table, the aggregate of the events within the time difference up to
    /// `time`), or the default.
    pub fn get(&self, key: &K, time: i64) -> Result<V> {
        let bytes = key.encode_key();
        let mut windows: Vec<(Window, i64, V)> = self
            .entries_with_latest()?
            .into_iter()
            .filter(|(k, _, _, _)| k.encode_key() == bytes)
            .map(|(_, w, latest, v)| (w, latest, v))
            .collect();
        let spans: Vec<(Window, i64)> = windows.iter().map(|(w, l, _)| (*w, *l)).collect();
        let found = self.table.spec.windowing.holding(&spans, time);
        Ok(match found {
            Some(i) => windows.swap_remove(i).2,
            None => (self.table.spec.default)(),
        })
    }
}

/// A global table as the test sees it: the latest value of each key of its
/// topic (which the app's workers read as it grows).
pub struct GlobalTableView<'a, K, V> {
    driver: &'a TestDriver,
    table: &'a GlobalTable<K, V>,
}

impl<K, V> std::fmt::Debug for GlobalTableView<'_, K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalTableView")
            .field("table", &self.table.name)
            .finish()
    }
}

impl<K, V> GlobalTableView<'_, K, V> {
    /// The value of `key`, if the topic holds one.
    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let key =
            (self.table.key_bytes(key)?).ok_or_else(|| Error::Config(self.table.keyless()))?;
        match live_entries(self.driver, &self.table.topic)?.get(&key) {
            Some(value) => self.table.decode(&key, value).map(Some),
            None => Ok(None),
        }
    }

    /// Every key with its value, in the order of the keys' bytes.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        let codec = |source| Error::Codec {
            topic: self.table.name.to_string(),
            source,
        };
        live_entries(self.driver, &self.table.topic)?
            .into_iter()
            .map(|(k, v)| {
                let key = self.table.key.decode(Some(&k)).map_err(codec)?;
                Ok((key, self.table.decode(&k, &v)?))
            })
            .collect()
    }
}

/// The committed entries of a changelog topic that are not deleted: the
/// latest value of each key, in key order.
fn live_entries(driver: &TestDriver, topic: &str) -> Result<BTreeMap<Bytes, Bytes>> {
    let mut latest: BTreeMap<Bytes, Option<Bytes>> = BTreeMap::new();
    for partition in 0..driver.partitions(topic)? {
        for r in driver.cluster.records(topic, partition) {
            if let (Some(true), Some(key)) = (r.committed, r.key) {
                latest.insert(key, r.value);
            }
        }
    }
    Ok(latest
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect())
}

/// A table's value from its bytes in `codec`.
fn decode<V>(table: &str, codec: &dyn crate::codec::Codec<V>, value: &[u8]) -> Result<V> {
    codec.decode(Some(value)).map_err(|source| Error::Codec {
        topic: table.to_owned(),
        source,
    })
}

/// Pauses tokio's clock, unless the test started it paused.
fn pause_clock() -> Result<()> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::Config("the test driver runs inside a tokio runtime: use #[tokio::test]".into())
    })?;
    if handle.runtime_flavor() != RuntimeFlavor::CurrentThread {
        return Err(Error::Config(
            "the test driver needs tokio's current-thread runtime (#[tokio::test]'s default) to pause its clock".into(),
        ));
    }
    let before = Instant::now();
    std::thread::sleep(Duration::from_millis(1));
    if Instant::now() != before {
        tokio::time::pause();
    }
    Ok(())
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
