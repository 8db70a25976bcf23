//! Offline estimate of what delta against similar blocks would save on real disk images.
//!
//! For a migrated image and a destination neighbourhood (raw images), it takes the distinct
//! non-zero 4 KiB blocks the neighbourhood lacks ("missing") and prints, in bytes:
//! - the floor: zstd -3 over the missing blocks as one frame, plus 16 B per block;
//! - one long-window stream (window 128 MiB) at the link's levels;
//! - delta: each missing block whose resemblance sketch names a block of the reference
//!   images (blocks both ends hold) encoded with that block as a zstd raw-content
//!   dictionary, when that is clearly smaller; the rest in one long-window stream.
//!
//!   cargo run --release -p migration --example delta_estimate -- \
//!       MIGRATED.raw --hood A.raw,B.raw [--refs A.raw|self] [--levels 3,6,9]
//!
//! `--refs` names the images whose blocks both ends hold (default: the whole neighbourhood,
//! as if the source held all of it too); `self` takes only the blocks of the migrated image
//! that the neighbourhood holds (a source that holds nothing but the migrated disk).
use std::collections::{HashMap, HashSet};
use std::io::Write;

use cas_store::resemblance::{sketch, Sketch, SUPER_FEATURES};
use twox_hash::XxHash3_128;

const BLOCK: usize = 4096;
const FINGERPRINT_BYTES: usize = 16;
/// A delta on the wire names its reference (16 B) and its length (4 B).
const DELTA_OVERHEAD: usize = 20;

fn blocks(image: &[u8]) -> impl Iterator<Item = &[u8]> {
    image.chunks_exact(BLOCK).filter(|b| b.iter().any(|&x| x != 0))
}

fn stream_bytes(level: i32, blocks: &[&[u8]]) -> usize {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), level).unwrap();
    encoder.window_log(27).unwrap();
    encoder.long_distance_matching(true).unwrap();
    for b in blocks {
        encoder.write_all(b).unwrap();
    }
    encoder.finish().unwrap().len()
}

fn delta_bytes(level: i32, block: &[u8], reference: &[u8]) -> usize {
    let mut c = zstd::bulk::Compressor::with_dictionary(level, reference).unwrap();
    c.include_checksum(false).unwrap();
    c.include_contentsize(false).unwrap();
    c.include_dictid(false).unwrap();
    let out = c.compress(block).unwrap();
    // check it decodes against the reference
    let mut d = zstd::bulk::Decompressor::with_dictionary(reference).unwrap();
    assert_eq!(d.decompress(&out, BLOCK).unwrap(), block);
    // the 4-byte frame magic need not cross (zstd's magicless format)
    out.len() - 4
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut migrated = None;
    let (mut hood, mut refs, mut levels) = (Vec::new(), None, vec![3, 6, 9]);
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--hood" => {
                hood = args[i + 1].split(',').map(String::from).collect();
                i += 1
            }
            "--refs" => {
                refs = Some(args[i + 1].split(',').map(String::from).collect::<Vec<_>>());
                i += 1
            }
            "--levels" => {
                levels = args[i + 1].split(',').map(|l| l.parse().unwrap()).collect();
                i += 1
            }
            other => migrated = Some(other.to_string()),
        }
        i += 1;
    }
    let migrated = migrated.expect("usage: delta_estimate MIGRATED.raw --hood A.raw,B.raw [--refs A.raw] [--levels 3,6,9]");
    let refs = refs.unwrap_or_else(|| hood.clone());
    let images: Vec<(String, Vec<u8>)> = hood.iter().map(|p| (p.clone(), std::fs::read(p).unwrap())).collect();
    let mut held: HashSet<u128> = HashSet::new();
    let mut index: Vec<HashMap<u64, &[u8]>> = vec![HashMap::new(); SUPER_FEATURES];
    let t = std::time::Instant::now();
    let mut sketched = 0usize;
    for (path, image) in &images {
        let is_ref = refs.contains(path);
        for b in blocks(image) {
            if held.insert(XxHash3_128::oneshot(b)) && is_ref {
                if let Some(Sketch(sf)) = sketch(b) {
                    sketched += 1;
                    for (j, v) in sf.iter().enumerate() {
                        index[j].entry(*v).or_insert(b);
                    }
                }
            }
        }
    }
    let image = std::fs::read(&migrated).unwrap();
    if refs.iter().any(|r| r == "self") {
        for b in blocks(&image) {
            if held.contains(&XxHash3_128::oneshot(b)) {
                if let Some(Sketch(sf)) = sketch(b) {
                    sketched += 1;
                    for (j, v) in sf.iter().enumerate() {
                        index[j].entry(*v).or_insert(b);
                    }
                }
            }
        }
    }
    let sketch_secs = t.elapsed().as_secs_f64();
    let mut seen = HashSet::new();
    let missing: Vec<&[u8]> = blocks(&image)
        .filter(|b| {
            let fp = XxHash3_128::oneshot(b);
            !held.contains(&fp) && seen.insert(fp)
        })
        .collect();
    let fps = FINGERPRINT_BYTES * missing.len();
    let floor3 = zstd::bulk::compress(&missing.concat(), 3).unwrap().len() + fps;
    println!("migrated {migrated}: {} missing blocks ({:.1} MiB)", missing.len(), (missing.len() * BLOCK) as f64 / 1048576.0);
    println!("reference blocks sketched: {sketched} in {sketch_secs:.1} s ({:.2} us per block with hashing)", sketch_secs * 1e6 / sketched.max(1) as f64);
    println!("floor (zstd -3 one frame + 16 B/block): {floor3} B");
    // delta candidates
    let t = std::time::Instant::now();
    let (mut with_candidate, mut delta_total, mut plain_of_delta) = (0usize, 0usize, 0usize);
    let mut rest: Vec<&[u8]> = Vec::new();
    for b in &missing {
        let mut best: Option<usize> = None;
        if let Some(Sketch(sf)) = sketch(b) {
            let mut tried: Vec<*const u8> = Vec::new();
            for (j, v) in sf.iter().enumerate() {
                if let Some(r) = index[j].get(v) {
                    if tried.contains(&r.as_ptr()) {
                        continue;
                    }
                    tried.push(r.as_ptr());
                    let d = delta_bytes(3, b, r);
                    best = Some(best.map_or(d, |x: usize| x.min(d)));
                }
            }
        }
        let plain = zstd::bulk::compress(b, 3).unwrap().len();
        match best {
            Some(d) if d + DELTA_OVERHEAD < plain / 2 => {
                with_candidate += 1;
                delta_total += d + DELTA_OVERHEAD;
                plain_of_delta += plain;
            }
            _ => rest.push(b),
        }
    }
    let delta_secs = t.elapsed().as_secs_f64();
    println!(
        "delta: {with_candidate} blocks ({:.1}%) as {delta_total} B (plain per block {plain_of_delta} B), {:.1} us per missing block",
        100.0 * with_candidate as f64 / missing.len().max(1) as f64,
        delta_secs * 1e6 / missing.len().max(1) as f64
    );
    println!("{:>6} {:>14} {:>8} {:>22} {:>8}", "level", "stream", "x floor", "delta + stream of rest", "x floor");
    for level in levels {
        let s = stream_bytes(level, &missing) + fps;
        let d = delta_total + stream_bytes(level, &rest) + fps;
        println!("{level:>6} {s:>14} {:>8.3} {d:>22} {:>8.3}", s as f64 / floor3 as f64, d as f64 / floor3 as f64);
    }
}
