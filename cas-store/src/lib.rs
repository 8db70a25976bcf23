//! A content-addressed block store: the disks of a datacentre, and the index of every block
//! it holds.
//!
//! A *disk* is a size and a *block map* (block number -> fingerprint). Blocks are stored once
//! per distinct content, keyed by a 128-bit fingerprint, with a reference count: identical
//! blocks of many disks cost one copy, and a migration destination can ask "do I have this
//! block already?" with one batched lookup ([`Store::has_many`]).
//!
//! ```text
//! column family  key                                   value
//! meta           "config"                              {"format_version","block_size","algorithm"}
//!                "next-disk-id"                        u64 LE
//!                "deleting/" ++ disk id (u64 BE)       (empty): a delete to finish after a crash
//!                "pool-pending/" ++ fingerprint        (empty): an external pool operation that
//!                                                      may not have completed (see `pool`)
//! disks          disk name                             {"id","size"}
//! maps           disk id (u64 BE) ++ block (u64 BE)    fingerprint (16 bytes)
//! refs           fingerprint                           reference count (u64 LE)
//! blocks         fingerprint                           block bytes (RocksDB compresses them)
//! ```
//!
//! Blocks sit behind the [`BlockPool`] trait: by default in the `blocks` column family
//! ([`LocalPool`]); or in an external pool that the stores of many servers share (Ceph RADOS,
//! in the `cas-rados` crate), the `blocks` column family then unused and `refs` counting this
//! store's own map entries. The config records which (`"blocks": {"kind", "location",
//! "holder"}`, format version 2), and reopening with another pool is refused.
//!
//! An absent map entry reads as zeros: zero blocks are never stored, and block status reports
//! them as holes. A map change and the reference-count changes it causes are one atomic
//! batch; a block whose count reaches zero is deleted in that same batch. When a written
//! block's fingerprint is already stored, the bytes are compared before the block is shared.
//!
//! The store is synchronous. Async servers call it from a blocking pool.

mod cache;
mod dirty;
pub mod engine;
mod error;
mod fingerprint;
mod keys;
pub mod pool;
mod store;

pub use dirty::DirtyBitmap;
pub use engine::{KvEngine, RocksTuning};
pub use error::{Result, StoreError};
pub use fingerprint::{Fingerprint, FingerprintAlgorithm};
pub use pool::{BlockPool, LocalPool, MemPool};
pub use store::{DiskId, DiskInfo, DiskStats, Extent, FsckReport, MapSnapshot, RepairReport, Store, StoreOptions, StoreStats};
