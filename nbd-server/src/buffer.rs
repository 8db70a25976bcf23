//! Reusable I/O buffers for request payloads and read replies.
//!
//! Large `Vec`s come from `mmap` and cost a page fault per 4 KiB on first touch, and
//! zero-filling a fresh buffer is a full pass over it: reusing buffers avoids both. A pooled
//! buffer stays initialised to its full length, so taking it again for a shorter or equal
//! request costs nothing; only growth zero-fills the new part.

use std::fmt;
use std::io::{self, Read};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use parking_lot::Mutex;

/// Buffers kept for reuse, bounded in count and in total bytes.
pub(crate) struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
    max_pooled_bytes: usize,
    /// Buffers longer than this are freed instead of pooled.
    max_buffer_len: usize,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool").field("pooled", &self.free.lock().len()).finish_non_exhaustive()
    }
}

impl BufferPool {
    pub(crate) fn new(max_buffers: usize, max_pooled_bytes: usize, max_buffer_len: usize) -> BufferPool {
        BufferPool { free: Mutex::new(Vec::new()), max_buffers, max_pooled_bytes, max_buffer_len }
    }

    /// A buffer of exactly `len` bytes (contents unspecified: whatever the last user left).
    pub(crate) fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self.take_best_fit(len).unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        }
        PooledBuf { buf, len, pool: Some(Arc::clone(self)) }
    }

    /// The smallest free buffer that is long enough, else the longest one (to be grown).
    fn take_best_fit(&self, len: usize) -> Option<Vec<u8>> {
        let mut free = self.free.lock();
        let mut best: Option<usize> = None;
        for (i, b) in free.iter().enumerate() {
            best = match best {
                None => Some(i),
                Some(j) => {
                    let (cur, cand) = (free[j].len(), b.len());
                    let better = if cur >= len { cand >= len && cand < cur } else { cand > cur };
                    Some(if better { i } else { j })
                }
            };
        }
        best.map(|i| free.swap_remove(i))
    }

    /// A buffer for `len` bytes that the caller fills from a reader with
    /// [`PooledBuf::fill_from`]: memory beyond what the pooled buffer already had is only
    /// reserved, not touched, until data arrives.
    pub(crate) fn get_unfilled(self: &Arc<Self>, len: usize) -> PooledBuf {
        let buf = self.take_best_fit(len).unwrap_or_default();
        PooledBuf { buf, len, pool: Some(Arc::clone(self)) }
    }

    fn put_back(&self, buf: Vec<u8>) {
        // Judged by capacity: that is what the allocation may grow back to.
        if buf.capacity() > self.max_buffer_len || buf.is_empty() {
            return;
        }
        let mut free = self.free.lock();
        let pooled: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < self.max_buffers && pooled + buf.len() <= self.max_pooled_bytes {
            free.push(buf);
        }
    }
}

/// A buffer on loan from a [`BufferPool`]; goes back when dropped.
pub(crate) struct PooledBuf {
    /// Its `len()` bytes are initialised; at least `len` of them once filled.
    buf: Vec<u8>,
    len: usize,
    pool: Option<Arc<BufferPool>>,
}

impl PooledBuf {
    /// Reads exactly `len` bytes (the length given to `get_unfilled`) from `reader` (a
    /// socket with a receive timeout: a stall ends the read with an error). On error the
    /// buffer holds a partial payload and should just be dropped.
    pub(crate) fn fill_blocking<R: Read>(&mut self, reader: &mut R) -> io::Result<()> {
        // First into memory the buffer already has (initialised, no allocation)...
        let initialised = self.buf.len().min(self.len);
        reader.read_exact(&mut self.buf[..initialised])?;
        // ...then into spare capacity, which is neither zeroed nor touched before data
        // arrives: a client announcing 32 MiB and sending 1 KiB costs about 1 KiB.
        if self.buf.len() < self.len {
            let remaining = (self.len - self.buf.len()) as u64;
            self.buf.reserve_exact(remaining as usize);
            let n = reader.take(remaining).read_to_end(&mut self.buf)?;
            if (n as u64) < remaining {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

impl fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledBuf").field("len", &self.len).finish()
    }
}

impl Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.put_back(std::mem::take(&mut self.buf));
        }
    }
}

/// True if every byte is zero (sixteen bytes at a time).
pub(crate) fn is_all_zero(data: &[u8]) -> bool {
    let mut lanes = data.chunks_exact(16);
    lanes.by_ref().all(|l| u128::from_ne_bytes(l.try_into().expect("16 bytes")) == 0)
        && lanes.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = Arc::new(BufferPool::new(2, 1 << 20, 1 << 19));
        let mut a = pool.get(1000);
        assert_eq!(a.len(), 1000);
        a[999] = 7;
        drop(a);
        // Reused (same contents), and a shorter request fits without growing.
        let b = pool.get(500);
        assert_eq!(b.len(), 500);
        drop(b);
        let c = pool.get(1000);
        assert_eq!(c[999], 7);
        // Too big to pool.
        let big = pool.get(1 << 20);
        drop(big);
        assert_eq!(pool.free.lock().len(), 0);
        drop(c);
        assert_eq!(pool.free.lock().len(), 1);
        // Count limit.
        let (x, y, z) = (pool.get(10), pool.get(10), pool.get(10));
        drop((x, y, z));
        assert_eq!(pool.free.lock().len(), 2);
    }

    #[test]
    fn best_fit() {
        let pool = Arc::new(BufferPool::new(8, 1 << 20, 1 << 20));
        drop((pool.get(100), pool.get(5000), pool.get(1000)));
        assert_eq!(pool.get(900).buf.len(), 1000);
        assert_eq!(pool.get(6000).buf.len(), 6000); // grown from the longest
    }

    #[test]
    fn fill_from_reader() {
        let pool = Arc::new(BufferPool::new(4, 1 << 20, 1 << 20));
        drop(pool.get(100));
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        // Part into the pooled (initialised) 100 bytes, the rest into spare capacity.
        let mut buf = pool.get_unfilled(1000);
        buf.fill_blocking(&mut &data[..]).unwrap();
        assert_eq!(&buf[..], &data[..]);
        drop(buf);
        // A reader that ends early.
        let mut buf = pool.get_unfilled(2000);
        let err = buf.fill_blocking(&mut &data[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        // A socket that stalls (its receive timeout fires).
        let (_tx, mut rx) = std::os::unix::net::UnixStream::pair().unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(50))).unwrap();
        let mut buf = pool.get_unfilled(10);
        let err = buf.fill_blocking(&mut rx).unwrap_err();
        assert!(matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut), "{err:?}");
    }

    #[test]
    fn zero_check() {
        assert!(is_all_zero(&[]));
        assert!(is_all_zero(&[0u8; 33]));
        let mut v = vec![0u8; 33];
        v[32] = 1;
        assert!(!is_all_zero(&v));
        v[32] = 0;
        v[3] = 1;
        assert!(!is_all_zero(&v));
    }
}
