//! The paper's similarity table, straight from image files: for each ordered pair (A, B), the
//! share of B's non-zero blocks whose content also occurs in A, at several block sizes.
//!
//! B's blocks are counted with multiplicity (a block that occurs ten times in B counts ten
//! times), because that is what a migration of B would not have to send if A were at the
//! destination. Content is compared by XXH3-128: the images are the operator's own files, so
//! nobody chooses inputs to collide, and a 128-bit hash has no accidental collisions at these
//! sizes.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use crate::image::data_ranges;

pub const PAPER_BLOCK_SIZES: [usize; 4] = [512, 1024, 2048, 4096];

/// The non-zero block contents of one image, per block size: content hash -> occurrences.
#[derive(Debug)]
pub struct ImageBlocks {
    pub name: String,
    pub block_sizes: Vec<usize>,
    counts: Vec<HashMap<u128, u32>>,
}

impl ImageBlocks {
    /// Non-zero blocks of the image at `block_sizes[i]`.
    pub fn nonzero_blocks(&self, i: usize) -> u64 {
        self.counts[i].values().map(|&c| u64::from(c)).sum()
    }
}

/// One cell of the table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairShare {
    /// The image that holds blocks (a neighbour at the destination).
    pub a: String,
    /// The image whose blocks are looked for (the one that would migrate).
    pub b: String,
    pub block_size: usize,
    pub b_nonzero_blocks: u64,
    pub b_blocks_in_a: u64,
    /// b_blocks_in_a / b_nonzero_blocks (0 when B has no non-zero block).
    pub share: f64,
}

/// Reads an image once and fingerprints its blocks at every block size. Holes of a sparse
/// file are skipped without reading. `progress` gets the bytes covered so far.
pub fn scan_image(path: &Path, block_sizes: &[usize], mut progress: impl FnMut(u64)) -> io::Result<ImageBlocks> {
    let largest = *block_sizes.iter().max().expect("at least one block size");
    assert!(block_sizes.iter().all(|bs| bs.is_power_of_two() && largest % bs == 0));
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut counts: Vec<HashMap<u128, u32>> = vec![HashMap::new(); block_sizes.len()];
    let chunk = (1usize << 20).max(largest);
    let mut buf = vec![0u8; chunk];
    for (start, len) in data_ranges(&file, size)? {
        // Align to the largest block so every block size sees whole blocks.
        let aligned_start = start / largest as u64 * largest as u64;
        let end = (start + len).div_ceil(largest as u64) * largest as u64;
        let mut offset = aligned_start;
        file.seek(SeekFrom::Start(offset))?;
        while offset < end {
            let want = chunk.min((end - offset) as usize);
            let got = read_full(&mut file, &mut buf[..want])?;
            // Past the end of the file (a size not a multiple of the block): zeros.
            buf[got..want].fill(0);
            for (i, &bs) in block_sizes.iter().enumerate() {
                for block in buf[..want].chunks(bs) {
                    if block.iter().any(|&b| b != 0) {
                        *counts[i].entry(twox_hash::XxHash3_128::oneshot(block)).or_default() += 1;
                    }
                }
            }
            offset += want as u64;
            progress(offset.min(size));
        }
    }
    progress(size);
    let file = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let name = file.strip_suffix(".raw").map(str::to_string).unwrap_or(file);
    Ok(ImageBlocks { name, block_sizes: block_sizes.to_vec(), counts })
}

fn read_full(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Every ordered pair of distinct images, at every block size.
pub fn pairwise(images: &[ImageBlocks]) -> Vec<PairShare> {
    let mut out = Vec::new();
    let Some(first) = images.first() else { return out };
    for (i, &bs) in first.block_sizes.iter().enumerate() {
        let sets: Vec<HashSet<u128>> = images.iter().map(|im| im.counts[i].keys().copied().collect()).collect();
        for (ai, a) in images.iter().enumerate() {
            for (bi, b) in images.iter().enumerate() {
                if ai == bi {
                    continue;
                }
                let total = b.nonzero_blocks(i);
                let common: u64 = b.counts[i].iter().filter(|(h, _)| sets[ai].contains(h)).map(|(_, &c)| u64::from(c)).sum();
                out.push(PairShare {
                    a: a.name.clone(),
                    b: b.name.clone(),
                    block_size: bs,
                    b_nonzero_blocks: total,
                    b_blocks_in_a: common,
                    share: if total == 0 { 0.0 } else { common as f64 / total as f64 },
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn shares_count_multiplicity_and_skip_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let block = |v: u8| vec![v; 4096];
        let write = |name: &str, blocks: &[Vec<u8>]| {
            let p = dir.path().join(name);
            let mut f = File::create(&p).unwrap();
            for b in blocks {
                f.write_all(b).unwrap();
            }
            p
        };
        let a = write("a", &[block(1), block(2), block(0)]);
        let b = write("b", &[block(1), block(1), block(3), block(0), block(0)]);
        let images: Vec<_> = [a, b].iter().map(|p| scan_image(p, &PAPER_BLOCK_SIZES, |_| {}).unwrap()).collect();
        let table = pairwise(&images);
        let cell = |a: &str, b: &str, bs: usize| table.iter().find(|c| c.a == a && c.b == b && c.block_size == bs).unwrap().clone();
        let ab = cell("a", "b", 4096);
        assert_eq!((ab.b_nonzero_blocks, ab.b_blocks_in_a), (3, 2));
        let ba = cell("b", "a", 512);
        assert_eq!((ba.b_nonzero_blocks, ba.b_blocks_in_a), (16, 8));
        assert_eq!(table.len(), 2 * 4);
    }
}
