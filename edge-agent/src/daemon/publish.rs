//! What the agent publishes: its update (QoS 1), its dev score (model selection), retained status (online/busy/offline per the
//! device limits), telemetry (QoS 0, dropped when the link is down), and the graceful stop.

use std::time::{Duration, Instant};

use fwdllm_shared::service;
use fwdllm_shared::wire::{self, AgentState, AgentStatus, ClientUpdate, RoundAnnounce, Telemetry};
use log::{debug, info, warn};
use rumqttc::QoS;

use super::round::{DevEvalResult, Running};
use super::{device, unix_ms, Daemon, DeviceSample};

impl Daemon {
    /// Sends the dev score of the announced version (model selection); a failed evaluation or
    /// publish is logged and the round goes on.
    pub(super) async fn publish_dev_eval(&mut self, a: &RoundAnnounce, dev: DevEvalResult) {
        let score = match dev {
            Ok(Some(s)) => s,
            Ok(None) => return, // no dev subset on this agent
            Err(e) => {
                warn!("round {}: dev evaluation failed: {e}", a.round);
                return;
            }
        };
        let r = super::dev_eval::report(&self.client_id, a, score);
        let bytes = wire::encode(&r);
        match self
            .client
            .publish(
                self.topics.eval(&self.client_id),
                QoS::AtLeastOnce,
                false,
                bytes,
            )
            .await
        {
            Ok(()) => info!(
                version = a.model_version;
                "version {}: dev score {}/{} (loss {:.4})",
                a.model_version,
                score.correct,
                score.examples,
                score.loss_sum / f64::from(score.examples.max(1))
            ),
            Err(e) => warn!(
                "version {}: publishing the dev score failed: {e}",
                a.model_version
            ),
        }
    }

    pub(super) async fn publish_update(&mut self, run: Running) {
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

    pub(super) async fn on_tick(&mut self) {
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
        self.info.send_modify(|i| i.device = Some(s));
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
    pub(super) async fn update_busy(&mut self, sample: &DeviceSample) {
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

    pub(super) async fn set_state(&mut self, state: AgentState) {
        if self.published_state != Some(state) {
            self.publish_status_as(state).await;
        }
    }

    /// Publishes online/busy per the device limits.
    pub(super) async fn publish_status(&mut self) {
        let state = if self.busy.is_some() {
            AgentState::Busy
        } else {
            AgentState::Online
        };
        self.publish_status_as(state).await;
    }

    pub(super) async fn publish_status_as(&mut self, state: AgentState) {
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

    pub(super) fn publish_info(&self) {
        let (v, h) = (self.replica.version(), self.replica.hash());
        let last = self.persisted.last_answered;
        self.info.send_modify(|i| {
            i.model_version = v;
            i.weights_hash = h;
            i.last_answered = last;
        });
    }

    /// Graceful stop: abandon work, publish offline, flush state, DISCONNECT.
    pub(super) async fn shutdown(&mut self) {
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
