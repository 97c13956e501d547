//! Reconnect delays: exponential backoff with jitter (rumqttc reconnects on the next `poll`
//! immediately and has no policy of its own).

use std::time::Duration;

use crate::data::SplitMix64;

/// Exponential backoff with proportional jitter.
///
/// The n-th consecutive failure (n = 0, 1, ...) waits `base = min(initial * multiplier^n, max)`
/// minus a random part of up to `jitter * base`, so a fleet of agents that lost the broker together
/// does not reconnect in lockstep. [`Backoff::reset`] after a successful CONNACK.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: f64,
    attempt: u32,
    rng: SplitMix64,
}

impl Backoff {
    /// `jitter` in 0..=1; `seed` feeds the jitter generator (use something per-agent).
    pub fn new(initial: Duration, max: Duration, multiplier: f64, jitter: f64, seed: u64) -> Self {
        Self {
            initial,
            max,
            multiplier: multiplier.max(1.0),
            jitter: jitter.clamp(0.0, 1.0),
            attempt: 0,
            rng: SplitMix64::new(seed),
        }
    }

    /// The delay before the next attempt; advances the attempt counter.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.multiplier.powi(self.attempt.min(64) as i32);
        let base = (self.initial.as_secs_f64() * exp).min(self.max.as_secs_f64());
        self.attempt = self.attempt.saturating_add(1);
        // Uniform in [0, 1): jitter needs decorrelation between agents, not crypto quality.
        let unit = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let cut = base * self.jitter * unit;
        Duration::from_secs_f64((base - cut).max(0.0))
    }

    /// Back to the initial delay (after a successful connection).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Consecutive failures since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn without_jitter_doubles_up_to_the_cap() {
        let mut b = Backoff::new(ms(100), ms(1000), 2.0, 0.0, 1);
        let got: Vec<_> = (0..7).map(|_| b.next_delay()).collect();
        assert_eq!(
            got,
            [
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1000),
                ms(1000),
                ms(1000)
            ]
        );
        assert_eq!(b.attempts(), 7);
        b.reset();
        assert_eq!(b.next_delay(), ms(100));
    }

    #[test]
    fn jitter_stays_within_its_fraction_and_varies() {
        let mut b = Backoff::new(ms(1000), ms(1000), 2.0, 0.5, 42);
        let got: Vec<_> = (0..64).map(|_| b.next_delay()).collect();
        assert!(
            got.iter().all(|d| *d > ms(500) && *d <= ms(1000)),
            "{got:?}"
        );
        let distinct: std::collections::BTreeSet<_> = got.iter().collect();
        assert!(distinct.len() > 32, "jitter should spread delays: {got:?}");
    }

    #[test]
    fn different_seeds_give_different_schedules() {
        let mut a = Backoff::new(ms(1000), ms(60_000), 2.0, 1.0, 1);
        let mut b = Backoff::new(ms(1000), ms(60_000), 2.0, 1.0, 2);
        let sa: Vec<_> = (0..8).map(|_| a.next_delay()).collect();
        let sb: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert_ne!(sa, sb);
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(ms(1), ms(5000), 10.0, 0.0, 0);
        for _ in 0..1000 {
            assert!(b.next_delay() <= ms(5000));
        }
    }
}
