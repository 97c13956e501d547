//! The books of one chaos run and their accounting (definitions in [`crate::chaos`]): the
//! [`Ledger`] (updates the broker accepted, commits, statuses), the aggregator's [`Rulings`],
//! its [`FinalState`], and the pure functions [`account`] and [`check_replicas`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use fwdllm_shared::lora::{LoraLayout, LoraWeights, WeightsHash};
use fwdllm_shared::update::apply_commit;
use fwdllm_shared::wire::{ClientUpdate, RoundAnnounce, RoundCommit};
use serde::{Deserialize, Serialize};

use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::{AggEvent, Coordinator, UpdateOutcome};
use fwdllm_aggregator::state::{StateError, Store};

/// `(client, round, seq)`: what the aggregator counts at most once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UpdateId {
    pub client: String,
    pub round: u64,
    pub seq: u32,
}

impl fmt::Display for UpdateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/r{}/s{}", self.client, self.round, self.seq)
    }
}

/// One update id as the ledger subscriber received it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Seeds of each distinct payload received under this id.
    pub payloads: Vec<Vec<u64>>,
    /// Deliveries to the ledger subscriber (more than one: the broker got it more than once).
    pub deliveries: u64,
}

/// What the ledger subscriber saw of one run.
#[derive(Debug, Default)]
pub struct Ledger {
    pub updates: BTreeMap<UpdateId, Observed>,
    /// Every commit, by the version it produced.
    pub commits: BTreeMap<u64, RoundCommit>,
    /// Versions published twice with different contents (never allowed).
    pub commit_forks: u64,
    /// (client, version, hash) of every agent status that named a hash.
    pub statuses: Vec<(String, u64, WeightsHash)>,
    /// The retained round announcement (None once cleared).
    pub announce: Option<RoundAnnounce>,
    /// Marker nonces that came back (see [`crate::chaos::Observer::drain`]).
    pub markers: BTreeSet<u64>,
    /// Reconnections of the ledger subscriber that found no session (it may have missed
    /// messages while away; 0 in a valid run).
    pub sessions_lost: u64,
}

impl Ledger {
    pub fn on_update(&mut self, u: &ClientUpdate) {
        let id = UpdateId {
            client: u.client_id.clone(),
            round: u.round,
            seq: u.seq,
        };
        let seeds: Vec<u64> = u.pairs.iter().map(|p| p.seed).collect();
        let o = self.updates.entry(id).or_default();
        o.deliveries += 1;
        if !o.payloads.contains(&seeds) {
            o.payloads.push(seeds);
        }
    }

    /// Panics on a dense commit: the ledger accounts for every seed, so the aggregator under
    /// test must run with `state.commit_form = "pairs"`.
    pub fn on_commit(&mut self, c: RoundCommit) {
        assert!(
            c.step.pairs().is_some(),
            "commit {} is dense; the ledger needs state.commit_form = \"pairs\"",
            c.new_version
        );
        match self.commits.get(&c.new_version) {
            Some(old) if *old != c => self.commit_forks += 1,
            Some(_) => {}
            None => {
                self.commits.insert(c.new_version, c);
            }
        }
    }

    /// Highest version committed so far (0 before the first commit).
    pub fn version(&self) -> u64 {
        self.commits.keys().next_back().copied().unwrap_or(0)
    }

    /// Whether a commit of `round` was seen.
    pub fn round_committed(&self, round: u64) -> bool {
        self.commits.values().any(|c| c.round == round)
    }

    /// Clients with an update for `round` in the ledger.
    pub fn answered(&self, round: u64) -> BTreeSet<String> {
        self.updates
            .keys()
            .filter(|id| id.round == round)
            .map(|id| id.client.clone())
            .collect()
    }

    /// Every delivery of every update (copies included).
    pub fn deliveries(&self) -> u64 {
        self.updates.values().map(|o| o.deliveries).sum()
    }
}

/// The aggregator's outcome for one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    Duplicate,
    Stale,
    Rejected,
}

/// One line of the rulings log: the aggregator events the accounting needs, as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum RulingRecord {
    Resumed {
        version: u64,
        round: u64,
    },
    Opened {
        round: u64,
        version: u64,
        selected: usize,
    },
    Update {
        client: String,
        round: u64,
        seq: u32,
        verdict: Verdict,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    Committed {
        round: u64,
        version: u64,
    },
    Abandoned {
        round: u64,
    },
}

