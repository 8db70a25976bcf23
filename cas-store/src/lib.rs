//! A content-addressed block store: the disks of a datacentre, and the index of every block
//! it holds.
//!
//! A *disk* is a size and a *block map* (block number -> fingerprint). Blocks are stored once
//! per distinct content, keyed by a 128-bit fingerprint, with a reference count: identical
//! blocks of many disks cost one copy, and a migration destination can ask "do I have this
//! block already?" with one batched lookup ([`Store::has_many`]).
//!
//! Block bytes live in large append-only container files beside the index ([`container`]),
//! read with one `pread` from the page cache into the caller's buffer; RocksDB (the only crate
//! that links it) keeps the small things:
//!
//! ```text
//! column family  key                                   value
//! meta           "config"                              {"format_version","block_size","algorithm"}
//!                "next-disk-id"                        u64 LE
//!                "next-container-id"                   u32 LE
//!                "deleting/" ++ disk id (u64 BE)       (empty): a delete to finish after a crash
//!                "pool-pending/" ++ fingerprint        (empty): an external pool operation that
//!                                                      may not have completed (see `pool`)
//!                "refs-log/" ++ sequence (u64 BE)      reference changes not yet folded into
//!                                                      `refs` (fingerprint, new entry or gone)
//! disks          disk name                             {"id","size"}
//! maps           disk id (u64 BE) ++ block (u64 BE)    fingerprint (16 bytes) ++ location hint
//!                                                      (container u32 LE, slot u32 LE)
//! refs           fingerprint                           reference count (u64 LE) ++ location
//!                                                      (container u32 LE, slot u32 LE)
//! blocks         (format 1 only, emptied by `cas upgrade`) fingerprint -> block bytes
//! ```
//!
//! A commit's reference changes go to a journal record in the same batch as its map changes
//! and to an overlay in memory; a fold writes them into `refs` as one sorted table file once
//! the overlay holds 128 Ki fingerprints (see `store::refs_log`): no random-key memtable
//! insert per new block on the write path.
//!
//! A range read seeks the map once and reads each block where its map entry's hint says (the
//! `refs` entry is the authority when compaction has moved the block). Format 3 is this
//! layout; format 1 kept block bytes as RocksDB values and is refused with the command that
//! converts it ([`Store::upgrade`]).
//!
//! Blocks may instead sit in an external pool that the stores of many servers share (Ceph
//! RADOS, in the `cas-rados` crate, behind the [`BlockPool`] trait), with `refs` counting this
//! store's own map entries and no locations (format 2). The config records which (`"blocks":
//! {"kind", "location", "holder"}`), and reopening with another pool is refused.
//!
//! An absent map entry reads as zeros: zero blocks are never stored, and block status reports
//! them as holes. A map change and the reference-count changes it causes are one atomic
//! batch; a block whose count reaches zero leaves a dead slot that compaction reclaims
//! ([`Store::compact`], `cas gc`). When a written block's fingerprint is already stored, the
//! bytes are compared before the block is shared.
//!
//! The store is synchronous. Async servers call it from a blocking pool.

mod cache;
pub mod container;
mod dirty;
pub mod engine;
mod error;
mod fingerprint;
mod keys;
pub mod pool;
pub mod resemblance;
mod store;

pub use dirty::DirtyBitmap;
pub use engine::{KvEngine, RocksTuning};
pub use error::{Result, StoreError};
pub use fingerprint::{Fingerprint, FingerprintAlgorithm, FingerprintHash, FingerprintHasher, FingerprintMap};
pub use pool::{BlockPool, MemPool};
pub use store::{
    CompactionReport, CompactionStop, DiskId, DiskInfo, DiskStats, Extent, FsckReport, MapSnapshot, RepairReport, SketchReport, Store, StoreOptions,
    StoreStats, UpgradeReport, CONTAINERS_DIR,
};
