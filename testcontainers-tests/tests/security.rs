//! TLS and SASL against a broker that enforces them: nisshi 0.8.1 (tansu 0.6
//! can do neither) with certificates made by the test. PLAIN and OAUTHBEARER,
//! which no broker here offers, are checked in strom-client's unit tests
//! against a SASL-checking broker of the tests' own.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use strom::App;
use strom_client::consumer::{Consumer, ConsumerConfig, Offset, TopicPartition};
use strom_client::producer::{Producer, ProducerConfig, ProducerRecord};
use strom_client::{Client, ClientConfig, Compression, Error, NewTopic};
use strom_it::{unique_topic, SecureBroker, TestCerts, SCRAM_USERS};

/// Connecting with `config` fails, fast and for good; the error.
async fn refused(mut config: ClientConfig) -> Error {
    config.bootstrap_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let err = Client::connect(config).await.map(|_| ()).unwrap_err();
    assert!(err.is_fatal(), "not fatal: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "refused only after {:?}: {err}",
        started.elapsed()
    );
    eprintln!("refused as expected: {err}");
    err
}

/// Records round-trip over SASL_SSL with each SCRAM mechanism.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_over_tls_round_trips_records() {
    let certs = TestCerts::make();
    let broker = SecureBroker::start(&certs).await;
    for (mechanism, _, _) in SCRAM_USERS {
        let client = Client::connect(broker.client_config(mechanism, &certs.ca))
            .await
            .unwrap_or_else(|e| panic!("{mechanism}: {e}"));
        let topic = unique_topic("secure");
        client
            .create_topic(NewTopic::new(&topic, 2, 1))
            .await
            .unwrap();
        let producer = Producer::new(
            client.clone(),
            ProducerConfig {
                compression: Compression::Zstd,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        for i in 0..2_000 {
            producer
                .send(
                    ProducerRecord::to(&topic)
                        .key(format!("k{i}").as_bytes())
                        .value(format!("v{i}").as_bytes()),
                )
                .await
                .unwrap();
        }
        producer.flush().await.unwrap();
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer
            .assign((0..2).map(|p| (TopicPartition::new(&topic, p), Offset::Earliest)))
            .unwrap();
        let mut got = BTreeMap::new();
        while got.len() < 2_000 {
            let batch = tokio::time::timeout(Duration::from_secs(30), consumer.poll())
                .await
                .unwrap_or_else(|_| panic!("{mechanism}: read {} of 2000", got.len()))
                .unwrap();
            for r in batch {
                let key = String::from_utf8(r.key.unwrap().to_vec()).unwrap();
                let value = String::from_utf8(r.value.unwrap().to_vec()).unwrap();
                assert_eq!(value, format!("v{}", &key[1..]));
                assert!(
                    got.insert(key, value).is_none(),
                    "{mechanism}: a record twice"
                );
            }
        }
        eprintln!("{mechanism} over TLS: 2000 records written and read back");
    }
}

/// A wrong password, an untrusted CA, a wrong host name and a mechanism the
/// broker does not offer are each refused at once with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_and_certificates_are_refused_clearly() {
    let certs = TestCerts::make();
    let broker = SecureBroker::start(&certs).await;

    let mut wrong_password = broker.client_config("SCRAM-SHA-512", &certs.ca);
    wrong_password
        .set("sasl.password", "not the password")
        .unwrap();
    let e = refused(wrong_password).await;
    assert!(
        matches!(
            e,
            Error::Authentication {
                mechanism: "SCRAM-SHA-512",
                ..
            }
        ),
        "{e}"
    );

    let e = refused(broker.client_config("SCRAM-SHA-256", &certs.other_ca)).await;
    assert!(e.to_string().contains("not signed by a trusted CA"), "{e}");

    let mut wrong_host = broker.client_config("SCRAM-SHA-256", &certs.ca);
    wrong_host
        .set("ssl.server.name", "kafka.example.com")
        .unwrap();
    let e = refused(wrong_host).await;
    assert!(
        e.to_string()
            .contains("not valid for the name \"kafka.example.com\""),
        "{e}"
    );

    let mut plain = broker.client_config("SCRAM-SHA-256", &certs.ca);
    plain.set("sasl.mechanism", "PLAIN").unwrap();
    let e = refused(plain).await;
    assert!(e.to_string().contains("does not offer PLAIN"), "{e}");
}

/// A broker showing a certificate that has expired is refused, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_broker_certificate_is_refused() {
    let certs = TestCerts::make();
    let broker = SecureBroker::start_expired(&certs).await;
    let e = refused(broker.client_config("SCRAM-SHA-256", &certs.ca)).await;
    assert!(e.to_string().contains("has expired"), "{e}");
}

