//! The round loop: the work loop's `select!`, starting a request once the replica is synced,
//! the seeds of a request (discriminative and block-wise), chunks of forward passes on a
//! blocking thread, and marking a request answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fwdllm_shared::lora::LoraWeights;
use fwdllm_shared::perturb::derive_seed;
use fwdllm_shared::service;
use fwdllm_shared::wire::{self, AgentState, RoundAnnounce, SeedScalar};
use log::{debug, info, warn};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::replica::Sync;
use super::session::NetEvent;
use super::{
    unix_ms, AgentError, Daemon, GradientBatch, GradientError, GradientRequest, GradientSource,
    LossStats, SYNC_GRACE,
};

/// A computation in progress for one (round, extend).
pub(super) struct Running {
    pub(super) announce: RoundAnnounce,
    pub(super) k0: u32,
    pub(super) seeds: Vec<u64>,
    pub(super) weights: Arc<LoraWeights>,
    pub(super) pairs: Vec<SeedScalar>,
    pub(super) samples: u32,
    pub(super) loss: LossStats,
    pub(super) chunk: JoinHandle<ChunkOutput>,
    pub(super) chunk_len: usize,
    pub(super) chunk_started: Instant,
    /// A newer round was announced: finish the chunk in flight, then drop the work.
    pub(super) abandoned: bool,
}

