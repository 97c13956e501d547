//! Bridged brokers: a *site* Mosquitto where the boards connect, bridged to a *central* one
//! where the aggregator connects — updates, statuses and dev reports go up, rounds, commits,
//! the commit log and checkpoints come down, retained state is kept on both — and the bench
//! that checks nothing is lost, doubled or replayed wrong across the bridge, including a bridge
//! restart in the middle of a round.
//!
//! [`bridge_conf`] is the bridge section shipped as `systemd/mosquitto-fwdllm-bridge.conf`
//! (cross/README.md). The bridge dials the central broker through a [`Relay`] here, so that the
//! bench can cut the bridge's connection at a chosen moment; Mosquitto then reconnects by itself
//! (`restart_timeout`) and, with `cleansession false` and QoS 1, delivers what was queued on
//! either side. Retained messages cross the bridge with their retain flag (`try_private true`:
//! each broker knows the other is a bridge).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{self, RoundCommit};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use fwdllm_aggregator::broker::free_port;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::{AggEvent, UpdateOutcome};
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_frontdoor::sim::{self, SimParams, SimStats};

/// Failure guard of waits in the bench (never reached when things work).
const GUARD: Duration = Duration::from_secs(300);

/// The bridge section of the site broker's config: `central` is the central broker's address.
/// The topic patterns cover every job (`+`).
pub fn bridge_conf(central: &str, restart_timeout_s: u32) -> String {
    format!(
        "# Bridge of a site broker (where the boards connect) to the central broker (where the
# aggregator connects). Boards' updates, statuses, telemetry and dev reports go up; rounds,
# commits, the commit log, checkpoints, the aggregator's status and metrics come down.
connection fwdllm-central
address {central}
# A persistent bridge session and QoS 1: what either side queued while the bridge was down is
# delivered after it reconnects (updates are deduplicated by the aggregator).
cleansession false
# Tell the central broker this is a bridge: retained messages keep their retain flag across
# it, so both brokers hold the same retained state, and loops are detected.
try_private true
bridge_protocol_version mqttv311
restart_timeout {restart_timeout_s}
notifications false
topic fwdllm/v1/+/update/+ out 1
topic fwdllm/v1/+/status/+ out 1
topic fwdllm/v1/+/eval/+ out 1
topic fwdllm/v1/+/telemetry/+ out 0
topic fwdllm/v1/+/round in 1
topic fwdllm/v1/+/commit in 1
topic fwdllm/v1/+/commits/+ in 1
topic fwdllm/v1/+/checkpoint in 1
topic fwdllm/v1/+/aggregator in 1
topic fwdllm/v1/+/metrics in 0
"
    )
}

