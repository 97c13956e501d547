//! The ledger subscriber: an MQTT client of its own (fixed id, persistent session) subscribed at
//! QoS 1 to everything of a job before any agent connects, recording every update, commit,
//! status and announcement the broker routes into a [`Ledger`]. Waits are "until the ledger
//! says so", with a guard only against hangs.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{self, AgentStatus, ClientUpdate, RoundAnnounce, RoundCommit};
use log::{debug, warn};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ChaosError, Ledger};

/// A condition checked by the subscriber task itself after every message (true: fired, drop it).
type Trigger = Box<dyn FnMut(&Ledger) -> bool + Send>;

/// A running ledger subscriber.
pub struct Observer {
    client: AsyncClient,
    topics: Topics,
    ledger: Arc<Mutex<Ledger>>,
    triggers: Arc<Mutex<Vec<Trigger>>>,
    /// Bumped on every message handled (waiters re-check their condition).
    changed: watch::Receiver<u64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
    next_marker: u64,
}

impl Observer {
    /// Connects as `client_id` to `host:port` and returns once the subscription to the job's
    /// topics is acknowledged (so nothing published afterwards escapes the ledger).
    pub async fn start(
        host: &str,
        port: u16,
        job: &str,
        client_id: &str,
        max_packet: usize,
        guard: Duration,
    ) -> Result<Observer, ChaosError> {
        let topics = Topics::new(job)?;
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_clean_session(false);
        opts.set_max_packet_size(max_packet, max_packet);
        let (client, mut el) = AsyncClient::new(opts, 1024);
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let (tx, changed) = watch::channel(0u64);
        let (sub_tx, mut sub_rx) = watch::channel(false);
        let stop = CancellationToken::new();
        let triggers: Arc<Mutex<Vec<Trigger>>> = Arc::default();
        let task = {
            let (ledger, stop, client, topics, triggers) = (
                ledger.clone(),
                stop.clone(),
                client.clone(),
                topics.clone(),
                triggers.clone(),
            );
            tokio::spawn(async move {
                let mut subscribed = false;
                loop {
                    let ev = tokio::select! {
                        _ = stop.cancelled() => return,
                        ev = el.poll() => ev,
                    };
                    match ev {
                        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                            if !ack.session_present {
                                if subscribed {
                                    // The broker forgot us: whatever came meanwhile is missing.
                                    lock(&ledger).sessions_lost += 1;
                                }
                                if let Err(e) = client
                                    .subscribe(topics.all_filter(), QoS::AtLeastOnce)
                                    .await
                                {
                                    warn!("ledger subscribe: {e}");
                                }
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed = true;
                            let _ = sub_tx.send(true);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let l = &mut lock(&ledger);
                            record(&topics, l, &p.topic, &p.payload);
                            let mut ts = triggers.lock().unwrap_or_else(|e| e.into_inner());
                            ts.retain_mut(|t| !t(l));
                            tx.send_modify(|n| *n += 1);
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            debug!("ledger connection: {e}");
                            tokio::select! {
                                _ = stop.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                            }
                        }
                    }
                }
            })
        };
        let ok = tokio::time::timeout(guard, sub_rx.wait_for(|s| *s)).await;
        if !matches!(ok, Ok(Ok(_))) {
            stop.cancel();
            return Err(ChaosError::Timeout {
                what: format!("the ledger subscription on {host}:{port}"),
                secs: guard.as_secs(),
            });
        }
        Ok(Observer {
            client,
            topics,
            ledger,
            triggers,
            changed,
            stop,
            task,
            next_marker: 1,
        })
    }

    /// Fires once `f(ledger)` returns a value, checked by the subscriber task after every
    /// message (and once now): no state the ledger passes through is missed, however fast
    /// rounds go, so the value describes the moment the condition first held.
    pub fn when<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&Ledger) -> Option<T> + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        let l = lock(&self.ledger);
        match f(&l) {
            Some(v) => {
                let _ = tx.send(v);
            }
            None => {
                let mut tx = Some(tx);
                let t: Trigger = Box::new(move |l| match f(l) {
                    Some(v) => {
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(v);
                        }
                        true
                    }
                    None => false,
                });
                self.triggers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(t);
            }
        }
        drop(l);
        rx
    }

    /// The ledger so far (hold the guard briefly: the subscriber waits on it).
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        lock(&self.ledger)
    }

    /// Waits until `f(ledger)` holds; fails after `guard` (a hang, never a timing assumption).
    pub async fn wait_until(
        &mut self,
        what: &str,
        guard: Duration,
        mut f: impl FnMut(&Ledger) -> bool,
    ) -> Result<(), ChaosError> {
        let deadline = tokio::time::Instant::now() + guard;
        loop {
            if f(&self.ledger()) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, self.changed.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err(ChaosError::Timeout {
                        what: what.to_string(),
                        secs: guard.as_secs(),
                    })
                }
            }
        }
    }

    /// Returns once everything the broker routed to the ledger before this call has been
    /// recorded: publishes a marker on the job's topics and waits for it to come back (one
    /// subscription, so the broker delivers in order).
    pub async fn drain(&mut self, guard: Duration) -> Result<(), ChaosError> {
        let nonce = self.next_marker;
        self.next_marker += 1;
        self.client
            .publish(
                format!("{}/chaos-marker", self.topics.base()),
                QoS::AtLeastOnce,
                false,
                nonce.to_le_bytes().to_vec(),
            )
            .await?;
        self.wait_until("the ledger's marker", guard, |l| l.markers.contains(&nonce))
            .await
    }

    /// Disconnects and returns the ledger.
    pub async fn stop(self) -> Ledger {
        let Observer {
            client,
            ledger,
            stop,
            task,
            ..
        } = self;
        let _ = client.disconnect().await;
        // The subscriber task returns on its own once the DISCONNECT is out; bounded.
        let mut task = task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            stop.cancel();
            let _ = task.await;
        }
        let ledger = std::mem::take(&mut *lock(&ledger));
        ledger
    }
}

fn lock(m: &Mutex<Ledger>) -> MutexGuard<'_, Ledger> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Files one routed message in the ledger.
fn record(topics: &Topics, l: &mut Ledger, topic: &str, payload: &[u8]) {
    if let Some(nonce) = topic
        .strip_suffix("/chaos-marker")
        .filter(|base| *base == topics.base())
        .and_then(|_| payload.try_into().ok().map(u64::from_le_bytes))
    {
        l.markers.insert(nonce);
        return;
    }
    match topics.parse(topic) {
        Some(TopicKind::Update(id)) => match wire::decode::<ClientUpdate>(payload) {
            Ok(u) if u.client_id == id => l.on_update(&u),
            Ok(u) => warn!("update on the topic of {id} names {}", u.client_id),
            Err(e) => warn!("undecodable update from {id}: {e}"),
        },
        Some(TopicKind::Commit) | Some(TopicKind::CommitLog(_)) if !payload.is_empty() => {
            match wire::decode::<RoundCommit>(payload) {
                Ok(c) => l.on_commit(c),
                Err(e) => warn!("undecodable commit on {topic}: {e}"),
            }
        }
        Some(TopicKind::Round) => {
            l.announce = if payload.is_empty() {
                None
            } else {
                wire::decode::<RoundAnnounce>(payload).ok()
            };
        }
        Some(TopicKind::Status(_)) if !payload.is_empty() => {
            if let Ok(s) = wire::decode_json::<AgentStatus>(payload) {
                if let Some(h) = s.weights_hash {
                    l.statuses.push((s.client_id, s.model_version, h));
                }
            }
        }
        _ => {}
    }
}