impl Daemon {
    pub(super) async fn work_loop(
        &mut self,
        mut net_rx: mpsc::Receiver<NetEvent>,
        shutdown: &CancellationToken,
        watchdog: Option<&service::Watchdog>,
    ) -> Result<(), AgentError> {
        let mut period = Duration::from_secs(5);
        if let Some(wd) = watchdog {
            period = period.min(wd.interval().max(Duration::from_millis(100)));
        }
        if self.config.telemetry.interval_s > 0 {
            period = period.min(Duration::from_secs(self.config.telemetry.interval_s));
        }
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Watchdog pings come from this loop, not a timer task: a loop stuck in a handler stops
            // them, and so does a chunk of forward passes that runs longer than the ping interval.
            if let Some(wd) = watchdog {
                let computing_too_long = self
                    .running
                    .as_ref()
                    .is_some_and(|r| r.chunk_started.elapsed() > wd.interval());
                if !computing_too_long {
                    wd.ping();
                }
            }
            let sync_deadline = self
                .sync_since
                .map(|s| tokio::time::Instant::from_std(s + SYNC_GRACE));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                ev = net_rx.recv() => match ev {
                    Some(ev) => self.on_net(ev).await,
                    None => return Err(AgentError::ClientGone),
                },
                done = async { (&mut self.running.as_mut().expect("guarded").chunk).await }, if self.running.is_some() => {
                    self.on_chunk_done(done).await?;
                }
                _ = async { tokio::time::sleep_until(sync_deadline.expect("guarded")).await }, if sync_deadline.is_some() => {
                    self.on_sync_stalled().await;
                }
                _ = tick.tick() => self.on_tick().await,
            }
            self.try_work().await;
        }
    }

    /// The replica still cannot reach the announced version one grace period after it first
    /// tried: say why at `warn` (the agent is not answering), and ask the broker again for the
    /// retained commit log and checkpoint, which together always reach the announced version.
    /// Repeats every grace period while the announcement stands.
    async fn on_sync_stalled(&mut self) {
        self.sync_since = None;
        let Some(a) = self.announce.clone() else {
            return;
        };
        let why = match self.replica.sync_to(a.model_version, &a.weights_hash) {
            Sync::Ready => return,
            Sync::MissingCommits { have, want } => {
                format!("replica at version {have}, commits up to {want} did not arrive")
            }
            Sync::NeedCheckpoint(why) => format!("{why}, no usable checkpoint arrived"),
        };
        warn!(
            "round {}: not answering yet: {why} within {SYNC_GRACE:?}; asking the broker again for the retained commit log and checkpoint",
            a.round
        );
        self.refetch_retained().await;
        self.sync_since = Some(Instant::now());
    }

    /// Starts work on the pending announcement when everything is in place.
    pub(super) async fn try_work(&mut self) {
        if self.running.is_some() || self.source.is_none() {
            return;
        }
        let Some(a) = self.announce.clone() else {
            return;
        };
        if self.answered(&a) {
            self.announce = None;
            return;
        }
        if !a.selection.includes(&self.client_id, a.round) {
            debug!("round {}: not selected", a.round);
            self.announce = None;
            return;
        }
        if a.deadline_unix_ms != 0 && unix_ms() > a.deadline_unix_ms {
            info!(
                "round {} extend {}: deadline passed before we could start; skipping",
                a.round, a.extend
            );
            self.announce = None;
            return;
        }
        let sample = self.device.sample();
        self.update_busy(&sample).await;
        if let Some(reason) = self.busy.clone() {
            info!(round = a.round; "round {}: busy ({reason}); sitting it out", a.round);
            self.announce = None;
            self.info.send_modify(|i| i.rounds_skipped_busy += 1);
            return;
        }
        match self.replica.sync_to(a.model_version, &a.weights_hash) {
            Sync::Ready => {}
            Sync::MissingCommits { have, want } => {
                if self.sync_since.is_none() {
                    debug!(
                        "round {}: replica at {have}, waiting for commits up to {want}",
                        a.round
                    );
                    self.sync_since = Some(Instant::now());
                    self.set_state(AgentState::Syncing).await;
                }
                return;
            }
            Sync::NeedCheckpoint(why) => {
                if self.sync_since.is_none() {
                    info!("round {}: {why}; fetching the checkpoint", a.round);
                    self.sync_since = Some(Instant::now());
                    self.set_state(AgentState::Syncing).await;
                    self.request_checkpoint().await;
                }
                return;
            }
        }
        self.sync_since = None;
        self.announce = None;
        let k0 = match self.persisted.next_k {
            Some((round, k)) if round == a.round => k,
            _ => 0,
        };
        if a.perturbations_per_client == 0 {
            self.mark_answered(&a, k0);
            return;
        }
        let index = wire::client_index(&self.client_id);
        let c = self.config.gradient.discriminative_candidates.max(1);
        // Discriminative sampling: candidates k·c .. k·c+c-1, keep the one best aligned with
        // the commit that produced this version (its pairs' direction, or a dense commit's change). With
        // c = 1 the single candidate is seed k itself and no direction is built.
        let layout = self
            .replica
            .weights()
            .expect("synced replica has weights")
            .layout()
            .clone();
        let previous = (c > 1)
            .then(|| self.replica.last_step_direction())
            .flatten();
        let mut scratch = Vec::new();
        let seeds = request_seeds(&a, index, k0, c, &layout, previous.as_deref(), &mut scratch);
        let weights = Arc::new(
            self.replica
                .weights()
                .expect("synced replica has weights")
                .clone(),
        );
        let source = self.source.take().expect("checked above");
        let chunk_len = (self.config.gradient.seeds_per_chunk as usize).min(seeds.len());
        let dev_eval = super::dev_eval::wanted(&a, self.last_dev_eval);
        if dev_eval {
            self.last_dev_eval = Some(a.model_version);
        }
        let chunk = spawn_chunk(
            source,
            weights.clone(),
            seeds[..chunk_len].to_vec(),
            &a,
            dev_eval,
        );
        debug!(
            "round {} extend {}: computing {} perturbations from k = {k0}",
            a.round,
            a.extend,
            seeds.len()
        );
        if self.config.agent.systemd_notify {
            service::notify_status(&format!(
                "round {} extend {}: computing {} perturbations",
                a.round,
                a.extend,
                seeds.len()
            ));
        }
        self.running = Some(Running {
            announce: a,
            k0,
            seeds,
            weights,
            pairs: Vec::new(),
            samples: 0,
            loss: LossStats::default(),
            chunk,
            chunk_len,
            chunk_started: Instant::now(),
            abandoned: false,
        });
        self.set_state(AgentState::Online).await;
    }

    pub(super) async fn on_chunk_done(&mut self, done: ChunkResult) -> Result<(), AgentError> {
        let (source, result, dev) = done.map_err(|e| AgentError::SourcePanicked(e.to_string()))?;
        self.source = Some(source);
        let mut run = self.running.take().expect("a chunk was running");
        if let Some(dev) = dev {
            self.publish_dev_eval(&run.announce, dev).await;
        }
        if run.abandoned {
            return Ok(());
        }
        let batch = match result {
            Ok(b) if b.g.len() == run.chunk_len => b,
            Ok(b) => {
                warn!(
                    "round {}: {}",
                    run.announce.round,
                    GradientError::Count {
                        want: run.chunk_len,
                        got: b.g.len()
                    }
                );
                return Ok(());
            }
            Err(e) => {
                warn!(
                    "round {} extend {}: gradient source failed: {e}; skipping this request",
                    run.announce.round, run.announce.extend
                );
                return Ok(());
            }
        };
        let start = run.pairs.len();
        run.pairs.extend(
            run.seeds[start..start + run.chunk_len]
                .iter()
                .zip(&batch.g)
                .map(|(&seed, &g)| SeedScalar { seed, g }),
        );
        run.samples = run.samples.saturating_add(batch.samples);
        run.loss.merge(&batch.loss);
        self.info
            .send_modify(|i| i.perturbations_done += run.chunk_len as u64);
        let done_n = run.pairs.len();
        if done_n < run.seeds.len() {
            let n = (self.config.gradient.seeds_per_chunk as usize).min(run.seeds.len() - done_n);
            let source = self.source.take().expect("just returned");
            run.chunk = spawn_chunk(
                source,
                run.weights.clone(),
                run.seeds[done_n..done_n + n].to_vec(),
                &run.announce,
                false,
            );
            run.chunk_len = n;
            run.chunk_started = Instant::now();
            self.running = Some(run);
            return Ok(());
        }
        self.publish_update(run).await;
        Ok(())
    }

    pub(super) fn mark_answered(&mut self, a: &RoundAnnounce, next_k: u32) {
        self.persisted.last_answered = Some((a.round, a.extend));
        self.persisted.next_k = Some((a.round, next_k));
        self.persisted.updates_sent += 1;
        self.save_state();
        self.info
            .send_modify(|i| i.last_answered = Some((a.round, a.extend)));
    }
}

