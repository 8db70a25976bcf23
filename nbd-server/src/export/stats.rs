//! Per-export counters: requests, bytes and errors by command, connections.
//!
//! Plain relaxed atomics: counters are statistics, not synchronisation.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}
