//! The support library of the end-to-end suites in `tests/tests/*.rs`: brokers, an MQTT test
//! client, real agents, and the scenarios that the suites run once per broker.
//!
//! A suite that runs on both brokers is one file with one body, instantiated per broker by a
//! macro (`tests/tests/agent.rs`, `tests/tests/federation.rs`): the test `embedded::x` and
//! `mosquitto::x` run the same scenario `x` from [`agent_suite`] or [`federation_suite`].
//!
//! Waiting is always "until this event/message arrives", with [`WAIT`] only as a failure
//! guard; nothing sleeps to synchronise.

use std::time::Duration;

pub mod agent_suite;
pub mod agents;
pub mod broker;
pub mod federation_suite;
pub mod mqtt;

/// Failure guard for every wait of the suites (never reached when things work).
pub const WAIT: Duration = Duration::from_secs(60);
