//! `strom-it`: end-to-end tests of Strom against a Kafka broker in a container,
//! started through testcontainers.
//!
//! [`TestBroker::start`] gives each test its own broker. `STROM_TEST_BROKER`
//! chooses which:
//!
//! | value | broker |
//! |---|---|
//! | unset or `auto` | the real Apache Kafka image (`STROM_KAFKA_IMAGE`, default `apache/kafka-native:4.1.0`) if it is present or can be pulled; otherwise the local tansu image, built on first use by `scripts/build-test-broker.sh` |
//! | `kafka` | the real Apache Kafka image, nothing else |
//! | `tansu` | the local tansu image (built if missing) |
//! | `host:port` | an already running broker; no container is started |
//!
//! Nothing is skipped: if no Docker engine is reachable, or the image can be
//! neither pulled nor built, `start` panics and says why.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use mutual_tls::MutualTlsProxy;
use strom_client::{Client, ClientConfig};

mod mutual_tls;
use testcontainers::core::{ContainerPort, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

/// The local image of the Kafka-compatible broker.
pub const TANSU_IMAGE: (&str, &str) = ("strom/tansu", "0.6.0");
const DEFAULT_KAFKA_IMAGE: &str = "apache/kafka-native:4.1.0";

/// Which kind of broker the tests run against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Apache Kafka.
    Kafka,
    /// tansu, the Kafka-compatible broker of the local image (see DESIGN.md for
    /// its known limits).
    Tansu,
    /// nisshi 0.8.1 (tansu renamed) without TLS or SASL: for what tansu 0.6
    /// does not do, such as static membership (see DESIGN.md).
    Nisshi,
    /// A broker started outside the tests.
    External,
}

/// A broker for one test. The container (if any) is removed when this is dropped.
pub struct TestBroker {
    /// `host:port` to bootstrap from.
    pub bootstrap: String,
    /// What kind of broker it is.
    pub kind: BrokerKind,
    container: Option<ContainerAsync<GenericImage>>,
}

impl std::fmt::Debug for TestBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestBroker")
            .field("bootstrap", &self.bootstrap)
            .field("kind", &self.kind)
            .finish()
    }
}

/// Sets up `tracing` output for tests once (`RUST_LOG` picks the level).
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    });
}

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run the docker CLI: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

fn image_present(image: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", image]).is_ok()
}

/// Builds the local tansu image unless present; once per test process.
fn ensure_tansu_image() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let image = format!("{}:{}", TANSU_IMAGE.0, TANSU_IMAGE.1);
    BUILT
        .get_or_init(|| ensure_image(&image, "build-test-broker.sh"))
        .clone()
}

/// Builds `image` with `scripts/<script>` unless it is present.
fn ensure_image(image: &str, script: &str) -> Result<(), String> {
    if image_present(image) {
        return Ok(());
    }
    let script = format!("{}/../scripts/{script}", env!("CARGO_MANIFEST_DIR"));
    eprintln!("strom-it: building the local broker image {image} with {script}");
    let status = Command::new("bash")
        .arg(&script)
        .arg(image)
        .status()
        .map_err(|e| format!("cannot run {script}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{script} failed ({status}); see its output above"))
    }
}

/// The version of Python's `confluent-kafka` (librdkafka) the interop tests
/// run as the second client.
pub const CONFLUENT_KAFKA: &str = "confluent-kafka==2.6.1";

/// A Python interpreter with [`CONFLUENT_KAFKA`]: a virtual environment in
/// the target directory, made on first use (`python3 -m venv`, then pip from
/// PyPI). Panics, saying why, when it cannot be made: an interop test never
/// passes without its second client.
pub fn librdkafka_python() -> PathBuf {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let made = PYTHON.get_or_init(|| {
        let venv = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/strom-it-librdkafka"
        ));
        let python = venv.join("bin/python");
        let works = |python: &Path| {
            Command::new(python)
                .args(["-c", "import confluent_kafka"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if works(&python) {
            return Ok(python);
        }
        eprintln!(
            "strom-it: installing {CONFLUENT_KAFKA} into {}",
            venv.display()
        );
        let run = |cmd: &mut Command| {
            let status = cmd.status().map_err(|e| format!("{cmd:?}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{cmd:?} failed ({status})"))
            }
        };
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(&python).args(["-m", "pip", "install", "--quiet", CONFLUENT_KAFKA]))?;
        if works(&python) {
            Ok(python)
        } else {
            Err(format!(
                "{} cannot import confluent_kafka after installing it",
                python.display()
            ))
        }
    });
    match made {
        Ok(python) => python.clone(),
        Err(e) => panic!("no librdkafka for the interop tests: {e}"),
    }
}

