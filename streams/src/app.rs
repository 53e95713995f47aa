//! The app: its settings, topics, tables and agents, and how it runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_client::{Client, Compression, NewTopic};
use strom_state::window::Windowing;
use strom_state::{changelog, TableKey};
use strom_worker::{
    AgentError, ErrorPolicy, KeyParser, ProcessingGuarantee, Processor, Schedule, StoreKind, Timer,
    TopicPattern, Worker, WorkerConfig,
};
use tracing::warn;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{Codec, Json};
use crate::context::{Ctx, TimerCtx};
use crate::error::Result;
use crate::global::GlobalTable;
use crate::punctuator::{PunctuateFn, Punctuation, Punctuator};
use crate::stream::{Input, Stage, Stream};
use crate::table::{key_parser, Declared as DeclaredKeys, KeyBytes, SetTable, Table, TableSpec};
use crate::topic::{Declared, Topic};

/// A table as the app declares it.
pub(crate) struct DeclaredTable {
    pub name: String,
    pub declared: DeclaredKeys,
}

impl DeclaredTable {
    /// How it is windowed, if it is.
    pub fn windowing(&self) -> Option<Windowing> {
        self.declared.windowing()
    }
}

/// A stream-processing app: declare topics, tables and agents, then run it as
/// a worker. Start more workers with the same id and they share the partitions.
///
/// Settings come from the builder methods, or from the environment:
/// `STROM_BROKERS` (comma-separated, default `127.0.0.1:9092`),
/// `STROM_STATE_DIR` (default `./strom-state/<id>`),
/// `STROM_PROCESSING_GUARANTEE` (`at_least_once`, the default, or
/// `exactly_once`), `STROM_INSTANCE_ID`, `STROM_STATIC_MEMBERSHIP` (`true`,
/// the default, or `false`), `STROM_COMPRESSION_TYPE`
/// (`none`, the default, `gzip`, `snappy`, `lz4` or `zstd`),
/// `STROM_DURABLE_CHECKPOINT_INTERVAL_MS` and
/// `STROM_DURABLE_CHECKPOINT_CHANGES` (see [`App::with_durable_checkpoints`]),
/// and every client
/// setting of [`strom_client::cluster::SETTINGS`] as `STROM_` plus its name
/// upper-cased with dots as underscores: `STROM_SECURITY_PROTOCOL`,
/// `STROM_SASL_MECHANISM`, `STROM_SASL_USERNAME`, `STROM_SASL_PASSWORD`,
/// `STROM_SSL_CA_LOCATION`, … (these override `STROM_BROKERS` too, through
/// `STROM_BOOTSTRAP_SERVERS`).
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
    pub(crate) config: WorkerConfig,
    /// The commit interval was set explicitly (else it follows the guarantee).
    commit_interval_set: bool,
    pub(crate) partitions: i32,
    pub(crate) topics: Vec<(String, Arc<Mutex<Declared>>)>,
    /// (repartition topic, its source topic)
    pub(crate) repartitions: Vec<(String, String)>,
    /// Tables whose changelogs agents read (a table join): the app makes
    /// those changelogs, with the tables' partition count.
    pub(crate) changelog_sources: Vec<String>,
    /// Topics a join reads with tables: they need the tables' partition
    /// count, checked before anything is created.
    pub(crate) copartitioned: std::collections::BTreeSet<String>,
    /// The names of windowed stream–stream joins (each names its tables).
    pub(crate) window_joins: Vec<String>,
    /// Topics a windowed join reads together: each group needs one
    /// partition count (any: the join's tables are its own).
    pub(crate) joined: Vec<Vec<String>>,
    /// Patterns of topic names agents read.
    pub(crate) patterns: Vec<TopicPattern>,
    /// Declarations that cannot work, refused when the app starts.
    pub(crate) misdeclared: Vec<String>,
    pub(crate) tables: Vec<DeclaredTable>,
    /// Global tables: (name, source topic, how the web reads its keys).
    pub(crate) globals: Vec<(String, String, KeyParser)>,
    pub(crate) processors: Vec<Arc<dyn Processor>>,
    /// Partition timers, with what they do (for `APP agents`).
    pub(crate) punctuators: Vec<(Arc<dyn Processor>, String)>,
    /// What each processor does (same order as `processors`), for `APP agents`.
    pub(crate) agents: Vec<String>,
    pages: Vec<strom_worker::axum::Router>,
    timers: Vec<Timer>,
    /// A client setting from the environment that does not parse; `run`
    /// returns it.
    env_error: Option<strom_client::Error>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("id", &self.config.app_id)
            .field(
                "topics",
                &self.topics.iter().map(|(t, _)| t).collect::<Vec<_>>(),
            )
            .field(
                "tables",
                &self.tables.iter().map(|t| &t.name).collect::<Vec<_>>(),
            )
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
        if let Ok(id) = std::env::var("STROM_INSTANCE_ID") {
            config.instance_id = Some(id);
        }
        match std::env::var("STROM_STATIC_MEMBERSHIP").as_deref() {
            Ok("true") | Err(_) => {}
            Ok("false") => config.static_membership = false,
            Ok(other) => {
                warn!("STROM_STATIC_MEMBERSHIP={other:?} is not true or false; using true")
            }
        }
        let guarantee = std::env::var("STROM_PROCESSING_GUARANTEE")
            .ok()
            .and_then(|g| match g.parse::<ProcessingGuarantee>() {
                Ok(g) => Some(g),
                Err(e) => {
                    warn!("STROM_PROCESSING_GUARANTEE: {e}; using at_least_once");
                    None
                }
            });
        if let Some(g) = guarantee {
            config.guarantee = g;
        }
        let env_error = config.client.apply_env().err();
        if let Ok(c) = std::env::var("STROM_COMPRESSION_TYPE") {
            match c.parse::<Compression>() {
                Ok(c) => config.compression = c,
                Err(e) => warn!("STROM_COMPRESSION_TYPE: {e}; using none"),
            }
        }
        if let Some(ms) = env_number("STROM_DURABLE_CHECKPOINT_INTERVAL_MS") {
            config.durable_checkpoint_interval = Duration::from_millis(ms);
        }
        if let Some(changes) = env_number("STROM_DURABLE_CHECKPOINT_CHANGES") {
            config.durable_checkpoint_changes = changes;
        }
        App {
            config,
            commit_interval_set: false,
            partitions: 8,
            topics: Vec::new(),
            repartitions: Vec::new(),
            changelog_sources: Vec::new(),
            copartitioned: Default::default(),
            window_joins: Vec::new(),
            joined: Vec::new(),
            patterns: Vec::new(),
            misdeclared: Vec::new(),
            tables: Vec::new(),
            globals: Vec::new(),
            processors: Vec::new(),
            punctuators: Vec::new(),
            agents: Vec::new(),
            pages: Vec::new(),
            timers: Vec::new(),
            env_error,
        }
    }

    /// The app id.
    pub fn id(&self) -> &str {
        &self.config.app_id
    }

    /// Bootstrap brokers (overrides `STROM_BROKERS`).
    pub fn with_brokers<S: Into<String>>(mut self, brokers: impl IntoIterator<Item = S>) -> Self {
        self.config.client.bootstrap = brokers.into_iter().map(Into::into).collect();
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

    /// The processing guarantee (overrides `STROM_PROCESSING_GUARANTEE`):
    /// at-least-once (the default) or exactly-once, Kafka Streams'
    /// `exactly_once_v2` (see [`ProcessingGuarantee`]).
    ///
    /// ```no_run
    /// use strom::ProcessingGuarantee;
    /// let app = strom::App::new("payments").with_processing_guarantee(ProcessingGuarantee::ExactlyOnce);
    /// # let _ = app;
    /// ```
    pub fn with_processing_guarantee(mut self, guarantee: ProcessingGuarantee) -> Self {
        self.config.guarantee = guarantee;
        self
    }

    /// This worker's stable identity (overrides `STROM_INSTANCE_ID`; default:
    /// an id kept in the state directory). Under exactly-once it names the
    /// worker's transactional producer, so a restarted worker fences its
    /// previous run: give each worker of an app its own, and keep it across
    /// restarts.
    pub fn with_instance_id(mut self, id: impl Into<String>) -> Self {
        self.config.instance_id = Some(id.into());
        self
    }

    /// Whether the worker joins its group as a static member named by its
    /// instance id (overrides `STROM_STATIC_MEMBERSHIP`; default true): a
    /// worker restarted after a crash then gets its partitions back without
    /// waiting for the session timeout. Turn it off only for a broker that
    /// does not implement static membership (KIP-345), such as tansu 0.6.
    ///
    /// ```
    /// let app = strom::App::new("orders").with_static_membership(false);
    /// ```
    pub fn with_static_membership(mut self, on: bool) -> Self {
        self.config.static_membership = on;
        self
    }

    /// Sets a client setting by its Kafka name (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, …; see
    /// [`strom_client::ClientConfig::set`]).
    ///
    /// ```
    /// let app = strom::App::new("orders")
    ///     .with_client_setting("security.protocol", "SASL_SSL")
    ///     .unwrap()
    ///     .with_client_setting("sasl.mechanism", "SCRAM-SHA-256")
    ///     .unwrap();
    /// # let _ = app;
    /// ```
    pub fn with_client_setting(mut self, name: &str, value: &str) -> Result<Self> {
        self.config.client.set(name, value)?;
        Ok(self)
    }

    /// How the app's records are compressed — outputs, repartition records,
    /// changelogs (Kafka's `compression.type`; overrides
    /// `STROM_COMPRESSION_TYPE`). Default none. Sources may be written with
    /// any codec: every one is read.
    ///
    /// ```
    /// let app = strom::App::new("clicks").with_compression(strom::Compression::Zstd);
    /// # let _ = app;
    /// ```
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.config.compression = compression;
        self
    }

    /// The worker's memory budget in bytes, shared by the table stores' page
    /// caches, the producer's buffers and the fetched records not yet
    /// processed; parts that fill up apply backpressure. Default 256 MiB.
    ///
    /// ```
    /// let app = strom::App::new("small").with_memory_budget(64 << 20);
    /// # let _ = app;
    /// ```
    pub fn with_memory_budget(mut self, bytes: usize) -> Self {
        self.config.memory_budget = bytes;
        self
    }

    /// How often processed offsets are committed. Default 1 s at least once,
    /// 100 ms exactly once (Kafka Streams' defaults).
    pub fn with_commit_interval(mut self, interval: Duration) -> Self {
        self.config.commit_interval = interval;
        self.commit_interval_set = true;
        self
    }

    /// How often checkpoints write the tables to disk (fsync): when
    /// `interval` has passed since the last durable one, or when a
    /// partition's tables took `changes` changes since then (overrides
    /// `STROM_DURABLE_CHECKPOINT_INTERVAL_MS` and
    /// `STROM_DURABLE_CHECKPOINT_CHANGES`; defaults 5 s and 100,000). Other
    /// checkpoints commit in memory only. After a crash a partition replays
    /// its changelog from the last durable checkpoint, so these bound the
    /// replay; lower values cost more fsyncs.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let app = strom::App::new("counts")
    ///     .with_durable_checkpoints(Duration::from_secs(1), 20_000);
    /// # let _ = app;
    /// ```
    pub fn with_durable_checkpoints(mut self, interval: Duration, changes: u64) -> Self {
        self.config.durable_checkpoint_interval = interval;
        self.config.durable_checkpoint_changes = changes;
        self
    }

    /// Group session timeout and heartbeat interval (defaults 10 s and 3 s).
    pub fn with_session_timeout(mut self, session: Duration, heartbeat: Duration) -> Self {
        self.config.session_timeout = session;
        self.config.heartbeat_interval = heartbeat;
        self
    }

    /// Where the web server listens (`None`, the default of `run`: no web
    /// server; the `worker` command listens on `0.0.0.0:6066` unless told
    /// otherwise).
    pub fn with_web(mut self, listen: Option<SocketAddr>) -> Self {
        self.config.web = listen;
        self
    }

    /// The URL other workers redirect table lookups to (default
    /// `http://<hostname>:<port>`).
    pub fn with_advertised_url(mut self, url: impl Into<String>) -> Self {
        self.config.advertised_url = Some(url.into());
        self
    }

    /// How many other workers keep each partition's tables warm. Default 0.
    pub fn with_standby_replicas(mut self, replicas: usize) -> Self {
        self.config.standby_replicas = replicas;
        self
    }

    /// What happens to events an agent fails on or that do not decode, for
    /// agents without their own policy ([`Stream::on_error`]). Default skip.
    pub fn with_error_policy(mut self, policy: ErrorPolicy) -> Self {
        self.config.on_error = policy;
        self
    }

    /// Adds web routes to the worker's web server (Faust's `@app.page`).
    ///
    /// ```
    /// use strom::axum::{routing::get, Router};
    /// let app = strom::App::new("shop")
    ///     .page(Router::new().route("/hello", get(|| async { "hello" })));
    /// # let _ = app;
    /// ```
    pub fn page(mut self, routes: strom_worker::axum::Router) -> Self {
        self.pages.push(routes);
        self
    }

    /// Runs `f` every `every` on every worker.
    ///
    /// ```
    /// use std::time::Duration;
    /// let mut app = strom::App::new("clock");
    /// let ticks = app.topic::<String, u64>("ticks");
    /// app.timer(Duration::from_secs(60), move |ctx| {
    ///     let ticks = ticks.clone();
    ///     async move { Ok(ctx.send(&ticks, &"minute".to_string(), &1).await?) }
    /// });
    /// ```
    pub fn timer<F, Fut>(&mut self, every: Duration, f: F)
    where
        F: Fn(TimerCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        self.schedule(Schedule::Every(every), false, f);
    }

    /// Runs `f` in each partition's task of `topic`'s partitions (Kafka
    /// Streams' punctuator), on the wall clock or on the partition's stream
    /// time (see [`Punctuation`]), with that partition's tables: to expire or
    /// sweep state on a schedule. It runs between the partition's events,
    /// after the agents of the event that made it due, so what it writes and
    /// sends commits with the partition's offsets; runs are not replayed
    /// after an aborted transaction or a restart. An error it returns is
    /// logged and counted, and the timer goes on (see
    /// [`punctuator`](crate::punctuator)).
    ///
    /// ```
    /// use std::time::Duration;
    /// use strom::Punctuation;
    /// let mut app = strom::App::new("shop");
    /// let orders = app.topic::<String, u64>("orders");
    /// let open = app.table::<String, u64>("open-orders", 0);
    /// // Every minute, each partition forgets its customers with nothing open.
    /// app.partition_timer(&orders, Punctuation::WallClock(Duration::from_secs(60)), move |ctx| {
    ///     let open = open.clone();
    ///     async move {
    ///         for (customer, n) in ctx.entries(&open).await? {
    ///             if n == 0 {
    ///                 ctx.delete(&open, &customer).await?;
    ///             }
    ///         }
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn partition_timer<K, V, F, Fut>(&mut self, topic: &Topic<K, V>, when: Punctuation, f: F)
    where
        F: Fn(Ctx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let f: PunctuateFn = Arc::new(move |ctx| Box::pin(f(ctx)));
        let record_time = topic.spec.timestamp.is_none();
        let punctuator = Punctuator::new(topic.spec.name.clone(), when, record_time, f);
        self.punctuators
            .push((Arc::new(punctuator), format!("partition timer {when:?}")));
    }

    /// Runs `f` every `every` on one worker of the group only: the one that
    /// processes partition number 0 (it moves with that partition).
    pub fn leader_timer<F, Fut>(&mut self, every: Duration, f: F)
    where
        F: Fn(TimerCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        self.schedule(Schedule::Every(every), true, f);
    }

    /// Runs `f` on every worker when cron `pattern` matches in time zone
    /// `zone` (e.g. `"0 * * * *"`, `"Europe/Berlin"`; a sixth leading field
    /// counts seconds). Use [`App::schedule`] for a leader-only cron timer.
    pub fn crontab<F, Fut>(&mut self, pattern: &str, zone: &str, f: F) -> Result<()>
    where
        F: Fn(TimerCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        self.schedule(Schedule::cron(pattern, zone)?, false, f);
        Ok(())
    }

    /// Runs `f` on `schedule`, on every worker or (`on_leader`) on the one
    /// that processes partition number 0.
    pub fn schedule<F, Fut>(&mut self, schedule: Schedule, on_leader: bool, f: F)
    where
        F: Fn(TimerCtx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + Send + 'static,
    {
        let name = format!("timer-{}", self.timers.len());
        let f = Arc::new(f);
        self.timers.push(Timer {
            name,
            schedule,
            on_leader,
            run: Arc::new(move |ctx| {
                let f = f.clone();
                Box::pin(async move { f(TimerCtx { inner: ctx }).await })
            }),
        });
    }

    /// Declares a topic of `K` keys and `V` values (JSON codecs by default);
    /// the app creates it at start when it is missing.
    pub fn topic<K, V>(&mut self, name: &str) -> Topic<K, V>
    where
        K: Serialize + DeserializeOwned + 'static,
        V: Serialize + DeserializeOwned + 'static,
    {
        let declared = match self.topics.iter().find(|(t, _)| t == name) {
            Some((_, d)) => d.clone(),
            None => {
                let d = Arc::new(Mutex::new(Declared::default()));
                self.topics.push((name.to_owned(), d.clone()));
                d
            }
        };
        Topic::json(name, declared)
    }

    /// Declares every topic whose whole name matches the regular expression
    /// `pattern`, for agents to read as one (Faust's `app.topic(pattern=…)`,
    /// Kafka's pattern subscription), with JSON codecs by default: every
    /// topic that matches, except brokers' internal topics (`__…`) and the
    /// app's own changelog and repartition topics. A matching topic created
    /// while the workers run is read from its start within 30 s (the group
    /// rebalances to hand it out). The topics may have any partition count
    /// (see [`Table`]'s partition rule for agents that use tables; a new
    /// topic with more partitions than the tables of an app that has any
    /// is not read, with a warning). A pattern is read only: sending to it
    /// stops the worker.
    ///
    /// ```no_run
    /// # fn main() -> strom::Result<()> {
    /// let mut app = strom::App::new("audit");
    /// let orders = app.topic_pattern::<String, u64>("orders-[a-z]+")?; // orders-eu, orders-us, …
    /// app.agent(&orders).for_each(|_ctx, order| async move {
    ///     println!("{} from {}: {}", order.key, order.topic, order.value);
    ///     Ok(())
    /// });
    /// # Ok(()) }
    /// ```
    pub fn topic_pattern<K, V>(&mut self, pattern: &str) -> Result<Topic<K, V>>
    where
        K: Serialize + DeserializeOwned + 'static,
        V: Serialize + DeserializeOwned + 'static,
    {
        let compiled = TopicPattern::new(pattern)?;
        self.patterns.retain(|p| p.as_str() != pattern);
        self.patterns.push(compiled);
        let mut topic = Topic::json(pattern, Arc::new(Mutex::new(Declared::default())));
        Arc::make_mut(&mut topic.spec).pattern = true;
        Ok(topic)
    }

    /// What each topic name agents read stands for: a pattern's matches
    /// among the cluster's topics (by the worker's rule), any other name
    /// itself.
    pub(crate) async fn source_topics(
        &self,
        client: &Client,
    ) -> Result<BTreeMap<String, Vec<String>>> {
        let names = match self.patterns.is_empty() {
            true => Vec::new(),
            false => client.topic_names().await?,
        };
        let punctuators = self.punctuators.iter().map(|(p, _)| p);
        let mut topics = BTreeMap::new();
        for p in self.processors.iter().chain(punctuators) {
            let name = p.topic();
            let matched = match self.patterns.iter().find(|pat| pat.as_str() == name) {
                Some(pat) => (names.iter())
                    .filter(|t| pat.matches(t, self.id()))
                    .cloned()
                    .collect(),
                None => vec![name.to_owned()],
            };
            topics.insert(name.to_owned(), matched);
        }
        Ok(topics)
    }

    /// Declares a table of sets (see [`SetTable`]): its changelog is the
    /// topic `<app-id>-<name>-changelog`, one record per add or discard; the
    /// web server answers `/tables/<name>/["<key>","<member>"]` with `null`
    /// for a member that is in.
    ///
    /// ```
    /// let mut app = strom::App::new("shop");
    /// // The products each customer has looked at.
    /// let viewed = app.set_table::<String, String>("viewed-products");
    /// # let _ = viewed;
    /// ```
    pub fn set_table<K, T>(&mut self, name: &str) -> SetTable<K, T>
    where
        K: TableKey + Clone + Serialize + DeserializeOwned + 'static,
        T: TableKey + Serialize + DeserializeOwned + 'static,
    {
        SetTable::new(self.table(name, ()), KeyBytes::codec(Json))
    }

    /// Declares a table: `default` is the value of a missing key. Its changelog
    /// is the topic `<app-id>-<name>-changelog`; the web server answers
    /// `/tables/<name>/<key>` with keys in [`TableKey::parse_key`]'s text.
    pub fn table<K, V>(&mut self, name: &str, default: V) -> Table<K, V>
    where
        K: TableKey + 'static,
        Json: Codec<K> + Codec<V>,
        V: Clone + Send + Sync + 'static,
    {
        let value: Arc<dyn Codec<V>> = Arc::new(Json);
        let default = Arc::new(move || default.clone());
        self.declare_table(name, default, value, KeyBytes::codec(Json))
    }

    /// Declares table `name` (or another handle of it) with `default` for a
    /// missing key, values stored by `value` and keys placed by `key`.
    pub(crate) fn declare_table<K, V>(
        &mut self,
        name: &str,
        default: Arc<dyn Fn() -> V + Send + Sync>,
        value: Arc<dyn Codec<V>>,
        key: KeyBytes<K>,
    ) -> Table<K, V>
    where
        K: TableKey + 'static,
    {
        let declared = match self.tables.iter().find(|t| t.name == name) {
            Some(t) => t.declared.clone(),
            None => {
                let declared = DeclaredKeys::new(key.clone());
                self.tables.push(DeclaredTable {
                    name: name.to_owned(),
                    declared: declared.clone(),
                });
                declared
            }
        };
        Table {
            spec: Arc::new(TableSpec {
                name: Arc::from(name),
                default,
                value,
                key,
                declared,
                types: PhantomData,
            }),
        }
    }

    /// Declares a global table: all of `topic` on every worker, restored
    /// before the worker joins its group and kept current while it runs (see
    /// [`GlobalTable`]). Agents read it with
    /// [`Ctx::get_global`](crate::Ctx::get_global); `topic` needs no common
    /// partition count with the app's other topics. Nothing else is written
    /// for it: the topic is its changelog. The web server answers
    /// `/tables/<name>/<key>` on every worker, without redirects.
    ///
    /// ```
    /// use strom::codec::Utf8;
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Profile { name: String }
    /// let mut app = strom::App::new("enrich");
    /// let users = app.topic::<String, Profile>("users").with_key_codec(Utf8);
    /// let profiles = app.global_table("profiles", &users);
    /// assert_eq!(profiles.topic(), "users");
    /// ```
    pub fn global_table<K, V>(&mut self, name: &str, topic: &Topic<K, V>) -> GlobalTable<K, V>
    where
        K: TableKey + 'static,
    {
        let table = GlobalTable::new(name, topic);
        let parse = key_parser(KeyBytes::shared(topic.spec.key.clone()));
        self.globals.retain(|(n, _, _)| n != name);
        self.globals
            .push((name.to_owned(), topic.spec.name.to_string(), parse));
        table
    }

    /// Starts defining an agent over `topic`'s events.
    pub fn agent<K, V>(&mut self, topic: &Topic<K, V>) -> Stream<'_, K, V>
    where
        K: Send + 'static,
        V: Send + 'static,
    {
        Stream {
            inputs: vec![Input::of(topic)],
            app: self,
            stage: Stage::default(),
        }
    }

    /// Starts defining one agent over the events of several topics, merged
    /// (Kafka Streams' `merge`, a Faust agent over a topic of several
    /// names): each record is processed in its own partition's task, in
    /// order per partition of each topic; events of one partition number
    /// of all the topics meet in one task, so they share that partition's
    /// tables (which have as many partitions as the largest topic agents
    /// read: a handler that uses them needs topics of that count). A
    /// `group_by` names its repartition topic after the first topic.
    ///
    /// ```no_run
    /// let mut app = strom::App::new("shop");
    /// let web = app.topic::<String, u64>("web-orders");
    /// let store = app.topic::<String, u64>("store-orders");
    /// let totals = app.table::<String, u64>("totals", 0);
    /// app.agent_merged(&[&web, &store]).for_each(move |ctx, order| {
    ///     let totals = totals.clone();
    ///     async move {
    ///         ctx.update(&totals, &order.key, |t| t + order.value).await?;
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub fn agent_merged<K, V>(&mut self, topics: &[&Topic<K, V>]) -> Stream<'_, K, V>
    where
        K: Send + 'static,
        V: Send + 'static,
    {
        Stream {
            inputs: topics.iter().map(|t| Input::of(t)).collect(),
            app: self,
            stage: Stage::default(),
        }
    }

    /// Notes that `what` reads `topics` together: they need one partition
    /// count (checked at start), and none may be a pattern.
    pub(crate) fn joined(&mut self, topics: Vec<String>, what: &str) {
        self.not_patterns(&topics, what);
        self.joined.push(topics);
    }

    /// Refuses (at start) a join over a pattern of topic names: how its
    /// topics are partitioned is not known when the app starts.
    pub(crate) fn not_patterns(&mut self, topics: &[String], what: &str) {
        for topic in topics {
            if self.patterns.iter().any(|p| p.as_str() == topic) {
                self.misdeclared.push(format!(
                    "{what} reads {topic:?}, a pattern of topic names: a join needs topics \
                     whose partitioning is known when the app starts"
                ));
            }
        }
    }

    pub(crate) fn declare_repartition(&mut self, topic: &str, source: &str) {
        self.repartitions
            .push((topic.to_owned(), source.to_owned()));
    }

    /// Adds a stage's processor; `what` says what it does, for `APP agents`.
    pub(crate) fn add_processor(&mut self, processor: Arc<dyn Processor>, what: String) {
        self.agents.push(what);
        self.processors.push(processor);
    }

    /// Creates missing topics, then runs a worker until `shutdown` completes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<()> {
        if let Some(e) = self.env_error.take() {
            return Err(e.into());
        }
        let client = Client::connect(self.config.client.clone()).await?;
        self.create_topics(&client).await?;
        Ok(self.worker(self.config.clone()).run(shutdown).await?)
    }

    /// Creates the declared topics and the repartition topics that are
    /// missing, once sure the topics joins read have the tables' partition
    /// count.
    pub(crate) async fn create_topics(&self, client: &Client) -> Result<()> {
        let partitions = self.check_copartitioning(client).await?;
        let replication = self.config.replication;
        for (topic, declared) in &self.topics {
            let settings = declared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .settings
                .clone();
            let new = NewTopic {
                name: topic.clone(),
                partitions: settings.partitions.unwrap_or(self.partitions),
                replication_factor: settings.replication.unwrap_or(replication),
                configs: settings.configs,
            };
            ensure(client, new, settings.partitions.is_some()).await?;
        }
        // Before the repartition topics: one may repartition a table join.
        // As the worker makes every changelog: compacted, with the tables'
        // partition count.
        for table in &self.changelog_sources {
            let topic = changelog::topic_name(self.id(), table);
            changelog::ensure_topic(client, &topic, partitions as usize, replication, None).await?;
        }
        // With the tables' count too, so a stream grouped by a table's key
        // lands in the partitions that hold the table's keys.
        for (topic, _) in &self.repartitions {
            ensure(client, NewTopic::new(topic, partitions, replication), true).await?;
        }
        Ok(())
    }

    /// The changelog topics agents read (of joined tables).
    fn changelog_topics(&self) -> Vec<String> {
        (self.changelog_sources.iter())
            .map(|table| changelog::topic_name(self.id(), table))
            .collect()
    }

    /// The topics agents read that the app does not make itself
    /// (repartition topics and table changelogs are made with their count),
    /// patterns as their matches.
    async fn sources(&self, client: &Client) -> Result<std::collections::BTreeSet<String>> {
        let changelogs = self.changelog_topics();
        Ok((self.source_topics(client).await?.into_values().flatten())
            .filter(|t| !self.repartitions.iter().any(|(r, _)| r == t))
            .filter(|t| !changelogs.iter().any(|c| c == t))
            .collect())
    }

    /// The partition count topic `topic` has, or (missing) will be created
    /// with; `None` for an internal topic the app has not made yet.
    async fn partition_count(&self, client: &Client, topic: &str) -> Result<Option<(i32, &str)>> {
        match client.topic_metadata(topic).await {
            Ok(meta) => Ok(Some((meta.partitions.len() as i32, "has"))),
            Err(strom_client::Error::UnknownTopic { .. }) => {
                let Some((_, declared)) = self.topics.iter().find(|(t, _)| t == topic) else {
                    return Ok(None);
                };
                let d = declared.lock().unwrap_or_else(|e| e.into_inner());
                let n = d.settings.partitions.unwrap_or(self.partitions);
                Ok(Some((n, "would be created with")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The tables' partition count: the largest of the topics agents read
    /// (each task of a worker processes one partition number of every topic
    /// that has it, with that number's tables). Topics may differ, except
    /// where a join reads them with tables: those need this count, checked
    /// before anything is created, from the counts the topics have or, for
    /// missing ones, will be created with.
    async fn check_copartitioning(&self, client: &Client) -> Result<i32> {
        for table in &self.changelog_sources {
            let windowed = self
                .tables
                .iter()
                .any(|t| t.name == *table && t.windowing().is_some());
            if windowed {
                return Err(crate::Error::Config(format!(
                    "table {table:?} is windowed: join_tables joins plain tables; nothing was created"
                )));
            }
        }
        if !self.misdeclared.is_empty() {
            return Err(crate::Error::Config(format!(
                "{}; nothing was created",
                self.misdeclared.join("; ")
            )));
        }
        for (i, name) in self.window_joins.iter().enumerate() {
            if self.window_joins[..i].contains(name) {
                return Err(crate::Error::Config(format!(
                    "two windowed joins are named {name:?}: each keeps its own tables, \
                     named after it; nothing was created"
                )));
            }
        }
        let mut largest: Option<(String, i32)> = None;
        for topic in self.sources(client).await? {
            if let Some((n, _)) = self.partition_count(client, &topic).await? {
                if largest.as_ref().is_none_or(|(_, m)| n > *m) {
                    largest = Some((topic, n));
                }
            }
        }
        let Some((widest, partitions)) = largest else {
            return Ok(self.partitions);
        };
        // Joined tables' changelogs and repartition topics that exist
        // already must agree too (missing ones are made with the count).
        let mut wrong = Vec::new();
        let joined = self.changelog_topics().into_iter();
        let repartitions = self.repartitions.iter().map(|(r, _)| r.clone());
        for topic in joined
            .chain(repartitions)
            .chain(self.copartitioned.iter().cloned())
        {
            if let Some((n, how)) = self.partition_count(client, &topic).await? {
                if n != partitions && !wrong.iter().any(|(t, _, _)| *t == topic) {
                    wrong.push((topic, n, how));
                }
            }
        }
        for group in &self.joined {
            let mut counts = Vec::new();
            for topic in group {
                if let Some((n, how)) = self.partition_count(client, topic).await? {
                    counts.push((topic, n, how));
                }
            }
            if counts.iter().any(|(_, n, _)| *n != counts[0].1) {
                let list: Vec<String> = (counts.iter())
                    .map(|(topic, n, how)| format!("{topic:?} {how} {n}"))
                    .collect();
                return Err(crate::Error::Config(format!(
                    "the topics a windowed join reads need one partition count, but {}; \
                     nothing was created",
                    list.join(", ")
                )));
            }
        }
        if wrong.is_empty() {
            return Ok(partitions);
        }
        let list: Vec<String> = (wrong.iter())
            .map(|(topic, n, how)| format!("{topic:?} {how} {n}"))
            .collect();
        Err(crate::Error::Config(format!(
            "the topics a join or group_by reads with tables need the tables' partition count, \
             {partitions} (of {widest:?}, the largest topic agents read), but {}; nothing was created",
            list.join(", ")
        )))
    }

    /// A worker of this app's agents, tables, pages and timers, run with
    /// `config` (the app's own, or the test driver's).
    pub(crate) fn worker(&self, mut config: WorkerConfig) -> Worker {
        if config.guarantee == ProcessingGuarantee::ExactlyOnce && !self.commit_interval_set {
            config.commit_interval = Duration::from_millis(100);
        }
        // Joins in time windows need the topics read in step by time.
        config.time_ordered |= !self.window_joins.is_empty();
        let mut worker = Worker::new(config);
        for t in &self.tables {
            worker = match t.windowing() {
                Some(w) => worker.windowed_table(t.name.clone(), t.declared.parse(), w),
                None => worker.table_with_key(t.name.clone(), t.declared.parse()),
            };
        }
        for (name, topic, parse) in &self.globals {
            worker = worker.global_table(name.clone(), topic.clone(), parse.clone());
        }
        for pattern in &self.patterns {
            worker = worker.topic_pattern(pattern.clone());
        }
        // Partition timers after the agents, so a stream-time one sees the
        // stream time an event's agents made.
        let punctuators = self.punctuators.iter().map(|(p, _)| p);
        for p in self.processors.iter().chain(punctuators) {
            worker = worker.processor(p.clone());
        }
        for page in &self.pages {
            worker = worker.page(page.clone());
        }
        for timer in &self.timers {
            worker = worker.timer(timer.clone());
        }
        worker
    }

    /// The app's command line (see `APP --help`):
    ///
    /// - `worker [--brokers B] [--state-dir D] [--web-port P] [--web-bind IP]
    ///   [--web-host H] [--without-web] [--log-level L]`: runs a worker until
    ///   SIGTERM or SIGINT, then stops cleanly; a second signal exits at once;
    /// - `send TOPIC VALUE [--key K] [--partition P] [--repeat N]`;
    /// - `tables`, `agents`, `topics`: what the app declares;
    /// - `reset [--yes]`: deletes this worker's local table files.
    pub fn main(self) -> ExitCode {
        crate::cli::main(self)
    }
}

/// Creates `new` unless it exists; an existing topic with another partition
/// count than an explicitly declared one is reported (the worker refuses to
/// start where co-partitioning needs the counts to match).
async fn ensure(client: &Client, new: NewTopic, explicit_partitions: bool) -> Result<()> {
    let (topic, partitions) = (new.name.clone(), new.partitions);
    let found = client.ensure_topic(new).await? as i32;
    if explicit_partitions && found != partitions {
        warn!(%topic, declared = partitions, found, "topic exists with another partition count than declared; using it as it is");
    }
    Ok(())
}

/// The number environment variable `name` holds, if set; a value that is not
/// one is logged and ignored (the default applies).
fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    value
        .parse()
        .map_err(|e| warn!("{name}={value:?}: {e}; using the default"))
        .ok()
}
