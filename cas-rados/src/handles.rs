//! The cluster and I/O context handles of one connection to a pool.

use crate::ffi;

pub(crate) struct Handles {
    pub(crate) cluster: ffi::rados_t,
    pub(crate) io: ffi::rados_ioctx_t,
}

// SAFETY: librados's cluster and I/O context handles may be used from any thread at once for
// object operations; the namespace is set once, before the handle is shared.
unsafe impl Send for Handles {}
unsafe impl Sync for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: the handles were created by `connect` and are not used after this.
        unsafe {
            if !self.io.is_null() {
                ffi::rados_ioctx_destroy(self.io);
            }
            ffi::rados_shutdown(self.cluster);
        }
    }
}
