//! A worker's settings: [`WorkerConfig`], where tables live ([`StoreKind`]) and
//! what survives a crash ([`ProcessingGuarantee`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use strom_client::{ClientConfig, Compression};

use crate::processor::ErrorPolicy;

/// Where tables keep their data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StoreKind {
    /// One redb file per table partition under the state directory: a restart
    /// replays only the changelog records since the last durable checkpoint.
    #[default]
    Redb,
    /// In memory: every start replays the whole changelog.
    Memory,
}

/// What a worker guarantees about events and their effects across crashes
/// and rebalances.
///
/// ```
/// use strom_worker::ProcessingGuarantee;
/// let g: ProcessingGuarantee = "exactly_once".parse().unwrap();
/// assert_eq!(g, ProcessingGuarantee::ExactlyOnce);
/// assert_eq!("at-least-once".parse::<ProcessingGuarantee>().unwrap(), ProcessingGuarantee::AtLeastOnce);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProcessingGuarantee {
    /// Every event's effects (sends, table writes) are acknowledged before its
    /// offset is committed: after a crash, the events since the last commit
    /// are processed again, so an effect may happen twice but never not at all.
    #[default]
    AtLeastOnce,
    /// Kafka Streams' `exactly_once_v2`: everything the events of a commit
    /// interval caused (outputs, repartition records, changelog records, dead
    /// letters) and their input offsets commit in one Kafka transaction of
    /// this worker's transactional producer, or not at all. Every read is
    /// read-committed, and tables apply a transaction's writes only after it
    /// commits. Readers with `read_committed` see each effect once.
    ExactlyOnce,
}

impl std::str::FromStr for ProcessingGuarantee {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "at_least_once" => Ok(ProcessingGuarantee::AtLeastOnce),
            "exactly_once" | "exactly_once_v2" => Ok(ProcessingGuarantee::ExactlyOnce),
            other => Err(format!(
                "processing guarantee {other:?} is neither at_least_once nor exactly_once"
            )),
        }
    }
}

