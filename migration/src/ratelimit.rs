//! A token bucket for the migration link (`--bandwidth`), whose rate an operator may change
//! while a migration runs (`migrate set-bandwidth`).

use std::sync::atomic::{AtomicU64, Ordering};
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
        let (rate, burst) = Self::rate_and_burst(bits_per_second);
        TokenBucket { rate, burst, tokens: burst, last: Instant::now() }
    }

    /// Bytes per second and the burst allowed, for a rate in bits per second.
    fn rate_and_burst(bits_per_second: u64) -> (f64, f64) {
        let rate = bits_per_second as f64 / 8.0;
        (rate, (rate * 0.05).max(64.0 * 1024.0))
    }

    /// Changes the rate from now on; what was borrowed is repaid at the new rate.
    pub fn set_rate(&mut self, bits_per_second: u64) {
        self.refill();
        (self.rate, self.burst) = Self::rate_and_burst(bits_per_second);
        self.tokens = self.tokens.min(self.burst);
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// How long until the balance is back to zero (what was borrowed is repaid).
    pub fn debt(&mut self) -> Duration {
        self.refill();
        Duration::from_secs_f64(if self.tokens >= 0.0 { 0.0 } else { -self.tokens / self.rate })
    }

    /// How long to wait before sending `bytes`; the bytes are charged at once (the balance
    /// may go negative, which delays whatever comes next).
    pub fn charge(&mut self, bytes: usize) -> Duration {
        let wait = self.debt();
        self.tokens -= bytes as f64;
        wait
    }
}

/// The cap in force for one migration, in bits per second (0: none). The operator changes
/// it; every connection's writer follows it within [`LinkCap::RECHECK`].
#[derive(Debug, Default)]
pub struct CapSetting(AtomicU64);

impl CapSetting {
    pub fn new(bits_per_second: Option<u64>) -> CapSetting {
        CapSetting(AtomicU64::new(bits_per_second.unwrap_or(0)))
    }

    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(Ordering::Relaxed)).filter(|&r| r > 0)
    }

    pub fn set(&self, bits_per_second: Option<u64>) {
        self.0.store(bits_per_second.unwrap_or(0), Ordering::Relaxed);
    }
}

/// A connection's writer side of the cap: a bucket at the rate in force.
#[derive(Debug, Default)]
pub struct LinkCap {
    bucket: Option<TokenBucket>,
    rate: Option<u64>,
}

impl LinkCap {
    /// How often a writer that waits for the cap looks at it again: a raised (or lifted) cap
    /// takes effect within this.
    pub const RECHECK: Duration = Duration::from_millis(100);

    /// Follows the setting: a new rate re-paces what is owed, no cap drops the bucket.
    pub fn follow(&mut self, setting: &CapSetting) {
        let rate = setting.get();
        if rate == self.rate {
            return;
        }
        self.rate = rate;
        match (rate, self.bucket.as_mut()) {
            (None, _) => self.bucket = None,
            (Some(r), Some(b)) => b.set_rate(r),
            (Some(r), None) => self.bucket = Some(TokenBucket::new(r)),
        }
    }

    /// How long to wait now before sending (at most [`Self::RECHECK`]: call again after).
    pub fn wait(&mut self, setting: &CapSetting) -> Duration {
        self.follow(setting);
        self.bucket.as_mut().map_or(Duration::ZERO, |b| b.debt().min(Self::RECHECK))
    }

    /// Charges a frame that goes out now.
    pub fn charge(&mut self, bytes: usize) {
        if let Some(b) = self.bucket.as_mut() {
            b.charge(bytes);
        }
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

    #[test]
    fn a_changed_cap_re_paces_what_is_owed() {
        let setting = CapSetting::new(Some(8_000_000)); // 1 MB/s
        let mut cap = LinkCap::default();
        assert_eq!(cap.wait(&setting), Duration::ZERO);
        cap.charge(2_000_000);
        let slow = cap.wait(&setting);
        assert_eq!(slow, LinkCap::RECHECK, "about 2 s owed, waited for in steps");
        setting.set(Some(8_000_000_000)); // 1 GB/s: the 2 MB owed take 2 ms
        assert!(cap.wait(&setting) < Duration::from_millis(5));
        setting.set(None);
        cap.charge(1 << 30);
        assert_eq!(cap.wait(&setting), Duration::ZERO, "no cap");
        assert_eq!(CapSetting::new(None).get(), None);
    }
}
