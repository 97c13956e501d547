//! The MQTT session: client options (persistent session, retained last will), the network task
//! with backoff, and the work loop's handling of what arrives (connection, announcements,
//! commits, checkpoints) up to a synced replica.

use std::time::Duration;

use fwdllm_shared::service;
use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{self, AgentState, AgentStatus, Checkpoint, RoundAnnounce, RoundCommit};
use log::{debug, info, warn};
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, NetworkOptions, Outgoing, Packet, QoS,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Backoff, Daemon};
use crate::config::AgentConfig;

pub(super) fn mqtt_client(
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
pub(super) enum NetEvent {
    Connected { session_present: bool },
    Disconnected(String),
    Message { topic: String, payload: Vec<u8> },
}

/// Drives rumqttc's event loop: forwards messages, reconnects after errors with backoff (rumqttc
/// itself would retry on the very next poll, in a tight loop), ends after our DISCONNECT or
/// when `stop` is cancelled.
pub(super) async fn network_loop(
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

impl Daemon {
    pub(super) async fn on_net(&mut self, ev: NetEvent) {
        match ev {
            NetEvent::Connected { session_present } => {
                info!(
                    "connected to {}:{} (session present: {session_present})",
                    self.config.mqtt.host, self.config.mqtt.port
                );
                // Subscribe on every connection: cheap, and it re-delivers the retained round and
                // commit log, which is how a reconnecting agent catches up. The round comes last
                // so that commits usually arrive before the announcement that needs them. Not the
                // latest-commit topic: the log carries every version, and subscribing to both
                // downloaded each commit twice.
                let mut filters = vec![self.topics.commits_filter()];
                if self.needs_checkpoint() || self.checkpoint_subscribed {
                    filters.push(self.topics.checkpoint());
                    self.checkpoint_subscribed = true;
                }
                filters.push(self.topics.round());
                for f in filters {
                    subscribe_retained(&self.client, f, session_present).await;
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

    pub(super) fn needs_checkpoint(&self) -> bool {
        self.replica.weights().is_none() || self.replica.diverged()
    }

    pub(super) fn on_announce(&mut self, a: RoundAnnounce) {
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

    pub(super) fn answered(&self, a: &RoundAnnounce) -> bool {
        self.persisted
            .last_answered
            .is_some_and(|last| (a.round, a.extend) <= last)
    }

    pub(super) fn on_commit(&mut self, c: RoundCommit) {
        let applied = self.replica.on_commit(c);
        if applied > 0 {
            self.replica_changed(applied as u64, 0);
        }
    }

    pub(super) async fn on_checkpoint(&mut self, cp: Checkpoint) {
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
    pub(super) fn replica_changed(&mut self, commits: u64, checkpoints: u64) {
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

    pub(super) fn save_state(&self) {
        if let Err(e) = self.state_dir.save_state(&self.persisted) {
            warn!("{e}");
        }
    }

    pub(super) async fn request_checkpoint(&mut self) {
        if self.checkpoint_subscribed {
            return;
        }
        // Subscribing delivers the retained checkpoint.
        subscribe_retained(&self.client, self.topics.checkpoint(), false).await;
        self.checkpoint_subscribed = true;
    }

    /// Asks the broker again for the retained commit log and checkpoint: what a replica that
    /// cannot reach the announced version is missing is always there (the log holds every
    /// commit since the checkpoint), but a persistent session may already have delivered it
    /// to a process that died before persisting it, and a re-subscription alone may not send
    /// it again (below).
    pub(super) async fn refetch_retained(&mut self) {
        subscribe_retained(&self.client, self.topics.commits_filter(), true).await;
        subscribe_retained(&self.client, self.topics.checkpoint(), true).await;
        self.checkpoint_subscribed = true;
    }
}

/// Subscribes to `filter` so that its retained messages are delivered. MQTT 3.1.1 §3.8.4
/// says a re-subscription re-sends them, but rumqttd 0.20 sends retained messages only for a
/// filter new to the session (routing.rs, `prepare_filter`) and ignores an UNSUBSCRIBE of a
/// restored session's filter until it was subscribed on this connection: where the filter
/// may already be in the session, subscribe, unsubscribe, subscribe (as the aggregator's
/// server does for statuses). Every filter subscribed this way is retained, so a message
/// published between the steps comes with the last SUBSCRIBE.
async fn subscribe_retained(client: &AsyncClient, filter: String, may_be_in_session: bool) {
    let mut result = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
    if may_be_in_session && result.is_ok() {
        result = client.unsubscribe(filter.clone()).await;
        if result.is_ok() {
            result = client.subscribe(filter.clone(), QoS::AtLeastOnce).await;
        }
    }
    if let Err(e) = result {
        warn!("subscribe {filter}: {e}");
    }
}
