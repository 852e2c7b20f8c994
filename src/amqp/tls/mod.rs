//! TLS for `amqps://` URLs, with rustls (ring; no OpenSSL at run time).
//!
//! fedora-messaging's rules (`twisted/service.py`): TLS 1.2 minimum, the server's hostname is
//! always verified against the URL's host, the CA is `[tls] ca_cert` or the system's trust
//! store, and the client certificate (`certfile` + `keyfile`) is presented — and used for SASL
//! EXTERNAL — only when both are set. fm is stricter where fedora-messaging is silent:
//!
//! - a half-configured pair (only `certfile` or only `keyfile`) is refused at start instead of
//!   being ignored;
//! - every file is read, parsed and cross-checked (the key must be the certificate's) before
//!   the first connection, so a bad path or a wrong key is a configuration error (exit 2) that
//!   names the key and the file, not a handshake failure minutes later;
//! - the client certificate's validity dates are read at start: an expired certificate is
//!   reported at once (a warning: the broker decides), and named in the handshake error.
//!
//! Handshake failures are turned into sentences by [`Settings::explain`]. With TLS 1.3 the
//! broker checks the client certificate *after* the client considers the handshake done, so
//! its refusal arrives as an alert on the first read — or, when the alert loses the race with
//! fm's AMQP header, as a bare connection reset. `connect.rs` then probes once more without
//! sending anything, so the alert can be read and explained here.
//!
//! The issue asked for tokio-rustls; lapin drives its own socket type (`tcp-stream`'s
//! `AsyncTcpStream`, over futures-rustls), so fm builds its own [`rustls::ClientConfig`] and
//! hands it to `AsyncTcpStream::into_rustls`. Same rustls, same verification, one TLS stack.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use lapin::tcp::RustlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::Tls;
use crate::limits;
use crate::time;

mod der;
mod explain;
mod files;

use explain::explain;
use files::{key_error, read_certs, read_key};

/// The TLS set-up from `[tls]`, read and checked: what every `amqps://` connection uses.
pub struct Settings {
    connector: Arc<RustlsConnector>,
    /// `ca_cert`, or `None` for the system's trust store (named in explanations).
    ca_cert: Option<PathBuf>,
    /// The client certificate, when `certfile` and `keyfile` are both set.
    client: Option<ClientCert>,
}

/// What fm knows about its own client certificate, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// `[tls] certfile`.
    pub path: PathBuf,
    /// The subject's common name: the RabbitMQ user under `ssl_cert_login_from = common_name`.
    pub subject_cn: Option<String>,
    /// The issuer's common name.
    pub issuer_cn: Option<String>,
    /// Validity, in seconds since the Unix epoch (`None` when the certificate cannot be read
    /// that far; rustls is the judge of its validity anyway).
    pub not_before: Option<i64>,
    pub not_after: Option<i64>,
}

impl ClientCert {
    /// "/etc/fm/cert.pem (CN=fm-client, issued by CN=fm CA)".
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(cn) = &self.subject_cn {
            parts.push(format!("CN={cn}"));
        }
        if let Some(cn) = &self.issuer_cn {
            parts.push(format!("issued by CN={cn}"));
        }
        if parts.is_empty() {
            format!("{}", self.path.display())
        } else {
            format!("{} ({})", self.path.display(), parts.join(", "))
        }
    }

    /// Whether the certificate has expired at `now` (Unix seconds).
    fn expired_at(&self, now: i64) -> bool {
        self.not_after.is_some_and(|t| t < now)
    }

    fn not_yet_valid_at(&self, now: i64) -> bool {
        self.not_before.is_some_and(|t| t > now)
    }
}

