//! Agent configuration: the TOML file (`/etc/fwdllm/agent.toml`), environment overrides and
//! validation.
//!
//! Loading order: built-in defaults, then the file, then environment variables
//! `FWDLLM_AGENT__<SECTION>__<KEY>` (e.g. `FWDLLM_AGENT__MQTT__PORT=1884`; the value is read as a
//! TOML value when it parses as one, else as a string). Every key has a default, so an empty file
//! is a valid config. The shipped example `systemd/fwdllm-agent.toml` lists every key with its
//! default (a test keeps the two in sync).
//!
//! [`AgentConfig::load`] reports *every* problem at once — unknown keys, wrong types and values
//! out of range — each with its key and a fix, so `fwdllm-agent validate` (the unit's
//! `ExecStartPre=`) is useful on the first try.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::train::DEFAULT_DISCRIMINATIVE_CANDIDATES;
use crate::engine::ForwardPath;

/// Prefix of environment overrides; sections and keys are separated by `__`.
pub const ENV_PREFIX: &str = "FWDLLM_AGENT__";

/// The whole agent configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    pub agent: AgentSection,
    pub mqtt: MqttSection,
    pub limits: LimitsSection,
    pub telemetry: TelemetrySection,
    pub gradient: GradientSection,
    pub engine: EngineSection,
}

/// `[agent]`: identity and local state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentSection {
    /// MQTT client id and topic name of this agent. Empty = `fwdllm-<hostname>`. Must be stable
    /// across restarts: the broker keeps the persistent session under it.
    pub client_id: String,
    /// Federation job to join (topic prefix `fwdllm/v1/<job>/`).
    pub job: String,
    /// Directory for the agent's persisted state and weights. Empty = `$STATE_DIRECTORY`
    /// (set by systemd's `StateDirectory=`), else `/var/lib/fwdllm-agent`.
    pub state_dir: String,
    /// Send sd_notify READY/WATCHDOG/STOPPING when `$NOTIFY_SOCKET` is set.
    pub systemd_notify: bool,
}

impl Default for AgentSection {
    fn default() -> Self {
        Self {
            client_id: String::new(),
            job: "default".into(),
            state_dir: String::new(),
            systemd_notify: true,
        }
    }
}

/// `[mqtt]`: broker connection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttSection {
    /// Broker host name or address.
    pub host: String,
    /// Broker TCP port.
    pub port: u16,
    /// MQTT keep-alive in seconds (the broker publishes our last will after 1.5x this).
    pub keep_alive_s: u64,
    /// Largest packet accepted or sent, in bytes; must hold a full checkpoint.
    pub max_packet_bytes: usize,
    /// TCP connect + CONNACK timeout in seconds.
    pub connect_timeout_s: u64,
    /// Username; empty = anonymous.
    pub username: String,
    /// File holding the password. Empty = `$CREDENTIALS_DIRECTORY/mqtt-password` when that exists
    /// (systemd `LoadCredential=mqtt-password:...`), else no password.
    pub password_file: String,
    /// First reconnect delay in milliseconds.
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay in milliseconds.
    pub backoff_max_ms: u64,
    /// Factor by which the delay grows after each failed attempt.
    pub backoff_multiplier: f64,
    /// Fraction of the delay randomised (0 = none, 1 = "full jitter").
    pub backoff_jitter: f64,
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            keep_alive_s: 30,
            max_packet_bytes: 64 * 1024 * 1024,
            connect_timeout_s: 10,
            username: String::new(),
            password_file: String::new(),
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            backoff_multiplier: 2.0,
            backoff_jitter: 0.5,
        }
    }
}

/// `[limits]`: device limits; outside them the agent reports "busy" and sits rounds out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Minimum available memory in MiB (0 = no limit).
    pub min_free_memory_mb: u64,
    /// Maximum temperature of the hottest sensor in °C (0 = no limit; ignored without sensors).
    pub max_temperature_c: f32,
    /// Maximum 1-minute load average per CPU core (0 = no limit).
    pub max_load_per_core: f64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            min_free_memory_mb: 256,
            max_temperature_c: 80.0,
            max_load_per_core: 0.0,
        }
    }
}

