//! A TLS-terminating proxy that demands a client certificate, for testing
//! mutual TLS: neither test broker checks client certificates (tansu 0.6
//! has no TLS, nisshi 0.8.1 accepts any client), so the proxy does what a
//! broker with `ssl.client.auth=required` does and passes the plain bytes on.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::TestCerts;

/// Accepts TLS with the broker certificate of [`TestCerts`], only from
/// clients showing a certificate signed by its CA, and relays each
/// connection to the broker in plain TCP.
pub struct MutualTlsProxy {
    /// `127.0.0.1:port`: where clients connect, and what the broker advertises.
    pub addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for MutualTlsProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MutualTlsProxy")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for MutualTlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MutualTlsProxy {
    /// Listens on `port` and relays to `broker` (`host:port`).
    pub(crate) async fn start(port: u16, broker: String, certs: &TestCerts) -> MutualTlsProxy {
        let acceptor = TlsAcceptor::from(server_config(certs));
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|e| panic!("strom-it: cannot listen on TLS proxy port {port}: {e}"));
        let task = tokio::spawn(async move {
            while let Ok((client, peer)) = listener.accept().await {
                let (acceptor, broker) = (acceptor.clone(), broker.clone());
                tokio::spawn(async move {
                    let mut tls = match acceptor.accept(client).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            eprintln!("strom-it TLS proxy: refused {peer}: {e}");
                            return;
                        }
                    };
                    if let Ok(mut upstream) = tokio::net::TcpStream::connect(&broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                    }
                });
            }
        });
        MutualTlsProxy {
            addr: format!("127.0.0.1:{port}"),
            task,
        }
    }
}

fn server_config(certs: &TestCerts) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&certs.ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let chain = CertificateDer::pem_file_iter(&certs.server_cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    Arc::new(config)
}
