//! Reading `state.bin` of earlier formats, so an upgraded aggregator resumes where the old one
//! stopped (the open round included). Each older layout is kept here as it was, frozen.

use fwdllm_shared::lora::{LoraConfig, ModelShape, WeightsHash};
use fwdllm_shared::update::SeedCoeff;
use fwdllm_shared::wire::{CommitStep, RoundAnnounce, RoundCommit, SeedScalar};
use serde::Deserialize;

use super::{Counters, DurableState, LossStats, OpenRound, STATE_FORMAT};
use crate::robust::RobustCounters;

/// Decodes a `state.bin` of the current format or of formats 1 and 2 (upgraded in memory; the
/// next write stores the current format). The format number is the first field of every version.
pub(crate) fn decode_state(bytes: &[u8]) -> Result<DurableState, String> {
    let (format, _) = postcard::take_from_bytes::<u32>(bytes).map_err(|e| e.to_string())?;
    match format {
        1 => postcard::from_bytes::<StateV1>(bytes)
            .map(StateV1::upgrade)
            .map_err(|e| e.to_string()),
        2 => postcard::from_bytes::<StateV2>(bytes)
            .map(StateV2::upgrade)
            .map_err(|e| e.to_string()),
        STATE_FORMAT => postcard::from_bytes(bytes).map_err(|e| e.to_string()),
        other => Err(format!(
            "format {other} (this build reads {STATE_FORMAT}, 2 and 1); run the aggregator version that wrote it"
        )),
    }
}

/// A pair as formats 1 and 2 stored it (the wire's fixed-width seed, then the f32).
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct PairV2(#[serde(with = "postcard::fixint::le")] u64, f32);

/// `RoundCommit` of formats 1 and 2 (protocol 2): always its pairs.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct CommitV2 {
    round: u64,
    base_version: u64,
    new_version: u64,
    pairs: Vec<PairV2>,
    weights_hash: WeightsHash,
}

