//! fwdllm's front door (`fwdllm`: demo, monitor, export, bench-federation) as a library: what
//! the binary shares with the benches in `tests/bench`.
//!
//! * [`federation`] — the demo's federation recipe: data dealt to agents, engine and
//!   aggregator configs (shared by `fwdllm demo` and the chaos bench).
//! * [`sim`] — simulated clients (real MQTT connections, synthetic quadratic loss): the ingest
//!   measurement of `fwdllm bench-federation`, and the clients of the fleet-scale benches.
//!
//! It lives in its own crate so that the aggregator daemon links neither the edge engine nor
//! llama.cpp.

pub mod federation;
pub mod sim;
