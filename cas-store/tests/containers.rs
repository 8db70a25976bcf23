//! Blocks in containers: compaction gives space back and keeps every byte, a store of the
//! previous format (blocks inside RocksDB) is refused with the command that converts it, and
//! the conversion keeps every byte.

use cas_store::engine::{Cf, KvEngine, RocksEngine, WriteBatch};
use cas_store::{Store, StoreError, StoreOptions, CONTAINERS_DIR};

mod common;
use common::blocks::{unique, BS};

fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[test]
fn compaction_returns_the_space_of_deleted_disks_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    // 64 blocks per container; two disks written interleaved, so every container mixes them.
    let opts = StoreOptions { block_size: Some(BS as u32), container_bytes: 64 * BS as u64, ..Default::default() };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let gone = store.create_disk("gone", 4 << 20).unwrap();
    let kept = store.create_disk("kept", 4 << 20).unwrap();
    let gone_data = unique(1, 1024);
    let kept_data = unique(2, 256);
    for i in 0..256 {
        store.write(gone.id, (4 * i * BS) as u64, &gone_data[4 * i * BS..(4 * i + 4) * BS], false).unwrap();
        store.write(kept.id, (i * BS) as u64, &kept_data[i * BS..(i + 1) * BS], false).unwrap();
    }
    store.flush().unwrap();
    let containers = dir.path().join(CONTAINERS_DIR);
    let before = dir_bytes(&containers);
    assert_eq!(before, (1280 * BS) as u64);
    let stats = store.stats().unwrap();
    assert_eq!(stats.container_bytes, Some(before));
    assert_eq!(stats.reclaimable_bytes, 0);

    store.delete_disk("gone").unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.reclaimable_bytes, (1024 * BS) as u64, "the deleted disk's blocks are dead slots until compaction");
    let report = store.compact(0.5).unwrap();
    let after = dir_bytes(&containers);
    let freed = before - after;
    assert!(freed as f64 >= 0.75 * (1024 * BS) as f64, "one pass freed {freed} of {} bytes: {report:?}", 1024 * BS);
    assert!(report.containers_rewritten > 0 && report.blocks_moved > 0, "{report:?}");

    // Every byte of the kept disk reads back, through stale hints and after a reopen.
    let mut buf = vec![0u8; 256 * BS];
    store.read(kept.id, 0, &mut buf).unwrap();
    assert!(buf == kept_data);
    assert!(store.fsck(true).unwrap().is_clean());
    // Writes go on, dedupe against moved blocks, and the next pass has nothing to do.
    let k2 = store.create_disk("copy", 1 << 20).unwrap();
    store.write(k2.id, 0, &kept_data[..256 * BS], true).unwrap();
    assert_eq!(store.stats().unwrap().stored_blocks, 256);
    drop(store);
    let store = Store::open(dir.path(), opts).unwrap();
    let mut buf = vec![0u8; 256 * BS];
    store.read(store.disk("kept").unwrap().id, 0, &mut buf).unwrap();
    assert!(buf == kept_data);
    let report = store.fsck(true).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.verified_blocks, 256);
}

/// A pass stopped (as by a crash) after every entry names the copies but before the old
/// containers go: map entries still hint at the old copies, which are valid (they hold the
/// same bytes) until the next pass deletes their containers. The durability test's kills
/// land there too.
#[test]
fn a_pass_interrupted_before_it_deletes_leaves_valid_stale_hints_that_the_next_pass_clears() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { block_size: Some(BS as u32), container_bytes: 64 * BS as u64, ..Default::default() };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let gone = store.create_disk("gone", 1 << 20).unwrap();
    let kept = store.create_disk("kept", 1 << 20).unwrap();
    let (gone_data, kept_data) = (unique(3, 128), unique(4, 128));
    for i in 0..128 {
        store.write(gone.id, (i * BS) as u64, &gone_data[i * BS..(i + 1) * BS], false).unwrap();
        store.write(kept.id, (i * BS) as u64, &kept_data[i * BS..(i + 1) * BS], false).unwrap();
    }
    store.delete_disk("gone").unwrap();
    let report = store.compact_interrupted(0.75, cas_store::CompactionStop::BeforeDelete).unwrap();
    assert!(report.blocks_moved > 0, "{report:?}");
    drop(store);

    let store = Store::open(dir.path(), opts).unwrap();
    let mut buf = vec![0u8; 128 * BS];
    store.read(kept.id, 0, &mut buf).unwrap();
    assert!(buf == kept_data, "read through the stale hints");
    let report = store.fsck(false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert!(report.stale_hints > 0, "{report:?}");
    store.compact(0.75).unwrap();
    let report = store.fsck(true).unwrap();
    assert!(report.is_clean() && report.stale_hints == 0, "{report:?}");
    store.read(kept.id, 0, &mut buf).unwrap();
    assert!(buf == kept_data);
}

/// Writes what a build of format 1 left: blocks as values of the `blocks` column family.
fn make_format_1_store(path: &std::path::Path, blocks: &[u8]) {
    let engine = RocksEngine::open(path, &Default::default()).unwrap();
    let mut batch = WriteBatch::new();
    batch.put(Cf::Meta, b"config".to_vec(), br#"{"format_version":1,"block_size":4096,"algorithm":"blake3-128"}"#.to_vec());
    batch.put(Cf::Meta, b"next-disk-id".to_vec(), 2u64.to_le_bytes().to_vec());
    batch.put(Cf::Disks, b"old".to_vec(), br#"{"id":1,"size":1048576}"#.to_vec());
    let alg = cas_store::FingerprintAlgorithm::Blake3;
    for (i, block) in blocks.chunks(BS).enumerate() {
        let fp = alg.fingerprint(block);
        let mut key = 1u64.to_be_bytes().to_vec();
        key.extend_from_slice(&(i as u64).to_be_bytes());
        batch.put(Cf::Maps, key, fp.0.to_vec());
        batch.put(Cf::Refs, fp.0.to_vec(), 1u64.to_le_bytes().to_vec());
        batch.put(Cf::Blocks, fp.0.to_vec(), block.to_vec());
    }
    engine.write(batch).unwrap();
    engine.sync().unwrap();
}

#[test]
fn a_store_of_the_previous_format_is_refused_then_converted() {
    let dir = tempfile::tempdir().unwrap();
    let data = unique(7, 40);
    make_format_1_store(dir.path(), &data);
    let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
    assert!(matches!(err, StoreError::FormatUpgrade { found: 1, current: 3, .. }), "{err}");
    assert!(err.to_string().contains("cas upgrade --store"), "{err}");

    let report = Store::upgrade(dir.path(), &StoreOptions::default()).unwrap();
    assert_eq!((report.from_format, report.to_format, report.blocks_moved), (1, 3, 40));
    // Converting again is a no-op.
    assert_eq!(Store::upgrade(dir.path(), &StoreOptions::default()).unwrap().blocks_moved, 0);

    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let disk = store.disk("old").unwrap();
    let mut buf = vec![0u8; data.len()];
    store.read(disk.id, 0, &mut buf).unwrap();
    assert!(buf == data, "converted bytes differ");
    let report = store.fsck(true).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.verified_blocks, 40);
    // The disk stays writable, and rewritten blocks gain location hints.
    store.write(disk.id, 0, &unique(8, 2), true).unwrap();
    assert!(store.fsck(true).unwrap().is_clean());
}