impl CommitV2 {
    fn upgrade(self) -> RoundCommit {
        RoundCommit {
            round: self.round,
            base_version: self.base_version,
            new_version: self.new_version,
            step: CommitStep::Pairs(
                self.pairs
                    .into_iter()
                    .map(|PairV2(seed, coeff)| SeedCoeff { seed, coeff })
                    .collect(),
            ),
            weights_hash: self.weights_hash,
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct StateV2 {
    format: u32,
    job: String,
    shape: ModelShape,
    lora: LoraConfig,
    seed_base: u64,
    version: u64,
    round: u64,
    checkpoint_version: u64,
    log: Vec<CommitV2>,
    last_commit: Option<CommitV2>,
    open: Option<OpenRound>,
    counters: Counters,
    robust: RobustCounters,
}

impl StateV2 {
    fn upgrade(self) -> DurableState {
        let _ = self.format;
        DurableState {
            format: STATE_FORMAT,
            job: self.job,
            shape: self.shape,
            lora: self.lora,
            seed_base: self.seed_base,
            version: self.version,
            round: self.round,
            checkpoint_version: self.checkpoint_version,
            log: self.log.into_iter().map(CommitV2::upgrade).collect(),
            last_commit: self.last_commit.map(CommitV2::upgrade),
            open: self.open,
            counters: self.counters,
            robust: self.robust,
        }
    }
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct OpenRoundV1 {
    round: u64,
    base_version: u64,
    started_unix_ms: u64,
    deadline_unix_ms: u64,
    extend: u32,
    selected: Vec<String>,
    answered: Vec<(String, u32)>,
    pairs: Vec<SeedScalar>,
    loss: LossStats,
    announce: RoundAnnounce,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct StateV1 {
    format: u32,
    job: String,
    shape: ModelShape,
    lora: LoraConfig,
    seed_base: u64,
    version: u64,
    round: u64,
    checkpoint_version: u64,
    log: Vec<CommitV2>,
    last_commit: Option<CommitV2>,
    open: Option<OpenRoundV1>,
    counters: Counters,
}

impl StateV1 {
    fn upgrade(self) -> DurableState {
        let _ = self.format;
        DurableState {
            format: STATE_FORMAT,
            job: self.job,
            shape: self.shape,
            lora: self.lora,
            seed_base: self.seed_base,
            version: self.version,
            round: self.round,
            checkpoint_version: self.checkpoint_version,
            log: self.log.into_iter().map(CommitV2::upgrade).collect(),
            last_commit: self.last_commit.map(CommitV2::upgrade),
            // Owners unknown: the per-client cap skips this one round (clipping still applies).
            open: self.open.map(|o| OpenRound {
                round: o.round,
                base_version: o.base_version,
                started_unix_ms: o.started_unix_ms,
                deadline_unix_ms: o.deadline_unix_ms,
                extend: o.extend,
                selected: o.selected,
                answered: o.answered,
                pairs: o.pairs,
                loss: o.loss,
                announce: o.announce,
                owners: Vec::new(),
                refused: Vec::new(),
            }),
            counters: self.counters,
            robust: RobustCounters::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregatorConfig;
    use fwdllm_shared::wire::{ClientSelection, TaskParams};

    #[test]
    fn format_1_and_2_states_are_upgraded() {
        let layout = AggregatorConfig::default().layout().unwrap();
        let announce_hash = fwdllm_shared::lora::LoraWeights::init(layout.clone()).hash();
        let announce = RoundAnnounce {
            job: "j".into(),
            round: 4,
            model_version: 3,
            weights_hash: fwdllm_shared::lora::LoraWeights::init(layout.clone()).hash(),
            perturbations_per_client: 8,
            eps: 1e-3,
            deadline_unix_ms: 99,
            selection: ClientSelection::All,
            task: TaskParams::default(),
            seed_base: 1,
            extend: 0,
        };
        let v1 = StateV1 {
            format: 1,
            job: "j".into(),
            shape: layout.shape().clone(),
            lora: layout.config().clone(),
            seed_base: 1,
            version: 3,
            round: 4,
            checkpoint_version: 0,
            log: Vec::new(),
            last_commit: None,
            open: Some(OpenRoundV1 {
                round: 4,
                base_version: 3,
                started_unix_ms: 1,
                deadline_unix_ms: 99,
                extend: 0,
                selected: vec!["a".into()],
                answered: vec![("a".into(), 0)],
                pairs: vec![SeedScalar { seed: 5, g: 0.5 }],
                loss: LossStats::default(),
                announce,
            }),
            counters: Counters {
                updates: 7,
                ..Counters::default()
            },
        };
        let s = decode_state(&postcard::to_stdvec(&v1).unwrap()).unwrap();
        assert_eq!(s.format, STATE_FORMAT);
        assert_eq!((s.version, s.round, s.counters.updates), (3, 4, 7));
        let open = s.open.clone().unwrap();
        assert_eq!(open.pairs, vec![SeedScalar { seed: 5, g: 0.5 }]);
        assert!(open.owners.is_empty() && open.refused.is_empty());
        // The current format round-trips; an unknown one is refused by number.
        let again = decode_state(
            &postcard::to_stdvec(&DurableState {
                open: None,
                ..s.clone()
            })
            .unwrap(),
        )
        .unwrap();
        assert_eq!(again.version, 3);
        // Format 2 (protocol 2 commits, always pairs) reads as pairs steps, bit for bit.
        let v2 = StateV2 {
            format: 2,
            job: s.job.clone(),
            shape: s.shape.clone(),
            lora: s.lora.clone(),
            seed_base: 1,
            version: 4,
            round: 4,
            checkpoint_version: 3,
            log: vec![CommitV2 {
                round: 4,
                base_version: 3,
                new_version: 4,
                pairs: vec![PairV2(u64::MAX, -0.25)],
                weights_hash: announce_hash,
            }],
            last_commit: None,
            open: None,
            counters: Counters::default(),
            robust: RobustCounters::default(),
        };
        let s2 = decode_state(&postcard::to_stdvec(&v2).unwrap()).unwrap();
        assert_eq!(s2.format, STATE_FORMAT);
        assert_eq!(
            s2.log[0].step,
            CommitStep::Pairs(vec![SeedCoeff {
                seed: u64::MAX,
                coeff: -0.25
            }])
        );
        assert_eq!(
            (s2.log[0].new_version, s2.log[0].weights_hash),
            (4, announce_hash)
        );
        let mut future = postcard::to_stdvec(&7u32).unwrap();
        future.extend_from_slice(&[0; 16]);
        assert!(decode_state(&future).unwrap_err().contains("format 7"));
    }
}
