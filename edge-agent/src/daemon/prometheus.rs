//! The agent's optional Prometheus endpoint (`[prometheus] listen`, off by default): what the
//! daemon's [`AgentInfo`] says — connection, replica version, work done, bytes, device readings
//! — in the text exposition format on `http://{listen}/metrics`, labelled with the job and the
//! client id (`fwdllm_job`, `fwdllm_client`), so one Prometheus scraping a site's boards tells
//! them apart. Off by default: most fleets read the same figures from the telemetry topic
//! through the broker, and a board should not open a port nobody scrapes.
//!
//! The same crates as the aggregator's endpoint (`metrics` + `metrics-exporter-prometheus`,
//! its hyper listener; already in the tree, no native build). The recorder is this agent's own,
//! never installed globally. A task follows the daemon's `AgentInfo` watch channel and refreshes
//! every metric on each change; the daemon itself never waits on it.

use std::net::SocketAddr;

use ::metrics::{Counter, Gauge, Key, KeyName, Metadata, Recorder};
use fwdllm_shared::wire::AgentState;
use metrics_exporter_prometheus::{
    BuildError, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::AgentInfo;

/// Every counter the agent exports, in the order `counter_values` fills them.
pub const COUNTERS: [(&str, &str); 8] = [
    (
        "fwdllm_agent_connections_total",
        "Successful MQTT connections, reconnects included.",
    ),
    ("fwdllm_agent_updates_sent_total", "Updates published."),
    (
        "fwdllm_agent_perturbations_total",
        "(seed, g) pairs computed.",
    ),
    (
        "fwdllm_agent_rounds_skipped_busy_total",
        "Requests sat out because of the device limits.",
    ),
    (
        "fwdllm_agent_commits_applied_total",
        "Commits replayed onto the replica.",
    ),
    (
        "fwdllm_agent_checkpoints_loaded_total",
        "Checkpoints adopted.",
    ),
    (
        "fwdllm_agent_mqtt_sent_bytes_total",
        "MQTT payload bytes published.",
    ),
    (
        "fwdllm_agent_mqtt_received_bytes_total",
        "MQTT payload bytes received.",
    ),
];

/// Every gauge the agent exports, in the order `gauge_values` fills them. Device readings
/// are NaN until the first telemetry tick (and the temperature and load where the board has
/// none).
pub const GAUGES: [(&str, &str); 8] = [
    (
        "fwdllm_agent_connected",
        "1 while the MQTT connection is up.",
    ),
    (
        "fwdllm_agent_model_version",
        "Model version of the local replica.",
    ),
    (
        "fwdllm_agent_busy",
        "1 while the device limits keep the agent out of rounds.",
    ),
    (
        "fwdllm_agent_training",
        "1 while the agent computes an update.",
    ),
    (
        "fwdllm_agent_cpu_percent",
        "Whole-machine CPU use, percent, at the last telemetry tick.",
    ),
    (
        "fwdllm_agent_memory_available_bytes",
        "Available memory at the last telemetry tick.",
    ),
    (
        "fwdllm_agent_temperature_celsius",
        "Hottest sensor at the last telemetry tick.",
    ),
    (
        "fwdllm_agent_load_average_1m",
        "1-minute load average at the last telemetry tick.",
    ),
];

const META: Metadata<'static> = Metadata::new("fwdllm_agent", ::metrics::Level::INFO, None);

fn counter_values(i: &AgentInfo) -> [u64; 8] {
    [
        i.connections,
        i.updates_sent,
        i.perturbations_done,
        i.rounds_skipped_busy,
        i.commits_applied,
        i.checkpoints_loaded,
        i.bytes_sent,
        i.bytes_received,
    ]
}

fn gauge_values(i: &AgentInfo) -> [f64; 8] {
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    let d = i.device;
    [
        flag(i.connected),
        i.model_version as f64,
        flag(i.state == AgentState::Busy),
        flag(i.state == AgentState::Training),
        d.map_or(f64::NAN, |d| f64::from(d.cpu_percent)),
        d.map_or(f64::NAN, |d| d.mem_available_bytes as f64),
        d.and_then(|d| d.temperature_c).map_or(f64::NAN, f64::from),
        d.and_then(|d| d.load_avg_1m).map_or(f64::NAN, f64::from),
    ]
}

/// The registry of one agent.
pub struct AgentMetrics {
    handle: PrometheusHandle,
    counters: Vec<Counter>,
    gauges: Vec<Gauge>,
}

impl AgentMetrics {
    fn register(recorder: &PrometheusRecorder) -> AgentMetrics {
        let counters = COUNTERS
            .iter()
            .map(|(name, help)| {
                recorder.describe_counter(KeyName::from_const_str(name), None, (*help).into());
                let c = recorder.register_counter(&Key::from_static_name(name), &META);
                // A counter appears in the exposition once touched: export every one at once.
                c.increment(0);
                c
            })
            .collect();
        let gauges = GAUGES
            .iter()
            .map(|(name, help)| {
                recorder.describe_gauge(KeyName::from_const_str(name), None, (*help).into());
                recorder.register_gauge(&Key::from_static_name(name), &META)
            })
            .collect();
        AgentMetrics {
            handle: recorder.handle(),
            counters,
            gauges,
        }
    }

    /// The registry alone (tests), rendered with [`Self::render`].
    pub fn unserved(job: &str, client_id: &str) -> AgentMetrics {
        AgentMetrics::register(&builder(job, client_id).build_recorder())
    }

    /// Sets every metric from `info`.
    pub fn observe(&self, info: &AgentInfo) {
        for (c, v) in self.counters.iter().zip(counter_values(info)) {
            c.absolute(v);
        }
        for (g, v) in self.gauges.iter().zip(gauge_values(info)) {
            g.set(v);
        }
    }

    /// The text exposition, as served.
    pub fn render(&self) -> String {
        self.handle.render()
    }
}

fn builder(job: &str, client_id: &str) -> PrometheusBuilder {
    PrometheusBuilder::new()
        .add_global_label("fwdllm_job", job)
        .add_global_label("fwdllm_client", client_id)
}

/// The served endpoint: the exporter's listener and the task that follows the agent's info.
/// Dropping it stops both.
pub struct MetricsServer {
    tasks: [JoinHandle<()>; 2],
}

impl MetricsServer {
    /// Binds `listen` (inside a tokio runtime) and serves the metrics of `info` from then on.
    pub fn serve(
        listen: SocketAddr,
        job: &str,
        client_id: &str,
        mut info: watch::Receiver<AgentInfo>,
    ) -> Result<MetricsServer, BuildError> {
        let (recorder, exporter) = builder(job, client_id).with_http_listener(listen).build()?;
        let metrics = AgentMetrics::register(&recorder);
        metrics.observe(&info.borrow_and_update());
        let server = tokio::spawn(async move {
            if let Err(e) = exporter.await {
                log::error!("prometheus endpoint stopped: {e}");
            }
        });
        let follow = tokio::spawn(async move {
            while info.changed().await.is_ok() {
                metrics.observe(&info.borrow_and_update());
            }
        });
        log::info!("prometheus metrics on http://{listen}/metrics");
        Ok(MetricsServer {
            tasks: [server, follow],
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::DeviceSample;

    fn info() -> AgentInfo {
        AgentInfo {
            client_id: "board-1".into(),
            connected: true,
            connections: 2,
            state: AgentState::Training,
            model_version: 7,
            weights_hash: None,
            last_answered: None,
            updates_sent: 5,
            perturbations_done: 20,
            rounds_skipped_busy: 1,
            checkpoints_loaded: 1,
            commits_applied: 6,
            bytes_sent: 900,
            bytes_received: 4000,
            device: None,
        }
    }

    fn sample<'a>(text: &'a str, name: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    }

    #[test]
    fn every_metric_is_exported_with_the_info_it_reads_and_both_labels() {
        let m = AgentMetrics::unserved("job-a", "board-1");
        let mut i = info();
        m.observe(&i);
        let text = m.render();
        for (name, _) in COUNTERS.iter().chain(GAUGES.iter()) {
            let line = sample(&text, name);
            assert!(
                line.contains(r#"fwdllm_job="job-a""#)
                    && line.contains(r#"fwdllm_client="board-1""#),
                "{line}"
            );
        }
        let value = |text: &str, name: &str| -> String {
            sample(text, name).rsplit_once(' ').unwrap().1.to_owned()
        };
        assert_eq!(value(&text, "fwdllm_agent_model_version"), "7");
        assert_eq!(value(&text, "fwdllm_agent_commits_applied_total"), "6");
        assert_eq!(value(&text, "fwdllm_agent_training"), "1");
        assert_eq!(value(&text, "fwdllm_agent_busy"), "0");
        assert_eq!(value(&text, "fwdllm_agent_cpu_percent"), "NaN");
        i.device = Some(DeviceSample {
            cpu_percent: 50.0,
            mem_available_bytes: 1 << 30,
            temperature_c: Some(61.5),
            ..DeviceSample::default()
        });
        i.state = AgentState::Busy;
        m.observe(&i);
        let text = m.render();
        assert_eq!(value(&text, "fwdllm_agent_cpu_percent"), "50");
        assert_eq!(value(&text, "fwdllm_agent_temperature_celsius"), "61.5");
        assert_eq!(value(&text, "fwdllm_agent_load_average_1m"), "NaN");
        assert_eq!(value(&text, "fwdllm_agent_busy"), "1");
        assert_eq!(value(&text, "fwdllm_agent_training"), "0");
    }
}
