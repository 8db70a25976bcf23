//! What a migration reports while it runs and when it ends.

use serde::{Deserialize, Serialize};

use crate::protocol::DestReport;
use crate::wire::TrafficReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Connecting,
    /// Fingerprint rounds and data while the VM runs at the source.
    PreCopy,
    /// Source export frozen; the final dirty blocks are crossing.
    SwitchingOver,
    /// The destination serves the disk; missing blocks arrive on demand and in the background.
    PostCopy,
    Done,
    Failed,
    /// Stopped by an operator before the switch-over; the source is untouched.
    Cancelled,
    /// The link is down and reconnecting gave up (or the server restarted): the state is
    /// kept; `migrate resume` continues it, `migrate cancel` (before the switch-over) ends it.
    Interrupted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchAfter {
    /// Switch as soon as the destination has every fingerprint: all missing data comes
    /// post-copy. Shortest time at the source; the destination depends longest on the link.
    Fingerprints,
    /// Switch after one pre-copy pass (the published design): the bulk moves while the VM
    /// runs at the source; only blocks written during that pass come post-copy, each once
    /// with its content at the freeze. Listing-only dirty rounds (no data) repeat while the
    /// dirty set shrinks, so the listing left for the freeze is small.
    #[default]
    Precopy,
    /// Repeat dirty rounds, each with its data, until the dirty set is small or stops
    /// shrinking, then switch: least left for post-copy, but rewritten blocks cross again.
    Converged,
    /// Pre-copy as `precopy`, then listing-only dirty rounds (every half second) keep the
    /// dirty set small until `migrate switch` (the hypervisor's migration hook, when it
    /// pauses the VM) asks for the switch-over.
    Manual,
}

impl std::str::FromStr for SwitchAfter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fingerprints" => Ok(SwitchAfter::Fingerprints),
            "precopy" => Ok(SwitchAfter::Precopy),
            "converged" => Ok(SwitchAfter::Converged),
            "manual" => Ok(SwitchAfter::Manual),
            _ => Err(format!("--switch-after {s:?}: use fingerprints, precopy, converged or manual")),
        }
    }
}

/// A migration's state and figures (the control API returns it; `migrate` prints it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    pub id: String,
    pub disk: String,
    pub role: String,
    pub peer: String,
    pub phase: Phase,
    pub switch_after: SwitchAfter,
    pub disk_bytes: u64,
    pub block_size: u32,
    /// Fingerprint rounds sent (round 0 is the whole map; the last is the final dirty set).
    pub rounds: u32,
    /// Blocks listed in each round (the first 32 rounds).
    pub round_blocks: Vec<u64>,
    /// Blocks listed inside the freeze (the final round).
    #[serde(default)]
    pub final_round_blocks: Option<u64>,
    /// Distinct blocks the destination asked for, and data records sent so far.
    pub blocks_wanted: u64,
    pub blocks_sent: u64,
    /// Of the blocks sent, those sent as deltas against a block the destination holds, the
    /// bytes of those deltas (before the link stream), and the blocks whose sketch named a
    /// candidate reference (asked about with REF_QUERY).
    #[serde(default)]
    pub blocks_sent_as_delta: u64,
    #[serde(default)]
    pub delta_bytes: u64,
    #[serde(default)]
    pub delta_candidates: u64,
    pub zstd_level: i32,
    /// The adaptive level over time: one sample per change, seconds since the start (at
    /// most [`LEVEL_HISTORY`] samples; past that, every other one is dropped).
    #[serde(default)]
    pub zstd_level_history: Vec<LevelSample>,
    pub elapsed_seconds: f64,
    /// From freeze at the source to writable at the destination.
    pub downtime_ms: Option<f64>,
    /// Seconds from the start to the switch-over, and to the end.
    pub switch_seconds: Option<f64>,
    pub total_seconds: Option<f64>,
    pub link: TrafficReport,
    pub destination: DestReport,
    pub error: Option<String>,
    /// Bytes zstd holds for this side's link streams (DATA_STREAM) on the current connection.
    #[serde(default)]
    pub link_stream_memory_bytes: u64,
    /// Whether an operator can still cancel it (before the freeze).
    pub cancellable: bool,
    /// The pre-copy pass is done and the source keeps the dirty set small: a switch-over now
    /// (`migrate switch`) leaves little for post-copy. A switch asked for earlier is taken as
    /// soon as every fingerprint has been listed.
    #[serde(default)]
    pub ready_to_switch: bool,
    /// "connecting", "up", or "down: <why>" (the source reconnects with backoff).
    #[serde(default)]
    pub link_state: String,
    /// The source's bandwidth cap in force, bits per second (None: none).
    #[serde(default)]
    pub bandwidth_bps: Option<u64>,
    /// The gang this migration belongs to (disks moved together), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gang: Option<String>,
}

