//! The open round's incremental counts: which selected client sits at which index, which
//! (client, request) answers were counted or refused, how many selected clients have answered
//! at all, and how many eligible ones the current request still waits for.
//!
//! `accept` and `decide` run after every update, so everything they read must cost O(1):
//! before this index, `responded()` sorted the round's answers and `decide` rebuilt a set of
//! them per update, which made a round of C clients cost O(C² log C) and ingest fall as the
//! fleet grew. The tally is derived state: rebuilt from the durable [`OpenRound`] in O(round)
//! when a round opens or the aggregator resumes, then kept in step by the coordinator on every
//! answer, refusal, status change and extend.

use std::collections::{HashMap, HashSet};

use crate::state::OpenRound;

#[derive(Debug, Default)]
pub(super) struct Tally {
    /// Selected client id → its index in [`OpenRound::selected`].
    index: HashMap<String, u32>,
    /// (index, seq) already counted.
    answered: HashSet<(u32, u32)>,
    /// (index, seq) refused for its content.
    refused: HashSet<(u32, u32)>,
    /// Per selected client: at least one answer counted.
    responded: Vec<bool>,
    responded_count: usize,
    /// Per selected client: answered or refused the current request.
    done: Vec<bool>,
    /// Per selected client: eligible in the status table (kept in step by `on_status`).
    eligible: Vec<bool>,
    /// Selected clients that are eligible and not done with the current request.
    awaiting: usize,
    /// The current request (0 = the round's first, n = the n-th extend).
    extend: u32,
}

impl Tally {
    /// The tally of `open` as persisted, with each selected client's eligibility.
    pub(super) fn new(open: &OpenRound, is_eligible: impl Fn(&str) -> bool) -> Tally {
        let mut t = Tally {
            extend: open.extend,
            ..Tally::default()
        };
        for id in &open.selected {
            t.add_selected(id, is_eligible(id));
        }
        for (id, seq) in &open.answered {
            if let Some(i) = t.index_of(id) {
                t.answer(i, *seq);
            }
        }
        for (id, seq) in &open.refused {
            if let Some(i) = t.index_of(id) {
                t.refuse(i, *seq);
            }
        }
        t
    }

    /// Adds a client at the next index (the order of [`OpenRound::selected`]).
    pub(super) fn add_selected(&mut self, id: &str, eligible: bool) -> u32 {
        let i = self.responded.len() as u32;
        self.index.insert(id.to_owned(), i);
        self.responded.push(false);
        self.done.push(false);
        self.eligible.push(eligible);
        if eligible {
            self.awaiting += 1;
        }
        i
    }

