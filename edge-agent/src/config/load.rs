//! Loading: the TOML file, `FWDLLM_AGENT__<SECTION>__<KEY>` environment overrides, and the
//! typed read that reports every unknown or mistyped key at once.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{AgentConfig, ConfigProblem, ENV_PREFIX};

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config {origin} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        origin: String,
        problems: Vec<ConfigProblem>,
    },
}

fn list(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl AgentConfig {
    /// Reads `path`, applies environment overrides from the process environment and validates.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_with_env(&text, std::env::vars(), &path.display().to_string())
    }

    /// Parses `text`, applies `env` overrides (only `FWDLLM_AGENT__*` variables are looked at) and
    /// validates. `origin` names the source in errors.
    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        origin: &str,
    ) -> Result<AgentConfig, ConfigError> {
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: origin.into(),
                    message: e.to_string(),
                })?;
        let mut problems = Vec::new();
        apply_env(&mut table, env, &mut problems);
        let config = typed(&table, &mut problems);
        if let Some(config) = &config {
            problems.extend(config.validate());
        }
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                origin: origin.into(),
                problems,
            }),
        }
    }

    /// Every key as `section.key`, in declaration order (used by the example-config tidy test).
    pub fn all_keys() -> Vec<String> {
        // Nested sections (`[mqtt.tls]`) give dotted keys (`mqtt.tls.enabled`).
        fn walk(prefix: &str, t: &toml::Table, keys: &mut Vec<String>) {
            for (k, v) in t {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    toml::Value::Table(sub) => walk(&path, sub, keys),
                    _ if prefix.is_empty() => {} // no top-level scalars
                    _ => keys.push(path),
                }
            }
        }
        let mut keys = Vec::new();
        walk("", &default_table(), &mut keys);
        keys
    }
}

fn default_table() -> toml::Table {
    toml::Table::try_from(AgentConfig::default()).expect("the default config serialises")
}

/// Applies `FWDLLM_AGENT__SECTION__KEY=value` overrides to the raw table.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
    problems: &mut Vec<ConfigProblem>,
) {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect();
        let [section, key] = path.as_slice() else {
            problems.push(ConfigProblem {
                key: var.clone(),
                problem: "is not of the form FWDLLM_AGENT__<SECTION>__<KEY>".into(),
                fix: "name a key, e.g. FWDLLM_AGENT__MQTT__PORT".into(),
            });
            continue;
        };
        // Read the value as TOML when it is one ("1884", "true", "0.5"), else as a plain string.
        let value = format!("v = {raw}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.clone()));
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match entry {
            toml::Value::Table(t) => {
                t.insert(key.clone(), value);
            }
            _ => problems.push(ConfigProblem {
                key: var.clone(),
                problem: format!("[{section}] in the file is not a table"),
                fix: format!("make {section} a [section]"),
            }),
        }
    }
}

/// Deserialises the raw table, reporting every unknown or mistyped key (serde alone stops at the
/// first): each user key is checked on its own against the defaults.
fn typed(table: &toml::Table, problems: &mut Vec<ConfigProblem>) -> Option<AgentConfig> {
    let defaults = default_table();
    let before = problems.len();
    for (section, value) in table {
        let Some(toml::Value::Table(default_section)) = defaults.get(section) else {
            problems.push(ConfigProblem {
                key: section.clone(),
                problem: "unknown section".into(),
                fix: format!(
                    "use one of: {}",
                    defaults.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
            continue;
        };
        let toml::Value::Table(user_section) = value else {
            problems.push(ConfigProblem {
                key: section.clone(),
                problem: "is not a table".into(),
                fix: format!("write it as a [{section}] section"),
            });
            continue;
        };
        for (key, v) in user_section {
            let name = format!("{section}.{key}");
            if !default_section.contains_key(key) {
                problems.push(ConfigProblem {
                    key: name,
                    problem: "unknown key".into(),
                    fix: format!(
                        "remove it; keys of [{section}] are: {}",
                        default_section
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
                continue;
            }
            let mut probe = defaults.clone();
            if let Some(toml::Value::Table(t)) = probe.get_mut(section) {
                t.insert(key.clone(), v.clone());
            }
            if let Err(e) = AgentConfig::deserialize(toml::Value::Table(probe)) {
                let default = default_section
                    .get(key)
                    .map(|d| d.to_string())
                    .unwrap_or_default();
                problems.push(ConfigProblem {
                    key: name,
                    problem: format!("bad value {v}: {}", e.message().trim()),
                    fix: format!("use a value like the default {default}"),
                });
            }
        }
    }
    if problems.len() > before {
        return None;
    }
    match AgentConfig::deserialize(toml::Value::Table(table.clone())) {
        Ok(c) => Some(c),
        Err(e) => {
            problems.push(ConfigProblem {
                key: "config".into(),
                problem: e.to_string(),
                fix: "see the example config".into(),
            });
            None
        }
    }
}
