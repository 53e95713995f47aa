//! Reaching secured clusters: TLS (rustls) and SASL authentication, set by
//! Kafka's own setting names.
//!
//! ```text
//!  TCP ──► TLS handshake (security.protocol SSL / SASL_SSL)
//!      ──► ApiVersions
//!      ──► SaslHandshake + SaslAuthenticate… (SASL_PLAINTEXT / SASL_SSL)
//!      ──► requests; the connection retires itself before the session
//!          lifetime the broker gave runs out, and the pool opens a new,
//!          freshly authenticated one (KIP-368)
//! ```
//!
//! A handshake or authentication failure is an error that names the broker
//! and the reason, and it is fatal ([`crate::Error::is_fatal`]): a wrong
//! password or an untrusted certificate does not get better by retrying.

mod sasl;
mod scram;
mod tls;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub(crate) use sasl::authenticate;
pub(crate) use tls::{handshake, refusal, TlsClientConfig};

use crate::error::{Error, Result};

/// How connections to the brokers are secured (Kafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SecurityProtocol {
    /// Plain TCP, no authentication.
    #[default]
    Plaintext,
    /// TLS, no SASL.
    Ssl,
    /// SASL over plain TCP.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// Whether connections use TLS.
    pub fn tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }

    /// Whether connections authenticate with SASL.
    pub fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

impl std::str::FromStr for SecurityProtocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_uppercase().as_str() {
            "PLAINTEXT" => SecurityProtocol::Plaintext,
            "SSL" => SecurityProtocol::Ssl,
            "SASL_PLAINTEXT" => SecurityProtocol::SaslPlaintext,
            "SASL_SSL" => SecurityProtocol::SaslSsl,
            _ => {
                return Err(Error::Config(format!(
                    "security.protocol {s:?} is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL"
                )))
            }
        })
    }
}

/// TLS settings (Kafka's `ssl.*`).
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// PEM file of the CA certificates that sign the brokers' certificates
    /// (`ssl.ca.location`); `None` trusts the system's roots.
    pub ca_location: Option<PathBuf>,
    /// PEM file of this client's certificate chain, for mutual TLS
    /// (`ssl.certificate.location`).
    pub certificate_location: Option<PathBuf>,
    /// PEM file of this client's private key (`ssl.key.location`).
    pub key_location: Option<PathBuf>,
    /// The name the brokers' certificates must carry, in place of the host
    /// each broker is reached at (a load balancer, a tunnel).
    pub server_name: Option<String>,
}

/// A SASL mechanism (Kafka's `sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslMechanism {
    /// User name and password in clear (use it over TLS only).
    Plain,
    /// SCRAM with SHA-256 (RFC 5802, 7677).
    ScramSha256,
    /// SCRAM with SHA-512.
    ScramSha512,
    /// A bearer token from [`SaslConfig::token_provider`] (KIP-255).
    OAuthBearer,
}

impl SaslMechanism {
    /// The mechanism's name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

impl std::str::FromStr for SaslMechanism {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        [
            SaslMechanism::Plain,
            SaslMechanism::ScramSha256,
            SaslMechanism::ScramSha512,
            SaslMechanism::OAuthBearer,
        ]
        .into_iter()
        .find(|m| m.name().eq_ignore_ascii_case(s))
        .ok_or_else(|| {
            Error::Config(format!(
                "sasl.mechanism {s:?} is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER"
            ))
        })
    }
}

/// A bearer token for OAUTHBEARER.
#[derive(Clone)]
pub struct OAuthToken {
    /// The token (a JWT, usually).
    pub value: String,
    /// SASL extensions sent with it (`key=value`), e.g. Confluent Cloud's
    /// `logicalCluster` and `identityPoolId`.
    pub extensions: Vec<(String, String)>,
}

impl fmt::Debug for OAuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthToken")
            .field("value", &"<redacted>")
            .field("extensions", &self.extensions)
            .finish()
    }
}

/// The future a [`TokenProvider`] returns.
pub type TokenFuture =
    Pin<Box<dyn Future<Output = std::result::Result<OAuthToken, String>> + Send>>;

/// Fetches a fresh OAUTHBEARER token; called for every authentication.
pub type TokenProvider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// SASL settings (Kafka's `sasl.*`).
///
/// ```
/// use strom_client::security::{SaslConfig, SaslMechanism};
/// let sasl = SaslConfig::password(SaslMechanism::ScramSha512, "alice", "s3cret");
/// assert!(!format!("{sasl:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct SaslConfig {
    /// The mechanism.
    pub mechanism: SaslMechanism,
    /// User name (PLAIN, SCRAM).
    pub username: String,
    /// Password (PLAIN, SCRAM). Never shown by `Debug`.
    pub password: String,
    /// Where OAUTHBEARER tokens come from.
    pub token_provider: Option<TokenProvider>,
}

impl SaslConfig {
    /// A mechanism that takes a user name and a password.
    pub fn password(
        mechanism: SaslMechanism,
        username: impl Into<String>,
        password: impl Into<String>,
    ) -> SaslConfig {
        SaslConfig {
            mechanism,
            username: username.into(),
            password: password.into(),
            token_provider: None,
        }
    }

    /// OAUTHBEARER with tokens from `provider`.
    pub fn oauth_bearer(provider: TokenProvider) -> SaslConfig {
        SaslConfig {
            mechanism: SaslMechanism::OAuthBearer,
            username: String::new(),
            password: String::new(),
            token_provider: Some(provider),
        }
    }
}

impl fmt::Debug for SaslConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslConfig")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field(
                "token_provider",
                &self.token_provider.as_ref().map(|_| "set"),
            )
            .finish()
    }
}

/// How connections are secured: the protocol and its settings.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// `security.protocol`.
    pub protocol: SecurityProtocol,
    /// Used when the protocol is SSL or SASL_SSL.
    pub tls: TlsConfig,
    /// Required when the protocol is SASL_PLAINTEXT or SASL_SSL.
    pub sasl: Option<SaslConfig>,
}

impl Security {
    /// Checks that the settings fit together, before any connection.
    pub fn validate(&self) -> Result<()> {
        if self.protocol.sasl() {
            let Some(sasl) = &self.sasl else {
                return Err(Error::Config(format!(
                    "security.protocol {:?} needs sasl.mechanism (and its credentials)",
                    self.protocol
                )));
            };
            match sasl.mechanism {
                SaslMechanism::OAuthBearer if sasl.token_provider.is_none() => {
                    return Err(Error::Config(
                        "sasl.mechanism OAUTHBEARER needs a token provider".into(),
                    ))
                }
                SaslMechanism::OAuthBearer => {}
                m if sasl.username.is_empty() => {
                    return Err(Error::Config(format!(
                        "sasl.mechanism {} needs sasl.username and sasl.password",
                        m.name()
                    )))
                }
                _ => {}
            }
        } else if self.sasl.is_some() {
            return Err(Error::Config(format!(
                "SASL settings are given but security.protocol is {:?}; use SASL_PLAINTEXT or SASL_SSL",
                self.protocol
            )));
        }
        self.tls_client_config().map(|_| ())
    }

    /// The rustls configuration for TLS connections, read from the `ssl.*`
    /// files once; `None` for plain TCP.
    pub(crate) fn tls_client_config(&self) -> Result<Option<TlsClientConfig>> {
        if self.protocol.tls() {
            tls::client_config(&self.tls).map(Some)
        } else {
            Ok(None)
        }
    }
}
