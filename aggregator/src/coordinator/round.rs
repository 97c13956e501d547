//! The round life cycle: after every event, `decide` opens a round (enough eligible clients),
//! commits it (pacing gate, perturbation cap, extends exhausted, deadline with quorum), extends
//! it (everyone selected answered, extends left) or abandons it (deadline without quorum);
//! client selection (a deterministic per-round sample) and the round's announcements.
//!
//! Cost: `decide` is O(1) in clients and pending updates (plus the pacing statistic, O(d) in
//! the trainable values): every count it reads is kept by the round's tally. Opening a round is
//! O(C) in the eligible clients (plus O(S log S) to sort a sampled selection of S), once per
//! round; an extend is O(S).

use fwdllm_shared::wire::{self, ClientSelection, RoundAnnounce};
use log::{info, warn};

use super::commit::CommitReason;
use super::{AggEvent, Coordinator};
use crate::pacing::RoundPool;
use crate::state::{LossStats, OpenRound};

impl Coordinator {
    /// Clock tick: opens rounds, enforces deadlines, publishes live metrics.
    pub fn tick(&mut self, now_ms: u64) {
        self.decide(now_ms);
        if self.state.open.is_some() && now_ms >= self.last_metrics_ms + 1000 {
            self.last_metrics_ms = now_ms;
            let m = self.metrics("collecting", now_ms);
            self.publish(self.topics.metrics(), wire::encode_json(&m), true, 0);
        }
    }

