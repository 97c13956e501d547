//! Validation: semantic checks on a well-typed config, and the files `run` needs.

use std::fmt;
use std::path::Path;

use super::{AgentConfig, SourceKind};

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

impl AgentConfig {
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
        for (key, problem) in self.mqtt.tls.problems("mqtt.tls") {
            p.push(ConfigProblem {
                key,
                problem,
                fix: "see README \"Security\" for the certificate set-up".into(),
            });
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
}

/// `None` when `s` is usable as one MQTT topic level (empty allowed: means "derive").
pub(super) fn topic_level_problem(s: &str) -> Option<String> {
    if s.len() > 64 {
        return Some(format!("{s:?} is longer than 64 characters"));
    }
    s.chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .map(|c| format!("{s:?} contains {c:?}"))
}
