//! What every broker connection of the aggregator shares — the coordinator's own
//! ([`crate::server`]), the ingest workers' ([`crate::ingest_workers`]) and the simulated
//! clients of the benches: where the broker is ([`BrokerTarget`]), the wait before a reconnect
//! (`reconnect_wait`) and a socket without Nagle's algorithm ([`no_delay`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Broker connection parameters.
#[derive(Debug, Clone)]
pub struct BrokerTarget {
    pub host: String,
    pub port: u16,
}

/// The wait before a reconnect: `backoff` plus up to half of it in jitter, then `backoff`
/// doubles (capped at 30 s). rumqttc has no backoff of its own.
pub(crate) fn reconnect_wait(backoff: &mut Duration) -> Duration {
    static JITTER: AtomicU64 = AtomicU64::new(0);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    // Cheap jitter without a RNG dependency: xorshift on a time seed.
    let mut x = (JITTER.load(Ordering::Relaxed) ^ now_ms) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    JITTER.store(x, Ordering::Relaxed);
    let wait = *backoff + Duration::from_millis(x % (backoff.as_millis() as u64 / 2 + 1));
    *backoff = (*backoff * 2).min(Duration::from_secs(30));
    wait
}

/// Turns Nagle's algorithm off on a client's connection: an MQTT exchange is many small
/// writes (a PUBACK then the next PUBLISH), and with Nagle each can wait for the peer's delayed
/// ACK (40 ms on Linux) — a round trip of several hops would be paced by that, not by the work.
pub fn no_delay(el: &mut rumqttc::EventLoop) {
    let mut n = el.network_options();
    n.set_tcp_nodelay(true);
    el.set_network_options(n);
}
