//! Moving image files in and out of a store: sparse-aware raw reading, format conversion
//! through qemu-img, and sparse export.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use cas_store::{DiskId, Store};

/// The data-bearing ranges of a file (SEEK_DATA/SEEK_HOLE), or the whole file when the file
/// system cannot tell.
pub fn data_ranges(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: u64 = 0;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENXIO) => Ok(ranges), // no data past pos
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(vec![(0, size)]),
                _ => Err(err),
            };
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { (hole as u64).min(size) };
        if hole > data {
            ranges.push((data, hole - data));
        }
        pos = hole.max(data + 1);
    }
    Ok(ranges)
}

/// An image readable as raw bytes: the file itself, or a raw copy that qemu-img made of it.
#[derive(Debug)]
pub struct RawImage {
    pub path: PathBuf,
    pub format: String,
    pub virtual_size: u64,
    _converted: Option<tempfile::TempPath>,
}

/// The format and virtual size of an image file, as qemu-img sees it.
pub fn probe(path: &Path) -> Result<(String, u64)> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    let info = Command::new("qemu-img").args(["info", "--output=json"]).arg(path).output().context("running qemu-img (install qemu-utils)")?;
    if !info.status.success() {
        bail!("qemu-img cannot read {}: {}", path.display(), String::from_utf8_lossy(&info.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).context("qemu-img info output")?;
    let format = v["format"].as_str().unwrap_or("raw").to_string();
    let virtual_size = v["virtual-size"].as_u64().context("qemu-img info gave no virtual-size")?;
    Ok((format, virtual_size))
}

/// Opens any image qemu-img reads. Raw files are used in place; others (qcow2, vmdk, vhd...)
/// are converted to a sparse raw temporary file first.
pub fn open_raw(path: &Path) -> Result<RawImage> {
    let (format, virtual_size) = probe(path)?;
    let meta = std::fs::metadata(path)?;
    if format == "raw" {
        return Ok(RawImage { path: path.to_path_buf(), format, virtual_size: meta.len(), _converted: None });
    }
    let tmp = tempfile::Builder::new().prefix("cas-import-").suffix(".raw").tempfile_in(std::env::temp_dir())?.into_temp_path();
    let status =
        Command::new("qemu-img").args(["convert", "-q", "-f", &format, "-O", "raw"]).arg(path).arg(&tmp).status().context("running qemu-img convert")?;
    if !status.success() {
        bail!("qemu-img convert of {} ({format}) failed", path.display());
    }
    Ok(RawImage { path: tmp.to_path_buf(), format, virtual_size, _converted: Some(tmp) })
}

/// Copies a raw file into a disk (which must be at least as large). Holes are not read; the
/// disk range they cover is zeroed, which costs nothing in the store.
pub fn import_raw(store: &Store, disk: DiskId, raw: &Path, mut progress: impl FnMut(u64)) -> Result<u64> {
    let mut file = File::open(raw).with_context(|| format!("{}", raw.display()))?;
    let size = file.metadata()?.len();
    let disk_size = store.disk_size(disk)?;
    if size > disk_size {
        bail!("the image ({size} bytes) is larger than the disk ({disk_size} bytes)");
    }
    const CHUNK: usize = 4 << 20;
    let mut buf = vec![0u8; CHUNK];
    let mut cursor = 0u64;
    for (start, len) in data_ranges(&file, size)? {
        if start > cursor {
            store.write_zeroes(disk, cursor, start - cursor, false)?;
        }
        file.seek(SeekFrom::Start(start))?;
        let mut offset = start;
        while offset < start + len {
            let n = CHUNK.min((start + len - offset) as usize);
            file.read_exact(&mut buf[..n])?;
            store.write(disk, offset, &buf[..n], false)?;
            offset += n as u64;
            progress(offset);
        }
        cursor = start + len;
    }
    if cursor < disk_size {
        store.write_zeroes(disk, cursor, disk_size - cursor, false)?;
    }
    store.flush()?;
    progress(size);
    Ok(size)
}

/// Writes a disk to a sparse raw file: only allocated ranges are written.
pub fn export_raw(store: &Store, disk: DiskId, out: &Path, mut progress: impl FnMut(u64)) -> Result<u64> {
    let size = store.disk_size(disk)?;
    let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(out).with_context(|| format!("{}", out.display()))?;
    file.set_len(size)?;
    const CHUNK: u64 = 4 << 20;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0u64;
    while offset < size {
        let span = CHUNK.min(size - offset);
        for extent in store.block_status(disk, offset, span)? {
            if !extent.allocated {
                continue;
            }
            let part = &mut buf[..extent.length as usize];
            store.read(disk, extent.offset, part)?;
            file.seek(SeekFrom::Start(extent.offset))?;
            file.write_all(part)?;
        }
        offset += span;
        progress(offset);
    }
    file.sync_all()?;
    Ok(size)
}