/// `[telemetry]`: heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetrySection {
    /// Seconds between telemetry messages (and device-limit checks); 0 = off.
    pub interval_s: u64,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        Self { interval_s: 30 }
    }
}

/// Which [`crate::daemon::GradientSource`] the `run` subcommand builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// llama.cpp engine on the agent's data shard.
    Engine,
    /// Cheap quadratic loss over the LoRA parameters (tests, simulations).
    Synthetic,
}

/// `[gradient]`: how directional derivatives are computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GradientSection {
    /// "engine" or "synthetic".
    pub source: SourceKind,
    /// Perturbations computed between two watchdog pings / shutdown checks.
    pub seeds_per_chunk: u32,
    /// Synthetic source: seed of the quadratic's target point.
    pub synthetic_target_seed: u64,
    /// Synthetic source: scale of the target point.
    pub synthetic_target_scale: f32,
    /// Synthetic source, fault injection: hang forever inside the gradient computation of
    /// this round (0 = never). Proves on a board that a hung work loop stops the watchdog
    /// pings and systemd restarts the agent (`WatchdogSec=`).
    pub synthetic_hang_at_round: u64,
    /// Discriminative perturbation sampling (FwdLLM): candidate directions drawn per
    /// perturbation; the one best aligned (|cosine|) with the last replayed commit is used.
    /// 1 = off; default [`DEFAULT_DISCRIMINATIVE_CANDIDATES`].
    pub discriminative_candidates: u32,
}

impl Default for GradientSection {
    fn default() -> Self {
        Self {
            source: SourceKind::Engine,
            seeds_per_chunk: 1,
            synthetic_target_seed: 7,
            synthetic_target_scale: 0.05,
            synthetic_hang_at_round: 0,
            discriminative_candidates: DEFAULT_DISCRIMINATIVE_CANDIDATES,
        }
    }
}

/// `[engine]`: the llama.cpp engine and the agent's data shard (source = "engine").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSection {
    /// GGUF model file (usually quantised; converted once to `precision` under `cache_dir`).
    pub model: String,
    /// Task file: classification (prompt, labels, verbalizer words) or `kind = "sft"`
    /// (prompt and response templates); see edge-agent/tasks/*.toml.
    pub task: String,
    /// This agent's training shard: JSON Lines `{"text": ..., "label": "<label name>"}`, or
    /// `{"prompt": ..., "response": ...}` for an sft task (`fwdllm-agent shard` writes both).
    pub shard: String,
    /// Compute threads (0 = all cores).
    pub threads: u32,
    /// Context length in tokens (all sequences of one decode together).
    pub n_ctx: u32,
    /// Maximum tokens per decode call.
    pub n_batch: u32,
    /// Prompts packed into one decode call.
    pub seqs_per_decode: u32,
    /// "f32" (default; needed for a usable gradient signal), "f16" or "quantized".
    pub precision: String,
    /// Where converted model copies are kept; empty = `<state_dir>/prepared`.
    pub cache_dir: String,
    /// "auto" (default): run the frozen layers below the layout's first adapted layer once per
    /// batch and perturb only an F32 tail model; "full": every evaluation runs the whole model.
    pub forward_path: ForwardPath,
    /// Precision of the frozen prefix on the tail path: "q8_0" (default: a Q8_0 copy, which
    /// ggml's fast kernels cover), "quantized" (the file as shipped), "q4_0", "f16" or "f32".
    /// Its rounding is the same for every perturbation of a batch and cancels in ΔL.
    pub prefix_precision: String,
    /// MiB of cached prefix hidden states (least recently used prompts are dropped).
    pub prefix_cache_mib: u32,
    /// Also keep prefix hidden states on disk under the cache directory, so that each example
    /// of the shard runs the frozen prefix once ever (about 200 KB per 90-token example).
    pub prefix_cache_disk: bool,
}

