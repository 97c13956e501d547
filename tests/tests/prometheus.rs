//! The Prometheus endpoint: a running aggregator (embedded broker, simulated clients) is
//! scraped over HTTP, the text exposition is parsed line by line (HELP/TYPE, names, label sets,
//! values) and checked against what the run did; and the shipped Grafana dashboard
//! (`systemd/grafana-fwdllm.json`) is valid JSON whose every panel query names a metric the
//! aggregator exports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fwdllm_aggregator::broker::{free_port, EmbeddedBroker};
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::AggEvent;
use fwdllm_aggregator::prometheus::{Prometheus, METRICS};
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_frontdoor::sim::{self, SimParams, SimStats};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A failure guard for the whole run (never reached when things work), not a synchronisation.
const GUARD: Duration = Duration::from_secs(300);

/// One sample of the exposition: name, label set, value.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the Prometheus text exposition format (version 0.0.4), failing on anything else.
fn parse_exposition(text: &str) -> Samples {
    let valid_name = |n: &str| {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    };
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    let mut helped = BTreeSet::new();
    let mut samples = Samples::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                typed.insert(name.into(), kind.into()).is_none(),
                "TYPE twice: {line}"
            );
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            helped.insert(name.to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment: {line}");
        let (head, value) = line.rsplit_once(' ').expect("sample: name value");
        let value: f64 = match value {
            "NaN" => f64::NAN,
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("value of {line}")),
        };
        let (name, labels) = match head.split_once('{') {
            None => (head, BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("label set closes");
                let mut labels = BTreeMap::new();
                for pair in body.split(',').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').expect("label k=v");
                    assert!(valid_name(k), "label name in {line}");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("quoted label value");
                    labels.insert(k.to_owned(), v.to_owned());
                }
                (name, labels)
            }
        };
        assert!(valid_name(name), "{line}");
        assert!(typed.contains_key(name), "sample before its TYPE: {line}");
        assert!(
            samples.insert((name.to_owned(), labels), value).is_none(),
            "sample twice: {line}"
        );
    }
    for name in typed.keys() {
        assert!(helped.contains(name), "{name} has no HELP line");
    }
    samples
}

/// The single value of `name` whose labels include `with` (plus the job label).
fn value(s: &Samples, name: &str, with: &[(&str, &str)]) -> f64 {
    let hits: Vec<f64> = s
        .iter()
        .filter(|((n, l), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(hits.len(), 1, "{name} {with:?}: {hits:?}");
    hits[0]
}

/// The agent's metric names (the boards' panels of the dashboard are checked against them).
fn agent_exported() -> Option<BTreeSet<String>> {
    let text = fwdllm_agent::daemon::prometheus::AgentMetrics::unserved("dash", "b").render();
    Some(
        parse_exposition(&text)
            .into_keys()
            .map(|(n, _)| n)
            .collect(),
    )
}

fn dashboard() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/grafana-fwdllm.json");
    let text = std::fs::read_to_string(&path).expect("dashboard file");
    serde_json::from_str(&text).expect("the dashboard is valid JSON")
}

/// `fwdllm_*` metric names in a PromQL query (label matchers and grouping clauses removed, so
/// the `fwdllm_job` label is not taken for a metric).
fn query_metrics(expr: &str) -> Vec<String> {
    let mut bare = String::new();
    let mut depth = 0;
    for ch in expr.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ if depth == 0 => bare.push(ch),
            _ => {}
        }
    }
    bare.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("fwdllm_"))
        .map(str::to_owned)
        .collect()
}

/// Every panel query of the dashboard, after checking the panel's shape.
fn dashboard_queries() -> Vec<String> {
    let d = dashboard();
    assert!(d["title"].is_string() && d["uid"].is_string());
    assert!(d["schemaVersion"].as_u64().is_some());
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for p in panels {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "ids unique"
        );
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(p["type"].is_string());
        for k in ["h", "w", "x", "y"] {
            assert!(p["gridPos"][k].as_u64().is_some(), "gridPos.{k}");
        }
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", p["title"]);
        for t in targets {
            assert!(t["refId"].is_string());
            let expr = t["expr"].as_str().expect("expr").to_owned();
            assert!(
                !query_metrics(&expr).is_empty(),
                "query names no fwdllm metric: {expr}"
            );
            queries.push(expr);
        }
    }
    queries
}

#[test]
fn query_metric_names_skip_labels() {
    assert_eq!(
        query_metrics(
            r#"sum by (kind) (rate(fwdllm_a_total{fwdllm_job=~"$job",kind="x"}[1m])) / fwdllm_b"#
        ),
        ["fwdllm_a_total", "fwdllm_b"]
    );
}

