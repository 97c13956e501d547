//! The commit of a round: the robust steps on the persisted raw pairs (clipping, per-client
//! cap, DP noise), the step (learning rate, trust region), the new weights and their
//! [`RoundCommit`], the retained commit log and checkpoint, and the round's metrics record.
//!
//! Cost of a commit of P pairs: O(P log P) to sort them by seed, O(P) for the robust steps
//! (medians by selection), O(P·d) to apply them to the weights (d = trainable values; once more
//! to re-pool them when the trust region may clamp the step), O(parameters) for the weights hash and,
//! every `checkpoint_every` commits, the checkpoint; then one `state.bin` snapshot holding the
//! commit log since the last checkpoint. Once per round, so O(d) amortised per pooled pair.

use fwdllm_shared::update::apply_commit;
use fwdllm_shared::wire::{self, Checkpoint, CommitStep, RoundCommit};
use log::info;

use super::{AggEvent, Coordinator};
use crate::config::CommitForm;
use crate::pacing::RoundPool;
use crate::robust;
use crate::state::OpenRound;
use crate::step::{make_step, may_clamp, params_norm};

/// Why a round ended with a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CommitReason {
    Gate,
    Cap,
    ExtendsExhausted,
    Deadline,
}

impl Coordinator {
    pub(super) fn commit(&mut self, reason: CommitReason, now_ms: u64) {
        let mut open = self.state.open.take().expect("commit needs an open round");
        canonical_order(&mut open);
        let pool = self.pool.take().expect("pool exists while a round is open");
        self.seen_seeds.clear();
        let responded = std::mem::take(&mut self.tally).responded();
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
        // committed, in the commit's order. The live pool summed in arrival order, whose last
        // bits differ between two arrivals of the same pairs; that only matters when the
        // clamp may act (then the norm scales every coefficient), so an unclamped round reuses
        // the pool and a round near or over the trust region re-pools, O(P·d) once.
        let raw_pool_z = pool.z();
        let near_clamp = may_clamp(
            &self.cfg.step,
            self.state.version,
            pool.mean_norm(),
            theta_norm,
        );
        let pool = if robust.changed || near_clamp {
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
        let commit_step = match self.cfg.state.commit_form {
            CommitForm::Smallest => CommitStep::smaller(step.pairs.clone(), &self.weights),
            CommitForm::Pairs => CommitStep::Pairs(step.pairs.clone()),
        };
        let commit = RoundCommit {
            round: open.round,
            base_version: self.state.version,
            new_version: self.state.version + 1,
            step: commit_step,
            weights_hash: hash,
        };
        self.state.version += 1;
        let v = self.state.version;
        info!(
            "round {} committed ({reason:?}): version {v}, {} pairs from {} clients (sent as {}), z = {:.2}, lr = {:.3e}, ‖Δθ‖ = {:.3e}{}, loss = {:.4}",
            open.round,
            open.pairs.len(),
            responded,
            commit.step.describe(),
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
        // Metrics record of the finished round.
        let mut m = self.base_metrics("committed", now_ms);
        m.round = open.round;
        m.clients_selected = open.selected.len() as u32;
        m.clients_responded = responded as u32;
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
        if !self.finished() {
            // Open the next round right away (same decision as an idle tick).
            self.decide(now_ms);
        }
        // The finished round's announcement is cleared, unless the next one already replaced
        // it: a clear is one more message to every subscriber of the round topic, per round.
        if self.state.open.is_none() {
            self.publish(self.topics.round(), Vec::new(), true, 1);
        }
        if self.finished() {
            self.events.push(AggEvent::Finished { version: v });
        }
    }
}

/// Puts the round's pairs (and their owners) in seed order, so that a commit is the same bits
/// whatever order its updates arrived in — through one connection or several ingest workers
/// (`crate::ingest_workers`), before or after a restart. Seeds are unique within a round
/// (`accept` keeps the first pair of a seed), so the order is total. O(P log P) per commit.
fn canonical_order(open: &mut OpenRound) {
    let mut idx: Vec<usize> = (0..open.pairs.len()).collect();
    idx.sort_unstable_by_key(|&i| open.pairs[i].seed);
    open.pairs = idx.iter().map(|&i| open.pairs[i]).collect();
    // A round opened by a format-1 build has no owners (the per-client cap is then off).
    if open.owners.len() == idx.len() {
        open.owners = idx.iter().map(|&i| open.owners[i]).collect();
    }
}

/// Median and largest |g| of raw pooled pairs (metrics: the honest scale `robust.max_abs_g`
/// was chosen from).
fn g_abs_stats(pairs: &[fwdllm_shared::wire::SeedScalar]) -> (f64, f64) {
    if pairs.is_empty() {
        return (0.0, 0.0);
    }
    let mut a: Vec<f64> = pairs.iter().map(|p| f64::from(p.g).abs()).collect();
    let max = a.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // O(P): the element a sort would put at len/2.
    let mid = a.len() / 2;
    let (_, median, _) = a.select_nth_unstable_by(mid, f64::total_cmp);
    (*median, max)
}
