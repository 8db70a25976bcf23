//! `migrate` with several disks: a gang. Each member is an ordinary migration at the source
//! (its own id, switch-over, downtime, cancel and resume); they share a gang name, which
//! the destination uses to ask once for content several of them lack, and the source to
//! hold them to one bandwidth cap.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use migration::{MigrationReport, Phase, PlanReport};
use serde::Serialize;
use serde_json::json;
use tools::control::ControlClient;
use tools::size::format_size;
use tools::table;

/// Disk names from a file: one per line, blank lines and `#` comments ignored.
pub fn read_disk_list(path: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    Ok(text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(str::to_string).collect())
}

pub fn check_distinct(disks: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    for d in disks {
        if !seen.insert(d) {
            bail!("disk {d:?} is named twice");
        }
    }
    Ok(())
}

/// A name no other gang has: the destination groups members by it.
pub fn new_name() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("gang-{:x}-{:x}", std::process::id(), nanos as u64)
}

/// A gang's plan at one destination: the gang as one migration, and each disk on its own.
#[derive(Debug, Serialize)]
struct GangPlan {
    destination: String,
    gang: PlanReport,
    one_by_one: Vec<PlanReport>,
    one_by_one_link_bytes: u64,
    one_by_one_seconds: Option<f64>,
}

/// `migrate plan` with several disks: for each candidate destination, what the gang would
/// send against the sum of the disks migrated one by one.
pub fn plan(source: &mut ControlClient, disks: &[String], dests: &[String], rate: Option<u64>, json_out: bool) -> Result<()> {
    check_distinct(disks)?;
    let mut plans = Vec::new();
    for d in dests {
        let mut dest = ControlClient::connect(d)?;
        let addr = super::migration_address(&mut dest)?;
        let mut gang: PlanReport = serde_json::from_value(source.call("migration.plan", json!({"disks": disks, "destination": addr, "link_rate_bps": rate}))?)?;
        gang.destination = d.clone();
        let mut one_by_one = Vec::new();
        for disk in disks {
            let r: PlanReport = serde_json::from_value(source.call("migration.plan", json!({"disk": disk, "destination": addr, "link_rate_bps": rate}))?)?;
            one_by_one.push(r);
        }
        let one_by_one_link_bytes = one_by_one.iter().map(|r| r.estimated_link_bytes).sum();
        let one_by_one_seconds = one_by_one.iter().map(|r| r.estimated_seconds).sum();
        plans.push(GangPlan { destination: d.clone(), gang, one_by_one, one_by_one_link_bytes, one_by_one_seconds });
    }
    let best = plans.iter().min_by_key(|p| p.gang.estimated_link_bytes).map(|p| p.destination.clone());
    if json_out {
        println!("{}", serde_json::to_string_pretty(&json!({"gang_plans": plans, "cheapest": best}))?);
        return Ok(());
    }
    let secs = |s: Option<f64>| s.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into());
    let rows: Vec<Vec<String>> = plans
        .iter()
        .map(|p| {
            vec![
                p.destination.clone(),
                p.gang.missing_blocks.to_string(),
                format_size(p.gang.estimated_link_bytes),
                secs(p.gang.estimated_seconds),
                format_size(p.one_by_one_link_bytes),
                secs(p.one_by_one_seconds),
                format!("{:.2}", p.gang.estimated_link_bytes as f64 / p.one_by_one_link_bytes.max(1) as f64),
            ]
        })
        .collect();
    println!("gang of {} disks: {}", disks.len(), disks.join(", "));
    print!(
        "{}",
        table::render(&["destination", "missing (distinct)", "gang over the link", "gang time", "one by one", "one by one time", "gang / one by one"], &rows)
    );
    if let Some(b) = best {
        println!("cheapest: {b}");
    }
    Ok(())
}

/// The gang as a whole: sums over its members' reports.
#[derive(Debug, Default, Serialize)]
pub struct GangTotal {
    pub disks: usize,
    pub done: usize,
    /// From the first member's start to the last member's end.
    pub seconds: f64,
    pub link_total_bytes: u64,
    pub link_fingerprint_bytes: u64,
    pub link_data_wire_bytes: u64,
    pub link_data_raw_bytes: u64,
    pub link_control_bytes: u64,
    pub link_resent_raw_bytes: u64,
    pub blocks_listed: u64,
    pub blocks_wanted: u64,
    pub blocks_sent: u64,
    /// Distinct contents a member took from another member's transfer instead of its own.
    pub blocks_gang_shared: u64,
    pub blocks_neighbour_hits: u64,
    pub blocks_duplicates: u64,
    pub blocks_zero: u64,
    pub max_downtime_ms: Option<f64>,
}

impl GangTotal {
    pub fn of(reports: &[MigrationReport]) -> GangTotal {
        let mut t = GangTotal { disks: reports.len(), ..Default::default() };
        for r in reports {
            let (l, d) = (&r.link, &r.destination);
            t.done += usize::from(r.phase == Phase::Done);
            t.seconds = t.seconds.max(r.total_seconds.unwrap_or(r.elapsed_seconds));
            t.link_total_bytes += l.total_bytes;
            t.link_fingerprint_bytes += l.fingerprint_bytes;
            t.link_data_wire_bytes += l.data_wire_bytes;
            t.link_data_raw_bytes += l.data_raw_bytes;
            t.link_control_bytes += l.control_bytes;
            t.link_resent_raw_bytes += l.resent_raw_bytes;
            t.blocks_listed += d.blocks_listed;
            t.blocks_wanted += r.blocks_wanted;
            t.blocks_sent += r.blocks_sent;
            t.blocks_gang_shared += d.gang_shared;
            t.blocks_neighbour_hits += d.neighbour_hits;
            t.blocks_duplicates += d.duplicates;
            t.blocks_zero += d.zero_blocks;
            if let Some(ms) = r.downtime_ms {
                t.max_downtime_ms = Some(t.max_downtime_ms.map_or(ms, |m: f64| m.max(ms)));
            }
        }
        t
    }
}

