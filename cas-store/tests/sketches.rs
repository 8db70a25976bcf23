//! The resemblance index: sealed containers are sketched once, a slightly changed block finds
//! the block it came from, and locations compaction deleted fail to read instead of lying.

use cas_store::resemblance::sketch;
use cas_store::{SketchReport, Store, StoreOptions};

mod common;
use common::blocks::{unique, BS};

const BLOCKS: usize = 200;
const SLOTS_PER_CONTAINER: usize = 64;

/// The same blocks, each with eight bytes changed at a place of its own (a row updated).
fn changed(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    for (i, block) in out.chunks_mut(BS).enumerate() {
        let at = (i * 977) % (BS - 8);
        block[at..at + 8].copy_from_slice(b"refunded");
    }
    out
}

fn opts() -> StoreOptions {
    StoreOptions { block_size: Some(BS as u32), container_bytes: (SLOTS_PER_CONTAINER * BS) as u64, ..Default::default() }
}

#[test]
fn a_changed_block_finds_the_block_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let old = unique(7, BLOCKS);
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        let disk = store.create_disk("old", (BLOCKS * BS) as u64).unwrap();
        store.write(disk.id, 0, &old, false).unwrap();
        // Three containers are full; the fourth is still appended to and waits.
        let sealed = (BLOCKS / SLOTS_PER_CONTAINER) * SLOTS_PER_CONTAINER;
        let report = store.update_sketches().unwrap();
        assert_eq!(report, SketchReport { containers: 3, blocks: sealed as u64, unsketchable: 0 });
        assert_eq!(store.update_sketches().unwrap(), SketchReport::default(), "the cursor remembers");
        let new = changed(&old);
        let mut found = 0;
        let mut buf = vec![0u8; BS];
        for (i, block) in new.chunks(BS).take(sealed).enumerate() {
            let candidates = store.similar_blocks(&sketch(block).unwrap()).unwrap();
            if let Some(&loc) = candidates.first() {
                store.read_location(loc, &mut buf).unwrap();
                if buf == old[i * BS..(i + 1) * BS] {
                    found += 1;
                }
            }
        }
        assert!(found * 100 >= sealed * 95, "only {found} of {sealed} changed blocks found their original");
    }
    // Reopened, appends go to a new container: the last one is sealed and gets sketched.
    let store = Store::open(dir.path(), opts()).unwrap();
    let report = store.update_sketches().unwrap();
    assert_eq!(report.blocks, (BLOCKS % SLOTS_PER_CONTAINER) as u64);
    let last = changed(&old[(BLOCKS - 1) * BS..]);
    let loc = store.similar_blocks(&sketch(&last).unwrap()).unwrap()[0];
    let mut buf = vec![0u8; BS];
    store.read_location(loc, &mut buf).unwrap();
    assert_eq!(buf, old[(BLOCKS - 1) * BS..]);

    // The disk goes and compaction deletes its containers: the index still names them, and
    // reading such a location is an error, not another block's bytes.
    store.delete_disk("old").unwrap();
    store.compact(0.5).unwrap();
    let candidates = store.similar_blocks(&sketch(&changed(&old[..BS])).unwrap()).unwrap();
    assert!(!candidates.is_empty());
    assert!(store.read_location(candidates[0], &mut buf).is_err());
}

#[test]
fn the_in_memory_engine_keeps_an_index_too() {
    let store = Store::open_in_memory(opts()).unwrap();
    let old = unique(3, 2 * SLOTS_PER_CONTAINER + 1);
    let disk = store.create_disk("old", old.len() as u64).unwrap();
    store.write(disk.id, 0, &old, false).unwrap();
    assert_eq!(store.update_sketches().unwrap().blocks, 2 * SLOTS_PER_CONTAINER as u64);
    let changed = changed(&old[..BS]);
    let loc = store.similar_blocks(&sketch(&changed).unwrap()).unwrap()[0];
    let mut buf = vec![0u8; BS];
    store.read_location(loc, &mut buf).unwrap();
    assert_eq!(buf, old[..BS]);
}

#[test]
fn zero_and_uniform_blocks_are_not_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let disk = store.create_disk("flat", (SLOTS_PER_CONTAINER * 2 * BS) as u64).unwrap();
    let mut data = vec![0u8; SLOTS_PER_CONTAINER * 2 * BS];
    for (i, block) in data.chunks_mut(BS).enumerate() {
        block.fill(i as u8 + 1);
    }
    store.write(disk.id, 0, &data, false).unwrap();
    let report = store.update_sketches().unwrap();
    assert_eq!(report.blocks, 0);
    assert_eq!(report.unsketchable, SLOTS_PER_CONTAINER as u64);
}
