//! The app binary's command line, run as a process (`strom-it-app`, a word
//! count): `tables`, `agents`, `topics`, `send`, `worker`, `reset`, and the
//! stop error policy ending a worker with the failing event's coordinates.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::NewTopic;
use strom_it::{free_port, http_get, unique_topic, TestBroker};

const APP: &str = env!("CARGO_BIN_EXE_strom-it-app");

struct Names {
    id: String,
    input: String,
    output: String,
}

impl Names {
    fn new() -> Names {
        Names {
            id: unique_topic("cli"),
            input: unique_topic("cli-in"),
            output: unique_topic("cli-out"),
        }
    }

    fn command(&self, broker: &TestBroker, args: &[&str]) -> Command {
        let mut c = Command::new(APP);
        c.args(args)
            .env("STROM_IT_APP_ID", &self.id)
            .env("STROM_IT_INPUT", &self.input)
            .env("STROM_IT_OUTPUT", &self.output)
            .env("STROM_BROKERS", &broker.bootstrap)
            .envs([broker.static_membership_env()]);
        c
    }

    async fn run(&self, broker: &TestBroker, args: &[&str]) -> Output {
        let mut c = self.command(broker, args);
        tokio::task::spawn_blocking(move || c.output().expect("cannot run the app binary"))
            .await
            .unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn wait(mut child: Child, limit: Duration) -> Output {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + limit;
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the worker process did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap()
}

/// `tables`, `agents` and `topics` print what the app declares; `send` checks
/// values against the topic's codecs and sends them; a `worker` process
/// counts what was sent and stops cleanly on SIGTERM; `reset --yes` deletes
/// its local state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_declarations_send_worker_and_reset() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let names = Names::new();
    let repartition = format!("{}-{}-words-repartition", names.id, names.input);
    let changelog = format!("{}-word-counts-changelog", names.id);

    let help = names.run(&broker, &["--help"]).await;
    let help = text(&help.stdout);
    for sub in [
        "worker", "send", "tail", "tables", "agents", "topics", "reset",
    ] {
        assert!(help.contains(sub), "--help does not explain {sub}:\n{help}");
    }
    let tables = text(&names.run(&broker, &["tables"]).await.stdout);
    assert!(
        tables.contains("word-counts") && tables.contains(&changelog),
        "{tables}"
    );
    assert!(tables.contains("partitions=3"), "{tables}");
    let agents = text(&names.run(&broker, &["agents"]).await.stdout);
    assert!(
        agents.contains(&names.input) && agents.contains(&format!("group_by → {repartition}")),
        "{agents}"
    );
    assert!(
        agents.contains(&repartition) && agents.contains("for_each  concurrency=1"),
        "{agents}"
    );
    let topics = text(&names.run(&broker, &["topics"]).await.stdout);
    for expected in [
        names.input.to_string(),
        "key=NoKey  value=Utf8".to_owned(),
        "key=Utf8  value=Json".to_owned(),
        format!("{repartition:<40} repartition of {}", names.input),
        format!("{changelog:<40} changelog of table word-counts"),
    ] {
        assert!(
            topics.contains(&expected),
            "topics lacks {expected:?}:\n{topics}"
        );
    }

    client
        .create_topic(NewTopic::new(&names.input, 3, 1))
        .await
        .unwrap();
    client
        .create_topic(NewTopic::new(&names.output, 3, 1))
        .await
        .unwrap();
    let sent = names
        .run(
            &broker,
            &["send", &names.input, "Hello world hello", "--repeat", "3"],
        )
        .await;
    assert!(sent.status.success(), "send failed: {}", text(&sent.stderr));
    assert!(text(&sent.stdout).contains("sent 3 record(s)"));
    let not_json = names
        .run(&broker, &["send", &names.output, "not json", "--key", "a"])
        .await;
    assert!(
        !not_json.status.success(),
        "a non-JSON value was sent to a JSON topic"
    );
    assert!(
        text(&not_json.stderr).contains("JSON"),
        "{}",
        text(&not_json.stderr)
    );
    let keyed = names
        .run(&broker, &["send", &names.input, "x", "--key", "k"])
        .await;
    assert!(!keyed.status.success());
    assert!(
        text(&keyed.stderr).contains("has no keys"),
        "{}",
        text(&keyed.stderr)
    );
    let unknown = names.run(&broker, &["send", "nope", "x"]).await;
    assert!(!unknown.status.success());
    assert!(text(&unknown.stderr).contains("declares no topic"));

    let state: PathBuf = std::env::temp_dir().join(unique_topic("cli-state"));
    let port = free_port().to_string();
    let worker = names
        .command(
            &broker,
            &[
                "worker",
                "--web-port",
                &port,
                "--web-bind",
                "127.0.0.1",
                "--state-dir",
                state.to_str().unwrap(),
                "--log-level",
                "warn",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let last = strom_it::last_counts(&client, &names.output).await;
        if last.get("hello") == Some(&6) && last.get("world") == Some(&3) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never counted what send sent: {last:?}"
        );
    }
    let health = http_get(&format!("http://127.0.0.1:{port}/health")).await;
    assert_eq!(health.map(|r| r.status), Some(200));
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let out = wait(worker, Duration::from_secs(60)).await;
    assert!(
        out.status.success(),
        "worker did not stop cleanly: {}",
        text(&out.stderr)
    );
    assert!(
        state.join("word-counts").exists(),
        "the worker kept no local state"
    );

    // `tail` prints the counts decoded (a text key, a JSON value), and a
    // record that does not decode with its error and bytes.
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    producer
        .send(
            ProducerRecord::to(&names.output)
                .key(b"odd")
                .value(b"not json"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let tail = names
        .run(&broker, &["tail", &names.output, "--from-beginning"])
        .await;
    assert!(tail.status.success(), "tail failed: {}", text(&tail.stderr));
    let lines: Vec<serde_json::Value> = text(&tail.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let mut last = std::collections::HashMap::new();
    for line in &lines {
        if let Some(word) = line["key"].as_str() {
            last.insert(word.to_owned(), line["value"].clone());
        }
    }
    assert_eq!(last.get("hello"), Some(&serde_json::json!(6)), "{lines:?}");
    assert_eq!(last.get("world"), Some(&serde_json::json!(3)), "{lines:?}");
    let odd: Vec<_> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(odd.len(), 1, "{lines:?}");
    assert_eq!(odd[0]["value_bytes"], "not json");
    assert!(
        odd[0]["error"].as_str().unwrap().contains("JSON"),
        "{odd:?}"
    );
    // Without --from-beginning: nothing before the end the broker reports
    // (tansu reports the first offset of a partition's last batch + 1, not
    // its end, so the rest of that batch may show here; on Kafka nothing).
    let ends = client
        .list_offsets(&names.output, strom_client::OffsetSpec::Latest)
        .await
        .unwrap();
    let from_now = names.run(&broker, &["tail", &names.output]).await;
    assert!(from_now.status.success(), "{}", text(&from_now.stderr));
    let shown: Vec<serde_json::Value> = text(&from_now.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for line in &shown {
        let partition = line["partition"].as_i64().unwrap() as i32;
        assert!(
            line["offset"].as_i64().unwrap() >= ends[&partition],
            "a record before the reported end {ends:?}: {line}"
        );
    }
    if !shown.is_empty() {
        eprintln!(
            "note: the broker under-reports its end offsets ({ends:?}): tail without \
             --from-beginning showed {} record(s) past them",
            shown.len()
        );
    }

    let reset = names
        .run(
            &broker,
            &["reset", "--yes", "--state-dir", state.to_str().unwrap()],
        )
        .await;
    assert!(reset.status.success(), "{}", text(&reset.stderr));
    assert!(
        !state.join("word-counts").exists(),
        "reset left the table files"
    );
}

/// Under the stop policy an agent that panics on an event stops the worker:
/// it exits non-zero naming the event's topic, partition and offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_policy_exits_nonzero_with_the_events_coordinates() {
    let broker = TestBroker::start().await;
    let client = broker.client().await;
    let names = Names::new();
    client
        .create_topic(NewTopic::new(&names.input, 3, 1))
        .await
        .unwrap();
    let worker = names
        .command(&broker, &["worker", "--without-web", "--log-level", "warn"])
        .env("STROM_IT_POLICY", "stop")
        .env(
            "STROM_STATE_DIR",
            std::env::temp_dir().join(unique_topic("cli-stop")),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for line in ["all is fine", "then boom", "never mind"] {
        producer
            .send(ProducerRecord::to(&names.input).value(line.as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let out = wait(worker, Duration::from_secs(90)).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "the worker did not fail: {stderr}");
    let repartition = format!("{}-{}-words-repartition-", names.id, names.input);
    assert!(
        stderr.contains(&format!("error: agent failed on {repartition}"))
            && stderr.contains("at offset")
            && stderr.contains("agent panicked: the agent was told to blow up on \"boom\"")
            && stderr.contains("(error policy: stop)"),
        "stderr lacks the event's coordinates:\n{stderr}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a log that is not a terminal:\n{stderr}"
    );
    assert!(
        stderr.contains(" WARN ") || stderr.contains(" ERROR "),
        "the worker's log is not on stderr:\n{stderr}"
    );
}