impl RulingRecord {
    /// The record of `e`, if the accounting needs it.
    pub fn from_event(e: &AggEvent) -> Option<RulingRecord> {
        Some(match e {
            AggEvent::Resumed { version, round, .. } => RulingRecord::Resumed {
                version: *version,
                round: *round,
            },
            AggEvent::RoundOpened {
                round,
                version,
                selected,
            } => RulingRecord::Opened {
                round: *round,
                version: *version,
                selected: *selected,
            },
            AggEvent::Update {
                client,
                round,
                seq,
                outcome,
            } => {
                let (verdict, detail) = match outcome {
                    UpdateOutcome::Accepted { .. } => (Verdict::Accepted, None),
                    UpdateOutcome::Duplicate => (Verdict::Duplicate, None),
                    UpdateOutcome::Stale { current } => {
                        (Verdict::Stale, Some(format!("open round {current}")))
                    }
                    UpdateOutcome::Rejected(why) => (Verdict::Rejected, Some(why.clone())),
                };
                RulingRecord::Update {
                    client: client.clone(),
                    round: *round,
                    seq: *seq,
                    verdict,
                    detail,
                }
            }
            AggEvent::Committed { round, version, .. } => RulingRecord::Committed {
                round: *round,
                version: *version,
            },
            AggEvent::Abandoned { round } => RulingRecord::Abandoned { round: *round },
            _ => return None,
        })
    }

    /// One JSON line (with its newline), to append to a rulings log.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a ruling record serialises");
        s.push('\n');
        s
    }
}

/// What the aggregator ruled over a run (possibly across restarts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rulings {
    pub updates: BTreeMap<UpdateId, Vec<Verdict>>,
    /// Round → the version its commit produced.
    pub committed_rounds: BTreeMap<u64, u64>,
    pub abandoned_rounds: BTreeSet<u64>,
    pub resumes: u64,
    pub rounds_opened: u64,
    /// Lines of a rulings log that did not parse (a write cut by a kill; 0 expected).
    pub unreadable_lines: u64,
}

impl Rulings {
    pub fn record(&mut self, r: &RulingRecord) {
        match r {
            RulingRecord::Resumed { .. } => self.resumes += 1,
            RulingRecord::Opened { .. } => self.rounds_opened += 1,
            RulingRecord::Update {
                client,
                round,
                seq,
                verdict,
                ..
            } => {
                let id = UpdateId {
                    client: client.clone(),
                    round: *round,
                    seq: *seq,
                };
                self.updates.entry(id).or_default().push(*verdict);
            }
            RulingRecord::Committed { round, version } => {
                self.committed_rounds.insert(*round, *version);
            }
            RulingRecord::Abandoned { round } => {
                self.abandoned_rounds.insert(*round);
            }
        }
    }

    /// Parses a rulings log (one [`RulingRecord`] per line).
    pub fn parse_log(text: &str) -> Rulings {
        let mut r = Rulings::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<RulingRecord>(line) {
                Ok(rec) => r.record(&rec),
                Err(_) => r.unreadable_lines += 1,
            }
        }
        r
    }

    /// Deliveries ruled a duplicate of an update already counted.
    pub fn duplicates(&self) -> u64 {
        self.verdicts(Verdict::Duplicate)
    }

    pub fn verdicts(&self, v: Verdict) -> u64 {
        self.updates
            .values()
            .map(|vs| vs.iter().filter(|x| **x == v).count() as u64)
            .sum()
    }

    /// Whether every update of `ledger` has a ruling or is committed.
    pub fn covers(&self, ledger: &Ledger) -> bool {
        let committed: BTreeSet<u64> = ledger
            .commits
            .values()
            .flat_map(|c| pairs_of(c).iter().map(|p| p.seed))
            .collect();
        ledger.updates.iter().all(|(id, o)| {
            self.updates.contains_key(id)
                || o.payloads
                    .iter()
                    .any(|p| !p.is_empty() && p.iter().all(|s| committed.contains(s)))
        })
    }
}

/// The aggregator's durable state when the run stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct FinalState {
    pub version: u64,
    pub hash: WeightsHash,
    /// Rounds opened so far.
    pub round: u64,
    /// The round still open: its number and the (client, seq) it counted.
    pub open: Option<(u64, Vec<(String, u32)>)>,
    /// Updates rejected, by reason (`robust` counters of `state.bin`).
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Robust clipping: pairs clipped and (client, block) contributions capped, over all commits.
    pub clipped_pairs: u64,
    pub capped_clients: u64,
}