#[test]
fn every_dashboard_query_names_an_exported_metric() {
    let exported: BTreeSet<String> = parse_exposition(&Prometheus::unserved("dash").render())
        .into_keys()
        .map(|(n, _)| n)
        .collect();
    let listed: BTreeSet<String> = METRICS.iter().map(|(n, _, _)| n.to_string()).collect();
    assert_eq!(exported, listed);
    let boards = agent_exported();
    let mut used = BTreeSet::new();
    for q in dashboard_queries() {
        for m in query_metrics(&q) {
            if m.starts_with("fwdllm_agent_") {
                if let Some(b) = &boards {
                    assert!(
                        b.contains(&m),
                        "dashboard query {q:?} names {m}, which the agent does not export"
                    );
                }
            } else {
                assert!(
                    exported.contains(&m),
                    "dashboard query {q:?} names {m}, which the aggregator does not export"
                );
            }
            used.insert(m);
        }
    }
    // The issue's list: rounds, commits, accepted/rejected, pool variance, clients, ingest rate,
    // held-out accuracy.
    for m in [
        "fwdllm_rounds_total",
        "fwdllm_commits_total",
        "fwdllm_updates_accepted_total",
        "fwdllm_updates_rejected_total",
        "fwdllm_pool_variance",
        "fwdllm_clients_online",
        "fwdllm_ingest_updates_per_second",
        "fwdllm_eval_accuracy",
    ] {
        assert!(used.contains(m), "no panel shows {m}");
    }
}

