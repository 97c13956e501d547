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
//! * [`bridge`] — a site broker bridged to a central one, and the bench across the bridge.
//! * [`config`] — TOML config and `validate`.
//! * [`connection`] — what every broker connection shares: target, reconnect wait, no Nagle.
//! * [`metrics`] — CSV/JSONL records and the PNG plot.
//! * [`prometheus`] — the `/metrics` endpoint (Prometheus text exposition).
//! * [`fuzz`] — mutation fuzzing of the decoders, the ingest and the config loaders.
//! * [`security`] — TLS and credentials of the broker connection; the embedded broker's users.
//! * [`sim`] — simulated clients (real MQTT connections, synthetic quadratic loss).
//! * [`fleet`] — fleet-scale simulated clients sharing one replica (10,000 connections).
//! * [`scale`] — the fleet-scale bench (`scale.json`): end-to-end ingest vs the broker ceiling.
//! * [`monitor`] — live terminal view of a job on any broker.
//! * [`export`] — GGUF LoRA export of the current weights.
//! * `federation` (feature `engine`) — the demo's federation recipe: data dealt to agents,
//!   engine and aggregator configs (shared by `fwdllm demo` and the chaos bench).
//! * [`chaos`] — the chaos bench's instruments: ledger subscriber, rulings, duplicating proxy,
//!   accounting of lost / doubled updates and replica hashes.

pub mod bridge;
pub mod broker;
pub mod chaos;
pub mod config;
pub mod connection;
pub mod coordinator;
pub mod export;
#[cfg(feature = "engine")]
pub mod federation;
pub mod fleet;
pub mod fuzz;
pub mod ingest_workers;
pub mod journal;
pub mod metrics;
pub mod monitor;
pub mod pacing;
pub mod prometheus;
pub mod robust;
pub mod scale;
pub mod security;
pub mod selection;
pub mod server;
pub mod sim;
pub mod state;
pub mod step;
