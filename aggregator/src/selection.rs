//! Model selection: which version's adapter is exported. Every `selection.eval_every` commits
//! the round announcement asks the agents to evaluate their fixed dev subset at the announced
//! version ([`fwdllm_shared::wire::EVAL_EVERY_KEY`]); each answers with an
//! [`EvalReport`]. This module sums the reports of a version, keeps that version's weights
//! until its tally is final, and writes the best version so far (dev accuracy, then dev loss)
//! to `best.bin` + `best.json` in the state directory, which `export` prefers over the last
//! version. Tallies in flight are not durable: after a restart a version whose reports were
//! still coming in is simply not scored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use fwdllm_shared::wire::{self, Checkpoint, EvalReport};
use log::{info, warn};
use serde::{Deserialize, Serialize};

use crate::state::{atomic_write, StateError};

/// Weights of the best version so far (a `Checkpoint` message, so it carries its layout).
pub const BEST_WEIGHTS_FILE: &str = "best.bin";
/// What the best version scored ([`BestRecord`], JSON).
pub const BEST_RECORD_FILE: &str = "best.json";

/// Versions whose tallies may be open at once; the oldest is scored with what it has when a
/// newer one would exceed this (reports of a version arrive within a round or two).
const MAX_PENDING: usize = 4;

/// The dev score of one version, summed over the clients that reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestRecord {
    pub model_version: u64,
    pub weights_hash: WeightsHash,
    pub dev_accuracy: f64,
    pub dev_loss: f64,
    pub examples: u64,
    pub clients: u32,
}

impl BestRecord {
    /// Higher accuracy wins; on equal accuracy the lower loss (for tasks without accuracy, the
    /// loss alone decides). Ties keep the earlier version.
    fn beats(&self, other: &BestRecord) -> bool {
        self.dev_accuracy > other.dev_accuracy
            || (self.dev_accuracy == other.dev_accuracy && self.dev_loss < other.dev_loss)
    }
}

/// Why a report was not counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportRejected {
    #[error("version {0} was not asked to be evaluated (or its tally is closed)")]
    NotPending(u64),
    #[error("weights hash differs from the aggregator's at version {0}")]
    HashMismatch(u64),
    #[error("already reported version {0}")]
    Duplicate(u64),
    #[error("malformed report: {0}")]
    Malformed(&'static str),
}

#[derive(Debug)]
struct Pending {
    weights: LoraWeights,
    /// `weights.hash()`, computed once: every report is checked against it.
    hash: WeightsHash,
    /// Clients asked (those selected for the round opened at this version); 0 = not known yet.
    expected: usize,
    clients: BTreeSet<String>,
    examples: u64,
    correct: u64,
    loss_sum: f64,
}

/// Dev-score tallies and the best version kept on disk.
#[derive(Debug)]
pub struct Selection {
    dir: PathBuf,
    eval_every: u64,
    pending: BTreeMap<u64, Pending>,
    best: Option<BestRecord>,
}

impl Selection {
    /// Reads the best record in `dir` if there is one (a missing or unreadable record means
    /// none: it only ever improves the export, never the training state).
    pub fn open(dir: &Path, eval_every: u64) -> Selection {
        let best = match std::fs::read(dir.join(BEST_RECORD_FILE)) {
            Ok(bytes) => match serde_json::from_slice::<BestRecord>(&bytes) {
                Ok(r) => Some(r),
                Err(e) => {
                    warn!(
                        "ignoring {}: {e}; the next dev evaluation writes a new one",
                        dir.join(BEST_RECORD_FILE).display()
                    );
                    None
                }
            },
            Err(_) => None,
        };
        Selection {
            dir: dir.to_path_buf(),
            eval_every,
            pending: BTreeMap::new(),
            best,
        }
    }

    /// True if the agents should evaluate version `v`.
    pub fn wants(&self, v: u64) -> bool {
        self.eval_every > 0 && v % self.eval_every == 0
    }

    pub fn eval_every(&self) -> u64 {
        self.eval_every
    }

    pub fn best(&self) -> Option<&BestRecord> {
        self.best.as_ref()
    }

    /// A round opens at version `v` with `selected` clients: if `v` is to be evaluated, keep
    /// its weights and expect that many reports. Returns a record if making room scored an
    /// older version.
    pub fn round_opened(
        &mut self,
        v: u64,
        weights: &LoraWeights,
        selected: usize,
    ) -> Result<Option<BestRecord>, StateError> {
        if !self.wants(v) {
            return Ok(None);
        }
        if let Some(p) = self.pending.get_mut(&v) {
            p.expected = selected; // a reopened round at the same version
            return Ok(None);
        }
        let mut scored = None;
        while self.pending.len() >= MAX_PENDING {
            let (&oldest, _) = self.pending.iter().next().expect("non-empty");
            scored = self.close(oldest)?.or(scored);
        }
        self.pending.insert(
            v,
            Pending {
                hash: weights.hash(),
                weights: weights.clone(),
                expected: selected,
                clients: BTreeSet::new(),
                examples: 0,
                correct: 0,
                loss_sum: 0.0,
            },
        );
        Ok(scored)
    }

