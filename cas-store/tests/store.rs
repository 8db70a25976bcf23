//! Behaviour of the store, on both engines.

use std::sync::Arc;

use cas_store::engine::{Cf, KvEngine, MemEngine, WriteBatch};
use cas_store::{FingerprintAlgorithm, Store, StoreError, StoreOptions};

fn opts(block_size: u32) -> StoreOptions {
    StoreOptions { block_size: Some(block_size), ..StoreOptions::default() }
}

/// Runs `f` against a RocksDB store and an in-memory one.
fn both(block_size: u32, f: impl Fn(&Store)) {
    let dir = tempfile::tempdir().unwrap();
    f(&Store::open(dir.path(), opts(block_size)).unwrap());
    f(&Store::open_in_memory(opts(block_size)).unwrap());
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8) | 1).collect()
}

#[test]
fn write_read_unaligned_and_dedupe() {
    both(4096, |s| {
        let a = s.create_disk("a", 1 << 20).unwrap();
        let b = s.create_disk("b", 1 << 20).unwrap();
        let data = pattern(3, 3 * 4096);
        s.write(a.id, 4096, &data, false).unwrap();
        s.write(b.id, 0, &data, false).unwrap();
        // Unaligned write across a block boundary.
        s.write(a.id, 4096 * 2 - 100, &[0xee; 300], false).unwrap();
        let mut buf = vec![0u8; 5 * 4096];
        s.read(a.id, 0, &mut buf).unwrap();
        let mut expect = vec![0u8; 5 * 4096];
        expect[4096..4 * 4096].copy_from_slice(&data);
        expect[8092..8392].fill(0xee);
        assert_eq!(buf, expect);
        // Unaligned read.
        let mut small = vec![0u8; 10];
        s.read(a.id, 8090, &mut small).unwrap();
        assert_eq!(small, expect[8090..8100]);

        let st = s.stats().unwrap();
        assert_eq!(st.allocated_bytes, 6 * 4096);
        // Disk b shares two of its three blocks with a (a's middle two were modified).
        assert_eq!(st.stored_blocks, 5);
        assert!(st.dedupe_ratio > 1.0);
        assert!(s.fsck(true).unwrap().is_clean());
        let sb = s.disk_stats("b").unwrap();
        assert_eq!(sb.allocated_bytes, 3 * 4096);
        assert_eq!(sb.exclusive_bytes, 2 * 4096);
        assert_eq!(sb.shared_bytes, 4096);
    });
}

#[test]
fn zero_blocks_are_holes_and_status_reports_them() {
    both(4096, |s| {
        let d = s.create_disk("d", 64 * 4096).unwrap();
        s.write(d.id, 0, &pattern(1, 8 * 4096), false).unwrap();
        s.write(d.id, 8 * 4096, &vec![0u8; 4096], false).unwrap(); // zeros: not stored
        assert_eq!(s.stats().unwrap().allocated_bytes, 8 * 4096);
        s.write_zeroes(d.id, 4096, 2 * 4096, false).unwrap();
        s.trim(d.id, 5 * 4096 + 10, 4096 - 10, false).unwrap(); // partial: stays allocated
        let ext = s.block_status(d.id, 0, 10 * 4096).unwrap();
        let runs: Vec<(u64, u64, bool)> = ext.iter().map(|e| (e.offset, e.length, e.allocated)).collect();
        assert_eq!(runs, vec![(0, 4096, true), (4096, 8192, false), (12288, 5 * 4096, true), (8 * 4096, 2 * 4096, false)]);
        let clipped = s.block_status(d.id, 100, 4096).unwrap();
        assert_eq!(clipped[0].offset, 100);
        assert_eq!(clipped.iter().map(|e| e.length).sum::<u64>(), 4096);
        let mut buf = vec![1u8; 4096];
        s.read(d.id, 5 * 4096, &mut buf).unwrap();
        assert!(buf[10..].iter().all(|&b| b == 0));
        assert_eq!(buf[..10], pattern(1, 8 * 4096)[5 * 4096..5 * 4096 + 10]);
        assert!(s.fsck(true).unwrap().is_clean());
    });
}

