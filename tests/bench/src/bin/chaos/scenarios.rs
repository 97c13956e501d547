//! The synthetic-gradient scenarios of the chaos bench: real agent processes (synthetic
//! source), the aggregator as a child process, a real broker, and one kind of chaos each —
//! agents SIGKILLed mid-round and restarted, the broker restarted mid-round, the aggregator
//! SIGKILLed at random points and restarted, every update delivered twice. Each ends the same
//! way ([`finish`]): agents stopped, every update ruled on, aggregator stopped, books closed.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fwdllm_aggregator::config::{AggregatorConfig, CommitForm};
use fwdllm_bench::chaos::{
    account, check_replicas, DupProxy, FinalState, Ledger, Observer, ReplicaCheck, Rulings, Tally,
};
use fwdllm_shared::perturb::SplitMix64;
use serde_json::{json, Value};

use crate::fleet::{AgentProc, AggregatorProc, Broker, Mosquitto, MAX_PACKET};

/// Failure guard of one wait (a hang, never a timing assumption).
pub(crate) const GUARD: Duration = Duration::from_secs(180);

/// The chaos of one scenario.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Chaos {
    /// SIGKILL `k` agents in the middle of a round, restart them once it closed; `times` times.
    KillAgents { k: usize, times: usize },
    /// SIGKILL `k` agents that answered a round the moment its commit is published (they have
    /// answered; the new replica may not have reached their disk), restart them; `times` times.
    KillAgentsAtCommit { k: usize, times: usize },
    /// Restart the broker (SIGTERM, start again) in the middle of a round; `times` times.
    RestartBroker { times: usize },
    /// SIGKILL the aggregator a random 0.1–1.5 s after it resumed, restart it after a random
    /// 0–0.5 s; `times` times.
    KillAggregator { times: usize },
    /// Every update reaches the broker twice (the duplicating proxy).
    Duplicate,
    /// SIGTERM the aggregator while a round is open with answers in it, restart it once it
    /// exited; `times` times.
    StopAggregator { times: usize },
}

/// What every synthetic scenario shares.
#[derive(Debug, Clone)]
pub(crate) struct Setup {
    pub(crate) work: PathBuf,
    pub(crate) self_exe: PathBuf,
    pub(crate) agent_bin: PathBuf,
    pub(crate) agents: usize,
    /// Commits to reach (chaos happens on the way; the last ones are calm).
    pub(crate) commits: u64,
    pub(crate) perturbations: u32,
    pub(crate) seed: u64,
}

/// Runs one scenario and returns its JSON record.
pub(crate) async fn run(name: &str, chaos: Chaos, mosquitto: bool, s: &Setup) -> Result<Value> {
    let t0 = Instant::now();
    let dir = s.work.join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let mut broker = if mosquitto {
        Broker::Mosquitto(Mosquitto::start(&dir.join("broker"))?)
    } else {
        Broker::Embedded(fwdllm_aggregator::broker::EmbeddedBroker::start(
            "127.0.0.1",
            0,
            MAX_PACKET,
        )?)
    };
    let addr = broker.addr();
    let job = format!("chaos-{}", name.replace('_', "-"));
    let mut observer = Observer::start(
        &addr.ip().to_string(),
        addr.port(),
        &job,
        "chaos-ledger",
        MAX_PACKET,
        GUARD,
    )
    .await?;
    let proxy = match chaos {
        Chaos::Duplicate => Some(DupProxy::start(addr).await?),
        _ => None,
    };
    let agents_addr: SocketAddr = proxy.as_ref().map_or(addr, DupProxy::addr);
    let cfg = aggregator_config(&job, &dir.join("aggregator"), addr, s);
    let mut agg = AggregatorProc::new(&s.self_exe, &dir, &cfg)?;
    agg.start()?;
    let mut agents = (0..s.agents)
        .map(|i| AgentProc::new(&s.agent_bin, &dir, &format!("agent-{i}"), &job, agents_addr))
        .collect::<Result<Vec<_>>>()?;
    for a in &mut agents {
        a.start()?;
    }
    // Chaos starts once the whole fleet took part in a round (rounds open with half of it).
    let ids: Vec<String> = agents.iter().map(|a| a.id.clone()).collect();
    observer
        .wait_until("every agent answering", GUARD, |l| {
            ids.iter()
                .all(|id| l.updates.keys().any(|u| u.client == *id))
        })
        .await?;
    let mut rng = SplitMix64::new(s.seed);
    let events = match chaos {
        Chaos::KillAgents { k, times } => {
            kill_agents(&mut observer, &mut agents, k, times, false, &mut rng).await?
        }
        Chaos::KillAgentsAtCommit { k, times } => {
            kill_agents(&mut observer, &mut agents, k, times, true, &mut rng).await?
        }
        Chaos::StopAggregator { times } => stop_aggregator(&mut observer, &mut agg, times).await?,
        Chaos::RestartBroker { times } => {
            let Broker::Mosquitto(m) = &mut broker else {
                bail!("the broker restart needs mosquitto");
            };
            restart_broker(&mut observer, m, times).await?
        }
        Chaos::KillAggregator { times } => {
            kill_aggregator(&mut observer, &mut agg, times, &mut rng).await?
        }
        Chaos::Duplicate => Vec::new(),
    };
    let target = s.commits;
    observer
        .wait_until(&format!("version {target}"), GUARD * 2, |l| {
            l.version() >= target
        })
        .await?;
    let books = finish(observer, &mut agents, &mut agg, &cfg).await?;
    let mut j = books.json(&cfg, &agents)?;
    let o = j.as_object_mut().expect("object");
    o.insert("name".into(), json!(name));
    o.insert("broker".into(), json!(broker.name()));
    o.insert("agents".into(), json!(s.agents));
    o.insert(
        "agent_kind".into(),
        json!("fwdllm-agent processes, synthetic source"),
    );
    o.insert("commits_target".into(), json!(target));
    o.insert(
        "chaos".into(),
        json!({ "kind": format!("{chaos:?}"), "events": events }),
    );
    if let Some(p) = &proxy {
        o.insert("duplicates_injected".into(), json!(p.injected()));
    }
    o.insert("wall_s".into(), json!(t0.elapsed().as_secs_f64()));
    Ok(j)
}