/// Readiness poll of a broker process just started on `addr` (a bounded guard, not a delay).
pub(crate) fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} not listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A Mosquitto process on 127.0.0.1 with a generated config; killed on drop.
pub struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `bin` listening on a free port of 127.0.0.1, with `extra` config lines, and waits
    /// until it accepts connections.
    pub fn start(bin: &Path, max_packet: usize, extra: &str) -> anyhow::Result<Mosquitto> {
        let port = free_port("127.0.0.1")?;
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("mosquitto.conf");
        // The fleet settings of systemd/mosquitto-fwdllm.conf, without TLS and passwords.
        std::fs::write(
            &conf,
            format!(
                "per_listener_settings false\nallow_anonymous true\npersistence false\n\
                 max_packet_size {max_packet}\nmax_inflight_messages 1000\n\
                 max_queued_messages 100000\nset_tcp_nodelay true\nlog_type error\n\
                 listener {port} 127.0.0.1\n{extra}"
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_listening(addr, "mosquitto")?;
        Ok(Mosquitto {
            child,
            port,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP relay whose live connections can be cut (each new connection is relayed again), or
/// held down: [`Relay::hold`] stops it at once (no byte read after the call is forwarded, so
/// whatever a broker publishes after it cannot cross) and refuses connections until
/// [`Relay::release`].
pub struct Relay {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    held: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Copies `from` to `to` chunk by chunk until either closes or the relay is held. The hold is
/// checked between reading a chunk and writing it, which is what makes [`Relay::hold`] a
/// boundary (`copy_bidirectional` could forward a chunk read after it).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    held: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if held.load(Ordering::SeqCst) || to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl Relay {
    /// Relays connections to `target`; runs on the current tokio runtime.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let held = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let (cut2, held2, accepted2) = (cut.clone(), held.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if held2.load(Ordering::SeqCst) {
                    // Refused: dropping the socket ends the peer's connection attempt.
                    continue;
                }
                accepted2.fetch_add(1, Ordering::Relaxed);
                let mut cut = cut2.subscribe();
                let held = held2.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    tokio::select! {
                        _ = pipe(in_r, out_w, held.clone()) => {}
                        _ = pipe(out_r, in_w, held) => {}
                        _ = cut.changed() => {}
                    }
                    // Dropping both sockets closes them: the peers see the connection end.
                });
            }
        });
        Ok(Relay {
            addr,
            cut,
            held,
            accepted,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every live relayed connection.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Takes the link down until [`Relay::release`]: from this call on no byte is forwarded,
    /// live connections close and new ones are refused.
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Lets connections through again (the peers reconnect on their own schedule).
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// A central broker and a site broker bridged to it through a cuttable relay.
pub struct Bridged {
    pub central: Mosquitto,
    pub relay: Relay,
    pub site: Mosquitto,
}

impl Bridged {
    pub async fn start(bin: &Path, max_packet: usize) -> anyhow::Result<Bridged> {
        let central = Mosquitto::start(bin, max_packet, "")?;
        let relay = Relay::start(central.addr()).await?;
        let site = Mosquitto::start(bin, max_packet, &bridge_conf(&relay.addr().to_string(), 1))?;
        Ok(Bridged {
            central,
            relay,
            site,
        })
    }
}

/// The retained messages under `fwdllm/v1/{job}/#` on the broker at `addr`, read up to a
/// sentinel: the sentinel's retained message is published first, and its delivery (after the
/// other subscription's, on the same connection, in order) says every retained message came.
pub async fn retained(addr: SocketAddr, job: &str) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let id = format!("retained-{}-{}", addr.port(), std::process::id());
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_clean_session(true);
    o.set_max_packet_size(256 << 20, 256 << 20);
    let (c, mut el) = AsyncClient::new(o, 16);
    let sentinel = format!("fwdllm-bench/sentinel/{}", addr.port());
    c.publish(&sentinel, QoS::AtLeastOnce, true, b"s".to_vec())
        .await?;
    c.subscribe(format!("fwdllm/v1/{job}/#"), QoS::AtLeastOnce)
        .await?;
    c.subscribe(&sentinel, QoS::AtLeastOnce).await?;
    let mut out = BTreeMap::new();
    tokio::time::timeout(GUARD, async {
        loop {
            match el.poll().await? {
                Event::Incoming(Packet::Publish(p)) if p.topic == sentinel => break,
                Event::Incoming(Packet::Publish(p)) if p.retain => {
                    out.insert(p.topic.clone(), p.payload.to_vec());
                }
                _ => {}
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("reading retained messages")??;
    c.publish(&sentinel, QoS::AtLeastOnce, true, Vec::new())
        .await?;
    let _ = c.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
    Ok(out)
}

/// Publishes a marker on `from` and waits until it arrives through the bridge on `to`: every
/// message `from` took before it has crossed too (one bridge connection, in order).
async fn drain(from: SocketAddr, to: SocketAddr, topic: &str) -> anyhow::Result<()> {
    let mk = |addr: SocketAddr, id: &str| {
        let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        o.set_clean_session(true);
        AsyncClient::new(o, 16)
    };
    let (rx, mut rx_el) = mk(to, &format!("drain-rx-{}", to.port()));
    rx.subscribe(topic, QoS::AtLeastOnce).await?;
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = rx_el.poll().await? {
            break;
        }
    }
    let (tx, mut tx_el) = mk(from, &format!("drain-tx-{}", from.port()));
    tx.publish(topic, QoS::AtLeastOnce, false, b"drain".to_vec())
        .await?;
    tokio::time::timeout(GUARD, async {
        loop {
            tokio::select! {
                ev = rx_el.poll() => if let Event::Incoming(Packet::Publish(p)) = ev? {
                    if p.topic == topic { break; }
                },
                ev = tx_el.poll() => { ev?; }
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("draining the bridge")??;
    let _ = rx.disconnect().await;
    let _ = tx.disconnect().await;
    Ok(())
}

/// The retained state of a job on the central and the site broker, once the bridge is drained
/// both ways: equal when nothing was lost on the way.
pub async fn retained_on_both(
    b: &Bridged,
    job: &str,
) -> anyhow::Result<(BTreeMap<String, Vec<u8>>, BTreeMap<String, Vec<u8>>)> {
    // Markers on topics the bridge carries: down (round of a job nobody runs) and up.
    drain(
        b.central.addr(),
        b.site.addr(),
        "fwdllm/v1/bridge-drain/round",
    )
    .await?;
    drain(
        b.site.addr(),
        b.central.addr(),
        "fwdllm/v1/bridge-drain/update/x",
    )
    .await?;
    Ok((
        retained(b.central.addr(), job).await?,
        retained(b.site.addr(), job).await?,
    ))
}

/// Collects every commit seen on `addr`'s commit topic and retained log, by version, and how
/// many times its connection was (re)established. A persistent session: a reconnect keeps the
/// subscriptions and what was queued meanwhile, so no commit is missed.
pub fn watch_commits(
    addr: SocketAddr,
    job: &str,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<(BTreeMap<u64, Vec<u8>>, u64)> {
    let topics = Topics::new(job).expect("job name");
    tokio::spawn(async move {
        let mut o = MqttOptions::new(format!("commits-{}", addr.port()), "127.0.0.1", addr.port());
        o.set_clean_session(false);
        o.set_max_packet_size(64 << 20, 64 << 20);
        let (c, mut el) = AsyncClient::new(o, 16);
        let mut seen = BTreeMap::new();
        let mut connections = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                ev = el.poll() => match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connections += 1;
                        for f in [topics.commit(), topics.commits_filter()] {
                            let _ = c.subscribe(f, QoS::AtLeastOnce).await;
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                        if let Ok(rc) = wire::decode::<RoundCommit>(&p.payload) {
                            seen.insert(rc.new_version, p.payload.to_vec());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        (seen, connections)
    })
}

/// What the bridged run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct BridgeOutcome {
    /// Seeds the clients sent that no commit holds.
    pub lost: u64,
    /// Seeds committed more than once.
    pub doubled: u64,
    /// Commit hashes a client replica could not reproduce.
    pub hash_mismatches: u64,
    /// Retained topics whose message differs between the central and the site broker.
    pub retained_differences: Vec<String>,
    /// Retained topics of the job on the central broker (statuses, commit, checkpoint, ...).
    pub retained_topics: usize,
    /// Bridge connections made (2 = one restart).
    pub bridge_connections: u64,
    pub commits: u64,
    pub duplicates: u64,
    /// Seeds sent, and versions of the commits seen on the site broker.
    pub sent: u64,
    pub versions_seen: Vec<u64>,
    /// Connections of the commit watcher (1 unless it had to reconnect).
    pub watcher_connections: u64,
    /// Commits the clients' replicas applied, all clients together (clients × commits when
    /// every replica followed every commit across the bridge).
    pub replica_commits_applied: u64,
}

/// `clients` simulated clients (each with its own replica) on the site broker, the aggregator
/// on the central one, `commits` rounds; the bridge is cut once, in the middle of round 2,
/// after half its updates were accepted.
pub async fn bridged_run(
    mosquitto: &Path,
    clients: usize,
    commits: u64,
) -> anyhow::Result<BridgeOutcome> {
    let dir = tempfile::tempdir()?;
    let mut cfg = AggregatorConfig::tiny("bridged", dir.path());
    cfg.job.max_commits = commits;
    cfg.state.checkpoint_every = 3;
    // The run accounts for every committed seed, which a dense commit does not name.
    cfg.state.commit_form = fwdllm_aggregator::config::CommitForm::Pairs;
    cfg.selection.eval_every = 0;
    cfg.round.min_clients = clients as u32;
    cfg.round.perturbations_per_client = 2;
    cfg.round.deadline_s = 300.0;
    cfg.pacing.max_perturbations = clients as u32 * 2;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    let b = Bridged::start(mosquitto, cfg.broker.max_packet_bytes).await?;
    let (tx, mut events) = tokio::sync::broadcast::channel(1 << 16);
    let hooks = Hooks {
        events: Some(tx),
        ..Hooks::default()
    };
    let stop = CancellationToken::new();
    let target = BrokerTarget {
        host: "127.0.0.1".into(),
        port: b.central.port(),
    };
    let params = SimParams {
        job: cfg.job.name.clone(),
        host: "127.0.0.1".into(),
        port: b.site.port(),
        layout: cfg.layout().map_err(anyhow::Error::msg)?,
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let watch_stop = CancellationToken::new();
    let watcher = watch_commits(b.site.addr(), &cfg.job.name, watch_stop.clone());
    let job = cfg.job.name.clone();
    let run = tokio::spawn(server::run(cfg, target, stop.clone(), hooks));
    let stats = Arc::new(SimStats::default());
    let sim_stop = CancellationToken::new();
    let tasks = sim::spawn_clients(&params, "site", clients, stats.clone(), sim_stop.clone());
    // Cut the bridge in the middle of round 2.
    let mut accepted_in_2 = 0;
    tokio::time::timeout(GUARD, async {
        loop {
            match events.recv().await {
                Ok(AggEvent::Update {
                    round: 2,
                    outcome: UpdateOutcome::Accepted { .. },
                    ..
                }) => {
                    accepted_in_2 += 1;
                    if accepted_in_2 == clients / 2 {
                        b.relay.cut();
                        break;
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => bail!("aggregator events ended: {e}"),
            }
        }
        anyhow::Ok(())
    })
    .await
    .context("waiting for round 2")??;
    let summary = tokio::time::timeout(GUARD, run)
        .await
        .context("the bridged run did not finish")???;
    sim_stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let (central, site) = retained_on_both(&b, &job).await?;
    watch_stop.cancel();
    let (seen, watcher_connections) = watcher.await?;
    let mut committed: BTreeMap<u64, u32> = BTreeMap::new();
    for bytes in seen.values() {
        if let Ok(rc) = wire::decode::<RoundCommit>(bytes) {
            for p in rc.step.pairs().expect("state.commit_form = pairs") {
                *committed.entry(p.seed).or_default() += 1;
            }
        }
    }
    let sent: BTreeSet<u64> = stats
        .sent_seeds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    let lost = sent.iter().filter(|s| !committed.contains_key(s)).count() as u64;
    let doubled = committed.values().filter(|&&n| n > 1).count() as u64;
    let mut differences: Vec<String> = central
        .keys()
        .chain(site.keys())
        .filter(|t| central.get(*t) != site.get(*t))
        .cloned()
        .collect();
    differences.dedup();
    Ok(BridgeOutcome {
        lost,
        doubled,
        hash_mismatches: stats.hash_mismatches.load(Ordering::Relaxed),
        retained_differences: differences,
        retained_topics: central.len(),
        bridge_connections: b.relay.connections(),
        commits: summary.version,
        duplicates: summary.duplicates,
        sent: sent.len() as u64,
        versions_seen: seen.keys().copied().collect(),
        watcher_connections,
        replica_commits_applied: stats.commits_applied.load(Ordering::Relaxed),
    })
}

/// The bridged run as report keys (`bridge_*` in `scale.json`).
pub fn report(o: &BridgeOutcome, clients: usize) -> Value {
    json!({
        "bridge_lost": o.lost,
        "bridge_doubled": o.doubled,
        "bridge_hash_mismatches": o.hash_mismatches,
        "bridge_retained_differences": o.retained_differences,
        "bridge_retained_topics": o.retained_topics,
        "bridge_connections": o.bridge_connections,
        "bridge_commits": o.commits,
        "bridge_duplicates_deduplicated": o.duplicates,
        "bridge_clients": clients,
        "bridge_seeds_sent": o.sent,
        "bridge_commit_versions_seen": o.versions_seen,
        "bridge_watcher_connections": o.watcher_connections,
        "bridge_replica_commits_applied": o.replica_commits_applied,
    })
}