#[test]
fn range_checks_and_bad_arguments() {
    both(4096, |s| {
        let d = s.create_disk("d", 8192).unwrap();
        let mut buf = vec![0u8; 10];
        assert!(matches!(s.read(d.id, 8190, &mut buf), Err(StoreError::OutOfRange { .. })));
        assert!(matches!(s.write(d.id, u64::MAX - 2, &buf, false), Err(StoreError::OutOfRange { .. })));
        assert!(matches!(s.write_zeroes(d.id, 0, 8193, false), Err(StoreError::OutOfRange { .. })));
        assert!(matches!(s.create_disk("d", 512), Err(StoreError::DiskExists(_))));
        assert!(matches!(s.create_disk("x", 1000), Err(StoreError::InvalidArgument(_))));
        assert!(matches!(s.create_disk("bad/name", 512), Err(StoreError::InvalidArgument(_))));
        assert!(matches!(s.disk("nope"), Err(StoreError::DiskNotFound(_))));
        s.read(d.id, 8192, &mut []).unwrap();
    });
}

#[test]
fn delete_releases_references_and_ids_are_not_reused() {
    both(512, |s| {
        let a = s.create_disk("a", 64 * 512).unwrap();
        let b = s.create_disk("b", 64 * 512).unwrap();
        let shared = pattern(9, 16 * 512);
        s.write(a.id, 0, &shared, false).unwrap();
        s.write(b.id, 0, &shared, false).unwrap();
        s.write(a.id, 16 * 512, &pattern(10, 16 * 512), false).unwrap();
        assert_eq!(s.stats().unwrap().stored_blocks, 32);
        s.delete_disk("a").unwrap();
        let st = s.stats().unwrap();
        assert_eq!(st.stored_blocks, 16, "blocks only `a` used are gone, shared ones stay");
        assert_eq!(st.allocated_bytes, 16 * 512);
        let mut buf = vec![0u8; 16 * 512];
        s.read(b.id, 0, &mut buf).unwrap();
        assert_eq!(buf, shared);
        assert!(s.read(a.id, 0, &mut buf).is_err(), "a stale id must not reach anything");
        let a2 = s.create_disk("a", 512).unwrap();
        assert_ne!(a2.id, a.id);
        assert!(s.fsck(true).unwrap().is_clean());
        assert!(matches!(s.delete_disk("a-missing"), Err(StoreError::DiskNotFound(_))));
    });
}

#[test]
fn resize_and_rename() {
    both(4096, |s| {
        let d = s.create_disk("d", 4 * 4096).unwrap();
        s.write(d.id, 0, &pattern(4, 4 * 4096), false).unwrap();
        s.resize_disk("d", 4096 + 512).unwrap();
        assert_eq!(s.disk_size(d.id).unwrap(), 4096 + 512);
        s.resize_disk("d", 4 * 4096).unwrap();
        let mut buf = vec![0u8; 4 * 4096];
        s.read(d.id, 0, &mut buf).unwrap();
        let mut expect = pattern(4, 4 * 4096);
        expect[4096 + 512..].fill(0);
        assert_eq!(buf, expect, "shrinking discards the tail; growing again reads zeros");
        s.rename_disk("d", "e").unwrap();
        assert!(s.disk("d").is_err());
        assert_eq!(s.disk("e").unwrap().id, d.id);
        s.create_disk("f", 512).unwrap();
        assert!(matches!(s.rename_disk("e", "f"), Err(StoreError::DiskExists(_))));
        assert_eq!(s.list_disks().unwrap().iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["e", "f"]);
        assert!(s.fsck(true).unwrap().is_clean());
    });
}

