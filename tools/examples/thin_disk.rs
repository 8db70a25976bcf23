//! Builds a large thin disk straight in a store, for the memory benchmark of a migration
//! (`bench/memory.py`): `--blocks` allocated blocks spread evenly over `--size-gib`, holding
//! `--distinct` different contents (pseudo-random, so incompressible) in turn, so block `i`
//! has content `i % distinct`. Writing them through NBD would take an hour; this takes a
//! minute, because each content is hashed and stored once and the rest are map entries.
//!
//! `cargo run --release -p tools --example thin_disk -- --store DIR`

use std::path::PathBuf;

use anyhow::Context;
use argh::FromArgs;
use cas_store::{Fingerprint, Store, StoreOptions};

/// Build a thin disk of many allocated blocks and few distinct contents.
#[derive(FromArgs)]
struct Args {
    /// store directory (created if missing)
    #[argh(option)]
    store: PathBuf,
    /// disk name
    #[argh(option, default = "String::from(\"thin\")")]
    disk: String,
    /// virtual size in GiB
    #[argh(option, default = "2048")]
    size_gib: u64,
    /// allocated blocks
    #[argh(option, default = "10_000_000")]
    blocks: u64,
    /// distinct contents among them
    #[argh(option, default = "1_000_000")]
    distinct: u64,
}

/// Blocks stored per engine commit.
const BATCH: u64 = 4096;

/// Content number `n`: 4 KiB (the block size) of xorshift output seeded by `n`.
fn content(n: u64, out: &mut [u8]) {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for word in out.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes());
    }
}

fn main() -> anyhow::Result<()> {
    let args: Args = argh::from_env();
    anyhow::ensure!(args.distinct >= 1 && args.distinct <= args.blocks, "--distinct must be between 1 and --blocks");
    let store = Store::open(&args.store, StoreOptions::default()).with_context(|| format!("opening {}", args.store.display()))?;
    let bs = u64::from(store.block_size());
    let size = args.size_gib << 30;
    let slots = size / bs;
    anyhow::ensure!(args.blocks <= slots, "{} blocks do not fit in {} GiB", args.blocks, args.size_gib);
    let stride = slots / args.blocks;
    let disk = store.create_disk(&args.disk, size)?.id;
    let started = std::time::Instant::now();

    // The distinct contents, each written once at its first block.
    let mut fps: Vec<Fingerprint> = Vec::with_capacity(args.distinct as usize);
    let mut data = vec![0u8; (BATCH * bs) as usize];
    let mut first = 0;
    while first < args.distinct {
        let n = BATCH.min(args.distinct - first);
        for (i, buf) in data.chunks_exact_mut(bs as usize).take(n as usize).enumerate() {
            content(first + i as u64, buf);
        }
        let batch: Vec<(u64, Fingerprint, &[u8])> =
            data.chunks_exact(bs as usize).take(n as usize).enumerate().map(|(i, buf)| ((first + i as u64) * stride, store.fingerprint(buf), buf)).collect();
        fps.extend(batch.iter().map(|b| b.1));
        store.write_verified_blocks(disk, &batch)?;
        first += n;
    }
    // Every other block maps to one of them.
    let mut block = args.distinct;
    while block < args.blocks {
        let end = (block + 16 * BATCH).min(args.blocks);
        let entries: Vec<(u64, Fingerprint)> = (block..end).map(|b| (b * stride, fps[(b % args.distinct) as usize])).collect();
        let mapped = store.map_existing(disk, &entries)?;
        anyhow::ensure!(mapped.iter().all(|m| *m), "a content written above was not found");
        block = end;
    }
    store.flush()?;
    println!(
        "{}: {} GiB, {} blocks allocated ({} distinct), one every {} blocks, built in {:.1} s",
        args.disk,
        args.size_gib,
        args.blocks,
        args.distinct,
        stride,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
