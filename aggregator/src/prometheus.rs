//! The aggregator's Prometheus endpoint (`[prometheus] listen`): a fixed set of typed metrics
//! (every name below, never built from strings at the call site, so a dashboard never breaks on
//! a renamed metric), refreshed by the driver from the coordinator after every durable group
//! and served in the text exposition format on `http://{listen}/metrics`.
//!
//! Crate: `metrics` + `metrics-exporter-prometheus`, the exact versions rumqttd already links
//! (no new crate, no native build). The recorder is this aggregator's own, never installed
//! globally, so several aggregators in one process (tests, simulations) each export theirs.
//! The HTTP side is the exporter's listener (hyper 0.14, also already in the tree): any path
//! but `/health` answers with the exposition.
//!
//! Counters mirror the coordinator's durable totals (set with `absolute`, after `persist`), so
//! they count only what is durable and survive restarts; gauges are live values. The job name
//! is the global label `fwdllm_job`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ::metrics::{Counter, Gauge, Key, KeyName, Label, Metadata, Recorder};
use fwdllm_shared::wire::AggregatorMetrics;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::coordinator::Coordinator;
use crate::robust::RejectReason;

#[derive(Debug, Error)]
pub enum PrometheusError {
    #[error("prometheus.listen {addr}: {message}")]
    Listen { addr: SocketAddr, message: String },
}

/// Kind of an exported metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Every metric the aggregator exports: name, kind, help text.
pub const METRICS: &[(&str, Kind, &str)] = &[
    ("fwdllm_rounds_total", Kind::Counter, "Rounds opened."),
    ("fwdllm_commits_total", Kind::Counter, "Commits made (= model version)."),
    ("fwdllm_rounds_abandoned_total", Kind::Counter, "Rounds abandoned at their deadline without quorum."),
    ("fwdllm_updates_received_total", Kind::Counter, "Update messages made durable, whatever their outcome."),
    ("fwdllm_updates_accepted_total", Kind::Counter, "Updates accepted into a round."),
    ("fwdllm_updates_rejected_total", Kind::Counter, "Updates rejected, by reason."),
    ("fwdllm_updates_duplicate_total", Kind::Counter, "Updates already counted (same client, round and request)."),
    ("fwdllm_updates_stale_total", Kind::Counter, "Updates for a round that is no longer open."),
    ("fwdllm_perturbations_total", Kind::Counter, "(seed, g) pairs pooled."),
    ("fwdllm_clipped_pairs_total", Kind::Counter, "Pairs whose g the robust clip changed."),
    ("fwdllm_capped_clients_total", Kind::Counter, "Client contributions the per-client cap scaled down."),
    ("fwdllm_state_fsyncs_total", Kind::Counter, "Fsync'd state writes of this process: journal appends (group commits) and state snapshots."),
    ("fwdllm_journaled_updates_total", Kind::Counter, "Update messages made durable by journal appends in this process."),
    ("fwdllm_model_version", Kind::Gauge, "Current model version."),
    ("fwdllm_round", Kind::Gauge, "Id of the last round opened."),
    ("fwdllm_round_open", Kind::Gauge, "1 while a round is collecting, else 0."),
    ("fwdllm_clients_online", Kind::Gauge, "Clients whose retained status makes them eligible."),
    ("fwdllm_clients_busy", Kind::Gauge, "Clients reporting busy (outside their device limits)."),
    ("fwdllm_round_clients_selected", Kind::Gauge, "Clients selected for the open round."),
    ("fwdllm_round_clients_responded", Kind::Gauge, "Selected clients with an accepted update in the open round."),
    ("fwdllm_round_perturbations", Kind::Gauge, "Pairs pooled in the open round (pacing block)."),
    ("fwdllm_pacing_z", Kind::Gauge, "Pacing statistic z of the open round's pool."),
    ("fwdllm_pool_variance", Kind::Gauge, "Pooled second moment of g (mean g^2) of the open round."),
    ("fwdllm_ingest_updates_per_second", Kind::Gauge, "Update messages made durable per second, over the last 10 s."),
    ("fwdllm_last_round_seconds", Kind::Gauge, "Duration of the last finished round, from open to commit or abandon."),
    ("fwdllm_train_loss", Kind::Gauge, "Mean training loss the clients reported in the last committed round."),
    ("fwdllm_step_norm", Kind::Gauge, "Norm of the last committed step."),
    ("fwdllm_learning_rate", Kind::Gauge, "Learning rate of the last commit."),
    ("fwdllm_eval_accuracy", Kind::Gauge, "Held-out accuracy of the last evaluation (NaN until evaluated)."),
    ("fwdllm_eval_loss", Kind::Gauge, "Held-out loss of the last evaluation (NaN until evaluated)."),
    ("fwdllm_best_dev_accuracy", Kind::Gauge, "Dev accuracy of the best version so far, model selection (NaN until scored)."),
    ("fwdllm_dp_epsilon", Kind::Gauge, "Differential-privacy epsilon spent (NaN without DP)."),
];

