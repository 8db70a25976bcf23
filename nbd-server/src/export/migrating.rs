//! A disk arriving by migration as a [`BlockDevice`]: standby, then post-copy.

use std::sync::Arc;

use cas_store::StoreError;
use migration::{MigratingDisk, PostCopyError};

use super::{BlockDevice, DeviceError, DeviceResult, Extent};

/// Serves a disk that is still arriving. Before the switch-over it is a standby export
/// (reads answered with the source's current content, writes held until the switch); after
/// it, reads of blocks not here yet wait for them (fetched from the source ahead of the
/// background transfer). See [`MigratingDisk`].
#[derive(Debug)]
pub struct MigratingDevice {
    name: String,
    disk: Arc<MigratingDisk>,
}

impl MigratingDevice {
    pub fn new(name: &str, disk: Arc<MigratingDisk>) -> MigratingDevice {
        MigratingDevice { name: name.to_string(), disk }
    }

    fn map(&self, write: bool, op: &str, offset: u64, len: u64, e: PostCopyError) -> DeviceError {
        let message = format!("{op} {}@{offset}+{len}: {e}", self.name);
        match e {
            PostCopyError::Store(StoreError::OutOfRange { .. }) if write => DeviceError::NoSpace(message),
            PostCopyError::Store(StoreError::OutOfRange { .. } | StoreError::InvalidArgument(_)) => {
                DeviceError::InvalidArgument(message)
            }
            PostCopyError::Store(StoreError::DiskNotFound(_)) => DeviceError::Shutdown(message),
            _ => {
                tracing::error!(disk = %self.name, "{message}");
                DeviceError::Io(message)
            }
        }
    }
}

impl BlockDevice for MigratingDevice {
    fn size(&self) -> u64 {
        self.disk.size().unwrap_or(0)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()> {
        let len = buf.len() as u64;
        self.disk.read(offset, buf).map_err(|e| self.map(false, "read", offset, len, e))
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()> {
        self.disk.write(offset, data, fua).map_err(|e| self.map(true, "write", offset, data.len() as u64, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, _no_hole: bool) -> DeviceResult<()> {
        self.disk.write_zeroes(offset, len, fua).map_err(|e| self.map(true, "write_zeroes", offset, len, e))
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()> {
        self.disk.trim(offset, len, fua).map_err(|e| self.map(false, "trim", offset, len, e))
    }

    fn flush(&self) -> DeviceResult<()> {
        self.disk.flush().map_err(|e| self.map(false, "flush", 0, 0, e))
    }

    fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>> {
        let extents =
            self.disk.block_status(offset, len).map_err(|e| self.map(false, "block_status", offset, len, e))?;
        Ok(extents.into_iter().map(|e| Extent { offset: e.offset, length: e.length, allocated: e.allocated }).collect())
    }

    fn preferred_block_size(&self) -> u32 {
        self.disk.store().block_size()
    }

    /// Blocks not fetched yet are read over the link.
    fn may_wait(&self) -> bool {
        true
    }
}
