//! The chaos bench's instruments (`make chaos`, `tests/bench/src/bin/chaos/`): a ledger of what
//! the broker accepted ([`observer`]), the aggregator's ruling on every delivery
//! ([`RulingRecord`], written through [`fwdllm_aggregator::server::Hooks::on_event`] before the acks), a
//! proxy that delivers every QoS 1 update twice ([`proxy`]), and the accounting that turns them
//! into the figures of `target/bench/chaos.json` ([`account`], [`check_replicas`]).
//!
//! # What is counted
//!
//! An **update** is identified by `(client, round, seq)`. The **ledger** holds every update the
//! broker accepted: the bench subscribes its own client to `fwdllm/v1/{job}/#` at QoS 1 with a
//! persistent session before any agent connects. A broker acknowledges a QoS 1 publish only
//! after routing it to the subscribers (mosquitto queues, then sends PUBACK; rumqttd appends to
//! its log, then acks), so every update a client saw acknowledged is in the ledger; an update a
//! client published but the broker never had (the client died first) is no contribution. The
//! **commits** are every `RoundCommit` the aggregator published (same subscription); a seed
//! belongs to exactly one client, round and perturbation (`derive_seed`), so the seeds of a
//! commit say which updates it holds. Each ledger update falls in exactly one class:
//!
//! * **committed** — every seed of one of its payloads is in the commit of its round;
//! * **pending** — in the round still open when the run stopped, recorded in `state.bin`'s
//!   open round (durable, committed by the next round close);
//! * **abandoned** — accepted into a round abandoned at its deadline without quorum (by design:
//!   such a round commits nothing);
//! * **late** — no copy was accepted and the aggregator ruled it stale: it arrived after its
//!   round had closed (a round does not wait for a client it saw go offline, or past its
//!   deadline); the round must indeed be closed;
//! * **rejected** — no copy was accepted and the aggregator refused it on its content or
//!   version (robust aggregation: `|g| > robust.max_abs_g`, …);
//! * **lost** — anything else: accepted but neither committed, pending nor abandoned, or never
//!   ruled on at all.
//!
//! **Doubled** counts updates whose pairs were applied more than once: a seed of theirs in more
//! than one committed pair, or two different payloads of the same id both committed.
//! `doubled_pairs` counts committed pairs whose seed was already committed, whoever sent it.
//!
//! **Replica hash mismatches** sum: commits whose recorded hash differs from an independent
//! replay from the initial weights; versions published twice with different content; the
//! aggregator's final `state.bin` weights against that replay; every agent status naming a
//! (version, hash) the replay does not give; every agent's persisted replica (`state.json` +
//! `weights.bin`) at the end; and every replay mismatch an agent itself reported.
//!
//! The rulings come from [`fwdllm_aggregator::server::Hooks::on_event`], called after the state that
//! produced them is on disk and before the updates are acknowledged, so an update the broker
//! still holds is redelivered and ruled again, and an acknowledged one always has its ruling.

pub mod ledger;
pub mod observer;
pub mod proxy;

pub use ledger::{
    account, check_replicas, FinalState, Ledger, Observed, ReplicaCheck, RulingRecord, Rulings,
    Tally, UpdateId, Verdict,
};
pub use observer::Observer;
pub use proxy::DupProxy;

/// The definitions above in one paragraph each, written into `chaos.json` beside the figures.
pub const DEFINITIONS: &[(&str, &str)] = &[
    (
        "update",
        "one ClientUpdate, identified by (client, round, seq); the ledger holds every update the broker accepted, recorded by the bench's own QoS 1 subscriber on fwdllm/v1/{job}/# (persistent session, subscribed before any agent connects): a broker acknowledges a QoS 1 publish only after routing it to its subscribers, so every update a client saw acknowledged is in the ledger",
    ),
    (
        "committed",
        "every seed of the update (one of its payloads) is a pair of the commit of its round; seeds are derive_seed(seed_base, round, client, k), unique per client, round and perturbation",
    ),
    (
        "pending",
        "accepted into the round still open when the run stopped: listed in state.bin's open round (durable; the next close commits it)",
    ),
    (
        "abandoned",
        "accepted into a round that was abandoned at its deadline without quorum (such a round commits nothing, by design)",
    ),
    (
        "late",
        "no copy accepted; the aggregator ruled it stale because its round had already closed (commits do not wait for a client seen offline); the round is checked to be closed",
    ),
    (
        "rejected",
        "no copy accepted; the aggregator refused it on its content or version (robust.max_abs_g, wrong version, ...)",
    ),
    (
        "lost",
        "an update in the ledger that is none of committed, pending, abandoned, late or rejected: accepted but not in its round's commit, or never ruled on by the aggregator",
    ),
    (
        "doubled",
        "an update whose pairs were applied more than once: one of its seeds in more than one committed pair, or two different payloads of the same (client, round, seq) both committed; doubled_pairs counts every committed pair whose seed had already been committed",
    ),
    (
        "replica_hash_mismatches",
        "sum of: commits whose recorded weights hash differs from an independent replay from the initial weights; versions published twice with different contents; the aggregator's final state.bin weights against that replay; agent statuses naming a (version, hash) the replay does not give; agents' persisted replicas (state.json + weights.bin) at the end; replay mismatches the agents logged themselves",
    ),
    (
        "rulings",
        "the aggregator's outcome for every delivery (accepted, duplicate, stale, rejected), recorded by server::Hooks::on_event after the state is on disk and before the acks, so an acknowledged update always has its ruling",
    ),
];

/// Errors of the chaos instruments.
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    #[error("MQTT client of the ledger: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("job name: {0}")]
    Topic(#[from] fwdllm_shared::topics::TopicError),
}
