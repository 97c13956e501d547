//! fwdllm-aggregator: federated forward-gradient rounds over MQTT.
//!
//! * [`coordinator`] — the round state machine (no I/O): selection, dedup, pacing, commit.
//! * [`pacing`] — pooled estimate and its dimensionless z statistic.
//! * [`step`] — learning-rate schedule and trust-region clamp folded into commit coefficients.
//! * [`robust`] — ingest checks, robust clipping, per-client cap and DP noise of the scalars.
//! * [`state`] — durable state (atomic writes) and resume.
//! * [`journal`] — the write-ahead journal of updates (group commit between state snapshots).
//! * [`server`] — the rumqttc driver (write-ahead persistence, manual acks, reconnect).
//! * [`ingest_workers`] — updates received and decoded by N connections sharing the updates
//!   topic (`$share/…`, `[ingest] workers`), handed to the single coordinator.
//! * [`broker`] — embedded rumqttd on loopback.
//! * [`config`] — TOML config and `validate`.
//! * [`connection`] — what every broker connection shares: target, reconnect wait, no Nagle.
//! * [`metrics`] — CSV/JSONL records and the PNG plot.
//! * [`prometheus`] — the `/metrics` endpoint (Prometheus text exposition).
//! * [`security`] — TLS and credentials of the broker connection; the embedded broker's users.
//! * [`monitor`] — live terminal view of a job on any broker.
//! * [`export`] — GGUF LoRA export of the current weights.
//!
//! The daemon alone: the front door `fwdllm` (demo, benches on one machine) is the crate in
//! `aggregator/frontdoor`, the benches and harnesses are `tests/bench`.

pub mod broker;
pub mod config;
pub mod connection;
pub mod coordinator;
pub mod export;
pub mod ingest_workers;
pub mod journal;
pub mod metrics;
pub mod monitor;
pub mod pacing;
pub mod prometheus;
pub mod robust;
pub mod security;
pub mod selection;
pub mod server;
pub mod state;
pub mod step;