/// Decides, once per process, which image `auto` uses.
fn auto_kind() -> Result<BrokerKind, String> {
    static KIND: OnceLock<Result<BrokerKind, String>> = OnceLock::new();
    KIND.get_or_init(|| {
        docker(&["version", "--format", "{{.Server.Version}}"]).map_err(|e| {
            format!("no Docker engine is reachable ({e}); start one, or set STROM_TEST_BROKER=host:port to use a running broker")
        })?;
        let kafka = kafka_image();
        if image_present(&kafka) {
            return Ok(BrokerKind::Kafka);
        }
        match docker(&["pull", "--quiet", &kafka]) {
            Ok(_) => Ok(BrokerKind::Kafka),
            Err(e) => {
                eprintln!("strom-it: cannot pull {kafka} ({e}); using the local tansu broker");
                ensure_tansu_image()?;
                Ok(BrokerKind::Tansu)
            }
        }
    })
    .clone()
}

fn kafka_image() -> String {
    std::env::var("STROM_KAFKA_IMAGE").unwrap_or_else(|_| DEFAULT_KAFKA_IMAGE.to_owned())
}

/// The container kind `STROM_TEST_BROKER` asks for, or `Err(address)` of an
/// external broker. Panics, saying why, on a value it does not understand or
/// when no Docker engine is reachable.
fn choose() -> Result<BrokerKind, String> {
    init_tracing();
    let choice = std::env::var("STROM_TEST_BROKER").unwrap_or_default();
    let kind = match choice.as_str() {
        "" | "auto" => auto_kind(),
        "kafka" => Ok(BrokerKind::Kafka),
        "tansu" => ensure_tansu_image().map(|()| BrokerKind::Tansu),
        addr if addr.contains(':') => return Err(addr.to_owned()),
        other => Err(format!(
            "STROM_TEST_BROKER={other:?} is not auto, kafka, tansu or host:port"
        )),
    };
    Ok(kind.unwrap_or_else(|e| panic!("strom-it: {e}")))
}

impl TestBroker {
    /// Starts (or points at) the broker `STROM_TEST_BROKER` names and waits until
    /// it answers. Panics, saying why, when that is impossible.
    pub async fn start() -> TestBroker {
        let broker = match choose() {
            Err(addr) => TestBroker {
                bootstrap: addr,
                kind: BrokerKind::External,
                container: None,
            },
            Ok(kind) => Self::start_container(kind, None).await,
        };
        broker.wait_ready().await;
        broker
    }

    /// Starts a plain nisshi broker in a container, whatever
    /// `STROM_TEST_BROKER` says (unless it names an external broker: then that
    /// one, which must do what the test needs). Builds its image first if
    /// missing. Panics, saying why, when that is impossible.
    pub async fn start_nisshi() -> TestBroker {
        let broker = match choose() {
            Err(addr) => TestBroker {
                bootstrap: addr,
                kind: BrokerKind::External,
                container: None,
            },
            Ok(_) => {
                if let Err(e) = ensure_nisshi_image() {
                    panic!("strom-it: {e}");
                }
                Self::start_container(BrokerKind::Nisshi, None).await
            }
        };
        broker.wait_ready().await;
        broker
    }