/// A chunk hands the source back with its result (the source moves to the blocking thread).
pub(super) type ChunkOutput = (
    Box<dyn GradientSource + Send>,
    Result<GradientBatch, GradientError>,
    Option<DevEvalResult>,
);
/// A dev evaluation run before a round's first chunk (model selection).
pub(super) type DevEvalResult = Result<Option<super::gradient::DevScore>, GradientError>;
type ChunkResult = Result<ChunkOutput, tokio::task::JoinError>;

fn spawn_chunk(
    mut source: Box<dyn GradientSource + Send>,
    weights: Arc<LoraWeights>,
    seeds: Vec<u64>,
    a: &RoundAnnounce,
    dev_eval: bool,
) -> JoinHandle<ChunkOutput> {
    let (eps, task, round) = (a.eps, a.task.clone(), a.round);
    tokio::task::spawn_blocking(move || {
        let dev = dev_eval.then(|| source.evaluate_dev(&weights));
        let result = source.forward_gradients(&GradientRequest {
            weights: &weights,
            seeds: &seeds,
            eps,
            task: &task,
            round,
        });
        (source, result, dev)
    })
}

/// Raw-seed index bit that separates head-block seeds from adapter seeds in
/// `derive_seed(seed_base, round, client, index)`.
const HEAD_SEED_INDEX: u32 = 1 << 31;

/// Head-block directions per adapter direction an announcement asks for (its
/// `task.extra["head_per_direction"]`; 0 when absent, capped so a bad value cannot stall an
/// agent).
pub fn head_per_direction(a: &wire::RoundAnnounce) -> u32 {
    a.task
        .extra
        .iter()
        .find(|(k, _)| k == "head_per_direction")
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(0)
        .min(1024)
}

