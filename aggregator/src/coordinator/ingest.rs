//! What arrives from the clients: retained statuses (who is eligible) and updates. An update
//! is decoded, then accepted into the open round or refused — duplicate (client, round, seq),
//! stale or future round, wrong version, unknown request, client not selected, or pairs that
//! fail the robust checks — and every accepted pair is pooled once per seed.

use fwdllm_shared::wire::{self, AgentStatus, ClientUpdate};
use log::{debug, info, warn};

use super::{AggEvent, Coordinator, UpdateOutcome};
use crate::robust::{self, RejectReason};
use crate::state::DurableState;

impl Coordinator {
    /// A retained status arrived (empty payload = cleared).
    pub fn on_status(&mut self, client_id: &str, payload: &[u8], now_ms: u64) {
        if payload.is_empty() {
            self.clients.remove(client_id);
        } else {
            match wire::decode_json::<AgentStatus>(payload) {
                Ok(s) if s.client_id == client_id => {
                    debug!("status {client_id}: {:?}", s.state);
                    self.clients.insert(client_id.to_string(), s);
                }
                Ok(s) => warn!(
                    "status on topic of {client_id} names client {}; ignored",
                    s.client_id
                ),
                Err(e) => warn!("bad status from {client_id}: {e}"),
            }
        }
        self.tick(now_ms);
    }

    pub(super) fn eligible(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, s)| s.state.is_eligible())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A selected client the open round still waits for: eligible, or of unknown status — after
    /// a restart the statuses are not known yet when the queued updates arrive, and closing the
    /// resumed round on quorum then would discard the rest of its answers as stale.
    pub(super) fn may_answer(&self, id: &str) -> bool {
        self.clients.get(id).is_none_or(|s| s.state.is_eligible())
    }

    /// An update arrived on `update/{client_id}`.
    pub fn on_update(&mut self, client_id: &str, payload: &[u8], now_ms: u64) -> UpdateOutcome {
        let outcome = match wire::decode::<ClientUpdate>(payload) {
            Err(e) => {
                self.state.counters.rejected += 1;
                self.state
                    .robust
                    .reject(client_id, RejectReason::Undecodable, &e.to_string());
                UpdateOutcome::Rejected(e.to_string())
            }
            Ok(u) => {
                let o = self.accept(client_id, &u);
                self.events.push(AggEvent::Update {
                    client: client_id.to_string(),
                    round: u.round,
                    seq: u.seq,
                    outcome: o.clone(),
                });
                o
            }
        };
        self.dirty = true;
        self.decide(now_ms);
        outcome
    }

    fn accept(&mut self, client_id: &str, u: &ClientUpdate) -> UpdateOutcome {
        let reject = |s: &mut DurableState, reason: RejectReason, why: String| {
            s.counters.rejected += 1;
            s.robust.reject(client_id, reason, &why);
            UpdateOutcome::Rejected(why)
        };
        if u.client_id != client_id {
            return reject(
                &mut self.state,
                RejectReason::ClientMismatch,
                format!(
                    "names client {:?} but came on the topic of {client_id:?}",
                    u.client_id
                ),
            );
        }
        let Some(open) = self.state.open.as_ref() else {
            self.state.counters.stale += 1;
            info!(
                "stale update from {client_id} for round {} ignored: no round open",
                u.round
            );
            return UpdateOutcome::Stale {
                current: self.state.round,
            };
        };
        if u.round != open.round {
            if u.round > open.round {
                let why = format!(
                    "round {} is in the future (open round {})",
                    u.round, open.round
                );
                return reject(&mut self.state, RejectReason::FutureRound, why);
            }
            self.state.counters.stale += 1;
            info!(
                "stale update from {client_id} for round {} ignored (open round {})",
                u.round, open.round
            );
            return UpdateOutcome::Stale {
                current: open.round,
            };
        }
        if open.has_answered(client_id, u.seq) {
            self.state.counters.duplicates += 1;
            debug!(
                "duplicate update ({client_id}, {}, {}) counted once",
                u.round, u.seq
            );
            return UpdateOutcome::Duplicate;
        }
        if u.base_version != open.base_version {
            let why = format!(
                "computed at version {} but round {} is at version {}",
                u.base_version, u.round, open.base_version
            );
            return reject(&mut self.state, RejectReason::WrongVersion, why);
        }
        if u.seq > open.extend {
            let why = format!(
                "answers request {} but only {} were made",
                u.seq, open.extend
            );
            return reject(&mut self.state, RejectReason::UnknownRequest, why);
        }
        let Some(owner) = open.selected.iter().position(|c| c == client_id) else {
            let why = format!("{client_id} is not selected for round {}", u.round);
            return reject(&mut self.state, RejectReason::NotSelected, why);
        };
        let limit = robust::max_pairs_per_request(&self.cfg, u.seq);
        if let Err((reason, why)) = robust::check_pairs(&self.cfg.robust, limit, &u.pairs) {
            // The round stops waiting for this answer: a client that sent junk once would
            // otherwise hold every round open until its deadline.
            let key = (client_id.to_string(), u.seq);
            let open = self.state.open.as_mut().expect("checked above");
            if reason.is_content() && !open.refused.contains(&key) {
                open.refused.push(key);
            }
            return reject(&mut self.state, reason, why);
        }
        let open = self.state.open.as_mut().expect("checked above");
        open.answered.push((client_id.to_string(), u.seq));
        open.loss.merge(
            u64::from(u.samples),
            f64::from(u.loss_mean),
            f64::from(u.loss_m2),
        );
        let pool = self
            .pool
            .as_mut()
            .expect("pool exists while a round is open");
        let mut n = 0;
        for p in &u.pairs {
            if self.seen_seeds.insert(p.seed) {
                open.pairs.push(*p);
                open.owners.push(owner as u32);
                pool.add(*p);
                n += 1;
            } else {
                self.state.counters.duplicate_seeds += 1;
            }
        }
        self.state.counters.updates += 1;
        self.state.counters.perturbations += n as u64;
        UpdateOutcome::Accepted { pairs: n }
    }
}
