//! TLS for `amqps://` URLs, with rustls (no OpenSSL at run time).
//!
//! fedora-messaging's rules (`twisted/service.py`): TLS 1.2 minimum, the server's hostname is
//! always verified against the URL's host, the CA is `[tls] ca_cert` or the system's trust
//! store, and the client certificate (`certfile` + `keyfile`) is presented — and used for SASL
//! EXTERNAL — only when both are set. fm refuses a half-configured pair instead of silently
//! ignoring it, and reads every file at start so a bad path fails before any connection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use lapin::tcp::RustlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::Tls;

/// The TLS material from `[tls]`, read and checked.
pub struct Settings {
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl Settings {
    /// Read `ca_cert`, `certfile` and `keyfile`. Errors name the key and the file.
    pub fn from_config(tls: &Tls) -> anyhow::Result<Settings> {
        let roots = match &tls.ca_cert {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("ca_cert", path)? {
                    roots.add(cert).with_context(|| {
                        format!(
                            "the \"ca_cert\" setting in the [tls] table is invalid: {} holds a \
                             certificate that cannot be used as a CA",
                            path.display()
                        )
                    })?;
                }
                roots
            }
            None => system_roots(),
        };
        let identity = match (&tls.certfile, &tls.keyfile) {
            (Some(cert), Some(key)) => Some((read_certs("certfile", cert)?, read_key(key)?)),
            (None, None) => None,
            (Some(cert), None) => bail!(
                "the [tls] table sets certfile ({}) but not keyfile: set both to authenticate \
                 with a client certificate (SASL EXTERNAL), or neither",
                cert.display()
            ),
            (None, Some(key)) => bail!(
                "the [tls] table sets keyfile ({}) but not certfile: set both to authenticate \
                 with a client certificate (SASL EXTERNAL), or neither",
                key.display()
            ),
        };
        Ok(Settings { roots, identity })
    }

    /// Whether a client certificate is configured (fm then authenticates with EXTERNAL).
    pub fn has_client_identity(&self) -> bool {
        self.identity.is_some()
    }

    /// The rustls connector for `amqps://` URLs.
    pub fn connector(&self) -> anyhow::Result<RustlsConnector> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("setting up TLS")?
            .with_root_certificates(self.roots.clone());
        let config = match &self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .context(
                    "the [tls] keyfile does not match the certfile (or the key type is not \
                     supported)",
                )?,
            None => builder.with_no_client_auth(),
        };
        Ok(RustlsConnector::from(config))
    }
}

fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        tracing::warn!("loading the system's trusted certificates: {err}");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(added, ignored, "system trust store loaded");
    roots
}

fn read_certs(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| invalid(key, path))?;
    if certs.is_empty() {
        bail!("{}: no PEM certificate found", invalid(key, path));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    // PKCS#8, PKCS#1 (RSA) and SEC1 (EC) PEM keys.
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("{} (PKCS#8, PKCS#1 or SEC1 PEM expected)", invalid("keyfile", path)))
}

fn invalid(key: &str, path: &Path) -> String {
    format!(
        "the \"{key}\" setting in the [tls] table is invalid: cannot read {}",
        PathBuf::from(path).display()
    )
}

/// Say why a TLS handshake failed, in words a person can act on.
pub fn explain_handshake_error(err: &std::io::Error) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let Some(tls) = err.get_ref().and_then(|e| e.downcast_ref::<E>()) else {
        return format!("TLS handshake failed: {err}");
    };
    let why = match tls {
        E::InvalidCertificate(C::UnknownIssuer) => {
            "the broker's certificate is not signed by a trusted CA (check [tls] ca_cert)".into()
        }
        E::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            "the broker's certificate is not valid for the host name in amqp_url (use the name \
             the certificate was issued for)"
                .into()
        }
        E::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            "the broker's certificate has expired".into()
        }
        E::InvalidCertificate(C::Other(other))
            if other.to_string().contains("UnsupportedCertVersion") =>
        {
            "a certificate is X.509 version 1, which rustls does not accept: reissue it as \
             version 3"
                .into()
        }
        E::AlertReceived(A::CertificateExpired) => {
            "the broker rejected fm's client certificate: it has expired (check [tls] certfile)"
                .into()
        }
        E::AlertReceived(A::UnknownCA | A::BadCertificate | A::CertificateUnknown) => {
            "the broker rejected fm's client certificate: it does not trust its issuer (check \
             [tls] certfile, or the broker's CA)"
                .into()
        }
        E::AlertReceived(A::HandshakeFailure | A::CertificateRequired) => {
            "the broker refused the handshake (does it require a client certificate? set [tls] \
             certfile and keyfile)"
                .into()
        }
        E::InvalidMessage(_) => {
            "the server did not answer with TLS (is this a plain amqp:// port?)".into()
        }
        other => format!("{other}"),
    };
    format!("TLS handshake failed: {why}")
}
