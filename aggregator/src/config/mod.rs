//! Aggregator TOML configuration: every key has a default (see `systemd/fwdllm-aggregator.toml`,
//! which documents each one), and [`AggregatorConfig::validate`] reports every problem at once,
//! each naming the key and the fix.

use std::fmt;
use std::path::{Path, PathBuf};

use fwdllm_shared::lora::{LoraConfig, LoraLayout, ModelShape};
use fwdllm_shared::wire::TaskParams;
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod validate;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AggregatorConfig {
    pub job: JobConfig,
    pub broker: BrokerConfig,
    pub model: ModelConfig,
    pub lora: LoraConfig,
    pub round: RoundConfig,
    pub pacing: PacingConfig,
    pub step: StepConfig,
    pub task: TaskConfig,
    pub state: StateConfig,
    pub selection: SelectionConfig,
    /// Bounds on what one client's scalars can do to a commit (`crate::robust`).
    pub robust: RobustConfig,
    /// Optional differential privacy of the committed scalars (`crate::robust`).
    pub dp: DpConfig,
    /// The Prometheus endpoint (`crate::prometheus`).
    pub prometheus: PrometheusConfig,
    /// Ingest workers over an MQTT shared subscription (`crate::ingest_workers`).
    pub ingest: IngestConfig,
}

/// How updates come in: one connection (the coordinator's own), or `workers` connections
/// sharing the updates topic (`$share/fwdllm-ingest/...`), each decoding its share before
/// handing it to the coordinator, which stays the only writer of state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// 1 = the coordinator's connection subscribes to the updates itself.
    pub workers: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig { workers: 1 }
    }
}

/// The most ingest workers a config may ask for (each is a broker connection and a session).
pub const MAX_INGEST_WORKERS: u32 = 64;

/// The Prometheus endpoint. Off by default: the aggregator is a sandboxed service whose only
/// network peer is the broker, an HTTP port is a new listener an operator should choose (and
/// firewall) deliberately, and a fixed default port would collide when two aggregators share a
/// host (tests, several jobs). Set e.g. `listen = "127.0.0.1:9464"` and scrape it locally or
/// through a reverse proxy.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrometheusConfig {
    /// `host:port` to serve `/metrics` on; empty = no endpoint.
    pub listen: String,
}

impl PrometheusConfig {
    /// The listen address, None when off (`validate` reports an unparsable one).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobConfig {
    /// Job name: part of every topic (`fwdllm/v1/{name}/...`).
    pub name: String,
    /// Base of every perturbation seed of the job.
    pub seed_base: u64,
    /// Stop after this many commits (0 = run until stopped).
    pub max_commits: u64,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            name: "default".into(),
            seed_base: 0x5eed_f00d,
            max_commits: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Run rumqttd inside the aggregator process (listening on `host:port`).
    pub embedded: bool,
    pub host: String,
    /// 0 = pick a free port (embedded broker only).
    pub port: u16,
    pub client_id: String,
    pub keep_alive_s: u64,
    /// Largest MQTT packet accepted or sent (must hold a checkpoint).
    pub max_packet_bytes: usize,
    /// MQTT username of the aggregator; empty = anonymous (`crate::security`).
    pub username: String,
    /// File holding the MQTT password; empty = `$CREDENTIALS_DIRECTORY/mqtt-password` if present.
    pub password_file: String,
    /// Embedded broker only: `username:password` lines of the clients it accepts; empty =
    /// `$CREDENTIALS_DIRECTORY/mqtt-users` if present, else the broker is open (loopback only).
    pub embedded_users_file: String,
    /// TLS of the aggregator's broker connection.
    pub tls: fwdllm_shared::mqtt_tls::TlsSettings,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            embedded: false,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "fwdllm-aggregator".into(),
            keep_alive_s: 30,
            max_packet_bytes: 64 << 20,
            username: String::new(),
            password_file: String::new(),
            embedded_users_file: String::new(),
            tls: Default::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Read the model shape from this GGUF file's header; empty = use `preset`.
    pub gguf: PathBuf,
    /// Named shape when `gguf` is empty: "smollm2-135m" or "tiny" (tests and simulations).
    pub preset: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            gguf: PathBuf::new(),
            preset: "smollm2-135m".into(),
        }
    }
}

