//! Prometheus metrics of one server (`nbd-server --metrics-listen ADDR`, path `/metrics`).
//!
//! Everything is gathered at scrape time from the counters the server keeps anyway (export
//! counters and latency histograms, migration reports), so serving metrics adds no work to
//! the data path. The one exception is store space: adding it up walks the reference index
//! (one entry per stored block), so a thread of its own refreshes it every
//! `--metrics-space-interval` seconds and scrapes read the last figures, with their age.
//!
//! The text is OpenMetrics, written by the `prometheus-client` crate's encoder.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `nbdcas_export_requests`, `_bytes`, `_errors` | counter | export, op |
//! | `nbdcas_export_rejected` | counter | export |
//! | `nbdcas_export_connections` (open), `nbdcas_export_connections_opened` | gauge, counter | export |
//! | `nbdcas_export_request_duration_seconds` (READ, WRITE, FLUSH) | histogram | export, op |
//! | `nbdcas_store_{logical,allocated,stored,container,reclaimable,index}_bytes`, `nbdcas_store_dedupe_ratio`, `nbdcas_store_disks`, `nbdcas_store_space_age_seconds` | gauge | |
//! | `nbdcas_migration_phase` (1 for the current phase) | gauge | id, disk, role, phase |
//! | `nbdcas_migration_link_bytes` | counter | id, disk, role, kind (fingerprints, data, control) |
//! | `nbdcas_migration_link_resent_bytes`, `nbdcas_migration_reconnects` | counter | id, disk, role |
//! | `nbdcas_migration_blocks_remaining`, `_link_rate_bits_per_second`, `_eta_seconds`, `_downtime_seconds`, `_elapsed_seconds`, `_zstd_level`, `_bandwidth_cap_bits_per_second` | gauge | id, disk, role |

mod http;
mod migrations;
mod space;

use std::sync::Arc;

use parking_lot::Mutex;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeCounterValue, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::export::Op;
use crate::node::Node;

pub use http::serve_metrics;
pub use space::{SpaceSampler, DEFAULT_SPACE_INTERVAL};

/// What `/metrics` shows: one server's exports, store and migrations.
#[derive(Debug)]
pub struct Metrics {
    node: Arc<Node>,
    space: Arc<SpaceSampler>,
    rates: Mutex<migrations::RateWindows>,
}

impl Metrics {
    pub fn new(node: Arc<Node>, space: Arc<SpaceSampler>) -> Arc<Metrics> {
        Arc::new(Metrics { node, space, rates: Mutex::new(migrations::RateWindows::default()) })
    }

    /// The OpenMetrics text of everything, now.
    pub fn render(self: &Arc<Self>) -> String {
        let mut registry = Registry::with_prefix("nbdcas");
        registry.register_collector(Box::new(Arc::clone(self)));
        let mut out = String::with_capacity(16 << 10);
        // Writing into a String cannot fail; an encoder error would be a bug in a label.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

impl prometheus_client::collector::Collector for Metrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.encode_exports(&mut encoder)?;
        self.space.encode(&mut encoder)?;
        let reports = self.node.migrations();
        migrations::encode(&mut encoder, &reports, &mut self.rates.lock())
    }
}

const OPS: [(Op, &str); 7] = [
    (Op::Read, "read"),
    (Op::Write, "write"),
    (Op::WriteZeroes, "write_zeroes"),
    (Op::Trim, "trim"),
    (Op::Flush, "flush"),
    (Op::Cache, "cache"),
    (Op::BlockStatus, "block_status"),
];

type Labels<'a> = Vec<(&'static str, &'a str)>;

impl Metrics {
    fn encode_exports(&self, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let exports = self.node.exports.list();
        let snapshots: Vec<_> = exports.iter().map(|e| (e.name().to_string(), e.stats().snapshot())).collect();
        let by_op = |s: &crate::StatsSnapshot, op: Op| match op {
            Op::Read => s.read,
            Op::Write => s.write,
            Op::WriteZeroes => s.write_zeroes,
            Op::Trim => s.trim,
            Op::Flush => s.flush,
            Op::Cache => s.cache,
            Op::BlockStatus => s.block_status,
        };
        type Field = fn(&crate::export::OpSnapshot) -> u64;
        let fields: [(&str, &str, Field); 3] = [
            ("export_requests", "Requests that reached the device", |o| o.requests),
            ("export_bytes", "Bytes read or written by requests that succeeded", |o| o.bytes),
            ("export_errors", "Requests the device failed", |o| o.errors),
        ];
        for (name, help, field) in fields {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (export, s) in &snapshots {
                for (op, op_name) in OPS {
                    let labels: Labels<'_> = vec![("export", export), ("op", op_name)];
                    counter(&mut family, &labels, field(&by_op(s, op)))?;
                }
            }
        }
        type PerExport = fn(&crate::StatsSnapshot) -> u64;
        let per_export: [(&str, &str, MetricType, PerExport); 3] = [
            (
                "export_rejected",
                "Requests the server refused before the device (bad range, read-only, frozen)",
                MetricType::Counter,
                |s| s.rejected,
            ),
            ("export_connections", "Connections open now", MetricType::Gauge, |s| s.connections_active),
            ("export_connections_opened", "Connections opened since the start", MetricType::Counter, |s| {
                s.connections_total
            }),
        ];
        for (name, help, kind, value) in per_export {
            let mut family = encoder.encode_descriptor(name, help, None, kind.clone())?;
            for (export, s) in &snapshots {
                let labels = vec![("export", export.as_str())];
                match kind {
                    MetricType::Counter => counter(&mut family, &labels, value(s))?,
                    _ => gauge(&mut family, &labels, value(s))?,
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "export_request_duration_seconds",
            "Time from a request's start to its reply (a write held by a freeze counts), READ WRITE FLUSH",
            None,
            MetricType::Histogram,
        )?;
        for export in &exports {
            for (op, op_name) in [(Op::Read, "read"), (Op::Write, "write"), (Op::Flush, "flush")] {
                let Some(histogram) = export.stats().latency(op) else { continue };
                let (sum, count, buckets) = histogram.buckets();
                let labels: Labels<'_> = vec![("export", export.name()), ("op", op_name)];
                family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

pub(crate) fn counter(
    family: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    value: impl EncodeCounterValue,
) -> std::fmt::Result {
    family.encode_family(labels)?.encode_counter::<NoLabelSet, _, f64>(&value, None)
}

pub(crate) fn gauge(
    family: &mut prometheus_client::encoding::MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    value: impl EncodeGaugeValue,
) -> std::fmt::Result {
    family.encode_family(labels)?.encode_gauge(&value)
}
