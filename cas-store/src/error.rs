//! The store's error type.

use crate::Fingerprint;

/// Everything that can go wrong in the store. Variants are chosen so that a caller (the NBD
/// server, the control API) can map them to a protocol error without parsing messages.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("disk {0:?} not found")]
    DiskNotFound(String),
    #[error("disk {0:?} already exists")]
    DiskExists(String),
    #[error("range {offset}+{length} is past the end of the disk ({size} bytes)")]
    OutOfRange { offset: u64, length: u64, size: u64 },
    #[error("disk {0:?} is a read-only snapshot")]
    ReadOnly(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the store was created with {setting} {stored}, but {requested} was asked for")]
    ConfigMismatch { setting: &'static str, stored: String, requested: String },
    /// Two different blocks hashed to the same fingerprint. With BLAKE3 this means an attack
    /// or a bug; the write is refused rather than sharing another tenant's block.
    #[error("fingerprint collision on {0}: stored block differs from the written one; write refused")]
    Collision(Fingerprint),
    /// A store of an older format that this build converts with a command instead of misreading.
    #[error("store {path} has format {found} (block bytes inside RocksDB); this build uses format {current} (block bytes in containers, RocksDB as their index): convert it with `cas upgrade --store {path}`")]
    FormatUpgrade { path: String, found: u32, current: u32 },
    #[error("store corrupt: {0}")]
    Corrupt(String),
    #[error("storage engine: {0}")]
    Engine(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
