//! MQTT driver: connects the [`Coordinator`] to a broker with rumqttc.
//!
//! Connection: fixed client id, persistent session (clean_session = false) so QoS 1 updates
//! published while the aggregator restarts are queued by the broker; manual acks, sent only after
//! the state that consumed an update is on disk; last will "offline" on the aggregator topic;
//! reconnect with capped exponential backoff plus jitter (rumqttc has none of its own).
//!
//! Incoming publishes are forwarded from the event-loop task to the coordinator task, which
//! handles them in groups (group commit, `state.group_commit_max_updates` /
//! `state.group_commit_max_ms`): one fsync for the whole group (a journal append, or a state
//! snapshot after a round event), then the group's acks and whatever the group produced.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fwdllm_shared::topics::TopicKind;
use fwdllm_shared::wire::{self, AgentState, AgentStatus};
use log::{debug, info, warn};
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, Publish, QoS};
use thiserror::Error;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::config::AggregatorConfig;
/// Where [`run`] connects (one of the connection helpers all the aggregator's clients share).
pub use crate::connection::BrokerTarget;
use crate::connection::{no_delay, reconnect_wait};
use crate::coordinator::{AggEvent, Coordinator, Outgoing};
use crate::ingest_workers::{Handoff, IngestError, Workers};
use crate::metrics::MetricsSink;
use crate::prometheus::Prometheus;
use crate::state::StateError;

