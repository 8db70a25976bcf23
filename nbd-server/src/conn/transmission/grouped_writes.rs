//! Small writes that wait back to back in the read buffer, committed as one device call.
//!
//! At a high queue depth a client's small writes arrive together: one socket read often
//! brings dozens of 4 KiB WRITE requests. Served one by one, each costs the CAS store a map
//! lookup, a `refs` lookup, a container append and an engine write group, and the connection
//! a thread wake-up and a `send` for its reply. When the device can commit several writes at
//! once ([`BlockDevice::groups_writes`]), the thread that read a small write also takes the
//! complete WRITE requests right behind it in the read buffer, runs them as one
//! [`BlockDevice::write_many`] call and writes their replies with one system call.
//!
//! * Only what is already buffered is taken: never a socket read, never a wait for a budget
//!   (a request's budgets are taken before its header is consumed, or it is left for the
//!   next reader). A thread holding grants for a group therefore never waits for grants
//!   another group holds.
//! * NBD orders no request in flight against another, so a group may commit its writes in
//!   any order; each still gets its own reply (an error of one is its own: the device retries
//!   a failed group one write at a time).
//! * A group is one running write for freezes and orphaned writes: one admission, one
//!   device call.
//!
//! [`BlockDevice::groups_writes`]: crate::export::BlockDevice::groups_writes
//! [`BlockDevice::write_many`]: crate::export::BlockDevice::write_many

use std::io::Write;
use std::panic::AssertUnwindSafe;

use super::{Job, Prepaid, ReadSide, Session, Work};
use crate::conn::reply::Frame;
use crate::export::{DeviceError, Op, Reach};
use crate::proto::consts::{CMD_WRITE, REQUEST_HEADER_LEN};
use crate::proto::parse_request_header;

/// Writes of this size or less are grouped (larger ones already amortise their costs).
const GROUPED_WRITE_MAX: usize = 64 * 1024;
/// Writes in one group at most. Small groups keep several commits running at once: 4 KiB
/// random writes at QD32 after 30 s at QD1 (a populated store, Unix socket, same binary
/// alternating) ran at 33.9 k IOPS on average with groups of 8 (six rounds), 33.5 k with 16,
/// 34.7 k with 4 and 30.1 k with 64 (eight rounds), 19-25 k ungrouped: one group of 64 is
/// one thread's work for about 2 ms while the other core waits for the next.
const GROUP_MAX_WRITES: usize = 8;
/// Payload bytes of one group at most.
const GROUP_MAX_BYTES: usize = 1 << 20;

impl Session {
    /// The complete small WRITE requests right behind `first` in the read buffer, if `first`
    /// is one and the device groups writes. Empty otherwise.
    pub(super) fn buffered_writes(&self, first: &Work, side: &mut ReadSide) -> Vec<Work> {
        let Job::Write { payload, .. } = &first.job else { return Vec::new() };
        if payload.len() > GROUPED_WRITE_MAX || !self.export.device().groups_writes() {
            return Vec::new();
        }
        let mut bytes = payload.len();
        let mut behind = Vec::new();
        while behind.len() + 1 < GROUP_MAX_WRITES {
            let Some(prepaid) = self.prepay_buffered_write(side, &mut bytes) else { break };
            match self.next(side, Some(prepaid)) {
                Some(work) => behind.push(work),
                None => break,
            }
        }
        behind
    }

    /// Budgets for the next request if it is a small WRITE whose payload is all in the read
    /// buffer and they are free now.
    fn prepay_buffered_write(&self, side: &ReadSide, bytes: &mut usize) -> Option<Prepaid> {
        let buffered = side.rd.buffer();
        let raw: &[u8; REQUEST_HEADER_LEN] = buffered.get(..REQUEST_HEADER_LEN)?.try_into().ok()?;
        // A bad header is left for the normal path, which ends the connection over it.
        let h = parse_request_header(raw).ok()?;
        let len = h.length as usize;
        if h.command != CMD_WRITE
            || len > GROUPED_WRITE_MAX
            || buffered.len() < REQUEST_HEADER_LEN + len
            || *bytes + len > GROUP_MAX_BYTES
        {
            return None;
        }
        let request = self.shared.requests.try_take(1)?;
        let bytes_taken = (self.bytes.try_take(len)?, self.shared.bytes.try_take(len)?);
        *bytes += len;
        Some(Prepaid { request, bytes: bytes_taken })
    }

    /// Runs `first` and the requests read behind it: their writes as one device call, the
    /// rest (refusals) one by one.
    pub(super) fn execute_grouped(&self, first: Work, behind: Vec<Work>) {
        let (writes, others): (Vec<Work>, Vec<Work>) =
            std::iter::once(first).chain(behind).partition(|w| matches!(w.job, Job::Write { .. }));
        for work in others {
            self.execute(work);
        }
        if writes.len() < 2 {
            writes.into_iter().for_each(|w| self.execute(w));
            return;
        }
        let started = std::time::Instant::now();
        // Frozen (a switch-over): each write waits on its own, as any other would.
        let Some(guard) = self.export.try_admit_write() else {
            writes.into_iter().for_each(|w| self.execute(w));
            return;
        };
        if !self.calls.start(true) {
            tracing::debug!(writes = writes.len(), "connection lost before the writes started: dropped");
            return;
        }
        let fua = writes.iter().any(|w| matches!(w.job, Job::Write { fua: true, .. }));
        let requests: Vec<(u64, &[u8])> = writes
            .iter()
            .map(|w| match &w.job {
                Job::Write { offset, payload, .. } => (*offset, &payload[..]),
                _ => unreachable!("partitioned above"),
            })
            .collect();
        // Each waits for the early writes it must not overtake (see `execute`).
        for (offset, data) in &requests {
            self.export.writes_behind().settle(Reach::Range { offset: *offset, len: data.len() as u64 });
        }
        let device = self.export.device();
        let results = std::panic::catch_unwind(AssertUnwindSafe(|| device.write_many(&requests, fua)))
            .unwrap_or_else(|_| requests.iter().map(|_| Err(DeviceError::Io("device panicked".into()))).collect());
        drop(guard);
        self.calls.finish_write(&self.export);
        let elapsed = started.elapsed();
        let mut replies = Vec::with_capacity(writes.len());
        for ((work, (_, data)), result) in writes.iter().zip(&requests).zip(results) {
            self.export.stats().record(Op::Write, data.len() as u64, result.is_ok());
            self.export.stats().record_latency(Op::Write, elapsed);
            let handle = work.header.handle;
            replies.push(match result {
                Ok(()) => Frame::ok(handle),
                Err(e) => self.device_error_frame(handle, Op::Write, &e),
            });
        }
        drop(requests);
        self.send_all(&replies);
        // The slots (budgets, in-flight count) go once the replies are on the socket.
        drop(writes);
    }

    /// Writes replies with one system call.
    fn send_all(&self, replies: &[Frame]) {
        let mut out = Vec::with_capacity(replies.len() * 16);
        for frame in replies {
            frame.write_to(&mut out).expect("writing to a Vec cannot fail");
        }
        let written = self.writer.lock().write_all(&out);
        if let Err(e) = written {
            // The client is gone or stuck; the reader sees the cut socket and stops.
            self.fail(e.into());
        }
    }
}
