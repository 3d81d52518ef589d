//! Exponential backoff with jitter, for redials (the peer table) and the discovery client.

use std::time::Duration;

/// Exponential backoff with ±25% jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = first failure); `jitter` in [0, 1).
    pub(crate) fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let exp = failures.saturating_sub(1).min(20);
        let base = self.min.saturating_mul(1u32 << exp).min(self.max);
        let factor = 0.75 + 0.5 * jitter.clamp(0.0, 1.0);
        base.mul_f64(factor)
    }
}
