//! Per-export counters: requests, bytes and errors by command, connections, and latency
//! histograms of READ, WRITE and FLUSH.
//!
//! Plain relaxed atomics: counters are statistics, not synchronisation. A connection's
//! threads record into them without a lock; a scrape reads each one individually.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// The operations counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    WriteZeroes,
    Trim,
    Flush,
    Cache,
    BlockStatus,
}

#[derive(Debug, Default)]
struct OpCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
}

impl OpCounters {
    fn snapshot(&self) -> OpSnapshot {
        OpSnapshot {
            requests: self.requests.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// Live counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    read: OpCounters,
    write: OpCounters,
    write_zeroes: OpCounters,
    trim: OpCounters,
    flush: OpCounters,
    cache: OpCounters,
    block_status: OpCounters,
    /// Requests refused before reaching the device (bad flags, range, read-only, frozen...).
    rejected: AtomicU64,
    connections_active: AtomicU64,
    connections_total: AtomicU64,
    read_latency: LatencyHistogram,
    write_latency: LatencyHistogram,
    flush_latency: LatencyHistogram,
}

impl ExportStats {
    fn counters(&self, op: Op) -> &OpCounters {
        match op {
            Op::Read => &self.read,
            Op::Write => &self.write,
            Op::WriteZeroes => &self.write_zeroes,
            Op::Trim => &self.trim,
            Op::Flush => &self.flush,
            Op::Cache => &self.cache,
            Op::BlockStatus => &self.block_status,
        }
    }

    /// Counts one request that reached the device. Bytes count only on success.
    pub fn record(&self, op: Op, bytes: u64, ok: bool) {
        let c = self.counters(op);
        c.requests.fetch_add(1, Relaxed);
        if ok {
            c.bytes.fetch_add(bytes, Relaxed);
        } else {
            c.errors.fetch_add(1, Relaxed);
        }
    }

    /// Records how long the device took to serve one request (READ, WRITE and FLUSH only:
    /// the commands whose latency a guest feels).
    pub fn record_latency(&self, op: Op, took: Duration) {
        match op {
            Op::Read => self.read_latency.observe(took),
            Op::Write => self.write_latency.observe(took),
            Op::Flush => self.flush_latency.observe(took),
            _ => {}
        }
    }

    /// The latency histogram of READ, WRITE or FLUSH.
    pub fn latency(&self, op: Op) -> Option<&LatencyHistogram> {
        match op {
            Op::Read => Some(&self.read_latency),
            Op::Write => Some(&self.write_latency),
            Op::Flush => Some(&self.flush_latency),
            _ => None,
        }
    }

    /// Counts one request refused by the server itself.
    pub fn record_rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_opened(&self) {
        self.connections_active.fetch_add(1, Relaxed);
        self.connections_total.fetch_add(1, Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections_active.fetch_sub(1, Relaxed);
    }

    /// A consistent-enough copy of every counter (each read individually).
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            write_zeroes: self.write_zeroes.snapshot(),
            trim: self.trim.snapshot(),
            flush: self.flush.snapshot(),
            cache: self.cache.snapshot(),
            block_status: self.block_status.snapshot(),
            rejected: self.rejected.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            connections_total: self.connections_total.load(Relaxed),
        }
    }
}

/// Upper bounds of the latency buckets, seconds (a last, unbounded bucket follows): from
/// 10 us, a page-cache read, to 10 s, a request stuck behind a switch-over or a dying disk.
pub const LATENCY_BUCKETS: [f64; 19] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with fixed buckets, updated with three relaxed atomic additions.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&bound| seconds <= bound).unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_nanos.fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// (sum in seconds, count, observations per bucket by upper bound, the last bound
    /// `f64::MAX` for +Inf): what the Prometheus client's encoder takes (it adds the buckets
    /// up itself). The count is the buckets' total, so the figures agree with each other even
    /// while requests are recorded.
    pub fn buckets(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let out: Vec<(f64, u64)> = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, bucket)| (LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::MAX), bucket.load(Relaxed)))
            .collect();
        let count = out.iter().map(|(_, n)| n).sum();
        (self.sum_nanos.load(Relaxed) as f64 / 1e9, count, out)
    }
}

/// Counters of one operation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct OpSnapshot {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
}

/// Counters of one export at one moment (serialisable for the control API).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StatsSnapshot {
    pub read: OpSnapshot,
    pub write: OpSnapshot,
    pub write_zeroes: OpSnapshot,
    pub trim: OpSnapshot,
    pub flush: OpSnapshot,
    pub cache: OpSnapshot,
    pub block_status: OpSnapshot,
    pub rejected: u64,
    pub connections_active: u64,
    pub connections_total: u64,
}

impl StatsSnapshot {
    /// Requests of every kind that reached the device, plus rejected ones.
    pub fn total_requests(&self) -> u64 {
        [self.read, self.write, self.write_zeroes, self.trim, self.flush, self.cache, self.block_status]
            .iter()
            .map(|o| o.requests)
            .sum::<u64>()
            + self.rejected
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts() {
        let s = ExportStats::default();
        s.record(Op::Read, 4096, true);
        s.record(Op::Read, 4096, false);
        s.record(Op::Write, 512, true);
        s.record_rejected();
        s.connection_opened();
        let snap = s.snapshot();
        assert_eq!(snap.read, OpSnapshot { requests: 2, bytes: 4096, errors: 1 });
        assert_eq!(snap.write, OpSnapshot { requests: 1, bytes: 512, errors: 0 });
        assert_eq!(snap.rejected, 1);
        assert_eq!(snap.total_requests(), 4);
        assert_eq!(snap.connections_active, 1);
        s.connection_closed();
        assert_eq!(s.snapshot().connections_active, 0);
        assert_eq!(s.snapshot().connections_total, 1);
    }

    #[test]
    fn latency_lands_in_its_bucket() {
        let s = ExportStats::default();
        s.record_latency(Op::Read, Duration::from_micros(5));
        s.record_latency(Op::Read, Duration::from_micros(10));
        s.record_latency(Op::Read, Duration::from_millis(3));
        s.record_latency(Op::Read, Duration::from_secs(60));
        s.record_latency(Op::Trim, Duration::from_secs(1));
        let (sum, count, buckets) = s.latency(Op::Read).unwrap().buckets();
        assert_eq!(count, 4);
        assert!((sum - 60.003_015).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.000_01, 2), "10 us is inside its bucket");
        assert_eq!(buckets.iter().find(|(le, _)| *le == 0.005).unwrap().1, 1);
        assert_eq!(buckets.iter().find(|(le, _)| *le == 10.0).unwrap().1, 0);
        assert_eq!(*buckets.last().unwrap(), (f64::MAX, 1));
        assert!(s.latency(Op::Trim).is_none());
        assert_eq!(s.latency(Op::Write).unwrap().buckets().1, 0);
    }
}
