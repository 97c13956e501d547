//! [`AggregatorConfig::validate`]: every problem of a config at once, each naming the key and
//! the fix.

use std::path::Path;

use fwdllm_shared::lora::LoraLayout;
use fwdllm_shared::topics::validate_segment;

use super::{
    AggregatorConfig, DpConfig, Problem, RobustConfig, Schedule, DEFAULT_MAX_ABS_G,
    MAX_INGEST_WORKERS, MAX_RETAINED_COMMITS,
};

impl AggregatorConfig {
    /// Every problem of this config at once (empty = valid).
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let mut bad = |key: &str, message: String| {
            p.push(Problem {
                key: key.to_string(),
                message,
            })
        };
        if let Err(e) = validate_segment("job name", &self.job.name) {
            bad("job.name", e.to_string());
        }
        if let Err(e) = validate_segment("client id", &self.broker.client_id) {
            bad("broker.client_id", e.to_string());
        }
        if self.broker.host.is_empty() {
            bad(
                "broker.host",
                "is empty; set the broker address, e.g. \"127.0.0.1\"".into(),
            );
        }
        if self.broker.port == 0 && !self.broker.embedded {
            bad("broker.port", "is 0, which only means 'pick a free port' for the embedded broker; set the external broker's port (1883) or broker.embedded = true".into());
        }
        if self.broker.keep_alive_s < 5 {
            bad(
                "broker.keep_alive_s",
                format!("is {}; use at least 5 seconds", self.broker.keep_alive_s),
            );
        }
        if self.broker.max_packet_bytes < 1 << 20 {
            bad(
                "broker.max_packet_bytes",
                format!(
                    "is {}; checkpoints need more — use at least 1048576 (1 MiB), default 67108864",
                    self.broker.max_packet_bytes
                ),
            );
        }
        match self.model.shape() {
            Err(e) => bad(
                if self.model.gguf.as_os_str().is_empty() {
                    "model.preset"
                } else {
                    "model.gguf"
                },
                e,
            ),
            Ok(shape) => {
                if let Err(e) = LoraLayout::new(&shape, &self.lora) {
                    bad("lora", e.to_string());
                }
            }
        }
        let r = &self.round;
        if r.perturbations_per_client == 0 {
            bad(
                "round.perturbations_per_client",
                "is 0; use a positive count, e.g. 8".into(),
            );
        }
        if !(r.eps.is_finite() && r.eps > 0.0) {
            bad(
                "round.eps",
                format!("is {}; use a small positive step, e.g. 0.001", r.eps),
            );
        }
        if !(r.deadline_s.is_finite() && r.deadline_s > 0.0) {
            bad(
                "round.deadline_s",
                format!(
                    "is {}; use a positive number of seconds, e.g. 120",
                    r.deadline_s
                ),
            );
        }
        if r.quorum == 0 {
            bad(
                "round.quorum",
                "is 0; a commit needs at least 1 client".into(),
            );
        }
        if r.min_clients < r.quorum {
            bad("round.min_clients", format!("is {} but round.quorum is {}; a round could never reach quorum — set min_clients ≥ quorum", r.min_clients, r.quorum));
        }
        if !(r.fraction > 0.0 && r.fraction <= 1.0) {
            bad(
                "round.fraction",
                format!("is {}; use a fraction in (0, 1]", r.fraction),
            );
        }
        if r.head_per_direction > 1024 {
            bad(
                "round.head_per_direction",
                format!("is {}; agents compute at most 1024 head directions per adapter direction, use 0..=1024", r.head_per_direction),
            );
        }
        if self.lora.blockwise && r.head_per_direction == 0 {
            bad(
                "round.head_per_direction",
                "is 0 but lora.blockwise is true, so the head rows would never train; set it to e.g. 16".into(),
            );
        }
        let pc = &self.pacing;
        if !(pc.target_z.is_finite() && pc.target_z >= 0.0) {
            bad("pacing.target_z", format!("is {}; use a non-negative z-score, e.g. 2.0 (0 commits on min_perturbations alone)", pc.target_z));
        }
        if pc.max_perturbations == 0 {
            bad(
                "pacing.max_perturbations",
                "is 0; use a positive cap, e.g. 256".into(),
            );
        }
        if pc.min_perturbations > pc.max_perturbations {
            bad(
                "pacing.min_perturbations",
                format!(
                    "is {} > pacing.max_perturbations {}; lower it or raise the cap",
                    pc.min_perturbations, pc.max_perturbations
                ),
            );
        }
        if pc.extend_perturbations == 0 && pc.max_extends > 0 {
            bad(
                "pacing.extend_perturbations",
                "is 0 while max_extends > 0; use a positive count or set max_extends = 0".into(),
            );
        }
        let s = &self.step;
        if !(s.lr.is_finite() && s.lr > 0.0) {
            bad(
                "step.lr",
                format!("is {}; use a positive learning rate", s.lr),
            );
        }
        if s.schedule != Schedule::Constant && s.total_commits == 0 {
            bad(
                "step.total_commits",
                "is 0 with a decaying schedule; set the decay horizon in commits, e.g. 500".into(),
            );
        }
        if !(0.0..=1.0).contains(&s.min_lr_ratio) {
            bad(
                "step.min_lr_ratio",
                format!("is {}; use a ratio in [0, 1]", s.min_lr_ratio),
            );
        }
        if !(s.trust_floor.is_finite() && s.trust_floor >= 0.0) {
            bad(
                "step.trust_floor",
                format!("is {}; use a finite value >= 0 (e.g. 1.0)", s.trust_floor),
            );
        }
        if !(s.trust_region.is_finite() && s.trust_region > 0.0) {
            bad(
                "step.trust_region",
                format!(
                    "is {}; use a positive bound on ||Δθ||/||θ||, e.g. 0.02",
                    s.trust_region
                ),
            );
        }
        if self.task.batch_size == 0 {
            bad("task.batch_size", "is 0; use a positive batch size".into());
        }
        if self.task.max_tokens == 0 {
            bad(
                "task.max_tokens",
                "is 0; use a positive token budget".into(),
            );
        }
        if self.state.dir.as_os_str().is_empty() {
            bad("state.dir", "is empty; set a writable directory".into());
        }
        if self.state.checkpoint_every == 0 {
            bad(
                "state.checkpoint_every",
                "is 0; publish a checkpoint every N ≥ 1 commits".into(),
            );
        }
        // Agents replay the retained commits since the last checkpoint through one wildcard
        // subscription, and rumqttd delivers at most 100 retained messages to it.
        if self.state.checkpoint_every > MAX_RETAINED_COMMITS {
            bad(
                "state.checkpoint_every",
                format!(
                    "is {}; at most {MAX_RETAINED_COMMITS} (joining agents replay the retained \
                     commits since the last checkpoint, and some brokers deliver no more than \
                     {MAX_RETAINED_COMMITS} retained messages per subscription)",
                    self.state.checkpoint_every
                ),
            );
        }
        if self.state.group_commit_max_updates == 0 {
            bad(
                "state.group_commit_max_updates",
                "is 0; a group needs at least 1 message, e.g. 4096".into(),
            );
        }
        if self.state.group_commit_max_ms > 10_000 {
            bad(
                "state.group_commit_max_ms",
                format!(
                    "is {}; an update waits this long for its acknowledgement at most — use at most 10000 (default 20)",
                    self.state.group_commit_max_ms
                ),
            );
        }
        if !self.prometheus.listen.is_empty() && self.prometheus.addr().is_none() {
            bad(
                "prometheus.listen",
                format!(
                    "is {:?}; use an IP address and port such as \"127.0.0.1:9464\", or \"\" for no endpoint",
                    self.prometheus.listen
                ),
            );
        }
        if !(1..=MAX_INGEST_WORKERS).contains(&self.ingest.workers) {
            bad(
                "ingest.workers",
                format!(
                    "is {}; use 1 (the coordinator's own connection) to {MAX_INGEST_WORKERS}",
                    self.ingest.workers
                ),
            );
        } else if self.ingest.workers > 1 && self.broker.embedded {
            // rumqttd 0.20 keys a share group by its name alone (not name and filter), drops the
            // group when its last member disconnects and does not re-add a resumed persistent
            // session to it (router/routing.rs, "TODO: Test this more"): a restart could
            // deliver every update to every worker, or none to one.
            bad("ingest.workers", format!("is {} with broker.embedded = true; the embedded broker (rumqttd 0.20) has no reliable shared subscriptions for persistent sessions — set ingest.workers = 1, or use mosquitto (broker.embedded = false)", self.ingest.workers));
        }
        robust_problems(&self.robust, &self.dp, &mut bad);
        for (key, message) in self.broker.tls.problems("broker.tls") {
            bad(&key, message);
        }
        if self.broker.tls.enabled && self.broker.embedded {
            bad("broker.tls.enabled", "is true with broker.embedded; the embedded broker listens on loopback without TLS — use an external broker (mosquitto) for TLS, or turn TLS off".into());
        }
        for (key, path) in [
            ("broker.password_file", &self.broker.password_file),
            (
                "broker.embedded_users_file",
                &self.broker.embedded_users_file,
            ),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                bad(key, format!("{path} does not exist"));
            }
        }
        p
    }
}

