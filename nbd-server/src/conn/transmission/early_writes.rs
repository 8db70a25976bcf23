//! A connection's side of write-behind (see [`WritesBehind`]): which writes it answers early,
//! what other requests wait for, and the FLUSH that reports an early write's failure.
//!
//! [`WritesBehind`]: crate::export::WritesBehind

use std::sync::atomic::Ordering;

use super::{Job, Session};
use crate::export::{DeviceError, DeviceResult, Reach};
use crate::proto::Request;

impl Session {
    /// Whether a WRITE without FUA is answered before its device call (see [`WritesBehind`]).
    ///
    /// [`WritesBehind`]: crate::export::WritesBehind
    pub(super) fn answers_writes_early(&self) -> bool {
        self.shared.config.write_behind && self.export.device().writes_behind()
    }

    /// After a FLUSH: `EIO` if an early write of the export failed since this connection's
    /// last report (each connection hears of it once, as each open file does of a failed
    /// write-back on Linux).
    pub(super) fn report_early_write_failures(&self) -> DeviceResult<()> {
        let failures = self.export.writes_behind().failures();
        let seen = self.behind_failures_seen.swap(failures, Ordering::SeqCst);
        if failures > seen {
            return Err(DeviceError::Io(format!(
                "{} write(s) answered before they reached the device failed since this connection's last flush; their data is lost",
                failures - seen
            )));
        }
        Ok(())
    }
}

/// The early writes a request must not overtake; `None` when it need not wait (CACHE is a
/// hint).
pub(super) fn reach_of(job: &Job) -> Option<Reach> {
    match *job {
        Job::Read { offset, length } => Some(Reach::Range { offset, len: length.into() }),
        Job::Write { offset, ref payload, .. } => Some(Reach::Range { offset, len: payload.len() as u64 }),
        Job::Other(Request::WriteZeroes { offset, length, .. })
        | Job::Other(Request::Trim { offset, length, .. })
        | Job::Other(Request::BlockStatus { offset, length, .. }) => Some(Reach::Range { offset, len: length.into() }),
        Job::Other(Request::Flush) => Some(Reach::Everything),
        Job::Other(_) | Job::Refuse(_) => None,
    }
}