/// Window of the ingest-rate gauge.
const RATE_WINDOW: Duration = Duration::from_secs(10);
const META: Metadata<'static> = Metadata::new("fwdllm_aggregator", ::metrics::Level::INFO, None);

/// The registered handles (one field per metric of [`METRICS`]).
struct Handles {
    rounds: Counter,
    commits: Counter,
    abandoned: Counter,
    received: Counter,
    accepted: Counter,
    rejected: Vec<(RejectReason, Counter)>,
    duplicate: Counter,
    stale: Counter,
    perturbations: Counter,
    clipped: Counter,
    capped: Counter,
    fsync_journal: Counter,
    fsync_snapshot: Counter,
    journaled: Counter,
    version: Gauge,
    round: Gauge,
    round_open: Gauge,
    online: Gauge,
    busy: Gauge,
    selected: Gauge,
    responded: Gauge,
    round_pairs: Gauge,
    pacing_z: Gauge,
    pool_variance: Gauge,
    ingest_rate: Gauge,
    last_round_s: Gauge,
    train_loss: Gauge,
    step_norm: Gauge,
    lr: Gauge,
    eval_accuracy: Gauge,
    eval_loss: Gauge,
    best_dev: Gauge,
    dp_epsilon: Gauge,
}

const REASONS: [RejectReason; 9] = [
    RejectReason::Undecodable,
    RejectReason::ClientMismatch,
    RejectReason::FutureRound,
    RejectReason::WrongVersion,
    RejectReason::UnknownRequest,
    RejectReason::NotSelected,
    RejectReason::NonFinite,
    RejectReason::OutOfBound,
    RejectReason::TooManyPairs,
];

