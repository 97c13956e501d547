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
//! 4. One [`ClientUpdate`] (`seq = e`) is published with QoS 1, then `last_answered = (r, e)` is
//!    persisted atomically; a re-delivered announce is therefore never answered twice.
//!
//! Invariants: the replica only changes by replaying aggregator commits or adopting a
//! hash-verified checkpoint (never from gradient-source output); an update is only computed at
//! exactly the announced version and hash; each (round, extend) is answered at most once.

pub mod backoff;
pub mod cli;
pub mod device;
pub mod engine_source;
pub mod gradient;
pub mod replica;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use fwdllm_shared::perturb::derive_seed;
use fwdllm_shared::service;
use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, Checkpoint, ClientUpdate, RoundAnnounce, RoundCommit,
    SeedScalar, Telemetry,
};
use log::{debug, info, warn};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, ConfigProblem};
pub use backoff::Backoff;
pub use device::{DeviceMonitor, DeviceSample};
pub use engine_source::{EngineSource, EngineSourceError};
pub use gradient::{
    GradientBatch, GradientError, GradientRequest, GradientSource, LossStats, SyntheticSource,
};
use replica::{Replica, Sync};
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

fn mqtt_client(
    config: &AgentConfig,
    client_id: &str,
    topics: &Topics,
    password: Option<String>,
    tls: Option<std::sync::Arc<fwdllm_shared::mqtt_tls::ClientConfig>>,
) -> (AsyncClient, EventLoop) {
    let m = &config.mqtt;
    let mut opts = MqttOptions::new(client_id, m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_s));
    // Persistent session: QoS 1 messages (commits, announcements) published while we were away
    // are queued by the broker under our stable client id.
    opts.set_clean_session(false);
    opts.set_max_packet_size(m.max_packet_bytes, m.max_packet_bytes);
    let mut will = AgentStatus::new(client_id, AgentState::Offline);
    will.reason = Some("connection lost (last will)".into());
    will.agent_version = env!("CARGO_PKG_VERSION").into();
    opts.set_last_will(LastWill::new(
        topics.status(client_id),
        wire::encode_json(&will),
        QoS::AtLeastOnce,
        true,
    ));
    if !m.username.is_empty() {
        opts.set_credentials(m.username.clone(), password.unwrap_or_default());
    }
    if let Some(tls) = tls {
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(tls),
        ));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = NetworkOptions::new();
    net.set_connection_timeout(m.connect_timeout_s);
    eventloop.set_network_options(net);
    (client, eventloop)
}

/// What the network task tells the work loop.
#[derive(Debug)]
enum NetEvent {
    Connected { session_present: bool },
    Disconnected(String),
    Message { topic: String, payload: Vec<u8> },
}

/// Drives rumqttc's event loop: forwards messages, reconnects after errors with backoff (rumqttc
/// itself would retry on the very next poll, in a tight loop), ends after our DISCONNECT or
/// when `stop` is cancelled.
async fn network_loop(
    mut eventloop: EventLoop,
    mut backoff: Backoff,
    tx: mpsc::Sender<NetEvent>,
    stop: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            e = eventloop.poll() => e,
        };
        let forward = match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff.reset();
                NetEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => NetEvent::Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(rumqttc::ConnectionError::RequestsDone) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                // The first failure is news; a broker that stays down is noise at info.
                if backoff.attempts() <= 1 {
                    warn!("MQTT connection lost: {e}; reconnecting in {delay:?}");
                } else {
                    debug!(
                        "MQTT reconnect attempt {} failed: {e}; next in {delay:?}",
                        backoff.attempts()
                    );
                }
                // A closed receiver means the work loop is shutting down; keep polling so the
                // final "offline" status and DISCONNECT still go out.
                let _ = tx.send(NetEvent::Disconnected(e.to_string())).await;
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        let _ = tx.send(forward).await;
    }
}

/// A computation in progress for one (round, extend).
struct Running {
    announce: RoundAnnounce,
    k0: u32,
    seeds: Vec<u64>,
    weights: Arc<LoraWeights>,
    pairs: Vec<SeedScalar>,
    samples: u32,
    loss: LossStats,
    chunk: JoinHandle<ChunkOutput>,
    chunk_len: usize,
    chunk_started: Instant,
    /// A newer round was announced: finish the chunk in flight, then drop the work.
    abandoned: bool,
}

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
    running: Option<Running>,
    checkpoint_subscribed: bool,
    /// Since when the replica waits for commits of the pending announcement.
    sync_since: Option<Instant>,
    /// Current device-limit violation.
    busy: Option<String>,
    published_state: Option<AgentState>,
    ready_sent: bool,
    last_telemetry: Option<Instant>,
}