#[test]
fn reopen_keeps_data_and_refuses_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(7, 3 * 8192);
    {
        let s = Store::open(dir.path(), StoreOptions { block_size: Some(8192), algorithm: Some(FingerprintAlgorithm::Xxh3), ..Default::default() }).unwrap();
        let d = s.create_disk("d", 1 << 20).unwrap();
        s.write(d.id, 100, &data, true).unwrap();
    }
    let err = Store::open(dir.path(), opts(4096)).unwrap_err();
    assert!(matches!(err, StoreError::ConfigMismatch { setting: "block size", .. }), "{err}");
    let err = Store::open(dir.path(), StoreOptions { algorithm: Some(FingerprintAlgorithm::Blake3), ..Default::default() }).unwrap_err();
    assert!(err.to_string().contains("fingerprint algorithm"), "{err}");
    let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert_eq!(s.block_size(), 8192);
    assert_eq!(s.algorithm(), FingerprintAlgorithm::Xxh3);
    let d = s.disk("d").unwrap();
    let mut buf = vec![0u8; data.len()];
    s.read(d.id, 100, &mut buf).unwrap();
    assert_eq!(buf, data);
    for bad in [0, 256, 1000, 131072] {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(Store::open(dir.path(), opts(bad)), Err(StoreError::InvalidArgument(_))));
    }
}

#[test]
fn collisions_are_refused_loudly() {
    both(512, |_| {});
    let make = || Store::open_in_memory(StoreOptions { block_size: Some(512), algorithm: Some(FingerprintAlgorithm::TestWeak), ..Default::default() }).unwrap();
    // TestWeak hashes only the first 16 bytes: these two blocks collide.
    let mut one = vec![5u8; 512];
    let mut two = vec![5u8; 512];
    one[100] = 1;
    two[100] = 2;
    let s = make();
    let d = s.create_disk("d", 4096).unwrap();
    s.write(d.id, 0, &one, false).unwrap();
    let err = s.write(d.id, 512, &two, false).unwrap_err();
    assert!(matches!(err, StoreError::Collision(_)), "{err}");
    let mut buf = vec![0u8; 1024];
    s.read(d.id, 0, &mut buf).unwrap();
    assert_eq!(&buf[..512], &one[..]);
    assert!(buf[512..].iter().all(|&b| b == 0), "the refused write changed nothing");
    // Two colliding blocks inside one request are caught too.
    let mut both_blocks = one.clone();
    both_blocks.extend_from_slice(&two);
    let s = make();
    let d = s.create_disk("d", 4096).unwrap();
    assert!(matches!(s.write(d.id, 0, &both_blocks, false), Err(StoreError::Collision(_))));
    assert!(s.fsck(true).unwrap().is_clean());
}

#[test]
fn dirty_tracking_and_snapshots() {
    both(4096, |s| {
        let d = s.create_disk("d", 32 * 4096).unwrap();
        s.write(d.id, 0, &pattern(1, 4 * 4096), false).unwrap();
        assert!(s.dirty_take(d.id).is_err(), "not tracking yet");
        s.dirty_start(d.id).unwrap();
        let snap = s.map_snapshot(d.id).unwrap();
        s.write(d.id, 2 * 4096, &pattern(2, 4096), false).unwrap();
        s.write(d.id, 10 * 4096 + 1, &[1, 2, 3], false).unwrap();
        s.write(d.id, 0, &pattern(1, 4096), false).unwrap(); // same content: not dirty
        s.write_zeroes(d.id, 3 * 4096, 4096, false).unwrap();
        let entries: Vec<_> = snap.map(|e| e.unwrap()).collect();
        assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), vec![0, 1, 2, 3], "the snapshot does not see later writes");
        let fp0 = s.fingerprint(&pattern(1, 4 * 4096)[..4096]);
        assert_eq!(entries[0].1, fp0);
        let dirty = s.dirty_take(d.id).unwrap();
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![2, 3, 10]);
        assert!(s.dirty_take(d.id).unwrap().is_empty(), "take clears");
        let fps = s.block_fingerprints(d.id, &[0, 3, 10]).unwrap();
        assert_eq!(fps[0], Some(fp0));
        assert_eq!(fps[1], None);
        assert!(fps[2].is_some());
        s.dirty_stop(d.id).unwrap();
        assert!(s.dirty_take(d.id).is_err());
    });
}