/// A small llama-shaped model for simulations and tests (trainable B: 2 layers, q and v).
pub fn tiny_shape() -> ModelShape {
    fwdllm_shared::fixtures::small_llama(2, 64, 4, 2)
}

impl ModelConfig {
    pub fn shape(&self) -> Result<ModelShape, String> {
        if !self.gguf.as_os_str().is_empty() {
            return fwdllm_shared::gguf::model_shape_from_gguf(&self.gguf)
                .map_err(|e| format!("reading {}: {e}", self.gguf.display()));
        }
        match self.preset.as_str() {
            "smollm2-135m" => Ok(ModelShape::smollm2_135m()),
            "tiny" => Ok(tiny_shape()),
            other => Err(format!(
                "unknown preset {other:?}; use \"smollm2-135m\" or \"tiny\", or set model.gguf"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoundConfig {
    /// Perturbations each selected client computes for the first request of a round.
    pub perturbations_per_client: u32,
    /// Finite-difference step ε.
    pub eps: f32,
    /// A round commits what it has (if quorum) or is abandoned after this long.
    pub deadline_s: f64,
    /// Clients whose updates a commit needs.
    pub quorum: u32,
    /// Open a round only when at least this many eligible clients are online.
    pub min_clients: u32,
    /// Fraction of eligible clients selected per round (1.0 = all).
    pub fraction: f32,
    /// Block-wise layouts (`lora.blockwise`): head-block directions each client adds per
    /// adapter direction. They reuse the client's unperturbed pass, so they cost no forward
    /// pass; sent to agents as `task.extra["head_per_direction"]`.
    pub head_per_direction: u32,
    /// A round that selects every eligible client lists their ids in its announcement only up
    /// to this many; above, it announces `all` (a size independent of the fleet) and admits
    /// any client that answers. Sampled selections (fraction < 1) are always listed.
    pub selection_list_max: u32,
}

impl Default for RoundConfig {
    fn default() -> Self {
        RoundConfig {
            perturbations_per_client: 8,
            eps: 1e-3,
            deadline_s: 120.0,
            quorum: 1,
            min_clients: 1,
            fraction: 1.0,
            head_per_direction: 0,
            selection_list_max: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PacingConfig {
    /// Commit once the pooled estimate's signal z-score reaches this (dimensionless; see `pacing`).
    pub target_z: f64,
    /// Never commit on the statistic with fewer pairs than this.
    pub min_perturbations: u32,
    /// Commit as soon as a round holds this many pairs, whatever the statistic.
    pub max_perturbations: u32,
    /// Perturbations per client asked by each "extend" request.
    pub extend_perturbations: u32,
    /// Extend requests per round before committing what there is.
    pub max_extends: u32,
}

impl Default for PacingConfig {
    fn default() -> Self {
        PacingConfig {
            target_z: 2.0,
            min_perturbations: 8,
            max_perturbations: 256,
            extend_perturbations: 8,
            max_extends: 3,
        }
    }
}

impl PacingConfig {
    /// No statistical gate and no extends: a round commits once every selected client has
    /// answered its first request (or before, at the cap; or at the deadline, with quorum), so
    /// when a round commits depends only on who answered. The tests script rounds with it.
    pub fn commit_when_answered() -> PacingConfig {
        PacingConfig {
            target_z: 1e9,
            min_perturbations: 1,
            max_extends: 0,
            ..PacingConfig::default()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepConfig {
    /// Peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    /// Commits over which linear/cosine decay to `min_lr_ratio * lr`; afterwards stays there.
    pub total_commits: u64,
    pub min_lr_ratio: f64,
    /// Linear warm-up from 0 over this many commits.
    pub warmup_commits: u64,
    /// Trust region: ||Δθ|| ≤ trust_region · max(||θ||, trust_floor) (θ = whole LoRA vector,
    /// A and B).
    pub trust_region: f64,
    /// Floor of ||θ|| in the trust region, so that a layout starting at θ = 0 (head rows only:
    /// every value starts at 0) can take a first step.
    pub trust_floor: f64,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            lr: 1e-3,
            schedule: Schedule::Cosine,
            total_commits: 500,
            min_lr_ratio: 0.1,
            warmup_commits: 0,
            trust_region: 0.02,
            trust_floor: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TaskConfig {
    pub batch_size: u32,
    pub one_sided: bool,
    pub max_tokens: u32,
    /// Extra task parameters passed verbatim to agents.
    pub extra: Vec<(String, String)>,
}

impl Default for TaskConfig {
    fn default() -> Self {
        let t = TaskParams::default();
        TaskConfig {
            batch_size: t.batch_size,
            one_sided: t.one_sided,
            max_tokens: t.max_tokens,
            extra: t.extra,
        }
    }
}

impl TaskConfig {
    pub fn params(&self) -> TaskParams {
        TaskParams {
            batch_size: self.batch_size,
            one_sided: self.one_sided,
            max_tokens: self.max_tokens,
            extra: self.extra.clone(),
        }
    }
}

/// Upper bound of `state.checkpoint_every` (rumqttd 0.20's in-flight window).
pub const MAX_RETAINED_COMMITS: u64 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// Durable state, checkpoints, metrics files and plot live here.
    pub dir: PathBuf,
    /// Publish (and persist) a full checkpoint every this many commits.
    pub checkpoint_every: u64,
    /// Render metrics.png after every this many commits (0 = only at shutdown).
    pub plot_every: u64,
    /// Group commit: one journal fsync makes at most this many received messages durable.
    pub group_commit_max_updates: u32,
    /// Group commit: a group closes this many milliseconds after its first message at the
    /// latest (earlier when nothing more is waiting), so an update is acknowledged within this
    /// bound plus one fsync.
    pub group_commit_max_ms: u64,
    /// What a commit carries, on the wire and in the log.
    pub commit_form: CommitForm,
}

/// `state.commit_form`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommitForm {
    /// The pairs or the dense trainable values, whichever is smaller
    /// (`fwdllm_shared::wire::CommitStep::smaller`).
    Smallest,
    /// Always the pairs: every commit says which seeds it holds (exactly-once audits such as
    /// the chaos bench's ledger), at up to 3x the bytes on small layouts.
    Pairs,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: PathBuf::from("/var/lib/fwdllm-aggregator"),
            checkpoint_every: 10,
            plot_every: 10,
            group_commit_max_updates: 4096,
            group_commit_max_ms: 20,
            commit_form: CommitForm::Smallest,
        }
    }
}

/// Model selection: which version `export` writes (see `crate::selection`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SelectionConfig {
    /// Ask the agents to evaluate their dev subsets at every version that is a multiple of
    /// this (0 = never: export the last version).
    pub eval_every: u64,
}

impl Default for SelectionConfig {
    fn default() -> Self {
        SelectionConfig { eval_every: 20 }
    }
}

/// `[robust]`: bounds on what one client's scalars can do to a commit ([`crate::robust`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RobustConfig {
    /// Hard bound on |g| of one pair; an update holding a larger value is rejected whole.
    pub max_abs_g: f64,
    /// Per-round clip of every g to `median ± clip_sigmas·σ̂` (σ̂ from the MAD); 0 = off.
    pub clip_sigmas: f64,
    /// Per-client cap: RMS deviation of a client's g ≤ `client_rms_sigmas·σ̂`; 0 = off.
    pub client_rms_sigmas: f64,
    /// Clipping and the cap need at least this many pairs in a direction block.
    pub min_pairs: u32,
}

/// Default of `robust.max_abs_g`. Measured: `make demo` (BBC, head-rows recipe, 4 agents,
/// 2026-12-05) saw honest |g| at most 63.9 (median 2.75) over 118,528 pairs, so 1e4 sits two
/// orders of magnitude above any honest value. It only has to stop absurd values outright; the
/// per-round clipping does the fine work. Other tasks and layouts scale g differently: check
/// `g_abs_max` in the commit metrics before tightening it.
pub const DEFAULT_MAX_ABS_G: f64 = 1e4;

impl Default for RobustConfig {
    fn default() -> Self {
        RobustConfig {
            max_abs_g: DEFAULT_MAX_ABS_G,
            clip_sigmas: 5.0,
            client_rms_sigmas: 3.0,
            min_pairs: 8,
        }
    }
}

/// `[dp]`: optional Gaussian noise on the pooled scalars (the sensitivity argument is in
/// [`crate::robust`]'s docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpConfig {
    pub enabled: bool,
    /// Fixed public clip C of every |g| (replaces the data-dependent clipping when enabled).
    pub clip: f64,
    /// z: noise standard deviation in units of the L2 sensitivity Δ₂ = 2C·√n_max.
    pub noise_multiplier: f64,
    /// δ of the reported (ε, δ) guarantee.
    pub delta: f64,
}

impl Default for DpConfig {
    fn default() -> Self {
        DpConfig {
            enabled: false,
            clip: 1.0,
            noise_multiplier: 1.0,
            delta: 1e-6,
        }
    }
}

/// One configuration problem: the key, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path} is not valid TOML for the aggregator: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl AggregatorConfig {
    /// A job on the `tiny` model preset with its state in `state_dir` and no periodic plots:
    /// where simulations, the fuzzer and the tests start.
    pub fn tiny(job: &str, state_dir: &Path) -> AggregatorConfig {
        let mut cfg = AggregatorConfig::default();
        cfg.job.name = job.into();
        cfg.model.preset = "tiny".into();
        cfg.state.dir = state_dir.to_path_buf();
        cfg.state.plot_every = 0;
        cfg
    }

    /// Parses TOML text (unknown keys are errors, missing keys take defaults).
    pub fn from_toml(text: &str) -> Result<AggregatorConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<AggregatorConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let cfg = Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        let problems = cfg.validate();
        if problems.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                problems,
            })
        }
    }