    /// Counts one client's report. Returns the version's record once every asked client has
    /// reported (and writes it as the new best if it is).
    pub fn on_report(&mut self, r: &EvalReport) -> Result<Option<BestRecord>, SelectionError> {
        if r.examples == 0 {
            return Err(ReportRejected::Malformed("no examples").into());
        }
        if r.correct > r.examples {
            return Err(ReportRejected::Malformed("more correct than examples").into());
        }
        if !r.loss_sum.is_finite() || r.loss_sum < 0.0 {
            return Err(ReportRejected::Malformed("loss is negative or not finite").into());
        }
        let p = self
            .pending
            .get_mut(&r.model_version)
            .ok_or(ReportRejected::NotPending(r.model_version))?;
        if p.hash != r.weights_hash {
            return Err(ReportRejected::HashMismatch(r.model_version).into());
        }
        if !p.clients.insert(r.client_id.clone()) {
            return Err(ReportRejected::Duplicate(r.model_version).into());
        }
        p.examples += u64::from(r.examples);
        p.correct += u64::from(r.correct);
        p.loss_sum += r.loss_sum;
        if p.expected > 0 && p.clients.len() >= p.expected {
            return Ok(self.close(r.model_version)?);
        }
        Ok(None)
    }

    /// Scores every open tally with the reports it has (at shutdown, before an export).
    pub fn close_all(&mut self) -> Result<Option<BestRecord>, StateError> {
        let versions: Vec<u64> = self.pending.keys().copied().collect();
        let mut last = None;
        for v in versions {
            last = self.close(v)?.or(last);
        }
        Ok(last)
    }

    /// Ends the tally of `v`: its record (none if nobody reported), written as the new best
    /// (weights first, then the record naming them) if it beats the old one.
    fn close(&mut self, v: u64) -> Result<Option<BestRecord>, StateError> {
        let Some(p) = self.pending.remove(&v) else {
            return Ok(None);
        };
        if p.clients.is_empty() {
            return Ok(None);
        }
        let rec = BestRecord {
            model_version: v,
            weights_hash: p.hash,
            dev_accuracy: p.correct as f64 / p.examples as f64,
            dev_loss: p.loss_sum / p.examples as f64,
            examples: p.examples,
            clients: p.clients.len() as u32,
        };
        let better = self.best.as_ref().is_none_or(|b| rec.beats(b));
        info!(
            model_version = v,
            dev_accuracy = rec.dev_accuracy,
            dev_loss = rec.dev_loss,
            clients = rec.clients;
            "dev evaluation of version {v}: accuracy {:.4}, loss {:.4} over {} examples from {} clients{}",
            rec.dev_accuracy,
            rec.dev_loss,
            rec.examples,
            rec.clients,
            if better { " (best so far)" } else { "" }
        );
        if better {
            let ck = Checkpoint::from_weights(v, &p.weights);
            atomic_write(&self.dir.join(BEST_WEIGHTS_FILE), &wire::encode(&ck))?;
            let json = serde_json::to_vec_pretty(&rec).expect("record serialises");
            atomic_write(&self.dir.join(BEST_RECORD_FILE), &json)?;
            self.best = Some(rec.clone());
        }
        Ok(Some(rec))
    }
}