#[test]
fn has_many_and_map_existing() {
    both(4096, |s| {
        let a = s.create_disk("a", 16 * 4096).unwrap();
        let b = s.create_disk("b", 16 * 4096).unwrap();
        let data = pattern(5, 2 * 4096);
        s.write(a.id, 0, &data, false).unwrap();
        let fp0 = s.fingerprint(&data[..4096]);
        let fp1 = s.fingerprint(&data[4096..]);
        let absent = s.fingerprint(&pattern(6, 4096));
        assert_eq!(s.has_many(&[fp0, absent, fp1]).unwrap(), vec![true, false, true]);
        assert_eq!(&s.get_block(&fp1).unwrap().unwrap()[..], &data[4096..]);
        assert!(s.get_block(&absent).unwrap().is_none());
        let applied = s.map_existing(b.id, &[(3, fp1), (4, absent), (5, fp0)]).unwrap();
        assert_eq!(applied, vec![true, false, true]);
        let mut buf = vec![0u8; 4096];
        s.read(b.id, 3 * 4096, &mut buf).unwrap();
        assert_eq!(buf, data[4096..]);
        s.read(b.id, 4 * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0));
        assert!(s.map_existing(b.id, &[(16, fp0)]).is_err(), "past the end");
        // fp0 is used by a's block 0 and b's block 5, fp1 by a's 1 and b's 3.
        s.map_existing(b.id, &[(6, fp0)]).unwrap();
        assert_eq!(s.reference_counts(&[fp0, absent, fp1]).unwrap(), vec![Some(3), None, Some(2)]);
        assert!(s.fsck(true).unwrap().is_clean());
        assert_eq!(s.stats().unwrap().stored_blocks, 2);
    });
}

/// A block named twice in one call takes its last update, and counts one reference (a gang
/// member restarted by its source once listed a block twice and leaked a reference per block).
#[test]
fn a_block_named_twice_in_one_call_counts_one_reference() {
    both(4096, |s| {
        let a = s.create_disk("a", 16 * 4096).unwrap();
        let b = s.create_disk("b", 16 * 4096).unwrap();
        let data = pattern(7, 2 * 4096);
        s.write(a.id, 0, &data, false).unwrap();
        let (fp0, fp1) = (s.fingerprint(&data[..4096]), s.fingerprint(&data[4096..]));
        let applied = s.map_existing(b.id, &[(3, fp0), (4, fp1), (3, fp0), (5, fp0), (5, fp1)]).unwrap();
        assert_eq!(applied, vec![true; 5]);
        assert_eq!(s.reference_counts(&[fp0, fp1]).unwrap(), vec![Some(2), Some(3)]);
        let mut buf = vec![0u8; 4096];
        s.read(b.id, 5 * 4096, &mut buf).unwrap();
        assert_eq!(buf, data[4096..], "the last update of block 5 wins");
        let other = pattern(9, 4096);
        let fp2 = s.fingerprint(&other);
        s.write_verified_blocks(b.id, &[(6, fp2, &other[..]), (6, fp2, &other[..])]).unwrap();
        assert_eq!(s.reference_counts(&[fp2]).unwrap(), vec![Some(1)]);
        assert!(s.fsck(true).unwrap().is_clean());
    });
}