impl Default for EngineSection {
    fn default() -> Self {
        Self {
            model: "/var/lib/fwdllm-agent/model.gguf".into(),
            task: "/etc/fwdllm/task.toml".into(),
            shard: "/var/lib/fwdllm-agent/shard.jsonl".into(),
            threads: 0,
            n_ctx: 2048,
            n_batch: 2048,
            seqs_per_decode: 8,
            precision: "f32".into(),
            cache_dir: String::new(),
            forward_path: ForwardPath::Auto,
            prefix_precision: "q8_0".into(),
            prefix_cache_mib: 32,
            prefix_cache_disk: true,
        }
    }
}

/// One problem found in a config: where, what, and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigProblem {
    /// Dotted key (`mqtt.port`) or environment variable.
    pub key: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (fix: {})", self.key, self.problem, self.fix)
    }
}

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

    /// Semantic checks on a well-typed config; returns every problem found.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, problem: String, fix: &str| {
            p.push(ConfigProblem {
                key: key.into(),
                problem,
                fix: fix.into(),
            });
        };
        let id = &self.agent.client_id;
        if let Some(problem) = topic_level_problem(id) {
            bad(
                "agent.client_id",
                problem,
                "use letters, digits, '-', '_' or '.', at most 64 characters",
            );
        }
        if self.agent.job.is_empty() {
            bad(
                "agent.job",
                "is empty".into(),
                "set the job name the aggregator uses",
            );
        } else if let Some(problem) = topic_level_problem(&self.agent.job) {
            bad(
                "agent.job",
                problem,
                "use letters, digits, '-', '_' or '.', at most 64 characters",
            );
        }
        let m = &self.mqtt;
        if m.host.trim().is_empty() {
            bad(
                "mqtt.host",
                "is empty".into(),
                "set the broker host, e.g. \"127.0.0.1\"",
            );
        }
        if m.port == 0 {
            bad(
                "mqtt.port",
                "is 0".into(),
                "set the broker port, usually 1883",
            );
        }
        if m.keep_alive_s < 5 || m.keep_alive_s > 65_535 {
            bad(
                "mqtt.keep_alive_s",
                format!("{} is out of range", m.keep_alive_s),
                "use 5..=65535 (default 30)",
            );
        }
        // A checkpoint of a small adapter is a few hundred KiB; MQTT's own limit is 256 MiB.
        if m.max_packet_bytes < 64 * 1024 || m.max_packet_bytes > 268_435_455 {
            bad(
                "mqtt.max_packet_bytes",
                format!("{} is out of range", m.max_packet_bytes),
                "use 65536..=268435455; it must hold a full checkpoint (default 67108864)",
            );
        }
        if m.connect_timeout_s == 0 {
            bad(
                "mqtt.connect_timeout_s",
                "is 0".into(),
                "use at least 1 (default 10)",
            );
        }
        if !m.password_file.is_empty() && m.username.is_empty() {
            bad(
                "mqtt.password_file",
                "is set without mqtt.username".into(),
                "set mqtt.username too",
            );
        }
        if m.backoff_initial_ms == 0 {
            bad(
                "mqtt.backoff_initial_ms",
                "is 0".into(),
                "use at least 1 (default 500)",
            );
        }
        if m.backoff_max_ms < m.backoff_initial_ms {
            bad(
                "mqtt.backoff_max_ms",
                format!(
                    "{} is below mqtt.backoff_initial_ms = {}",
                    m.backoff_max_ms, m.backoff_initial_ms
                ),
                "make it at least backoff_initial_ms (default 60000)",
            );
        }
        if !(m.backoff_multiplier.is_finite()
            && m.backoff_multiplier >= 1.0
            && m.backoff_multiplier <= 10.0)
        {
            bad(
                "mqtt.backoff_multiplier",
                format!("{} is out of range", m.backoff_multiplier),
                "use 1.0..=10.0 (default 2.0)",
            );
        }
        if !(m.backoff_jitter.is_finite() && (0.0..=1.0).contains(&m.backoff_jitter)) {
            bad(
                "mqtt.backoff_jitter",
                format!("{} is out of range", m.backoff_jitter),
                "use 0.0..=1.0 (default 0.5)",
            );
        }
        let l = &self.limits;
        if !(l.max_temperature_c.is_finite()
            && l.max_temperature_c >= 0.0
            && l.max_temperature_c <= 150.0)
        {
            bad(
                "limits.max_temperature_c",
                format!("{} is out of range", l.max_temperature_c),
                "use 0 (off) or a temperature up to 150",
            );
        }
        if !(l.max_load_per_core.is_finite() && l.max_load_per_core >= 0.0) {
            bad(
                "limits.max_load_per_core",
                format!("{} is out of range", l.max_load_per_core),
                "use 0 (off) or a positive load",
            );
        }
        if self.gradient.seeds_per_chunk == 0 {
            bad(
                "gradient.seeds_per_chunk",
                "is 0".into(),
                "use at least 1 (default 1)",
            );
        }
        if !(1..=4096).contains(&self.gradient.discriminative_candidates) {
            bad(
                "gradient.discriminative_candidates",
                format!("is {}", self.gradient.discriminative_candidates),
                "use 1 (off, the default) up to 4096 candidates",
            );
        }
        if !self.gradient.synthetic_target_scale.is_finite() {
            bad(
                "gradient.synthetic_target_scale",
                "is not finite".into(),
                "use a finite number (default 0.05)",
            );
        }
        if self.gradient.source == SourceKind::Engine {
            let e = &self.engine;
            if e.model.is_empty() {
                bad("engine.model", "is empty".into(), "set the GGUF model path");
            }
            if e.task.is_empty() {
                bad(
                    "engine.task",
                    "is empty".into(),
                    "set the task file (prompt, labels, words)",
                );
            }
            if e.shard.is_empty() {
                bad(
                    "engine.shard",
                    "is empty".into(),
                    "set this agent's data shard (see `fwdllm-agent shard`)",
                );
            }
            if e.n_ctx < 16 {
                bad(
                    "engine.n_ctx",
                    format!("{} is too small", e.n_ctx),
                    "use at least 16 (default 2048)",
                );
            }
            if e.n_batch == 0 || e.n_batch > e.n_ctx {
                bad(
                    "engine.n_batch",
                    format!("{} is out of range", e.n_batch),
                    "use 1..=engine.n_ctx (default 2048)",
                );
            }
            if e.seqs_per_decode == 0 {
                bad(
                    "engine.seqs_per_decode",
                    "is 0".into(),
                    "use at least 1 (default 8)",
                );
            }
            if !matches!(e.precision.as_str(), "f32" | "f16" | "quantized") {
                bad(
                    "engine.precision",
                    format!("{:?} is not a precision", e.precision),
                    "use \"f32\", \"f16\" or \"quantized\"",
                );
            }
            if crate::engine::Precision::parse(&e.prefix_precision).is_none() {
                bad(
                    "engine.prefix_precision",
                    format!("{:?} is not a precision", e.prefix_precision),
                    "use \"q8_0\" (default), \"quantized\", \"q4_0\", \"f16\" or \"f32\"",
                );
            }
        }
        p
    }

    /// Files that must exist for `run` (checked by `validate`, not by `load`, so unit tests and
    /// in-process agents need no files).
    pub fn check_files(&self) -> Vec<ConfigProblem> {
        let mut p = Vec::new();
        if self.gradient.source == SourceKind::Engine {
            for (key, path) in [
                ("engine.model", &self.engine.model),
                ("engine.task", &self.engine.task),
                ("engine.shard", &self.engine.shard),
            ] {
                if !path.is_empty() && !Path::new(path).is_file() {
                    p.push(ConfigProblem {
                        key: key.into(),
                        problem: format!("{path} does not exist or is not a file"),
                        fix: "point it at an existing file".into(),
                    });
                }
            }
        }
        if !self.mqtt.password_file.is_empty() && !Path::new(&self.mqtt.password_file).is_file() {
            p.push(ConfigProblem {
                key: "mqtt.password_file".into(),
                problem: format!("{} does not exist", self.mqtt.password_file),
                fix: "point it at a readable file or leave it empty".into(),
            });
        }
        p
    }

    /// The MQTT client id: `agent.client_id`, or `fwdllm-<hostname>` when that is empty.
    pub fn client_id(&self) -> String {
        if !self.agent.client_id.is_empty() {
            return self.agent.client_id.clone();
        }
        let host = sysinfo::System::host_name().unwrap_or_else(|| "unknown".into());
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("fwdllm-{host}")
    }

    /// The state directory: `agent.state_dir`, else `$STATE_DIRECTORY`, else `/var/lib/fwdllm-agent`.
    pub fn state_dir(&self) -> PathBuf {
        if !self.agent.state_dir.is_empty() {
            return PathBuf::from(&self.agent.state_dir);
        }
        match std::env::var_os("STATE_DIRECTORY") {
            // systemd may pass several colon-separated directories; the first is ours.
            Some(v) if !v.is_empty() => PathBuf::from(
                v.to_string_lossy()
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            _ => PathBuf::from("/var/lib/fwdllm-agent"),
        }
    }

    /// The MQTT password, if any (see [`MqttSection::password_file`]).
    pub fn password(&self) -> std::io::Result<Option<String>> {
        let path = if !self.mqtt.password_file.is_empty() {
            PathBuf::from(&self.mqtt.password_file)
        } else {
            match std::env::var_os("CREDENTIALS_DIRECTORY") {
                Some(dir) if Path::new(&dir).join("mqtt-password").is_file() => {
                    Path::new(&dir).join("mqtt-password")
                }
                _ => return Ok(None),
            }
        };
        let text = std::fs::read_to_string(path)?;
        Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned()))
    }

    /// Every key as `section.key`, in declaration order (used by the example-config tidy test).
    pub fn all_keys() -> Vec<String> {
        let table = default_table();
        let mut keys = Vec::new();
        for (section, value) in &table {
            if let toml::Value::Table(t) = value {
                keys.extend(t.keys().map(|k| format!("{section}.{k}")));
            }
        }
        keys
    }
}