    /// Starts a container listening on a free port and advertising
    /// `advertised` (its own port when `None`).
    async fn start_container(kind: BrokerKind, advertised: Option<u16>) -> TestBroker {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let advertised = advertised.unwrap_or(port);
            let result = match kind {
                BrokerKind::Tansu => start_tansu(TANSU_IMAGE, port, advertised).await,
                BrokerKind::Nisshi => start_tansu(NISSHI_IMAGE, port, advertised).await,
                _ => start_kafka(port, advertised).await,
            };
            match result {
                Ok(container) => {
                    return TestBroker {
                        bootstrap: format!("127.0.0.1:{port}"),
                        kind,
                        container: Some(container),
                    }
                }
                // Most likely the port was taken between choosing and binding it.
                Err(e) => last = e.to_string(),
            }
        }
        panic!("strom-it: cannot start a {kind:?} broker container: {last}");
    }

    /// Whether this broker implements static group membership (KIP-345):
    /// tansu 0.6 does not (it keeps a departed static member as leader and
    /// gives the restarted one a new member id), so workers on it join as
    /// dynamic members. Set on every worker the tests start, in-process with
    /// `App::with_static_membership`, in child processes through
    /// [`TestBroker::static_membership_env`].
    pub fn static_membership(&self) -> bool {
        self.kind != BrokerKind::Tansu
    }

    /// `STROM_STATIC_MEMBERSHIP` and its value for a worker process on this broker.
    pub fn static_membership_env(&self) -> (&'static str, &'static str) {
        let on = if self.static_membership() {
            "true"
        } else {
            "false"
        };
        ("STROM_STATIC_MEMBERSHIP", on)
    }

    /// A broker whose advertised address is a [`MutualTlsProxy`] in front of
    /// it that demands client certificates signed by `certs.ca`. `None` for
    /// an external broker (its advertised address cannot be changed).
    pub async fn start_behind_mutual_tls(
        certs: &TestCerts,
    ) -> Option<(TestBroker, MutualTlsProxy)> {
        let Ok(kind) = choose() else {
            return None;
        };
        let proxy_port = free_port();
        let mut broker = Self::start_container(kind, Some(proxy_port)).await;
        // The broker answers on its own port before anyone uses the proxy.
        broker.wait_ready().await;
        let proxy = MutualTlsProxy::start(proxy_port, broker.bootstrap.clone(), certs).await;
        broker.bootstrap = proxy.addr.clone();
        Some((broker, proxy))
    }

    /// A broker whose advertised address is a [`FaultProxy`] in front of it, so
    /// every client connection passes through the proxy. `None` for an
    /// external broker (its advertised address cannot be changed).
    pub async fn start_behind_proxy() -> Option<(TestBroker, FaultProxy)> {
        let Ok(kind) = choose() else {
            return None;
        };
        let proxy_port = free_port();
        let mut broker = Self::start_container(kind, Some(proxy_port)).await;
        let proxy = FaultProxy::start(proxy_port, broker.bootstrap.clone()).await;
        broker.bootstrap = proxy.addr.clone();
        broker.wait_ready().await;
        Some((broker, proxy))
    }

    async fn wait_ready(&self) {
        let mut config = ClientConfig::new([self.bootstrap.clone()]);
        config.bootstrap_timeout = Duration::from_secs(60);
        if let Err(e) = Client::connect(config).await {
            panic!(
                "strom-it: the broker at {} never answered: {e}",
                self.bootstrap
            );
        }
    }

    /// A client with test-friendly timeouts.
    pub async fn client(&self) -> Client {
        Client::connect(self.client_config())
            .await
            .unwrap_or_else(|e| panic!("strom-it: cannot connect to {}: {e}", self.bootstrap))
    }

    /// The client configuration [`TestBroker::client`] uses.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::new([self.bootstrap.clone()])
    }

    /// Stops the broker's container (to test what clients do meanwhile).
    pub async fn stop(&self) {
        if let Some(c) = &self.container {
            c.stop()
                .await
                .unwrap_or_else(|e| panic!("strom-it: cannot stop the broker: {e}"));
        }
    }

    /// Freezes the broker (`docker pause`): connections stay open and nothing
    /// answers, as with a broker stuck in a long GC or a stalled VM. False
    /// for an external broker, which cannot be frozen.
    pub async fn freeze(&self) -> bool {
        let Some(c) = &self.container else {
            return false;
        };
        c.pause()
            .await
            .unwrap_or_else(|e| panic!("strom-it: cannot pause the broker: {e}"));
        true
    }

    /// Lets a broker frozen by [`TestBroker::freeze`] go on.
    pub async fn thaw(&self) {
        if let Some(c) = &self.container {
            c.unpause()
                .await
                .unwrap_or_else(|e| panic!("strom-it: cannot unpause the broker: {e}"));
        }
    }

    /// Starts the broker's container again after [`TestBroker::stop`], on the same port.
    pub async fn restart(&self) {
        if let Some(c) = &self.container {
            c.start()
                .await
                .unwrap_or_else(|e| panic!("strom-it: cannot restart the broker: {e}"));
            self.wait_ready().await;
        }
    }
}

async fn start_tansu(
    image: (&str, &str),
    port: u16,
    advertised: u16,
) -> testcontainers::core::error::Result<ContainerAsync<GenericImage>> {
    GenericImage::new(image.0, image.1)
        .with_wait_for(WaitFor::message_on_either_std("ready in"))
        .with_mapped_port(port, ContainerPort::Tcp(port))
        .with_cmd([
            "broker".to_owned(),
            "--listener-url".to_owned(),
            format!("tcp://0.0.0.0:{port}"),
            "--advertised-listener-url".to_owned(),
            format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine".to_owned(),
            "memory://tansu/".to_owned(),
        ])
        .with_startup_timeout(Duration::from_secs(60))
        .start()
        .await
}