#[derive(Debug, Error)]
pub enum ServerError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("MQTT client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("metrics output: {0}")]
    Metrics(#[from] std::io::Error),
    #[error("broker security settings: {0}")]
    Security(#[from] crate::security::SecurityError),
    #[error(transparent)]
    Prometheus(#[from] crate::prometheus::PrometheusError),
}

impl From<IngestError> for ServerError {
    fn from(e: IngestError) -> ServerError {
        match e {
            IngestError::State(e) => ServerError::State(e),
            IngestError::Security(e) => ServerError::Security(e),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a finished run reports.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub version: u64,
    pub rounds: u64,
    pub updates: u64,
    pub perturbations: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub rejected: u64,
    /// Time spent handling incoming updates (decode, pool, persist), one task = one core.
    pub ingest_busy_s: f64,
    pub ingest_updates: u64,
    /// Fsync'd writes: state snapshots and group-committed journal appends.
    pub durable_writes: crate::coordinator::DurableWrites,
}

impl RunSummary {
    /// Updates handled per second of the coordinator task's busy time.
    pub fn ingest_updates_per_s(&self) -> f64 {
        if self.ingest_busy_s > 0.0 {
            self.ingest_updates as f64 / self.ingest_busy_s
        } else {
            0.0
        }
    }
}

pub(crate) enum Incoming {
    Connected {
        session_present: bool,
    },
    Publish(Publish),
    /// A publish an ingest worker (active or retiring, `crate::ingest_workers`) received and
    /// decoded.
    Shared(Handoff),
}

impl From<Handoff> for Incoming {
    fn from(h: Handoff) -> Incoming {
        Incoming::Shared(h)
    }
}

pub fn mqtt_options(
    cfg: &AggregatorConfig,
    target: &BrokerTarget,
    topics: &fwdllm_shared::topics::Topics,
) -> MqttOptions {
    let mut o = MqttOptions::new(
        cfg.broker.client_id.clone(),
        target.host.clone(),
        target.port,
    );
    o.set_keep_alive(Duration::from_secs(cfg.broker.keep_alive_s));
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_max_packet_size(cfg.broker.max_packet_bytes, cfg.broker.max_packet_bytes);
    o.set_inflight(100);
    let mut will = AgentStatus::new(cfg.broker.client_id.clone(), AgentState::Offline);
    will.reason = Some("connection lost".into());
    o.set_last_will(LastWill::new(
        topics.aggregator(),
        wire::encode_json(&will),
        QoS::AtLeastOnce,
        true,
    ));
    o
}

/// Event-loop task: forwards publishes and connection events; reconnects with backoff + jitter.
async fn pump(mut el: EventLoop, tx: mpsc::UnboundedSender<Incoming>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                if tx
                    .send(Incoming::Connected {
                        session_present: ack.session_present,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(Incoming::Publish(p)).is_err() {
                    return;
                }
            }
            // Our own DISCONNECT went out: the run is over.
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                let wait = reconnect_wait(&mut backoff);
                warn!("aggregator MQTT connection: {e}; reconnecting in {wait:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn send_all(client: &AsyncClient, out: Vec<Outgoing>) -> Result<(), rumqttc::ClientError> {
    for o in out {
        let qos = if o.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        client.publish(o.topic, qos, o.retain, o.payload).await?;
    }
    Ok(())
}

/// Hooks for embedding the aggregator (demo, tests, simulations, the chaos bench).
#[derive(Default)]
pub struct Hooks {
    /// Receives every [`AggEvent`] once what produced it is on disk and its publications went
    /// out (an observer's view).
    pub events: Option<broadcast::Sender<AggEvent>>,
    /// Called with every [`AggEvent`] right after the state that produced it is on disk and
    /// *before* the updates it consumed are acknowledged to the broker: a record written here
    /// survives any later crash, so every acknowledged update has its outcome recorded (the
    /// chaos bench's ledger, `fwdllm_bench::chaos` in `tests/bench`).
    pub on_event: Option<OnEvent>,
    /// Called with each commit's version and weights; may return a held-out (accuracy, loss)
    /// evaluation, recorded with the next commit's metrics.
    pub on_commit: Option<OnCommit>,
}

/// The event hook of [`Hooks`].
pub type OnEvent = Box<dyn FnMut(&AggEvent) + Send>;

/// The commit hook of [`Hooks`].
pub type OnCommit =
    Box<dyn FnMut(u64, &fwdllm_shared::lora::LoraWeights) -> Option<(f64, f64)> + Send>;

/// [`Hooks::on_event`] for each event (before the acks of the batch that produced them).
fn record(hooks: &mut Hooks, events: &[AggEvent]) {
    if let Some(f) = hooks.on_event.as_mut() {
        for e in events {
            f(e);
        }
    }
}

/// [`Hooks::events`] for each event (after the batch's publications).
fn emit(hooks: &Hooks, events: Vec<AggEvent>) {
    if let Some(tx) = &hooks.events {
        for e in events {
            let _ = tx.send(e);
        }
    }
}

/// A token cancelled on SIGTERM (systemd's stop) or SIGINT (Ctrl-C): the `shutdown` of
/// [`run`] for a process that runs one aggregator. Needs a tokio runtime.
pub fn shutdown_on_signals() -> CancellationToken {
    let stop = CancellationToken::new();
    let s2 = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        s2.cancel();
    });
    stop
}

/// Runs the aggregator until `shutdown` is cancelled or `job.max_commits` is reached.
pub async fn run(
    cfg: AggregatorConfig,
    target: BrokerTarget,
    shutdown: CancellationToken,
    mut hooks: Hooks,
) -> Result<RunSummary, ServerError> {
    let mut coord = Coordinator::open(cfg.clone())?;
    let topics = coord.topics().clone();
    let mut sink = MetricsSink::open(&cfg.state.dir)?;
    let mut prom = match cfg.prometheus.addr() {
        Some(addr) => Some(Prometheus::serve(addr, &cfg.job.name)?),
        None => None,
    };
    if let Some(p) = prom.as_mut() {
        p.observe(&coord, &[], Instant::now());
    }
    let mut opts = mqtt_options(&cfg, &target, &topics);
    crate::security::apply(&cfg.broker, &mut opts)?;
    let (client, mut el) = AsyncClient::new(opts, 4096);
    // No Nagle: commits, announcements and acks are small writes whose latency paces rounds.
    no_delay(&mut el);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    // Dropping this future (task abort = "kill") must also end the event loop, or a zombie
    // connection would fight a restarted aggregator over the client id.
    let _stop_on_drop = stop.clone().drop_guard();
    // With ingest workers the updates come through their connections (a shared
    // subscription), everything else through this one; retiring workers hand over what their
    // sessions still hold (`ingest_workers`).
    let workers = Workers::start(&cfg, &target, &topics, tx.clone())?;
    let pump_task = tokio::spawn(pump(el, tx, stop.clone()));
    let resumed = AggEvent::Resumed {
        version: coord.version(),
        hash: coord.weights().hash(),
        round: coord.round(),
    };
    record(&mut hooks, std::slice::from_ref(&resumed));
    emit(&hooks, vec![resumed]);
    let mut summary = RunSummary::default();
    let mut busy = Duration::ZERO;
    let mut commits_since_plot = 0u64;
    let group_max = cfg.state.group_commit_max_updates.max(1) as usize;
    let group_window = Duration::from_millis(cfg.state.group_commit_max_ms);
    // systemd: READY after the first broker connection; the watchdog is pinged from this loop
    // (which wakes at least once a second), so a hung round loop gets the service restarted.
    let watchdog = fwdllm_shared::service::Watchdog::from_env();
    let mut ready_sent = false;
    let result: Result<(), ServerError> = async {
        loop {
            if coord.finished() {
                break;
            }
            let wake = coord
                .next_deadline_ms()
                .map(|d| d.saturating_sub(now_ms()).clamp(1, 1000))
                .unwrap_or(1000);
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = rx.recv() => match m { Some(m) => Some(m), None => break },
                _ = tokio::time::sleep(Duration::from_millis(wake)) => None,
            };
            let started = Instant::now();
            let mut acks = Vec::new();
            let mut shared_acks = Vec::new();
            let mut n_updates = 0u64;
            let mut n_msgs = 0usize;
            let mut next = first;
            // Group commit: handle messages as they come until the group is full, its time is
            // up, or nothing more is waiting; then one persist (one fsync) makes the whole
            // group durable, and only then are its messages acknowledged.
            while let Some(m) = next.take() {
                let now = now_ms();
                match m {
                    Incoming::Connected { session_present } => {
                        info!(
                            "aggregator connected to {}:{} (session present: {session_present})",
                            target.host, target.port
                        );
                        if cfg.ingest.workers <= 1 {
                            client
                                .subscribe(topics.updates_filter(), QoS::AtLeastOnce)
                                .await?;
                        } else {
                            // A session left by a run with one ingest connection would still
                            // receive every update besides the workers' shares.
                            client.unsubscribe(topics.updates_filter()).await?;
                        }
                        // QoS 0 on purpose: statuses are retained last-known state (a lost one
                        // is superseded by the next, and a reconnect re-delivers them all), and
                        // rumqttd 0.20 hands a QoS 1 subscriber at most its free in-flight slots
                        // (100) of the retained messages and drops the rest (routing.rs,
                        // "drop the excess ones"): with more than 100 boards the aggregator would
                        // never learn of some of them.
                        // A re-subscription must re-send the retained statuses (MQTT 3.1.1
                        // §3.8.4), but rumqttd 0.20 sends retained messages only for a filter new
                        // to the session (routing.rs, `prepare_filter`): a restarted aggregator
                        // on its persistent session then never learnt which boards are online
                        // and opened no round again (found by the chaos bench). Dropping the
                        // filter makes it new; rumqttd ignores an UNSUBSCRIBE of a restored
                        // session's filter until it was subscribed on this connection, hence
                        // subscribe, unsubscribe, subscribe. Statuses are retained: none is
                        // missed, and one delivered twice is harmless.
                        if session_present {
                            client
                                .subscribe(topics.status_filter(), QoS::AtMostOnce)
                                .await?;
                            client.unsubscribe(topics.status_filter()).await?;
                        }
                        client
                            .subscribe(topics.status_filter(), QoS::AtMostOnce)
                            .await?;
                        if cfg.selection.eval_every > 0 {
                            client
                                .subscribe(topics.evals_filter(), QoS::AtLeastOnce)
                                .await?;
                        }
                        coord.republish_retained(now);
                        if !ready_sent {
                            fwdllm_shared::service::notify_ready();
                            ready_sent = true;
                        }
                    }
                    Incoming::Publish(p) => {
                        let topic = p.topic.clone();
                        match topics.parse(&topic) {
                            Some(TopicKind::Update(id)) => {
                                n_updates += 1;
                                let o = coord.on_update(&id, &p.payload, now);
                                debug!("update from {id}: {o:?}");
                            }
                            Some(TopicKind::Status(id)) => coord.on_status(&id, &p.payload, now),
                            Some(TopicKind::Eval(id)) => coord.on_eval(&id, &p.payload),
                            _ => debug!("ignoring publish on {topic}"),
                        }
                        acks.push(p);
                    }
                    Incoming::Shared(h) => {
                        if let Some((id, decoded)) = h.update {
                            n_updates += 1;
                            let o = coord.on_decoded_update(&id, &h.publish.payload, decoded, now);
                            debug!("update from {id} (worker {}): {o:?}", h.worker);
                        }
                        shared_acks.push((h.worker, h.publish));
                    }
                }
                n_msgs += 1;
                if n_msgs < group_max && started.elapsed() < group_window {
                    next = rx.try_recv().ok();
                }
            }
            let now = now_ms();
            coord.tick(now);
            // Write-ahead: state on disk before anything derived from it leaves the process.
            coord.persist()?;
            let events = coord.take_events();
            record(&mut hooks, &events);
            for p in &acks {
                if p.qos != QoS::AtMostOnce {
                    client.ack(p).await?;
                }
            }
            if let Some(w) = &workers {
                for (i, p) in &shared_acks {
                    if p.qos != QoS::AtMostOnce {
                        w.ack(*i, p).await?;
                    }
                }
            }
            if n_updates > 0 {
                busy += started.elapsed();
                summary.ingest_updates += n_updates;
            }
            let records = coord.take_records();
            let committed = records.iter().any(|r| r.phase == "committed");
            if committed {
                if let Some(f) = hooks.on_commit.as_mut() {
                    if let Some((acc, loss)) = f(coord.version(), coord.weights()) {
                        coord.set_eval(acc, loss);
                        if let Some(p) = &prom {
                            p.set_eval(acc, loss);
                        }
                    }
                }
            }
            // After persist: the counters show only durable updates.
            if let Some(p) = prom.as_mut() {
                p.observe(&coord, &records, Instant::now());
            }
            for r in &records {
                sink.record(r)?;
                if r.phase == "committed" {
                    commits_since_plot += 1;
                }
            }
            if cfg.state.plot_every > 0 && commits_since_plot >= cfg.state.plot_every {
                commits_since_plot = 0;
                sink.plot();
            }
            send_all(&client, coord.take_outgoing()).await?;
            emit(&hooks, events);
            if let Some(w) = &watchdog {
                w.ping();
            }
        }
        Ok(())
    }
    .await;
    fwdllm_shared::service::notify_stopping();
    // Final state, plot and a graceful "offline".
    if let Err(e) = coord.close_selection() {
        warn!("scoring the last dev evaluations: {e}; export falls back to the last version");
    }
    coord.persist()?;
    let events = coord.take_events();
    record(&mut hooks, &events);
    sink.plot();
    let mut st = AgentStatus::new(cfg.broker.client_id.clone(), AgentState::Offline);
    st.model_version = coord.version();
    st.reason = Some(
        if coord.finished() {
            "finished"
        } else {
            "stopped"
        }
        .into(),
    );
    let _ = client
        .publish(
            topics.aggregator(),
            QoS::AtLeastOnce,
            true,
            wire::encode_json(&st),
        )
        .await;
    let _ = send_all(&client, coord.take_outgoing()).await;
    emit(&hooks, events);
    let _ = client.disconnect().await;
    // Let the event loop flush the disconnect before stopping it.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !pump_task.is_finished() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    stop.cancel();
    let _ = pump_task.await;
    if let Some(w) = workers {
        w.shutdown().await;
    }
    let c = coord.counters();
    summary.version = coord.version();
    summary.rounds = coord.round();
    summary.updates = c.updates;
    summary.perturbations = c.perturbations;
    summary.duplicates = c.duplicates;
    summary.stale = c.stale;
    summary.rejected = c.rejected;
    summary.ingest_busy_s = busy.as_secs_f64();
    summary.durable_writes = coord.durable_writes();
    result?;
    Ok(summary)
}
