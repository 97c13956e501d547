//! The agent daemon: owns the MQTT session, the weights replica, round answering, status,
//! telemetry, device limits and persisted state. Forward passes come from a
//! [`GradientSource`] (the llama.cpp engine, or [`SyntheticSource`] for tests and simulations).
//!
//! # Public API (used by `fwdllm-agent run` and by the in-process demo)
//!
//! ```no_run
//! # async fn demo(config: fwdllm_agent::config::AgentConfig) -> Result<(), fwdllm_agent::daemon::AgentError> {
//! use fwdllm_agent::daemon::{Agent, SyntheticSource};
//! use tokio_util::sync::CancellationToken;
//!
//! let agent = Agent::new(config, Box::new(SyntheticSource::new(7, 0.05)))?;
//! let mut info = agent.watch(); // AgentInfo: connected, model_version, weights_hash, counters
//! let stop = CancellationToken::new();
//! let task = tokio::spawn(agent.run(stop.clone()));
//! info.wait_for(|i| i.model_version >= 3).await.ok();
//! stop.cancel(); // graceful: abandons the perturbation, publishes "offline", flushes state
//! task.await.expect("agent task")?;
//! # Ok(()) }
//! ```
//!
//! # One round
//!
//! 1. The retained `round` topic delivers a [`RoundAnnounce`] (round r, extend e, model version V,
//!    weights hash H). Requests already answered (persisted `last_answered >= (r, e)`), not
//!    selecting this client, or past their deadline are ignored; outside the device limits the
//!    agent publishes status "busy" and sits the request out.
//! 2. The replica is brought to V: commits from the retained commit log are replayed
//!    (`shared::update::apply_commit`), each checked against the aggregator's hash. When the
//!    chain is missing (for longer than a short grace period), the replica is ahead, or a hash
//!    differs, the agent subscribes to the retained checkpoint, adopts it and replays on top.
//! 3. Seeds `derive_seed(seed_base, r, client_index(id), k)` for this client's next
//!    `perturbations_per_client` values of k (k continues across extends of a round) are handed
//!    to the gradient source a chunk at a time on a blocking thread; between chunks the work
//!    loop pings the watchdog and can abandon the round (new round announced, shutdown).
//! 4. One [`ClientUpdate`](fwdllm_shared::wire::ClientUpdate) (`seq = e`) is published with QoS 1, then `last_answered = (r, e)` is
//!    persisted atomically; a re-delivered announce is therefore never answered twice.
//!
//! Invariants: the replica only changes by replaying aggregator commits or adopting a
//! hash-verified checkpoint (never from gradient-source output); an update is only computed at
//! exactly the announced version and hash; each (round, extend) is answered at most once.

pub mod backoff;
pub mod cli;
pub mod dev_eval;
pub mod device;
pub mod engine_source;
pub mod gradient;
pub mod prometheus;
mod publish;
pub mod replica;
mod round;
mod session;
pub mod state;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::service;
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{self, AgentState, RoundAnnounce};
use log::{info, warn};
use rumqttc::AsyncClient;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigProblem};

/// (model version, weights hash) in the order an agent's replica reached them
/// ([`Agent::version_trail`]).
pub type VersionTrail = std::sync::Arc<std::sync::Mutex<Vec<(u64, Option<WeightsHash>)>>>;
pub use backoff::Backoff;
pub use device::{DeviceMonitor, DeviceSample};
pub use engine_source::{EngineSource, EngineSourceError};
pub use gradient::{
    GradientBatch, GradientError, GradientRequest, GradientSource, LossStats, SyntheticSource,
};
use replica::Replica;
pub use round::head_per_direction;
use session::{mqtt_client, network_loop};
use state::{PersistedState, StateDir, StateError};

/// How long the replica may lack commits for an announced version before the agent fetches the
/// checkpoint instead. Brokers do not order messages across subscriptions (rumqttd delivers per
/// filter), so an announcement can overtake the commit published just before it.
const SYNC_GRACE: Duration = Duration::from_secs(3);

