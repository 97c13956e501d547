//! Ingest workers over an MQTT shared subscription (`[ingest] workers = N`, N > 1).
//!
//! Each worker is its own broker connection (client id `{broker.client_id}-ingest-{i}`,
//! persistent session, manual acks) subscribed to `$share/fwdllm-ingest/{updates filter}`: the
//! broker hands every update to exactly one member of the group. A worker parses the topic and
//! decodes the update on its own task and hands the result, with the publish it came in, to the
//! coordinator's task ([`crate::server`]), which stays the only writer of state: it accepts or
//! refuses, journals the raw payload, and after the group's fsync asks the worker that received
//! each update to acknowledge it on that worker's connection. So the rule of one connection
//! holds with N: an update is acknowledged only once it is durable, an unacknowledged one is
//! redelivered (to the same persistent session) and counted once by the round's tally, and a
//! commit sorts its pairs by seed ([`crate::coordinator`]), so it is the same bits for any
//! worker count.
//!
//! Lowering the count must not strand updates: Mosquitto keeps routing a share to the persistent
//! session of a member that is offline. So the state directory records how many worker sessions
//! may hold the subscription ([`SESSIONS_FILE`], written before they subscribe), and every start
//! connects the workers past the configured count too, as *retiring* workers: they unsubscribe
//! (no new share is routed to them) and hand over what their sessions queued, exactly like
//! active workers. The record is never lowered, so a retired id costs one idle connection.
//!
//! Not pooled here: the pacing statistic is read after every event, so a worker's partial sum
//! would have to be merged before each decision; with the shipped layouts the per-pair pooling
//! is a small share of an update's cost (SCALING.md, "Split ingest").

use std::path::Path;
use std::time::Duration;

use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{self, ClientUpdate, WireError};
use log::{info, warn};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::AggregatorConfig;
use crate::connection::{no_delay, reconnect_wait, BrokerTarget};
use crate::security::SecurityError;
use crate::state::StateError;

/// The share group of the workers (one per updates filter, so one per job on a broker).
pub const SHARE_GROUP: &str = "fwdllm-ingest";

/// File in `state.dir`: the number of worker sessions that may hold the shared subscription.
pub const SESSIONS_FILE: &str = "ingest_sessions";

