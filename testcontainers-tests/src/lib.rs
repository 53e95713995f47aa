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

use std::net::TcpListener;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use strom_client::{Client, ClientConfig};
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
    BUILT
        .get_or_init(|| {
            let image = format!("{}:{}", TANSU_IMAGE.0, TANSU_IMAGE.1);
            if image_present(&image) {
                return Ok(());
            }
            let script = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../scripts/build-test-broker.sh"
            );
            eprintln!("strom-it: building the local broker image {image} with {script}");
            let status = Command::new("bash")
                .arg(script)
                .arg(&image)
                .status()
                .map_err(|e| format!("cannot run {script}: {e}"))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{script} failed ({status}); see its output above"))
            }
        })
        .clone()
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("strom-it: cannot find a free port: {e}"))
}

impl TestBroker {
    /// Starts (or points at) the broker `STROM_TEST_BROKER` names and waits until
    /// it answers. Panics, saying why, when that is impossible.
    pub async fn start() -> TestBroker {
        init_tracing();
        let choice = std::env::var("STROM_TEST_BROKER").unwrap_or_default();
        let kind = match choice.as_str() {
            "" | "auto" => auto_kind(),
            "kafka" => Ok(BrokerKind::Kafka),
            "tansu" => ensure_tansu_image().map(|()| BrokerKind::Tansu),
            addr if addr.contains(':') => {
                let broker = TestBroker {
                    bootstrap: addr.to_owned(),
                    kind: BrokerKind::External,
                    container: None,
                };
                broker.wait_ready().await;
                return broker;
            }
            other => Err(format!(
                "STROM_TEST_BROKER={other:?} is not auto, kafka, tansu or host:port"
            )),
        }
        .unwrap_or_else(|e| panic!("strom-it: {e}"));
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let result = match kind {
                BrokerKind::Tansu => start_tansu(port).await,
                _ => start_kafka(port).await,
            };
            match result {
                Ok(container) => {
                    let broker = TestBroker {
                        bootstrap: format!("127.0.0.1:{port}"),
                        kind,
                        container: Some(container),
                    };
                    broker.wait_ready().await;
                    return broker;
                }
                // Most likely the port was taken between choosing and binding it.
                Err(e) => last = e.to_string(),
            }
        }
        panic!("strom-it: cannot start a {kind:?} broker container: {last}");
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
    port: u16,
) -> testcontainers::core::error::Result<ContainerAsync<GenericImage>> {
    GenericImage::new(TANSU_IMAGE.0, TANSU_IMAGE.1)
        .with_wait_for(WaitFor::message_on_either_std("ready in"))
        .with_mapped_port(port, ContainerPort::Tcp(port))
        .with_cmd([
            "broker".to_owned(),
            "--listener-url".to_owned(),
            format!("tcp://0.0.0.0:{port}"),
            "--advertised-listener-url".to_owned(),
            format!("tcp://127.0.0.1:{port}"),
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
            format!("PLAINTEXT://127.0.0.1:{port}"),
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
