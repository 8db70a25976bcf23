//! The store's background work, on a thread of its own, never on the async runtime: the
//! compaction of its block containers (see `cas_store`'s compaction) every interval, and the
//! resemblance index (`Store::update_sketches`: sealed containers not sketched yet) at start
//! and after every interval, so that a migration from this server finds similar blocks.

use std::sync::Arc;
use std::time::Duration;

use cas_store::Store;
use tracing::{info, warn};

/// Containers whose live blocks fill less than this share of them are rewritten.
pub const DEFAULT_COMPACT_BELOW: f64 = 0.5;
/// Seconds between background passes.
pub const DEFAULT_COMPACT_INTERVAL_SECS: u64 = 300;

/// Starts the background passes (`below` None: no compaction). The thread ends with the
/// process.
pub fn spawn_compaction(
    store: Arc<Store>,
    interval: Duration,
    below: Option<f64>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("compaction".into()).spawn(move || loop {
        match store.update_sketches() {
            Ok(r) if r.containers > 0 => {
                info!(containers = r.containers, blocks = r.blocks, "resemblance index updated")
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "updating the resemblance index failed; the next pass tries again"),
        }
        std::thread::sleep(interval);
        let Some(below) = below else { continue };
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