fn default_table() -> toml::Table {
    toml::Table::try_from(AgentConfig::default()).expect("the default config serialises")
}

/// `None` when `s` is usable as one MQTT topic level (empty allowed: means "derive").
fn topic_level_problem(s: &str) -> Option<String> {
    if s.len() > 64 {
        return Some(format!("{s:?} is longer than 64 characters"));
    }
    s.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .map(|c| format!("{s:?} contains {c:?}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_toml_with_env(
            text,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            "test.toml",
        )
    }

    fn problem_keys(text: &str, env: &[(&str, &str)]) -> Vec<String> {
        match load(text, env) {
            Err(ConfigError::Invalid { problems, .. }) => {
                problems.into_iter().map(|p| p.key).collect()
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_is_the_default() {
        assert_eq!(load("", &[]).unwrap(), AgentConfig::default());
    }

    #[test]
    fn file_values_and_env_overrides() {
        let c = load(
            "[mqtt]\nport = 1999\nhost = \"broker.local\"\n[agent]\njob = \"bbc\"\n",
            &[
                ("FWDLLM_AGENT__MQTT__PORT", "2000"),
                ("FWDLLM_AGENT__GRADIENT__SOURCE", "synthetic"),
                ("OTHER", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.mqtt.port, 2000);
        assert_eq!(c.mqtt.host, "broker.local");
        assert_eq!(c.agent.job, "bbc");
        assert_eq!(c.gradient.source, SourceKind::Synthetic);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = "[mqtt]\nport = \"high\"\nbackoff_jitter = 3.0\nbogus = 1\n[limits]\nmax_temperature_c = -5.0\n\
                    [agent]\nclient_id = \"a/b\"\n[nope]\nx = 1\n";
        let keys = problem_keys(text, &[("FWDLLM_AGENT__ENGINE__N_CTX", "lots")]);
        // Type and unknown-key problems are reported together; range checks need a typed config.
        assert_eq!(keys, ["engine.n_ctx", "mqtt.bogus", "mqtt.port", "nope"]);

        let text = "[mqtt]\nbackoff_jitter = 3.0\nbackoff_max_ms = 1\nport = 0\n[limits]\nmax_temperature_c = -5.0\n\
                    [agent]\nclient_id = \"a/b\"\njob = \"\"\n[gradient]\nseeds_per_chunk = 0\n[engine]\nmodel = \"\"\n";
        let keys = problem_keys(text, &[]);
        assert_eq!(
            keys,
            [
                "agent.client_id",
                "agent.job",
                "mqtt.port",
                "mqtt.backoff_max_ms",
                "mqtt.backoff_jitter",
                "limits.max_temperature_c",
                "gradient.seeds_per_chunk",
                "engine.model"
            ]
        );
    }

    #[test]
    fn errors_name_key_and_fix() {
        let err = load("[mqtt]\nport = 0\n", &[]).unwrap_err().to_string();
        assert!(err.contains("mqtt.port") && err.contains("fix:"), "{err}");
        let err = load("[mqtt\n", &[]).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err:?}");
    }

    #[test]
    fn malformed_env_var_is_reported() {
        assert_eq!(
            problem_keys("", &[("FWDLLM_AGENT__PORT", "1")]),
            ["FWDLLM_AGENT__PORT"]
        );
    }

    #[test]
    fn engine_keys_only_matter_for_the_engine_source() {
        let c = load(
            "[gradient]\nsource = \"synthetic\"\n[engine]\nmodel = \"\"\n",
            &[],
        )
        .unwrap();
        assert!(c.check_files().is_empty());
        let c = load("[engine]\nmodel = \"/nonexistent/m.gguf\"\n", &[]).unwrap();
        let keys: Vec<_> = c.check_files().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["engine.model", "engine.task", "engine.shard"]);
    }

    #[test]
    fn derived_client_id_is_a_valid_topic_level() {
        let id = AgentConfig::default().client_id();
        assert!(id.starts_with("fwdllm-"));
        assert_eq!(topic_level_problem(&id), None);
    }

    /// Tidy: the shipped example lists every key, commented, with its default value.
    #[test]
    fn example_config_covers_every_key_with_defaults() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd/fwdllm-agent.toml");
        let text = std::fs::read_to_string(path).expect("systemd/fwdllm-agent.toml exists");
        // The example parses as shipped (all keys commented out)...
        assert_eq!(load(&text, &[]).unwrap(), AgentConfig::default());
        // ...and uncommenting every `# key = value` line gives exactly the defaults, every key once.
        let mut uncommented = String::new();
        let mut seen = Vec::new();
        let mut section = String::new();
        for line in text.lines() {
            if let Some(s) = line.strip_prefix('[') {
                section = s.trim_end_matches(']').to_owned();
                uncommented.push_str(line);
            } else if let Some(rest) = line.strip_prefix("# ").filter(|r| {
                r.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                })
            }) {
                seen.push(format!("{section}.{}", rest.split_once(" = ").unwrap().0));
                uncommented.push_str(rest);
            }
            uncommented.push('\n');
        }
        let cfg = load(&uncommented, &[]).unwrap_or_else(|e| panic!("uncommented example: {e}"));
        assert_eq!(
            cfg,
            AgentConfig::default(),
            "example values differ from the defaults"
        );
        let mut want = AgentConfig::all_keys();
        want.sort();
        seen.sort();
        assert_eq!(seen, want, "example keys differ from the config's keys");
    }
}
