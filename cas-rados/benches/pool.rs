//! The block store with its blocks in RocksDB and in RADOS, side by side in one run: import
//! throughput, batched fingerprint lookups, cold 4 KiB random reads, a migration into a second
//! server of the same datacentre, and deleting the source disk.
//!
//! `cargo bench -p cas-rados --bench pool` (bench.sh calls it). Needs the test cluster
//! (scripts/ceph-cluster.sh start); without one it prints the RocksDB rows and says why the
//! RADOS rows are missing. NBD_CAS_BENCH_MB sets the imported size (default 256 MiB),
//! NBD_CAS_BENCH_THREADS the writer and reader threads (default 4).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_rados::{RadosOptions, RadosPool};
use cas_store::pool::BlockPool;
use cas_store::{DiskId, Fingerprint, Store, StoreOptions};

const BS: usize = 4096;
const CHUNK: usize = 256 * BS;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Unique, incompressible-looking blocks numbered from `serial`.
fn unique_blocks(buf: &mut [u8], serial: u64) {
    for (i, block) in buf.chunks_mut(BS).enumerate() {
        let mut x = (serial + i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }
}

#[derive(Clone)]
enum Backend {
    Rocks,
    Rados(RadosOptions),
}

impl Backend {
    fn name(&self) -> &'static str {
        match self {
            Backend::Rocks => "rocksdb",
            Backend::Rados(_) => "rados",
        }
    }

    fn open(&self, dir: &std::path::Path, cache_bytes: usize) -> Store {
        let pool: Option<Arc<dyn BlockPool>> = match self {
            Backend::Rocks => None,
            Backend::Rados(o) => Some(Arc::new(RadosPool::connect(o).expect("connect"))),
        };
        Store::open(dir, StoreOptions { block_size: Some(BS as u32), cache_bytes, pool, ..Default::default() }).expect("open")
    }
}

fn row(backend: &str, what: &str, value: String) {
    println!("{backend:<8} {what:<52} {value}");
}

fn mib_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / t.as_secs_f64()
}

fn import(store: &Store, disk: DiskId, bytes: usize, threads: usize) -> Duration {
    let per_thread = bytes / threads / CHUNK * CHUNK;
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                let base = t * per_thread;
                for off in (0..per_thread).step_by(CHUNK) {
                    unique_blocks(&mut buf, ((base + off) / BS) as u64);
                    store.write(disk, (base + off) as u64, &buf, false).unwrap();
                }
            });
        }
    });
    store.flush().unwrap();
    started.elapsed()
}

