//! An in-memory, sparse [`BlockDevice`] for tests and experiments.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::RwLock;

use super::{BlockDevice, DeviceError, DeviceResult, Extent};

const BLOCK: u64 = 4096;

/// A sparse RAM disk with 4 KiB blocks. Like the CAS store, a block that is all zeroes is not
/// kept (it reads as zeroes and block status reports a hole), and trim zeroes. It can be told
/// to fail, to exercise error paths.
#[derive(Debug)]
pub struct MemDevice {
    size: u64,
    blocks: RwLock<Vec<Option<Box<[u8]>>>>,
    read_only: bool,
    flushes: AtomicU64,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
}

impl MemDevice {
    /// A zero-filled device of `size` bytes.
    pub fn new(size: u64) -> MemDevice {
        let blocks = usize::try_from(size.div_ceil(BLOCK)).expect("MemDevice size fits in memory");
        let mut v = Vec::new();
        v.resize_with(blocks, || None);
        MemDevice {
            size,
            blocks: RwLock::new(v),
            read_only: false,
            flushes: AtomicU64::new(0),
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
        }
    }

    /// Makes the device refuse writes.
    pub fn read_only(mut self) -> MemDevice {
        self.read_only = true;
        self
    }

    /// Reads (true) fail with an I/O error from now on.
    pub fn set_fail_reads(&self, fail: bool) {
        self.fail_reads.store(fail, Ordering::SeqCst);
    }

    /// Writes, zeroes and trims fail with an I/O error from now on.
    pub fn set_fail_writes(&self, fail: bool) {
        self.fail_writes.store(fail, Ordering::SeqCst);
    }

    /// How many times `flush` was called.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    fn check_range(&self, offset: u64, len: u64) -> DeviceResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::InvalidArgument(format!("{offset}+{len} past the end ({})", self.size))),
        }
    }

    fn check_write(&self, offset: u64, len: u64) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(DeviceError::Io("injected write failure".into()));
        }
        self.check_range(offset, len).map_err(|e| DeviceError::NoSpace(e.to_string()))
    }

    /// Calls `f(block index, offset in block, range in the caller's buffer)` per block piece.
    fn for_each_piece(offset: u64, len: u64, mut f: impl FnMut(usize, usize, std::ops::Range<usize>)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / BLOCK;
            let in_block = (pos % BLOCK) as usize;
            let n = (BLOCK - pos % BLOCK).min(end - pos) as usize;
            let start = (pos - offset) as usize;
            f(block as usize, in_block, start..start + n);
            pos += n as u64;
        }
    }

    fn zero_range(&self, offset: u64, len: u64) {
        let mut blocks = self.blocks.write();
        Self::for_each_piece(offset, len, |b, in_block, range| {
            if range.len() == BLOCK as usize {
                blocks[b] = None;
            } else if let Some(data) = blocks[b].as_mut() {
                data[in_block..in_block + range.len()].fill(0);
                if data.iter().all(|&x| x == 0) {
                    blocks[b] = None;
                }
            }
        });
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()> {
        if self.fail_reads.load(Ordering::SeqCst) {
            return Err(DeviceError::Io("injected read failure".into()));
        }
        self.check_range(offset, buf.len() as u64)?;
        let blocks = self.blocks.read();
        Self::for_each_piece(offset, buf.len() as u64, |b, in_block, range| {
            let out = &mut buf[range];
            match &blocks[b] {
                Some(data) => out.copy_from_slice(&data[in_block..in_block + out.len()]),
                None => out.fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> DeviceResult<()> {
        self.check_write(offset, data.len() as u64)?;
        let mut blocks = self.blocks.write();
        Self::for_each_piece(offset, data.len() as u64, |b, in_block, range| {
            let src = &data[range];
            let block = blocks[b].get_or_insert_with(|| vec![0u8; BLOCK as usize].into_boxed_slice());
            block[in_block..in_block + src.len()].copy_from_slice(src);
            if block.iter().all(|&x| x == 0) {
                blocks[b] = None;
            }
        });
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _fua: bool, _no_hole: bool) -> DeviceResult<()> {
        self.check_write(offset, len)?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> DeviceResult<()> {
        self.check_write(offset, len).map_err(|e| match e {
            DeviceError::NoSpace(m) => DeviceError::InvalidArgument(m),
            other => other,
        })?;
        self.zero_range(offset, len);
        Ok(())
    }

    fn flush(&self) -> DeviceResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>> {
        self.check_range(offset, len)?;
        let blocks = self.blocks.read();
        let mut extents: Vec<Extent> = Vec::new();
        Self::for_each_piece(offset, len, |b, in_block, range| {
            let allocated = blocks[b].is_some();
            let piece_offset = b as u64 * BLOCK + in_block as u64;
            match extents.last_mut() {
                Some(last) if last.allocated == allocated => last.length += range.len() as u64,
                _ => extents.push(Extent { offset: piece_offset, length: range.len() as u64, allocated }),
            }
        });
        Ok(extents)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_reads_writes_and_status() {
        let d = MemDevice::new(5 * BLOCK + 100);
        let mut buf = vec![1u8; 3 * BLOCK as usize];
        d.read(100, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));

        d.write(BLOCK - 10, &[7u8; 20], false).unwrap();
        let mut buf = vec![0u8; 40];
        d.read(BLOCK - 20, &mut buf).unwrap();
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(&buf[10..30], &[7u8; 20]);
        assert_eq!(&buf[30..], &[0u8; 10]);

        let status = d.block_status(0, 5 * BLOCK + 100).unwrap();
        assert_eq!(
            status,
            vec![
                Extent { offset: 0, length: 2 * BLOCK, allocated: true },
                Extent { offset: 2 * BLOCK, length: 3 * BLOCK + 100, allocated: false },
            ]
        );

        // Zeroing part of a block keeps it; zeroing all of it makes a hole.
        d.write_zeroes(BLOCK - 10, 5, false, false).unwrap();
        assert!(d.block_status(0, BLOCK).unwrap()[0].allocated);
        d.trim(0, 2 * BLOCK, false).unwrap();
        assert_eq!(
            d.block_status(0, 2 * BLOCK).unwrap(),
            vec![Extent { offset: 0, length: 2 * BLOCK, allocated: false }]
        );
        let mut buf = vec![1u8; 64];
        d.read(BLOCK - 32, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn errors() {
        let d = MemDevice::new(BLOCK);
        assert_eq!(d.write(BLOCK, &[1], false).unwrap_err().errno(), crate::proto::Errno::NoSpc);
        assert_eq!(d.read(BLOCK, &mut [0u8; 1]).unwrap_err().errno(), crate::proto::Errno::Inval);
        assert_eq!(d.trim(0, BLOCK + 1, false).unwrap_err().errno(), crate::proto::Errno::Inval);
        d.set_fail_reads(true);
        assert_eq!(d.read(0, &mut [0u8; 1]).unwrap_err().errno(), crate::proto::Errno::Io);
        let ro = MemDevice::new(BLOCK).read_only();
        assert_eq!(ro.write(0, &[1], false).unwrap_err(), DeviceError::ReadOnly);
        d.flush().unwrap();
        assert_eq!(d.flush_count(), 1);
    }
}