impl std::fmt::Display for ProcessingGuarantee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProcessingGuarantee::AtLeastOnce => "at_least_once",
            ProcessingGuarantee::ExactlyOnce => "exactly_once",
        })
    }
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The app id: the consumer group, and the prefix of internal topics.
    pub app_id: String,
    /// How to reach the cluster: bootstrap brokers, timeouts, connections.
    pub client: ClientConfig,
    /// Where redb tables live (and the worker's identity file). Default
    /// `./strom-state/<app-id>`.
    pub state_dir: PathBuf,
    /// This worker's stable identity, e.g. `worker-1`: its static group
    /// membership (see `static_membership`) and, under exactly-once, its
    /// transactional producer, so a restarted worker takes its partitions
    /// back at once and fences and aborts what its previous run left open.
    /// Each worker of an app needs its own. Default: an id kept in
    /// `<state_dir>/worker.id`, made on the first start.
    pub instance_id: Option<String>,
    /// Static membership (KIP-345): the worker joins its group as
    /// `instance_id`, so a worker restarted after a crash gets its partitions
    /// back at once instead of after the dead run's session timeout, and the
    /// other workers see no rebalance. A clean shutdown still leaves the
    /// group, so its partitions move at once. Default on; turn it off for a
    /// broker that does not implement it (tansu 0.6 keeps the dead member and
    /// makes the restarted one wait longer).
    pub static_membership: bool,
    /// Table storage. Default redb.
    pub store: StoreKind,
    /// What survives a crash. Default at-least-once.
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
    /// How often processed offsets are committed. Default 1 s at-least-once;
    /// under exactly-once [`WorkerConfig::exactly_once`] sets 100 ms (Kafka
    /// Streams' defaults).
    pub commit_interval: Duration,
    /// A checkpoint writes the tables to disk (fsync) when this long has
    /// passed since the last durable one; the others only commit in memory.
    /// Bounds what a crash replays from the changelogs, and the memory redb
    /// holds until a durable commit frees pages. Default 5 s.
    pub durable_checkpoint_interval: Duration,
    /// ... or when a partition's tables took this many changes since their
    /// last durable checkpoint. Default 100,000 (well under a second of
    /// replay).
    pub durable_checkpoint_changes: u64,
    /// Group session timeout. Default 10 s.
    pub session_timeout: Duration,
    /// Group heartbeat interval. Default 3 s.
    pub heartbeat_interval: Duration,
    /// How long a rebalance may wait for this worker's callbacks (revoking
    /// partitions: commit, close tables). Default 60 s.
    pub rebalance_timeout: Duration,
    /// How long the transaction coordinator lets a transaction of this worker
    /// stay open before aborting it (exactly-once). Default 10 s (Kafka
    /// Streams' default under exactly-once).
    pub transaction_timeout: Duration,
    /// Bytes of fetched records (keys, values, headers, plus the record
    /// itself, 128 bytes) waiting per partition number before its fetches
    /// pause; they resume when half of that is processed. Also the bound of
    /// fetched bytes read ahead for all partitions. Default 4 MiB; lower
    /// when the memory budget's share of fetched records, over the
    /// partition numbers and the read-ahead, is smaller.
    pub max_buffered_bytes: usize,
    /// The worker's memory budget, in bytes, shared by the table stores'
    /// page caches, the producer's buffers and the fetched records not yet
    /// processed (a quarter each; the last quarter is left for the rest: see
    /// the `budget` module). Parts that fill up apply backpressure; they
    /// never fail the worker. Default 256 MiB.
    pub memory_budget: usize,
    /// How the worker's records are compressed: outputs, repartition
    /// records, changelogs (Kafka's `compression.type`). Default none.
    pub compression: Compression,
    /// How long the worker's producer waits to fill a batch (Kafka's
    /// `linger.ms`). Default 5 ms.
    pub linger: Duration,
    /// Where cron timers read the time of day: the system's clock (the
    /// default), or tokio's (the test driver's virtual clock).
    pub wall_clock: crate::timer::WallClock,
    /// Whether each task reads its topics in step by record time (the
    /// earliest buffered record first, as Kafka Streams does), for joins in
    /// time windows; otherwise batches in the order they were fetched,
    /// which holds less in memory. Default off; the streams layer turns it
    /// on for an app with a windowed join.
    pub time_ordered: bool,
    /// In time order: how long a task waits at most, when one of its
    /// topics has nothing queued, for records the broker holds and the
    /// worker has not fetched yet, before it processes its other topics
    /// without them. Kafka Streams waits for such records without a bound;
    /// the bound keeps a partition whose fetches fail from stopping the
    /// others. Default 10 s.
    pub time_order_wait: Duration,
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
            client: ClientConfig::new(brokers),
            instance_id: None,
            static_membership: true,
            store: StoreKind::Redb,
            replication: 1,
            standby_replicas: 0,
            web: None,
            advertised_url: None,
            on_error: ErrorPolicy::Skip,
            guarantee: ProcessingGuarantee::AtLeastOnce,
            commit_interval: Duration::from_secs(1),
            durable_checkpoint_interval: Duration::from_secs(5),
            durable_checkpoint_changes: 100_000,
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            rebalance_timeout: Duration::from_secs(60),
            transaction_timeout: Duration::from_secs(10),
            max_buffered_bytes: 4 * 1024 * 1024,
            memory_budget: 256 << 20,
            compression: Compression::None,
            linger: Duration::from_millis(5),
            wall_clock: crate::timer::WallClock::System,
            time_ordered: false,
            time_order_wait: Duration::from_secs(10),
        }
    }

    /// Switches to exactly-once with its default commit interval (100 ms).
    pub fn exactly_once(mut self) -> Self {
        self.guarantee = ProcessingGuarantee::ExactlyOnce;
        self.commit_interval = Duration::from_millis(100);
        self
    }
}
