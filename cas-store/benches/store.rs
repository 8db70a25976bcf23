//! Store benchmarks: import (write with fingerprinting), reads with a cold and a warm
//! hot-block cache, and batched fingerprint lookups, for both fingerprint algorithms.
//!
//! `cargo bench -p cas-store --bench store` prints the figures; `bench.sh` calls it.

use std::hint::black_box;
use std::time::Duration;

use cas_store::{Fingerprint, FingerprintAlgorithm, Store, StoreOptions};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const BS: usize = 4096;
const CHUNK: usize = 256 * BS; // 1 MiB per write call, as an importer issues them
const DISK: u64 = 1 << 30;

/// Fills `buf` with unique, incompressible-looking blocks numbered from `serial`.
fn unique_blocks(buf: &mut [u8], serial: &mut u64) {
    for block in buf.chunks_mut(BS) {
        *serial += 1;
        let mut x = serial.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }
}

fn algorithms() -> [(FingerprintAlgorithm, &'static str); 2] {
    [(FingerprintAlgorithm::Blake3, "blake3"), (FingerprintAlgorithm::Xxh3, "xxh3")]
}

fn open(dir: &std::path::Path, algorithm: FingerprintAlgorithm, cache_bytes: usize) -> Store {
    Store::open(dir, StoreOptions { block_size: Some(BS as u32), algorithm: Some(algorithm), cache_bytes, ..Default::default() }).expect("open store")
}

fn fingerprint_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("fingerprint");
    g.throughput(Throughput::Bytes(BS as u64));
    let mut block = vec![0u8; BS];
    unique_blocks(&mut block, &mut 1);
    for (alg, name) in algorithms() {
        g.bench_function(name, |b| b.iter(|| black_box(alg.fingerprint(black_box(&block)))));
    }
    g.finish();
}

/// The resemblance sketch delta would compute for each block (see `cas_store::resemblance`).
fn sketch_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("sketch");
    g.throughput(Throughput::Bytes(BS as u64));
    let mut block = vec![0u8; BS];
    unique_blocks(&mut block, &mut 1);
    g.bench_function("4k_block", |b| b.iter(|| black_box(cas_store::resemblance::sketch(black_box(&block)))));
    g.finish();
}

fn import(c: &mut Criterion) {
    let mut g = c.benchmark_group("import_4k_blocks");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    for (alg, name) in algorithms() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), alg, 64 << 20);
        let disk = store.create_disk("import", DISK).unwrap();
        let mut serial = 0u64;
        let mut offset = 0u64;
        let mut buf = vec![0u8; CHUNK];
        g.bench_function(name, |b| {
            b.iter(|| {
                unique_blocks(&mut buf, &mut serial);
                store.write(disk.id, offset, &buf, false).unwrap();
                offset = (offset + CHUNK as u64) % DISK;
            })
        });
    }
    g.finish();
}

fn read(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_1m");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    const SPAN: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), FingerprintAlgorithm::Blake3, 0);
        let disk = store.create_disk("read", SPAN).unwrap();
        let mut serial = 0;
        let mut buf = vec![0u8; CHUNK];
        for off in (0..SPAN).step_by(CHUNK) {
            unique_blocks(&mut buf, &mut serial);
            store.write(disk.id, off, &buf, false).unwrap();
        }
    }
    // Cold: no hot-block cache, every block comes from RocksDB (its own block cache and the
    // page cache still help, as they would in production). Warm: the hot set (64 MiB) fits in
    // the hot-block cache and was read once before measuring.
    for (name, cache, span) in [("cold_cache", 0usize, SPAN), ("warm_cache", 96 << 20, 64 << 20)] {
        let store = open(dir.path(), FingerprintAlgorithm::Blake3, cache);
        let disk = store.disk("read").unwrap();
        let mut buf = vec![0u8; CHUNK];
        for off in (0..span).step_by(CHUNK) {
            store.read(disk.id, off, &mut buf).unwrap();
        }
        let mut offset = 0;
        g.bench_function(name, |b| {
            b.iter(|| {
                store.read(disk.id, offset, &mut buf).unwrap();
                offset = (offset + CHUNK as u64) % span;
            })
        });
    }
    g.finish();
}

fn lookups(c: &mut Criterion) {
    let mut g = c.benchmark_group("has_many_batch_1024");
    const BATCH: usize = 1024;
    g.throughput(Throughput::Elements(BATCH as u64));
    // The fingerprints' index in RocksDB's memtable (a store that has just taken them), and in
    // its table files (the same store reopened: recovery flushes what the log replayed).
    let cases = algorithms().map(|(alg, name)| (alg, name.to_string(), false));
    for (alg, name, reopened) in cases.into_iter().chain([(FingerprintAlgorithm::Blake3, "blake3/tables".to_string(), true)]) {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path(), alg, 64 << 20);
        let disk = store.create_disk("lookup", 1 << 30).unwrap();
        let mut serial = 0;
        let mut buf = vec![0u8; CHUNK];
        let mut stored: Vec<Fingerprint> = Vec::new();
        // 64k stored blocks (256 MiB).
        for off in (0..(256u64 << 20)).step_by(CHUNK) {
            unique_blocks(&mut buf, &mut serial);
            store.write(disk.id, off, &buf, false).unwrap();
            stored.extend(buf.chunks(BS).map(|b| alg.fingerprint(b)));
        }
        if reopened {
            drop(store);
            store = open(dir.path(), alg, 64 << 20);
        }
        // Half of each batch is stored, half is not: a migration's typical mix.
        let mut absent_serial = 1u64 << 40;
        let mut i = 0usize;
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let mut batch = Vec::with_capacity(BATCH);
                    let mut block = vec![0u8; BS];
                    for k in 0..BATCH {
                        if k % 2 == 0 {
                            batch.push(stored[(i * 7919 + k * 104_729) % stored.len()]);
                        } else {
                            unique_blocks(&mut block, &mut absent_serial);
                            batch.push(alg.fingerprint(&block));
                        }
                    }
                    i += 1;
                    batch
                },
                |batch| {
                    let found = store.has_many(&batch).unwrap();
                    assert_eq!(found.iter().filter(|&&f| f).count(), BATCH / 2);
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    targets = fingerprint_only, sketch_only, import, read, lookups
}
criterion_main!(benches);
