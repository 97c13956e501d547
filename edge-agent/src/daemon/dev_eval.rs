//! Model selection on the agent side: whether a round announcement asks for a dev evaluation
//! of its version (`task.extra["eval_every"]`), and the report that answers it. The evaluation
//! itself runs in the gradient source (`GradientSource::evaluate_dev`) on the blocking thread,
//! before the round's first chunk of perturbations.

use fwdllm_shared::wire::{EvalReport, RoundAnnounce, EVAL_EVERY_KEY};

use super::gradient::DevScore;

/// `task.extra["eval_every"]` of an announcement; 0 (never) when absent or malformed.
pub fn eval_every(a: &RoundAnnounce) -> u64 {
    a.task
        .extra
        .iter()
        .find(|(k, _)| k == EVAL_EVERY_KEY)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// True if this announcement asks for its version's dev score and this agent has not sent it
/// (`last` = the last version it evaluated).
pub fn wanted(a: &RoundAnnounce, last: Option<u64>) -> bool {
    let every = eval_every(a);
    every > 0 && a.model_version % every == 0 && last != Some(a.model_version)
}

/// The report of `score` for the announcement's version.
pub fn report(client_id: &str, a: &RoundAnnounce, score: DevScore) -> EvalReport {
    EvalReport {
        client_id: client_id.to_string(),
        model_version: a.model_version,
        weights_hash: a.weights_hash,
        examples: score.examples,
        correct: score.correct,
        loss_sum: score.loss_sum,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::lora::WeightsHash;
    use fwdllm_shared::wire::{ClientSelection, TaskParams};

    fn announce(version: u64, every: Option<&str>) -> RoundAnnounce {
        let mut task = TaskParams::default();
        if let Some(e) = every {
            task.extra.push((EVAL_EVERY_KEY.into(), e.into()));
        }
        RoundAnnounce {
            job: "j".into(),
            round: 1,
            model_version: version,
            weights_hash: WeightsHash([7; 32]),
            perturbations_per_client: 1,
            eps: 1e-3,
            deadline_unix_ms: 0,
            selection: ClientSelection::All,
            task,
            seed_base: 0,
            extend: 0,
        }
    }

    #[test]
    fn asks_at_multiples_once_and_never_without_the_key() {
        let cases = [
            (20, Some("10"), None, true),
            (20, Some("10"), Some(20), false), // already sent
            (25, Some("10"), None, false),
            (0, Some("10"), None, true), // zero-shot baseline
            (20, None, None, false),
            (20, Some("0"), None, false),
            (20, Some("often"), None, false),
        ];
        for (v, every, last, want) in cases {
            assert_eq!(
                wanted(&announce(v, every), last),
                want,
                "{v} {every:?} {last:?}"
            );
        }
    }

    #[test]
    fn report_names_the_announced_version_and_hash() {
        let a = announce(30, Some("10"));
        let r = report(
            "pi-1",
            &a,
            DevScore {
                examples: 32,
                correct: 30,
                loss_sum: 3.5,
            },
        );
        assert_eq!((r.model_version, r.weights_hash), (30, a.weights_hash));
        assert_eq!((r.examples, r.correct, r.loss_sum), (32, 30, 3.5));
    }
}
