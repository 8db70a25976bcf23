//! Where blocks live: the [`BlockPool`] trait, behind which the store keeps block bytes and
//! the references that keep them alive.
//!
//! The store always keeps, in its own engine, the block maps and one count per fingerprint of
//! the map entries that name it (the `refs` column family). A pool holds the blocks and this
//! store's *claim* on each block it maps: the store claims a block when its count goes from 0
//! to 1 and gives the claim back when the count returns to 0.
//!
//! Without a pool, a store keeps its blocks itself, in append-only containers beside its engine
//! (see [`crate::container`]). A pool (RADOS in the `cas-rados` crate; [`MemPool`] in memory
//! for tests) holds the blocks of many stores (many storage servers). Each store is a *holder* with its
//!   own name; the pool counts references per holder and deletes a block when no holder is
//!   left, so one store's delete never frees a block another store maps. No batch spans the
//!   pool and the store's engine, so the store orders its steps so that a crash can only
//!   leak a reference, never leave a map entry naming a missing block: claim in the pool
//!   first, then commit the map batch, then release. Intents recorded in the engine let the
//!   next open (or [`crate::Store::repair_references`]) reconcile what a crash interrupted, and
//!   fsck compares the store's references with the pool's.

mod memory;

pub use memory::MemPool;

use std::fmt;

use crate::{Fingerprint, FingerprintAlgorithm, Result};

/// What a store asks of a block it wants to reference.
#[derive(Debug, Clone, Copy)]
pub enum Claim<'a> {
    /// Store these bytes if the block is new; if it is stored already, compare these bytes
    /// with the stored ones first and refuse a mismatch (a fingerprint collision).
    Data(&'a [u8]),
    /// Reference the block only if it is stored already (a migration maps a neighbour's block).
    Existing,
}

/// The outcome of one [`Claim`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimed {
    /// The holder now has a reference on the block (stored by this claim or before).
    Yes,
    /// An [`Claim::Existing`] whose block is not stored: nothing changed.
    Missing,
    /// A [`Claim::Data`] whose bytes differ from the stored block's: nothing changed.
    Collision,
}

/// The settings every store that uses a pool must share (block size, fingerprint algorithm).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSettings {
    pub block_size: u32,
    pub algorithm: FingerprintAlgorithm,
}

/// One block of an external pool, as [`BlockPool::scan`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolBlock {
    pub fingerprint: Fingerprint,
    /// References the scanning holder has on it (normally 0 or 1).
    pub holder_refs: u64,
    /// References all holders have on it.
    pub total_refs: u64,
}

/// Every block of a pool (see [`BlockPool::scan`]).
pub type PoolScan = Box<dyn Iterator<Item = Result<PoolBlock>> + Send>;

/// Block storage with references, shared by many stores. See the module docs for the contract.
///
/// `holder` names the calling store (fixed at its creation, recorded in its configuration).
/// Batched methods answer in the order of their input. A store calls `acquire` for a
/// fingerprint only while its own count for it is 0, and `release` only when that count has
/// just reached 0, under its fingerprint lock: a holder has at most one reference per block
/// unless a crash or a lost reply left another.
pub trait BlockPool: Send + Sync + fmt::Debug {
    /// The kind recorded in a store's configuration: "rados", "memory".
    fn kind(&self) -> &'static str;

    /// Where the blocks are, as an operator would name it ("rados:POOL/NAMESPACE").
    /// A store reopened with a pool at another location is refused.
    fn location(&self) -> String;

    /// Called when a store opens: records the settings in a new pool, or checks them against
    /// the ones recorded (stores with other settings must not share a pool).
    fn attach(&self, _settings: &PoolSettings) -> Result<()> {
        Ok(())
    }

    /// Takes one reference per claim for `holder`. On an error, claims this call completed are given back as far
    /// as the pool can tell; ones whose outcome is unknown (a timeout) are left to repair.
    fn acquire(&self, holder: &str, claims: &[(Fingerprint, Claim<'_>)]) -> Result<Vec<Claimed>>;

    /// Gives back one reference of `holder` per entry (a fingerprint may repeat); a block left
    /// with no reference is deleted. Releasing a reference the holder does not have is not an error.
    fn release(&self, holder: &str, fps: &[Fingerprint]) -> Result<()>;

    /// Whether each block is stored (by any holder).
    fn has_many(&self, fps: &[Fingerprint]) -> Result<Vec<bool>>;

    /// The bytes of each block (None: not stored).
    fn get_many(&self, fps: &[Fingerprint]) -> Result<Vec<Option<Vec<u8>>>>;

    /// How many references `holder` has on each block (None: the block is not stored).
    fn holder_refs(&self, holder: &str, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>>;

    /// Every block in the pool with the references `holder` and everyone have on it (fsck's
    /// search for leaked references). May be long: it lists the whole pool.
    fn scan(&self, holder: &str) -> Result<PoolScan>;
}
