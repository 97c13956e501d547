//! The round state machine, free of I/O: events in (statuses, updates, clock ticks), MQTT
//! publications and observer events out. The MQTT driver ([`crate::server`]) persists the
//! durable state *before* sending what a step produced (write-ahead), and acknowledges the
//! updates it consumed only after that, so a crash at any point neither loses nor double-applies
//! a contribution.
//!
//! Round life cycle: `Idle --(≥ min_clients eligible)--> Collecting --(gate | cap | extends
//! exhausted | deadline with quorum)--> commit --> Idle`; a deadline without quorum abandons the
//! round (no commit, the version stays). Collecting may re-announce the same round with
//! `extend = n` to ask the selected clients for more perturbations.
//!
//! Invariants:
//! * the model version only changes by a commit; a commit's pairs are exactly the pooled pairs
//!   of its round, in arrival order, with step control folded into the coefficients;
//! * each (client, round, seq) contributes at most once; a seed at most once per round;
//! * updates for any round other than the open one are ignored (counted as stale and logged);
//! * every retained message on the broker is re-derivable from the durable state.

use std::collections::{BTreeMap, HashSet};

use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use fwdllm_shared::topics::Topics;
use fwdllm_shared::update::apply_commit;
use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, AggregatorMetrics, Checkpoint, ClientSelection, ClientUpdate,
    EvalReport, RoundAnnounce, RoundCommit,
};
use log::{debug, info, warn};

use crate::config::AggregatorConfig;
use crate::pacing::RoundPool;
use crate::robust::{self, NoiseKey, RejectReason, RobustCounters};
use crate::selection::{BestRecord, Selection, SelectionError};
use crate::state::{Counters, DurableState, LossStats, OpenRound, StateError, Store, STATE_FORMAT};
use crate::step::{make_step, params_norm};

/// One MQTT publication produced by the state machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub topic: String,
    /// Empty = clear a retained message.
    pub payload: Vec<u8>,
    pub retain: bool,
    /// 0 or 1.
    pub qos: u8,
}

/// What happened to one received update.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateOutcome {
    Accepted {
        pairs: usize,
    },
    /// Same (client, round, seq) already counted.
    Duplicate,
    /// For a round that is not the open one.
    Stale {
        current: u64,
    },
    Rejected(String),
}

/// Observable events (for tests, the demo's progress bars and the monitor).
#[derive(Debug, Clone, PartialEq)]
pub enum AggEvent {
    /// The aggregator (re)started from its durable state at this version.
    Resumed {
        version: u64,
        hash: WeightsHash,
        round: u64,
    },
    RoundOpened {
        round: u64,
        version: u64,
        selected: usize,
    },
    Extended {
        round: u64,
        extend: u32,
    },
    Update {
        client: String,
        round: u64,
        seq: u32,
        outcome: UpdateOutcome,
    },
    Committed {
        round: u64,
        version: u64,
        hash: WeightsHash,
        perturbations: usize,
    },
    Abandoned {
        round: u64,
    },
    Finished {
        version: u64,
    },
    /// The dev tally of a version is complete (model selection); `best` if it is the best so far.
    DevEvaluated {
        version: u64,
        accuracy: f64,
        loss: f64,
        best: bool,
    },
}

/// Why a round ended with a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CommitReason {
    Gate,
    Cap,
    ExtendsExhausted,
    Deadline,
}

pub struct Coordinator {
    cfg: AggregatorConfig,
    topics: Topics,
    store: Store,
    state: DurableState,
    weights: LoraWeights,
    pool: Option<RoundPool>,
    clients: BTreeMap<String, AgentStatus>,
    out: Vec<Outgoing>,
    events: Vec<AggEvent>,
    records: Vec<AggregatorMetrics>,
    /// The checkpoint `state.checkpoint_version` names (kept in memory: it is republished on
    /// every reconnect and must never be re-derived from anything else).
    checkpoint: Checkpoint,
    dirty: bool,
    checkpoint_dirty: bool,
    /// Checkpoint files other than `checkpoint`'s may exist; delete them after the next state write.
    prune_checkpoints: bool,
    seen_seeds: HashSet<u64>,
    last_metrics_ms: u64,
    /// Latest held-out evaluation (set by the demo), attached to the next commit record.
    eval: Option<(f64, f64)>,
    /// Dev-score tallies and the best version on disk (model selection).
    selection: Selection,
    /// Key of the DP noise stream (present when `dp.enabled`).
    noise_key: Option<NoiseKey>,
}