/// Apache Kafka in KRaft mode, one node, listening on the same port inside and
/// outside the container so the advertised address works from the host.
async fn start_kafka(
    port: u16,
    advertised: u16,
) -> testcontainers::core::error::Result<ContainerAsync<GenericImage>> {
    let image = kafka_image();
    let (name, tag) = image.rsplit_once(':').unwrap_or((image.as_str(), "latest"));
    GenericImage::new(name, tag)
        .with_wait_for(WaitFor::message_on_either_std("Kafka Server started"))
        .with_mapped_port(port, ContainerPort::Tcp(port))
        .with_env_var("KAFKA_NODE_ID", "1")
        .with_env_var("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env_var(
            "KAFKA_LISTENERS",
            format!("PLAINTEXT://:{port},CONTROLLER://:9093"),
        )
        .with_env_var(
            "KAFKA_ADVERTISED_LISTENERS",
            format!("PLAINTEXT://127.0.0.1:{advertised}"),
        )
        .with_env_var("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env_var(
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
            "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        )
        .with_env_var("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env_var("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env_var("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env_var("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_startup_timeout(Duration::from_secs(120))
        .start()
        .await
}

/// A topic name no other test (or earlier run against the same broker) uses.
pub fn unique_topic(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A TCP proxy in front of a broker that can lose a Produce response (the
/// broker has written the records, the client never hears so, and the
/// connection drops, just as when a network fails at the wrong moment), reset
/// every connection, stall every connection (bytes held, connections open),
/// and hide a topic's upper partitions from Metadata answers, so revealing
/// them looks to clients exactly like partitions added by CreatePartitions
/// (which neither test broker implements).
pub struct FaultProxy {
    /// `host:port` clients connect to.
    pub addr: String,
    faults: Arc<Faults>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Faults {
    drop_produce: AtomicU32,
    dropped: AtomicU32,
    /// Metadata answers list only the first N partitions of this topic.
    visible: std::sync::Mutex<Option<(String, i32)>>,
    /// Wakes every relay to close its connection.
    reset: tokio::sync::Notify,
    /// No byte is passed on before this instant.
    stalled_until: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Faults {
    /// Waits out a stall, if one is on.
    async fn pass(&self) {
        let until = *self.stalled_until.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    async fn start(port: u16, broker: String) -> FaultProxy {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("strom-it: cannot listen on proxy port {port}: {e}"));
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (broker, faults) = (broker.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Ok(upstream) = tokio::net::TcpStream::connect(&broker).await {
                        relay(client, upstream, faults).await;
                    }
                });
            }
        });
        FaultProxy {
            addr: format!("127.0.0.1:{port}"),
            faults,
            task,
        }
    }

    /// Loses the next Produce response (and closes that connection).
    pub fn drop_next_produce_response(&self) {
        self.faults.drop_produce.fetch_add(1, Ordering::SeqCst);
    }

    /// Closes every connection through the proxy now: clients see them
    /// reset and connect again.
    pub fn reset_connections(&self) {
        self.faults.reset.notify_waiters();
    }

    /// Holds every byte in both directions for `how_long` from now; the
    /// connections stay open, so clients see requests go unanswered.
    pub fn stall(&self, how_long: Duration) {
        *self
            .faults
            .stalled_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tokio::time::Instant::now() + how_long);
    }

    /// How many Produce responses were lost so far.
    pub fn dropped(&self) -> u32 {
        self.faults.dropped.load(Ordering::SeqCst)
    }

    /// From now on Metadata answers list only partitions `0..partitions` of
    /// `topic`; `None` lists every partition again.
    pub fn show_partitions(&self, topic_partitions: Option<(&str, i32)>) {
        *self
            .faults
            .visible
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = topic_partitions.map(|(t, n)| (t.to_owned(), n));
    }
}

/// `frame` (a Metadata response of `version`, size prefix included) with the
/// partitions of `topic` from `visible` on left out.
fn hide_partitions(frame: &[u8], version: i16, topic: &str, visible: i32) -> Option<Vec<u8>> {
    use kafka_protocol::messages::{ApiKey, MetadataResponse, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable};
    let header_version = ApiKey::Metadata.response_header_version(version);
    let mut body = bytes::Bytes::copy_from_slice(&frame[4..]);
    let header = ResponseHeader::decode(&mut body, header_version).ok()?;
    let mut resp = MetadataResponse::decode(&mut body, version).ok()?;
    for t in &mut resp.topics {
        if t.name.as_ref().is_some_and(|n| n.0.as_str() == topic) {
            t.partitions.retain(|p| p.partition_index < visible);
        }
    }
    let mut out = bytes::BytesMut::new();
    header.encode(&mut out, header_version).ok()?;
    resp.encode(&mut out, version).ok()?;
    let mut framed = (out.len() as i32).to_be_bytes().to_vec();
    framed.extend_from_slice(&out);
    Some(framed)
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Option<Vec<u8>> {
    let len = r.read_i32().await.ok()?;
    let mut body = vec![0u8; usize::try_from(len).ok()?];
    r.read_exact(&mut body).await.ok()?;
    let mut frame = len.to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    Some(frame)
}

/// Copies frames both ways, noting each request's API and version by
/// correlation id so a Produce response can be recognised and lost and a
/// Metadata response rewritten.
async fn relay(
    client: tokio::net::TcpStream,
    upstream: tokio::net::TcpStream,
    faults: Arc<Faults>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let resets = faults.clone();
    let reset = resets.reset.notified();
    let apis: Arc<std::sync::Mutex<HashMap<i32, (i16, i16)>>> = Arc::default();
    let requests = {
        let apis = apis.clone();
        let faults_in = faults.clone();
        async move {
            while let Some(frame) = read_frame(&mut cr).await {
                if frame.len() >= 12 {
                    let api = i16::from_be_bytes([frame[4], frame[5]]);
                    let version = i16::from_be_bytes([frame[6], frame[7]]);
                    let cid = i32::from_be_bytes([frame[8], frame[9], frame[10], frame[11]]);
                    apis.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(cid, (api, version));
                }
                faults_in.pass().await;
                if uw.write_all(&frame).await.is_err() {
                    return;
                }
            }
        }
    };
    let responses = async move {
        while let Some(mut frame) = read_frame(&mut ur).await {
            if frame.len() >= 8 {
                let cid = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
                let api = apis.lock().unwrap_or_else(|e| e.into_inner()).remove(&cid);
                let take = api.is_some_and(|(api, _)| api == 0)
                    && faults
                        .drop_produce
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                if take {
                    faults.dropped.fetch_add(1, Ordering::SeqCst);
                    return; // lose it, and the connection with it
                }
                let hide = faults
                    .visible
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if let (Some((3, version)), Some((topic, visible))) = (api, hide) {
                    match hide_partitions(&frame, version, &topic, visible) {
                        Some(rewritten) => frame = rewritten,
                        None => {
                            eprintln!("strom-it: fault proxy: a Metadata v{version} answer does not decode; dropping the connection");
                            return;
                        }
                    }
                }
            }
            faults.pass().await;
            if cw.write_all(&frame).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = requests => {}
        _ = responses => {}
        _ = reset => {}
    }
}

/// The pipeline of `streams/examples/wordcount.rs` declared on `app`: text
/// lines from `input` (no key), lowercase words, `group_by` word, counts in
/// table `word-counts`, each new count sent to `output` (key: the word, value:
/// the count as JSON).
pub fn wordcount(app: strom::App, input: &str, output: &str) -> strom::App {
    wordcount_panicking_on(app, input, output, None)
}

/// [`wordcount`] whose agent panics on the word `panic_on`, if given.
pub fn wordcount_panicking_on(
    mut app: strom::App,
    input: &str,
    output: &str,
    panic_on: Option<&'static str>,
) -> strom::App {
    use strom::codec::{NoKey, Utf8};
    let sentences = app
        .topic::<(), String>(input)
        .with_key_codec(NoKey)
        .with_value_codec(Utf8);
    let counts_out = app.topic::<String, u64>(output).with_key_codec(Utf8);
    let counts = app.table::<String, u64>("word-counts", 0);
    app.agent(&sentences)
        .flat_map(|line: String| {
            line.split_whitespace()
                .map(str::to_lowercase)
                .collect::<Vec<_>>()
        })
        .group_by(|event| event.value.clone(), "words")
        .for_each(move |ctx, event| {
            let (counts, counts_out) = (counts.clone(), counts_out.clone());
            if panic_on == Some(event.key.as_str()) {
                panic!("the agent was told to blow up on {:?}", event.key);
            }
            async move {
                let n = ctx.update(&counts, &event.key, |n| n + 1).await?;
                ctx.send(&counts_out, &event.key, &n).await?;
                Ok(())
            }
        });
    app
}

/// Runs `app` as a worker in this process until the sender fires (or is
/// dropped); the task panics if the worker fails.
pub fn spawn_app(
    app: strom::App,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        app.run(async {
            let _ = stopped.await;
        })
        .await
        .unwrap_or_else(|e| panic!("strom-it: worker failed: {e}"));
    });
    (stop, task)
}

/// The last count per word in `topic` (key: UTF-8 word, value: JSON number),
/// read from the start until nothing new arrives for 2 s.
pub async fn last_counts(client: &Client, topic: &str) -> HashMap<String, u64> {
    use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
    let partitions = client
        .topic_metadata(topic)
        .await
        .unwrap_or_else(|e| panic!("strom-it: {e}"))
        .partitions
        .len() as i32;
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign((0..partitions).map(|p| (TopicPartition::new(topic, p), Offset::Earliest)))
        .unwrap_or_else(|e| panic!("strom-it: {e}"));
    let mut last = HashMap::new();
    while let Ok(batch) = tokio::time::timeout(Duration::from_secs(2), consumer.poll()).await {
        for r in batch.unwrap_or_else(|e| panic!("strom-it: {e}")) {
            let word = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            let n = serde_json::from_slice(r.value.as_deref().unwrap_or_default())
                .unwrap_or_else(|e| panic!("strom-it: count of {word:?} is not a number: {e}"));
            last.insert(word, n);
        }
    }
    last
}

/// Waits (up to 60 s) until `topic` exists, e.g. until an app under test has
/// created it; panics naming the topic otherwise.
pub async fn wait_for_topic(client: &Client, topic: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.topic_metadata(topic).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "strom-it: topic {topic:?} was never created"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Group `group`'s committed offsets of `topic`'s partitions `0..partitions`
/// (-1 where nothing is committed).
pub async fn committed(client: &Client, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    use strom_client::consumer::TopicPartition;
    let tps: Vec<TopicPartition> = (0..partitions)
        .map(|p| TopicPartition::new(topic, p))
        .collect();
    let committed = client
        .committed_offsets(group, &tps)
        .await
        .unwrap_or_else(|e| panic!("strom-it: committed offsets of {group:?}: {e}"));
    tps.iter()
        .map(|tp| committed.get(tp).copied().flatten().unwrap_or(-1))
        .collect()
}

/// A child process (a worker the test started) that is killed with SIGKILL
/// and reaped when dropped unless it ended: a test that fails leaves no
/// worker running behind it. Derefs to the [`std::process::Child`].
#[derive(Debug)]
pub struct ChildProcess(std::process::Child);

impl ChildProcess {
    /// Starts `command`; panics, saying why, when it cannot.
    pub fn spawn(command: &mut std::process::Command) -> ChildProcess {
        ChildProcess(
            command
                .spawn()
                .unwrap_or_else(|e| panic!("strom-it: cannot start {command:?}: {e}")),
        )
    }

    /// Sends SIGTERM and waits for the process; whether it exited with 0.
    pub fn terminate(&mut self) -> bool {
        let pid = self.0.id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap_or_else(|e| panic!("strom-it: kill -TERM {pid}: {e}"));
        assert!(sent.success(), "strom-it: kill -TERM {pid} failed");
        self.0
            .wait()
            .unwrap_or_else(|e| panic!("strom-it: waiting for {pid}: {e}"))
            .success()
    }
}

impl std::ops::Deref for ChildProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for ChildProcess {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A TCP port free on 127.0.0.1 right now (for a worker's web server).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("strom-it: no free port: {e}"))
}

/// An HTTP response: status, headers (lower-case names), body.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: HashMap<String, String>,
    /// The body as text.
    pub body: String,
}

/// `GET url` (`http://host:port/path`) over HTTP/1.1, redirects not followed.
/// `None` when nothing listens there (yet).
pub async fn http_get(url: &str) -> Option<HttpResponse> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<HashMap<_, _>>();
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The samples of a Prometheus / OpenMetrics text exposition: (name,
/// labels, value). Panics on a line that is neither a comment nor a
/// well-formed sample, so a test fails on malformed output.
pub fn parse_metrics(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    let mut samples = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty()
                    || line == "# EOF"
                    || line.starts_with("# HELP ")
                    || line.starts_with("# TYPE ")
                    || line.starts_with("# UNIT "),
                "strom-it: bad comment line in metrics: {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("strom-it: metric line without a value: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("strom-it: metric value is not a number: {line:?}"));
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("strom-it: unclosed labels: {line:?}"));
                let labels = inner
                    .split(',')
                    .filter(|l| !l.is_empty())
                    .map(|l| {
                        let (k, v) = l
                            .split_once('=')
                            .unwrap_or_else(|| panic!("strom-it: bad label in {line:?}"));
                        let v = v
                            .strip_prefix('"')
                            .and_then(|v| v.strip_suffix('"'))
                            .unwrap_or_else(|| panic!("strom-it: unquoted label in {line:?}"));
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                (name, labels)
            }
            None => (series, HashMap::new()),
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "strom-it: bad metric name in {line:?}"
        );
        samples.push((name.to_owned(), labels, value));
    }
    samples
}

/// The sum of metric `name` over the samples whose label `label` is `value`.
pub fn metric_sum(
    samples: &[(String, HashMap<String, String>, f64)],
    name: &str,
    label: (&str, &str),
) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && l.get(label.0).map(String::as_str) == Some(label.1))
        .map(|(_, _, v)| v)
        .sum()
}