/// What the daemon is doing, for tests, the demo and monitoring (see [`Agent::watch`]).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentInfo {
    pub client_id: String,
    /// An MQTT connection is up (CONNACK received, not yet lost).
    pub connected: bool,
    /// Successful connections so far (reconnects included).
    pub connections: u64,
    /// State last published on the status topic.
    pub state: AgentState,
    pub model_version: u64,
    pub weights_hash: Option<WeightsHash>,
    /// Last (round, extend) answered.
    pub last_answered: Option<(u64, u32)>,
    pub updates_sent: u64,
    pub perturbations_done: u64,
    /// Requests sat out because of device limits.
    pub rounds_skipped_busy: u64,
    /// Checkpoints adopted.
    pub checkpoints_loaded: u64,
    /// Commits replayed.
    pub commits_applied: u64,
    /// MQTT payload bytes published / received.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The last device reading (telemetry tick), None before the first.
    pub device: Option<DeviceSample>,
}

/// Why the daemon stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent config:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Config(Vec<ConfigProblem>),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot read the MQTT password: {0}")]
    Password(std::io::Error),
    #[error("MQTT TLS: {0}")]
    Tls(#[from] fwdllm_shared::mqtt_tls::TlsError),
    #[error("the gradient source panicked: {0}")]
    SourcePanicked(String),
    #[error("the MQTT client stopped unexpectedly")]
    ClientGone,
    #[error(
        "prometheus.listen {addr}: {source} (fix: choose a free port, or \"\" for no endpoint)"
    )]
    Metrics {
        addr: std::net::SocketAddr,
        #[source]
        source: metrics_exporter_prometheus::BuildError,
    },
}

/// The daemon. Build with [`Agent::new`], observe with [`Agent::watch`], start with [`Agent::run`].
pub struct Agent {
    config: AgentConfig,
    client_id: String,
    topics: Topics,
    source: Box<dyn GradientSource + Send>,
    info: watch::Sender<AgentInfo>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("client_id", &self.client_id)
            .field("source", &self.source.describe())
            .finish()
    }
}