/// Worker sessions a previous run may have left subscribed (0 when none ran).
pub fn sessions_recorded(dir: &Path) -> u32 {
    std::fs::read_to_string(dir.join(SESSIONS_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The shared-subscription filter the workers subscribe to.
pub fn share_filter(topics: &Topics) -> String {
    format!("$share/{SHARE_GROUP}/{}", topics.updates_filter())
}

/// The MQTT client id of worker `i`.
pub fn worker_client_id(aggregator_id: &str, i: usize) -> String {
    format!("{aggregator_id}-ingest-{i}")
}

/// Why the workers could not start.
#[derive(Debug, Error)]
pub enum IngestError {
    /// Recording the worker sessions in `state.dir` ([`SESSIONS_FILE`]).
    #[error(transparent)]
    State(#[from] StateError),
    #[error("broker security settings: {0}")]
    Security(#[from] SecurityError),
}

/// One publish as a worker hands it to the coordinator.
pub(crate) struct Handoff {
    /// Which worker received it: the one whose connection acknowledges it.
    pub worker: usize,
    /// The client id from the topic and the decoded update; None for a publish on another
    /// topic (acknowledged, not used).
    pub update: Option<(String, Result<ClientUpdate, WireError>)>,
    /// For the acknowledgement, and the raw payload the journal keeps.
    pub publish: Publish,
}

/// The running workers: their clients (for the acknowledgements) and tasks.
pub(crate) struct Workers {
    clients: Vec<AsyncClient>,
    tasks: Vec<JoinHandle<()>>,
    /// Dropping the workers (the aggregator's future aborted = "kill") ends their event
    /// loops: a zombie connection would hold a worker's client id against a restart.
    stop: DropGuard,
}

fn options(
    cfg: &AggregatorConfig,
    target: &BrokerTarget,
    i: usize,
) -> Result<MqttOptions, IngestError> {
    let mut o = MqttOptions::new(
        worker_client_id(&cfg.broker.client_id, i),
        target.host.clone(),
        target.port,
    );
    o.set_keep_alive(Duration::from_secs(cfg.broker.keep_alive_s));
    // Persistent: the broker queues this worker's share while the aggregator restarts.
    o.set_clean_session(false);
    o.set_manual_acks(true);
    o.set_max_packet_size(cfg.broker.max_packet_bytes, cfg.broker.max_packet_bytes);
    // No last will: the aggregator's status belongs to the coordinator's connection.
    crate::security::apply(&cfg.broker, &mut o)?;
    Ok(o)
}

impl Workers {
    /// Connects the `cfg.ingest.workers` workers (none when it is 1) and, as retiring workers,
    /// any further ones a previous run recorded; their hand-offs go to `tx` (the coordinator's
    /// channel, whose messages are made from a [`Handoff`]). None when there is neither.
    pub(crate) fn start<T: From<Handoff> + Send + 'static>(
        cfg: &AggregatorConfig,
        target: &BrokerTarget,
        topics: &Topics,
        tx: mpsc::UnboundedSender<T>,
    ) -> Result<Option<Workers>, IngestError> {
        let active = if cfg.ingest.workers > 1 {
            cfg.ingest.workers
        } else {
            0
        };
        let recorded = sessions_recorded(&cfg.state.dir);
        let total = active.max(recorded);
        if total == 0 {
            return Ok(None);
        }
        if total > recorded {
            // Durable before any of them subscribes: a later start with fewer must find them.
            crate::state::atomic_write(
                &cfg.state.dir.join(SESSIONS_FILE),
                total.to_string().as_bytes(),
            )?;
        }
        let stop = CancellationToken::new();
        let mut clients = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..total as usize {
            let (client, mut el) = AsyncClient::new(options(cfg, target, i)?, 4096);
            no_delay(&mut el);
            let role = if i < active as usize {
                Role::Share
            } else {
                Role::Retire
            };
            tasks.push(tokio::spawn(work(
                i,
                role,
                client.clone(),
                el,
                topics.clone(),
                tx.clone(),
                stop.clone(),
            )));
            clients.push(client);
        }
        info!(
            "{active} ingest workers on {}, {} retiring",
            share_filter(topics),
            total - active
        );
        Ok(Some(Workers {
            clients,
            tasks,
            stop: stop.drop_guard(),
        }))
    }

    /// Acknowledges `p` on the connection of the worker that received it.
    pub(crate) async fn ack(&self, worker: usize, p: &Publish) -> Result<(), rumqttc::ClientError> {
        self.clients[worker].ack(p).await
    }

    /// Disconnects every worker (what was not acknowledged is redelivered to its session).
    pub(crate) async fn shutdown(self) {
        for c in &self.clients {
            let _ = c.disconnect().await;
        }
        // Let the event loops flush their disconnects (bounded), then stop them.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            for t in &self.tasks {
                while !t.is_finished() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        })
        .await;
        drop(self.stop);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What a worker does on each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Subscribe to the shared filter: take a share of the updates.
    Share,
    /// Unsubscribe from it (no new share is routed here) and hand over what the session holds.
    Retire,
}

/// One worker: (un)subscribes on every connection, decodes what it receives and hands it over.
async fn work<T: From<Handoff>>(
    worker: usize,
    role: Role,
    client: AsyncClient,
    mut el: rumqttc::EventLoop,
    topics: Topics,
    tx: mpsc::UnboundedSender<T>,
    stop: CancellationToken,
) {
    let filter = share_filter(&topics);
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => return,
            ev = el.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                // `try_`: this task is the one that drains the request channel.
                let r = match role {
                    Role::Share => client.try_subscribe(filter.clone(), QoS::AtLeastOnce),
                    Role::Retire => client.try_unsubscribe(filter.clone()),
                };
                if let Err(e) = r {
                    warn!("ingest worker {worker} ({role:?}): {filter}: {e}");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let update = match topics.parse(&publish.topic) {
                    Some(TopicKind::Update(id)) => {
                        let u = wire::decode::<ClientUpdate>(&publish.payload);
                        Some((id, u))
                    }
                    _ => None,
                };
                let h = Handoff {
                    worker,
                    update,
                    publish,
                };
                if tx.send(T::from(h)).is_err() {
                    return;
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                let wait = reconnect_wait(&mut backoff);
                warn!("ingest worker {worker} MQTT connection: {e}; reconnecting in {wait:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