impl FinalState {
    /// The durable outcome of the run whose config is `cfg`, read as the aggregator's own
    /// restart reads it ([`Coordinator::resume`]): `state.bin`, the checkpoint it names (hashes
    /// verified) and `journal.bin` replayed through the same ingest — so an update acknowledged
    /// after the last snapshot counts as pending in the open round, as it would after a restart.
    pub fn load(cfg: &AggregatorConfig) -> Result<FinalState, StateError> {
        let dir = &cfg.state.dir;
        if !Store::new(dir)?.exists() {
            return Err(StateError::Io {
                path: dir.join(fwdllm_aggregator::state::STATE_FILE),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no state: the aggregator never committed a snapshot here",
                ),
            });
        }
        let c = Coordinator::resume(cfg.clone())?;
        let robust = c.robust_counters();
        Ok(FinalState {
            version: c.version(),
            hash: c.weights().hash(),
            round: c.round(),
            open: c.open_round().map(|o| (o.round, o.answered.clone())),
            rejected_by_reason: robust.rejected_by_reason.clone(),
            clipped_pairs: robust.clipped_pairs,
            capped_clients: robust.capped_clients,
        })
    }
}

/// How the updates of a run ended (definitions in [`crate::chaos`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Tally {
    /// Distinct update ids the broker accepted.
    pub updates: u64,
    /// Deliveries of those to the ledger subscriber (copies included).
    pub deliveries: u64,
    pub committed: u64,
    pub pending: u64,
    pub abandoned: u64,
    pub late: u64,
    pub rejected: u64,
    pub lost: u64,
    pub doubled: u64,
    pub doubled_pairs: u64,
    /// Committed pairs whose seed is in no ledger update (the ledger missed an update; 0
    /// in a valid run).
    pub unattributed_pairs: u64,
    /// Deliveries the aggregator ruled duplicates (counted once, as it must).
    pub duplicate_rulings: u64,
    /// The first lost and doubled ids, for diagnosis.
    pub lost_examples: Vec<String>,
    pub doubled_examples: Vec<String>,
}

/// The pairs of a commit the ledger took ([`Ledger::on_commit`] admits no dense ones).
fn pairs_of(c: &RoundCommit) -> &[fwdllm_shared::update::SeedCoeff] {
    c.step
        .pairs()
        .expect("the ledger admits pairs commits only")
}

/// Classifies every update of `ledger` (see [`crate::chaos`] for the classes).
pub fn account(ledger: &Ledger, rulings: &Rulings, fin: &FinalState) -> Tally {
    // seed → rounds of the commits holding it (one entry per committed pair).
    let mut committed: HashMap<u64, Vec<u64>> = HashMap::new();
    for c in ledger.commits.values() {
        for p in pairs_of(c) {
            committed.entry(p.seed).or_default().push(c.round);
        }
    }
    let mut t = Tally {
        updates: ledger.updates.len() as u64,
        deliveries: ledger.deliveries(),
        duplicate_rulings: rulings.duplicates(),
        ..Tally::default()
    };
    t.doubled_pairs = committed
        .values()
        .map(|rounds| rounds.len().saturating_sub(1) as u64)
        .sum();
    let mut owned: BTreeSet<u64> = BTreeSet::new();
    let closed = |round: u64| {
        rulings.committed_rounds.contains_key(&round)
            || rulings.abandoned_rounds.contains(&round)
            || ledger.round_committed(round)
    };
    for (id, o) in &ledger.updates {
        owned.extend(o.payloads.iter().flatten().copied());
        let in_commit = |p: &Vec<u64>| {
            !p.is_empty()
                && p.iter().all(|s| {
                    committed
                        .get(s)
                        .is_some_and(|rounds| rounds.contains(&id.round))
                })
        };
        let committed_payloads = o.payloads.iter().filter(|p| in_commit(p)).count();
        let twice = o
            .payloads
            .iter()
            .flatten()
            .any(|s| committed.get(s).is_some_and(|r| r.len() > 1));
        if twice || committed_payloads > 1 {
            t.doubled += 1;
            if t.doubled_examples.len() < 10 {
                t.doubled_examples.push(id.to_string());
            }
        }
        if committed_payloads > 0 {
            t.committed += 1;
            continue;
        }
        let pending = fin.open.as_ref().is_some_and(|(round, answered)| {
            *round == id.round
                && answered
                    .iter()
                    .any(|(c, s)| *c == id.client && *s == id.seq)
        });
        if pending {
            t.pending += 1;
            continue;
        }
        let verdicts = rulings.updates.get(id).map(Vec::as_slice).unwrap_or(&[]);
        // A duplicate ruling means an earlier copy was accepted.
        let accepted = verdicts
            .iter()
            .any(|v| matches!(v, Verdict::Accepted | Verdict::Duplicate));
        let class = if accepted {
            if rulings.abandoned_rounds.contains(&id.round) {
                Some(&mut t.abandoned)
            } else {
                None
            }
        } else if verdicts.contains(&Verdict::Stale) && closed(id.round) {
            Some(&mut t.late)
        } else if verdicts.contains(&Verdict::Rejected) {
            Some(&mut t.rejected)
        } else {
            None
        };
        match class {
            Some(n) => *n += 1,
            None => {
                t.lost += 1;
                if t.lost_examples.len() < 10 {
                    t.lost_examples
                        .push(format!("{id} (rulings {verdicts:?}, not committed)"));
                }
            }
        }
    }
    t.unattributed_pairs = ledger
        .commits
        .values()
        .flat_map(pairs_of)
        .filter(|p| !owned.contains(&p.seed))
        .count() as u64;
    t
}

