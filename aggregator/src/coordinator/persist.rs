//! The coordinator and its durable state: [`Coordinator::open`] (resume from `state.dir`, or
//! a new job at version 0), [`Coordinator::persist`] (a new checkpoint, then the state that
//! names it — the commit point — then pruning), and the retained messages re-derived from that
//! state after a start or a reconnect ([`Coordinator::republish_retained`]).
//!
//! Group commit: between round events `persist` only appends the updates received since the
//! last call to the journal (one `fdatasync` for all of them); a round event rewrites
//! `state.bin` (O(open round + commit log)) and starts a fresh journal. At open the journal's
//! records are replayed through the ingest on top of `state.bin`.

use std::collections::{BTreeMap, HashSet};

use fwdllm_shared::lora::LoraWeights;
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{self, AgentState, AgentStatus, Checkpoint};
use log::info;

use super::{Coordinator, DurableWrites};
use crate::config::AggregatorConfig;
use crate::journal::Journal;
use crate::robust::{NoiseKey, RobustCounters};
use crate::selection::Selection;
use crate::state::{Counters, DurableState, StateError, Store, STATE_FORMAT};

impl Coordinator {
    /// Opens the state in `cfg.state.dir` (resuming if present, else starting at version 0) and
    /// makes the replayed journal part of a fresh snapshot.
    pub fn open(cfg: AggregatorConfig) -> Result<Coordinator, StateError> {
        let mut c = Coordinator::resume(cfg)?;
        // A fresh snapshot holding the replayed updates, and an empty journal after it.
        c.persist()?;
        Ok(c)
    }

    /// What a restart resumes from — `state.bin`, the checkpoint it names and `journal.bin`
    /// replayed through the same ingest — without writing anything (benches and tests read the
    /// durable outcome of a stopped run through it, exactly as the next start would see it).
    pub fn resume(cfg: AggregatorConfig) -> Result<Coordinator, StateError> {
        let topics = Topics::new(&cfg.job.name).map_err(|e| StateError::Mismatch {
            dir: cfg.state.dir.clone(),
            message: e.to_string(),
        })?;
        let store = Store::new(&cfg.state.dir)?;
        let layout = cfg.layout().map_err(|message| StateError::Mismatch {
            dir: cfg.state.dir.clone(),
            message,
        })?;
        let mut journaled = Vec::new();
        let (state, weights, checkpoint) = if store.exists() {
            let (state, weights, checkpoint) = store.load()?;
            journaled = Journal::read(store.dir(), &store.state_hash()?)?;
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
            tally: Default::default(),
            online: 0,
            busy: 0,
            journal: None,
            pending: Vec::new(),
            writes: DurableWrites::default(),
        };
        c.rebuild_pool();
        if !journaled.is_empty() {
            info!(
                "replaying {} journaled updates on top of {}",
                journaled.len(),
                crate::state::STATE_FILE
            );
        }
        for r in &journaled {
            c.ingest(&r.client, &r.payload, false);
        }
        Ok(c)
    }

    /// Writes what changed: a new checkpoint under its own name, then the state that names it
    /// (the commit point) and a fresh journal after it — or, when no round event happened, only
    /// the updates received since the last call, appended to the journal with one `fdatasync`
    /// (group commit) — then deletes the checkpoints no state needs any more. A crash between
    /// any two steps leaves the previous state with the checkpoint it names and the journal
    /// that extends it. Call before sending [`Self::take_outgoing`] and before acknowledging the
    /// updates handled since the last call.
    pub fn persist(&mut self) -> Result<(), StateError> {
        if self.checkpoint_dirty {
            self.store.save_checkpoint(&self.checkpoint)?;
            self.checkpoint_dirty = false;
            self.prune_checkpoints = true;
        }
        if self.dirty || (self.journal.is_none() && !self.pending.is_empty()) {
            let base = self.store.save_state(&self.state)?;
            self.writes.snapshots += 1;
            // A crash here leaves the old journal, which names the old snapshot: ignored.
            self.journal = Some(Journal::create(self.store.dir(), &base)?);
            self.pending.clear();
            self.dirty = false;
        } else if let (Some(j), false) = (self.journal.as_mut(), self.pending.is_empty()) {
            j.append(&self.pending)?;
            self.writes.journal_appends += 1;
            self.writes.journaled_updates += self.pending.len() as u64;
            self.pending.clear();
        }
        if self.prune_checkpoints {
            self.store
                .prune_checkpoints(self.state.checkpoint_version)?;
            self.prune_checkpoints = false;
        }
        Ok(())
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
            Some(a) => {
                let qos = super::round::announce_qos(&a.selection);
                self.publish(self.topics.round(), wire::encode(&a), true, qos)
            }
            None => self.publish(self.topics.round(), Vec::new(), true, 1),
        }
        let mut st = AgentStatus::new(self.cfg.broker.client_id.clone(), AgentState::Online);
        st.model_version = self.state.version;
        st.weights_hash = Some(self.weights.hash());
        st.unix_ms = now_ms;
        st.agent_version = env!("CARGO_PKG_VERSION").into();
        self.publish(self.topics.aggregator(), wire::encode_json(&st), true, 1);
    }
}
