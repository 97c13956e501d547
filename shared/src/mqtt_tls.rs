//! TLS settings of a broker connection and the rustls client configuration built from them
//! (feature `tls`). Both daemons hand the result to their MQTT client; this module knows TLS
//! and files, not MQTT.
//!
//! * Server-verified TLS: the broker's certificate must chain to `ca_file` (PEM) and name the
//!   broker host (DNS name or IP address SAN), or `server_name` when set.
//! * Mutual TLS: with `cert_file` (PEM chain) the client presents it, signed by `key_file`
//!   (PEM, PKCS#8/PKCS#1/SEC1). An empty `key_file` means the systemd credential
//!   `$CREDENTIALS_DIRECTORY/mqtt-tls-key` (`LoadCredential=mqtt-tls-key:/etc/credstore/...`),
//!   so the key never sits in a world-readable place or in the config.
//!
//! Crypto provider: rustls with `ring` (its C and assembly build in seconds through `cc`),
//! not rustls' default aws-lc-rs, whose aws-lc-sys is a second long cmake build next to
//! llama.cpp's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use rustls::ClientConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Name of the systemd credential holding the client key.
pub const KEY_CREDENTIAL: &str = "mqtt-tls-key";

/// `[mqtt.tls]` (agent) / `[broker.tls]` (aggregator).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// Connect with TLS (the broker's TLS port, usually 8883).
    pub enabled: bool,
    /// PEM file of the CA certificate(s) the broker's certificate must chain to.
    pub ca_file: String,
    /// PEM client certificate chain for mutual TLS; empty = no client certificate.
    pub cert_file: String,
    /// PEM private key of `cert_file`; empty = `$CREDENTIALS_DIRECTORY/mqtt-tls-key`.
    pub key_file: String,
}

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS is enabled but no CA file is set; set {section}.ca_file to the PEM CA certificate that signed the broker's certificate")]
    NoCa { section: &'static str },
    #[error("cannot read {what} {path}: {message}")]
    Read {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} {path} holds no PEM certificate; give a file with -----BEGIN CERTIFICATE----- blocks")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("client certificate {cert} needs its key: set {section}.key_file, or hand the key to the service as the systemd credential {KEY_CREDENTIAL} (LoadCredential={KEY_CREDENTIAL}:/etc/credstore/{KEY_CREDENTIAL})")]
    NoKey {
        section: &'static str,
        cert: PathBuf,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
}

impl TlsSettings {
    /// The client key's path: `key_file`, else the systemd credential if it exists.
    pub fn key_path(&self, credentials_dir: Option<&Path>) -> Option<PathBuf> {
        if !self.key_file.is_empty() {
            return Some(PathBuf::from(&self.key_file));
        }
        let p = credentials_dir?.join(KEY_CREDENTIAL);
        p.is_file().then_some(p)
    }

    /// Config problems as (key suffix, message), for the daemons' `validate` (`section` =
    /// "mqtt.tls" or "broker.tls"). Files are only checked for existence here.
    pub fn problems(&self, section: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !self.enabled {
            return p;
        }
        if self.ca_file.is_empty() {
            p.push((
                format!("{section}.ca_file"),
                "is empty while TLS is enabled; set the PEM CA certificate that signed the broker's certificate".into(),
            ));
        }
        for (key, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                p.push((format!("{section}.{key}"), format!("{path} does not exist")));
            }
        }
        if !self.key_file.is_empty() && self.cert_file.is_empty() {
            p.push((
                format!("{section}.key_file"),
                "is set without cert_file; set the client certificate too (mutual TLS)".into(),
            ));
        }
        p
    }

    /// The rustls client configuration, or None when TLS is off. `credentials_dir` is
    /// `$CREDENTIALS_DIRECTORY` (see [`credentials_dir`]).
    pub fn client_config(
        &self,
        section: &'static str,
        credentials_dir: Option<&Path>,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, TlsError> {
        if !self.enabled {
            return Ok(None);
        }
        if self.ca_file.is_empty() {
            return Err(TlsError::NoCa { section });
        }
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs("CA file", Path::new(&self.ca_file))? {
            roots
                .add(cert)
                .map_err(|e| TlsError::Rustls(format!("CA file {}: {e}", self.ca_file)))?;
        }
        // Deprecated by rustls only for lacking post-quantum key exchange (aws-lc-rs has it):
        // accepted for the build reason in the module docs.
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(roots);
        let config = if self.cert_file.is_empty() {
            builder.with_no_client_auth()
        } else {
            let cert_path = PathBuf::from(&self.cert_file);
            let chain = read_certs("client certificate", &cert_path)?;
            let key_path = self.key_path(credentials_dir).ok_or(TlsError::NoKey {
                section,
                cert: cert_path.clone(),
            })?;
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| TlsError::Read {
                what: "client key",
                path: key_path.clone(),
                message: e.to_string(),
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                TlsError::Rustls(format!("client certificate {}: {e}", cert_path.display()))
            })?
        };
        Ok(Some(Arc::new(config)))
    }
}

/// `$CREDENTIALS_DIRECTORY`, set by systemd for a unit with `LoadCredential=`.
pub fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from)
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Read {
            what,
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_builds_nothing_and_problems_name_keys() {
        let off = TlsSettings::default();
        assert!(off.client_config("mqtt.tls", None).unwrap().is_none());
        assert!(off.problems("mqtt.tls").is_empty());
        let on = TlsSettings {
            enabled: true,
            key_file: "/nonexistent/key.pem".into(),
            ..Default::default()
        };
        let keys: Vec<String> = on.problems("mqtt.tls").into_iter().map(|p| p.0).collect();
        assert_eq!(
            keys,
            ["mqtt.tls.ca_file", "mqtt.tls.key_file", "mqtt.tls.key_file"]
        );
        assert!(matches!(
            on.client_config("mqtt.tls", None),
            Err(TlsError::NoCa { .. })
        ));
    }

    #[test]
    fn the_key_comes_from_the_credentials_directory_when_not_configured() {
        let dir = tempfile::tempdir().unwrap();
        let s = TlsSettings {
            enabled: true,
            cert_file: "c.pem".into(),
            ..Default::default()
        };
        assert_eq!(s.key_path(Some(dir.path())), None);
        std::fs::write(dir.path().join(KEY_CREDENTIAL), "k").unwrap();
        assert_eq!(
            s.key_path(Some(dir.path())),
            Some(dir.path().join(KEY_CREDENTIAL))
        );
        let explicit = TlsSettings {
            key_file: "/etc/k.pem".into(),
            ..s
        };
        assert_eq!(
            explicit.key_path(Some(dir.path())),
            Some(PathBuf::from("/etc/k.pem"))
        );
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let s = TlsSettings {
            enabled: true,
            ca_file: ca.display().to_string(),
            ..Default::default()
        };
        let e = s.client_config("broker.tls", None).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }
}
