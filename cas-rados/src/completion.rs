//! One asynchronous librados operation's completion.

use cas_store::{Result, StoreError};

use crate::{errno_text, ffi};

/// A completion of one asynchronous operation. Dropping it waits for the operation if it was
/// submitted, so buffers the operation writes into can be dropped right after it.
pub(crate) struct Completion {
    pub(crate) c: ffi::rados_completion_t,
    pub(crate) submitted: bool,
}

impl Completion {
    pub(crate) fn new() -> Result<Completion> {
        let mut c = std::ptr::null_mut();
        // SAFETY: `c` is a valid out-pointer; no callback is registered.
        let r = unsafe { ffi::rados_aio_create_completion2(std::ptr::null_mut(), None, &mut c) };
        if r < 0 {
            return Err(StoreError::Engine(format!("RADOS: creating a completion: {}", errno_text(r))));
        }
        Ok(Completion { c, submitted: false })
    }

    pub(crate) fn wait(&mut self) -> i32 {
        // SAFETY: `c` is a live completion of a submitted operation.
        unsafe {
            ffi::rados_aio_wait_for_complete(self.c);
            ffi::rados_aio_get_return_value(self.c)
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        // SAFETY: a submitted operation is waited for before its completion is released; an
        // unsubmitted completion is released at once.
        unsafe {
            if self.submitted {
                ffi::rados_aio_wait_for_complete(self.c);
            }
            ffi::rados_aio_release(self.c);
        }
    }
}