#[test]
fn verified_blocks_written_at_scattered_places_in_one_call() {
    both(4096, |s| {
        let d = s.create_disk("d", 600 * 4096).unwrap();
        // More than one commit's worth, scattered, over blocks already written (replaced)
        // and a zero block (a hole, not stored).
        s.write(d.id, 7 * 4096, &pattern(1, 4096), false).unwrap();
        let blocks: Vec<(u64, Vec<u8>)> = (0..300u64).map(|i| (i * 2 + 1, pattern((i % 200) as u8 + 2, 4096))).chain([(598, vec![0u8; 4096])]).collect();
        let fps: Vec<_> = blocks.iter().map(|(_, b)| s.fingerprint(b)).collect();
        let writes: Vec<(u64, cas_store::Fingerprint, &[u8])> = blocks.iter().zip(&fps).map(|((n, b), fp)| (*n, *fp, &b[..])).collect();
        s.write_verified_blocks(d.id, &writes).unwrap();
        let mut buf = vec![0u8; 4096];
        for (n, b) in &blocks {
            s.read(d.id, n * 4096, &mut buf).unwrap();
            assert_eq!(&buf, b, "block {n}");
        }
        s.read(d.id, 2 * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0), "untouched blocks stay holes");
        assert!(s.fsck(true).unwrap().is_clean());
        assert_eq!(s.stats().unwrap().stored_blocks, 200, "200 distinct contents, block 7's old one released");
        let short = [(0u64, fps[0], &blocks[0].1[..100])];
        assert!(matches!(s.write_verified_blocks(d.id, &short), Err(StoreError::InvalidArgument(_))));
        let past = [(600u64, fps[0], &blocks[0].1[..])];
        assert!(s.write_verified_blocks(d.id, &past).is_err(), "past the end");
    });
}

#[test]
fn concurrent_writers_on_shared_blocks_keep_counts_exact() {
    both(512, |s| {
        let disks: Vec<_> = (0..4).map(|i| s.create_disk(&format!("d{i}"), 64 * 512).unwrap()).collect();
        std::thread::scope(|scope| {
            for (t, d) in disks.iter().enumerate() {
                scope.spawn(move || {
                    for round in 0..200u32 {
                        // Unaligned writes of a few shared contents, so threads race on the
                        // same fingerprints and each on its own blocks' read-modify-write.
                        let seed = (round % 5) as u8;
                        let off = u64::from((round * 37 + t as u32 * 11) % (60 * 512));
                        s.write(d.id, off, &pattern(seed, 700), false).unwrap();
                        if round % 7 == 0 {
                            s.write_zeroes(d.id, off / 2, 900, false).unwrap();
                        }
                    }
                });
            }
            // Two writers on the same disk, same blocks.
            for t in 0..2u8 {
                let d = disks[0].id;
                scope.spawn(move || {
                    for round in 0..200u64 {
                        s.write(d, (round % 8) * 300, &pattern(t, 1000), false).unwrap();
                    }
                });
            }
        });
        let report = s.fsck(true).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    });
}

#[test]
fn fsck_finds_damage() {
    use cas_store::container::{ContainerDir, MemContainerDir};
    let engine = Arc::new(MemEngine::new());
    let dir = Arc::new(MemContainerDir::default());
    let s = Store::with_parts(engine.clone(), dir.clone(), opts(512)).unwrap();
    let d = s.create_disk("d", 8 * 512).unwrap();
    s.write(d.id, 0, &pattern(1, 2 * 512), false).unwrap();
    assert!(s.fsck(true).unwrap().is_clean());
    let fp = s.fingerprint(&pattern(1, 2 * 512)[..512]);
    let fp1 = s.fingerprint(&pattern(1, 2 * 512)[512..]);
    // A wrong count (the location kept), and a block that is not where its entry says.
    let entry = engine.get(Cf::Refs, &fp.0).unwrap().unwrap();
    let mut wrong = 7u64.to_le_bytes().to_vec();
    wrong.extend_from_slice(&entry[8..]);
    let mut batch = WriteBatch::new();
    batch.put(Cf::Refs, fp.0, wrong);
    engine.write(batch).unwrap();
    // Other bytes in the second block's slot (container 0, slot 1).
    let (_, file) = dir.open_all().unwrap().into_iter().next().unwrap();
    file.write_at(&[1u8; 512], 512).unwrap();
    let report = s.fsck(true).unwrap();
    assert_eq!(report.problem_count, 2, "{:?}", report.problems);
    assert!(report.problems.iter().any(|p| p.contains("reference count 7, but 1")));
    assert!(report.problems.iter().any(|p| p.contains(&fp1.to_string()) && p.contains("does not hash")));
    assert_eq!(s.fsck(false).unwrap().problem_count, 1, "without data verification the re-hash is skipped");
    // Reads that verify catch the bad bytes; plain reads return them (the page cache's word).
    let verifying = Store::with_parts(engine.clone(), dir.clone(), StoreOptions { verify_reads: true, ..opts(512) }).unwrap();
    let err = verifying.read(d.id, 0, &mut [0u8; 1024]).unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
}

