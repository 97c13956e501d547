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
//!   of its round, in seed order (the same bits whatever order the updates arrived in, through
//!   one connection or several ingest workers), with step control folded into the coefficients;
//! * each (client, round, seq) contributes at most once; a seed at most once per round;
//! * updates for any round other than the open one are ignored (counted as stale and logged);
//! * every retained message on the broker is re-derivable from the durable state.
//!
//! This module holds the types the driver sees ([`Outgoing`], [`UpdateOutcome`], [`AggEvent`]),
//! the [`Coordinator`]'s state, its accessors and the metrics records; its methods live by
//! concern:
//! - `persist` — opening (resume or a new job), writing the durable state, republishing the
//!   retained messages derived from it;
//! - `ingest` — statuses and updates in: accept into the open round or refuse;
//! - `round` — the decision after every event (open, extend, commit, abandon), client
//!   selection, the announcements;
//! - `commit` — the commit: robust steps, step, new weights, commit log, checkpoint;
//! - `dev_eval` — model selection's dev evaluations in, and their events;
//! - `tally` — the open round's incremental counts, so that `accept` and `decide` cost O(1).
//!
//! Durability: an update is journaled raw ([`crate::journal`]) and made durable with its batch
//! by one `fdatasync` (group commit); round events (open, extend, commit, abandon) rewrite
//! `state.bin` and start a fresh journal. Nothing derived from an update — its acknowledgement,
//! a commit holding it, a metric counting it — leaves the process before [`Coordinator::persist`]
//! has made it durable.

mod commit;
mod dev_eval;
mod ingest;
mod persist;
mod round;
mod tally;

use std::collections::{BTreeMap, HashSet};

use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{AgentStatus, AggregatorMetrics, Checkpoint};

use crate::config::AggregatorConfig;
use crate::journal::{Journal, Record};
use crate::pacing::RoundPool;
use crate::robust::{NoiseKey, RobustCounters};
use crate::selection::Selection;
use crate::state::{Counters, DurableState, OpenRound, Store};
use crate::step::params_norm;

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
    /// The open round's incremental counts (empty when no round is open).
    tally: tally::Tally,
    /// Clients whose last status is eligible, and busy (kept in step by `on_status`).
    online: usize,
    busy: usize,
    /// The journal extending the last snapshot, and the updates received since the last
    /// [`Self::persist`] (journaled only while no snapshot is due: a snapshot holds them).
    journal: Option<Journal>,
    pending: Vec<Record>,
    /// Durable writes so far: state snapshots and journal appends (group commits).
    writes: DurableWrites,
}

/// The open round at a glance (Prometheus gauges).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LiveRound {
    pub selected: usize,
    pub responded: usize,
    /// Pairs in the pacing block.
    pub pairs: usize,
    pub pacing_z: f64,
    /// Mean g² of the pacing block.
    pub pooled_variance: f64,
}

/// How many fsync'd writes the coordinator made (group-commit figures).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DurableWrites {
    /// `state.bin` rewrites (round events, start).
    pub snapshots: u64,
    /// Journal appends: one `fdatasync` each, for every update received since the last one.
    pub journal_appends: u64,
    /// Updates made durable by journal appends.
    pub journaled_updates: u64,
}

impl Coordinator {
    /// Rebuilds the open round's derived state (pool, seen seeds, tally) from the durable
    /// state: O(round), when a round opens or the aggregator resumes.
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
        let clients = &self.clients;
        let tally = match &self.state.open {
            // Unknown status counts as awaited (see `count_status`).
            Some(open) => tally::Tally::new(open, |id| {
                clients.get(id).is_none_or(|s| s.state.is_eligible())
            }),
            None => tally::Tally::default(),
        };
        self.tally = tally;
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
    /// Fsync'd writes so far (snapshots and group-committed journal appends).
    pub fn durable_writes(&self) -> DurableWrites {
        self.writes
    }
    /// Clients whose last status makes them eligible for a round.
    pub fn clients_online(&self) -> usize {
        self.online
    }
    /// Clients whose last status is busy.
    pub fn clients_busy(&self) -> usize {
        self.busy
    }
    /// The open round's live figures (O(d) for the pacing statistic, nothing per client).
    pub fn live_round(&self) -> Option<LiveRound> {
        let (open, pool) = (self.state.open.as_ref()?, self.pool.as_ref()?);
        Some(LiveRound {
            selected: open.selected.len(),
            responded: self.tally.responded(),
            pairs: pool.len(),
            pacing_z: pool.z(),
            pooled_variance: pool.mean_g2(),
        })
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

    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool, qos: u8) {
        self.out.push(Outgoing {
            topic,
            payload,
            retain,
            qos,
        });
    }

    fn base_metrics(&self, phase: &str, now_ms: u64) -> AggregatorMetrics {
        let c = &self.state.counters;
        AggregatorMetrics {
            job: self.cfg.job.name.clone(),
            unix_ms: now_ms,
            round: self.state.round,
            model_version: self.state.version,
            phase: phase.into(),
            clients_online: self.online as u32,
            clients_busy: self.busy as u32,
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
            m.clients_responded = self.tally.responded() as u32;
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