impl Settings {
    /// Read `ca_cert`, `certfile` and `keyfile` and build the rustls configuration. Every
    /// error names the `[tls]` key and the file, and says what to do.
    pub fn from_config(tls: &Tls) -> anyhow::Result<Settings> {
        // The pair first: it needs no file, and is the likelier mistake.
        let pair = match (&tls.certfile, &tls.keyfile) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => bail!(
                "[tls] sets certfile ({}) but not keyfile: set both to authenticate with a \
                 client certificate (SASL EXTERNAL), or remove certfile",
                cert.display()
            ),
            (None, Some(key)) => bail!(
                "[tls] sets keyfile ({}) but not certfile: set both to authenticate with a \
                 client certificate (SASL EXTERNAL), or remove keyfile",
                key.display()
            ),
        };
        let roots = match &tls.ca_cert {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs("ca_cert", path)? {
                    roots.add(cert).map_err(|e| {
                        anyhow!(
                            "[tls] ca_cert {} holds a certificate that cannot be used as a CA \
                             ({e}); give the PEM bundle of the CA that signed the broker's \
                             certificate",
                            path.display()
                        )
                    })?;
                }
                roots
            }
            None => system_roots()?,
        };
        let Some((cert_path, key_path)) = pair else {
            let config = builder(roots)?.with_no_client_auth();
            return Ok(Settings {
                connector: Arc::new(RustlsConnector::from(config)),
                ca_cert: tls.ca_cert.clone(),
                client: None,
            });
        };
        let chain = read_certs("certfile", cert_path)?;
        let key = read_key(key_path)?;
        let client = client_cert(cert_path, &chain[0]);
        let config = builder(roots)?
            .with_client_auth_cert(chain, key)
            .map_err(|e| key_error(e, cert_path, key_path))?;
        let settings = Settings {
            connector: Arc::new(RustlsConnector::from(config)),
            ca_cert: tls.ca_cert.clone(),
            client: Some(client),
        };
        settings.warn_about_dates(time::now_unix());
        Ok(settings)
    }

    /// Whether a client certificate is configured (fm then authenticates with EXTERNAL).
    pub fn has_client_identity(&self) -> bool {
        self.client.is_some()
    }

    /// The client certificate, when configured.
    pub fn client_cert(&self) -> Option<&ClientCert> {
        self.client.as_ref()
    }

    /// The rustls connector for `amqps://` URLs (shared by every connection).
    pub fn connector(&self) -> Arc<RustlsConnector> {
        Arc::clone(&self.connector)
    }

    /// An expired or not yet valid client certificate is worth saying at start: the broker
    /// will refuse it, and its alert is less clear than this.
    fn warn_about_dates(&self, now: i64) {
        if let Some(warning) = self.client.as_ref().and_then(|c| date_warning(c, now)) {
            tracing::warn!("{warning}");
        }
    }

    /// Say why a TLS connection to `host` failed, in words a person can act on.
    pub fn explain(&self, err: &rustls::Error, host: &str, port: u16) -> String {
        explain(
            err,
            host,
            port,
            self.ca_cert.as_deref(),
            self.client.as_ref(),
            time::now_unix(),
        )
    }
}

/// The client certificate's date problem at `now`, if any.
fn date_warning(cert: &ClientCert, now: i64) -> Option<String> {
    if cert.expired_at(now) {
        Some(format!(
            "[tls] certfile {} expired on {}: brokers refuse expired client certificates; \
             renew it",
            cert.describe(),
            time::human(cert.not_after?)
        ))
    } else if cert.not_yet_valid_at(now) {
        Some(format!(
            "[tls] certfile {} is not valid before {}: brokers refuse it until then (is this \
             machine's clock right?)",
            cert.describe(),
            time::human(cert.not_before?)
        ))
    } else {
        None
    }
}

/// A client configuration builder: ring, TLS 1.3 and 1.2 only, the given roots. The server's
/// name is always verified (rustls's default verifier; fm never installs another).
fn builder(
    roots: RootCertStore,
) -> anyhow::Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("setting up TLS (rustls with ring)")?
        .with_root_certificates(roots))
}

fn system_roots() -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for err in &found.errors {
        tracing::warn!("loading the system's trusted CA certificates: {err}");
    }
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    tracing::debug!(added, ignored, "system trust store loaded");
    if roots.is_empty() {
        bail!(
            "[tls] ca_cert is not set and the system's trust store holds no usable CA \
             certificate{}; set ca_cert to the PEM bundle of the broker's CA, or install the \
             system's CA certificates (ca-certificates)",
            match found.errors.first() {
                Some(err) => format!(" ({err})"),
                None => String::new(),
            }
        );
    }
    Ok(roots)
}