/// The seeds of one request, in order: for each k in `k0..k0 + perturbations_per_client`, the
/// adapter (or dense) direction k, then, for a block-wise layout, its `head_per_direction`
/// head-block directions. Each is the most aligned of `c` candidates
/// `derive_seed(seed_base, round, client, i·c + j)` (head direction `k·R + r` with
/// `HEAD_SEED_INDEX` set in the index), moved into its block.
fn request_seeds(
    a: &wire::RoundAnnounce,
    client_index: u32,
    k0: u32,
    c: u32,
    layout: &fwdllm_shared::lora::LoraLayout,
    previous: Option<&[f32]>,
    scratch: &mut Vec<f32>,
) -> Vec<u64> {
    use fwdllm_shared::lora::DirectionBlock;
    let blockwise = layout.config().blockwise;
    let r = if blockwise { head_per_direction(a) } else { 0 };
    let pick = |index: u32, block: DirectionBlock, scratch: &mut Vec<f32>| {
        let raw = (0..c).map(|j| {
            let mut i = index.wrapping_mul(c).wrapping_add(j);
            if block == DirectionBlock::Head {
                i |= HEAD_SEED_INDEX;
            }
            derive_seed(a.seed_base, a.round, client_index, i)
        });
        crate::engine::recipe::aligned_seed_in_block(layout, block, raw, previous, scratch)
    };
    let mut seeds = Vec::new();
    for k in k0..k0.saturating_add(a.perturbations_per_client) {
        let block = if blockwise {
            DirectionBlock::Adapter
        } else {
            DirectionBlock::All
        };
        seeds.push(pick(k, block, scratch));
        for i in 0..r {
            seeds.push(pick(
                k.wrapping_mul(r).wrapping_add(i),
                DirectionBlock::Head,
                scratch,
            ));
        }
    }
    seeds
}

#[cfg(test)]
mod request_seed_tests {
    use super::*;
    use fwdllm_shared::lora::{DirectionBlock, LoraConfig, LoraLayout, ModelShape};

    fn announce(head: Option<&str>) -> wire::RoundAnnounce {
        let mut task = wire::TaskParams::default();
        if let Some(h) = head {
            task.extra.push(("head_per_direction".into(), h.into()));
        }
        wire::RoundAnnounce {
            job: "j".into(),
            round: 3,
            model_version: 0,
            weights_hash: fwdllm_shared::WeightsHash([0; 32]),
            perturbations_per_client: 2,
            eps: 1e-2,
            deadline_unix_ms: 0,
            selection: wire::ClientSelection::All,
            task,
            seed_base: 7,
            extend: 0,
        }
    }

    fn layout(blockwise: bool) -> LoraLayout {
        let config = LoraConfig {
            layers: Some((28, 30)),
            head_rows: 4,
            blockwise,
            ..LoraConfig::default()
        };
        LoraLayout::new(&ModelShape::smollm2_135m(), &config).unwrap()
    }

    #[test]
    fn blockwise_requests_interleave_head_directions_and_stay_deterministic() {
        let l = layout(true);
        let mut scratch = Vec::new();
        let a = announce(Some("3"));
        let seeds = request_seeds(&a, 5, 0, 1, &l, None, &mut scratch);
        assert_eq!(seeds.len(), 2 * (1 + 3));
        let blocks: Vec<DirectionBlock> = seeds.iter().map(|&s| l.block_of(s)).collect();
        use DirectionBlock::{Adapter as A, Head as H};
        assert_eq!(blocks, [A, H, H, H, A, H, H, H]);
        let mut unique = seeds.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), seeds.len());
        assert_eq!(seeds, request_seeds(&a, 5, 0, 1, &l, None, &mut scratch));
        // An extend continues at k0 with new seeds.
        let more = request_seeds(&a, 5, 2, 1, &l, None, &mut scratch);
        assert!(more.iter().all(|s| !seeds.contains(s)));
        // A dense layout ignores head_per_direction; a missing or bad value means 0.
        assert_eq!(
            request_seeds(&a, 5, 0, 1, &layout(false), None, &mut scratch).len(),
            2
        );
        assert_eq!(head_per_direction(&announce(None)), 0);
        assert_eq!(head_per_direction(&announce(Some("lots"))), 0);
        assert_eq!(head_per_direction(&announce(Some("99999"))), 1024);
    }
}