fn aggregator_config(job: &str, state: &Path, broker: SocketAddr, s: &Setup) -> AggregatorConfig {
    let n = s.agents as u32;
    let mut c = AggregatorConfig::default();
    c.job.name = job.into();
    c.model.preset = "tiny".into();
    c.broker.host = broker.ip().to_string();
    c.broker.port = broker.port();
    c.broker.keep_alive_s = 5;
    c.broker.max_packet_bytes = MAX_PACKET;
    c.state.dir = state.to_path_buf();
    c.state.checkpoint_every = 10;
    c.state.plot_every = 0;
    // The ledger accounts for every seed, which a dense commit does not name.
    c.state.commit_form = CommitForm::Pairs;
    // Rounds open with half the fleet and commit once every selected client still online
    // answered (the cap is every agent's share), so a killed agent does not stall a round.
    c.round.min_clients = (n / 2).max(1);
    c.round.quorum = (n / 2).max(1);
    c.round.perturbations_per_client = s.perturbations;
    c.round.deadline_s = 30.0;
    c.pacing.max_perturbations = n * s.perturbations;
    c.pacing.min_perturbations = n * s.perturbations;
    c.pacing.max_extends = 0;
    c.step.lr = 0.5;
    c
}

/// Waits for a round in flight — announced after `after`, at least one update in the ledger,
/// some selected agent still to answer, not committed — and returns it with the agents that had
/// answered. The subscriber checks after every message, so no round is missed however fast.
async fn round_in_flight(
    observer: &mut Observer,
    after: u64,
    agents: usize,
) -> Result<(u64, BTreeSet<String>)> {
    let rx = observer.when(move |l| {
        let a = l.announce.as_ref()?;
        let answered = l.answered(a.round);
        (a.round > after
            && !l.round_committed(a.round)
            && !answered.is_empty()
            && answered.len() < agents)
            .then_some((a.round, answered))
    });
    tokio::time::timeout(GUARD, rx)
        .await
        .context("timed out waiting for a round in flight")?
        .context("the ledger subscriber stopped")
}

/// Waits until `round` is over (committed, or a later round announced).
async fn round_closed(observer: &mut Observer, round: u64) -> Result<()> {
    observer
        .wait_until(&format!("round {round} closed"), GUARD, |l| {
            l.round_committed(round) || l.announce.as_ref().is_some_and(|a| a.round > round)
        })
        .await?;
    Ok(())
}

