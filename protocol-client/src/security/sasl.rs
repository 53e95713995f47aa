//! SASL authentication of a new connection: SaslHandshake names the
//! mechanism, then SaslAuthenticate carries its messages (KIP-152).

use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{SaslAuthenticateRequest, SaslHandshakeRequest};
use kafka_protocol::protocol::StrBytes;

use super::scram::{nonce, Hash, Scram};
use super::{SaslConfig, SaslMechanism};
use crate::connection::Connection;
use crate::error::{Error, Result};

/// Authenticates `conn` as `config` says; returns the session lifetime the
/// broker gave (KIP-368), if any: the connection must not be used past it.
pub(crate) async fn authenticate(
    conn: &Connection,
    config: &SaslConfig,
) -> Result<Option<Duration>> {
    let mechanism = config.mechanism.name();
    let failed = |what: String| Error::Authentication {
        broker: conn.broker().to_owned(),
        mechanism,
        what,
    };
    let handshake = conn
        .send(&SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism)))
        .await?;
    if handshake.error_code != 0 {
        let offered: Vec<&str> = handshake.mechanisms.iter().map(|m| m.as_str()).collect();
        return Err(failed(format!(
            "the broker does not offer {mechanism} (it offers {offered:?})"
        )));
    }
    let mut lifetime = None;
    let mut round = async |bytes: Vec<u8>| -> Result<Bytes> {
        let resp = conn
            .send(&SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(bytes)))
            .await?;
        if resp.error_code != 0 {
            let why = resp
                .error_message
                .map(|m| m.to_string())
                .unwrap_or_else(|| format!("error code {}", resp.error_code));
            return Err(failed(format!("the broker refused the credentials: {why}")));
        }
        if resp.session_lifetime_ms > 0 {
            lifetime = Some(Duration::from_millis(resp.session_lifetime_ms as u64));
        }
        Ok(resp.auth_bytes)
    };
    match config.mechanism {
        SaslMechanism::Plain => {
            round(format!("\0{}\0{}", config.username, config.password).into_bytes()).await?;
        }
        SaslMechanism::ScramSha256 | SaslMechanism::ScramSha512 => {
            let hash = if config.mechanism == SaslMechanism::ScramSha256 {
                Hash::Sha256
            } else {
                Hash::Sha512
            };
            let (mut scram, first) = Scram::start(
                hash,
                &config.username,
                &config.password,
                nonce().map_err(&failed)?,
            );
            let server_first = round(first).await?;
            let last = scram.answer(&server_first).map_err(&failed)?;
            let server_final = round(last).await?;
            scram.verify(&server_final).map_err(&failed)?;
        }
        SaslMechanism::OAuthBearer => {
            let provider = config
                .token_provider
                .as_ref()
                .ok_or_else(|| failed("no token provider is set".into()))?;
            // A provider that fails (its identity service down) may work
            // on the next connection: an I/O error, retried, not fatal.
            let token = provider().await.map_err(|e| {
                Error::io(
                    conn.broker(),
                    std::io::Error::other(format!("the OAUTHBEARER token provider failed: {e}")),
                )
            })?;
            let reply = round(oauth_message(&token).map_err(&failed)?).await?;
            if !reply.is_empty() {
                // Kafka refuses a token with error code 0 and a JSON error,
                // then waits for a lone 0x01 before it fails the exchange.
                let _ = round(vec![0x01]).await;
                return Err(failed(format!(
                    "the broker refused the token: {}",
                    String::from_utf8_lossy(&reply)
                )));
            }
        }
    }
    tracing::debug!(
        broker = conn.broker(),
        mechanism,
        ?lifetime,
        "authenticated"
    );
    Ok(lifetime)
}

/// The client's OAUTHBEARER message (RFC 7628, KIP-342): GS2 header, the
/// token, extensions, each ended by 0x01. Extension keys are letters only and
/// `auth` is reserved; values and the token are printable.
fn oauth_message(token: &super::OAuthToken) -> std::result::Result<Vec<u8>, String> {
    let printable = |s: &str| s.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if token.value.is_empty() || !printable(&token.value) {
        return Err("the token is empty or holds characters a bearer token cannot".into());
    }
    let mut message = format!("n,,\x01auth=Bearer {}", token.value);
    for (k, v) in &token.extensions {
        if k.is_empty() || !k.bytes().all(|b| b.is_ascii_alphabetic()) || k == "auth" {
            return Err(format!("the SASL extension name {k:?} is not allowed"));
        }
        if !v
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) || b" \t\r\n".contains(&b))
        {
            return Err(format!(
                "the SASL extension {k:?} has a value with control characters"
            ));
        }
        message.push_str(&format!("\x01{k}={v}"));
    }
    message.push_str("\x01\x01");
    Ok(message.into_bytes())
}