/// PEM files for the TLS tests, made fresh by each run with rcgen.
#[derive(Debug)]
pub struct TestCerts {
    /// The CA that signs the broker's certificate.
    pub ca: PathBuf,
    /// The broker's certificate (for `localhost` and 127.0.0.1) and key.
    pub server_cert: PathBuf,
    /// The broker's key.
    pub server_key: PathBuf,
    /// A certificate for `localhost`, signed by the CA, that expired in 2001,
    /// and its key.
    pub expired_cert: PathBuf,
    /// The expired certificate's key.
    pub expired_key: PathBuf,
    /// Another CA, which signed nothing the broker shows.
    pub other_ca: PathBuf,
    /// A client certificate signed by the CA (for mutual TLS), and its key.
    pub client_cert: PathBuf,
    /// The client certificate's key.
    pub client_key: PathBuf,
    /// A client certificate signed by the other CA, and its key.
    pub stranger_cert: PathBuf,
    /// The stranger's key.
    pub stranger_key: PathBuf,
}

impl TestCerts {
    /// Makes the files in a new directory under the system's temp dir.
    pub fn make() -> TestCerts {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let dir = std::env::temp_dir().join(unique_topic("strom-certs"));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            (cert, key)
        };
        let (ca_cert, ca_key) = ca("strom test CA");
        let (other_cert, other_key) = ca("some other CA");
        let leaf = |name: &str, expired: bool, (ca_cert, ca_key): (&_, &_)| {
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                    .unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            if expired {
                params.not_before = rcgen::date_time_ymd(2000, 1, 1);
                params.not_after = rcgen::date_time_ymd(2001, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, ca_cert, ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let ours = (&ca_cert, &ca_key);
        let (server_cert, server_key) = leaf("localhost", false, ours);
        let (expired_cert, expired_key) = leaf("localhost", true, ours);
        let (client_cert, client_key) = leaf("strom test client", false, ours);
        let (stranger_cert, stranger_key) = leaf("stranger", false, (&other_cert, &other_key));
        let write = |name: &str, pem: &str| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        TestCerts {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            expired_cert: write("expired.pem", &expired_cert),
            expired_key: write("expired.key", &expired_key),
            other_ca: write("other-ca.pem", &other_cert.pem()),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            stranger_cert: write("stranger.pem", &stranger_cert),
            stranger_key: write("stranger.key", &stranger_key),
        }
    }
}

/// The image of the broker for the TLS and SASL tests (tansu cannot do
/// either): nisshi 0.8.1, built by `scripts/build-secure-test-broker.sh`.
pub const NISSHI_IMAGE: (&str, &str) = ("strom/nisshi", "0.8.1");

/// SCRAM users of a [`SecureBroker`]: (mechanism, user, password).
pub const SCRAM_USERS: [(&str, &str, &str); 2] = [
    ("SCRAM-SHA-256", "alice256", "pässword-256"),
    ("SCRAM-SHA-512", "alice512", "pässword-512"),
];

/// A broker that accepts only TLS (the certificate of [`TestCerts`], for
/// `localhost`) and SCRAM-authenticated clients (the users of
/// [`SCRAM_USERS`]): nisshi with its SQLite engine, in a container.
pub struct SecureBroker {
    /// `localhost:port`: the name the broker's certificate is for.
    pub bootstrap: String,
    _container: ContainerAsync<GenericImage>,
}

/// Builds the secure test broker's image unless present (about 15 minutes
/// on 2 cores, once); once per test process.
fn ensure_nisshi_image() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let image = format!("{}:{}", NISSHI_IMAGE.0, NISSHI_IMAGE.1);
    BUILT
        .get_or_init(|| ensure_image(&image, "build-secure-test-broker.sh"))
        .clone()
}

impl SecureBroker {
    /// Starts the broker with `certs`: first without authentication, to
    /// create the SCRAM users in its database, then again on that database
    /// with TLS and authentication required. Panics, saying why, when that
    /// is impossible.
    pub async fn start(certs: &TestCerts) -> SecureBroker {
        Self::start_with(certs, "server").await
    }

