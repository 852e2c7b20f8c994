//! The `[tls]` files: read bounded, parsed as PEM, each error naming the key, the file and the
//! fix.

use super::*;

/// A `[tls]` file, read whole: a regular file of at most 1 MiB ([`limits::read_bounded`]), so
/// `ca_cert = "/dev/zero"` is an error, not a read that never ends.
pub(super) fn read_file(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    limits::read_bounded(path, limits::MAX_FILE_BYTES, &format!("[tls] {key}"))
        .map_err(|e| anyhow!("{e:#}; fix the path in the [tls] table"))
}

pub(super) fn read_certs(key: &str, path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            anyhow!(
                "[tls] {key} {} is not a valid PEM file ({e}); give PEM certificates \
                 (\"-----BEGIN CERTIFICATE-----\")",
                path.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "[tls] {key} {} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\"){}",
            path.display(),
            if key == "certfile" && PrivateKeyDer::from_pem_slice(&pem).is_ok() {
                "; it holds a private key: did you swap certfile and keyfile?"
            } else {
                ""
            }
        );
    }
    Ok(certs)
}

pub(super) fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let pem = read_file("keyfile", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        let text = String::from_utf8_lossy(&pem);
        let why = if text.contains("BEGIN ENCRYPTED PRIVATE KEY") {
            "the key is encrypted; fm needs an unencrypted key (decrypt it with `openssl pkey \
             -in KEY -out NEW`, and keep NEW readable only by fm's user)"
                .to_owned()
        } else if text.contains("BEGIN CERTIFICATE") {
            "it holds a certificate but no private key: did you swap certfile and keyfile?"
                .to_owned()
        } else {
            format!(
                "no private key found ({e}); give a PEM key: \"BEGIN PRIVATE KEY\" (PKCS#8), \
                 \"BEGIN RSA PRIVATE KEY\" (PKCS#1) or \"BEGIN EC PRIVATE KEY\" (SEC1)"
            )
        };
        anyhow!("[tls] keyfile {} is not usable: {why}", path.display())
    })
}

/// rustls refused the certificate and key pair.
pub(super) fn key_error(err: rustls::Error, cert: &Path, key: &Path) -> anyhow::Error {
    match err {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => anyhow!(
            "[tls] keyfile {} does not match certfile {}: the key is not the private key of \
             the certificate (the first one in certfile); give the key the certificate was \
             issued for",
            key.display(),
            cert.display()
        ),
        other => anyhow!(
            "[tls] keyfile {} cannot be used with certfile {}: {other}; fm supports RSA \
             (2048 to 8192 bits), ECDSA P-256/P-384 and Ed25519 keys",
            key.display(),
            cert.display()
        ),
    }
}
