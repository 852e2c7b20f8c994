//! Handshake failures as sentences: what the broker or rustls refused, and what to do about it.

use super::*;

/// Where the trust for the broker's certificate comes from, for messages.
pub(super) struct Trust<'a>(Option<&'a Path>);

impl fmt::Display for Trust<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(path) => write!(f, "[tls] ca_cert {}", path.display()),
            None => f.write_str("the system's trust store ([tls] ca_cert is not set)"),
        }
    }
}

/// The explanation behind [`Settings::explain`], with everything it depends on as arguments.
pub(super) fn explain(
    err: &rustls::Error,
    host: &str,
    port: u16,
    ca_cert: Option<&Path>,
    client: Option<&ClientCert>,
    now: i64,
) -> String {
    use rustls::{AlertDescription as A, CertificateError as C, Error as E};
    let trust = Trust(ca_cert);
    let ours = || match client {
        Some(c) => format!("fm's client certificate, [tls] certfile {}", c.describe()),
        None => "fm's client certificate".to_owned(),
    };
    let why = match err {
        // fm refused the broker's certificate.
        E::InvalidCertificate(C::UnknownIssuer) => format!(
            "the broker's certificate is not signed by a CA fm trusts: {trust} does not hold \
             its issuer; set ca_cert to the PEM bundle of the CA that signed it"
        ),
        E::InvalidCertificate(C::NotValidForNameContext { presented, .. }) => format!(
            "the broker's certificate is not valid for the host name {host:?} in amqp_url (it \
             is valid for {}); connect with one of those names",
            presented_names(presented)
        ),
        E::InvalidCertificate(C::NotValidForName) => format!(
            "the broker's certificate is not valid for the host name {host:?} in amqp_url; \
             connect with a name the certificate was issued for"
        ),
        E::InvalidCertificate(C::ExpiredContext { not_after, .. }) => format!(
            "the broker's certificate expired on {}; the broker's administrator must renew it \
             (or this machine's clock is wrong)",
            time::human(unix(*not_after))
        ),
        E::InvalidCertificate(C::Expired) => "the broker's certificate has expired; the \
             broker's administrator must renew it (or this machine's clock is wrong)"
            .to_owned(),
        E::InvalidCertificate(C::NotValidYetContext { not_before, .. }) => format!(
            "the broker's certificate is not valid before {}; is this machine's clock right?",
            time::human(unix(*not_before))
        ),
        E::InvalidCertificate(C::NotValidYet) => {
            "the broker's certificate is not valid yet; is this machine's clock right?".to_owned()
        }
        E::InvalidCertificate(C::Revoked) => "the broker's certificate has been revoked".into(),
        E::InvalidCertificate(C::InvalidPurpose | C::InvalidPurposeContext { .. }) => {
            "the broker's certificate is not meant for a TLS server (extended key usage); the \
             broker's administrator must reissue it"
                .to_owned()
        }
        E::InvalidCertificate(C::Other(other))
            if other.to_string().contains("UnsupportedCertVersion") =>
        {
            "the broker's certificate (or its CA) is an X.509 version 1 certificate, which \
             rustls does not accept; reissue it as version 3"
                .to_owned()
        }
        E::InvalidCertificate(other) => format!(
            "the broker's certificate is not acceptable ({other:?}); check it against {trust}"
        ),
        E::NoCertificatesPresented => "the broker presented no certificate".to_owned(),

        // The broker refused fm's client certificate (or the handshake).
        E::AlertReceived(A::CertificateExpired) => match client {
            Some(c) if c.expired_at(now) => format!(
                "the broker refused {}: it expired on {}; renew it",
                ours(),
                c.not_after.map_or_else(String::new, time::human)
            ),
            Some(c) if c.not_yet_valid_at(now) => format!(
                "the broker refused {}: it is not valid before {} (is this machine's clock \
                 right?)",
                ours(),
                c.not_before.map_or_else(String::new, time::human)
            ),
            _ => format!(
                "the broker refused {} as expired or not yet valid; renew it (or check the \
                 broker's clock)",
                ours()
            ),
        },
        E::AlertReceived(A::UnknownCA) => format!(
            "the broker does not trust the CA that issued {}; use a certificate signed by a CA \
             the broker trusts (its ssl_options.cacertfile), or ask its administrator to add \
             this CA",
            ours()
        ),
        E::AlertReceived(A::CertificateRevoked) => {
            format!("the broker refused {}: it has been revoked", ours())
        }
        E::AlertReceived(A::CertificateRequired) => {
            "the broker requires a client certificate; set [tls] certfile and keyfile".to_owned()
        }
        E::AlertReceived(
            A::BadCertificate | A::UnsupportedCertificate | A::CertificateUnknown | A::AccessDenied,
        ) if client.is_some() => format!(
            "the broker refused {} ({}); check that the broker accepts this certificate",
            ours(),
            alert_name(err)
        ),
        E::AlertReceived(A::HandshakeFailure) if client.is_none() => {
            "the broker refused the TLS handshake; it probably requires a client certificate \
             (set [tls] certfile and keyfile)"
                .to_owned()
        }
        E::AlertReceived(A::HandshakeFailure | A::InsufficientSecurity) => format!(
            "the broker refused the TLS handshake ({}): fm offers TLS 1.2 and 1.3 with modern \
             ciphers only; check the broker's ssl_options (versions, ciphers){}",
            alert_name(err),
            if client.is_some() {
                " and that it accepts fm's client certificate"
            } else {
                ""
            }
        ),
        E::AlertReceived(A::ProtocolVersion) => "the broker does not accept TLS 1.2 or 1.3, \
             the versions fm speaks; enable them in the broker's ssl_options.versions"
            .to_owned(),
        E::AlertReceived(A::DecryptError) if client.is_some() => format!(
            "the broker could not verify the signature made with [tls] keyfile; is it the key \
             of {}?",
            ours()
        ),
        E::AlertReceived(_) => format!(
            "the broker ended the TLS handshake with the alert {}",
            alert_name(err)
        ),

        // Not TLS at all on the other end.
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::PeerSentOversizedRecord => {
            format!(
                "{host}:{port} did not answer with TLS; is it a plain AMQP port? Use amqp:// \
                 for it, or the broker's TLS port (usually 5671) with amqps://"
            )
        }
        E::PeerIncompatible(why) => format!(
            "the broker's TLS is not compatible with fm's (TLS 1.2 or 1.3, modern ciphers): \
             {why:?}"
        ),
        other => format!("{other}"),
    };
    format!("TLS handshake with {host}:{port} failed: {why}")
}

/// `CertificateExpired` rather than `AlertReceived(CertificateExpired)`.
pub(super) fn alert_name(err: &rustls::Error) -> String {
    match err {
        rustls::Error::AlertReceived(alert) => format!("{alert:?}"),
        other => other.to_string(),
    }
}

/// webpki's presented names (`DnsName("localhost")`, `IpAddress(127.0.0.1)`) as plain names.
pub(super) fn presented_names(presented: &[String]) -> String {
    if presented.is_empty() {
        return "no name at all".to_owned();
    }
    presented
        .iter()
        .map(|name| {
            let inner = name
                .split_once('(')
                .and_then(|(_, rest)| rest.strip_suffix(')'))
                .unwrap_or(name);
            inner.trim_matches('"').to_owned()
        })
        .collect::<Vec<_>>()
        .join(", ")
}
