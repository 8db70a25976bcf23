//! Stores whose blocks are in an external pool shared with other stores (storage servers of
//! one datacentre), on the in-memory pool with Ceph `cas` semantics: sharing, deletes that
//! never free a neighbour's block, crash ordering, leaks and their repair.

use std::sync::Arc;

use cas_store::engine::MemEngine;
use cas_store::{FingerprintAlgorithm, MemPool, Store, StoreError, StoreOptions};

fn opts(pool: &Arc<MemPool>, block_size: u32) -> StoreOptions {
    StoreOptions { block_size: Some(block_size), pool: Some(pool.clone()), ..Default::default() }
}

fn server(pool: &Arc<MemPool>) -> (Arc<MemEngine>, Store) {
    let engine = Arc::new(MemEngine::new());
    let store = Store::with_engine(engine.clone(), opts(pool, 4096)).unwrap();
    (engine, store)
}

/// Pseudo-random bytes: distinct blocks for distinct seeds and offsets.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ u64::from(seed).wrapping_mul(0xA24B_AED4_963E_E407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn assert_clean(s: &Store) {
    let report = s.fsck(true).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn servers_share_blocks_and_deletes_never_free_a_neighbours_block() {
    let pool = Arc::new(MemPool::new());
    let (_, a) = server(&pool);
    let (_, b) = server(&pool);
    assert_ne!(a.pool_holder(), b.pool_holder());
    assert_eq!(a.block_pool(), "memory");
    let data = pattern(1, 16 * 4096);
    let da = a.create_disk("vm", 16 * 4096).unwrap();
    a.write(da.id, 0, &data, false).unwrap();
    assert_eq!(pool.len(), 16);

    // Migration into B: only fingerprints cross; B maps what the pool already holds.
    let entries: Vec<(u64, cas_store::Fingerprint)> = a.map_snapshot(da.id).unwrap().map(|e| e.unwrap()).collect();
    let fps: Vec<_> = entries.iter().map(|e| e.1).collect();
    assert!(b.has_many(&fps).unwrap().iter().all(|&h| h), "A's blocks are B's neighbours");
    let db = b.create_disk("vm", 16 * 4096).unwrap();
    assert!(b.map_existing(db.id, &entries).unwrap().iter().all(|&m| m));
    assert_eq!(pool.len(), 16, "nothing was copied");

    a.delete_disk("vm").unwrap();
    let mut buf = vec![0u8; data.len()];
    b.read(db.id, 0, &mut buf).unwrap();
    assert_eq!(buf, data, "B still reads every block after A deleted its disk");
    assert_eq!(pool.len(), 16);
    assert_clean(&a);
    assert_clean(&b);
    assert_eq!(a.stats().unwrap().stored_blocks, 0);
    assert_eq!(b.stats().unwrap().stored_blocks, 16);

    // B overwrites half and deletes: the pool ends empty.
    b.write(db.id, 0, &pattern(2, 8 * 4096), false).unwrap();
    assert_eq!(pool.len(), 16, "B was the last holder of the 8 blocks it overwrote");
    b.delete_disk("vm").unwrap();
    assert_eq!(pool.len(), 0);
    assert_clean(&b);
}

#[test]
fn dedupe_inside_one_server_takes_one_pool_reference() {
    let pool = Arc::new(MemPool::new());
    let (_, a) = server(&pool);
    let d = a.create_disk("d", 64 * 4096).unwrap();
    let block = pattern(7, 4096);
    for i in 0..10 {
        a.write(d.id, i * 4096, &block, false).unwrap();
    }
    let fp = a.fingerprint(&block);
    use cas_store::BlockPool;
    assert_eq!(pool.holder_refs(a.pool_holder().unwrap(), &[fp]).unwrap(), vec![Some(1)]);
    a.write_zeroes(d.id, 0, 9 * 4096, false).unwrap();
    assert_eq!(pool.len(), 1);
    a.write_zeroes(d.id, 9 * 4096, 4096, false).unwrap();
    assert_eq!(pool.len(), 0);
    assert_clean(&a);
}

