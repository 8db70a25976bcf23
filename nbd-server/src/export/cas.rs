//! A disk of the content-addressed store as a [`BlockDevice`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cas_store::{DiskId, Store, StoreError};

use super::{BlockDevice, DeviceError, DeviceResult, Extent};

/// One disk of a [`Store`]. Every method calls the store synchronously (RocksDB); the server
/// runs them on its connection threads. All disks of a store share one write-ahead log, so FLUSH
/// on any connection to any disk covers every completed write (CAN_MULTI_CONN holds).
#[derive(Debug)]
pub struct CasDevice {
    store: Arc<Store>,
    disk: DiskId,
    name: String,
    /// Size last seen, reported once the disk is deleted so that requests reach the store
    /// and fail with `ESHUTDOWN` rather than looking out of range.
    last_size: AtomicU64,
    read_only: bool,
}

/// Which request an error came from: the same store error means different NBD errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    Trim,
}

impl CasDevice {
    /// The disk called `name`.
    pub fn open(store: Arc<Store>, name: &str) -> Result<CasDevice, StoreError> {
        let info = store.disk(name)?;
        Ok(CasDevice {
            store,
            disk: info.id,
            name: info.name,
            last_size: AtomicU64::new(info.size),
            read_only: info.read_only,
        })
    }

    pub fn disk_id(&self) -> DiskId {
        self.disk
    }

    pub fn disk_name(&self) -> &str {
        &self.name
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn map_error(&self, access: Access, op: &str, offset: u64, len: u64, err: StoreError) -> DeviceError {
        let message = format!("{op} {}@{offset}+{len}: {err}", self.name);
        match err {
            StoreError::OutOfRange { .. } if access == Access::Write => DeviceError::NoSpace(message),
            StoreError::OutOfRange { .. } | StoreError::InvalidArgument(_) => DeviceError::InvalidArgument(message),
            StoreError::ReadOnly(_) => DeviceError::ReadOnly,
            // The disk was deleted under the export: tell the client to go away.
            StoreError::DiskNotFound(_) => {
                tracing::warn!(disk = %self.name, "{message}");
                DeviceError::Shutdown(message)
            }
            _ => {
                tracing::error!(disk = %self.name, "{message}");
                DeviceError::Io(message)
            }
        }
    }
}

impl BlockDevice for CasDevice {
    fn size(&self) -> u64 {
        // An in-memory lookup (no RocksDB): cheap enough for every request, and it follows
        // resizes made through the store.
        match self.store.disk_size(self.disk) {
            Ok(size) => {
                self.last_size.store(size, Ordering::Relaxed);
                size
            }
            Err(_) => self.last_size.load(Ordering::Relaxed),
        }
    }

    fn preferred_block_size(&self) -> u32 {
        self.store.block_size()
    }

    fn is_read_only(&self) -> bool {
        // A snapshot (read-only for ever: the catalogue's flag never changes).
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()> {
        let len = buf.len() as u64;
        self.store.read(self.disk, offset, buf).map_err(|e| self.map_error(Access::Read, "read", offset, len, e))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()> {
        let len = data.len() as u64;
        self.store
            .write(self.disk, offset, data, fua)
            .map_err(|e| self.map_error(Access::Write, "write", offset, len, e))
    }

    fn write_many(&self, writes: &[(u64, &[u8])], fua: bool) -> Vec<DeviceResult<()>> {
        match self.store.write_many(self.disk, writes, fua) {
            Ok(()) => writes.iter().map(|_| Ok(())).collect(),
            // One error stands for all of them: write each on its own for its own result (a
            // grouped commit applied none of them; rewriting the same bytes is harmless).
            Err(_) => writes.iter().map(|(offset, data)| self.write(*offset, data, fua)).collect(),
        }
    }

    fn groups_writes(&self) -> bool {
        true
    }

    /// A write hashes, looks up, appends and commits before it returns; answering once it is
    /// admitted lets a client with one write in flight send the next meanwhile.
    fn writes_behind(&self) -> bool {
        true
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, _no_hole: bool) -> DeviceResult<()> {
        // NO_HOLE asks for provisioned space; a deduplicating store never reserves space for a
        // block (an all-zero block is a hole by design), so there is nothing more to do.
        self.store
            .write_zeroes(self.disk, offset, len, fua)
            .map_err(|e| self.map_error(Access::Write, "write_zeroes", offset, len, e))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()> {
        self.store.trim(self.disk, offset, len, fua).map_err(|e| self.map_error(Access::Trim, "trim", offset, len, e))
    }

    fn flush(&self) -> DeviceResult<()> {
        self.store.flush().map_err(|e| self.map_error(Access::Write, "flush", 0, 0, e))
    }

    fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>> {
        let extents = self
            .store
            .block_status(self.disk, offset, len)
            .map_err(|e| self.map_error(Access::Read, "block_status", offset, len, e))?;
        Ok(extents.into_iter().map(|e| Extent { offset: e.offset, length: e.length, allocated: e.allocated }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Errno;
    use cas_store::StoreOptions;

    fn device(size: u64) -> CasDevice {
        let store = Arc::new(Store::open_in_memory(StoreOptions::default()).unwrap());
        store.create_disk("d", size).unwrap();
        CasDevice::open(store, "d").unwrap()
    }

    #[test]
    fn reads_writes_and_status() {
        let d = device(1 << 20);
        assert_eq!(d.size(), 1 << 20);
        assert_eq!(d.preferred_block_size(), 4096);
        d.write(4096, &[0xab; 8192], false).unwrap();
        let mut buf = vec![0u8; 4096 * 4];
        d.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..12288].iter().all(|&b| b == 0xab));
        let st = d.block_status(0, 1 << 20).unwrap();
        assert_eq!(st[0], Extent { offset: 0, length: 4096, allocated: false });
        assert_eq!(st[1], Extent { offset: 4096, length: 8192, allocated: true });
        d.write_zeroes(4096, 4096, true, true).unwrap();
        d.trim(8192, 4096, false).unwrap();
        assert_eq!(d.block_status(0, 1 << 20).unwrap(), vec![Extent { offset: 0, length: 1 << 20, allocated: false }]);
        d.flush().unwrap();
    }

    #[test]
    fn errors_map_to_nbd_errnos() {
        let d = device(8192);
        assert_eq!(d.write(8192, &[1], false).unwrap_err().errno(), Errno::NoSpc);
        assert_eq!(d.write_zeroes(4096, 8192, false, false).unwrap_err().errno(), Errno::NoSpc);
        assert_eq!(d.read(8000, &mut [0u8; 1000]).unwrap_err().errno(), Errno::Inval);
        assert_eq!(d.trim(0, 16384, false).unwrap_err().errno(), Errno::Inval);
        d.store().delete_disk("d").unwrap();
        assert_eq!(d.size(), 8192);
        assert_eq!(d.read(0, &mut [0u8; 1]).unwrap_err().errno(), Errno::Shutdown);
        assert_eq!(d.write(0, &[1], true).unwrap_err().errno(), Errno::Shutdown);
    }
}
