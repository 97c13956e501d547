//! fwdllm's benches and harnesses, kept out of the production crates (the aggregator daemon
//! links none of this).
//!
//! * [`chaos`] — the chaos bench's instruments: ledger subscriber, rulings, duplicating proxy,
//!   accounting of lost / doubled updates and replica hashes.
//! * [`fleet`] — fleet-scale simulated clients sharing one replica (10,000 connections).
//! * [`scale`] — the fleet-scale bench (`scale.json`): end-to-end ingest vs the broker ceiling.
//! * [`bridge`] — a site mosquitto bridged to a central one through a cuttable relay, and the
//!   bench across the bridge.
//! * [`fuzz`] — the fuzz targets (wire decoder, update ingest, GGUF reader, both config
//!   loaders) and their corpus: what cargo-fuzz (`fuzz/`), the corpus replay of `make test` and
//!   the random-mutation driver run.
//!
//! The simulated clients these build on are `fwdllm_frontdoor::sim` (also the ingest
//! measurement of `fwdllm bench-federation`).

pub mod bridge;
pub mod chaos;
pub mod fleet;
pub mod fuzz;
pub mod scale;