#[test]
fn interrupted_delete_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Store::open(dir.path(), opts(512)).unwrap();
        let d = s.create_disk("d", 8 * 512).unwrap();
        s.write(d.id, 0, &pattern(3, 8 * 512), true).unwrap();
    }
    {
        // What a crash right after the first step of delete_disk leaves behind.
        let engine = cas_store::engine::RocksEngine::open(dir.path(), &Default::default()).unwrap();
        let mut batch = WriteBatch::new();
        batch.delete(Cf::Disks, b"d".to_vec());
        let mut marker = b"deleting/".to_vec();
        marker.extend_from_slice(&1u64.to_be_bytes());
        batch.put(Cf::Meta, marker, Vec::new());
        engine.write(batch).unwrap();
    }
    let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(s.list_disks().unwrap().is_empty());
    assert_eq!(s.stats().unwrap().stored_blocks, 0);
    assert!(s.fsck(true).unwrap().is_clean());
}

/// What a crash inside `snapshot_disk` leaves (the copy's map entries went in, and the counts
/// of some block ranges were raised, each recorded) is undone at the next open: the origin
/// keeps its blocks and counts, and the copy leaves nothing behind.
#[test]
fn interrupted_copy_is_undone_at_open() {
    const COPY_CHUNK: u64 = 16 * 1024; // snapshot.rs: blocks whose counts one batch raises
    for counted in [vec![], vec![COPY_CHUNK], vec![0, COPY_CHUNK]] {
        let dir = tempfile::tempdir().unwrap();
        let blocks = [0u64, 1, 2, 7, COPY_CHUNK + 1, COPY_CHUNK + 2];
        {
            let s = Store::open(dir.path(), opts(512)).unwrap();
            let d = s.create_disk("vm", (COPY_CHUNK + 8) * 512).unwrap();
            for (i, &b) in blocks.iter().enumerate() {
                // Blocks 0 and COPY_CHUNK + 2 share content: its count spans both ranges.
                s.write(d.id, b * 512, &pattern([9, 1, 2, 3, 4, 9][i], 512), true).unwrap();
            }
        }
        {
            let engine = cas_store::engine::RocksEngine::open(dir.path(), &Default::default()).unwrap();
            let (origin, copy) = (1u64, 2u64);
            let key = |disk: u64, block: u64| [disk.to_be_bytes(), block.to_be_bytes()].concat();
            let entries: Vec<(Vec<u8>, Vec<u8>)> = engine
                .scan(Cf::Maps, &key(origin, 0), Some(&key(origin, u64::MAX)))
                .unwrap()
                .map(|kv| {
                    let (k, v) = kv.unwrap();
                    (key(copy, u64::from_be_bytes(k[8..].try_into().unwrap())), v.to_vec())
                })
                .collect();
            assert_eq!(entries.len(), blocks.len());
            let mut batch = WriteBatch::new();
            batch.put(Cf::Meta, b"next-disk-id".to_vec(), 3u64.to_le_bytes().to_vec());
            batch.put(Cf::Meta, [b"deleting/".as_slice(), &copy.to_be_bytes()].concat(), b"copy".to_vec());
            engine.write(batch).unwrap();
            assert_eq!(engine.ingest_sorted(Cf::Maps, &mut entries.clone().into_iter().map(Ok)).unwrap(), blocks.len() as u64);
            for &first in &counted {
                let mut batch = WriteBatch::new();
                for (k, v) in &entries {
                    if (first..first + COPY_CHUNK).contains(&u64::from_be_bytes(k[8..].try_into().unwrap())) {
                        batch.add_to_count(v[..16].to_vec(), 1);
                    }
                }
                let record = [b"counted/".as_slice(), &copy.to_be_bytes(), &first.to_be_bytes()].concat();
                batch.put(Cf::Meta, record, (first + COPY_CHUNK).to_le_bytes().to_vec());
                engine.write(batch).unwrap();
            }
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let disks = s.list_disks().unwrap();
        assert_eq!(disks.len(), 1, "only the origin: {disks:?}");
        assert_eq!(s.stats().unwrap().stored_blocks, 5);
        let report = s.fsck(true).unwrap();
        assert!(report.is_clean(), "ranges {counted:?} counted: {report:?}");
        assert_eq!(report.map_entries, blocks.len() as u64, "the copy's entries are gone");
        // The origin's blocks survive deleting it once a copy made now holds them.
        let snap = s.snapshot_disk("vm", "vm@now").unwrap();
        s.delete_disk("vm").unwrap();
        let mut got = vec![0u8; 512];
        s.read(snap.id, (COPY_CHUNK + 2) * 512, &mut got).unwrap();
        assert_eq!(got, pattern(9, 512));
        s.read(snap.id, 7 * 512, &mut got).unwrap();
        assert_eq!(got, pattern(3, 512));
        assert!(s.fsck(true).unwrap().is_clean());
    }
}

#[test]
fn large_reads_bypass_the_cache_and_return_the_same_bytes() {
    both(4096, |s| {
        let d = s.create_disk("big", 600 * 4096).unwrap();
        let mut data = pattern(8, 300 * 4096);
        data[5000..9000].fill(0);
        s.write(d.id, 4096 * 100, &data, false).unwrap();
        // Warm a few blocks into the cache with small reads, then read everything at once
        // (a scan: cached blocks are used, missing ones come from the pool uncached).
        let mut small = vec![0u8; 4096];
        for b in [100u64, 150, 399] {
            s.read(d.id, b * 4096, &mut small).unwrap();
        }
        let mut all = vec![1u8; 600 * 4096];
        s.read(d.id, 0, &mut all).unwrap();
        let mut expect = vec![0u8; 600 * 4096];
        expect[4096 * 100..4096 * 400].copy_from_slice(&data);
        assert!(all == expect);
        let mut part = vec![0u8; 200 * 4096 + 7];
        s.read(d.id, 4096 * 150 + 3, &mut part).unwrap();
        assert!(part[..] == expect[4096 * 150 + 3..4096 * 350 + 10]);
    });
}

/// A write of many chunks applied by several threads (and a trim of as many) leaves the same
/// bytes, counts and space as one thread, edges unaligned, blocks shared between chunks.
#[test]
fn large_writes_on_several_threads_match_one_thread() {
    let bs = 512usize;
    let size = 4 << 20;
    // Blocks repeat every 1000 blocks: chunks (256 blocks) share fingerprints with each other.
    let data: Vec<u8> = (0..3 << 20).map(|i| ((i % (1000 * bs)) as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] | 1).collect();
    let run = |threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), StoreOptions { write_threads: threads, ..opts(bs as u32) }).unwrap();
        let d = s.create_disk("d", size).unwrap();
        s.write(d.id, 777, &data, true).unwrap();
        s.trim(d.id, 100_000, 1 << 20, false).unwrap();
        s.write(d.id, 3 << 20, &data[..(1 << 20) - 3], false).unwrap();
        let mut back = vec![0u8; size as usize];
        s.read(d.id, 0, &mut back).unwrap();
        let report = s.fsck(false).unwrap();
        assert!(report.is_clean(), "{report:?}");
        (back, s.stats().unwrap().stored_blocks)
    };
    let (one, stored_one) = run(1);
    let (four, stored_four) = run(4);
    assert!(one == four, "several threads wrote other bytes than one");
    assert_eq!(stored_one, stored_four);
    let mut expect = vec![0u8; size as usize];
    expect[777..777 + data.len()].copy_from_slice(&data);
    expect[100_000..100_000 + (1 << 20)].fill(0);
    expect[3 << 20..(3 << 20) + (1 << 20) - 3].copy_from_slice(&data[..(1 << 20) - 3]);
    assert!(one == expect, "bytes differ from the model");
}

