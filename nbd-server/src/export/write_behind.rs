//! Writes acknowledged before their device call returns ("write-behind"), and the waits that
//! keep every later request seeing them.
//!
//! NBD lets a server reply to a WRITE without FUA before the data is durable: the client's
//! FLUSH is what makes it so (the spec's "writeback cache", which the server advertises with
//! SEND_FLUSH). qemu-nbd's reply follows one `pwrite` into the page cache. The CAS store's
//! write does more (hash every block, look the fingerprints up, append, commit the index), and
//! a client with one write in flight (`qemu-img convert` without `-W`, a guest's sequential
//! writer) waits for all of it before it sends the next. Replying once the payload is in the
//! server's buffer and the write has been *admitted* lets the next request's transfer overlap
//! this one's work.
//!
//! What the early reply must not change is what the client can observe:
//!
//! * A request that arrives after the reply (on any connection: the export is shared) and
//!   touches the written range — READ, WRITE, WRITE_ZEROES, TRIM, BLOCK_STATUS — first waits
//!   until that write is on the device ([`WritesBehind::settle`]). Writes begun later are
//!   not waited for (NBD orders nothing among requests in flight), so no wait can starve.
//! * FLUSH waits for every write begun before it, then flushes the device.
//! * A write that fails after its reply cannot be reported on its handle; the failure is
//!   logged, counted, and the next FLUSH of every connection that was open fails with `EIO`
//!   (as Linux reports write-back errors on the next `fsync` of each open file).
//! * An early write holds its admission ([`super::WriteGuard`]) until its device call
//!   returns, so a migration's freeze still waits for it, and its request slot (buffer
//!   budget, in-flight count), so the memory held is bounded by the same budgets as before.
//! * FUA writes, and devices that do not opt in ([`super::BlockDevice::writes_behind`]), are
//!   answered after their device call as before.
//!
//! The pending set holds at most one entry per request in flight (bounded by the server's
//! request budget); the scans are over that handful.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Condvar, Mutex};

/// The writes of one export that were answered and are still running on the device.
#[derive(Debug, Default)]
pub struct WritesBehind {
    /// Entries in `state.running` (read without the lock on the fast path).
    running: AtomicUsize,
    state: Mutex<Pending>,
    finished: Condvar,
    /// Early writes that failed on the device, since the export was made.
    failed: AtomicU64,
}

#[derive(Debug, Default)]
struct Pending {
    /// Order of registration: a wait only covers writes begun before it.
    next_seq: u64,
    running: Vec<Running>,
}

/// What a request must not overtake: the early writes begun before it that overlap
/// `offset..offset + len`, or all of them (FLUSH, a snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Range { offset: u64, len: u64 },
    Everything,
}

impl Reach {
    fn bounds(self) -> Option<(u64, u64)> {
        match self {
            Reach::Range { offset, len } => Some((offset, offset.saturating_add(len))),
            Reach::Everything => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Running {
    seq: u64,
    start: u64,
    end: u64,
}

impl Running {
    fn blocks(&self, before: u64, range: Option<(u64, u64)>) -> bool {
        self.seq < before && range.is_none_or(|(start, end)| self.start < end && start < self.end)
    }
}

impl WritesBehind {
    /// Registers a write of `len` bytes at `offset` that is about to be answered before its
    /// device call. Call before sending the reply; drop the ticket when the call returned.
    pub fn begin(&self, offset: u64, len: u64) -> EarlyWrite<'_> {
        let mut state = self.state.lock();
        let seq = state.next_seq;
        state.next_seq += 1;
        state.running.push(Running { seq, start: offset, end: offset.saturating_add(len) });
        self.running.fetch_add(1, Ordering::SeqCst);
        EarlyWrite { behind: self, seq, offset, len, failed: false }
    }

    /// Waits until every early write begun before this call within `reach` is done on the
    /// device.
    pub fn settle(&self, reach: Reach) {
        if self.running.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut state = self.state.lock();
        let before = state.next_seq;
        self.wait(&mut state, before, reach.bounds());
    }

    fn wait(&self, state: &mut parking_lot::MutexGuard<'_, Pending>, before: u64, range: Option<(u64, u64)>) {
        while state.running.iter().any(|w| w.blocks(before, range)) {
            self.finished.wait(state);
        }
    }

    /// Early writes that failed on the device so far.
    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Early writes still running on the device.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
}

/// A write answered before its device call; finishing (dropping) it wakes the requests
/// waiting for its range.
#[derive(Debug)]
pub struct EarlyWrite<'a> {
    behind: &'a WritesBehind,
    seq: u64,
    offset: u64,
    len: u64,
    failed: bool,
}

impl EarlyWrite<'_> {
    /// Waits for the early writes begun before this one that overlap it: a write answered
    /// earlier must land first.
    pub fn wait_for_earlier(&self) {
        let mut state = self.behind.state.lock();
        self.behind.wait(&mut state, self.seq, Reach::Range { offset: self.offset, len: self.len }.bounds());
    }

    /// The device call failed: the next FLUSH of each connection reports it.
    pub fn failed(&mut self) {
        self.failed = true;
    }
}

impl Drop for EarlyWrite<'_> {
    fn drop(&mut self) {
        if self.failed {
            self.behind.failed.fetch_add(1, Ordering::SeqCst);
        }
        let mut state = self.behind.state.lock();
        state.running.retain(|w| w.seq != self.seq);
        self.behind.running.fetch_sub(1, Ordering::SeqCst);
        drop(state);
        self.behind.finished.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn settles_within(behind: &Arc<WritesBehind>, reach: Reach, ms: u64) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        let b = Arc::clone(behind);
        std::thread::spawn(move || {
            b.settle(reach);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_millis(ms)).is_ok()
    }

    #[test]
    fn a_wait_covers_overlapping_writes_begun_before_it() {
        let behind = Arc::new(WritesBehind::default());
        let write = behind.begin(4096, 4096);
        assert_eq!(behind.running(), 1);
        // Other ranges go ahead; the written one and a full settle wait.
        let range = |offset, len| Reach::Range { offset, len };
        assert!(settles_within(&behind, range(0, 4096), 5000));
        assert!(settles_within(&behind, range(8192, 100), 5000));
        assert!(!settles_within(&behind, range(8191, 2), 100));
        assert!(!settles_within(&behind, Reach::Everything, 100));
        drop(write);
        assert!(settles_within(&behind, range(8191, 2), 5000));
        assert!(settles_within(&behind, Reach::Everything, 5000));
        assert_eq!(behind.running(), 0);
        assert_eq!(behind.failures(), 0);
    }

    #[test]
    fn a_write_waits_for_earlier_overlapping_ones_only() {
        let behind = Arc::new(WritesBehind::default());
        let first = behind.begin(0, 8192);
        let later = behind.begin(4096, 4096);
        let elsewhere = behind.begin(1 << 20, 4096);
        // Nothing earlier overlaps these two.
        first.wait_for_earlier();
        elsewhere.wait_for_earlier();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                later.wait_for_earlier();
                tx.send(()).unwrap();
            });
            assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "must wait for the first");
            drop(first);
            rx.recv_timeout(Duration::from_secs(5)).unwrap();
        });
        drop(later);
        drop(elsewhere);
    }

    #[test]
    fn failures_are_counted() {
        let behind = WritesBehind::default();
        let mut write = behind.begin(0, 512);
        write.failed();
        drop(write);
        drop(behind.begin(0, 512));
        assert_eq!(behind.failures(), 1);
        assert_eq!(behind.running(), 0);
    }
}
