//! Exponential backoff between retries: the one schedule every retry loop of
//! the client uses (Java's `retry.backoff.ms` and `retry.backoff.max.ms`,
//! KIP-580).
//!
//! The pause starts at `base`, doubles after each attempt up to `max`, and is
//! spread by ±20% so that many clients failing together do not retry together.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Pauses between the attempts of one operation.
///
/// ```
/// use std::time::Duration;
/// use strom_client::backoff::Backoff;
/// let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// let first = b.next_delay();
/// assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
/// for _ in 0..10 {
///     assert!(b.next_delay() <= Duration::from_millis(1200));
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule from `base` doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The pause before the next attempt (and counts the attempt).
    pub fn next_delay(&mut self) -> Duration {
        let d = delay(self.base, self.max, self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Sleeps for [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Starts over at `base` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Attempts counted so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

/// The pause before retry number `attempt` (0 for the first retry):
/// `base · 2^attempt`, capped at `max`, spread by ±20%.
pub fn delay(base: Duration, max: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.min(20))
        .min(max.max(base));
    // ±20%: a factor in [0.8, 1.2).
    let factor = 0.8 + 0.4 * unit_random();
    exp.mul_f64(factor)
}

/// A number in [0, 1) that differs between calls; good enough for jitter and
/// needs no random-number crate (each `RandomState` is seeded afresh).
fn unit_random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pause doubles per attempt, never passes max (+20%), and is jittered.
    #[test]
    fn doubles_up_to_the_cap_with_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for attempt in 0..30 {
            let d = delay(base, max, attempt);
            let exp = (base * 2u32.pow(attempt.min(20))).min(max);
            assert!(
                d >= exp.mul_f64(0.8) && d <= exp.mul_f64(1.2),
                "{attempt}: {d:?}"
            );
        }
        let spread: std::collections::BTreeSet<_> = (0..20).map(|_| delay(base, max, 3)).collect();
        assert!(spread.len() > 1, "no jitter: {spread:?}");
        let mut b = Backoff::new(base, max);
        b.next_delay();
        b.next_delay();
        assert_eq!(b.attempts(), 2);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
