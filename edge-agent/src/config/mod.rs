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
//!
//! The config types and their defaults live here; `load` reads the file and applies the
//! environment overrides, `validate` checks values and files.

mod load;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::recipe::DEFAULT_DISCRIMINATIVE_CANDIDATES;
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
    pub prometheus: PrometheusSection,
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
    /// `[mqtt.tls]`: TLS to the broker, mutual with a client certificate (`shared::mqtt_tls`).
    pub tls: fwdllm_shared::mqtt_tls::TlsSettings,
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
            tls: Default::default(),
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

/// `[prometheus]`: the agent's own metrics endpoint ([`crate::daemon::prometheus`]). Off by
/// default: a board should not open a port nobody scrapes, and the telemetry topic carries the
/// same figures through the broker.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrometheusSection {
    /// `host:port` to serve `/metrics` on, e.g. "127.0.0.1:9101"; empty = no endpoint.
    pub listen: String,
}

impl PrometheusSection {
    /// The listen address, None when off (`validate` reports an unparsable one).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
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
    /// Type of the tail model's weight matrices: "f32" (default, exact), "bf16" or "q8_0"
    /// (norms and the head stay F32). On the AVX-512 x86 this was measured on, neither is
    /// faster than F32 (ARCHITECTURE.md, "Engine"); they are for CPUs whose int8 or bf16 dot
    /// products outrun their F32 ones.
    pub tail_matrices: String,
    /// MiB of cached prefix hidden states (least recently used prompts are dropped).
    pub prefix_cache_mib: u32,
    /// Also keep prefix hidden states on disk under the cache directory, so that each example
    /// of the shard runs the frozen prefix once ever (about 200 KB per 90-token example).
    pub prefix_cache_disk: bool,
    /// Examples of the shard kept out of training as this agent's fixed dev subset, scored when
    /// the aggregator asks (model selection, aggregator key selection.eval_every). A shard of
    /// fewer than twice as many keeps everything for training. 0 = no dev subset.
    pub dev_examples: u32,
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
            tail_matrices: "f32".into(),
            prefix_cache_mib: 32,
            prefix_cache_disk: true,
            dev_examples: 32,
        }
    }
}

pub use load::ConfigError;
pub use validate::ConfigProblem;

impl AgentConfig {
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
}

#[cfg(test)]
mod tests {
    use super::validate::topic_level_problem;
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
    fn the_metrics_endpoint_needs_an_address() {
        let c = load("[prometheus]\nlisten = \"127.0.0.1:9101\"\n", &[]).unwrap();
        assert_eq!(c.prometheus.addr(), Some(([127, 0, 0, 1], 9101).into()));
        assert_eq!(load("", &[]).unwrap().prometheus.addr(), None);
        let err = load("[prometheus]\nlisten = \"localhost\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("prometheus.listen") && err.contains("127.0.0.1:9101"),
            "{err}"
        );
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
    fn a_tail_matrix_type_is_checked_and_the_error_names_the_choices() {
        let c = load("[engine]\ntail_matrices = \"q8_0\"\n", &[]).unwrap();
        assert_eq!(
            crate::engine::TailMatrices::parse(&c.engine.tail_matrices),
            Some(crate::engine::TailMatrices::Q8_0)
        );
        let err = load("[engine]\ntail_matrices = \"f16\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("engine.tail_matrices") && err.contains("\"bf16\""),
            "{err}"
        );
    }

    #[test]
    fn derived_client_id_is_a_valid_topic_level() {
        let id = AgentConfig::default().client_id();
        assert!(id.starts_with("fwdllm-"));
        assert_eq!(topic_level_problem(&id), None);
    }
}