fn bench(backend: &Backend, bytes: usize, threads: usize) {
    let name = backend.name();
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let blocks = bytes / BS;

    // Import through server A.
    let a = backend.open(dir_a.path(), 64 << 20);
    let disk = a.create_disk("vm", bytes as u64).unwrap();
    let t = import(&a, disk.id, bytes, threads);
    row(
        name,
        &format!("import, {threads} writers, {} MiB of unique 4 KiB blocks", bytes >> 20),
        format!("{:8.1} MiB/s  ({:.0} blocks/s)", mib_s(bytes as u64, t), blocks as f64 / t.as_secs_f64()),
    );

    // Batched lookups: batches of 1024, half of them stored.
    let stored: Vec<Fingerprint> = a.map_snapshot(disk.id).unwrap().map(|e| e.unwrap().1).collect();
    let mut absent_block = vec![0u8; BS];
    let mut n = 0u64;
    let started = Instant::now();
    let mut i = 0usize;
    while started.elapsed() < Duration::from_secs(2) {
        let batch: Vec<Fingerprint> = (0..1024)
            .map(|k| {
                if k % 2 == 0 {
                    stored[(i * 7919 + k * 104_729) % stored.len()]
                } else {
                    unique_blocks(&mut absent_block, (1 << 40) + (i * 1024 + k) as u64);
                    a.fingerprint(&absent_block)
                }
            })
            .collect();
        let found = a.has_many(&batch).unwrap();
        assert_eq!(found.iter().filter(|&&f| f).count(), 512);
        n += 1024;
        i += 1;
    }
    row(name, "has_many, batches of 1024 (half stored)", format!("{:8.0} lookups/s", n as f64 / started.elapsed().as_secs_f64()));
    drop(a);

    // Cold random 4 KiB reads: no hot-block cache, a fresh open.
    let a = backend.open(dir_a.path(), 0);
    let reads = AtomicU64::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads * 2 {
            let (a, reads) = (&a, &reads);
            s.spawn(move || {
                let mut buf = vec![0u8; BS];
                let mut x = 0x1234_5678u64 + t as u64;
                while started.elapsed() < Duration::from_secs(3) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    a.read(disk.id, (x % blocks as u64) * BS as u64, &mut buf).unwrap();
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    row(
        name,
        &format!("random 4 KiB reads, {} readers, cold cache", threads * 2),
        format!("{:8.0} IOPS", reads.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()),
    );

    // Migration into server B of the same datacentre: fingerprints first, map what B has,
    // copy the rest (with RocksDB every server has its own blocks, so everything is copied).
    let b = backend.open(dir_b.path(), 64 << 20);
    let db = b.create_disk("vm", bytes as u64).unwrap();
    let started = Instant::now();
    let mut snapshot = a.map_snapshot(disk.id).unwrap();
    let (mut mapped, mut copied) = (0usize, 0usize);
    loop {
        let batch = snapshot.next_batch(1024).unwrap();
        if batch.is_empty() {
            break;
        }
        let fps: Vec<Fingerprint> = batch.iter().map(|e| e.1).collect();
        let have = b.has_many(&fps).unwrap();
        let present: Vec<(u64, Fingerprint)> = batch.iter().zip(&have).filter(|(_, h)| **h).map(|(e, _)| *e).collect();
        mapped += b.map_existing(db.id, &present).unwrap().iter().filter(|m| **m).count();
        let absent: Vec<(u64, Fingerprint)> = batch.iter().zip(&have).filter(|(_, h)| !**h).map(|(e, _)| *e).collect();
        let datas = a.get_blocks(&absent.iter().map(|e| e.1).collect::<Vec<_>>()).unwrap();
        for ((block, _), data) in absent.iter().zip(datas) {
            b.write(db.id, block * BS as u64, &data.unwrap(), false).unwrap();
            copied += 1;
        }
    }
    b.flush().unwrap();
    let t = started.elapsed();
    row(
        name,
        &format!("migrate {} MiB into a second server", bytes >> 20),
        format!("{:8.1} MiB/s  ({:.2} s; {} blocks mapped, {} MiB of blocks copied)", mib_s(bytes as u64, t), t.as_secs_f64(), mapped, (copied * BS) >> 20),
    );

    // Delete on A (B keeps every block), then on B (the blocks go).
    let started = Instant::now();
    a.delete_disk("vm").unwrap();
    let ta = started.elapsed();
    let started = Instant::now();
    b.delete_disk("vm").unwrap();
    let tb = started.elapsed();
    row(name, "delete the source disk / the last disk using the blocks", format!("{:8.2} s / {:.2} s", ta.as_secs_f64(), tb.as_secs_f64()));
}

fn main() {
    // `cargo bench` passes --bench; nothing else is understood.
    let bytes = env_usize("NBD_CAS_BENCH_MB", 256) << 20;
    let threads = env_usize("NBD_CAS_BENCH_THREADS", 4).max(1);
    let conf = std::env::var("NBD_CAS_CEPH_CONF").unwrap_or_else(|_| "/var/tmp/nbd-cas-ceph/ceph.conf".into());
    let pool = std::env::var("NBD_CAS_CEPH_POOL").unwrap_or_else(|_| "nbd-cas".into());
    let mut rados = RadosOptions::new(conf, pool);
    rados.namespace = format!("bench-{}", std::process::id());
    rados.connect_timeout = Duration::from_secs(5);
    println!("{:<8} {:<52} value  (2 cores shared by client and cluster)", "blocks", "what");
    bench(&Backend::Rocks, bytes, threads);
    match RadosPool::connect(&rados) {
        Ok(_) => bench(&Backend::Rados(rados), bytes, threads),
        Err(e) => println!("rados    (not measured: {e}; start scripts/ceph-cluster.sh)"),
    }
}
