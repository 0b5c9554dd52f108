//! The rustls client configuration for `mqtts://`: our own `ClientConfig` on the ring
//! provider (the one the rest of the crate uses), trusting the configured CA file or the
//! system store, with an optional client certificate for mutual TLS.
//!
//! Built again for every connection attempt, so certificates rotated on disk are picked up
//! without a restart.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading PEM file {}", .path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} holds no usable CA certificate", .path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: Option<rustls::Error>,
    },
    #[error("the system trust store holds no certificate")]
    NoSystemRoots,
    #[error("client certificate {} and key {} do not form a usable pair", .cert.display(), .key.display())]
    ClientAuth {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("setting up TLS")]
    Setup(#[source] rustls::Error),
}

/// A client configuration trusting `ca_file` (or the system store), presenting
/// `client` = (certificate chain, private key) when given.
///
/// # Errors
/// [`TlsError`] naming the file at fault.
pub fn client_config(ca_file: Option<&Path>, client: Option<(&Path, &Path)>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = read_certs(path)?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::BadCa { path: path.to_path_buf(), source: None });
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                tracing::debug!(error = %e, "skipping part of the system trust store");
            }
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(TlsError::NoSystemRoots);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().map_err(TlsError::Setup)?.with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => {
            let chain = read_certs(cert)?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem { path: key.to_path_buf(), source })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|source| TlsError::ClientAuth { cert: cert.to_path_buf(), key: key.to_path_buf(), source })?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path).and_then(|it| it.collect::<Result<Vec<_>, _>>()).map_err(|source| TlsError::Pem { path: path.to_path_buf(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.to_path_buf() });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client_config(Some(&empty), None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e:?}");
        assert!(e.to_string().contains("empty.pem"));
        let missing = dir.path().join("missing.pem");
        let e = client_config(Some(&missing), None).unwrap_err();
        assert!(matches!(e, TlsError::Pem { .. }), "{e:?}");
    }
}