async fn scrape(port: u16) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to /metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).expect("UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_from_a_running_aggregator() {
    const CLIENTS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start("127.0.0.1", 0, 8 << 20).unwrap();
    let port = free_port("127.0.0.1").unwrap();
    let mut cfg = AggregatorConfig::default();
    cfg.job.name = "prom".into();
    cfg.model.preset = "tiny".into();
    cfg.state.dir = dir.path().to_path_buf();
    cfg.state.plot_every = 0;
    cfg.round.min_clients = CLIENTS as u32;
    cfg.round.quorum = CLIENTS as u32;
    cfg.round.perturbations_per_client = 2;
    cfg.pacing.max_perturbations = 2 * CLIENTS as u32;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    cfg.prometheus.listen = format!("127.0.0.1:{port}");
    let params = SimParams {
        job: cfg.job.name.clone(),
        host: broker.host(),
        port: broker.port(),
        layout: cfg.layout().unwrap(),
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let (tx, mut events) = tokio::sync::broadcast::channel(4096);
    let hooks = Hooks {
        events: Some(tx),
        // A held-out evaluation after every commit, as the demo reports one.
        on_commit: Some(Box::new(|_, _| Some((0.75, 0.5)))),
        ..Hooks::default()
    };
    let stop = CancellationToken::new();
    let target = BrokerTarget {
        host: broker.host(),
        port: broker.port(),
    };
    let run = tokio::spawn(server::run(cfg, target, stop.clone(), hooks));
    let clients_stop = CancellationToken::new();
    let stats = Arc::new(SimStats::default());
    let clients = sim::spawn_clients(&params, "prom", CLIENTS, stats, clients_stop.clone());

    // Wait for the third commit (the event is emitted after the metrics were refreshed).
    tokio::time::timeout(GUARD, async {
        loop {
            match events.recv().await {
                Ok(AggEvent::Committed { version, .. }) if version >= 3 => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("aggregator events ended: {e}"),
            }
        }
    })
    .await
    .expect("three commits");
    let text = scrape(port).await;
    let s = parse_exposition(&text);
    let names: BTreeSet<&str> = s.keys().map(|(n, _)| n.as_str()).collect();
    for (name, _, _) in METRICS {
        assert!(names.contains(name), "{name} missing from the scrape");
    }
    for ((_, labels), _) in s.iter() {
        assert_eq!(
            labels.get("fwdllm_job").map(String::as_str),
            Some("prom"),
            "{labels:?}"
        );
    }
    assert!(value(&s, "fwdllm_commits_total", &[]) >= 3.0);
    assert!(value(&s, "fwdllm_model_version", &[]) >= 3.0);
    assert!(value(&s, "fwdllm_rounds_total", &[]) >= 3.0);
    assert!(value(&s, "fwdllm_updates_accepted_total", &[]) >= 3.0 * CLIENTS as f64);
    assert!(value(&s, "fwdllm_perturbations_total", &[]) >= 6.0 * CLIENTS as f64);
    assert_eq!(value(&s, "fwdllm_clients_online", &[]), CLIENTS as f64);
    assert_eq!(
        value(
            &s,
            "fwdllm_updates_rejected_total",
            &[("reason", "undecodable")]
        ),
        0.0
    );
    assert_eq!(value(&s, "fwdllm_eval_accuracy", &[]), 0.75);
    assert!(value(&s, "fwdllm_last_round_seconds", &[]) >= 0.0);
    assert!(value(&s, "fwdllm_state_fsyncs_total", &[("kind", "snapshot")]) >= 3.0);
    let received = value(&s, "fwdllm_updates_received_total", &[]);
    assert!(received >= value(&s, "fwdllm_updates_accepted_total", &[]));
    // The dashboard's queries name metrics this running aggregator serves (the boards' panels:
    // `an_agents_metrics_are_scraped_while_it_trains`).
    for q in dashboard_queries() {
        for m in query_metrics(&q) {
            if !m.starts_with("fwdllm_agent_") {
                assert!(names.contains(m.as_str()), "{q}: {m} not served");
            }
        }
    }
    stop.cancel();
    run.await.unwrap().expect("aggregator ran");
    clients_stop.cancel();
    for c in clients {
        let _ = c.await;
    }
}

/// A real agent (synthetic gradient source) with `[prometheus] listen` set, trained by a real
/// aggregator through the embedded broker, is scraped over HTTP: every metric it lists is
/// served with the job and client labels and tells what the agent did, and the dashboard's
/// boards panels name metrics it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_metrics_are_scraped_while_it_trains() {
    use fwdllm_agent::config::{AgentConfig, SourceKind};
    use fwdllm_agent::daemon::prometheus::{COUNTERS, GAUGES};
    use fwdllm_agent::daemon::{Agent, SyntheticSource};

    const JOB: &str = "prom-agent";
    let dir = tempfile::tempdir().unwrap();
    let broker = EmbeddedBroker::start("127.0.0.1", 0, 8 << 20).unwrap();
    let mut cfg = AggregatorConfig::tiny(JOB, &dir.path().join("agg"));
    cfg.round.min_clients = 1;
    cfg.round.quorum = 1;
    cfg.round.perturbations_per_client = 2;
    cfg.pacing.max_perturbations = 2;
    cfg.pacing.min_perturbations = 2;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    let target = BrokerTarget {
        host: broker.host(),
        port: broker.port(),
    };
    let (tx, mut events) = tokio::sync::broadcast::channel(4096);
    let hooks = Hooks {
        events: Some(tx),
        ..Hooks::default()
    };
    let stop = CancellationToken::new();
    let run = tokio::spawn(server::run(cfg, target, stop.clone(), hooks));

    let port = free_port("127.0.0.1").unwrap();
    let mut a = AgentConfig::default();
    a.agent.client_id = "board-1".into();
    a.agent.job = JOB.into();
    a.agent.state_dir = dir.path().join("board-1").display().to_string();
    a.agent.systemd_notify = false;
    a.mqtt.host = broker.host();
    a.mqtt.port = broker.port();
    a.mqtt.max_packet_bytes = 8 << 20;
    a.limits.min_free_memory_mb = 0;
    a.limits.max_temperature_c = 0.0;
    a.gradient.source = SourceKind::Synthetic;
    a.prometheus.listen = format!("127.0.0.1:{port}");
    let source = SyntheticSource::new(
        a.gradient.synthetic_target_seed,
        a.gradient.synthetic_target_scale,
    );
    let agent = Agent::new(a, Box::new(source)).expect("valid agent config");
    let mut info = agent.watch();
    let agent_stop = CancellationToken::new();
    let agent_run = tokio::spawn(agent.run(agent_stop.clone()));

    tokio::time::timeout(GUARD, async {
        loop {
            match events.recv().await {
                Ok(AggEvent::Committed { version, .. }) if version >= 3 => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("aggregator events ended: {e}"),
            }
        }
    })
    .await
    .expect("three commits");
    tokio::time::timeout(GUARD, info.wait_for(|i| i.model_version >= 3))
        .await
        .expect("the agent reaches version 3")
        .expect("agent info");
    // The endpoint's task follows the same info channel on its own: scrape until it has seen
    // version 3 (the failure guard bounds it; each scrape is an HTTP round trip).
    let s = tokio::time::timeout(GUARD, async {
        loop {
            let s = parse_exposition(&scrape(port).await);
            if value(&s, "fwdllm_agent_model_version", &[]) >= 3.0 {
                break s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the endpoint shows version 3");
    let names: BTreeSet<&str> = s.keys().map(|(n, _)| n.as_str()).collect();
    for (name, _) in COUNTERS.iter().chain(GAUGES.iter()) {
        assert!(names.contains(name), "{name} missing from the scrape");
    }
    for ((name, labels), _) in s.iter() {
        assert_eq!(
            labels.get("fwdllm_job").map(String::as_str),
            Some(JOB),
            "{name}"
        );
        assert_eq!(
            labels.get("fwdllm_client").map(String::as_str),
            Some("board-1"),
            "{name}"
        );
    }
    assert_eq!(value(&s, "fwdllm_agent_connected", &[]), 1.0);
    assert!(value(&s, "fwdllm_agent_connections_total", &[]) >= 1.0);
    // Quorum 1: the agent's update made each of the three commits.
    assert!(value(&s, "fwdllm_agent_updates_sent_total", &[]) >= 3.0);
    assert!(value(&s, "fwdllm_agent_perturbations_total", &[]) >= 6.0);
    let synced = value(&s, "fwdllm_agent_commits_applied_total", &[])
        + value(&s, "fwdllm_agent_checkpoints_loaded_total", &[]);
    assert!(synced >= 3.0, "{synced}");
    assert!(value(&s, "fwdllm_agent_mqtt_received_bytes_total", &[]) > 0.0);
    for q in dashboard_queries() {
        for m in query_metrics(&q) {
            if m.starts_with("fwdllm_agent_") {
                assert!(names.contains(m.as_str()), "{q}: {m} not served");
            }
        }
    }
    agent_stop.cancel();
    agent_run.await.unwrap().expect("agent ran");
    stop.cancel();
    run.await.unwrap().expect("aggregator ran");
}
