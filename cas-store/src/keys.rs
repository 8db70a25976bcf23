//! Key and value encodings. Integers in keys are big-endian so that RocksDB's byte order is
//! numeric order: one disk's map is a contiguous, block-ordered key range.

use crate::container::Location;
use crate::{DiskId, Fingerprint, Result, StoreError};

pub(crate) const CONFIG_KEY: &[u8] = b"config";
pub(crate) const NEXT_DISK_ID_KEY: &[u8] = b"next-disk-id";
/// The id the next block container takes (u32 LE).
pub(crate) const NEXT_CONTAINER_ID_KEY: &[u8] = b"next-container-id";
/// Prefix of the marker of a disk whose blocks are being released (survives a crash).
pub(crate) const DELETING_PREFIX: &[u8] = b"deleting/";

pub(crate) fn map_key(disk: DiskId, block: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&disk.0.to_be_bytes());
    k[8..].copy_from_slice(&block.to_be_bytes());
    k
}

pub(crate) fn parse_map_key(key: &[u8]) -> Result<(DiskId, u64)> {
    if key.len() != 16 {
        return Err(StoreError::Corrupt(format!("map key of {} bytes", key.len())));
    }
    let disk = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
    let block = u64::from_be_bytes(key[8..].try_into().expect("8 bytes"));
    Ok((DiskId(disk), block))
}

pub(crate) fn parse_fingerprint(value: &[u8]) -> Result<Fingerprint> {
    Fingerprint::from_slice(value).ok_or_else(|| StoreError::Corrupt(format!("fingerprint of {} bytes", value.len())))
}

pub(crate) fn encode_count(n: u64) -> [u8; 8] {
    n.to_le_bytes()
}

pub(crate) fn parse_count(value: &[u8]) -> Result<u64> {
    value.try_into().map(u64::from_le_bytes).map_err(|_| StoreError::Corrupt(format!("reference count of {} bytes", value.len())))
}

/// The deletion marker's value while a disk is being copied into (a delete's is empty).
pub(crate) const COPY_MARKER: &[u8] = b"copy";
/// Prefix of the records of a copy in progress: each names a block range whose counts it
/// has raised (key: disk id and first block, big-endian; value: the end block, LE).
pub(crate) const COUNTED_PREFIX: &[u8] = b"counted/";

pub(crate) fn counted_key(disk: DiskId, first: u64) -> Vec<u8> {
    let mut k = counted_prefix(disk);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

pub(crate) fn counted_prefix(disk: DiskId) -> Vec<u8> {
    let mut k = COUNTED_PREFIX.to_vec();
    k.extend_from_slice(&disk.0.to_be_bytes());
    k
}

pub(crate) fn deleting_key(disk: DiskId) -> Vec<u8> {
    let mut k = DELETING_PREFIX.to_vec();
    k.extend_from_slice(&disk.0.to_be_bytes());
    k
}

/// Prefix of an intent: an operation on an external pool that may not have completed (a claim
/// before its map batch commits, a release after). Reconciled at open.
pub(crate) const PENDING_PREFIX: &[u8] = b"pool-pending/";

pub(crate) fn pending_key(fp: &Fingerprint) -> Vec<u8> {
    let mut k = PENDING_PREFIX.to_vec();
    k.extend_from_slice(&fp.0);
    k
}

/// A `refs` entry: the number of map entries naming a block and, for a store that keeps its
/// blocks in containers, where the block is (count u64 LE, then the location; an external
/// pool's entries have the count only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefEntry {
    pub count: u64,
    pub location: Option<Location>,
}

pub(crate) fn encode_ref(entry: RefEntry) -> Vec<u8> {
    // Sized once: a commit encodes one per new block.
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&entry.count.to_le_bytes());
    if let Some(loc) = entry.location {
        v.extend_from_slice(&loc.encode());
    }
    v
}

pub(crate) fn parse_ref(value: &[u8]) -> Result<RefEntry> {
    let bad = || StoreError::Corrupt(format!("reference entry of {} bytes", value.len()));
    match value.len() {
        8 => Ok(RefEntry { count: parse_count(value)?, location: None }),
        16 => Ok(RefEntry { count: parse_count(&value[..8])?, location: Some(Location::decode(&value[8..]).ok_or_else(bad)?) }),
        _ => Err(bad()),
    }
}

/// A map entry: the block's fingerprint and, for blocks in containers, a hint of where the
/// block was when the entry was written (saving the `refs` lookup on reads). A hint whose
/// container compaction has deleted no longer resolves, and the reader asks `refs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub fp: Fingerprint,
    pub hint: Option<Location>,
}

pub(crate) fn encode_map_entry(entry: MapEntry) -> Vec<u8> {
    // Sized once: a commit encodes one per block it maps.
    let mut v = Vec::with_capacity(24);
    v.extend_from_slice(&entry.fp.0);
    if let Some(loc) = entry.hint {
        v.extend_from_slice(&loc.encode());
    }
    v
}

pub(crate) fn parse_map_entry(value: &[u8]) -> Result<MapEntry> {
    match value.len() {
        16 => Ok(MapEntry { fp: parse_fingerprint(value)?, hint: None }),
        24 => Ok(MapEntry { fp: parse_fingerprint(&value[..16])?, hint: Location::decode(&value[16..]) }),
        n => Err(StoreError::Corrupt(format!("map entry of {n} bytes"))),
    }
}
