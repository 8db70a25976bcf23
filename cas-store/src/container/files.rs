//! Where container files live: a directory of the filesystem, or memory (tests, and stores
//! opened in memory).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::{Result, StoreError};

/// One container: positional reads and writes, as `pread`/`pwrite` give them.
pub trait ContainerFile: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an error (a block the file does not
    /// hold), never zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> Result<()>;
    /// Writes `blocks` one after the other from `offset`.
    fn write_blocks_at(&self, blocks: &[&[u8]], offset: u64) -> Result<()> {
        self.write_at(&blocks.concat(), offset)
    }
    /// Makes the data written so far durable.
    fn sync(&self) -> Result<()>;
    fn len(&self) -> Result<u64>;
}

/// Buffers per `pwritev` (Linux's `IOV_MAX`).
const MAX_IOVECS: usize = 1024;

/// A set of numbered containers.
pub trait ContainerDir: Send + Sync + fmt::Debug {
    /// Creates container `id` (empty). It must not exist.
    fn create(&self, id: u32) -> Result<Arc<dyn ContainerFile>>;
    /// Opens every container.
    fn open_all(&self) -> Result<Vec<(u32, Arc<dyn ContainerFile>)>>;
    /// Deletes container `id` durably (its name is gone after a crash).
    fn remove(&self, id: u32) -> Result<()>;
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Engine(format!("{what} {}: {e}", path.display()))
}

/// Containers as files `NNNNNNNN.blocks` in a directory.
#[derive(Debug)]
pub struct FsContainerDir {
    path: PathBuf,
}

impl FsContainerDir {
    pub fn open(path: &Path) -> Result<FsContainerDir> {
        std::fs::create_dir_all(path).map_err(|e| io_err("creating", path, e))?;
        Ok(FsContainerDir { path: path.to_path_buf() })
    }

    fn file_path(&self, id: u32) -> PathBuf {
        self.path.join(format!("{id:08x}.blocks"))
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.path).and_then(|d| d.sync_all()).map_err(|e| io_err("syncing", &self.path, e))
    }
}

struct FsFile {
    file: File,
    path: PathBuf,
}

impl ContainerFile for FsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| io_err(&format!("reading {} bytes at {offset} of", buf.len()), &self.path, e))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| io_err("writing", &self.path, e))
    }

    /// One `pwritev` for up to [`MAX_IOVECS`] blocks: no copy of a chunk's blocks into one
    /// buffer first (a megabyte per chunk of a large write).
    fn write_blocks_at(&self, blocks: &[&[u8]], offset: u64) -> Result<()> {
        let mut slices: Vec<IoSlice<'_>> = blocks.iter().map(|b| IoSlice::new(b)).collect();
        let mut rest = &mut slices[..];
        let mut at = offset;
        while !rest.is_empty() {
            let count = rest.len().min(MAX_IOVECS);
            let position = libc::off_t::try_from(at).map_err(|_| StoreError::InvalidArgument(format!("container offset {at} too large")))?;
            // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and the first `count`
            // slices point into `blocks`, which outlive the call; the kernel only reads them.
            let written = unsafe { libc::pwritev(self.file.as_raw_fd(), rest.as_ptr().cast::<libc::iovec>(), count as libc::c_int, position) };
            if written < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(io_err("writing", &self.path, e));
            }
            if written == 0 {
                return Err(io_err("writing", &self.path, std::io::ErrorKind::WriteZero.into()));
            }
            at += written as u64;
            IoSlice::advance_slices(&mut rest, written as usize);
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(|e| io_err("syncing", &self.path, e))
    }

    fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().map_err(|e| io_err("reading the size of", &self.path, e))?.len())
    }
}

impl ContainerDir for FsContainerDir {
    fn create(&self, id: u32) -> Result<Arc<dyn ContainerFile>> {
        let path = self.file_path(id);
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(|e| io_err("creating", &path, e))?;
        // The name must survive a crash before an index entry names a block in it.
        self.sync_dir()?;
        Ok(Arc::new(FsFile { file, path }))
    }

    fn open_all(&self) -> Result<Vec<(u32, Arc<dyn ContainerFile>)>> {
        let mut out: Vec<(u32, Arc<dyn ContainerFile>)> = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(|e| io_err("listing", &self.path, e))? {
            let entry = entry.map_err(|e| io_err("listing", &self.path, e))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".blocks")).and_then(|n| u32::from_str_radix(n, 16).ok()) else {
                continue;
            };
            let path = entry.path();
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| io_err("opening", &path, e))?;
            out.push((id, Arc::new(FsFile { file, path })));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    fn remove(&self, id: u32) -> Result<()> {
        let path = self.file_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("deleting", &path, e)),
        }
        self.sync_dir()
    }
}

/// Containers in memory. An `Arc` of a removed container keeps its bytes, as an open file
/// keeps a deleted file's.
#[derive(Debug, Default)]
pub struct MemContainerDir {
    files: Mutex<BTreeMap<u32, Arc<MemFile>>>,
}

#[derive(Debug, Default)]
struct MemFile {
    data: RwLock<Vec<u8>>,
}

impl ContainerFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let data = self.data.read();
        let start = usize::try_from(offset).ok().filter(|&s| s.checked_add(buf.len()).is_some_and(|e| e <= data.len()));
        match start {
            Some(s) => {
                buf.copy_from_slice(&data[s..s + buf.len()]);
                Ok(())
            }
            None => Err(StoreError::Engine(format!("reading {} bytes at {offset} past the end of a {}-byte container", buf.len(), data.len()))),
        }
    }

    fn write_at(&self, bytes: &[u8], offset: u64) -> Result<()> {
        let mut data = self.data.write();
        let start = offset as usize;
        if data.len() < start + bytes.len() {
            data.resize(start + bytes.len(), 0);
        }
        data[start..start + bytes.len()].copy_from_slice(bytes);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn len(&self) -> Result<u64> {
        Ok(self.data.read().len() as u64)
    }
}

impl ContainerDir for MemContainerDir {
    fn create(&self, id: u32) -> Result<Arc<dyn ContainerFile>> {
        let mut files = self.files.lock();
        if files.contains_key(&id) {
            return Err(StoreError::Engine(format!("container {id} exists")));
        }
        let f = Arc::new(MemFile::default());
        files.insert(id, f.clone());
        Ok(f)
    }

    fn open_all(&self) -> Result<Vec<(u32, Arc<dyn ContainerFile>)>> {
        Ok(self.files.lock().iter().map(|(id, f)| (*id, f.clone() as Arc<dyn ContainerFile>)).collect())
    }

    fn remove(&self, id: u32) -> Result<()> {
        self.files.lock().remove(&id);
        Ok(())
    }
}
