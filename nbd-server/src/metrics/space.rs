//! Store space for the metrics, refreshed on a thread of its own: adding it up walks the
//! reference index, one entry per stored block (about a second per few million blocks), which
//! must not run on a scrape, on a runtime thread, or every second.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cas_store::{Store, StoreStats};
use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

/// Seconds between two walks of the reference index for the store-space gauges.
pub const DEFAULT_SPACE_INTERVAL: Duration = Duration::from_secs(60);

/// The last store-space figures and when they were taken.
#[derive(Debug, Default)]
pub struct SpaceSampler {
    latest: Mutex<Option<(Instant, StoreStats)>>,
}

impl SpaceSampler {
    /// Starts the thread that refreshes the figures every `interval` (the first at once). It
    /// ends when the store is dropped.
    pub fn start(store: &Arc<Store>, interval: Duration) -> std::io::Result<Arc<SpaceSampler>> {
        let sampler = Arc::new(SpaceSampler::default());
        let weak_store: Weak<Store> = Arc::downgrade(store);
        let weak_sampler = Arc::downgrade(&sampler);
        std::thread::Builder::new().name("metrics-space".into()).spawn(move || loop {
            let (Some(store), Some(sampler)) = (weak_store.upgrade(), weak_sampler.upgrade()) else { return };
            match store.stats() {
                Ok(stats) => *sampler.latest.lock() = Some((Instant::now(), stats)),
                Err(e) => tracing::warn!("store space for the metrics: {e}"),
            }
            drop((store, sampler));
            std::thread::sleep(interval);
        })?;
        Ok(sampler)
    }

    pub(super) fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some((taken, s)) = self.latest.lock().clone() else { return Ok(()) };
        let gauges: [(&str, &str, f64); 9] = [
            ("store_logical_bytes", "Sum of the disks' sizes", s.logical_bytes as f64),
            ("store_allocated_bytes", "Bytes the disks map (logical bytes less holes)", s.allocated_bytes as f64),
            ("store_stored_bytes", "Bytes of distinct blocks stored (unique data)", s.stored_bytes as f64),
            (
                "store_container_bytes",
                "Bytes the block containers occupy on the filesystem",
                s.container_bytes.unwrap_or(0) as f64,
            ),
            (
                "store_reclaimable_bytes",
                "Container bytes no live block uses: what compaction can give back",
                s.reclaimable_bytes as f64,
            ),
            (
                "store_index_bytes",
                "Bytes the index (RocksDB: maps and references) occupies",
                s.engine_bytes.unwrap_or(0) as f64,
            ),
            ("store_dedupe_ratio", "Allocated bytes per stored byte", s.dedupe_ratio),
            ("store_disks", "Disks in the store", s.disks as f64),
            ("store_space_age_seconds", "How old the store_* figures are", taken.elapsed().as_secs_f64()),
        ];
        for (name, help, value) in gauges {
            encoder.encode_descriptor(name, help, None, MetricType::Gauge)?.encode_gauge(&value)?;
        }
        Ok(())
    }
}