/// Problems of `[robust]` and `[dp]`.
fn robust_problems(robust: &RobustConfig, dp: &DpConfig, bad: &mut dyn FnMut(&str, String)) {
    if !(robust.max_abs_g.is_finite() && robust.max_abs_g > 0.0) {
        bad(
            "robust.max_abs_g",
            format!(
                "is {}; use a positive bound on |g|, e.g. {DEFAULT_MAX_ABS_G}",
                robust.max_abs_g
            ),
        );
    }
    if !(robust.clip_sigmas.is_finite() && (robust.clip_sigmas == 0.0 || robust.clip_sigmas >= 1.0))
    {
        bad(
            "robust.clip_sigmas",
            format!(
                "is {}; use 0 (off) or a multiple of σ̂ ≥ 1, e.g. 5 (below 1 clips most honest values)",
                robust.clip_sigmas
            ),
        );
    }
    if !(robust.client_rms_sigmas.is_finite()
        && (robust.client_rms_sigmas == 0.0 || robust.client_rms_sigmas >= 1.0))
    {
        bad(
            "robust.client_rms_sigmas",
            format!(
                "is {}; use 0 (off) or a multiple of σ̂ ≥ 1, e.g. 3",
                robust.client_rms_sigmas
            ),
        );
    }
    if robust.min_pairs < 3 {
        bad(
            "robust.min_pairs",
            format!(
                "is {}; a median and MAD need at least 3 pairs, use e.g. 8",
                robust.min_pairs
            ),
        );
    }
    if dp.enabled {
        if !(dp.clip.is_finite() && dp.clip > 0.0) {
            bad(
                "dp.clip",
                format!("is {}; use a positive bound on |g|", dp.clip),
            );
        }
        if !(dp.noise_multiplier.is_finite() && dp.noise_multiplier > 0.0) {
            bad(
                "dp.noise_multiplier",
                format!(
                    "is {}; use a positive multiple of the sensitivity, e.g. 1.0",
                    dp.noise_multiplier
                ),
            );
        }
        if !(dp.delta > 0.0 && dp.delta < 1.0) {
            bad(
                "dp.delta",
                format!(
                    "is {}; use a probability in (0, 1), below 1/clients, e.g. 1e-6",
                    dp.delta
                ),
            );
        }
    }
}
