//! Migration metrics: one series per migration this server runs (either side), by id.

use std::collections::HashMap;
use std::time::Instant;

use migration::{MigrationReport, Phase};
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::MetricType;

use super::{counter, gauge, Labels};

/// Every phase, with its label value (the control API's names).
const PHASES: [(Phase, &str); 8] = [
    (Phase::Connecting, "connecting"),
    (Phase::PreCopy, "pre-copy"),
    (Phase::SwitchingOver, "switching-over"),
    (Phase::PostCopy, "post-copy"),
    (Phase::Done, "done"),
    (Phase::Failed, "failed"),
    (Phase::Cancelled, "cancelled"),
    (Phase::Interrupted, "interrupted"),
];

/// A link rate needs two readings of the byte count; windows shorter than this reuse the
/// last rate (scrapes from several Prometheus servers come close together).
const RATE_WINDOW_SECONDS: f64 = 2.0;

/// Per migration: the last reading of its link byte count, and the rate it gave.
#[derive(Debug, Default)]
pub(super) struct RateWindows(HashMap<String, RateWindow>);

#[derive(Debug)]
struct RateWindow {
    at: Instant,
    bytes: u64,
    bits_per_second: f64,
}

impl RateWindows {
    /// The link rate of a migration, bits per second: over the time since an earlier scrape,
    /// or since its start on the first.
    fn rate(&mut self, report: &MigrationReport, now: Instant) -> f64 {
        let bytes = report.link.total_bytes;
        match self.0.get_mut(&report.id) {
            Some(w) => {
                let dt = now.duration_since(w.at).as_secs_f64();
                if dt >= RATE_WINDOW_SECONDS {
                    w.bits_per_second = bytes.saturating_sub(w.bytes) as f64 * 8.0 / dt;
                    w.at = now;
                    w.bytes = bytes;
                }
                w.bits_per_second
            }
            None => {
                let elapsed = report.elapsed_seconds;
                let bits_per_second = if elapsed > 0.0 { bytes as f64 * 8.0 / elapsed } else { 0.0 };
                self.0.insert(report.id.clone(), RateWindow { at: now, bytes, bits_per_second });
                bits_per_second
            }
        }
    }

    /// Forgets migrations the server no longer knows.
    fn keep_only(&mut self, reports: &[MigrationReport]) {
        self.0.retain(|id, _| reports.iter().any(|r| &r.id == id));
    }
}

/// Blocks still to cross: the source counts what the destination asked for and was not sent
/// yet; the destination, what it asked for and has not received.
fn blocks_remaining(r: &MigrationReport) -> u64 {
    if r.role == "source" {
        r.blocks_wanted.saturating_sub(r.blocks_sent)
    } else {
        let d = &r.destination;
        d.wanted.saturating_sub(d.received_before_switch + d.fetched_on_demand + d.fetched_background + d.gone)
    }
}

fn per_migration(r: &MigrationReport) -> Labels<'_> {
    vec![("id", &r.id), ("disk", &r.disk), ("role", &r.role)]
}

pub(super) fn encode(
    encoder: &mut DescriptorEncoder<'_>,
    reports: &[MigrationReport],
    rates: &mut RateWindows,
) -> std::fmt::Result {
    rates.keep_only(reports);
    let now = Instant::now();
    let mut family = encoder.encode_descriptor(
        "migration_phase",
        "1 for the phase a migration is in, 0 for the others",
        None,
        MetricType::Gauge,
    )?;
    for r in reports {
        for (phase, name) in PHASES {
            let labels: Labels<'_> = vec![("id", &r.id), ("disk", &r.disk), ("role", &r.role), ("phase", name)];
            gauge(&mut family, &labels, u64::from(r.phase == phase))?;
        }
    }
    let mut family = encoder.encode_descriptor(
        "migration_link_bytes",
        "Bytes over the link, both directions, by kind (fingerprints: listings and requests; data: block records as sent)",
        None,
        MetricType::Counter,
    )?;
    for r in reports {
        let l = &r.link;
        for (kind, bytes) in
            [("fingerprints", l.fingerprint_bytes), ("data", l.data_wire_bytes), ("control", l.control_bytes)]
        {
            let labels: Labels<'_> = vec![("id", &r.id), ("disk", &r.disk), ("role", &r.role), ("kind", kind)];
            counter(&mut family, &labels, bytes)?;
        }
    }
    let counters: [(&str, &str, fn(&MigrationReport) -> u64); 2] = [
        ("migration_link_resent_bytes", "Sequenced frames sent again after a connection dropped", |r| {
            r.link.replayed_bytes
        }),
        ("migration_reconnects", "Connections re-established after the link dropped", |r| r.link.reconnects),
    ];
    for (name, help, value) in counters {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
        for r in reports {
            counter(&mut family, &per_migration(r), value(r))?;
        }
    }

    let mut family = encoder.encode_descriptor(
        "migration_blocks_remaining",
        "Blocks still to cross the link",
        None,
        MetricType::Gauge,
    )?;
    for r in reports {
        gauge(&mut family, &per_migration(r), blocks_remaining(r))?;
    }
    let mut rate_by_id = Vec::with_capacity(reports.len());
    let mut family = encoder.encode_descriptor(
        "migration_link_rate_bits_per_second",
        "Link rate over the last scrape interval (at least 2 s), both directions",
        None,
        MetricType::Gauge,
    )?;
    for r in reports {
        let rate = if r.is_finished() { 0.0 } else { rates.rate(r, now) };
        rate_by_id.push(rate);
        gauge(&mut family, &per_migration(r), rate)?;
    }
    let mut family = encoder.encode_descriptor(
        "migration_eta_seconds",
        "Time left at the current link rate for the blocks still to cross (source side, while data flows)",
        None,
        MetricType::Gauge,
    )?;
    for (r, rate) in reports.iter().zip(&rate_by_id) {
        if r.role != "source" || r.is_finished() || *rate <= 0.0 {
            continue;
        }
        // Bytes per block as they crossed so far (compressed), the block size before any did.
        let per_block = if r.blocks_sent > 0 {
            r.link.data_wire_bytes as f64 / r.blocks_sent as f64
        } else {
            f64::from(r.block_size)
        };
        gauge(&mut family, &per_migration(r), blocks_remaining(r) as f64 * per_block * 8.0 / rate)?;
    }
    type Gauge = fn(&MigrationReport) -> Option<f64>;
    let gauges: [(&str, &str, Gauge); 4] = [
        (
            "migration_downtime_seconds",
            "From the freeze at the source to the disk writable at the destination, once switched",
            |r| r.downtime_ms.map(|ms| ms / 1000.0),
        ),
        ("migration_elapsed_seconds", "Time since the migration started", |r| Some(r.elapsed_seconds)),
        ("migration_zstd_level", "The level the link's block stream is compressed at now", |r| {
            Some(f64::from(r.zstd_level))
        }),
        ("migration_bandwidth_cap_bits_per_second", "The bandwidth cap in force (absent: none)", |r| {
            r.bandwidth_bps.map(|b| b as f64)
        }),
    ];
    for (name, help, value) in gauges {
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for r in reports {
            if let Some(v) = value(r) {
                gauge(&mut family, &per_migration(r), v)?;
            }
        }
    }
    Ok(())
}