impl Agent {
    /// Checks the config (every problem at once) and prepares the daemon; no I/O yet.
    pub fn new(
        config: AgentConfig,
        source: Box<dyn GradientSource + Send>,
    ) -> Result<Agent, AgentError> {
        let problems = config.validate();
        if !problems.is_empty() {
            return Err(AgentError::Config(problems));
        }
        let client_id = config.client_id();
        let topics = Topics::new(&config.agent.job).map_err(|e| {
            AgentError::Config(vec![ConfigProblem {
                key: "agent.job".into(),
                problem: e.to_string(),
                fix: "use letters, digits, '-', '_' or '.'".into(),
            }])
        })?;
        let info = watch::Sender::new(AgentInfo {
            client_id: client_id.clone(),
            connected: false,
            connections: 0,
            state: AgentState::Offline,
            model_version: 0,
            weights_hash: None,
            last_answered: None,
            updates_sent: 0,
            perturbations_done: 0,
            rounds_skipped_busy: 0,
            checkpoints_loaded: 0,
            commits_applied: 0,
            bytes_sent: 0,
            bytes_received: 0,
            device: None,
        });
        Ok(Agent {
            config,
            client_id,
            topics,
            source,
            info,
        })
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// A live view of the daemon's [`AgentInfo`]; stays readable after `run` returns.
    pub fn watch(&self) -> watch::Receiver<AgentInfo> {
        self.info.subscribe()
    }

    /// Every model version the replica passes through, with its hash, in order (tests and
    /// benches check replay against the aggregator's commits). Needs a tokio runtime: a task
    /// follows [`Agent::watch`] until the agent is dropped.
    pub fn version_trail(&self) -> VersionTrail {
        let trail = VersionTrail::default();
        let (mut rx, seen) = (self.watch(), trail.clone());
        tokio::spawn(async move {
            loop {
                {
                    let i = rx.borrow_and_update();
                    let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                    if s.last().map(|l| l.0) != Some(i.model_version) {
                        s.push((i.model_version, i.weights_hash));
                    }
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        trail
    }

    /// Runs until `shutdown` is cancelled (then: abandons the current perturbation, publishes
    /// "offline", flushes state and disconnects) or a fatal error. Connection loss is not fatal:
    /// the agent reconnects with backoff and resumes its persistent session.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            config,
            client_id,
            topics,
            source,
            info,
        } = self;
        // Validated in `Agent::new`: an address is set exactly when the endpoint is on.
        let _metrics = config
            .prometheus
            .addr()
            .map(|addr| {
                prometheus::MetricsServer::serve(
                    addr,
                    &config.agent.job,
                    &client_id,
                    info.subscribe(),
                )
                .map_err(|source| AgentError::Metrics { addr, source })
            })
            .transpose()?;
        let state_dir = StateDir::open(&config.state_dir())?;
        let mut persisted = state_dir.load_state();
        if persisted.client_id != client_id || persisted.job != config.agent.job {
            if !persisted.client_id.is_empty() {
                info!(
                    "state in {} belongs to {}/{}; starting fresh",
                    state_dir.state_path().display(),
                    persisted.job,
                    persisted.client_id
                );
            }
            persisted = PersistedState {
                client_id: client_id.clone(),
                job: config.agent.job.clone(),
                ..PersistedState::default()
            };
        }
        let replica = persisted
            .weights_hash
            .and_then(|h| state_dir.load_weights(persisted.model_version, &h))
            .map(|w| Replica::with_weights(w, persisted.model_version))
            .unwrap_or_default();
        if replica.weights().is_some() {
            info!(
                "restored replica at version {} from {}",
                replica.version(),
                state_dir.weights_path().display()
            );
        }
        let password = config.password().map_err(AgentError::Password)?;
        let tls = (config.mqtt.tls).client_config(
            "mqtt.tls",
            fwdllm_shared::mqtt_tls::credentials_dir().as_deref(),
        )?;
        let (client, eventloop) = mqtt_client(&config, &client_id, &topics, password, tls);
        let net_stop = CancellationToken::new();
        let (net_tx, net_rx) = mpsc::channel(256);
        let backoff = Backoff::new(
            Duration::from_millis(config.mqtt.backoff_initial_ms),
            Duration::from_millis(config.mqtt.backoff_max_ms),
            config.mqtt.backoff_multiplier,
            config.mqtt.backoff_jitter,
            u64::from(wire::client_index(&client_id)) ^ unix_ms(),
        );
        let net = tokio::spawn(network_loop(eventloop, backoff, net_tx, net_stop.clone()));
        info!(
            "agent {client_id} starting: job {}, broker {}:{}, source {}",
            config.agent.job,
            config.mqtt.host,
            config.mqtt.port,
            source.describe()
        );

        let watchdog = if config.agent.systemd_notify {
            service::Watchdog::from_env()
        } else {
            None
        };
        let mut d = Daemon {
            config,
            client_id,
            topics,
            client,
            info,
            state_dir,
            persisted,
            replica,
            source: Some(source),
            device: DeviceMonitor::new(),
            announce: None,
            running: None,
            checkpoint_subscribed: false,
            sync_since: None,
            last_dev_eval: None,
            busy: None,
            published_state: None,
            ready_sent: false,
            last_telemetry: None,
        };
        d.publish_info();
        let result = d.work_loop(net_rx, &shutdown, watchdog.as_ref()).await;
        d.shutdown().await;
        // Give the network task a bounded time to flush "offline" and DISCONNECT.
        let grace = Duration::from_secs(d.config.mqtt.connect_timeout_s);
        let stopper = net_stop.clone();
        let mut net = net;
        if tokio::time::timeout(grace, &mut net).await.is_err() {
            warn!("broker did not take the DISCONNECT within {grace:?}; closing anyway");
            stopper.cancel();
            let _ = net.await;
        }
        info!("agent {} stopped", d.client_id);
        result
    }
}

/// The work loop's state. Its methods live by concern: `session` (connection, subscriptions,
/// incoming messages, replica sync), `round` (the work loop, computing a request), `publish`
/// (updates, status, telemetry, shutdown).
struct Daemon {
    config: AgentConfig,
    client_id: String,
    topics: Topics,
    client: AsyncClient,
    info: watch::Sender<AgentInfo>,
    state_dir: StateDir,
    persisted: PersistedState,
    replica: Replica,
    /// `None` while a chunk runs on a blocking thread (the source travels with it).
    source: Option<Box<dyn GradientSource + Send>>,
    device: DeviceMonitor,
    /// Latest request not yet answered or dismissed.
    announce: Option<RoundAnnounce>,
    running: Option<round::Running>,
    checkpoint_subscribed: bool,
    /// Since when the replica waits for commits of the pending announcement.
    sync_since: Option<Instant>,
    /// Last version whose dev score this process sent (model selection; a restart may send
    /// one twice, which the aggregator counts once).
    last_dev_eval: Option<u64>,
    /// Current device-limit violation.
    busy: Option<String>,
    published_state: Option<AgentState>,
    ready_sent: bool,
    last_telemetry: Option<Instant>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