impl Coordinator {
    /// Opens the state in `cfg.state.dir` (resuming if present, else starting at version 0).
    pub fn open(cfg: AggregatorConfig) -> Result<Coordinator, StateError> {
        let topics = Topics::new(&cfg.job.name).map_err(|e| StateError::Mismatch {
            dir: cfg.state.dir.clone(),
            message: e.to_string(),
        })?;
        let store = Store::new(&cfg.state.dir)?;
        let layout = cfg.layout().map_err(|message| StateError::Mismatch {
            dir: cfg.state.dir.clone(),
            message,
        })?;
        let (state, weights, checkpoint) = if store.exists() {
            let (state, weights, checkpoint) = store.load()?;
            if state.job != cfg.job.name
                || &state.shape != layout.shape()
                || &state.lora != layout.config()
            {
                return Err(StateError::Mismatch {
                    dir: cfg.state.dir.clone(),
                    message: format!(
                        "state is job {:?} with its own layout, config is job {:?}",
                        state.job, cfg.job.name
                    ),
                });
            }
            info!(
                "resumed job {} at version {} (round {}, {} open)",
                state.job,
                state.version,
                state.round,
                if state.open.is_some() { "one" } else { "none" }
            );
            (state, weights, checkpoint)
        } else {
            let weights = LoraWeights::init(layout);
            let state = DurableState {
                format: STATE_FORMAT,
                job: cfg.job.name.clone(),
                shape: weights.layout().shape().clone(),
                lora: weights.layout().config().clone(),
                seed_base: cfg.job.seed_base,
                version: 0,
                round: 0,
                checkpoint_version: 0,
                log: Vec::new(),
                last_commit: None,
                open: None,
                counters: Counters::default(),
                robust: RobustCounters::default(),
            };
            info!(
                "new job {} at version 0, weights {}",
                state.job,
                weights.hash()
            );
            let checkpoint = Checkpoint::from_weights(0, &weights);
            (state, weights, checkpoint)
        };
        // Also true when resuming from the legacy single checkpoint file: rewrite it versioned.
        let checkpoint_dirty = !store.has_checkpoint(checkpoint.model_version);
        let selection = Selection::open(&cfg.state.dir, cfg.selection.eval_every);
        let noise_key = if cfg.dp.enabled {
            Some(NoiseKey::from_os().map_err(|source| StateError::Io {
                path: "/dev/urandom".into(),
                source,
            })?)
        } else {
            None
        };
        let mut c = Coordinator {
            cfg,
            topics,
            store,
            state,
            weights,
            pool: None,
            clients: BTreeMap::new(),
            out: Vec::new(),
            events: Vec::new(),
            records: Vec::new(),
            checkpoint,
            dirty: true,
            checkpoint_dirty,
            prune_checkpoints: true,
            seen_seeds: HashSet::new(),
            last_metrics_ms: 0,
            eval: None,
            selection,
            noise_key,
        };
        c.rebuild_pool();
        c.persist()?;
        Ok(c)
    }

    fn rebuild_pool(&mut self) {
        self.seen_seeds.clear();
        self.pool = self.state.open.as_ref().map(|open| {
            let mut pool = RoundPool::new(self.weights.layout());
            for p in &open.pairs {
                pool.add(*p);
                self.seen_seeds.insert(p.seed);
            }
            pool
        });
    }

    pub fn config(&self) -> &AggregatorConfig {
        &self.cfg
    }
    pub fn topics(&self) -> &Topics {
        &self.topics
    }
    pub fn weights(&self) -> &LoraWeights {
        &self.weights
    }
    pub fn version(&self) -> u64 {
        self.state.version
    }
    pub fn round(&self) -> u64 {
        self.state.round
    }
    pub fn counters(&self) -> Counters {
        self.state.counters
    }
    pub fn open_round(&self) -> Option<&OpenRound> {
        self.state.open.as_ref()
    }