/// SIGKILLs `k` agents per event: mid-round (those that had not answered first, so the kill
/// lands mid-work) or, with `at_commit`, the moment the round's commit is published (those that
/// had answered first: they are replaying the commit and persisting the new replica).
async fn kill_agents(
    observer: &mut Observer,
    agents: &mut [AgentProc],
    k: usize,
    times: usize,
    at_commit: bool,
    rng: &mut SplitMix64,
) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    let mut last = 0;
    for _ in 0..times {
        let (round, mut answered) = round_in_flight(observer, last, agents.len()).await?;
        last = round;
        if at_commit {
            // The subscriber checks after every message: this returns as the commit arrives.
            let rx = observer.when(move |l| l.round_committed(round).then(|| l.answered(round)));
            answered = match tokio::time::timeout(GUARD, rx).await {
                Ok(got) => got.context("the ledger subscriber stopped")?,
                Err(_) => bail!("timed out waiting for round {round} to commit"),
            };
        }
        let mut order: Vec<usize> = (0..agents.len()).collect();
        rng.shuffle(&mut order);
        order.sort_by_key(|&i| answered.contains(&agents[i].id) != at_commit);
        let victims: Vec<usize> = order.into_iter().take(k).collect();
        for &i in &victims {
            agents[i].kill()?;
        }
        let (committed, version) = {
            let l = observer.ledger();
            (l.round_committed(round), l.version())
        };
        let names: Vec<&str> = victims.iter().map(|&i| agents[i].id.as_str()).collect();
        log::info!("round {round}: SIGKILLed {names:?}");
        events.push(json!({
            "round": round,
            "version": version,
            "killed": names,
            "had_answered": names.iter().filter(|n| answered.contains(**n)).count(),
            "round_committed_at_kill": committed,
        }));
        round_closed(observer, round).await?;
        for &i in &victims {
            agents[i].start()?;
        }
        // Back in the game: each restarted agent answers a later round.
        let ids: Vec<String> = victims.iter().map(|&i| agents[i].id.clone()).collect();
        observer
            .wait_until("the restarted agents answer again", GUARD, |l| {
                ids.iter()
                    .all(|id| l.updates.keys().any(|u| u.client == *id && u.round > round))
            })
            .await?;
    }
    Ok(events)
}

async fn restart_broker(
    observer: &mut Observer,
    broker: &mut Mosquitto,
    times: usize,
) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    let mut last = 0;
    for _ in 0..times {
        let (round, answered) = round_in_flight(observer, last, usize::MAX).await?;
        last = round;
        let answered = answered.len();
        let version = observer.ledger().version();
        let t = Instant::now();
        broker.restart()?;
        let down_ms = t.elapsed().as_millis() as u64;
        log::info!("round {round}: broker restarted ({down_ms} ms)");
        // Rounds go on: two more commits after the restart.
        observer
            .wait_until("commits after the broker restart", GUARD, |l| {
                l.version() >= version + 2
            })
            .await?;
        events.push(json!({
            "round": round,
            "version": version,
            "updates_in_before_restart": answered,
            "restart_ms": down_ms,
        }));
    }
    Ok(events)
}

async fn kill_aggregator(
    observer: &mut Observer,
    agg: &mut AggregatorProc,
    times: usize,
    rng: &mut SplitMix64,
) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    wait_rulings(agg, "the aggregator started", |r| r.resumes >= 1).await?;
    for _ in 0..times {
        // The kill timer starts once the aggregator is up (it resumed from its state).
        let after = Duration::from_secs_f64(0.1 + 1.4 * rng.unit());
        tokio::time::sleep(after).await;
        agg.kill()?;
        let (version, in_flight) = {
            let l = observer.ledger();
            let open = l.announce.as_ref().map(|a| a.round);
            (
                l.version(),
                open.is_some_and(|r| !l.round_committed(r) && !l.answered(r).is_empty()),
            )
        };
        let down = Duration::from_secs_f64(0.5 * rng.unit());
        log::info!("aggregator SIGKILLed at version {version}; down for {down:?}");
        events.push(json!({
            "after_resume_ms": after.as_millis() as u64,
            "down_ms": down.as_millis() as u64,
            "version": version,
            "round_in_flight": in_flight,
        }));
        tokio::time::sleep(down).await;
        let before = agg.rulings()?.resumes;
        agg.start()?;
        wait_rulings(agg, "the aggregator resumed", |r| r.resumes > before).await?;
    }
    Ok(events)
}

/// SIGTERMs the aggregator while a round is open with answers in it (what systemd's stop or a
/// package upgrade does), waits for it to exit, restarts it on its state.
async fn stop_aggregator(
    observer: &mut Observer,
    agg: &mut AggregatorProc,
    times: usize,
) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    let mut last = 0;
    for _ in 0..times {
        let (round, answered) = round_in_flight(observer, last, usize::MAX).await?;
        last = round;
        let version = observer.ledger().version();
        let before = agg.rulings()?.resumes;
        agg.stop()?;
        log::info!(
            "round {round}: aggregator stopped with {} answers in",
            answered.len()
        );
        events.push(json!({
            "round": round,
            "version": version,
            "answers_in_at_stop": answered.len(),
        }));
        agg.start()?;
        wait_rulings(agg, "the aggregator resumed", |r| r.resumes > before).await?;
    }
    Ok(events)
}