impl Handles {
    fn register(r: &PrometheusRecorder) -> Handles {
        for (name, kind, help) in METRICS {
            let key = KeyName::from_const_str(name);
            match kind {
                Kind::Counter => r.describe_counter(key, None, (*help).into()),
                Kind::Gauge => r.describe_gauge(key, None, (*help).into()),
            }
        }
        let c = |name: &'static str| r.register_counter(&Key::from_static_name(name), &META);
        let cl = |name: &'static str, k: &'static str, v: &'static str| {
            let labels = vec![Label::from_static_parts(k, v)];
            r.register_counter(&Key::from_parts(name, labels), &META)
        };
        let g = |name: &'static str| {
            let g = r.register_gauge(&Key::from_static_name(name), &META);
            g.set(0.0);
            g
        };
        let nan = |name: &'static str| {
            let g = r.register_gauge(&Key::from_static_name(name), &META);
            g.set(f64::NAN);
            g
        };
        let h = Handles {
            rounds: c("fwdllm_rounds_total"),
            commits: c("fwdllm_commits_total"),
            abandoned: c("fwdllm_rounds_abandoned_total"),
            received: c("fwdllm_updates_received_total"),
            accepted: c("fwdllm_updates_accepted_total"),
            rejected: REASONS
                .iter()
                .map(|&reason| {
                    (
                        reason,
                        cl("fwdllm_updates_rejected_total", "reason", reason.as_str()),
                    )
                })
                .collect(),
            duplicate: c("fwdllm_updates_duplicate_total"),
            stale: c("fwdllm_updates_stale_total"),
            perturbations: c("fwdllm_perturbations_total"),
            clipped: c("fwdllm_clipped_pairs_total"),
            capped: c("fwdllm_capped_clients_total"),
            fsync_journal: cl("fwdllm_state_fsyncs_total", "kind", "journal"),
            fsync_snapshot: cl("fwdllm_state_fsyncs_total", "kind", "snapshot"),
            journaled: c("fwdllm_journaled_updates_total"),
            version: g("fwdllm_model_version"),
            round: g("fwdllm_round"),
            round_open: g("fwdllm_round_open"),
            online: g("fwdllm_clients_online"),
            busy: g("fwdllm_clients_busy"),
            selected: g("fwdllm_round_clients_selected"),
            responded: g("fwdllm_round_clients_responded"),
            round_pairs: g("fwdllm_round_perturbations"),
            pacing_z: g("fwdllm_pacing_z"),
            pool_variance: g("fwdllm_pool_variance"),
            ingest_rate: g("fwdllm_ingest_updates_per_second"),
            last_round_s: nan("fwdllm_last_round_seconds"),
            train_loss: nan("fwdllm_train_loss"),
            step_norm: nan("fwdllm_step_norm"),
            lr: nan("fwdllm_learning_rate"),
            eval_accuracy: nan("fwdllm_eval_accuracy"),
            eval_loss: nan("fwdllm_eval_loss"),
            best_dev: nan("fwdllm_best_dev_accuracy"),
            dp_epsilon: nan("fwdllm_dp_epsilon"),
        };
        // Counters appear in the exposition once touched: every one is exported from the start.
        for counter in [
            &h.rounds,
            &h.commits,
            &h.abandoned,
            &h.received,
            &h.accepted,
            &h.duplicate,
            &h.stale,
            &h.perturbations,
            &h.clipped,
            &h.capped,
            &h.fsync_journal,
            &h.fsync_snapshot,
            &h.journaled,
        ]
        .into_iter()
        .chain(h.rejected.iter().map(|(_, c)| c))
        {
            counter.increment(0);
        }
        h
    }
}

/// The aggregator's metrics and, when listening, the HTTP server task.
pub struct Prometheus {
    handle: PrometheusHandle,
    m: Handles,
    server: Option<JoinHandle<()>>,
    /// (when, updates received) samples of the last [`RATE_WINDOW`].
    samples: VecDeque<(Instant, u64)>,
}

impl Prometheus {
    /// Starts serving on `listen` (must run inside a tokio runtime). The socket is bound before
    /// this returns.
    pub fn serve(listen: SocketAddr, job: &str) -> Result<Prometheus, PrometheusError> {
        let (recorder, exporter) = PrometheusBuilder::new()
            .add_global_label("fwdllm_job", job)
            .with_http_listener(listen)
            .build()
            .map_err(|e| PrometheusError::Listen {
                addr: listen,
                message: e.to_string(),
            })?;
        let server = tokio::spawn(async move {
            if let Err(e) = exporter.await {
                log::error!("prometheus endpoint stopped: {e}");
            }
        });
        log::info!("prometheus metrics on http://{listen}/metrics");
        let mut p = Prometheus::unserved_with(recorder);
        p.server = Some(server);
        Ok(p)
    }

    /// The registry alone, rendered with [`Self::render`] (tests, benches).
    pub fn unserved(job: &str) -> Prometheus {
        let recorder = PrometheusBuilder::new()
            .add_global_label("fwdllm_job", job)
            .build_recorder();
        Prometheus::unserved_with(recorder)
    }

    fn unserved_with(recorder: PrometheusRecorder) -> Prometheus {
        let m = Handles::register(&recorder);
        Prometheus {
            handle: recorder.handle(),
            m,
            server: None,
            samples: VecDeque::new(),
        }
    }