#[test]
fn a_failed_release_leaks_and_the_next_open_gives_it_back() {
    let pool = Arc::new(MemPool::new());
    let (engine, a) = server(&pool);
    let d = a.create_disk("d", 8 * 4096).unwrap();
    a.write(d.id, 0, &pattern(1, 4 * 4096), false).unwrap();
    // The commit succeeds; the release after it fails (a crash or a lost connection).
    pool.fail_next_releases(1);
    a.write(d.id, 0, &pattern(2, 4 * 4096), false).unwrap();
    let mut buf = vec![0u8; 4 * 4096];
    a.read(d.id, 0, &mut buf).unwrap();
    assert_eq!(buf, pattern(2, 4 * 4096));
    assert_eq!(pool.len(), 8, "the old blocks leaked");
    let report = a.fsck(true).unwrap();
    assert!(report.problems.iter().any(|p| p.contains("leaked")), "{:?}", report.problems);
    assert!(report.problems.iter().any(|p| p.contains("interrupted")), "{:?}", report.problems);
    drop(a);
    let a = Store::with_engine(engine, opts(&pool, 4096)).unwrap();
    assert_eq!(pool.len(), 4, "reopening reconciled the recorded intents");
    assert_clean(&a);
}

#[test]
fn a_lost_acquire_reply_fails_the_write_and_repair_finds_the_leak() {
    let pool = Arc::new(MemPool::new());
    let (_, a) = server(&pool);
    let d = a.create_disk("d", 8 * 4096).unwrap();
    pool.lose_next_acquire_replies(1);
    assert!(a.write(d.id, 0, &pattern(3, 2 * 4096), false).is_err());
    let mut buf = vec![1u8; 2 * 4096];
    a.read(d.id, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "the failed write mapped nothing");
    assert_eq!(pool.len(), 2, "the pool applied the claims whose reply was lost");
    assert!(!a.fsck(false).unwrap().is_clean());
    let repair = a.repair_references(true).unwrap();
    assert_eq!(repair.released, 2);
    assert_eq!(pool.len(), 0);
    assert_clean(&a);
    // And the store works on.
    a.write(d.id, 0, &pattern(3, 2 * 4096), false).unwrap();
    assert_eq!(pool.len(), 2);
    assert_clean(&a);
}

#[test]
fn reopening_with_another_pool_is_refused() {
    let pool = Arc::new(MemPool::new());
    let (engine, a) = server(&pool);
    drop(a);
    let err = Store::with_engine(engine.clone(), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::ConfigMismatch { setting: "block pool", .. }), "{err}");
    assert!(err.to_string().contains("memory"), "{err}");
    // A local store refuses an external pool.
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let err = Store::open(dir.path(), opts(&pool, 4096)).unwrap_err();
    assert!(matches!(err, StoreError::ConfigMismatch { setting: "block pool", .. }), "{err}");
    // Stores with other settings cannot share a pool.
    let err = Store::with_engine(Arc::new(MemEngine::new()), opts(&pool, 512)).unwrap_err();
    assert!(matches!(err, StoreError::ConfigMismatch { .. }), "{err}");
    Store::with_engine(engine, opts(&pool, 4096)).unwrap();
}

#[test]
fn collisions_across_servers_are_refused() {
    let pool = Arc::new(MemPool::new());
    let weak = |pool: &Arc<MemPool>| {
        let o = StoreOptions { algorithm: Some(FingerprintAlgorithm::TestWeak), ..opts(pool, 512) };
        Store::with_engine(Arc::new(MemEngine::new()), o).unwrap()
    };
    let (a, b) = (weak(&pool), weak(&pool));
    let mut one = vec![5u8; 512];
    let mut two = vec![5u8; 512];
    one[100] = 1;
    two[100] = 2;
    let da = a.create_disk("d", 4096).unwrap();
    let db = b.create_disk("d", 4096).unwrap();
    a.write(da.id, 0, &one, false).unwrap();
    let err = b.write(db.id, 0, &two, false).unwrap_err();
    assert!(matches!(err, StoreError::Collision(_)), "{err}");
    let mut buf = vec![0u8; 512];
    b.read(db.id, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));
    a.read(da.id, 0, &mut buf).unwrap();
    assert_eq!(buf, one);
    assert_eq!(pool.len(), 1);
    assert_clean(&a);
    assert_clean(&b);
}