    /// The LoRA layout this config trains.
    pub fn layout(&self) -> Result<LoraLayout, String> {
        let shape = self.model.shape()?;
        LoraLayout::new(&shape, &self.lora).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(AggregatorConfig::default().validate(), vec![]);
    }

    #[test]
    fn all_problems_are_reported_at_once_with_keys() {
        let text = r#"
            [job]
            name = "a/b"
            [round]
            quorum = 0
            eps = -1.0
            [step]
            lr = 0.0
            [lora]
            rank = 0
            [state]
            checkpoint_every = 101
        "#;
        let cfg = AggregatorConfig::from_toml(text).unwrap();
        let keys: Vec<String> = cfg.validate().into_iter().map(|p| p.key).collect();
        for k in [
            "job.name",
            "round.quorum",
            "round.eps",
            "step.lr",
            "lora",
            "state.checkpoint_every",
        ] {
            assert!(keys.contains(&k.to_string()), "{k} missing from {keys:?}");
        }
    }

    #[test]
    fn ingest_workers_are_refused_with_the_embedded_broker_and_out_of_range() {
        let check = |text: &str, want: Option<&str>| {
            let cfg = AggregatorConfig::from_toml(text).unwrap();
            let got: Vec<String> = cfg
                .validate()
                .into_iter()
                .filter(|p| p.key == "ingest.workers")
                .map(|p| p.message)
                .collect();
            match want {
                None => assert!(got.is_empty(), "{text}: {got:?}"),
                Some(w) => assert!(got.len() == 1 && got[0].contains(w), "{text}: {got:?}"),
            }
        };
        check("[ingest]\nworkers = 4\n", None);
        check("[broker]\nembedded = true\n[ingest]\nworkers = 1\n", None);
        check(
            "[broker]\nembedded = true\n[ingest]\nworkers = 2\n",
            Some("set ingest.workers = 1, or use mosquitto"),
        );
        check("[ingest]\nworkers = 0\n", Some("use 1"));
        check("[ingest]\nworkers = 65\n", Some("to 64"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = AggregatorConfig::from_toml("[round]\nquorom = 2\n").unwrap_err();
        assert!(err.contains("quorom"), "{err}");
    }
}