    /// True once `job.max_commits` commits have been made.
    pub fn finished(&self) -> bool {
        self.cfg.job.max_commits > 0 && self.state.version >= self.cfg.job.max_commits
    }

    /// Robust-aggregation and privacy counters (rejections by reason, clipping, ε spent).
    pub fn robust_counters(&self) -> &RobustCounters {
        &self.state.robust
    }

    /// Replaces the DP noise key (tests: reproducible noise).
    pub fn set_noise_key(&mut self, key: NoiseKey) {
        self.noise_key = Some(key);
    }

    /// Records a held-out evaluation to attach to the next metrics record.
    pub fn set_eval(&mut self, accuracy: f64, loss: f64) {
        self.eval = Some((accuracy, loss));
    }

    /// The best version on the agents' dev subsets so far (model selection), if any.
    pub fn best(&self) -> Option<&BestRecord> {
        self.selection.best()
    }

    /// Scores the dev tallies still open with the reports they have (at shutdown).
    pub fn close_selection(&mut self) -> Result<(), StateError> {
        if let Some(rec) = self.selection.close_all()? {
            self.dev_evaluated(&rec);
        }
        Ok(())
    }

    fn dev_evaluated(&mut self, rec: &BestRecord) {
        let best = self.selection.best().map(|b| b.model_version) == Some(rec.model_version);
        self.events.push(AggEvent::DevEvaluated {
            version: rec.model_version,
            accuracy: rec.dev_accuracy,
            loss: rec.dev_loss,
            best,
        });
    }

    /// A dev evaluation arrived on `eval/{client_id}` (model selection). Bad or unexpected
    /// reports are logged and dropped; they never touch the training state.
    pub fn on_eval(&mut self, client_id: &str, payload: &[u8]) {
        let r = match wire::decode::<EvalReport>(payload) {
            Ok(r) if r.client_id == client_id => r,
            Ok(r) => {
                warn!(client = client_id; "eval report on the topic of {client_id} names client {:?}; ignored", r.client_id);
                return;
            }
            Err(e) => {
                warn!(client = client_id; "undecodable eval report from {client_id}: {e}");
                return;
            }
        };
        match self.selection.on_report(&r) {
            Ok(Some(rec)) => self.dev_evaluated(&rec),
            Ok(None) => {}
            Err(SelectionError::Rejected(why)) => {
                warn!(client = client_id; "eval report from {client_id} ignored: {why}")
            }
            Err(SelectionError::State(e)) => {
                warn!("writing the best version: {e}; export falls back to the last version")
            }
        }
    }

    pub fn take_outgoing(&mut self) -> Vec<Outgoing> {
        std::mem::take(&mut self.out)
    }
    pub fn take_events(&mut self) -> Vec<AggEvent> {
        std::mem::take(&mut self.events)
    }
    /// Metrics records of finished rounds (commits and abandons), for the CSV/JSON files.
    pub fn take_records(&mut self) -> Vec<AggregatorMetrics> {
        std::mem::take(&mut self.records)
    }

