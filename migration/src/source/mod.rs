//! The source side: lists fingerprints, sends the blocks the destination asks for, runs the
//! dirty rounds, freezes, switches over and serves post-copy fetches until the destination
//! has everything.

mod compressor;
mod delta;
mod driver;
mod listing;
mod outbox;
mod plan;
mod sender;
mod state;
mod status;
mod supervisor;

use std::future::Future;
use std::pin::Pin;

pub use driver::{run_source, run_source_with};
pub(crate) use listing::runs_of;
pub(crate) use outbox::OUTBOX_FRAMES;
pub use plan::run_plan;
pub use status::{MigrationStatus, RequestError};

use crate::report::SwitchAfter;
use crate::state::Stage;

// The submodules share their crate-internal items through this module.
use crate::recent::RecentFingerprints;
use {compressor::*, listing::*, outbox::*, sender::*, supervisor::*};

/// Entries per FINGERPRINTS frame (about 130 KiB).
pub(crate) const FINGERPRINTS_PER_FRAME: usize = 8192;

/// Why a server's hook could not do its part (its own error, whatever the server is).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// What the source server does at the edges of a migration (the NBD server implements it).
pub trait SourceHooks: Send + Sync {
    /// Stops new writes to the disk's export and waits for writes in flight.
    fn freeze<'a>(&'a self, disk: &'a str) -> Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>>;
    /// Undoes `freeze`: the migration failed before the switch-over and the source stays
    /// authoritative.
    fn thaw(&self, disk: &str);
    /// The destination now serves the disk; the source must never accept writes to it again.
    fn switched(&self, disk: &str);
}

/// Hooks that do nothing (tests, and tools that migrate a disk no server exports).
#[derive(Debug, Default)]
pub struct NoHooks;

impl SourceHooks for NoHooks {
    fn freeze<'a>(&'a self, _: &'a str) -> Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }
    fn thaw(&self, _: &str) {}
    fn switched(&self, _: &str) {}
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SourceConfig {
    pub migration_id: String,
    pub switch_after: SwitchAfter,
    /// Dirty rounds at most (converged mode).
    pub max_rounds: u32,
    /// A dirty set this small (in blocks) counts as converged.
    pub converge_blocks: u64,
    /// A fixed zstd level, or None to adapt to the link.
    pub zstd_level: Option<i32>,
    /// Uncompressed bytes per DATA frame.
    pub batch_bytes: usize,
    /// Delete the source disk once the destination has every block.
    pub delete_source: bool,
    /// Cap on what the source sends, in bits per second (None: as fast as the link goes).
    pub bandwidth_bps: Option<u64>,
    /// How long the source keeps reconnecting after a lost link before the migration is
    /// interrupted (0: a lost link fails it).
    pub reconnect_window_secs: u64,
    /// Offer DATA_STREAM (one long-window zstd stream per connection); false compresses each
    /// DATA frame on its own (to measure what the stream gives).
    pub data_stream: bool,
    /// Offer deltas: a wanted block similar to one the destination holds (found in this
    /// store's resemblance index, confirmed with REF_QUERY) crosses as the difference.
    pub delta: bool,
    /// Offer the unnamed record layout: whole blocks cross without their fingerprint (the
    /// destination computes it to check the block anyway); false names every block, as a
    /// source that predates it does (to measure what it gives).
    pub unnamed_blocks: bool,
    /// Offer WANT_LISTED: the destination may ask for a listing's missing content with a bit
    /// per listed block instead of 16 bytes per wanted one; false takes WANT only (to
    /// measure what it gives, and what an older source does).
    pub want_listed: bool,
    /// The gang this migration belongs to (disks moved together; see `Hello::gang`): the
    /// destination asks once for content several of them lack, and the gang's migrations
    /// share one bandwidth cap at this server.
    #[serde(default)]
    pub gang: Option<String>,
    /// Set when a restarted server resumes the migration: where its record said it stood.
    #[serde(skip)]
    pub restarted_at: Option<Stage>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            migration_id: "migration".into(),
            switch_after: SwitchAfter::default(),
            max_rounds: 8,
            converge_blocks: 256,
            zstd_level: None,
            batch_bytes: 1 << 20,
            delete_source: false,
            bandwidth_bps: None,
            reconnect_window_secs: 600,
            data_stream: true,
            delta: true,
            unnamed_blocks: true,
            want_listed: true,
            gang: None,
            restarted_at: None,
        }
    }
}
