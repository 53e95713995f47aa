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
            let token = provider()
                .await
                .map_err(|e| failed(format!("the token provider failed: {e}")))?;
            let mut message = format!("n,,\x01auth=Bearer {}", token.value);
            for (k, v) in &token.extensions {
                message.push_str(&format!("\x01{k}={v}"));
            }
            message.push_str("\x01\x01");
            round(message.into_bytes()).await?;
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