impl Daemon {
    async fn work_loop(
        &mut self,
        mut net_rx: mpsc::Receiver<NetEvent>,
        shutdown: &CancellationToken,
        watchdog: Option<&service::Watchdog>,
    ) -> Result<(), AgentError> {
        let mut period = Duration::from_secs(5);
        if let Some(wd) = watchdog {
            period = period.min(wd.interval().max(Duration::from_millis(100)));
        }
        if self.config.telemetry.interval_s > 0 {
            period = period.min(Duration::from_secs(self.config.telemetry.interval_s));
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Watchdog pings come from this loop, not a timer task: a loop stuck in a handler stops
            // them, and so does a chunk of forward passes that runs longer than the ping interval.
            if let Some(wd) = watchdog {
                let computing_too_long = self
                    .running
                    .as_ref()
                    .is_some_and(|r| r.chunk_started.elapsed() > wd.interval());
                if !computing_too_long {
                    wd.ping();
                }
            }
            let sync_deadline = self
                .sync_since
                .map(|s| tokio::time::Instant::from_std(s + SYNC_GRACE));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                ev = net_rx.recv() => match ev {
                    Some(ev) => self.on_net(ev).await,
                    None => return Err(AgentError::ClientGone),
                },
                done = async { (&mut self.running.as_mut().expect("guarded").chunk).await }, if self.running.is_some() => {
                    self.on_chunk_done(done).await?;
                }
                _ = async { tokio::time::sleep_until(sync_deadline.expect("guarded")).await }, if sync_deadline.is_some() => {
                    if !self.checkpoint_subscribed {
                        info!("commits for the announced version did not arrive within {SYNC_GRACE:?}; fetching the checkpoint");
                        self.request_checkpoint().await;
                    }
                    self.sync_since = None;
                }
                _ = tick.tick() => self.on_tick().await,
            }
            self.try_work().await;
        }
    }

    async fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Connected { session_present } => {
                info!(
                    "connected to {}:{} (session present: {session_present})",
                    self.config.mqtt.host, self.config.mqtt.port
                );
                // Subscribe on every connection: cheap, and it re-delivers the retained round and
                // commit log, which is how a reconnecting agent catches up. The round comes last
                // so that commits usually arrive before the announcement that needs them.
                let mut filters = vec![self.topics.commit(), self.topics.commits_filter()];
                if self.needs_checkpoint() || self.checkpoint_subscribed {
                    filters.push(self.topics.checkpoint());
                    self.checkpoint_subscribed = true;
                }
                filters.push(self.topics.round());
                for f in filters {
                    if let Err(e) = self.client.subscribe(f.clone(), QoS::AtLeastOnce).await {
                        warn!("subscribe {f}: {e}");
                    }
                }
                self.published_state = None;
                self.publish_status().await;
                self.info.send_modify(|i| {
                    i.connected = true;
                    i.connections += 1;
                });
                if !self.ready_sent {
                    self.ready_sent = true;
                    if self.config.agent.systemd_notify {
                        service::notify_ready();
                    }
                }
            }
            NetEvent::Disconnected(reason) => {
                debug!("disconnected: {reason}");
                self.info.send_modify(|i| i.connected = false);
            }
            NetEvent::Message { topic, payload } => {
                self.info
                    .send_modify(|i| i.bytes_received += payload.len() as u64);
                if payload.is_empty() {
                    return; // a retained message being cleared
                }
                match self.topics.parse(&topic) {
                    Some(TopicKind::Round) => match wire::decode::<RoundAnnounce>(&payload) {
                        Ok(a) => self.on_announce(a),
                        Err(e) => warn!("ignoring bad announcement on {topic}: {e}"),
                    },
                    Some(TopicKind::Commit) | Some(TopicKind::CommitLog(_)) => {
                        match wire::decode::<RoundCommit>(&payload) {
                            Ok(c) => self.on_commit(c),
                            Err(e) => warn!("ignoring bad commit on {topic}: {e}"),
                        }
                    }
                    Some(TopicKind::Checkpoint) => match wire::decode::<Checkpoint>(&payload) {
                        Ok(cp) => self.on_checkpoint(cp).await,
                        Err(e) => warn!("ignoring bad checkpoint on {topic}: {e}"),
                    },
                    _ => debug!("ignoring message on {topic}"),
                }
            }
        }
    }

    fn needs_checkpoint(&self) -> bool {
        self.replica.weights().is_none() || self.replica.diverged()
    }

    fn on_announce(&mut self, a: RoundAnnounce) {
        if a.job != self.config.agent.job {
            warn!(
                "ignoring announcement for job {:?} on the topic of job {:?}",
                a.job, self.config.agent.job
            );
            return;
        }
        debug!(
            "announcement: round {} extend {} at version {} ({} perturbations)",
            a.round, a.extend, a.model_version, a.perturbations_per_client
        );
        if let Some(r) = &mut self.running {
            if r.announce.round != a.round && !r.abandoned {
                info!(
                    "round {} superseded by round {}; abandoning its perturbations",
                    r.announce.round, a.round
                );
                r.abandoned = true;
            }
        }
        if self.answered(&a) {
            debug!("round {} extend {} already answered", a.round, a.extend);
            return;
        }
        self.sync_since = None;
        self.announce = Some(a);
    }

    fn answered(&self, a: &RoundAnnounce) -> bool {
        self.persisted
            .last_answered
            .is_some_and(|last| (a.round, a.extend) <= last)
    }

    fn on_commit(&mut self, c: RoundCommit) {
        let applied = self.replica.on_commit(c);
        if applied > 0 {
            self.replica_changed(applied as u64, 0);
        }
    }

    async fn on_checkpoint(&mut self, cp: Checkpoint) {
        match self.replica.on_checkpoint(&cp) {
            Ok(Some(replayed)) => {
                info!(
                    "adopted checkpoint at version {} (replica now at version {})",
                    cp.model_version,
                    self.replica.version()
                );
                self.replica_changed(replayed as u64, 1);
                if self.checkpoint_subscribed && !self.needs_checkpoint() {
                    // Later checkpoints are only needed on the next divergence; don't download them.
                    if let Err(e) = self.client.unsubscribe(self.topics.checkpoint()).await {
                        warn!("unsubscribe checkpoint: {e}");
                    }
                    self.checkpoint_subscribed = false;
                }
            }
            Ok(None) => debug!(
                "checkpoint at version {} not needed (replica at {})",
                cp.model_version,
                self.replica.version()
            ),
            Err(e) => warn!("rejecting checkpoint at version {}: {e}", cp.model_version),
        }
    }

    /// Persists and publishes a changed replica.
    fn replica_changed(&mut self, commits: u64, checkpoints: u64) {
        let (version, hash) = (self.replica.version(), self.replica.hash());
        if let Some(w) = self.replica.weights() {
            if !self.replica.diverged() {
                if let Err(e) = self.state_dir.save_weights(version, w) {
                    warn!("{e}");
                }
                self.persisted.model_version = version;
                self.persisted.weights_hash = hash;
                self.save_state();
            }
        }
        self.info.send_modify(|i| {
            i.model_version = version;
            i.weights_hash = hash;
            i.commits_applied += commits;
            i.checkpoints_loaded += checkpoints;
        });
    }

    fn save_state(&self) {
        if let Err(e) = self.state_dir.save_state(&self.persisted) {
            warn!("{e}");
        }
    }

    async fn request_checkpoint(&mut self) {
        if self.checkpoint_subscribed {
            return;
        }
        // Subscribing delivers the retained checkpoint.
        match self
            .client
            .subscribe(self.topics.checkpoint(), QoS::AtLeastOnce)
            .await
        {
            Ok(()) => self.checkpoint_subscribed = true,
            Err(e) => warn!("subscribe checkpoint: {e}"),
        }
    }

    /// Starts work on the pending announcement when everything is in place.
    async fn try_work(&mut self) {
        if self.running.is_some() || self.source.is_none() {
            return;
        }
        let Some(a) = self.announce.clone() else {
            return;
        };
        if self.answered(&a) {
            self.announce = None;
            return;
        }
        if !a.selection.includes(&self.client_id, a.round) {
            debug!("round {}: not selected", a.round);
            self.announce = None;
            return;
        }
        if a.deadline_unix_ms != 0 && unix_ms() > a.deadline_unix_ms {
            info!(
                "round {} extend {}: deadline passed before we could start; skipping",
                a.round, a.extend
            );
            self.announce = None;
            return;
        }
        let sample = self.device.sample();
        self.update_busy(&sample).await;
        if let Some(reason) = self.busy.clone() {
            info!(round = a.round; "round {}: busy ({reason}); sitting it out", a.round);
            self.announce = None;
            self.info.send_modify(|i| i.rounds_skipped_busy += 1);
            return;
        }
        match self.replica.sync_to(a.model_version, &a.weights_hash) {
            Sync::Ready => {}
            Sync::MissingCommits { have, want } => {
                if self.sync_since.is_none() {
                    debug!(
                        "round {}: replica at {have}, waiting for commits up to {want}",
                        a.round
                    );
                    self.sync_since = Some(Instant::now());
                    self.set_state(AgentState::Syncing).await;
                }
                return;
            }
            Sync::NeedCheckpoint(why) => {
                if !self.checkpoint_subscribed {
                    info!("round {}: {why}; fetching the checkpoint", a.round);
                    self.set_state(AgentState::Syncing).await;
                    self.request_checkpoint().await;
                }
                return;
            }
        }
        self.sync_since = None;
        self.announce = None;
        let k0 = match self.persisted.next_k {
            Some((round, k)) if round == a.round => k,
            _ => 0,
        };
        if a.perturbations_per_client == 0 {
            self.mark_answered(&a, k0);
            return;
        }
        let index = wire::client_index(&self.client_id);
        let c = self.config.gradient.discriminative_candidates.max(1);
        // Discriminative sampling: candidates k·c .. k·c+c-1, keep the one best aligned with
        // the commit that produced this version (rebuilt from its (seed, coeff) pairs). With
        // c = 1 the single candidate is seed k itself and no direction is built.
        let layout = self
            .replica
            .weights()
            .expect("synced replica has weights")
            .layout()
            .clone();
        let previous = (c > 1)
            .then(|| self.replica.last_commit())
            .flatten()
            .map(|pairs| {
                let mut d = vec![0f32; layout.trainable_len()];
                for p in pairs {
                    fwdllm_shared::update::accumulate_direction(&layout, p.seed, p.coeff, &mut d);
                }
                d
            });
        let mut scratch = Vec::new();
        let seeds = request_seeds(&a, index, k0, c, &layout, previous.as_deref(), &mut scratch);
        let weights = Arc::new(
            self.replica
                .weights()
                .expect("synced replica has weights")
                .clone(),
        );
        let source = self.source.take().expect("checked above");
        let chunk_len = (self.config.gradient.seeds_per_chunk as usize).min(seeds.len());
        let chunk = spawn_chunk(source, weights.clone(), seeds[..chunk_len].to_vec(), &a);
        debug!(
            "round {} extend {}: computing {} perturbations from k = {k0}",
            a.round,
            a.extend,
            seeds.len()
        );
        if self.config.agent.systemd_notify {
            service::notify_status(&format!(
                "round {} extend {}: computing {} perturbations",
                a.round,
                a.extend,
                seeds.len()
            ));
        }
        self.running = Some(Running {
            announce: a,
            k0,
            seeds,
            weights,
            pairs: Vec::new(),
            samples: 0,
            loss: LossStats::default(),
            chunk,
            chunk_len,
            chunk_started: Instant::now(),
            abandoned: false,
        });
        self.set_state(AgentState::Online).await;
    }

    async fn on_chunk_done(&mut self, done: ChunkResult) -> Result<(), AgentError> {
        let (source, result) = done.map_err(|e| AgentError::SourcePanicked(e.to_string()))?;
        self.source = Some(source);
        let mut run = self.running.take().expect("a chunk was running");
        if run.abandoned {
            return Ok(());
        }
        let batch = match result {
            Ok(b) if b.g.len() == run.chunk_len => b,
            Ok(b) => {
                warn!(
                    "round {}: {}",
                    run.announce.round,
                    GradientError::Count {
                        want: run.chunk_len,
                        got: b.g.len()
                    }
                );
                return Ok(());
            }
            Err(e) => {
                warn!(
                    "round {} extend {}: gradient source failed: {e}; skipping this request",
                    run.announce.round, run.announce.extend
                );
                return Ok(());
            }
        };
        let start = run.pairs.len();
        run.pairs.extend(
            run.seeds[start..start + run.chunk_len]
                .iter()
                .zip(&batch.g)
                .map(|(&seed, &g)| SeedScalar { seed, g }),
        );
        run.samples = run.samples.saturating_add(batch.samples);
        run.loss.merge(&batch.loss);
        self.info
            .send_modify(|i| i.perturbations_done += run.chunk_len as u64);
        let done_n = run.pairs.len();
        if done_n < run.seeds.len() {
            let n = (self.config.gradient.seeds_per_chunk as usize).min(run.seeds.len() - done_n);
            let source = self.source.take().expect("just returned");
            run.chunk = spawn_chunk(
                source,
                run.weights.clone(),
                run.seeds[done_n..done_n + n].to_vec(),
                &run.announce,
            );
            run.chunk_len = n;
            run.chunk_started = Instant::now();
            self.running = Some(run);
            return Ok(());
        }
        self.publish_update(run).await;
        Ok(())
    }

    async fn publish_update(&mut self, run: Running) {
        let a = &run.announce;
        let n = run.pairs.len() as u32;
        let update = ClientUpdate {
            client_id: self.client_id.clone(),
            round: a.round,
            base_version: a.model_version,
            seq: a.extend,
            pairs: run.pairs,
            samples: run.samples,
            loss_mean: run.loss.mean as f32,
            loss_m2: run.loss.m2 as f32,
        };
        let bytes = wire::encode(&update);
        let len = bytes.len() as u64;
        if let Err(e) = self
            .client
            .publish(
                self.topics.update(&self.client_id),
                QoS::AtLeastOnce,
                false,
                bytes,
            )
            .await
        {
            warn!("round {}: publishing the update failed: {e}", a.round);
            return;
        }
        info!(
            round = a.round, extend = a.extend, version = a.model_version;
            "round {} extend {}: sent {n} perturbations at version {} (loss {:.4}, {len} bytes)",
            a.round, a.extend, a.model_version, update.loss_mean
        );
        if self.config.agent.systemd_notify {
            service::notify_status(&format!(
                "round {} extend {}: sent {n} perturbations",
                a.round, a.extend
            ));
        }
        self.info.send_modify(|i| {
            i.bytes_sent += len;
            i.updates_sent += 1;
        });
        self.mark_answered(a, run.k0 + n);
    }

    fn mark_answered(&mut self, a: &RoundAnnounce, next_k: u32) {
        self.persisted.last_answered = Some((a.round, a.extend));
        self.persisted.next_k = Some((a.round, next_k));
        self.persisted.updates_sent += 1;
        self.save_state();
        self.info
            .send_modify(|i| i.last_answered = Some((a.round, a.extend)));
    }

    async fn on_tick(&mut self) {
        let every = self.config.telemetry.interval_s;
        if every == 0
            || self
                .last_telemetry
                .is_some_and(|t| t.elapsed() < Duration::from_secs(every))
        {
            return;
        }
        self.last_telemetry = Some(Instant::now());
        let s = self.device.sample();
        self.update_busy(&s).await;
        let i = self.info.borrow().clone();
        let t = Telemetry {
            client_id: self.client_id.clone(),
            unix_ms: unix_ms(),
            cpu_percent: s.cpu_percent,
            mem_used_bytes: s.mem_used_bytes,
            mem_total_bytes: s.mem_total_bytes,
            mem_available_bytes: s.mem_available_bytes,
            temperature_c: s.temperature_c,
            load_avg_1m: s.load_avg_1m,
            model_version: self.replica.version(),
            rounds_done: i.updates_sent,
            perturbations_done: i.perturbations_done,
            bytes_sent: i.bytes_sent,
            bytes_received: i.bytes_received,
            ..Telemetry::default()
        };
        let bytes = wire::encode_json(&t);
        let len = bytes.len() as u64;
        // QoS 0 and try_publish: telemetry is dropped, never queued, when the link is down.
        if self
            .client
            .try_publish(
                self.topics.telemetry(&self.client_id),
                QoS::AtMostOnce,
                false,
                bytes,
            )
            .is_ok()
        {
            self.info.send_modify(|i| i.bytes_sent += len);
        }
    }

    /// Re-evaluates the device limits; publishes busy/online when that changes.
    async fn update_busy(&mut self, sample: &DeviceSample) {
        let busy = device::busy_reason(sample, &self.config.limits);
        if busy != self.busy {
            match &busy {
                Some(r) => info!("device limits exceeded: {r}; reporting busy"),
                None => info!("device back within limits; reporting online"),
            }
            self.busy = busy;
            self.publish_status().await;
        }
    }

    async fn set_state(&mut self, state: AgentState) {
        if self.published_state != Some(state) {
            self.publish_status_as(state).await;
        }
    }

    /// Publishes online/busy per the device limits.
    async fn publish_status(&mut self) {
        let state = if self.busy.is_some() {
            AgentState::Busy
        } else {
            AgentState::Online
        };
        self.publish_status_as(state).await;
    }

    async fn publish_status_as(&mut self, state: AgentState) {
        let mut s = AgentStatus::new(self.client_id.clone(), state);
        s.model_version = self.replica.version();
        s.weights_hash = self.replica.hash();
        s.reason = if state == AgentState::Busy {
            self.busy.clone()
        } else {
            None
        };
        s.unix_ms = unix_ms();
        s.agent_version = env!("CARGO_PKG_VERSION").into();
        let bytes = wire::encode_json(&s);
        let len = bytes.len() as u64;
        match self
            .client
            .publish(
                self.topics.status(&self.client_id),
                QoS::AtLeastOnce,
                true,
                bytes,
            )
            .await
        {
            Ok(()) => {
                self.published_state = Some(state);
                self.info.send_modify(|i| {
                    i.state = state;
                    i.bytes_sent += len;
                });
            }
            Err(e) => warn!("publishing status: {e}"),
        }
    }

    fn publish_info(&self) {
        let (v, h) = (self.replica.version(), self.replica.hash());
        let last = self.persisted.last_answered;
        self.info.send_modify(|i| {
            i.model_version = v;
            i.weights_hash = h;
            i.last_answered = last;
        });
    }

    /// Graceful stop: abandon work, publish offline, flush state, DISCONNECT.
    async fn shutdown(&mut self) {
        if self.config.agent.systemd_notify {
            service::notify_stopping();
        }
        if let Some(r) = self.running.take() {
            // The chunk in flight finishes on its blocking thread and is discarded; nothing of it
            // was published or persisted.
            info!(
                "shutting down: abandoning round {} extend {}",
                r.announce.round, r.announce.extend
            );
        }
        self.publish_status_as(AgentState::Offline).await;
        self.save_state();
        if let Err(e) = self.client.disconnect().await {
            debug!("disconnect: {e}");
        }
        self.info.send_modify(|i| i.connected = false);
    }
}