fn client_cert(path: &Path, der: &CertificateDer<'_>) -> ClientCert {
    let info = der::parse_certificate(der.as_ref());
    ClientCert {
        path: path.to_owned(),
        subject_cn: info.as_ref().and_then(|i| i.subject_cn.clone()),
        issuer_cn: info.as_ref().and_then(|i| i.issuer_cn.clone()),
        not_before: info.as_ref().map(|i| i.not_before),
        not_after: info.as_ref().map(|i| i.not_after),
    }
}

fn unix(t: rustls::pki_types::UnixTime) -> i64 {
    i64::try_from(t.as_secs()).unwrap_or(i64::MAX)
}

/// The rustls error inside an I/O error, if any (futures-rustls puts it there).
pub fn rustls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

#[cfg(test)]
mod tests {
    use super::explain::presented_names;
    use super::*;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};

    // ---- a tiny DER and PEM writer, for synthetic certificates ---------------------------

    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        match content.len() {
            n if n < 0x80 => out.push(n as u8),
            n if n < 0x100 => out.extend([0x81, n as u8]),
            n => out.extend([0x82, (n >> 8) as u8, n as u8]),
        }
        out.extend_from_slice(content);
        out
    }

    fn name(cn: &str) -> Vec<u8> {
        let o = tlv(
            0x30,
            &[tlv(0x06, &[0x55, 0x04, 0x0a]), tlv(0x0c, b"fm tests")].concat(),
        );
        let cn = tlv(
            0x30,
            &[tlv(0x06, &[0x55, 0x04, 0x03]), tlv(0x0c, cn.as_bytes())].concat(),
        );
        tlv(0x30, &[tlv(0x31, &o), tlv(0x31, &cn)].concat())
    }

    /// A certificate-shaped DER value (the signature is not real: nothing here verifies it).
    fn certificate(subject: &str, issuer: &str, not_before: &[u8], not_after: &[u8]) -> Vec<u8> {
        let tbs = [
            tlv(0xa0, &tlv(0x02, &[2])),
            tlv(0x02, &[0x01, 0x23]),
            tlv(
                0x30,
                &tlv(0x06, &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02]),
            ),
            name(issuer),
            tlv(0x30, &[not_before, not_after].concat()),
            name(subject),
            tlv(0x30, &[]),
        ]
        .concat();
        tlv(
            0x30,
            &[tlv(0x30, &tbs), tlv(0x30, &[]), tlv(0x03, &[0])].concat(),
        )
    }

    fn utc(text: &str) -> Vec<u8> {
        tlv(0x17, text.as_bytes())
    }

    fn generalized(text: &str) -> Vec<u8> {
        tlv(0x18, text.as_bytes())
    }

    fn pem(label: &str, der: &[u8]) -> String {
        const TABLE: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut b64 = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    b64.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    b64.push('=');
                }
            }
        }
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn client(not_before: i64, not_after: i64) -> ClientCert {
        ClientCert {
            path: "/etc/fm/cert.pem".into(),
            subject_cn: Some("fm-client".into()),
            issuer_cn: Some("fm CA".into()),
            not_before: Some(not_before),
            not_after: Some(not_after),
        }
    }

    /// 2026-06-01 00:00:00 UTC.
    const NOW: i64 = 1_780_272_000;
    /// 2020-01-02 00:00:00 UTC.
    const JAN_2_2020: i64 = 1_577_923_200;

    fn explained(err: E, ca: Option<&str>, cert: Option<ClientCert>) -> String {
        explain(
            &err,
            "broker.example",
            5671,
            ca.map(Path::new),
            cert.as_ref(),
            NOW,
        )
    }

    fn assert_contains(text: &str, parts: &[&str]) {
        for part in parts {
            assert!(text.contains(part), "{part:?} not in:\n{text}");
        }
    }

    // ---- DER ------------------------------------------------------------------------

    #[test]
    fn validity_and_common_names_are_read_from_the_certificate() {
        let der = certificate(
            "fm-client",
            "fm test CA",
            &utc("200101000000Z"),
            &generalized("20200102000000Z"),
        );
        let info = der::parse_certificate(&der).expect("parses");
        assert_eq!(info.not_before, JAN_2_2020 - 86_400);
        assert_eq!(info.not_after, JAN_2_2020);
        assert_eq!(info.subject_cn.as_deref(), Some("fm-client"));
        assert_eq!(info.issuer_cn.as_deref(), Some("fm test CA"));

        // RFC 5280: two-digit years 50..99 are 19xx.
        let der = certificate("a", "b", &utc("500101000000Z"), &utc("491231235959Z"));
        let info = der::parse_certificate(&der).unwrap();
        assert_eq!(time::human(info.not_before), "1950-01-01 00:00:00 UTC");
        assert_eq!(time::human(info.not_after), "2049-12-31 23:59:59 UTC");
    }

    #[test]
    fn unreadable_certificates_give_no_dates_instead_of_failing() {
        assert!(der::parse_certificate(b"").is_none());
        assert!(der::parse_certificate(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
        let bad_time = certificate("a", "b", &utc("2001010000Z"), &utc("200102000000Z"));
        assert!(der::parse_certificate(&bad_time).is_none());
        let bad_month = certificate("a", "b", &utc("201301000000Z"), &utc("200102000000Z"));
        assert!(der::parse_certificate(&bad_month).is_none());
        let full = certificate("a", "b", &utc("200101000000Z"), &utc("200102000000Z"));
        assert!(der::parse_certificate(&full[..full.len() - 5]).is_none());
    }

    // ---- reading [tls] -------------------------------------------------------------------

    fn tls(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Tls {
        Tls {
            ca_cert: ca.map(Path::to_owned),
            certfile: cert.map(Path::to_owned),
            keyfile: key.map(Path::to_owned),
        }
    }

    fn refused(tls: &Tls) -> String {
        match Settings::from_config(tls) {
            Ok(_) => panic!("{tls:?} was accepted"),
            Err(err) => format!("{err:#}"),
        }
    }

    #[test]
    fn half_a_client_certificate_is_refused_before_any_file_is_read() {
        let err = refused(&tls(None, Some(Path::new("/x/cert.pem")), None));
        assert_eq!(
            err,
            "[tls] sets certfile (/x/cert.pem) but not keyfile: set both to authenticate with a \
             client certificate (SASL EXTERNAL), or remove certfile"
        );
        let err = refused(&tls(
            Some(Path::new("/missing/ca.pem")),
            None,
            Some(Path::new("/x/k.pem")),
        ));
        assert_contains(
            &err,
            &[
                "[tls] sets keyfile (/x/k.pem) but not certfile",
                "remove keyfile",
            ],
        );
    }

    #[test]
    fn missing_and_empty_files_name_the_key_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        assert_eq!(
            refused(&tls(Some(&missing), None, None)),
            format!(
                "[tls] ca_cert {} cannot be read: no such file or directory; fix the path in \
                 the [tls] table",
                missing.display()
            )
        );
        let empty = write(dir.path(), "empty.pem", "just text\n");
        assert_eq!(
            refused(&tls(Some(&empty), None, None)),
            format!(
                "[tls] ca_cert {} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
                empty.display()
            )
        );
        let broken = write(
            dir.path(),
            "broken.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n",
        );
        assert_contains(
            &refused(&tls(Some(&broken), None, None)),
            &["[tls] ca_cert", "broken.pem is not a valid PEM file"],
        );
        let err = refused(&tls(Some(dir.path()), None, None));
        assert_contains(
            &err,
            &["[tls] ca_cert", "is not a regular file: it is a directory"],
        );
    }

    #[test]
    fn special_and_oversized_files_are_refused_without_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        for device in ["/dev/zero", "/dev/urandom"] {
            assert_eq!(
                refused(&tls(Some(Path::new(device)), None, None)),
                format!(
                    "[tls] ca_cert {device} is not a regular file: it is a character device; \
                     fix the path in the [tls] table"
                )
            );
        }
        let big = write(dir.path(), "big.pem", &"x".repeat((1 << 20) + 1));
        let key = write(dir.path(), "key.pem", "");
        assert_contains(
            &refused(&tls(None, Some(&big), Some(&key))),
            &["[tls] certfile", "big.pem is larger than 1 MiB"],
        );
        let cert_der = certificate("c", "ca", &utc("200101000000Z"), &utc("300101000000Z"));
        let cert = write(dir.path(), "cert.pem", &pem("CERTIFICATE", &cert_der));
        assert_contains(
            &refused(&tls(None, Some(&cert), Some(Path::new("/dev/urandom")))),
            &["[tls] keyfile /dev/urandom is not a regular file: it is a character device"],
        );
    }

    #[test]
    fn swapped_or_encrypted_keys_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let cert_der = certificate(
            "fm-client",
            "CA",
            &utc("200101000000Z"),
            &utc("400101000000Z"),
        );
        let cert = write(dir.path(), "cert.pem", &pem("CERTIFICATE", &cert_der));
        let key = write(
            dir.path(),
            "key.pem",
            &pem("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]),
        );

        let err = format!("{:#}", read_key(&cert).unwrap_err());
        assert_contains(
            &err,
            &[
                "[tls] keyfile",
                "cert.pem is not usable",
                "swap certfile and keyfile",
            ],
        );
        let err = format!("{:#}", read_certs("certfile", &key).unwrap_err());
        assert_contains(
            &err,
            &[
                "[tls] certfile",
                "holds no PEM certificate",
                "swap certfile and keyfile",
            ],
        );

        let encrypted = write(
            dir.path(),
            "enc.pem",
            &pem("ENCRYPTED PRIVATE KEY", &[0x30, 0x00]),
        );
        let err = format!("{:#}", read_key(&encrypted).unwrap_err());
        assert_contains(
            &err,
            &[
                "enc.pem is not usable: the key is encrypted",
                "openssl pkey",
            ],
        );

        let nothing = write(dir.path(), "nothing.pem", "hello\n");
        let err = format!("{:#}", read_key(&nothing).unwrap_err());
        assert_contains(
            &err,
            &[
                "BEGIN PRIVATE KEY",
                "BEGIN RSA PRIVATE KEY",
                "BEGIN EC PRIVATE KEY",
            ],
        );

        // Each PEM form is found (rustls checks the contents when the key is used).
        for label in ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"] {
            let path = write(dir.path(), "any.key", &pem(label, &[0x30, 0x00]));
            read_key(&path).unwrap_or_else(|e| panic!("{label}: {e:#}"));
        }
    }

    #[test]
    fn a_certificate_file_yields_what_messages_need() {
        let der = certificate(
            "fm-client",
            "fm CA",
            &utc("200101000000Z"),
            &utc("200102000000Z"),
        );
        let cert = client_cert(Path::new("/etc/fm/c.pem"), &CertificateDer::from(der));
        assert_eq!(
            cert.describe(),
            "/etc/fm/c.pem (CN=fm-client, issued by CN=fm CA)"
        );
        assert!(cert.expired_at(NOW));
        let unreadable = client_cert(Path::new("/c.pem"), &CertificateDer::from(vec![1, 2, 3]));
        assert_eq!(unreadable.describe(), "/c.pem");
        assert!(!unreadable.expired_at(NOW) && !unreadable.not_yet_valid_at(NOW));
    }

    #[test]
    fn an_expired_or_future_client_certificate_is_worth_a_warning() {
        assert_eq!(date_warning(&client(0, NOW + 1), NOW), None);
        assert_eq!(
            date_warning(&client(0, JAN_2_2020), NOW).unwrap(),
            "[tls] certfile /etc/fm/cert.pem (CN=fm-client, issued by CN=fm CA) expired on \
             2020-01-02 00:00:00 UTC: brokers refuse expired client certificates; renew it"
        );
        assert_contains(
            &date_warning(&client(NOW + 86_400, NOW + 10 * 86_400), NOW).unwrap(),
            &["is not valid before 2026-06-02 00:00:00 UTC", "clock"],
        );
    }

    // ---- handshake explanations ----------------------------------------------------------

    #[test]
    fn the_broker_certificate_problems_say_what_to_fix() {
        assert_eq!(
            explained(
                E::InvalidCertificate(C::UnknownIssuer),
                Some("/etc/fm/ca.pem"),
                None
            ),
            "TLS handshake with broker.example:5671 failed: the broker's certificate is not \
             signed by a CA fm trusts: [tls] ca_cert /etc/fm/ca.pem does not hold its issuer; \
             set ca_cert to the PEM bundle of the CA that signed it"
        );
        assert_contains(
            &explained(E::InvalidCertificate(C::UnknownIssuer), None, None),
            &["the system's trust store ([tls] ca_cert is not set) does not hold its issuer"],
        );
        let mismatch = C::NotValidForNameContext {
            expected: ServerName::try_from("broker.example").unwrap(),
            presented: vec![
                "DnsName(\"localhost\")".into(),
                "IpAddress(127.0.0.1)".into(),
            ],
        };
        assert_contains(
            &explained(E::InvalidCertificate(mismatch), None, None),
            &[
                "not valid for the host name \"broker.example\" in amqp_url",
                "(it is valid for localhost, 127.0.0.1); connect with one of those names",
            ],
        );
        let expired = C::ExpiredContext {
            time: UnixTime::since_unix_epoch(std::time::Duration::from_secs(NOW as u64)),
            not_after: UnixTime::since_unix_epoch(std::time::Duration::from_secs(
                JAN_2_2020 as u64,
            )),
        };
        assert_contains(
            &explained(E::InvalidCertificate(expired), None, None),
            &[
                "the broker's certificate expired on 2020-01-02 00:00:00 UTC",
                "clock",
            ],
        );
    }

    #[test]
    fn the_broker_refusing_fms_certificate_names_the_certificate() {
        assert_eq!(
            explained(
                E::AlertReceived(A::CertificateExpired),
                None,
                Some(client(0, JAN_2_2020))
            ),
            "TLS handshake with broker.example:5671 failed: the broker refused fm's client \
             certificate, [tls] certfile /etc/fm/cert.pem (CN=fm-client, issued by CN=fm CA): \
             it expired on 2020-01-02 00:00:00 UTC; renew it"
        );
        // The broker's clock may disagree with ours.
        assert_contains(
            &explained(
                E::AlertReceived(A::CertificateExpired),
                None,
                Some(client(0, NOW + 9)),
            ),
            &["as expired or not yet valid", "broker's clock"],
        );
        assert_contains(
            &explained(
                E::AlertReceived(A::UnknownCA),
                None,
                Some(client(0, NOW + 9)),
            ),
            &[
                "the broker does not trust the CA that issued fm's client certificate, [tls] \
                 certfile /etc/fm/cert.pem (CN=fm-client, issued by CN=fm CA)",
                "ssl_options.cacertfile",
            ],
        );
        assert_contains(
            &explained(E::AlertReceived(A::CertificateRequired), None, None),
            &["requires a client certificate; set [tls] certfile and keyfile"],
        );
        assert_contains(
            &explained(E::AlertReceived(A::HandshakeFailure), None, None),
            &["probably requires a client certificate"],
        );
        assert_contains(
            &explained(
                E::AlertReceived(A::HandshakeFailure),
                None,
                Some(client(0, NOW + 9)),
            ),
            &[
                "(HandshakeFailure)",
                "ssl_options",
                "accepts fm's client certificate",
            ],
        );
        assert_contains(
            &explained(
                E::AlertReceived(A::BadCertificate),
                None,
                Some(client(0, NOW + 9)),
            ),
            &[
                "the broker refused fm's client certificate",
                "(BadCertificate)",
            ],
        );
        assert_contains(
            &explained(E::AlertReceived(A::ProtocolVersion), None, None),
            &["does not accept TLS 1.2 or 1.3"],
        );
    }

    #[test]
    fn a_plain_port_is_recognised() {
        let err = E::InvalidMessage(rustls::InvalidMessage::InvalidContentType);
        assert_eq!(
            explained(err, None, None),
            "TLS handshake with broker.example:5671 failed: broker.example:5671 did not answer \
             with TLS; is it a plain AMQP port? Use amqp:// for it, or the broker's TLS port \
             (usually 5671) with amqps://"
        );
    }

    #[test]
    fn rustls_errors_are_found_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            E::AlertReceived(A::UnknownCA),
        );
        assert_eq!(rustls_error(&io), Some(&E::AlertReceived(A::UnknownCA)));
        assert_eq!(rustls_error(&std::io::Error::other("plain")), None);
    }

    #[test]
    fn webpki_names_are_shown_plainly() {
        assert_eq!(presented_names(&[]), "no name at all");
        assert_eq!(
            presented_names(&[
                "DnsName(\"a.example\")".into(),
                "IpAddress(::1)".into(),
                "odd".into()
            ]),
            "a.example, ::1, odd"
        );
    }
}