/// A report that was not counted, or a best version that could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SelectionError {
    #[error(transparent)]
    Rejected(#[from] ReportRejected),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The best version's weights and record in a state directory, if model selection wrote them.
/// The record must name the weights it sits beside (a crash between the two writes leaves the
/// old record, which then does not match and is refused).
pub fn load_best(dir: &Path) -> Result<Option<(BestRecord, LoraWeights)>, String> {
    let rec_path = dir.join(BEST_RECORD_FILE);
    let Ok(bytes) = std::fs::read(&rec_path) else {
        return Ok(None);
    };
    let rec: BestRecord = serde_json::from_slice(&bytes).map_err(|e| {
        format!(
            "{}: {e}; delete it to export the last version",
            rec_path.display()
        )
    })?;
    let w_path = dir.join(BEST_WEIGHTS_FILE);
    let bytes = std::fs::read(&w_path).map_err(|e| format!("{}: {e}", w_path.display()))?;
    let ck: Checkpoint = wire::decode(&bytes).map_err(|e| format!("{}: {e}", w_path.display()))?;
    let weights = ck
        .to_weights()
        .map_err(|e| format!("{}: {e}", w_path.display()))?;
    if ck.model_version != rec.model_version || weights.hash() != rec.weights_hash {
        return Err(format!(
            "{} (version {}) does not match {} (version {}); delete both to export the last version",
            w_path.display(),
            ck.model_version,
            rec_path.display(),
            rec.model_version
        ));
    }
    Ok(Some((rec, weights)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::lora::{LoraConfig, LoraLayout, ModelShape};
    use fwdllm_shared::update::apply_commit;
    use fwdllm_shared::update::SeedCoeff;

    fn weights(step: u64) -> LoraWeights {
        let shape = ModelShape::smollm2_135m();
        let layout = LoraLayout::new(&shape, &LoraConfig::default()).unwrap();
        let mut w = LoraWeights::init(layout);
        for s in 0..step {
            apply_commit(
                &mut w,
                &[SeedCoeff {
                    seed: s,
                    coeff: 1e-3,
                }],
            );
        }
        w
    }

    fn report(
        client: &str,
        v: u64,
        w: &LoraWeights,
        n: u32,
        correct: u32,
        loss: f64,
    ) -> EvalReport {
        EvalReport {
            client_id: client.into(),
            model_version: v,
            weights_hash: w.hash(),
            examples: n,
            correct,
            loss_sum: loss * f64::from(n),
        }
    }

    #[test]
    fn keeps_the_best_version_not_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Selection::open(dir.path(), 10);
        assert!(s.wants(0) && s.wants(20) && !s.wants(15));
        // (version, accuracy per client): version 10 is best, 20 is worse.
        for (v, correct) in [(0u64, [10u32, 12]), (10, [20, 22]), (20, [18, 19])] {
            let w = weights(v);
            s.round_opened(v, &w, 2).unwrap();
            assert!(s
                .on_report(&report("a", v, &w, 32, correct[0], 0.5))
                .unwrap()
                .is_none());
            let rec = s
                .on_report(&report("b", v, &w, 32, correct[1], 0.5))
                .unwrap()
                .unwrap();
            assert_eq!(rec.examples, 64);
            assert_eq!(rec.dev_accuracy, f64::from(correct[0] + correct[1]) / 64.0);
        }
        let best = s.best().unwrap().clone();
        assert_eq!(best.model_version, 10);
        let (rec, w) = load_best(dir.path()).unwrap().unwrap();
        assert_eq!(rec, best);
        assert_eq!(w.hash(), weights(10).hash());
        // A new process finds the same best.
        assert_eq!(Selection::open(dir.path(), 10).best(), Some(&best));
    }

    #[test]
    fn bad_reports_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Selection::open(dir.path(), 5);
        let w = weights(5);
        s.round_opened(5, &w, 3).unwrap();
        let check = |s: &mut Selection, r: EvalReport, want: ReportRejected| match s.on_report(&r) {
            Err(SelectionError::Rejected(got)) => assert_eq!(got, want),
            other => panic!("expected {want:?}, got {other:?}"),
        };
        check(
            &mut s,
            report("a", 6, &w, 8, 1, 0.1),
            ReportRejected::NotPending(6),
        );
        check(
            &mut s,
            report("a", 5, &weights(4), 8, 1, 0.1),
            ReportRejected::HashMismatch(5),
        );
        check(
            &mut s,
            report("a", 5, &w, 0, 0, 0.1),
            ReportRejected::Malformed("no examples"),
        );
        check(
            &mut s,
            report("a", 5, &w, 8, 9, 0.1),
            ReportRejected::Malformed("more correct than examples"),
        );
        check(
            &mut s,
            report("a", 5, &w, 8, 1, f64::NAN),
            ReportRejected::Malformed("loss is negative or not finite"),
        );
        s.on_report(&report("a", 5, &w, 8, 1, 0.1)).unwrap();
        check(
            &mut s,
            report("a", 5, &w, 8, 1, 0.1),
            ReportRejected::Duplicate(5),
        );
        // Closing scores what came in; nothing was written before.
        assert!(load_best(dir.path()).unwrap().is_none());
        let rec = s.close_all().unwrap().unwrap();
        assert_eq!((rec.model_version, rec.clients), (5, 1));
        assert!(load_best(dir.path()).unwrap().is_some());
    }

    #[test]
    fn pending_tallies_are_bounded_and_mismatched_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Selection::open(dir.path(), 1);
        let w0 = weights(0);
        s.round_opened(0, &w0, 2).unwrap();
        s.on_report(&report("a", 0, &w0, 4, 4, 0.1)).unwrap();
        for v in 1..=MAX_PENDING as u64 {
            let scored = s.round_opened(v, &weights(v), 2).unwrap();
            // Making room for the fifth version scores version 0 with its one report.
            assert_eq!(
                scored.map(|r| r.model_version),
                (v == MAX_PENDING as u64).then_some(0)
            );
        }
        assert_eq!(s.best().unwrap().model_version, 0);
        // A record that names other weights than the file beside it is refused, not used.
        let mut rec = s.best().unwrap().clone();
        rec.model_version = 3;
        std::fs::write(
            dir.path().join(BEST_RECORD_FILE),
            serde_json::to_vec(&rec).unwrap(),
        )
        .unwrap();
        let err = load_best(dir.path()).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
    }
}