/// A chunk hands the source back with its result (the source moves to the blocking thread).
type ChunkOutput = (
    Box<dyn GradientSource + Send>,
    Result<GradientBatch, GradientError>,
);
type ChunkResult = Result<ChunkOutput, tokio::task::JoinError>;

fn spawn_chunk(
    mut source: Box<dyn GradientSource + Send>,
    weights: Arc<LoraWeights>,
    seeds: Vec<u64>,
    a: &RoundAnnounce,
) -> JoinHandle<ChunkOutput> {
    let (eps, task, round) = (a.eps, a.task.clone(), a.round);
    tokio::task::spawn_blocking(move || {
        let result = source.forward_gradients(&GradientRequest {
            weights: &weights,
            seeds: &seeds,
            eps,
            task: &task,
            round,
        });
        (source, result)
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Raw-seed index bit that separates head-block seeds from adapter seeds in
/// `derive_seed(seed_base, round, client, index)`.
const HEAD_SEED_INDEX: u32 = 1 << 31;

/// Head-block directions per adapter direction an announcement asks for (its
/// `task.extra["head_per_direction"]`; 0 when absent, capped so a bad value cannot stall an
/// agent).
pub fn head_per_direction(a: &wire::RoundAnnounce) -> u32 {
    a.task
        .extra
        .iter()
        .find(|(k, _)| k == "head_per_direction")
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(0)
        .min(1024)
}

/// The seeds of one request, in order: for each k in `k0..k0 + perturbations_per_client`, the
/// adapter (or dense) direction k, then, for a block-wise layout, its `head_per_direction`
/// head-block directions. Each is the most aligned of `c` candidates
/// `derive_seed(seed_base, round, client, i·c + j)` (head direction `k·R + r` with
/// `HEAD_SEED_INDEX` set in the index), moved into its block.
fn request_seeds(
    a: &wire::RoundAnnounce,
    client_index: u32,
    k0: u32,
    c: u32,
    layout: &fwdllm_shared::lora::LoraLayout,
    previous: Option<&[f32]>,
    scratch: &mut Vec<f32>,
) -> Vec<u64> {
    use fwdllm_shared::lora::DirectionBlock;
    let blockwise = layout.config().blockwise;
    let r = if blockwise { head_per_direction(a) } else { 0 };
    let pick = |index: u32, block: DirectionBlock, scratch: &mut Vec<f32>| {
        let raw = (0..c).map(|j| {
            let mut i = index.wrapping_mul(c).wrapping_add(j);
            if block == DirectionBlock::Head {
                i |= HEAD_SEED_INDEX;
            }
            derive_seed(a.seed_base, a.round, client_index, i)
        });
        crate::engine::train::aligned_seed_in_block(layout, block, raw, previous, scratch)
    };
    let mut seeds = Vec::new();
    for k in k0..k0.saturating_add(a.perturbations_per_client) {
        let block = if blockwise {
            DirectionBlock::Adapter
        } else {
            DirectionBlock::All
        };
        seeds.push(pick(k, block, scratch));
        for i in 0..r {
            seeds.push(pick(
                k.wrapping_mul(r).wrapping_add(i),
                DirectionBlock::Head,
                scratch,
            ));
        }
    }
    seeds
}

#[cfg(test)]
mod request_seed_tests {
    use super::*;
    use fwdllm_shared::lora::{DirectionBlock, LoraConfig, LoraLayout, ModelShape};

    fn announce(head: Option<&str>) -> wire::RoundAnnounce {
        let mut task = wire::TaskParams::default();
        if let Some(h) = head {
            task.extra.push(("head_per_direction".into(), h.into()));
        }
        wire::RoundAnnounce {
            job: "j".into(),
            round: 3,
            model_version: 0,
            weights_hash: fwdllm_shared::WeightsHash([0; 32]),
            perturbations_per_client: 2,
            eps: 1e-2,
            deadline_unix_ms: 0,
            selection: wire::ClientSelection::All,
            task,
            seed_base: 7,
            extend: 0,
        }
    }

    fn layout(blockwise: bool) -> LoraLayout {
        let config = LoraConfig {
            layers: Some((28, 30)),
            head_rows: 4,
            blockwise,
            ..LoraConfig::default()
        };
        LoraLayout::new(&ModelShape::smollm2_135m(), &config).unwrap()
    }

    #[test]
    fn blockwise_requests_interleave_head_directions_and_stay_deterministic() {
        let l = layout(true);
        let mut scratch = Vec::new();
        let a = announce(Some("3"));
        let seeds = request_seeds(&a, 5, 0, 1, &l, None, &mut scratch);
        assert_eq!(seeds.len(), 2 * (1 + 3));
        let blocks: Vec<DirectionBlock> = seeds.iter().map(|&s| l.block_of(s)).collect();
        use DirectionBlock::{Adapter as A, Head as H};
        assert_eq!(blocks, [A, H, H, H, A, H, H, H]);
        let mut unique = seeds.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seeds.len());
        assert_eq!(seeds, request_seeds(&a, 5, 0, 1, &l, None, &mut scratch));
        // An extend continues at k0 with new seeds.
        let more = request_seeds(&a, 5, 2, 1, &l, None, &mut scratch);
        assert!(more.iter().all(|s| !seeds.contains(s)));
        // A dense layout ignores head_per_direction; a missing or bad value means 0.
        assert_eq!(
            request_seeds(&a, 5, 0, 1, &layout(false), None, &mut scratch).len(),
            2
        );
        assert_eq!(head_per_direction(&announce(None)), 0);
        assert_eq!(head_per_direction(&announce(Some("lots"))), 0);
        assert_eq!(head_per_direction(&announce(Some("99999"))), 1024);
    }
}
