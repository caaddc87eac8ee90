//! TLS for NBD over TCP: the client side of QEMU's `tls-creds-x509`.
//!
//! The certificates come from one directory laid out as QEMU and libvirt lay out
//! a client's x509 credentials (`/etc/pki/qemu` on a libvirt host):
//!
//! | file              | what                                                  |
//! |-------------------|-------------------------------------------------------|
//! | `ca-cert.pem`     | the CA(s) the server's certificate must chain to      |
//! | `client-cert.pem` | vmbackup's certificate (chain), shown to the server   |
//! | `client-key.pem`  | its private key (PKCS#8, PKCS#1 or SEC1 PEM)          |
//!
//! The server's certificate must be valid for the host name (or IP address)
//! vmbackup connects to; only that CA is trusted (not the system's roots).
//! rustls with the ring provider; TLS 1.2 and 1.3.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// The CA certificate file in a TLS directory.
pub const CA_CERT: &str = "ca-cert.pem";
/// The client certificate file in a TLS directory.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// The client key file in a TLS directory.
pub const CLIENT_KEY: &str = "client-key.pem";

/// Load `dir`'s CA, client certificate and key into a client configuration.
/// Errors name the file and what is wrong with it.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>> {
    let ca = dir.join(CA_CERT);
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&ca)
        .with_context(|| format!("cannot read {}", ca.display()))?
    {
        let cert = cert.with_context(|| format!("{}: not a PEM certificate", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("{}: unusable CA certificate", ca.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{}: holds no certificate", ca.display());

    let cert_file = dir.join(CLIENT_CERT);
    let chain = CertificateDer::pem_file_iter(&cert_file)
        .with_context(|| format!("cannot read {}", cert_file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate", cert_file.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{}: holds no certificate",
        cert_file.display()
    );
    let key_file = dir.join(CLIENT_KEY);
    let key = PrivateKeyDer::from_pem_file(&key_file)
        .with_context(|| format!("cannot read a private key from {}", key_file.display()))?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable client certificate",
                cert_file.display(),
                key_file.display()
            )
        })?;
    Ok(Arc::new(config))
}

/// The TLS handshake on `tcp` (after `NBD_OPT_STARTTLS` was acknowledged): the
/// server's certificate is checked against `config`'s CA for the name `host`.
pub async fn connect(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: TcpStream,
) -> Result<TlsStream<TcpStream>> {
    let name = ServerName::try_from(host.to_string())
        .with_context(|| format!("'{host}' is not a valid TLS server name"))?;
    TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .with_context(|| {
            format!("TLS handshake with {host} (server certificate checked against {CA_CERT})")
        })
}