    /// [`SecureBroker::start`] showing the certificate that expired in 2001.
    pub async fn start_expired(certs: &TestCerts) -> SecureBroker {
        Self::start_with(certs, "expired").await
    }

    async fn start_with(certs: &TestCerts, cert: &str) -> SecureBroker {
        init_tracing();
        if let Err(e) = ensure_nisshi_image() {
            panic!("strom-it: {e}");
        }
        let dir = certs
            .server_cert
            .parent()
            .expect("the certificates' directory");
        let port = free_port();
        let image = || {
            GenericImage::new(NISSHI_IMAGE.0, NISSHI_IMAGE.1)
                .with_wait_for(WaitFor::message_on_either_std("ready in"))
                .with_mapped_port(port, ContainerPort::Tcp(port))
                .with_mount(testcontainers::core::Mount::bind_mount(
                    dir.to_string_lossy().into_owned(),
                    "/data",
                ))
                .with_startup_timeout(Duration::from_secs(60))
        };
        let listen = [
            "broker".to_owned(),
            "--listener-url".to_owned(),
            format!("tcp://0.0.0.0:{port}"),
            "--advertised-listener-url".to_owned(),
            format!("tcp://localhost:{port}"),
            "--storage-engine".to_owned(),
            "sqlite://broker.db".to_owned(),
        ];
        let open = image()
            .with_cmd(listen.clone())
            .start()
            .await
            .unwrap_or_else(|e| panic!("strom-it: cannot start nisshi: {e}"));
        for (mechanism, user, password) in SCRAM_USERS {
            let scram = if mechanism.ends_with("256") {
                "scram256"
            } else {
                "scram512"
            };
            let cmd = testcontainers::core::ExecCommand::new([
                "/nisshi",
                "user",
                "create",
                "--broker",
                &format!("tcp://127.0.0.1:{port}"),
                "--mechanism",
                scram,
                user,
                password,
            ])
            .with_cmd_ready_condition(testcontainers::core::CmdWaitFor::exit_code(0));
            open.exec(cmd)
                .await
                .unwrap_or_else(|e| panic!("strom-it: nisshi user create {user}: {e}"));
        }
        open.stop()
            .await
            .unwrap_or_else(|e| panic!("strom-it: stopping nisshi: {e}"));
        drop(open);
        let mut secure = listen.to_vec();
        secure.extend([
            "--authentication".to_owned(),
            "--cert".to_owned(),
            format!("/data/{cert}.pem"),
            "--key".to_owned(),
            format!("/data/{cert}.key"),
        ]);
        let container = image()
            .with_cmd(secure)
            .start()
            .await
            .unwrap_or_else(|e| panic!("strom-it: cannot start nisshi with TLS: {e}"));
        SecureBroker {
            bootstrap: format!("localhost:{port}"),
            _container: container,
        }
    }

    /// Client settings for `mechanism`'s user over TLS, trusting `ca`.
    pub fn client_config(&self, mechanism: &str, ca: &Path) -> ClientConfig {
        let (_, user, password) = SCRAM_USERS
            .iter()
            .find(|(m, _, _)| *m == mechanism)
            .unwrap_or_else(|| panic!("no test user for {mechanism}"));
        let mut config = ClientConfig::new([self.bootstrap.clone()]);
        for (name, value) in [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", mechanism),
            ("sasl.username", user),
            ("sasl.password", password),
            ("ssl.ca.location", &ca.to_string_lossy()),
        ] {
            config.set(name, value).unwrap();
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::ChildProcess;

    /// A child process still running when its guard drops (a test failed
    /// before stopping it) is killed and reaped.
    #[test]
    fn a_dropped_child_process_is_killed() {
        let child = ChildProcess::spawn(std::process::Command::new("sleep").arg("300"));
        let pid = child.id();
        let alive = || std::path::Path::new(&format!("/proc/{pid}")).exists();
        assert!(alive(), "the child did not start");
        drop(child);
        assert!(!alive(), "the child {pid} outlived its guard");
    }
}