/// The commits checked against an independent replay (definitions in [`crate::chaos`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplicaCheck {
    /// Versions 1..=final replayed.
    pub commits_replayed: u64,
    /// Versions up to the aggregator's final one that the ledger never received.
    pub commits_missing: u64,
    pub commit_forks: u64,
    /// Commits whose recorded hash differs from the replay (or that do not chain).
    pub reference_mismatches: u64,
    /// 1 when the aggregator's final weights differ from the replay at its version.
    pub aggregator_mismatch: u64,
    /// Agent statuses whose (version, hash) the replay contradicts.
    pub status_mismatches: u64,
    /// The replay's hash of every version it reached (for the agents' replicas).
    #[serde(skip)]
    pub hashes: BTreeMap<u64, WeightsHash>,
}

impl ReplicaCheck {
    pub fn mismatches(&self) -> u64 {
        self.commit_forks
            + self.reference_mismatches
            + self.aggregator_mismatch
            + self.status_mismatches
    }

    /// Whether `(version, hash)` contradicts the replay (unknown versions do not).
    pub fn contradicts(&self, version: u64, hash: &WeightsHash) -> bool {
        self.hashes.get(&version).is_some_and(|h| h != hash)
    }
}

/// Replays the ledger's commits from the initial weights of `layout` up to the aggregator's
/// final version and checks every recorded hash, the final state and every agent status.
pub fn check_replicas(layout: &LoraLayout, ledger: &Ledger, fin: &FinalState) -> ReplicaCheck {
    let mut w = LoraWeights::init(layout.clone());
    let mut r = ReplicaCheck {
        commit_forks: ledger.commit_forks,
        ..ReplicaCheck::default()
    };
    r.hashes.insert(0, w.hash());
    let last = fin.version.max(ledger.version());
    for v in 1..=last {
        let Some(c) = ledger.commits.get(&v) else {
            r.commits_missing += last - v + 1;
            break;
        };
        apply_commit(&mut w, pairs_of(c));
        let h = w.hash();
        r.commits_replayed += 1;
        if c.base_version != v - 1 || h != c.weights_hash {
            r.reference_mismatches += 1;
            break;
        }
        r.hashes.insert(v, h);
    }
    if r.contradicts(fin.version, &fin.hash) {
        r.aggregator_mismatch = 1;
    }
    r.status_mismatches = ledger
        .statuses
        .iter()
        .filter(|(_, v, h)| r.contradicts(*v, h))
        .count() as u64;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::update::SeedCoeff;

    fn id(c: &str, round: u64) -> UpdateId {
        UpdateId {
            client: c.into(),
            round,
            seq: 0,
        }
    }

    fn observed(seeds: &[u64]) -> Observed {
        Observed {
            payloads: vec![seeds.to_vec()],
            deliveries: 1,
        }
    }

    fn commit(round: u64, version: u64, seeds: &[u64]) -> RoundCommit {
        RoundCommit {
            round,
            base_version: version - 1,
            new_version: version,
            step: fwdllm_shared::wire::CommitStep::Pairs(
                seeds
                    .iter()
                    .map(|&seed| SeedCoeff { seed, coeff: 0.0 })
                    .collect(),
            ),
            weights_hash: WeightsHash([0; 32]),
        }
    }

    fn ruled(rs: &[(UpdateId, Verdict)]) -> Rulings {
        let mut r = Rulings::default();
        for (id, v) in rs {
            r.updates.entry(id.clone()).or_default().push(*v);
        }
        r
    }

    fn idle(version: u64) -> FinalState {
        FinalState {
            version,
            hash: WeightsHash([0; 32]),
            round: 0,
            open: None,
            rejected_by_reason: BTreeMap::new(),
            clipped_pairs: 0,
            capped_clients: 0,
        }
    }

    /// One case: updates in the ledger, commits, rulings, final state → the tally's counters
    /// (committed, pending, abandoned, late, rejected, lost, doubled).
    fn check(
        updates: &[(UpdateId, &[u64])],
        commits: &[RoundCommit],
        rulings: Rulings,
        fin: FinalState,
        want: [u64; 7],
    ) {
        let mut l = Ledger::default();
        for (i, seeds) in updates {
            l.updates.insert(i.clone(), observed(seeds));
        }
        for c in commits {
            l.on_commit(c.clone());
        }
        let t = account(&l, &rulings, &fin);
        let got = [
            t.committed,
            t.pending,
            t.abandoned,
            t.late,
            t.rejected,
            t.lost,
            t.doubled,
        ];
        assert_eq!(got, want, "{t:?}");
    }

    #[test]
    fn every_update_lands_in_exactly_one_class() {
        let (a, b) = (id("a", 1), id("b", 1));
        // Both committed once.
        check(
            &[(a.clone(), &[1, 2]), (b.clone(), &[3])],
            &[commit(1, 1, &[1, 2, 3])],
            ruled(&[(a.clone(), Verdict::Accepted)]),
            idle(1),
            [2, 0, 0, 0, 0, 0, 0],
        );
        // b accepted but missing from the commit: lost.
        check(
            &[(a.clone(), &[1, 2]), (b.clone(), &[3])],
            &[commit(1, 1, &[1, 2])],
            ruled(&[(b.clone(), Verdict::Accepted)]),
            idle(1),
            [1, 0, 0, 0, 0, 1, 0],
        );
        // b never ruled on at all: lost.
        check(
            &[(b.clone(), &[3])],
            &[commit(1, 1, &[1])],
            Rulings::default(),
            idle(1),
            [0, 0, 0, 0, 0, 1, 0],
        );
        // A duplicate ruling alone means an accepted copy existed: still owed, so lost.
        check(
            &[(b.clone(), &[3])],
            &[commit(1, 1, &[1])],
            ruled(&[(b.clone(), Verdict::Duplicate)]),
            idle(1),
            [0, 0, 0, 0, 0, 1, 0],
        );
        // Stale after its round committed: late; stale for a round never closed: lost.
        let mut r = ruled(&[(b.clone(), Verdict::Stale)]);
        check(
            &[(b.clone(), &[3])],
            &[commit(1, 1, &[1])],
            r.clone(),
            idle(1),
            [0, 0, 0, 1, 0, 0, 0],
        );
        check(
            &[(id("b", 2), &[4])],
            &[commit(1, 1, &[1])],
            ruled(&[(id("b", 2), Verdict::Stale)]),
            idle(1),
            [0, 0, 0, 0, 0, 1, 0],
        );
        // Accepted into a round later abandoned: abandoned.
        r = ruled(&[(id("b", 2), Verdict::Accepted)]);
        r.abandoned_rounds.insert(2);
        check(
            &[(id("b", 2), &[4])],
            &[],
            r,
            idle(0),
            [0, 0, 1, 0, 0, 0, 0],
        );
        // Rejected: rejected.
        check(
            &[(b.clone(), &[3])],
            &[commit(1, 1, &[1])],
            ruled(&[(b.clone(), Verdict::Rejected)]),
            idle(1),
            [0, 0, 0, 0, 1, 0, 0],
        );
        // In the open round of state.bin: pending.
        let fin = FinalState {
            open: Some((2, vec![("b".into(), 0)])),
            ..idle(1)
        };
        check(
            &[(id("b", 2), &[4])],
            &[commit(1, 1, &[1])],
            ruled(&[(id("b", 2), Verdict::Accepted)]),
            fin,
            [0, 1, 0, 0, 0, 0, 0],
        );
    }

    #[test]
    fn a_pair_applied_twice_is_doubled() {
        let a = id("a", 1);
        // Seed 2 in two commits.
        check(
            &[(a.clone(), &[1, 2])],
            &[commit(1, 1, &[1, 2]), commit(2, 2, &[2])],
            ruled(&[(a.clone(), Verdict::Accepted)]),
            idle(2),
            [1, 0, 0, 0, 0, 0, 1],
        );
        // Two payloads of one id both committed.
        let mut l = Ledger::default();
        l.updates.insert(
            a.clone(),
            Observed {
                payloads: vec![vec![1], vec![2]],
                deliveries: 2,
            },
        );
        l.on_commit(commit(1, 1, &[1, 2]));
        let t = account(&l, &Rulings::default(), &idle(1));
        assert_eq!((t.committed, t.doubled, t.doubled_pairs), (1, 1, 0));
        // Seeds in the commit nobody sent: unattributed.
        l.on_commit(commit(2, 2, &[9]));
        assert_eq!(
            account(&l, &Rulings::default(), &idle(2)).unattributed_pairs,
            1
        );
    }

    #[test]
    fn a_second_commit_of_a_version_with_other_contents_is_a_fork() {
        let mut l = Ledger::default();
        l.on_commit(commit(1, 1, &[1]));
        l.on_commit(commit(1, 1, &[1]));
        assert_eq!(l.commit_forks, 0);
        l.on_commit(commit(1, 1, &[2]));
        assert_eq!(l.commit_forks, 1);
    }

    #[test]
    fn rulings_round_trip_through_the_log() {
        let recs = [
            RulingRecord::Resumed {
                version: 3,
                round: 4,
            },
            RulingRecord::Update {
                client: "a".into(),
                round: 4,
                seq: 0,
                verdict: Verdict::Rejected,
                detail: Some("|g| = 1e9 for seed 3 exceeds robust.max_abs_g".into()),
            },
            RulingRecord::Committed {
                round: 4,
                version: 4,
            },
            RulingRecord::Abandoned { round: 5 },
        ];
        let mut text: String = recs.iter().map(RulingRecord::to_line).collect();
        text.push_str("{\"ev\":\"upd"); // a line cut by a kill
        let r = Rulings::parse_log(&text);
        assert_eq!(r.resumes, 1);
        assert_eq!(r.unreadable_lines, 1);
        assert_eq!(r.committed_rounds.get(&4), Some(&4));
        assert!(r.abandoned_rounds.contains(&5));
        assert_eq!(r.verdicts(Verdict::Rejected), 1);
    }

    #[test]
    fn the_replay_catches_a_wrong_recorded_hash_and_a_wrong_status() {
        let cfg = fwdllm_aggregator::config::AggregatorConfig {
            model: fwdllm_aggregator::config::ModelConfig {
                preset: "tiny".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let layout = cfg.layout().unwrap();
        let mut w = LoraWeights::init(layout.clone());
        let mut l = Ledger::default();
        let mut hashes = vec![w.hash()];
        for v in 1..=3u64 {
            let pairs = vec![SeedCoeff {
                seed: v,
                coeff: 0.01,
            }];
            apply_commit(&mut w, &pairs);
            hashes.push(w.hash());
            l.on_commit(RoundCommit {
                round: v,
                base_version: v - 1,
                new_version: v,
                step: fwdllm_shared::wire::CommitStep::Pairs(pairs),
                weights_hash: w.hash(),
            });
        }
        l.statuses.push(("a".into(), 2, hashes[2]));
        let fin = FinalState {
            hash: hashes[3],
            ..idle(3)
        };
        let r = check_replicas(&layout, &l, &fin);
        assert_eq!((r.commits_replayed, r.mismatches()), (3, 0), "{r:?}");
        l.statuses.push(("b".into(), 1, hashes[2]));
        l.commits.get_mut(&3).unwrap().weights_hash = hashes[1];
        let r = check_replicas(&layout, &l, &fin);
        assert_eq!(r.status_mismatches, 1);
        assert_eq!(r.reference_mismatches, 1);
    }
}