    /// The text exposition, as served.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Refreshes every metric from the coordinator (call after `persist`: counters then count
    /// only durable updates) and from the finished rounds' records of this group.
    pub fn observe(&mut self, coord: &Coordinator, records: &[AggregatorMetrics], now: Instant) {
        let m = &self.m;
        let c = coord.counters();
        let r = coord.robust_counters();
        m.rounds.absolute(coord.round());
        m.commits.absolute(coord.version());
        m.abandoned.absolute(c.abandoned_rounds);
        let received = c.updates + c.duplicates + c.stale + c.rejected;
        m.received.absolute(received);
        m.accepted.absolute(c.updates);
        for (reason, counter) in &m.rejected {
            counter.absolute(*r.rejected_by_reason.get(reason.as_str()).unwrap_or(&0));
        }
        m.duplicate.absolute(c.duplicates);
        m.stale.absolute(c.stale);
        m.perturbations.absolute(c.perturbations);
        m.clipped.absolute(r.clipped_pairs);
        m.capped.absolute(r.capped_clients);
        let w = coord.durable_writes();
        m.fsync_journal.absolute(w.journal_appends);
        m.fsync_snapshot.absolute(w.snapshots);
        m.journaled.absolute(w.journaled_updates);
        m.version.set(coord.version() as f64);
        m.round.set(coord.round() as f64);
        m.online.set(coord.clients_online() as f64);
        m.busy.set(coord.clients_busy() as f64);
        match coord.live_round() {
            Some(l) => {
                m.round_open.set(1.0);
                m.selected.set(l.selected as f64);
                m.responded.set(l.responded as f64);
                m.round_pairs.set(l.pairs as f64);
                m.pacing_z.set(l.pacing_z);
                m.pool_variance.set(l.pooled_variance);
            }
            None => {
                for g in [&m.round_open, &m.selected, &m.responded, &m.round_pairs] {
                    g.set(0.0);
                }
            }
        }
        for rec in records {
            m.last_round_s.set(rec.round_ms as f64 / 1000.0);
            if rec.phase == "committed" {
                m.train_loss.set(rec.loss_mean);
                m.step_norm.set(rec.step_norm);
                m.lr.set(rec.lr);
            }
        }
        if let Some(b) = coord.best() {
            m.best_dev.set(b.dev_accuracy);
        }
        if let Some(e) = r.dp_epsilon(coord.config().dp.delta) {
            m.dp_epsilon.set(e);
        }
        // Ingest rate over the window: one sample per 250 ms at most.
        if self
            .samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_millis(250))
        {
            self.samples.push_back((now, received));
        }
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
        if let (Some((t0, n0)), Some((t1, n1))) = (self.samples.front(), self.samples.back()) {
            let dt = t1.duration_since(*t0).as_secs_f64();
            if dt >= 1.0 {
                m.ingest_rate.set((n1 - n0) as f64 / dt);
            }
        }
    }

    /// A held-out evaluation (the demo's commit hook).
    pub fn set_eval(&self, accuracy: f64, loss: f64) {
        self.m.eval_accuracy.set(accuracy);
        self.m.eval_loss.set(loss);
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metric names of a text exposition (samples, without label sets).
    fn names(text: &str) -> Vec<String> {
        let mut n: Vec<String> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
            .collect();
        n.sort();
        n.dedup();
        n
    }

    #[test]
    fn every_listed_metric_is_exported_from_the_start_and_nothing_else() {
        let p = Prometheus::unserved("unit");
        let text = p.render();
        let mut want: Vec<String> = METRICS.iter().map(|(n, _, _)| n.to_string()).collect();
        want.sort();
        assert_eq!(names(&text), want, "{text}");
        for (name, kind, _) in METRICS {
            let t = match kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            assert!(text.contains(&format!("# TYPE {name} {t}")), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
        }
        assert!(
            text.contains(
                r#"fwdllm_updates_rejected_total{fwdllm_job="unit",reason="not_selected"} 0"#
            ) || text.contains(
                r#"fwdllm_updates_rejected_total{reason="not_selected",fwdllm_job="unit"} 0"#
            ),
            "{text}"
        );
    }
}