/// Resumes every unfinished outgoing member of gang `name` at its source server (after a
/// restart of that server each waits, interrupted, for this), then follows the gang.
pub fn resume(src: &mut ControlClient, name: &str, no_wait: bool, json_out: bool, timeout: Option<u64>) -> Result<()> {
    let all: Vec<MigrationReport> = serde_json::from_value(src.call("migration.list", json!({}))?)?;
    let members: Vec<&MigrationReport> = all.iter().filter(|r| r.role == "source" && r.gang.as_deref() == Some(name)).collect();
    if members.is_empty() {
        bail!("no outgoing migration of gang {name:?} at this server");
    }
    let mut ids = Vec::with_capacity(members.len());
    for r in &members {
        if !r.is_finished() {
            src.call("migration.resume", json!({"id": r.id}))?;
            eprintln!("gang {name}: resuming {} ({})", r.id, r.disk);
        }
        ids.push(r.id.clone());
    }
    if no_wait {
        return Ok(());
    }
    follow(src, name, &ids, json_out, timeout)
}

/// Shows a gang's progress at its source until every member ends; fails unless all are done.
pub fn follow(src: &mut ControlClient, name: &str, ids: &[String], hidden: bool, timeout: Option<u64>) -> Result<()> {
    let started = Instant::now();
    let bar = (!hidden).then(|| {
        let b = ProgressBar::new(1);
        b.set_style(ProgressStyle::with_template("{prefix:>11} [{bar:30}] {pos}/{len} blocks  {msg}").expect("template").progress_chars("=> "));
        b.set_prefix("gang");
        b
    });
    let mut switched: HashSet<String> = HashSet::new();
    let mut ended: HashSet<String> = HashSet::new();
    let reports = loop {
        let mut reports = Vec::with_capacity(ids.len());
        for id in ids {
            let r: MigrationReport = serde_json::from_value(src.call("migration.status", json!({"id": id}))?)?;
            reports.push(r);
        }
        if let Some(b) = &bar {
            for r in &reports {
                if r.downtime_ms.is_some() && switched.insert(r.id.clone()) {
                    b.println(format!(
                        "{}: switched over after {:.2} s (downtime {:.1} ms)",
                        r.disk,
                        r.switch_seconds.unwrap_or_default(),
                        r.downtime_ms.unwrap_or_default()
                    ));
                }
                if r.is_finished() && ended.insert(r.id.clone()) {
                    let why = r.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
                    b.println(format!("{}: {:?}{why}", r.disk, r.phase));
                }
            }
            let t = GangTotal::of(&reports);
            b.set_length(t.blocks_wanted.max(1));
            b.set_position(t.blocks_sent.min(t.blocks_wanted));
            b.set_message(format!("{} of {} disks done, {} over the link", t.done, t.disks, format_size(t.link_total_bytes)));
        }
        if reports.iter().all(MigrationReport::is_finished) {
            break reports;
        }
        if let Some(t) = timeout {
            if started.elapsed() > Duration::from_secs(t) {
                bail!("gang {name} still running after {t} s");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let total = GangTotal::of(&reports);
    if hidden {
        println!("{}", serde_json::to_string_pretty(&json!({"gang": name, "total": total, "disks": reports}))?);
    } else {
        print_gang(name, &reports, &total);
    }
    let failed: Vec<&str> = reports.iter().filter(|r| r.phase != Phase::Done).map(|r| r.disk.as_str()).collect();
    if !failed.is_empty() {
        bail!("gang {name}: {} of {} disks did not migrate: {}", failed.len(), reports.len(), failed.join(", "));
    }
    Ok(())
}

fn print_gang(name: &str, reports: &[MigrationReport], t: &GangTotal) {
    println!("gang {name}: {} of {} disks migrated in {:.2} s", t.done, t.disks, t.seconds);
    let ms = |m: Option<f64>| m.map(|m| format!("{m:.1} ms")).unwrap_or_else(|| "-".into());
    let mut rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            let d = &r.destination;
            vec![
                r.disk.clone(),
                format!("{:?}", r.phase),
                format!("{:.2} s", r.total_seconds.unwrap_or(r.elapsed_seconds)),
                ms(r.downtime_ms),
                format_size(r.link.total_bytes),
                r.blocks_sent.to_string(),
                d.gang_shared.to_string(),
                d.neighbour_hits.to_string(),
                d.duplicates.to_string(),
            ]
        })
        .collect();
    rows.push(vec![
        "gang".into(),
        format!("{}/{} done", t.done, t.disks),
        format!("{:.2} s", t.seconds),
        ms(t.max_downtime_ms),
        format_size(t.link_total_bytes),
        t.blocks_sent.to_string(),
        t.blocks_gang_shared.to_string(),
        t.blocks_neighbour_hits.to_string(),
        t.blocks_duplicates.to_string(),
    ]);
    print!("{}", table::render(&["disk", "phase", "time", "downtime", "link", "blocks sent", "from the gang", "from neighbours", "duplicates"], &rows));
    println!(
        "link: {} fingerprints, {} block data ({} raw), {} control",
        format_size(t.link_fingerprint_bytes),
        format_size(t.link_data_wire_bytes),
        format_size(t.link_data_raw_bytes),
        format_size(t.link_control_bytes)
    );
    for r in reports {
        if let Some(e) = &r.error {
            println!("{}: {e}", r.disk);
        }
    }
}
