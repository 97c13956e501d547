//! What arrives from the clients: retained statuses (who is eligible) and updates. An update
//! is decoded, then accepted into the open round or refused — duplicate (client, round, seq),
//! stale or future round, wrong version, unknown request, client not selected, or pairs that
//! fail the robust checks — and every accepted pair is pooled once per seed.
//!
//! Cost per update: O(pairs · d) to pool its pairs (d = trainable values), O(1) in the number
//! of clients and of updates already pending — every lookup goes through the round's
//! [`super::tally::Tally`] or a hash set. The raw update is queued for the journal; it becomes
//! durable with its batch at the next [`Coordinator::persist`].

use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, ClientSelection, ClientUpdate, WireError,
};
use log::{debug, info, warn};

use super::{AggEvent, Coordinator, UpdateOutcome};
use crate::journal::Record;
use crate::robust::{self, RejectReason};
use crate::state::DurableState;

impl Coordinator {
    /// A retained status arrived (empty payload = cleared).
    pub fn on_status(&mut self, client_id: &str, payload: &[u8], now_ms: u64) {
        let before = self.clients.get(client_id).map(|s| s.state);
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
        let after = self.clients.get(client_id).map(|s| s.state);
        if before != after {
            self.count_status(client_id, before, after);
        }
        self.tick(now_ms);
    }

    /// Keeps the online/busy counts and the open round's awaited count in step with a status
    /// change: O(1), so a fleet's statuses cost nothing per update.
    fn count_status(&mut self, id: &str, before: Option<AgentState>, after: Option<AgentState>) {
        let eligible = |s: Option<AgentState>| s.is_some_and(AgentState::is_eligible);
        let busy = |s: Option<AgentState>| s == Some(AgentState::Busy);
        match (eligible(before), eligible(after)) {
            (false, true) => self.online += 1,
            (true, false) => self.online -= 1,
            _ => {}
        }
        match (busy(before), busy(after)) {
            (false, true) => self.busy += 1,
            (true, false) => self.busy -= 1,
            _ => {}
        }
        // The open round waits for a selected client of unknown status too: after a restart
        // the queued updates arrive before the retained statuses, and closing the resumed round
        // on quorum then would discard the rest of its answers as stale (found by the chaos
        // bench; `aggregator/tests/restart_round.rs`).
        let may_answer = |s: Option<AgentState>| s.is_none_or(AgentState::is_eligible);
        if may_answer(before) != may_answer(after) {
            self.tally.set_eligible(id, may_answer(after));
        }
    }

    pub(super) fn eligible(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, s)| s.state.is_eligible())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// An update arrived on `update/{client_id}`: ingested, queued for the journal, then the
    /// round decides. Acknowledge it only after the next [`Coordinator::persist`].
    pub fn on_update(&mut self, client_id: &str, payload: &[u8], now_ms: u64) -> UpdateOutcome {
        let decoded = wire::decode::<ClientUpdate>(payload);
        self.on_decoded_update(client_id, payload, decoded, now_ms)
    }

    /// [`Self::on_update`] for an update an ingest worker already decoded
    /// ([`crate::ingest_workers`]): the same state change, the raw `payload` journaled.
    pub fn on_decoded_update(
        &mut self,
        client_id: &str,
        payload: &[u8],
        decoded: Result<ClientUpdate, WireError>,
        now_ms: u64,
    ) -> UpdateOutcome {
        let outcome = self.ingest_decoded(client_id, decoded, true);
        // A snapshot already due holds this update; otherwise it goes to the journal.
        if !self.dirty {
            self.pending.push(Record {
                client: client_id.to_owned(),
                payload: payload.to_vec(),
            });
        }
        self.decide(now_ms);
        outcome
    }

    /// The state change of one update, without the decision: live traffic, and the journal's
    /// replay at start (`live = false`: no events, they were emitted before the crash).
    pub(super) fn ingest(&mut self, client_id: &str, payload: &[u8], live: bool) -> UpdateOutcome {
        self.ingest_decoded(client_id, wire::decode::<ClientUpdate>(payload), live)
    }

    fn ingest_decoded(
        &mut self,
        client_id: &str,
        decoded: Result<ClientUpdate, WireError>,
        live: bool,
    ) -> UpdateOutcome {
        match decoded {
            Err(e) => {
                self.state.counters.rejected += 1;
                self.state
                    .robust
                    .reject(client_id, RejectReason::Undecodable, &e.to_string());
                UpdateOutcome::Rejected(e.to_string())
            }
            Ok(u) => {
                let o = self.accept(client_id, &u);
                if live {
                    self.events.push(AggEvent::Update {
                        client: client_id.to_string(),
                        round: u.round,
                        seq: u.seq,
                        outcome: o.clone(),
                    });
                }
                o
            }
        }
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
        let index = self.tally.index_of(client_id);
        if index.is_some_and(|i| self.tally.has_answered(i, u.seq)) {
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
        let owner = match index {
            Some(i) => i,
            // A round announced to `All` admits any client that answers (the decision reads
            // only the durable round, so the journal's replay admits the same clients).
            None if open.announce.selection == ClientSelection::All => {
                let eligible = self
                    .clients
                    .get(client_id)
                    .is_none_or(|s| s.state.is_eligible());
                let open = self.state.open.as_mut().expect("checked above");
                open.selected.push(client_id.to_owned());
                self.tally.add_selected(client_id, eligible)
            }
            None => {
                let why = format!("{client_id} is not selected for round {}", u.round);
                return reject(&mut self.state, RejectReason::NotSelected, why);
            }
        };
        let limit = robust::max_pairs_per_request(&self.cfg, u.seq);
        if let Err((reason, why)) = robust::check_pairs(&self.cfg.robust, limit, &u.pairs) {
            // The round stops waiting for this answer: a client that sent junk once would
            // otherwise hold every round open until its deadline.
            if reason.is_content() && !self.tally.is_refused(owner, u.seq) {
                let open = self.state.open.as_mut().expect("checked above");
                open.refused.push((client_id.to_string(), u.seq));
                self.tally.refuse(owner, u.seq);
            }
            return reject(&mut self.state, reason, why);
        }
        let open = self.state.open.as_mut().expect("checked above");
        open.answered.push((client_id.to_string(), u.seq));
        self.tally.answer(owner, u.seq);
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
                open.owners.push(owner);
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
