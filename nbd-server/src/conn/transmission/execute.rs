//! Running a request on the device and writing its reply.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use tracing::{debug, error, warn, Instrument};

use super::early_writes::reach_of;
use super::{Job, Session, Slot, Work, MOVED};
use crate::conn::reply::{block_status_reply, error_frame, read_reply, Frame};
use crate::export::{DeviceError, DeviceResult, Op, WriteGuard, WriteRefused, FREEZE_HOLD_LIMIT};
use crate::proto::{Errno, Rejection, Request};

impl Session {
    /// Runs a request on the device and writes its reply.
    pub(super) fn execute(&self, work: Work) {
        let Work { header: h, slot, job, client_waits } = work;
        let handle = h.handle;
        let (op, bytes, write) = match &job {
            Job::Refuse(rejection) => {
                debug!(
                    command = crate::proto::transmission::command_name(h.command),
                    offset = h.offset,
                    length = h.length,
                    errno = %rejection.errno,
                    "request refused: {}",
                    rejection.message
                );
                self.export.stats().record_rejected();
                self.send(error_frame(handle, rejection.errno, rejection.message, self.structured), slot);
                return;
            }
            Job::Read { length, .. } => (Op::Read, u64::from(*length), false),
            Job::Write { payload, .. } => (Op::Write, payload.len() as u64, true),
            Job::Other(request) => op_of(request),
        };
        // The latency a client sees, less the network: a write held by a freeze counts.
        let started = std::time::Instant::now();
        // A write waits here while the export is frozen (a switch-over takes milliseconds).
        let guard = match write.then(|| self.admit_write()) {
            Some(Err(refused)) => {
                self.export.stats().record_rejected();
                let r = rejection(refused);
                self.send(error_frame(handle, r.errno, r.message, self.structured), slot);
                return;
            }
            Some(Ok(guard)) => Some(guard),
            None => None,
        };
        if !self.calls.start(write) {
            debug!(?op, "connection lost before the request started: dropped");
            return;
        }
        let behind = self.export.writes_behind();
        let early = match &job {
            Job::Write { offset, payload, fua: false } if client_waits && self.answers_writes_early() => {
                // Registered before the reply goes out: whatever the client sends after it
                // finds this write and waits for it.
                let early = behind.begin(*offset, payload.len() as u64);
                if let Err(e) = Frame::ok(handle).write_to(&mut *self.writer.lock()) {
                    self.fail(e.into());
                }
                early.wait_for_earlier();
                Some(early)
            }
            job => {
                if let Some(reach) = reach_of(job) {
                    behind.settle(reach);
                }
                None
            }
        };
        // A panicking device must not leave the client waiting forever for this handle.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.device_call(handle, job)))
            .unwrap_or_else(|_| Err(DeviceError::Io("device panicked".into())));
        let answered = early.is_some();
        if let (Some(mut early), Err(e)) = (early, &result) {
            error!(
                export = self.export.name(),
                offset = h.offset,
                length = h.length,
                "a write answered before it reached the device failed; the next FLUSH of each connection reports it: {e}"
            );
            early.failed();
        }
        drop(guard);
        if write {
            self.calls.finish_write(&self.export);
        }
        self.export.stats().record(op, bytes, result.is_ok());
        self.export.stats().record_latency(op, started.elapsed());
        if answered {
            // Budgets and the in-flight count were held until the device call returned.
            drop(slot);
            return;
        }
        let frame = result.unwrap_or_else(|e| self.device_error_frame(handle, op, &e));
        self.send(frame, slot);
    }

    /// The reply to a request the device failed, logged by how bad it is.
    pub(super) fn device_error_frame(&self, handle: u64, op: Op, e: &DeviceError) -> Frame {
        let errno = e.errno();
        if errno == Errno::Io {
            warn!(export = self.export.name(), ?op, "device error: {e}");
        } else {
            debug!(export = self.export.name(), ?op, "device error: {e}");
        }
        error_frame(handle, errno, &e.to_string(), self.structured)
    }

    pub(super) fn device_call(&self, handle: u64, job: Job) -> DeviceResult<Frame> {
        let device = self.export.device();
        let ok = Frame::ok(handle);
        match job {
            Job::Read { offset, length } => {
                let prefix = self.read_reply_prefix();
                let mut buf = self.shared.buffers.get(prefix + length as usize);
                device.read(offset, &mut buf[prefix..])?;
                Ok(read_reply(buf, handle, offset, length, self.structured))
            }
            Job::Write { offset, payload, fua } => device.write(offset, &payload, fua).map(|()| ok),
            Job::Other(Request::WriteZeroes { offset, length, fua, no_hole, .. }) => {
                device.write_zeroes(offset, length.into(), fua, no_hole).map(|()| ok)
            }
            Job::Other(Request::Trim { offset, length, fua }) => device.trim(offset, length.into(), fua).map(|()| ok),
            Job::Other(Request::Flush) => {
                device.flush()?;
                self.report_early_write_failures().map(|()| ok)
            }
            Job::Other(Request::Cache { offset, length }) => device.cache(offset, length.into()).map(|()| ok),
            Job::Other(Request::BlockStatus { offset, length, req_one }) => {
                block_status_reply(device.as_ref(), handle, offset, length, req_one)
            }
            Job::Other(request) => unreachable!("{request:?} never reaches the device"),
            Job::Refuse(_) => unreachable!("refusals never reach the device"),
        }
    }

    /// Admits a write: at once unless the export is frozen, else waits on the runtime.
    pub(super) fn admit_write(&self) -> Result<WriteGuard, WriteRefused> {
        if let Some(guard) = self.export.try_admit_write() {
            return Ok(guard);
        }
        let export = Arc::clone(&self.export);
        self.runtime.block_on(async move { export.admit_write(FREEZE_HOLD_LIMIT).await }.in_current_span())
    }

    /// Writes a reply; the slot is released once it is on the socket.
    pub(super) fn send(&self, frame: Frame, slot: Slot) {
        let written = frame.write_to(&mut *self.writer.lock());
        drop(frame);
        drop(slot);
        if let Err(e) = written {
            // The client is gone or stuck; the reader sees the cut socket and stops.
            self.fail(e.into());
        }
    }
}

/// The statistics kind of a request, its byte count, and whether it writes.
fn op_of(request: &Request) -> (Op, u64, bool) {
    match *request {
        Request::Read { length, .. } => (Op::Read, length.into(), false),
        Request::Write { length, .. } => (Op::Write, length.into(), true),
        Request::WriteZeroes { length, .. } => (Op::WriteZeroes, length.into(), true),
        Request::Trim { length, .. } => (Op::Trim, length.into(), true),
        Request::Flush => (Op::Flush, 0, false),
        Request::Cache { length, .. } => (Op::Cache, length.into(), false),
        Request::BlockStatus { length, .. } => (Op::BlockStatus, length.into(), false),
        Request::Disconnect => unreachable!("DISC ends reading before a request is made of it"),
    }
}

fn rejection(refused: WriteRefused) -> Rejection {
    let message = match refused {
        WriteRefused::Moved => MOVED,
        WriteRefused::Closed => "export was closed",
        WriteRefused::HeldTooLong => "the export stayed frozen too long (a stuck migration switch-over)",
    };
    Rejection { errno: refused.errno(), message }
}