    /// Milliseconds until the open round's deadline (for the driver's timer).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.state.open.as_ref().map(|o| o.deadline_unix_ms)
    }

    pub(super) fn decide(&mut self, now_ms: u64) {
        if self.finished() {
            return;
        }
        let Some(open) = self.state.open.as_ref() else {
            // The count first: statuses arrive one by one, and listing the eligible clients
            // on each would make a fleet's start O(C²).
            if self.online >= self.cfg.round.min_clients as usize {
                let eligible = self.eligible();
                self.start_round(eligible, now_ms);
            }
            return;
        };
        let pool = self
            .pool
            .as_ref()
            .expect("pool exists while a round is open");
        let k = pool.len();
        let quorum = self.tally.responded() >= self.cfg.round.quorum as usize && k > 0;
        let pc = &self.cfg.pacing;
        if k >= pc.max_perturbations as usize {
            return self.commit(CommitReason::Cap, now_ms);
        }
        if quorum && k >= pc.min_perturbations as usize && k >= 2 && pool.z() >= pc.target_z {
            return self.commit(CommitReason::Gate, now_ms);
        }
        if now_ms >= open.deadline_unix_ms {
            if quorum {
                return self.commit(CommitReason::Deadline, now_ms);
            }
            return self.abandon(now_ms);
        }
        if self.tally.awaiting() == 0 && quorum {
            if open.extend < pc.max_extends {
                self.extend(now_ms);
            } else {
                self.commit(CommitReason::ExtendsExhausted, now_ms);
            }
        }
    }

    fn select(&self, mut eligible: Vec<String>, round: u64) -> Vec<String> {
        let n = eligible.len();
        let want = ((self.cfg.round.fraction as f64 * n as f64).ceil() as usize)
            .max(self.cfg.round.min_clients as usize)
            .min(n);
        if want < n {
            // Deterministic per-round shuffle: the `want` lowest blake3(round || id), found in
            // O(n) (the keys are distinct, so the set is the one a full sort would keep).
            let mut keyed: Vec<([u8; 32], String)> = eligible
                .into_iter()
                .map(|id| {
                    let mut h = blake3::Hasher::new();
                    h.update(&round.to_le_bytes());
                    h.update(id.as_bytes());
                    (*h.finalize().as_bytes(), id)
                })
                .collect();
            if want > 0 {
                keyed.select_nth_unstable_by(want - 1, |a, b| a.0.cmp(&b.0));
            }
            keyed.truncate(want);
            eligible = keyed.into_iter().map(|(_, id)| id).collect();
            eligible.sort();
        }
        eligible
    }

    fn start_round(&mut self, eligible: Vec<String>, now_ms: u64) {
        let round = self.state.round + 1;
        let everyone = eligible.len();
        let selected = self.select(eligible, round);
        // Every eligible client, and more than a list should hold: announce `All`, whose size
        // does not grow with the fleet (a list of 10,000 ids is ~100 KB, sent to each of the
        // 10,000 subscribers of the round topic). Any client that answers is then admitted.
        let selection = if selected.len() == everyone
            && selected.len() > self.cfg.round.selection_list_max as usize
        {
            ClientSelection::All
        } else {
            ClientSelection::Clients(selected.clone())
        };
        let deadline = now_ms + (self.cfg.round.deadline_s * 1000.0) as u64;
        let announce = RoundAnnounce {
            job: self.cfg.job.name.clone(),
            round,
            model_version: self.state.version,
            weights_hash: self.weights.hash(),
            perturbations_per_client: self.cfg.round.perturbations_per_client,
            eps: self.cfg.round.eps,
            deadline_unix_ms: deadline,
            selection,
            task: {
                let mut t = self.cfg.task.params();
                if self.cfg.round.head_per_direction > 0 {
                    t.extra.push((
                        "head_per_direction".into(),
                        self.cfg.round.head_per_direction.to_string(),
                    ));
                }
                if self.selection.wants(self.state.version) {
                    t.extra.push((
                        wire::EVAL_EVERY_KEY.into(),
                        self.selection.eval_every().to_string(),
                    ));
                }
                t
            },
            seed_base: self.state.seed_base,
            extend: 0,
        };
        info!(
            "round {round} opened at version {} with {} clients",
            self.state.version,
            selected.len()
        );
        self.events.push(AggEvent::RoundOpened {
            round,
            version: self.state.version,
            selected: selected.len(),
        });
        let qos = announce_qos(&announce.selection);
        self.publish(self.topics.round(), wire::encode(&announce), true, qos);
        match self
            .selection
            .round_opened(self.state.version, &self.weights, selected.len())
        {
            Ok(Some(rec)) => self.dev_evaluated(&rec),
            Ok(None) => {}
            Err(e) => warn!("writing the best version: {e}; export falls back to the last version"),
        }
        self.state.round = round;
        self.state.open = Some(OpenRound {
            round,
            base_version: self.state.version,
            started_unix_ms: now_ms,
            deadline_unix_ms: deadline,
            extend: 0,
            selected,
            answered: Vec::new(),
            pairs: Vec::new(),
            loss: LossStats::default(),
            announce,
            owners: Vec::new(),
            refused: Vec::new(),
        });
        self.rebuild_pool();
        self.dirty = true;
    }

    fn extend(&mut self, now_ms: u64) {
        let open = self
            .state
            .open
            .as_mut()
            .expect("extend needs an open round");
        open.extend += 1;
        open.announce.extend = open.extend;
        self.tally.next_request(open.extend);
        open.announce.perturbations_per_client = self.cfg.pacing.extend_perturbations;
        let (round, extend) = (open.round, open.extend);
        let bytes = wire::encode(&open.announce);
        let qos = announce_qos(&open.announce.selection);
        info!(
            "round {round}: z = {:.2} < {} with {} pairs; extend #{extend}",
            self.pool.as_ref().map_or(0.0, RoundPool::z),
            self.cfg.pacing.target_z,
            open.pairs.len()
        );
        self.publish(self.topics.round(), bytes, true, qos);
        self.events.push(AggEvent::Extended { round, extend });
        self.dirty = true;
        let _ = now_ms;
    }

    fn abandon(&mut self, now_ms: u64) {
        let open = self
            .state
            .open
            .as_ref()
            .expect("abandon needs an open round");
        warn!(
            "round {} abandoned at its deadline: {} of quorum {} clients answered",
            open.round,
            self.tally.responded(),
            self.cfg.round.quorum
        );
        let round = open.round;
        let mut m = self.metrics("abandoned", now_ms);
        m.round_ms = now_ms.saturating_sub(open.started_unix_ms);
        self.state.counters.abandoned_rounds += 1;
        self.state.open = None;
        self.pool = None;
        self.seen_seeds.clear();
        self.tally = Default::default();
        self.publish(self.topics.round(), Vec::new(), true, 1);
        self.publish(self.topics.metrics(), wire::encode_json(&m), true, 0);
        self.records.push(m);
        self.events.push(AggEvent::Abandoned { round });
        self.dirty = true;
    }
}

/// The QoS of a round announcement. An `All` announcement (a fleet: more clients than a list
/// holds) goes out at QoS 0: it is retained, and every agent subscribes again on every
/// connection (which delivers the retained copy), so a QoS-1 delivery adds only a PUBACK per
/// device per request for the broker to read — one in six of the packets an update costs it
/// (SCALING.md, "Split ingest"). A listed selection keeps QoS 1: with a persistent session it
/// is queued for a board that is offline when it is published.
pub(super) fn announce_qos(selection: &ClientSelection) -> u8 {
    if *selection == ClientSelection::All {
        0
    } else {
        1
    }
}