/// Waits until the aggregator's rulings log satisfies `f` (a child process: the log is polled).
async fn wait_rulings(
    agg: &AggregatorProc,
    what: &str,
    mut f: impl FnMut(&Rulings) -> bool,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if f(&agg.rulings()?) {
            return Ok(());
        }
        if start.elapsed() > GUARD {
            bail!("timed out after {GUARD:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Everything a finished run left: the ledger, the rulings, the aggregator's final state and
/// the agents' replicas.
pub(crate) struct Books {
    pub(crate) ledger: Ledger,
    pub(crate) rulings: Rulings,
    pub(crate) fin: FinalState,
}

/// Ends a run so that nothing is in flight: agents stopped (SIGTERM), the ledger drained, every
/// update in it ruled on by the still-running aggregator, then the aggregator stopped.
async fn finish(
    mut observer: Observer,
    agents: &mut [AgentProc],
    agg: &mut AggregatorProc,
    cfg: &AggregatorConfig,
) -> Result<Books> {
    for a in agents.iter_mut() {
        a.stop()?;
    }
    observer.drain(GUARD).await?;
    // The aggregator still runs: wait until it has ruled on every update the broker took.
    let start = Instant::now();
    let covered = loop {
        let r = agg.rulings()?;
        if r.covers(&observer.ledger()) {
            break true;
        }
        if start.elapsed() > GUARD {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if !covered {
        log::warn!("some updates were never ruled on within {GUARD:?}: they count as lost");
    }
    agg.stop()?;
    observer.drain(GUARD).await?;
    let ledger = observer.stop().await;
    let rulings = agg.rulings()?;
    let fin = FinalState::load(cfg)
        .with_context(|| format!("aggregator state in {}", agg.state_dir.display()))?;
    Ok(Books {
        ledger,
        rulings,
        fin,
    })
}

impl Books {
    /// The scenario's record: rounds, the tally, replica checks (agents' persisted replicas and
    /// logged replay mismatches included).
    fn json(&self, cfg: &AggregatorConfig, agents: &[AgentProc]) -> Result<Value> {
        let layout = cfg.layout().map_err(anyhow::Error::msg)?;
        let tally = account(&self.ledger, &self.rulings, &self.fin);
        let check = check_replicas(&layout, &self.ledger, &self.fin);
        let mut agent_state_mismatches = 0u64;
        let mut agent_logged = 0u64;
        let mut lag = Vec::new();
        for a in agents {
            let (v, h, intact) = a.replica()?;
            match h {
                Some(h) if intact && !check.contradicts(v, &h) => {}
                _ => agent_state_mismatches += 1,
            }
            agent_logged += a.logged_replay_mismatches();
            lag.push(self.fin.version.saturating_sub(v));
        }
        Ok(record(
            &self.ledger,
            &tally,
            &check,
            &self.rulings,
            &self.fin,
            agent_state_mismatches,
            agent_logged,
            lag.into_iter().max().unwrap_or(0),
        ))
    }
}

/// The JSON record of a run's books (shared by the synthetic and the real-model scenarios).
#[allow(clippy::too_many_arguments)]
pub(crate) fn record(
    ledger: &Ledger,
    tally: &Tally,
    check: &ReplicaCheck,
    rulings: &Rulings,
    fin: &FinalState,
    agent_state_mismatches: u64,
    agent_logged_mismatches: u64,
    max_agent_lag: u64,
) -> Value {
    let mismatches = check.mismatches() + agent_state_mismatches + agent_logged_mismatches;
    json!({
        "rounds_completed": fin.version,
        "rounds_opened": fin.round,
        "rounds_abandoned": rulings.abandoned_rounds.len(),
        "aggregator_resumes": rulings.resumes,
        "lost": tally.lost,
        "doubled": tally.doubled,
        "replica_hash_mismatches": mismatches,
        "updates": tally,
        "duplicate_deliveries_ruled": rulings.duplicates(),
        "stale_deliveries_ruled": rulings.verdicts(fwdllm_bench::chaos::Verdict::Stale),
        "rejected_by_reason": fin.rejected_by_reason,
        "robust_clipped_pairs": fin.clipped_pairs,
        "robust_capped_clients": fin.capped_clients,
        "unreadable_ruling_lines": rulings.unreadable_lines,
        "ledger_sessions_lost": ledger.sessions_lost,
        "replicas": {
            "check": check,
            "agent_persisted_mismatches": agent_state_mismatches,
            "agent_logged_replay_mismatches": agent_logged_mismatches,
            "max_agent_lag_versions": max_agent_lag,
        },
    })
}
