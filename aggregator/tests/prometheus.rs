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
use fwdllm_aggregator::sim::{self, SimParams, SimStats};
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
    let mut used = BTreeSet::new();
    for q in dashboard_queries() {
        for m in query_metrics(&q) {
            assert!(
                exported.contains(&m),
                "dashboard query {q:?} names {m}, which the aggregator does not export"
            );
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
    // The dashboard's queries name metrics this running aggregator serves.
    for q in dashboard_queries() {
        for m in query_metrics(&q) {
            assert!(names.contains(m.as_str()), "{q}: {m} not served");
        }
    }
    stop.cancel();
    run.await.unwrap().expect("aggregator ran");
    clients_stop.cancel();
    for c in clients {
        let _ = c.await;
    }
}