    /// Writes what changed: a new checkpoint under its own name, then the state that names it
    /// (the commit point), then deletes the checkpoints no state needs any more. A crash between
    /// any two steps leaves the previous state with the checkpoint it names.
    /// Call before sending [`Self::take_outgoing`].
    pub fn persist(&mut self) -> Result<(), StateError> {
        if self.checkpoint_dirty {
            self.store.save_checkpoint(&self.checkpoint)?;
            self.checkpoint_dirty = false;
            self.prune_checkpoints = true;
        }
        if self.dirty {
            self.store.save_state(&self.state)?;
            self.dirty = false;
        }
        if self.prune_checkpoints {
            self.store
                .prune_checkpoints(self.state.checkpoint_version)?;
            self.prune_checkpoints = false;
        }
        Ok(())
    }

    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool, qos: u8) {
        self.out.push(Outgoing {
            topic,
            payload,
            retain,
            qos,
        });
    }

    /// Retained messages re-derived from the durable state (after start or a reconnect).
    pub fn republish_retained(&mut self, now_ms: u64) {
        self.publish(
            self.topics.checkpoint(),
            wire::encode(&self.checkpoint),
            true,
            1,
        );
        for c in self.state.log.clone() {
            self.publish(
                self.topics.commit_log(c.new_version),
                wire::encode(&c),
                true,
                1,
            );
        }
        if let Some(c) = self.state.last_commit.clone() {
            self.publish(self.topics.commit(), wire::encode(&c), true, 1);
        }
        match self.state.open.as_ref().map(|o| o.announce.clone()) {
            Some(a) => self.publish(self.topics.round(), wire::encode(&a), true, 1),
            None => self.publish(self.topics.round(), Vec::new(), true, 1),
        }
        let mut st = AgentStatus::new(self.cfg.broker.client_id.clone(), AgentState::Online);
        st.model_version = self.state.version;
        st.weights_hash = Some(self.weights.hash());
        st.unix_ms = now_ms;
        st.agent_version = env!("CARGO_PKG_VERSION").into();
        self.publish(self.topics.aggregator(), wire::encode_json(&st), true, 1);
    }

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

    fn eligible(&self) -> Vec<String> {
        self.clients
            .iter()
            .filter(|(_, s)| s.state.is_eligible())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A selected client the open round still waits for: eligible, or of unknown status — after
    /// a restart the statuses are not known yet when the queued updates arrive, and closing the
    /// resumed round on quorum then would discard the rest of its answers as stale.
    fn may_answer(&self, id: &str) -> bool {
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

    fn decide(&mut self, now_ms: u64) {
        if self.finished() {
            return;
        }
        let Some(open) = self.state.open.as_ref() else {
            let eligible = self.eligible();
            if eligible.len() >= self.cfg.round.min_clients as usize {
                self.start_round(eligible, now_ms);
            }
            return;
        };
        let pool = self
            .pool
            .as_ref()
            .expect("pool exists while a round is open");
        let k = pool.len();
        let responded = open.responded();
        let quorum = responded >= self.cfg.round.quorum as usize && k > 0;
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
        // A set, not `has_answered` per client: this runs after every update, and a linear
        // scan per selected client made a round cost O(clients³) (ingest fell from 12,000 to
        // 860 updates/s between 100 and 1,000 simulated clients).
        let answered_now: std::collections::HashSet<&str> = open
            .answered
            .iter()
            .chain(&open.refused)
            .filter(|(_, seq)| *seq == open.extend)
            .map(|(c, _)| c.as_str())
            .collect();
        let awaiting = open
            .selected
            .iter()
            .filter(|c| !answered_now.contains(c.as_str()) && self.may_answer(c))
            .count();
        if awaiting == 0 && quorum {
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
            // Deterministic per-round shuffle: rank by blake3(round || id).
            eligible.sort_by_key(|id| {
                let mut h = blake3::Hasher::new();
                h.update(&round.to_le_bytes());
                h.update(id.as_bytes());
                *h.finalize().as_bytes()
            });
            eligible.truncate(want);
            eligible.sort();
        }
        eligible
    }

    fn start_round(&mut self, eligible: Vec<String>, now_ms: u64) {
        let round = self.state.round + 1;
        let selected = self.select(eligible, round);
        let deadline = now_ms + (self.cfg.round.deadline_s * 1000.0) as u64;
        let announce = RoundAnnounce {
            job: self.cfg.job.name.clone(),
            round,
            model_version: self.state.version,
            weights_hash: self.weights.hash(),
            perturbations_per_client: self.cfg.round.perturbations_per_client,
            eps: self.cfg.round.eps,
            deadline_unix_ms: deadline,
            selection: ClientSelection::Clients(selected.clone()),
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
        self.publish(self.topics.round(), wire::encode(&announce), true, 1);
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
        open.announce.perturbations_per_client = self.cfg.pacing.extend_perturbations;
        let (round, extend) = (open.round, open.extend);
        let bytes = wire::encode(&open.announce);
        info!(
            "round {round}: z = {:.2} < {} with {} pairs; extend #{extend}",
            self.pool.as_ref().map_or(0.0, RoundPool::z),
            self.cfg.pacing.target_z,
            open.pairs.len()
        );
        self.publish(self.topics.round(), bytes, true, 1);
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
            open.responded(),
            self.cfg.round.quorum
        );
        let round = open.round;
        let mut m = self.metrics("abandoned", now_ms);
        m.round_ms = now_ms.saturating_sub(open.started_unix_ms);
        self.state.counters.abandoned_rounds += 1;
        self.state.open = None;
        self.pool = None;
        self.seen_seeds.clear();
        self.publish(self.topics.round(), Vec::new(), true, 1);
        self.publish(self.topics.metrics(), wire::encode_json(&m), true, 0);
        self.records.push(m);
        self.events.push(AggEvent::Abandoned { round });
        self.dirty = true;
    }

    fn commit(&mut self, reason: CommitReason, now_ms: u64) {
        let open = self.state.open.take().expect("commit needs an open round");
        let pool = self.pool.take().expect("pool exists while a round is open");
        self.seen_seeds.clear();
        let theta_norm = params_norm(self.weights.params());
        // Robust clipping, the per-client cap and DP noise act on the persisted raw pairs here,
        // before anything is committed, so a restarted aggregator commits the same.
        let robust = robust::robust_pairs(
            &self.cfg.robust,
            &self.cfg.dp,
            self.weights.layout(),
            &open.pairs,
            &open.owners,
            robust::max_pairs_per_client(&self.cfg),
            open.round,
            self.noise_key.as_ref(),
        );
        // The trust region reads the norm of the pooled mean: recompute it from what is
        // committed (unchanged pairs reuse the pool, so an honest round commits the same bits).
        let raw_pool_z = pool.z();
        let pool = if robust.changed {
            let mut p = RoundPool::new(self.weights.layout());
            for &pair in &robust.pairs {
                p.add(pair);
            }
            p
        } else {
            pool
        };
        self.state.robust.clipped_pairs += u64::from(robust.clipped_pairs);
        self.state.robust.capped_clients += u64::from(robust.capped_clients);
        if robust.dp_rho > 0.0 {
            self.state.robust.dp_commits += 1;
            self.state.robust.dp_rho += robust.dp_rho;
        }
        let step = make_step(
            &self.cfg.step,
            self.state.version,
            &robust.pairs,
            pool.mean_norm(),
            &|seed| pool.block_pairs(seed),
            theta_norm,
        );
        apply_commit(&mut self.weights, &step.pairs);
        let hash = self.weights.hash();
        let commit = RoundCommit {
            round: open.round,
            base_version: self.state.version,
            new_version: self.state.version + 1,
            pairs: step.pairs.clone(),
            weights_hash: hash,
        };
        self.state.version += 1;
        let v = self.state.version;
        info!(
            "round {} committed ({reason:?}): version {v}, {} pairs from {} clients, z = {:.2}, lr = {:.3e}, ‖Δθ‖ = {:.3e}{}, loss = {:.4}",
            open.round,
            open.pairs.len(),
            open.responded(),
            pool.z(),
            step.lr,
            step.step_norm,
            if step.clamped { " (clamped)" } else { "" },
            open.loss.mean
        );
        let bytes = wire::encode(&commit);
        self.publish(self.topics.commit_log(v), bytes.clone(), true, 1);
        self.publish(self.topics.commit(), bytes, true, 1);
        self.state.log.push(commit.clone());
        self.state.last_commit = Some(commit);
        if v % self.cfg.state.checkpoint_every == 0 {
            self.checkpoint = Checkpoint::from_weights(v, &self.weights);
            self.publish(
                self.topics.checkpoint(),
                wire::encode(&self.checkpoint),
                true,
                1,
            );
            // The checkpoint covers the log: clear its retained entries so the broker holds at
            // most checkpoint_every commits per job.
            for c in std::mem::take(&mut self.state.log) {
                self.publish(self.topics.commit_log(c.new_version), Vec::new(), true, 1);
            }
            self.state.checkpoint_version = v;
            self.checkpoint_dirty = true;
        }
        self.publish(self.topics.round(), Vec::new(), true, 1);
        // Metrics record of the finished round.
        let mut m = self.base_metrics("committed", now_ms);
        m.round = open.round;
        m.clients_selected = open.selected.len() as u32;
        m.clients_responded = open.responded() as u32;
        m.updates = open.answered.len() as u32;
        m.perturbations = open.pairs.len() as u32;
        m.extends = open.extend;
        m.pacing_stat = raw_pool_z;
        m.pooled_variance = pool.mean_g2();
        m.clipped_pairs = robust.clipped_pairs;
        m.capped_clients = robust.capped_clients;
        (m.g_abs_median, m.g_abs_max) = g_abs_stats(&open.pairs);
        m.lr = step.lr;
        m.step_norm = step.step_norm;
        m.theta_norm = params_norm(self.weights.params());
        m.clamped = step.clamped;
        m.loss_mean = open.loss.mean;
        m.round_ms = now_ms.saturating_sub(open.started_unix_ms);
        if let Some((acc, loss)) = self.eval.take() {
            m.eval_accuracy = Some(acc);
            m.eval_loss = Some(loss);
        }
        self.publish(self.topics.metrics(), wire::encode_json(&m), true, 0);
        self.records.push(m);
        self.events.push(AggEvent::Committed {
            round: open.round,
            version: v,
            hash,
            perturbations: open.pairs.len(),
        });
        self.dirty = true;
        if self.finished() {
            self.events.push(AggEvent::Finished { version: v });
        } else {
            // Open the next round right away (same decision as an idle tick).
            self.decide(now_ms);
        }
    }

    fn base_metrics(&self, phase: &str, now_ms: u64) -> AggregatorMetrics {
        let c = &self.state.counters;
        AggregatorMetrics {
            job: self.cfg.job.name.clone(),
            unix_ms: now_ms,
            round: self.state.round,
            model_version: self.state.version,
            phase: phase.into(),
            clients_online: self
                .clients
                .values()
                .filter(|s| s.state.is_eligible())
                .count() as u32,
            clients_busy: self
                .clients
                .values()
                .filter(|s| s.state == AgentState::Busy)
                .count() as u32,
            perturbations_total: c.perturbations,
            pacing_target: self.cfg.pacing.target_z,
            theta_norm: params_norm(self.weights.params()),
            duplicates: c.duplicates,
            stale: c.stale,
            rejected: c.rejected,
            rejected_by_reason: self.state.robust.rejected_by_reason.clone(),
            clipped_pairs_total: self.state.robust.clipped_pairs,
            capped_clients_total: self.state.robust.capped_clients,
            dp_commits: self.state.robust.dp_commits,
            dp_epsilon: self.state.robust.dp_epsilon(self.cfg.dp.delta),
            dp_delta: self.cfg.dp.enabled.then_some(self.cfg.dp.delta),
            weights_hash: Some(self.weights.hash()),
            ..AggregatorMetrics::default()
        }
    }

    /// Live metrics of the open round (or idle state).
    pub fn metrics(&self, phase: &str, now_ms: u64) -> AggregatorMetrics {
        let mut m = self.base_metrics(phase, now_ms);
        if let (Some(open), Some(pool)) = (&self.state.open, &self.pool) {
            m.clients_selected = open.selected.len() as u32;
            m.clients_responded = open.responded() as u32;
            m.updates = open.answered.len() as u32;
            m.perturbations = pool.len() as u32;
            m.extends = open.extend;
            m.pacing_stat = pool.z();
            m.pooled_variance = pool.mean_g2();
            m.loss_mean = open.loss.mean;
            m.round_ms = now_ms.saturating_sub(open.started_unix_ms);
        }
        m
    }
}

/// Median and largest |g| of raw pooled pairs (metrics: the honest scale `robust.max_abs_g`
/// was chosen from).
fn g_abs_stats(pairs: &[fwdllm_shared::wire::SeedScalar]) -> (f64, f64) {
    if pairs.is_empty() {
        return (0.0, 0.0);
    }
    let mut a: Vec<f64> = pairs.iter().map(|p| f64::from(p.g).abs()).collect();
    a.sort_by(f64::total_cmp);
    (a[a.len() / 2], a[a.len() - 1])
}
