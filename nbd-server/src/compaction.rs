//! The background compaction of the store's block containers (see `cas_store`'s compaction):
//! a pass every interval on its own thread, never on the async runtime.

use std::sync::Arc;
use std::time::Duration;

use cas_store::Store;
use tracing::{info, warn};

/// Containers whose live blocks fill less than this share of them are rewritten.
pub const DEFAULT_COMPACT_BELOW: f64 = 0.5;
/// Seconds between background passes.
pub const DEFAULT_COMPACT_INTERVAL_SECS: u64 = 300;

/// Starts the background passes. The thread ends with the process.
pub fn spawn_compaction(
    store: Arc<Store>,
    interval: Duration,
    below: f64,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("compaction".into()).spawn(move || loop {
        std::thread::sleep(interval);
        match store.compact(below) {
            Ok(report) if report.containers_rewritten + report.containers_deleted > 0 => {
                info!(
                    rewritten = report.containers_rewritten,
                    deleted = report.containers_deleted,
                    moved = report.blocks_moved,
                    reclaimed = report.bytes_before.saturating_sub(report.bytes_after),
                    "background compaction"
                );
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "background compaction failed; the next pass tries again"),
        }
    })
}
