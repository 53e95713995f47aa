//! SASL against a broker of the tests' own that checks credentials the way
//! Kafka does (PLAIN, SCRAM-SHA-256/512, OAUTHBEARER): no broker available
//! here offers PLAIN or OAUTHBEARER. TLS and SCRAM against a real broker are
//! in the integration tests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use bytes::{Buf, Bytes};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, StrBytes};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::scram::Hash;
use super::*;
use crate::connection::{response_frame, Connection, ConnectionConfig};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret pässword";
const TOKEN: &str = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhbGljZSJ9.";
const SALT: &[u8] = b"salt of the earth";
const ITERATIONS: u32 = 4096;

/// What the test broker saw.
#[derive(Default)]
struct Seen {
    authenticated: bool,
    oauth_message: Option<Vec<u8>>,
}

/// A broker that offers `mechanism` only, knows `USER`/`PASSWORD` (and
/// `TOKEN`), and gives sessions of `lifetime_ms`.
async fn broker(mechanism: SaslMechanism, lifetime_ms: i64) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let shared = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let seen = shared.clone();
            tokio::spawn(async move {
                let mut scram: Option<(String, String)> = None; // (client-first-bare, server-first)
                loop {
                    let Ok(len) = sock.read_i32().await else {
                        return;
                    };
                    let mut body = vec![0u8; len as usize];
                    if sock.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let mut b = Bytes::from(body);
                    let (key, version) = (b.clone().get_i16(), b.slice(2..).get_i16());
                    let api = ApiKey::try_from(key).unwrap();
                    let header =
                        RequestHeader::decode(&mut b, api.request_header_version(version)).unwrap();
                    let cid = header.correlation_id;
                    let out = match api {
                        ApiKey::ApiVersions => {
                            let keys = [(3i16, 0i16, 12i16), (18, 0, 3), (17, 0, 1), (36, 0, 2)]
                                .into_iter()
                                .map(|(k, min, max)| {
                                    ApiVersion::default()
                                        .with_api_key(k)
                                        .with_min_version(min)
                                        .with_max_version(max)
                                })
                                .collect();
                            response_frame(
                                cid,
                                version,
                                ApiVersionsResponse::default().with_api_keys(keys),
                            )
                        }
                        ApiKey::SaslHandshake => {
                            let req = SaslHandshakeRequest::decode(&mut b, version).unwrap();
                            let ok = req.mechanism.as_str() == mechanism.name();
                            response_frame(
                                cid,
                                version,
                                SaslHandshakeResponse::default()
                                    .with_error_code(if ok { 0 } else { 33 })
                                    .with_mechanisms(vec![StrBytes::from_static_str(
                                        mechanism.name(),
                                    )]),
                            )
                        }
                        ApiKey::SaslAuthenticate => {
                            let req = SaslAuthenticateRequest::decode(&mut b, version).unwrap();
                            let reply = check(mechanism, &req.auth_bytes, &mut scram, &seen);
                            let resp = match reply {
                                Ok((bytes, done)) => {
                                    if done {
                                        lock(&seen).authenticated = true;
                                    }
                                    SaslAuthenticateResponse::default()
                                        .with_auth_bytes(Bytes::from(bytes))
                                        .with_session_lifetime_ms(if done {
                                            lifetime_ms
                                        } else {
                                            0
                                        })
                                }
                                Err(why) => SaslAuthenticateResponse::default()
                                    .with_error_code(58)
                                    .with_error_message(Some(StrBytes::from_string(why))),
                            };
                            response_frame(cid, version, resp)
                        }
                        ApiKey::Metadata => {
                            assert!(lock(&seen).authenticated, "a request before authentication");
                            response_frame(cid, version, MetadataResponse::default())
                        }
                        other => panic!("test broker: unexpected {other:?}"),
                    };
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn lock(seen: &Mutex<Seen>) -> std::sync::MutexGuard<'_, Seen> {
    seen.lock().unwrap()
}

/// The broker's side of one SaslAuthenticate: the reply and whether the
/// client is now authenticated, or why not.
fn check(
    mechanism: SaslMechanism,
    bytes: &[u8],
    scram: &mut Option<(String, String)>,
    seen: &Mutex<Seen>,
) -> std::result::Result<(Vec<u8>, bool), String> {
    match mechanism {
        SaslMechanism::Plain => {
            let expected = format!("\0{USER}\0{PASSWORD}");
            if bytes == expected.as_bytes() {
                Ok((vec![], true))
            } else {
                Err("Authentication failed: Invalid username or password".into())
            }
        }
        // As Kafka: a refused token gets error code 0 and a JSON error;
        // the client's lone 0x01 then ends the exchange with an error.
        SaslMechanism::OAuthBearer if bytes == [0x01] => Err("invalid token".into()),
        SaslMechanism::OAuthBearer => {
            lock(seen).oauth_message = Some(bytes.to_vec());
            let text = String::from_utf8_lossy(bytes);
            if text.contains(&format!("auth=Bearer {TOKEN}\x01")) {
                Ok((vec![], true))
            } else {
                Ok((br#"{"status":"invalid_token"}"#.to_vec(), false))
            }
        }
        SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
            let hash = if mechanism == SaslMechanism::ScramSha256 {
                Hash::Sha256
            } else {
                Hash::Sha512
            };
            let text = String::from_utf8(bytes.to_vec()).map_err(|_| "not UTF-8".to_owned())?;
            match scram.take() {
                None => {
                    let bare = text.strip_prefix("n,,").ok_or("no GS2 header")?.to_owned();
                    let nonce = bare
                        .split(',')
                        .find_map(|f| f.strip_prefix("r="))
                        .ok_or("no nonce")?;
                    let server_first =
                        format!("r={nonce}SERVER,s={},i={ITERATIONS}", BASE64.encode(SALT));
                    *scram = Some((bare, server_first.clone()));
                    Ok((server_first.into_bytes(), false))
                }
                Some((bare, server_first)) => {
                    let (without_proof, proof) = text.rsplit_once(",p=").ok_or("no proof")?;
                    let proof = BASE64.decode(proof).map_err(|_| "bad proof")?;
                    let salted = hash.salted_password(PASSWORD.as_bytes(), SALT, ITERATIONS);
                    let client_key = hash.hmac(&salted, b"Client Key");
                    let stored_key = hash.digest(&client_key);
                    let auth = format!("{bare},{server_first},{without_proof}");
                    let signature = hash.hmac(&stored_key, auth.as_bytes());
                    let claimed: Vec<u8> =
                        proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
                    if hash.digest(&claimed) != stored_key {
                        return Err("Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM".into());
                    }
                    let server_key = hash.hmac(&salted, b"Server Key");
                    let v = BASE64.encode(hash.hmac(&server_key, auth.as_bytes()));
                    Ok((format!("v={v}").into_bytes(), true))
                }
            }
        }
    }
}

fn config(sasl: SaslConfig) -> ConnectionConfig {
    ConnectionConfig {
        security: Security {
            protocol: SecurityProtocol::SaslPlaintext,
            tls: TlsConfig::default(),
            sasl: Some(sasl),
        },
        ..ConnectionConfig::default()
    }
}

fn token_provider(token: &'static str) -> TokenProvider {
    Arc::new(move || {
        Box::pin(async move {
            Ok(OAuthToken {
                value: token.to_owned(),
                extensions: vec![("logicalCluster".into(), "lkc-1".into())],
            })
        })
    })
}

#[tokio::test]
async fn every_mechanism_authenticates_with_the_right_credentials() {
    for mechanism in [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
        SaslMechanism::OAuthBearer,
    ] {
        let (addr, seen) = broker(mechanism, 0).await;
        let sasl = match mechanism {
            SaslMechanism::OAuthBearer => SaslConfig::oauth_bearer(token_provider(TOKEN)),
            m => SaslConfig::password(m, USER, PASSWORD),
        };
        let conn = Connection::connect(&addr, &config(sasl))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", mechanism.name()));
        conn.send(&MetadataRequest::default()).await.unwrap();
        assert!(lock(&seen).authenticated, "{}", mechanism.name());
        if mechanism == SaslMechanism::OAuthBearer {
            let message = lock(&seen).oauth_message.clone().unwrap();
            assert_eq!(
                message,
                format!("n,,\x01auth=Bearer {TOKEN}\x01logicalCluster=lkc-1\x01\x01").into_bytes()
            );
        }
    }
}

#[tokio::test]
async fn wrong_credentials_are_a_fatal_error_naming_the_broker() {
    for mechanism in [
        SaslMechanism::Plain,
        SaslMechanism::ScramSha256,
        SaslMechanism::ScramSha512,
        SaslMechanism::OAuthBearer,
    ] {
        let (addr, seen) = broker(mechanism, 0).await;
        let sasl = match mechanism {
            SaslMechanism::OAuthBearer => SaslConfig::oauth_bearer(token_provider("expired")),
            m => SaslConfig::password(m, USER, "wrong"),
        };
        let err = Connection::connect(&addr, &config(sasl)).await.unwrap_err();
        assert!(err.is_fatal(), "{err}");
        assert!(
            matches!(&err, Error::Authentication { broker, .. } if *broker == addr),
            "{err}"
        );
        assert!(!lock(&seen).authenticated);
    }
}

/// A token provider that fails is retried on the next connection (its
/// identity service may be back), unlike a token the broker refuses.
#[tokio::test]
async fn a_failing_token_provider_is_not_fatal() {
    let (addr, _) = broker(SaslMechanism::OAuthBearer, 0).await;
    let provider: TokenProvider = Arc::new(|| Box::pin(async { Err("503 from the IdP".into()) }));
    let err = Connection::connect(&addr, &config(SaslConfig::oauth_bearer(provider)))
        .await
        .unwrap_err();
    assert!(!err.is_fatal() && err.is_retriable(), "{err}");
    assert!(err.to_string().contains("503 from the IdP"), "{err}");
    let bad: TokenProvider = Arc::new(|| {
        Box::pin(async {
            Ok(OAuthToken {
                value: TOKEN.to_owned(),
                extensions: vec![("auth".into(), "x".into())],
            })
        })
    });
    let err = Connection::connect(&addr, &config(SaslConfig::oauth_bearer(bad)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("extension name \"auth\""), "{err}");
}

#[tokio::test]
async fn a_mechanism_the_broker_does_not_offer_is_named() {
    let (addr, _) = broker(SaslMechanism::ScramSha512, 0).await;
    let err = Connection::connect(
        &addr,
        &config(SaslConfig::password(SaslMechanism::Plain, USER, PASSWORD)),
    )
    .await
    .unwrap_err();
    assert!(err.is_fatal());
    assert!(err.to_string().contains("SCRAM-SHA-512"), "{err}");
}

/// KIP-368: the connection retires itself before the session ends, so the
/// pool replaces it with a newly authenticated one.
#[tokio::test]
async fn a_connection_retires_before_its_session_ends() {
    let (addr, _) = broker(SaslMechanism::ScramSha256, 400).await;
    let conn = Connection::connect(
        &addr,
        &config(SaslConfig::password(
            SaslMechanism::ScramSha256,
            USER,
            PASSWORD,
        )),
    )
    .await
    .unwrap();
    assert!(!conn.is_closed());
    tokio::time::sleep(Duration::from_millis(360)).await;
    assert!(conn.is_closed(), "still in use at 90% of the session");
}

#[test]
fn settings_fit_together_or_say_why_not() {
    let plain = Security {
        protocol: SecurityProtocol::SaslSsl,
        ..Security::default()
    };
    assert!(plain
        .validate()
        .unwrap_err()
        .to_string()
        .contains("sasl.mechanism"));
    let stray = Security {
        sasl: Some(SaslConfig::password(SaslMechanism::Plain, USER, PASSWORD)),
        ..Security::default()
    };
    assert!(stray.validate().is_err());
    let no_file = Security {
        protocol: SecurityProtocol::Ssl,
        tls: TlsConfig {
            ca_location: Some("/nonexistent/ca.pem".into()),
            ..TlsConfig::default()
        },
        sasl: None,
    };
    let e = no_file.validate().unwrap_err().to_string();
    assert!(
        e.contains("ssl.ca.location") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
    let half = Security {
        protocol: SecurityProtocol::Ssl,
        tls: TlsConfig {
            certificate_location: Some("/x.pem".into()),
            ..TlsConfig::default()
        },
        sasl: None,
    };
    assert!(half.validate().is_err());
    assert_eq!(
        "sasl_ssl".parse::<SecurityProtocol>().unwrap(),
        SecurityProtocol::SaslSsl
    );
    assert!("TLS".parse::<SecurityProtocol>().is_err());
}

/// A client refused by its bootstrap broker says so at once, not after
/// retrying for the bootstrap timeout.
#[tokio::test]
async fn a_refused_client_fails_at_once() {
    let (addr, _) = broker(SaslMechanism::ScramSha256, 0).await;
    let mut client = crate::ClientConfig::new([addr.clone()]);
    client.connection = config(SaslConfig::password(
        SaslMechanism::ScramSha256,
        USER,
        "wrong",
    ));
    client.bootstrap_timeout = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let err = crate::Client::connect(client).await.unwrap_err();
    assert!(matches!(err, Error::Authentication { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
