//! `cas`'s command line: one struct per subcommand (argh).

use std::path::PathBuf;

use argh::FromArgs;
use cas_store::FingerprintAlgorithm;

/// Manage the disks of a content-addressed block store.
#[derive(FromArgs, Debug)]
pub(crate) struct Cas {
    #[argh(subcommand)]
    pub(crate) command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
pub(crate) enum Command {
    Create(CreateCmd),
    Import(ImportCmd),
    Export(ExportCmd),
    Ls(LsCmd),
    Rm(RmCmd),
    Snapshot(SnapshotCmd),
    Clone(CloneCmd),
    Stats(StatsCmd),
    Fsck(FsckCmd),
    Gc(GcCmd),
    Upgrade(UpgradeCmd),
    Similarity(SimilarityCmd),
}

/// Create an empty disk.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "create")]
pub(crate) struct CreateCmd {
    /// disk name
    #[argh(positional)]
    pub(crate) name: String,
    /// size, e.g. 10G (binary units; a multiple of 512 bytes)
    #[argh(option)]
    pub(crate) size: String,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// block size when the store is created (default 4096)
    #[argh(option)]
    pub(crate) block_size: Option<u32>,
    /// fingerprint algorithm when the store is created: blake3-128 (default) or xxh3-128
    #[argh(option)]
    pub(crate) algorithm: Option<FingerprintAlgorithm>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Import an image file (raw, or any format qemu-img reads) into a disk, creating it if needed.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "import")]
pub(crate) struct ImportCmd {
    /// disk name
    #[argh(positional)]
    pub(crate) name: String,
    /// image file
    #[argh(positional)]
    pub(crate) file: PathBuf,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// block size when the store is created (default 4096)
    #[argh(option)]
    pub(crate) block_size: Option<u32>,
    /// fingerprint algorithm when the store is created
    #[argh(option)]
    pub(crate) algorithm: Option<FingerprintAlgorithm>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Export a disk to a sparse raw file.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "export")]
pub(crate) struct ExportCmd {
    /// disk name
    #[argh(positional)]
    pub(crate) name: String,
    /// output file (raw)
    #[argh(positional)]
    pub(crate) file: PathBuf,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// List disks.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ls")]
pub(crate) struct LsCmd {
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Delete a disk (blocks other disks share stay).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
pub(crate) struct RmCmd {
    /// disk name
    #[argh(positional)]
    pub(crate) name: String,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Make a read-only, point-in-time copy of a disk (its map; no block is copied).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "snapshot")]
pub(crate) struct SnapshotCmd {
    /// the disk to copy
    #[argh(positional)]
    pub(crate) disk: String,
    /// the snapshot's name (a disk name, e.g. vm1@monday)
    #[argh(positional)]
    pub(crate) name: String,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Make a writable disk from a disk or a snapshot (its map; no block is copied).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "clone")]
pub(crate) struct CloneCmd {
    /// the disk or snapshot to copy
    #[argh(positional)]
    pub(crate) source: String,
    /// the new disk's name
    #[argh(positional)]
    pub(crate) name: String,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Space accounting of the store, or of one disk.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stats")]
pub(crate) struct StatsCmd {
    /// a disk name (default: the whole store and every disk)
    #[argh(positional)]
    pub(crate) name: Option<String>,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Check reference counts, block presence and (with --verify) block contents.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "fsck")]
pub(crate) struct FsckCmd {
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// re-hash every stored block
    #[argh(switch)]
    pub(crate) verify: bool,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Run a compaction pass now: rewrite block containers whose live share is below the threshold
/// and give their dead space back to the filesystem.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "gc")]
pub(crate) struct GcCmd {
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    pub(crate) store: Option<PathBuf>,
    /// a running server's control socket or host:port (instead of --store)
    #[argh(option)]
    pub(crate) server: Option<String>,
    /// rewrite containers whose live blocks fill less than this share of them (default 0.5;
    /// 1 rewrites every container with any dead block)
    #[argh(option, default = "0.5")]
    pub(crate) below: f64,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Convert a store of an older format (blocks inside RocksDB) to block containers, in place.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "upgrade")]
pub(crate) struct UpgradeCmd {
    /// store directory (no server may hold it open)
    #[argh(option)]
    pub(crate) store: PathBuf,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}

/// Pairwise block similarity of image files (the paper's table) at 512, 1024, 2048, 4096 bytes.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "similarity")]
pub(crate) struct SimilarityCmd {
    /// raw image files (two or more)
    #[argh(positional)]
    pub(crate) images: Vec<PathBuf>,
    /// print JSON
    #[argh(switch)]
    pub(crate) json: bool,
}
