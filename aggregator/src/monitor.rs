//! Live terminal monitor of one job on any broker: subscribes to `fwdllm/v1/{job}/#` (read
//! only) and redraws rounds, clients (online/busy/offline), pacing and metrics once a second.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{
    self, AgentStatus, AggregatorMetrics, ClientSelection, RoundAnnounce, RoundCommit, Telemetry,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

/// What the monitor has seen so far.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub job: String,
    pub announce: Option<RoundAnnounce>,
    pub commit: Option<RoundCommit>,
    pub metrics: Option<AggregatorMetrics>,
    pub aggregator: Option<AgentStatus>,
    pub clients: BTreeMap<String, AgentStatus>,
    pub telemetry: BTreeMap<String, Telemetry>,
    pub updates_seen: u64,
    pub update_bytes: u64,
}

impl View {
    pub fn apply(&mut self, topics: &Topics, topic: &str, payload: &[u8]) {
        let Some(kind) = topics.parse(topic) else {
            return;
        };
        if payload.is_empty() {
            if kind == TopicKind::Round {
                self.announce = None;
            }
            return;
        }
        match kind {
            TopicKind::Round => self.announce = wire::decode(payload).ok(),
            TopicKind::Commit => self.commit = wire::decode(payload).ok(),
            TopicKind::Metrics => self.metrics = wire::decode_json(payload).ok(),
            TopicKind::Aggregator => self.aggregator = wire::decode_json(payload).ok(),
            TopicKind::Status(id) => {
                if let Ok(s) = wire::decode_json(payload) {
                    self.clients.insert(id, s);
                }
            }
            TopicKind::Telemetry(id) => {
                if let Ok(t) = wire::decode_json(payload) {
                    self.telemetry.insert(id, t);
                }
            }
            TopicKind::Update(_) => {
                self.updates_seen += 1;
                self.update_bytes += payload.len() as u64;
            }
            TopicKind::CommitLog(_) | TopicKind::Checkpoint | TopicKind::Eval(_) => {}
        }
    }

    /// The screen as text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "fwdllm monitor — job {}", self.job);
        match &self.aggregator {
            Some(a) => {
                let _ = writeln!(s, "aggregator: {:?}, version {}", a.state, a.model_version);
            }
            None => {
                let _ = writeln!(s, "aggregator: not seen");
            }
        }
        match &self.announce {
            Some(a) => {
                let sel = match &a.selection {
                    ClientSelection::All => "all".to_string(),
                    ClientSelection::Clients(c) => format!("{} clients", c.len()),
                    ClientSelection::Fraction { fraction, .. } => format!("fraction {fraction}"),
                };
                let _ = writeln!(
                    s,
                    "round {} at version {} (extend {}), {} perturbations/client, eps {}, {sel}",
                    a.round, a.model_version, a.extend, a.perturbations_per_client, a.eps
                );
            }
            None => {
                let _ = writeln!(s, "round: none open");
            }
        }
        if let Some(c) = &self.commit {
            let _ = writeln!(
                s,
                "last commit: round {} -> version {} ({}) hash {}",
                c.round,
                c.new_version,
                c.step.describe(),
                &c.weights_hash.to_string()[..16]
            );
        }
        if let Some(m) = &self.metrics {
            let _ = writeln!(
                s,
                "pacing: z = {:.2} / target {:.2} | pairs {} (total {}) | responded {}/{} | extends {}",
                m.pacing_stat, m.pacing_target, m.perturbations, m.perturbations_total, m.clients_responded, m.clients_selected, m.extends
            );
            let _ = writeln!(
                s,
                "step: lr {:.3e} ‖Δθ‖ {:.3e} ‖θ‖ {:.3e}{} | loss {:.4} | eval acc {} | dup {} stale {} rejected {}",
                m.lr,
                m.step_norm,
                m.theta_norm,
                if m.clamped { " (clamped)" } else { "" },
                m.loss_mean,
                m.eval_accuracy.map(|a| format!("{a:.3}")).unwrap_or_else(|| "-".into()),
                m.duplicates,
                m.stale,
                m.rejected
            );
        }
        let count = |st: wire::AgentState| self.clients.values().filter(|c| c.state == st).count();
        let _ = writeln!(
            s,
            "clients: {} online, {} training, {} busy, {} offline | updates seen {} ({} bytes)",
            count(wire::AgentState::Online),
            count(wire::AgentState::Training),
            count(wire::AgentState::Busy),
            count(wire::AgentState::Offline),
            self.updates_seen,
            self.update_bytes
        );
        let _ = writeln!(
            s,
            "{:<24} {:<9} {:>8} {:>6} {:>8} {:>7}",
            "client", "state", "version", "cpu%", "mem MiB", "temp C"
        );
        for (id, c) in self.clients.iter().take(40) {
            let t = self.telemetry.get(id);
            let _ = writeln!(
                s,
                "{:<24} {:<9} {:>8} {:>6} {:>8} {:>7}",
                id,
                format!("{:?}", c.state).to_lowercase(),
                c.model_version,
                t.map(|t| format!("{:.0}", t.cpu_percent))
                    .unwrap_or_default(),
                t.map(|t| (t.mem_used_bytes >> 20).to_string())
                    .unwrap_or_default(),
                t.and_then(|t| t.temperature_c)
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_default()
            );
        }
        if self.clients.len() > 40 {
            let _ = writeln!(s, "... and {} more", self.clients.len() - 40);
        }
        s
    }
}

/// Runs the monitor until `stop`; redraws the terminal once a second (or prints plain
/// snapshots when `plain`).
pub async fn run(
    host: &str,
    port: u16,
    job: &str,
    plain: bool,
    stop: CancellationToken,
) -> Result<(), String> {
    let topics = Topics::new(job).map_err(|e| e.to_string())?;
    let id = format!("fwdllm-monitor-{}", std::process::id());
    let mut opts = MqttOptions::new(id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 << 20, 1 << 16);
    let (client, mut el) = AsyncClient::new(opts, 16);
    let mut view = View {
        job: job.to_string(),
        ..View::default()
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                if plain {
                    println!("{}", view.render());
                } else {
                    print!("\x1b[2J\x1b[H{}", view.render());
                }
            }
            ev = el.poll() => match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    client.subscribe(topics.all_filter(), QoS::AtMostOnce).await.map_err(|e| e.to_string())?;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    view.apply(&topics, &p.topic, &p.payload);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("monitor: {e}; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
    Ok(())
}
