//! Which device calls of a connection are running, for the orphaned writes of a connection
//! that ended without DISC.

use parking_lot::Mutex;

use crate::export::Export;

/// The device calls of one connection. When the connection ends without DISC (client
/// vanished, protocol error, server cut it) it is *abandoned*: requests not yet started are
/// dropped (nobody can receive their replies), and its writes still running are counted as
/// the export's orphaned writes, which new connections wait for (see
/// [`Export::wait_for_orphaned_writes`]).
#[derive(Debug, Default)]
pub(super) struct DeviceCalls {
    state: Mutex<CallsState>,
}

#[derive(Debug, Default)]
struct CallsState {
    running_writes: u64,
    abandoned: bool,
}

impl DeviceCalls {
    /// Before a device call: false if the connection is abandoned (skip the call).
    pub(super) fn start(&self, write: bool) -> bool {
        let mut state = self.state.lock();
        if state.abandoned {
            return false;
        }
        state.running_writes += u64::from(write);
        true
    }

    /// After a write's device call.
    pub(super) fn finish_write(&self, export: &Export) {
        let mut state = self.state.lock();
        state.running_writes -= 1;
        if state.abandoned {
            export.orphaned_write_done();
        }
    }

    pub(super) fn abandon(&self, export: &Export) {
        let mut state = self.state.lock();
        if !state.abandoned {
            state.abandoned = true;
            export.add_orphaned_writes(state.running_writes);
        }
    }
}
