//! The store's public data types: disks, extents, space accounting, check and repair reports.

use serde::{Deserialize, Serialize};

use crate::FingerprintAlgorithm;

/// What [`Store::repair_references`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Fingerprints whose references were compared with the pool's.
    pub checked: u64,
    /// Leaked references given back to the pool.
    pub released: u64,
    /// References this store should have held and took again.
    pub reacquired: u64,
    /// Blocks this store maps that the pool no longer has (data lost; fsck lists them).
    pub lost: u64,
}

/// A disk's identity inside one store. Ids are never reused, so a stale id cannot reach a
/// disk created later under the same name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DiskId(pub u64);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DiskMeta {
    pub(crate) id: u64,
    pub(crate) size: u64,
    /// A snapshot: never written (absent in records of older stores: writable).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) read_only: bool,
    /// The disk a snapshot or clone was copied from, when it was (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) origin: Option<String>,
}

/// A disk as the catalogue knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    pub id: DiskId,
    pub name: String,
    pub size: u64,
    /// A snapshot: reads only (writes get [`crate::StoreError::ReadOnly`]).
    #[serde(default)]
    pub read_only: bool,
    /// The disk it was snapshotted or cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A run of a disk's address space that is either allocated or reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
    /// False: a hole, which reads as zeros and costs nothing.
    pub allocated: bool,
}

/// Space accounting of one disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStats {
    pub name: String,
    pub size: u64,
    /// Bytes of blocks that are mapped (not holes).
    pub allocated_bytes: u64,
    /// Bytes of distinct blocks that no other disk and no other block of this disk shares.
    pub exclusive_bytes: u64,
    /// Bytes of mapped blocks that share their content with another block (here or elsewhere).
    pub shared_bytes: u64,
}

/// Space accounting of the whole store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreStats {
    pub block_size: u32,
    pub algorithm: FingerprintAlgorithm,
    pub disks: u64,
    /// Sum of the disks' sizes.
    pub logical_bytes: u64,
    /// Bytes the disks map (logical bytes minus holes).
    pub allocated_bytes: u64,
    /// Distinct blocks stored, and their bytes.
    pub stored_blocks: u64,
    pub stored_bytes: u64,
    /// allocated / stored: how many times each stored byte is used on average.
    pub dedupe_ratio: f64,
    /// What the engine (the index: maps and references) occupies, if it can tell: its files
    /// and what its memtables hold that is not flushed yet.
    pub engine_bytes: Option<u64>,
    /// Bytes the block containers occupy (None: the blocks are in an external pool).
    #[serde(default)]
    pub container_bytes: Option<u64>,
    /// Container bytes no live block uses: what compaction (`cas gc`) can give back.
    #[serde(default)]
    pub reclaimable_bytes: u64,
    /// Index bytes per stored block (engine bytes / stored blocks).
    #[serde(default)]
    pub index_bytes_per_block: Option<f64>,
    /// What the engine holds in memory now, if it can tell.
    #[serde(default)]
    pub engine_memory: Option<crate::engine::EngineMemory>,
}

/// What one compaction pass did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompactionReport {
    /// Containers looked at (every one but the one being appended to).
    pub containers_checked: u64,
    /// Containers whose live blocks were copied out and which were then deleted.
    pub containers_rewritten: u64,
    /// Containers deleted with no live block left in them.
    pub containers_deleted: u64,
    /// Live blocks copied to new containers.
    pub blocks_moved: u64,
    /// Container bytes before and after the pass.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// What `fsck` found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FsckReport {
    pub disks: u64,
    pub map_entries: u64,
    pub stored_blocks: u64,
    pub verified_blocks: u64,
    /// Old locations of blocks that map entries still hint at: copies in containers a
    /// compaction pass emptied but did not delete (it was interrupted). Valid (each copy holds
    /// its block's bytes, checked); the next pass deletes those containers. Counted once per
    /// block and location, however many entries name it.
    #[serde(default)]
    pub stale_hints: u64,
    /// Number of problems found; `problems` lists the first of them.
    pub problem_count: u64,
    pub problems: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.problem_count == 0
    }

    pub(crate) fn problem(&mut self, message: String) {
        self.problem_count += 1;
        if self.problems.len() < 100 {
            self.problems.push(message);
        }
    }
}
