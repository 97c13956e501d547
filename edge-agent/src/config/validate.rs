//! Validation: semantic checks on a well-typed config, and the files `run` needs.

use std::fmt;
use std::ops::RangeInclusive;
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

/// The problems found so far, and the checks most keys need.
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn bad(&mut self, key: &str, problem: String, fix: &str) {
        self.0.push(ConfigProblem {
            key: key.into(),
            problem,
            fix: fix.into(),
        });
    }

    fn not_empty(&mut self, key: &str, value: &str, fix: &str) {
        if value.is_empty() {
            self.bad(key, "is empty".into(), fix);
        }
    }

    fn not_zero<T: PartialEq + Default>(&mut self, key: &str, value: T, fix: &str) {
        if value == T::default() {
            self.bad(key, "is 0".into(), fix);
        }
    }

    /// `value` must lie in `range` (NaN never does).
    fn in_range<T: PartialOrd + fmt::Display>(
        &mut self,
        key: &str,
        value: T,
        range: RangeInclusive<T>,
        fix: &str,
    ) {
        if !range.contains(&value) {
            self.bad(key, format!("{value} is out of range"), fix);
        }
    }
}

impl AgentConfig {
    /// Semantic checks on a well-typed config; returns every problem found.
    pub fn validate(&self) -> Vec<ConfigProblem> {
        let mut p = Problems(Vec::new());
        let topic_fix = "use letters, digits, '-', '_' or '.', at most 64 characters";
        if let Some(problem) = topic_level_problem(&self.agent.client_id) {
            p.bad("agent.client_id", problem, topic_fix);
        }
        p.not_empty(
            "agent.job",
            &self.agent.job,
            "set the job name the aggregator uses",
        );
        // Empty passes this check: that problem is the one above.
        if let Some(problem) = topic_level_problem(&self.agent.job) {
            p.bad("agent.job", problem, topic_fix);
        }
        let m = &self.mqtt;
        p.not_empty(
            "mqtt.host",
            m.host.trim(),
            "set the broker host, e.g. \"127.0.0.1\"",
        );
        p.not_zero("mqtt.port", m.port, "set the broker port, usually 1883");
        p.in_range(
            "mqtt.keep_alive_s",
            m.keep_alive_s,
            5..=65_535,
            "use 5..=65535 (default 30)",
        );
        // A checkpoint of a small adapter is a few hundred KiB; MQTT's own limit is 256 MiB.
        p.in_range(
            "mqtt.max_packet_bytes",
            m.max_packet_bytes,
            64 * 1024..=268_435_455,
            "use 65536..=268435455; it must hold a full checkpoint (default 67108864)",
        );
        p.not_zero(
            "mqtt.connect_timeout_s",
            m.connect_timeout_s,
            "use at least 1 (default 10)",
        );
        if !self.prometheus.listen.is_empty() && self.prometheus.addr().is_none() {
            p.bad(
                "prometheus.listen",
                format!(
                    "is {:?}, not an IP address and port",
                    self.prometheus.listen
                ),
                "use e.g. \"127.0.0.1:9101\", or \"\" for no endpoint",
            );
        }
        if !m.password_file.is_empty() && m.username.is_empty() {
            p.bad(
                "mqtt.password_file",
                "is set without mqtt.username".into(),
                "set mqtt.username too",
            );
        }
        p.not_zero(
            "mqtt.backoff_initial_ms",
            m.backoff_initial_ms,
            "use at least 1 (default 500)",
        );
        if m.backoff_max_ms < m.backoff_initial_ms {
            p.bad(
                "mqtt.backoff_max_ms",
                format!(
                    "{} is below mqtt.backoff_initial_ms = {}",
                    m.backoff_max_ms, m.backoff_initial_ms
                ),
                "make it at least backoff_initial_ms (default 60000)",
            );
        }
        p.in_range(
            "mqtt.backoff_multiplier",
            m.backoff_multiplier,
            1.0..=10.0,
            "use 1.0..=10.0 (default 2.0)",
        );
        p.in_range(
            "mqtt.backoff_jitter",
            m.backoff_jitter,
            0.0..=1.0,
            "use 0.0..=1.0 (default 0.5)",
        );
        let l = &self.limits;
        p.in_range(
            "limits.max_temperature_c",
            l.max_temperature_c,
            0.0..=150.0,
            "use 0 (off) or a temperature up to 150",
        );
        // Up to f64::MAX: any finite load.
        p.in_range(
            "limits.max_load_per_core",
            l.max_load_per_core,
            0.0..=f64::MAX,
            "use 0 (off) or a positive load",
        );
        p.not_zero(
            "gradient.seeds_per_chunk",
            self.gradient.seeds_per_chunk,
            "use at least 1 (default 1)",
        );
        if !(1..=4096).contains(&self.gradient.discriminative_candidates) {
            p.bad(
                "gradient.discriminative_candidates",
                format!("is {}", self.gradient.discriminative_candidates),
                "use 1 (off, the default) up to 4096 candidates",
            );
        }
        if !self.gradient.synthetic_target_scale.is_finite() {
            p.bad(
                "gradient.synthetic_target_scale",
                "is not finite".into(),
                "use a finite number (default 0.05)",
            );
        }
        if self.gradient.source == SourceKind::Engine {
            let e = &self.engine;
            p.not_empty("engine.model", &e.model, "set the GGUF model path");
            p.not_empty(
                "engine.task",
                &e.task,
                "set the task file (prompt, labels, words)",
            );
            p.not_empty(
                "engine.shard",
                &e.shard,
                "set this agent's data shard (see `fwdllm-agent shard`)",
            );
            if e.n_ctx < 16 {
                p.bad(
                    "engine.n_ctx",
                    format!("{} is too small", e.n_ctx),
                    "use at least 16 (default 2048)",
                );
            }
            p.in_range(
                "engine.n_batch",
                e.n_batch,
                1..=e.n_ctx,
                "use 1..=engine.n_ctx (default 2048)",
            );
            p.not_zero(
                "engine.seqs_per_decode",
                e.seqs_per_decode,
                "use at least 1 (default 8)",
            );
            if !matches!(e.precision.as_str(), "f32" | "f16" | "quantized") {
                p.bad(
                    "engine.precision",
                    format!("{:?} is not a precision", e.precision),
                    "use \"f32\", \"f16\" or \"quantized\"",
                );
            }
            if crate::engine::Precision::parse(&e.prefix_precision).is_none() {
                p.bad(
                    "engine.prefix_precision",
                    format!("{:?} is not a precision", e.prefix_precision),
                    "use \"q8_0\" (default), \"quantized\", \"q4_0\", \"f16\" or \"f32\"",
                );
            }
            if crate::engine::TailMatrices::parse(&e.tail_matrices).is_none() {
                p.bad(
                    "engine.tail_matrices",
                    format!("{:?} is not a tail matrix type", e.tail_matrices),
                    "use \"f32\" (default), \"bf16\" or \"q8_0\"",
                );
            }
        }
        p.0
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