/// The wordcount worker on SASL_SSL, configured by Kafka's setting names:
/// group membership, commits, changelogs all go over TLS and SCRAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wordcount_runs_on_a_secured_cluster() {
    let certs = TestCerts::make();
    let broker = SecureBroker::start(&certs).await;
    let config = broker.client_config("SCRAM-SHA-256", &certs.ca);
    let client = Client::connect(config.clone()).await.unwrap();
    let (input, output) = (unique_topic("secure-lines"), unique_topic("secure-counts"));
    let (_, user, password) = SCRAM_USERS[0];
    let ca = certs.ca.to_string_lossy().into_owned();
    let mut app = App::new(&unique_topic("secure-wc"))
        .with_brokers([broker.bootstrap.clone()])
        .with_partitions(2)
        .with_state_dir(std::env::temp_dir().join(unique_topic("secure-state")));
    for (name, value) in [
        ("security.protocol", "SASL_SSL"),
        ("sasl.mechanism", "SCRAM-SHA-256"),
        ("sasl.username", user),
        ("sasl.password", password),
        ("ssl.ca.location", ca.as_str()),
    ] {
        app = app.with_client_setting(name, value).unwrap();
    }
    let (stop, worker) = strom_it::spawn_app(strom_it::wordcount(app, &input, &output));
    strom_it::wait_for_topic(&client, &input).await;
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for _ in 0..300 {
        producer
            .send(ProducerRecord::to(&input).value(&b"tls and scram"[..]))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    strom_it::wait_for_topic(&client, &output).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let got: BTreeMap<String, u64> = strom_it::last_counts(&client, &output)
            .await
            .into_iter()
            .collect();
        let want: BTreeMap<String, u64> = ["tls", "and", "scram"]
            .iter()
            .map(|w| (w.to_string(), 300))
            .collect();
        if got == want {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "counts {got:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = stop.send(());
    worker.await.unwrap();
    eprintln!("the wordcount worker counted 900 words over SASL_SSL exactly");
}

/// Mutual TLS: with a client certificate the broker's side trusts, records
/// round-trip; with none, or one from a CA it does not trust, the client is
/// refused at once with an error that says so. No test broker checks client
/// certificates, so a TLS proxy of the tests' own demands them in front of
/// the plain broker (as `ssl.client.auth=required` does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_the_broker_trusts() {
    let certs = TestCerts::make();
    let Some((broker, _proxy)) = strom_it::TestBroker::start_behind_mutual_tls(&certs).await else {
        println!("mutual TLS: NOT checked (an external broker cannot be put behind the TLS proxy)");
        return;
    };
    let config = |cert: Option<(&std::path::Path, &std::path::Path)>| {
        let mut config = ClientConfig::new([broker.bootstrap.clone()]);
        config.set("security.protocol", "SSL").unwrap();
        config
            .set("ssl.ca.location", &certs.ca.to_string_lossy())
            .unwrap();
        if let Some((cert, key)) = cert {
            config
                .set("ssl.certificate.location", &cert.to_string_lossy())
                .unwrap();
            config
                .set("ssl.key.location", &key.to_string_lossy())
                .unwrap();
        }
        config
    };

    let client = Client::connect(config(Some((&certs.client_cert, &certs.client_key))))
        .await
        .unwrap();
    let topic = unique_topic("mtls");
    client
        .create_topic(NewTopic::new(&topic, 1, 1))
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default()).unwrap();
    for i in 0..500 {
        producer
            .send(ProducerRecord::to(&topic).value(format!("v{i}").as_bytes()))
            .await
            .unwrap();
    }
    producer.flush().await.unwrap();
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign([(TopicPartition::new(&topic, 0), Offset::Earliest)])
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 500 {
        let batch = tokio::time::timeout(Duration::from_secs(30), consumer.poll())
            .await
            .unwrap_or_else(|_| panic!("read {} of 500", got.len()))
            .unwrap();
        got.extend(batch.into_iter().map(|r| r.value.unwrap()));
    }
    let want: Vec<_> = (0..500).map(|i| format!("v{i}").into_bytes()).collect();
    assert_eq!(got, want);
    eprintln!("mutual TLS: 500 records written and read back with a trusted client certificate");

    let e = refused(config(None)).await;
    assert!(e.to_string().contains("client certificate"), "{e}");
    let e = refused(config(Some((&certs.stranger_cert, &certs.stranger_key)))).await;
    assert!(e.to_string().contains("client certificate"), "{e}");
}
