//! TLS with rustls: the client configuration from `ssl.*` files, and the
//! handshake with errors that say why it failed.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{CertificateError, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::TlsConfig;
use crate::error::{Error, Result};

/// A rustls client configuration, built once per [`crate::Client`] and
/// shared by its connections.
pub(crate) type TlsClientConfig = Arc<rustls::ClientConfig>;

/// The rustls configuration `config` describes; errors name the file and
/// what is wrong with it.
pub(crate) fn client_config(config: &TlsConfig) -> Result<TlsClientConfig> {
    let mut roots = RootCertStore::empty();
    match &config.ca_location {
        Some(path) => {
            for cert in certificates(path, "ssl.ca.location")? {
                roots.add(cert).map_err(|e| {
                    Error::Config(format!(
                        "ssl.ca.location {}: a certificate is not usable as a CA: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::Config(format!(
                    "no CA certificates found in the system's store{}; set ssl.ca.location",
                    found
                        .errors
                        .first()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )));
            }
        }
    }
    // rustls 0.23.48 deprecates the ring provider in favour of aws-lc-rs
    // (post-quantum key exchange). aws-lc-rs needs a C and CMake toolchain
    // and complicates the static musl build; Kafka brokers' TLS (1.2 and 1.3
    // with classical key exchange) is what ring covers. So ring stays, and a
    // user resolving rustls afresh sees no warning from this crate.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots);
    let config = match (&config.certificate_location, &config.key_location) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "ssl.certificate.location")?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::Config(format!(
                    "ssl.key.location {}: no private key read: {e}",
                    key.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::Config(format!(
                    "ssl.certificate.location and ssl.key.location do not make a client identity: {e}"
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(Error::Config(
                "mutual TLS needs both ssl.certificate.location and ssl.key.location".into(),
            ))
        }
    };
    Ok(Arc::new(config))
}

fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| Error::Config(format!("{setting} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(Error::Config(format!(
            "{setting} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The TLS handshake with `broker` (`host:port`) over `stream`, with the
/// rustls configuration `client` built from `config`. A refusal (a
/// certificate, an alert) is [`Error::Tls`], which is fatal; the stream
/// failing under it (a reset, an early end) is an I/O error, retried.
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    broker: &str,
    config: &TlsConfig,
    client: TlsClientConfig,
) -> Result<TlsStream<S>> {
    let host = match &config.server_name {
        Some(name) => name.as_str(),
        None => broker
            .rsplit_once(':')
            .map_or(broker, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']'),
    };
    let name = ServerName::try_from(host.to_owned()).map_err(|e| Error::Tls {
        broker: broker.to_owned(),
        what: format!("{host:?} is not a valid server name: {e}"),
    })?;
    TlsConnector::from(client)
        .connect(name, stream)
        .await
        .map_err(|e| {
            match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            {
                Some(tls) => Error::Tls {
                    broker: broker.to_owned(),
                    what: explain(tls, host),
                },
                None => Error::io(broker, e),
            }
        })
}

/// Why the TLS layer refused the handshake, in words.
fn explain(tls: &rustls::Error, host: &str) -> String {
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the broker's certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the broker's certificate is not valid yet".into()
            }
            CertificateError::UnknownIssuer => {
                "the broker's certificate is not signed by a trusted CA (see ssl.ca.location)"
                    .into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the broker's certificate is not valid for the name {host:?}")
            }
            other => format!("the broker's certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => refused_by_broker(*alert)
            .unwrap_or_else(|| format!("the broker ended the handshake ({alert:?})")),
        other => format!("the TLS handshake failed: {other}"),
    }
}

/// The broker's refusal of this client, in words, when `alert` is one. With
/// TLS 1.3 a broker that checks client certificates says so only after the
/// client has finished its side of the handshake, so this arrives on the
/// first read of an open connection.
fn refused_by_broker(alert: rustls::AlertDescription) -> Option<String> {
    use rustls::AlertDescription as A;
    match alert {
        A::CertificateRequired => Some(
            "the broker requires a client certificate (set ssl.certificate.location and ssl.key.location)"
                .into(),
        ),
        A::BadCertificate
        | A::UnsupportedCertificate
        | A::CertificateRevoked
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::UnknownCA
        | A::AccessDenied => Some(format!(
            "the broker refused this client certificate ({alert:?}; is it signed by a CA the broker trusts, and still valid?)"
        )),
        _ => None,
    }
}

/// Why the broker refused this client, when `e` (an I/O error on an open
/// TLS connection) carries such a refusal; other TLS errors are `None`.
pub(crate) fn refusal(e: &std::io::Error) -> Option<String> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => refused_by_broker(*alert),
        _ => None,
    }
}
