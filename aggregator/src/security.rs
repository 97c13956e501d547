//! Broker security of the aggregator: TLS (server-verified, optionally mutual) and
//! username/password on its own connection, and the users the embedded broker accepts.
//!
//! Secrets never sit in the config: the MQTT password is `broker.password_file` or the systemd
//! credential `$CREDENTIALS_DIRECTORY/mqtt-password`, the TLS client key `broker.tls.key_file`
//! or the credential `mqtt-tls-key`, the embedded broker's user list
//! `broker.embedded_users_file` or the credential `mqtt-users`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fwdllm_shared::mqtt_tls::{credentials_dir, TlsError};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use thiserror::Error;

use crate::config::BrokerConfig;

/// systemd credential names read when the matching file key is empty.
pub const PASSWORD_CREDENTIAL: &str = "mqtt-password";
pub const USERS_CREDENTIAL: &str = "mqtt-users";

#[derive(Debug, Error)]
pub enum SecurityError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} line {line}: expected `username:password`; one user per line, '#' starts a comment"
    )]
    UsersSyntax { path: PathBuf, line: usize },
    #[error("{path} lists no user; the embedded broker would refuse every client — add `username:password` lines or unset broker.embedded_users_file")]
    NoUsers { path: PathBuf },
}

/// Sets TLS and credentials on the aggregator's connection options.
pub fn apply(cfg: &BrokerConfig, opts: &mut MqttOptions) -> Result<(), SecurityError> {
    let creds = credentials_dir();
    if let Some(tls) = cfg.tls.client_config("broker.tls", creds.as_deref())? {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    if !cfg.username.is_empty() {
        let password = password(cfg, creds.as_deref())?.unwrap_or_default();
        opts.set_credentials(cfg.username.clone(), password);
    }
    Ok(())
}

/// The MQTT password: `broker.password_file`, else the `mqtt-password` credential, else none.
fn password(cfg: &BrokerConfig, creds: Option<&Path>) -> Result<Option<String>, SecurityError> {
    let path = if !cfg.password_file.is_empty() {
        PathBuf::from(&cfg.password_file)
    } else {
        match creds.map(|d| d.join(PASSWORD_CREDENTIAL)) {
            Some(p) if p.is_file() => p,
            _ => return Ok(None),
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| SecurityError::Read {
        what: "MQTT password",
        path: path.clone(),
        source,
    })?;
    // A trailing newline from `echo secret > file` is not part of the password.
    Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
}

/// The embedded broker's users (username → password), or None for an open broker (no file
/// configured and no `mqtt-users` credential).
pub fn embedded_users(
    cfg: &BrokerConfig,
) -> Result<Option<HashMap<String, String>>, SecurityError> {
    let path = if !cfg.embedded_users_file.is_empty() {
        PathBuf::from(&cfg.embedded_users_file)
    } else {
        match credentials_dir().map(|d| d.join(USERS_CREDENTIAL)) {
            Some(p) if p.is_file() => p,
            _ => return Ok(None),
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| SecurityError::Read {
        what: "embedded broker users",
        path: path.clone(),
        source,
    })?;
    parse_users(&text, &path).map(Some)
}

/// `username:password` per line; blank lines and `#` comments ignored.
pub fn parse_users(text: &str, path: &Path) -> Result<HashMap<String, String>, SecurityError> {
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((u, p)) if !u.is_empty() => {
                users.insert(u.to_string(), p.to_string());
            }
            _ => {
                return Err(SecurityError::UsersSyntax {
                    path: path.to_path_buf(),
                    line: i + 1,
                })
            }
        }
    }
    if users.is_empty() {
        return Err(SecurityError::NoUsers {
            path: path.to_path_buf(),
        });
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_files_parse_and_bad_lines_are_named() {
        let p = Path::new("users");
        let u = parse_users("# fleet\nfwdllm-aggregator:s3cret\n\npi-1:a:b\n", p).unwrap();
        assert_eq!(u["fwdllm-aggregator"], "s3cret");
        assert_eq!(u["pi-1"], "a:b");
        assert!(matches!(
            parse_users("pi-1\n", p),
            Err(SecurityError::UsersSyntax { line: 1, .. })
        ));
        assert!(matches!(
            parse_users("# none\n", p),
            Err(SecurityError::NoUsers { .. })
        ));
    }
}