impl MigrationReport {
    pub fn new(id: &str, disk: &str, role: &str, peer: &str) -> MigrationReport {
        MigrationReport {
            id: id.to_string(),
            disk: disk.to_string(),
            role: role.to_string(),
            peer: peer.to_string(),
            phase: Phase::Connecting,
            switch_after: SwitchAfter::default(),
            disk_bytes: 0,
            block_size: 0,
            rounds: 0,
            round_blocks: Vec::new(),
            final_round_blocks: None,
            blocks_wanted: 0,
            blocks_sent: 0,
            blocks_sent_as_delta: 0,
            delta_bytes: 0,
            delta_candidates: 0,
            zstd_level: 0,
            zstd_level_history: Vec::new(),
            elapsed_seconds: 0.0,
            downtime_ms: None,
            switch_seconds: None,
            total_seconds: None,
            link: TrafficReport::default(),
            destination: DestReport::default(),
            error: None,
            cancellable: true,
            ready_to_switch: false,
            link_stream_memory_bytes: 0,
            link_state: "connecting".into(),
            bandwidth_bps: None,
            gang: None,
        }
    }

    /// Records the background stream's level at `seconds` since the start.
    pub fn record_level(&mut self, seconds: f64, level: i32) {
        self.zstd_level = level;
        if self.zstd_level_history.last().map(|s| s.level) == Some(level) {
            return;
        }
        if self.zstd_level_history.len() >= LEVEL_HISTORY {
            let mut keep = false;
            self.zstd_level_history.retain(|_| {
                keep = !keep;
                keep
            });
        }
        self.zstd_level_history.push(LevelSample { seconds: (seconds * 1000.0).round() / 1000.0, level });
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed | Phase::Cancelled)
    }
}

/// Samples of the level history a report keeps at most.
pub const LEVEL_HISTORY: usize = 512;

/// The zstd level from `seconds` after the start on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LevelSample {
    pub seconds: f64,
    pub level: i32,
}

/// A plan: what moving a disk to one destination would cost, without moving it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlanReport {
    pub disk: String,
    pub destination: String,
    pub disk_bytes: u64,
    pub block_size: u32,
    pub allocated_blocks: u64,
    pub neighbour_hits: u64,
    pub duplicates: u64,
    pub zero_blocks: u64,
    /// Distinct blocks the destination lacks, their raw bytes and their compressed size.
    pub missing_blocks: u64,
    pub missing_bytes: u64,
    pub missing_compressed_bytes: u64,
    /// Fingerprint list and control bytes.
    pub fingerprint_bytes: u64,
    pub estimated_link_bytes: u64,
    /// At the given link rate (bits per second), if one was given.
    pub link_rate_bps: Option<u64>,
    pub estimated_seconds: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_history_keeps_changes_and_stays_bounded() {
        let mut r = MigrationReport::new("m", "vm", "source", "peer");
        r.record_level(0.0, 3);
        r.record_level(0.5, 3);
        r.record_level(1.0, 5);
        assert_eq!(r.zstd_level_history, vec![LevelSample { seconds: 0.0, level: 3 }, LevelSample { seconds: 1.0, level: 5 }]);
        for i in 0..10 * LEVEL_HISTORY {
            r.record_level(i as f64, (i % 2) as i32 + 6);
        }
        assert!(r.zstd_level_history.len() <= LEVEL_HISTORY);
        assert_eq!(r.zstd_level, r.zstd_level_history.last().unwrap().level);
        assert_eq!(r.zstd_level_history[0].seconds, 0.0, "the start stays");
    }
}