    /// The index of a selected client.
    pub(super) fn index_of(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    pub(super) fn has_answered(&self, i: u32, seq: u32) -> bool {
        self.answered.contains(&(i, seq))
    }

    pub(super) fn is_refused(&self, i: u32, seq: u32) -> bool {
        self.refused.contains(&(i, seq))
    }

    /// Counts an answer of client `i` to request `seq` (once per key).
    pub(super) fn answer(&mut self, i: u32, seq: u32) {
        if !self.answered.insert((i, seq)) {
            return;
        }
        let k = i as usize;
        if !self.responded[k] {
            self.responded[k] = true;
            self.responded_count += 1;
        }
        if seq == self.extend {
            self.finish(k);
        }
    }

    /// Records that client `i`'s answer to `seq` was refused: the round stops waiting for it.
    pub(super) fn refuse(&mut self, i: u32, seq: u32) {
        if self.refused.insert((i, seq)) && seq == self.extend {
            self.finish(i as usize);
        }
    }

    fn finish(&mut self, k: usize) {
        if !self.done[k] {
            self.done[k] = true;
            if self.eligible[k] {
                self.awaiting -= 1;
            }
        }
    }

    /// A selected client's status changed.
    pub(super) fn set_eligible(&mut self, id: &str, eligible: bool) {
        let Some(i) = self.index_of(id) else { return };
        let k = i as usize;
        if self.eligible[k] == eligible {
            return;
        }
        self.eligible[k] = eligible;
        if !self.done[k] {
            if eligible {
                self.awaiting += 1;
            } else {
                self.awaiting -= 1;
            }
        }
    }

    /// A new request (extend) went out: nobody has answered it yet. O(selected), once per extend.
    pub(super) fn next_request(&mut self, extend: u32) {
        self.extend = extend;
        self.awaiting = 0;
        for k in 0..self.done.len() {
            let done = self.answered.contains(&(k as u32, extend))
                || self.refused.contains(&(k as u32, extend));
            self.done[k] = done;
            if !done && self.eligible[k] {
                self.awaiting += 1;
            }
        }
    }

    /// Selected clients with at least one counted answer.
    pub(super) fn responded(&self) -> usize {
        self.responded_count
    }

    /// Eligible selected clients that have not answered (or been refused on) the current request.
    pub(super) fn awaiting(&self) -> usize {
        self.awaiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::LossStats;
    use fwdllm_shared::lora::WeightsHash;
    use fwdllm_shared::wire::{ClientSelection, RoundAnnounce, TaskParams};

    fn open(selected: &[&str]) -> OpenRound {
        OpenRound {
            round: 1,
            base_version: 0,
            started_unix_ms: 0,
            deadline_unix_ms: 1,
            extend: 0,
            selected: selected.iter().map(|s| s.to_string()).collect(),
            answered: Vec::new(),
            pairs: Vec::new(),
            loss: LossStats::default(),
            announce: RoundAnnounce {
                job: "j".into(),
                round: 1,
                model_version: 0,
                weights_hash: WeightsHash([0; 32]),
                perturbations_per_client: 1,
                eps: 1e-3,
                deadline_unix_ms: 1,
                selection: ClientSelection::All,
                task: TaskParams::default(),
                seed_base: 0,
                extend: 0,
            },
            owners: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// The counts the coordinator used to recompute per update, from the persisted round.
    fn slow(open: &OpenRound, eligible: &dyn Fn(&str) -> bool) -> (usize, usize) {
        let mut ids: Vec<&str> = open.answered.iter().map(|(c, _)| c.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let awaiting = open
            .selected
            .iter()
            .filter(|c| {
                eligible(c)
                    && !open
                        .answered
                        .iter()
                        .chain(&open.refused)
                        .any(|(a, s)| a == *c && *s == open.extend)
            })
            .count();
        (ids.len(), awaiting)
    }

    #[test]
    fn incremental_counts_match_a_recount_after_every_event() {
        let mut o = open(&["a", "b", "c", "d"]);
        let mut online: HashSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut t = Tally::new(&o, |id| online.contains(id));
        let check = |t: &Tally, o: &OpenRound, online: &HashSet<String>| {
            let want = slow(o, &|id| online.contains(id));
            assert_eq!((t.responded(), t.awaiting()), want, "{o:?}");
            // Rebuilding from the persisted round gives the same counts (resume).
            let r = Tally::new(o, |id| online.contains(id));
            assert_eq!((r.responded(), r.awaiting()), want);
        };
        check(&t, &o, &online);
        // a answers, b is refused, d comes online, c goes offline.
        for (id, seq) in [("a", 0), ("a", 0)] {
            let i = t.index_of(id).unwrap();
            if !t.has_answered(i, seq) {
                o.answered.push((id.into(), seq));
            }
            t.answer(i, seq);
            check(&t, &o, &online);
        }
        let b = t.index_of("b").unwrap();
        o.refused.push(("b".into(), 0));
        t.refuse(b, 0);
        assert!(t.is_refused(b, 0));
        check(&t, &o, &online);
        online.insert("d".into());
        t.set_eligible("d", true);
        check(&t, &o, &online);
        online.remove("c");
        t.set_eligible("c", false);
        check(&t, &o, &online);
        // An extend: everyone eligible is awaited again; a late answer to request 0 counts as
        // a response but does not finish request 1.
        o.extend = 1;
        t.next_request(1);
        check(&t, &o, &online);
        let d = t.index_of("d").unwrap();
        o.answered.push(("d".into(), 0));
        t.answer(d, 0);
        check(&t, &o, &online);
        o.answered.push(("d".into(), 1));
        t.answer(d, 1);
        check(&t, &o, &online);
        assert_eq!(t.index_of("zz"), None);
        t.set_eligible("zz", true);
        check(&t, &o, &online);
    }
}