/// A lookup large enough to be split over threads answers each fingerprint in its place.
#[test]
fn has_many_of_a_large_batch_answers_in_order() {
    both(512, |s| {
        let d = s.create_disk("d", 4 << 20).unwrap();
        let data: Vec<u8> = (0..4u32 << 20).map(|i| ((i / 512).wrapping_mul(2_654_435_761) >> 7) as u8 | 1).collect();
        s.write(d.id, 0, &data, false).unwrap();
        let stored: Vec<_> = data.chunks(512).map(|b| FingerprintAlgorithm::Blake3.fingerprint(b)).collect();
        // Present and absent interleaved, unsorted, a duplicate or two.
        let mut batch = Vec::new();
        let mut expect = Vec::new();
        for (i, fp) in stored.iter().enumerate().rev() {
            batch.push(*fp);
            expect.push(true);
            let absent = FingerprintAlgorithm::Blake3.fingerprint(&(i as u64).to_le_bytes());
            batch.push(absent);
            expect.push(false);
        }
        batch.push(stored[0]);
        expect.push(true);
        assert!(batch.len() > 8192);
        assert_eq!(s.has_many(&batch).unwrap(), expect);
    });
}

/// A crash (here: the store forgotten instead of closed, so nothing is folded) leaves the
/// latest reference changes in the journal only; the next open replays them. Counts, locations
/// and bytes then agree, also after a disk copy raised the counts of journalled blocks and
/// with a fold (a compaction pass folds first) between the writes.
#[test]
fn journalled_reference_changes_survive_a_crash() {
    use cas_store::container::MemContainerDir;
    for fold_between in [false, true] {
        let engine = Arc::new(MemEngine::new());
        let dir = Arc::new(MemContainerDir::default());
        let mut expected = pattern(5, 64 * 512);
        let snapshot;
        {
            let s = Store::with_parts(engine.clone(), dir.clone(), opts(512)).unwrap();
            let d = s.create_disk("d", 64 * 512).unwrap();
            s.write(d.id, 0, &expected, false).unwrap();
            if fold_between {
                s.compact(0.5).unwrap();
            }
            // Overwrites (counts down, new blocks), a copy raising the counts, more writes.
            expected[..8 * 512].copy_from_slice(&pattern(6, 8 * 512));
            s.write(d.id, 0, &expected[..8 * 512], false).unwrap();
            s.snapshot_disk("d", "d-snap").unwrap();
            snapshot = expected.clone();
            expected[8 * 512..16 * 512].copy_from_slice(&pattern(7, 8 * 512));
            s.write(d.id, 8 * 512, &expected[8 * 512..16 * 512], false).unwrap();
            std::mem::forget(s);
        }
        let s = Store::with_parts(engine.clone(), dir.clone(), opts(512)).unwrap();
        let report = s.fsck(true).unwrap();
        assert!(report.is_clean(), "fold between: {fold_between}: {:?}", report.problems);
        for (name, want) in [("d", &expected), ("d-snap", &snapshot)] {
            let mut back = vec![0u8; want.len()];
            s.read(s.disk(name).unwrap().id, 0, &mut back).unwrap();
            assert!(back == *want, "{name} differs after the crash (fold between: {fold_between})");
        }
    }
}
