//! fsck's listing of a pool: object names in batches, then the references of each batch.

use std::collections::VecDeque;
use std::sync::Arc;

use cas_store::pool::PoolBlock;
use cas_store::{Fingerprint, Result};

use crate::{ffi, parse_oid, Inner};

/// Objects per batch of fsck's pool listing.
const SCAN_BATCH: usize = 1024;

struct ListCtx(ffi::rados_list_ctx_t);

// SAFETY: a listing context is used by one thread at a time (it moves with its iterator).
unsafe impl Send for ListCtx {}

impl Drop for ListCtx {
    fn drop(&mut self) {
        // SAFETY: opened by `scan`, closed once.
        unsafe { ffi::rados_nobjects_list_close(self.0) }
    }
}

/// fsck's listing of the pool: names in batches, then the references of each batch.
pub(crate) struct RadosScan {
    inner: Arc<Inner>,
    ctx: ListCtx,
    holder: String,
    ready: VecDeque<PoolBlock>,
    done: bool,
}

impl RadosScan {
    /// A scan of the listing `ctx` (opened by the caller, closed by the scan) for `holder`'s references.
    pub(crate) fn new(inner: Arc<Inner>, ctx: ffi::rados_list_ctx_t, holder: &str) -> RadosScan {
        RadosScan { inner, ctx: ListCtx(ctx), holder: holder.to_string(), ready: VecDeque::new(), done: false }
    }

    fn fill(&mut self) -> Result<()> {
        let mut names: Vec<Fingerprint> = Vec::with_capacity(SCAN_BATCH);
        while names.len() < SCAN_BATCH {
            let mut entry: *const libc::c_char = std::ptr::null();
            let mut entry_size: libc::size_t = 0;
            // SAFETY: out-pointers are valid; the entry stays valid until the next call.
            let r = unsafe {
                ffi::rados_nobjects_list_next2(
                    self.ctx.0,
                    &mut entry,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    &mut entry_size,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if r == -libc::ENOENT {
                self.done = true;
                break;
            }
            if r < 0 {
                self.done = true;
                return Err(self.inner.error("listing the pool", None, r));
            }
            // SAFETY: librados returns `entry_size` valid bytes at `entry`.
            let name = unsafe { std::slice::from_raw_parts(entry.cast::<u8>(), entry_size) };
            if let Some(fp) = parse_oid(name) {
                names.push(fp);
            }
        }
        if names.is_empty() {
            return Ok(());
        }
        for (fp, refs) in names.iter().zip(self.inner.refs(&self.holder, &names)?) {
            // Deleted since it was listed: skip.
            if let Some((mine, total)) = refs {
                self.ready.push_back(PoolBlock { fingerprint: *fp, holder_refs: mine, total_refs: total });
            }
        }
        Ok(())
    }
}

impl Iterator for RadosScan {
    type Item = Result<PoolBlock>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(b) = self.ready.pop_front() {
                return Some(Ok(b));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.fill() {
                return Some(Err(e));
            }
        }
    }
}
