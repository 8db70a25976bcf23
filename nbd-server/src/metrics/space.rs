//! Store space for the metrics, refreshed on a thread of its own: adding it up walks the
//! reference index, one entry per stored block (about 0.4 us each here: 2 s for 5 M blocks),
//! which must not run on a scrape, on a runtime thread, or every second. The pause after a
//! walk is at least 99 times the walk itself, so the walks take at most 1 % of one core
//! whatever the store's size.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use cas_store::{Store, StoreStats};
use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

/// Seconds between two walks of the reference index for the store-space gauges (longer when
/// a walk takes more than a hundredth of it).
pub const DEFAULT_SPACE_INTERVAL: Duration = Duration::from_secs(60);

/// A walk's time is at most this share of the time from one walk to the next.
const MAX_WALK_SHARE: u32 = 100;

/// The last store-space figures and when they were taken.
#[derive(Debug, Default)]
pub struct SpaceSampler {
    latest: Mutex<Option<(Instant, StoreStats)>>,
}

impl SpaceSampler {
    /// Starts the thread that refreshes the figures every `interval`, or every hundred times
    /// a walk's duration if that is longer (the first at once). It ends when the store is
    /// dropped.
    pub fn start(store: &Arc<Store>, interval: Duration) -> std::io::Result<Arc<SpaceSampler>> {
        let sampler = Arc::new(SpaceSampler::default());
        let weak_store: Weak<Store> = Arc::downgrade(store);
        let weak_sampler = Arc::downgrade(&sampler);
        std::thread::Builder::new().name("metrics-space".into()).spawn(move || loop {
            let (Some(store), Some(sampler)) = (weak_store.upgrade(), weak_sampler.upgrade()) else { return };
            let started = Instant::now();
            match store.stats() {
                Ok(stats) => *sampler.latest.lock() = Some((Instant::now(), stats)),
                Err(e) => tracing::warn!("store space for the metrics: {e}"),
            }
            let walk = started.elapsed();
            drop((store, sampler));
            std::thread::sleep(interval.max(walk * (MAX_WALK_SHARE - 1)));
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
