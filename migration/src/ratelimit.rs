//! A token bucket for the migration link (`--bandwidth`).

use std::time::{Duration, Instant};

/// Allows `rate` bytes per second on average, in bursts of at most `burst` bytes.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `bits_per_second` as operators give link rates; bursts of 50 ms worth (at least one
    /// maximum frame would otherwise stall: a frame larger than the burst borrows ahead).
    pub fn new(bits_per_second: u64) -> TokenBucket {
        let rate = bits_per_second as f64 / 8.0;
        let burst = (rate * 0.05).max(64.0 * 1024.0);
        TokenBucket { rate, burst, tokens: burst, last: Instant::now() }
    }

    /// How long to wait before sending `bytes`; the bytes are charged at once (the balance
    /// may go negative, which delays whatever comes next).
    pub fn charge(&mut self, bytes: usize) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        let wait = if self.tokens >= 0.0 { 0.0 } else { -self.tokens / self.rate };
        self.tokens -= bytes as f64;
        Duration::from_secs_f64(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_run_rate_is_the_configured_one() {
        let mut b = TokenBucket::new(8_000_000); // 1 MB/s
                                                 // Charges made at (almost) one instant: each wait is the time until the balance is
                                                 // back to zero, so the last one is when 10 MB - 100 kB may have been sent.
        let mut last = Duration::ZERO;
        for _ in 0..101 {
            last = b.charge(100_000);
        }
        assert!(last > Duration::from_secs_f64(9.8) && last < Duration::from_secs_f64(10.0), "{last:?}");
    }
}
