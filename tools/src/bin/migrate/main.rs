//! `migrate`: move a disk from one server (datacentre) to another, sending only the blocks
//! the destination lacks; or, with `plan`, compare destinations without moving anything.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use argh::FromArgs;
use indicatif::{ProgressBar, ProgressStyle};
use migration::{MigrationReport, Phase, PlanReport};
use serde_json::json;
use tools::control::ControlClient;
use tools::size::format_size;
use tools::table;

mod gang;

/// Migrate a disk between two servers: `migrate --source CONTROL --dest CONTROL --disk NAME`.
/// CONTROL is a server's control socket path or host:port. Several `--disk` (or
/// `--disks-from`) migrate a gang: content several of them lack crosses once, the
/// `--bandwidth` cap is for the gang as a whole, and each disk switches over, can be
/// cancelled and fails on its own.
#[derive(FromArgs, Debug)]
struct Migrate {
    #[argh(subcommand)]
    command: Option<Sub>,
    /// control address of the server that has the disk
    #[argh(option)]
    source: Option<String>,
    /// control address of the server to move it to
    #[argh(option)]
    dest: Option<String>,
    /// the disk to move (repeat for a gang)
    #[argh(option)]
    disk: Vec<String>,
    /// a file naming the disks of a gang, one per line (# starts a comment)
    #[argh(option)]
    disks_from: Option<String>,
    /// when to switch over: fingerprints, precopy (default: one pre-copy pass and
    /// listing-only dirty rounds, then post-copy for what changed meanwhile), converged
    /// (dirty rounds with their data) or manual (pre-copy, then listing-only rounds until
    /// `migrate switch` is run, e.g. by the hypervisor's hook when it pauses the VM)
    #[argh(option, default = "migration::SwitchAfter::Precopy")]
    switch_after: migration::SwitchAfter,
    /// a fixed zstd level (default: adapt to the link)
    #[argh(option)]
    zstd_level: Option<i32>,
    /// rounds at most, round 0 included, before the freeze (default 8)
    #[argh(option)]
    max_rounds: Option<u32>,
    /// a dirty set of at most this many blocks counts as converged (default 256)
    #[argh(option)]
    converge_blocks: Option<u64>,
    /// delete the disk at the source once the destination has every block
    #[argh(switch)]
    delete_source: bool,
    /// cap the link use, e.g. 100mbit (default: no cap)
    #[argh(option)]
    bandwidth: Option<String>,
    /// seconds the source keeps reconnecting after a lost link before the migration is
    /// interrupted and waits for `migrate resume` (default 600)
    #[argh(option)]
    reconnect_window: Option<u64>,
    /// give up after this many seconds (default: no limit)
    #[argh(option)]
    timeout: Option<u64>,
    /// compress each ~1 MiB DATA frame on its own instead of one long-window zstd stream per
    /// connection (to measure what the stream gives)
    #[argh(switch)]
    no_stream: bool,
    /// send every block whole, never as a delta against a similar block the destination
    /// holds (to measure what deltas give)
    #[argh(switch)]
    no_delta: bool,
    /// print the final report as JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Sub {
    Plan(PlanCmd),
    Status(StatusCmd),
    Cancel(CancelCmd),
    Resume(ResumeCmd),
    Switch(SwitchCmd),
    SetBandwidth(SetBandwidthCmd),
}

/// Change the bandwidth cap of a running migration (at its source server), up, down or off:
/// the link follows within a tenth of a second.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "set-bandwidth")]
struct SetBandwidthCmd {
    /// control address of the source server
    #[argh(option)]
    server: String,
    /// the migration id
    #[argh(positional)]
    id: String,
    /// the new cap, e.g. 50mbit, 1gbit, or "off"
    #[argh(positional)]
    rate: String,
    /// print the report as JSON
    #[argh(switch)]
    json: bool,
}

/// Switch a migration over now (at its source server): the source export holds the guest's
/// I/O, the last written blocks are listed, and the destination serves the disk. Returns once
/// it does, with the downtime. This is the call a hypervisor's migration hook makes when it
/// pauses the VM (`--switch-after manual`).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "switch")]
struct SwitchCmd {
    /// control address of the source server
    #[argh(option)]
    server: String,
    /// the migration id
    #[argh(positional)]
    id: String,
    /// print the report as JSON
    #[argh(switch)]
    json: bool,
}

/// Resume a migration whose link gave up or whose server restarted (at its source server),
/// and follow it to the end.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "resume")]
struct ResumeCmd {
    /// control address of the source server
    #[argh(option)]
    server: String,
    /// the migration id (or --gang)
    #[argh(positional)]
    id: Option<String>,
    /// resume every unfinished outgoing member of this gang at the server, and follow the gang
    #[argh(option)]
    gang: Option<String>,
    /// return at once instead of following the migration
    #[argh(switch)]
    no_wait: bool,
    /// give up following after this many seconds (default: no limit)
    #[argh(option)]
    timeout: Option<u64>,
    /// print the final report as JSON
    #[argh(switch)]
    json: bool,
}

/// Show migrations at a server (all, or one by id).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// control address of the server
    #[argh(option)]
    server: String,
    /// a migration id (default: every migration the server knows)
    #[argh(positional)]
    id: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Cancel a migration before its switch-over (at its source server); the source stays
/// authoritative and the destination removes its partial disk.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "cancel")]
struct CancelCmd {
    /// control address of the source server
    #[argh(option)]
    server: String,
    /// the migration id
    #[argh(positional)]
    id: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Compare candidate destinations by the data each would need, without moving any.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "plan")]
struct PlanCmd {
    /// control address of the server that has the disk
    #[argh(option)]
    source: String,
    /// control address of a candidate destination (repeatable)
    #[argh(option)]
    dest: Vec<String>,
    /// the disk to move (repeat for a gang: planned as one migration of all, against the
    /// sum of the disks moved one by one)
    #[argh(option)]
    disk: Vec<String>,
    /// link rate for the time estimate, e.g. 100mbit, 1gbit
    #[argh(option)]
    link_rate: Option<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

fn main() {
    let args: Migrate = argh::from_env();
    let result = match args.command {
        Some(Sub::Plan(ref p)) => plan(p),
        Some(Sub::Status(ref s)) => status(s),
        Some(Sub::Cancel(ref c)) => cancel(c),
        Some(Sub::Resume(ref r)) => resume(r),
        Some(Sub::Switch(ref s)) => switch(s),
        Some(Sub::SetBandwidth(ref s)) => set_bandwidth(s),
        None => run(&args),
    };
    if let Err(e) = result {
        eprintln!("migrate: error: {e:#}");
        std::process::exit(1);
    }
}

/// "100mbit", "1gbit", "500kbit", "1000000" (bits per second).
fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.trim_end_matches("/s").trim_end_matches("ps");
    let (num, mult) = if let Some(n) = t.strip_suffix("gbit") {
        (n, 1e9)
    } else if let Some(n) = t.strip_suffix("mbit") {
        (n, 1e6)
    } else if let Some(n) = t.strip_suffix("kbit") {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix("bit") {
        (n, 1.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().with_context(|| format!("link rate {s:?}: use e.g. 100mbit"))?;
    if v <= 0.0 {
        bail!("link rate {s:?} must be positive");
    }
    Ok((v * mult) as u64)
}

pub(crate) fn migration_address(dest: &mut ControlClient) -> Result<String> {
    let info = dest.call("server.info", json!({}))?;
    info["addresses"]["migration"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("the server at {} does not accept migrations (start it with --migration-listen)", dest.address()))
}

fn plan(p: &PlanCmd) -> Result<()> {
    if p.dest.is_empty() {
        bail!("give at least one --dest");
    }
    let rate = p.link_rate.as_deref().map(parse_rate).transpose()?;
    let mut source = ControlClient::connect(&p.source)?;
    match p.disk.len() {
        0 => bail!("give --disk NAME"),
        1 => {}
        _ => return gang::plan(&mut source, &p.disk, &p.dest, rate, p.json),
    }
    let mut plans: Vec<PlanReport> = Vec::new();
    for d in &p.dest {
        let mut dest = ControlClient::connect(d)?;
        let addr = migration_address(&mut dest)?;
        let v = source.call("migration.plan", json!({"disk": p.disk[0], "destination": addr, "link_rate_bps": rate}))?;
        let mut report: PlanReport = serde_json::from_value(v)?;
        report.destination = d.clone();
        plans.push(report);
    }
    let best = plans.iter().min_by_key(|r| r.estimated_link_bytes).map(|r| r.destination.clone());
    if p.json {
        println!("{}", serde_json::to_string_pretty(&json!({"plans": plans, "cheapest": best}))?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = plans
        .iter()
        .map(|r| {
            vec![
                r.destination.clone(),
                format!("{} of {}", r.neighbour_hits, r.allocated_blocks),
                r.missing_blocks.to_string(),
                format_size(r.missing_bytes),
                format_size(r.estimated_link_bytes),
                r.estimated_seconds.map(|s| format!("{s:.1} s")).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!("{}", table::render(&["destination", "blocks it has", "missing", "missing bytes", "over the link", "time"], &rows));
    if let Some(b) = best {
        println!("cheapest: {b}");
    }
    Ok(())
}

fn status(s: &StatusCmd) -> Result<()> {
    let mut server = ControlClient::connect(&s.server)?;
    let reports: Vec<MigrationReport> = match &s.id {
        Some(id) => vec![serde_json::from_value(server.call("migration.status", json!({"id": id}))?)?],
        None => serde_json::from_value(server.call("migration.list", json!({}))?)?,
    };
    if s.json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = reports
        .iter()
        .map(|r| {
            vec![
                r.id.clone(),
                r.disk.clone(),
                r.role.clone(),
                if r.ready_to_switch && r.switch_seconds.is_none() { format!("{:?} (ready to switch)", r.phase) } else { format!("{:?}", r.phase) },
                r.link_state.clone(),
                format!("{}/{}", r.blocks_sent, r.blocks_wanted),
                format_size(r.link.total_bytes),
                r.bandwidth_bps.map_or("-".into(), |b| format!("{:.1} Mbit/s", b as f64 / 1e6)),
                format!("{:.1} s", r.total_seconds.unwrap_or(r.elapsed_seconds)),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!("{}", table::render(&["id", "disk", "role", "phase", "link", "blocks", "bytes", "cap", "time", "error"], &rows));
    Ok(())
}

fn cancel(c: &CancelCmd) -> Result<()> {
    let mut server = ControlClient::connect(&c.server)?;
    server.call("migration.cancel", json!({"id": c.id}))?;
    // Wait for it to stop, so that "cancelled" means the destination has let go too.
    for _ in 0..300 {
        let r: MigrationReport = serde_json::from_value(server.call("migration.status", json!({"id": c.id}))?)?;
        if r.is_finished() {
            if c.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("migration {} of {}: {:?}", r.id, r.disk, r.phase);
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("migration {} did not stop within 30 s", c.id)
}

fn switch(s: &SwitchCmd) -> Result<()> {
    let mut server = ControlClient::connect(&s.server)?;
    let asked = Instant::now();
    let report: MigrationReport = serde_json::from_value(server.call("migration.switch", json!({"id": s.id}))?)?;
    let took = asked.elapsed();
    if s.json {
        let mut v = serde_json::to_value(&report)?;
        v["switch_call_ms"] = json!(took.as_secs_f64() * 1000.0);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "migration {} of {}: the destination serves the disk (downtime {:.1} ms; {} blocks listed inside the freeze; this call took {:.1} ms)",
            report.id,
            report.disk,
            report.downtime_ms.unwrap_or_default(),
            report.final_round_blocks.unwrap_or_default(),
            took.as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

fn set_bandwidth(s: &SetBandwidthCmd) -> Result<()> {
    let rate = match s.rate.trim() {
        "off" | "none" | "0" => None,
        r => Some(parse_rate(r)?),
    };
    let report: MigrationReport =
        serde_json::from_value(ControlClient::connect(&s.server)?.call("migration.set_bandwidth", json!({"id": s.id, "bandwidth_bps": rate}))?)?;
    if s.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        match report.bandwidth_bps {
            Some(bps) => println!("migration {}: capped at {:.1} Mbit/s", report.id, bps as f64 / 1e6),
            None => println!("migration {}: no bandwidth cap", report.id),
        }
    }
    Ok(())
}

fn run(args: &Migrate) -> Result<()> {
    let mut disks = args.disk.clone();
    if let Some(file) = &args.disks_from {
        disks.extend(gang::read_disk_list(file)?);
    }
    let (Some(source), Some(dest), false) = (&args.source, &args.dest, disks.is_empty()) else {
        bail!("give --source CONTROL --dest CONTROL --disk NAME (or `migrate plan ...`)");
    };
    let mut src = ControlClient::connect(source)?;
    let mut dst = ControlClient::connect(dest)?;
    let addr = migration_address(&mut dst)?;
    let start = |src: &mut ControlClient, disk: &str, gang: Option<&str>| -> Result<String> {
        let v = src.call(
            "migration.start",
            json!({
                "disk": disk, "destination": addr, "switch_after": args.switch_after,
                "zstd_level": args.zstd_level, "max_rounds": args.max_rounds,
                "converge_blocks": args.converge_blocks, "delete_source": args.delete_source,
                "bandwidth_bps": args.bandwidth.as_deref().map(parse_rate).transpose()?,
                "reconnect_window_secs": args.reconnect_window,
                "data_stream": !args.no_stream,
                "delta": !args.no_delta,
                "gang": gang,
            }),
        )?;
        let id = v["id"].as_str().context("no migration id")?.to_string();
        // Scripts (a hypervisor hook) find the id here, on stderr, whatever the output format.
        eprintln!("migration {id} started: {disk} from {source} to {dest}");
        Ok(id)
    };
    if disks.len() == 1 {
        let id = start(&mut src, &disks[0], None)?;
        return follow(&mut src, &id, dest, args.json, args.timeout);
    }
    gang::check_distinct(&disks)?;
    let name = gang::new_name();
    let mut ids = Vec::with_capacity(disks.len());
    for disk in &disks {
        match start(&mut src, disk, Some(&name)) {
            Ok(id) => ids.push(id),
            Err(e) => {
                // Nothing half-started: the members already running are cancelled.
                for id in &ids {
                    let _ = src.call("migration.cancel", json!({"id": id}));
                }
                return Err(e.context(format!("starting the migration of {disk} (gang {name})")));
            }
        }
    }
    eprintln!("gang {name}: {} disks", ids.len());
    gang::follow(&mut src, &name, &ids, args.json, args.timeout)
}

fn resume(r: &ResumeCmd) -> Result<()> {
    let mut server = ControlClient::connect(&r.server)?;
    let id = match (&r.id, &r.gang) {
        (Some(id), None) => id.clone(),
        (None, Some(name)) => return gang::resume(&mut server, name, r.no_wait, r.json, r.timeout),
        _ => bail!("give a migration id or --gang NAME"),
    };
    server.call("migration.resume", json!({"id": id}))?;
    if r.no_wait {
        let report: MigrationReport = serde_json::from_value(server.call("migration.status", json!({"id": id}))?)?;
        if r.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            println!("migration {} of {}: resuming ({:?}, link {})", report.id, report.disk, report.phase, report.link_state);
        }
        return Ok(());
    }
    let peer = server.call("migration.status", json!({"id": id}))?["peer"].as_str().unwrap_or("the destination").to_string();
    follow(&mut server, &id, &peer, r.json, r.timeout)
}

/// Shows a migration's progress at its source until it ends; fails unless it is done.
fn follow(src: &mut ControlClient, id: &str, dest: &str, hidden: bool, timeout: Option<u64>) -> Result<()> {
    let started = Instant::now();
    let mut link_was_up = true;
    let mut bar: Option<(Phase, ProgressBar)> = None;
    let mut announced_switch = false;
    let mut announced_ready = false;
    let report = loop {
        let r: MigrationReport = serde_json::from_value(src.call("migration.status", json!({"id": id}))?)?;
        if !hidden {
            let up = r.link_state == "up" || r.link_state == "connecting";
            if up != link_was_up {
                link_was_up = up;
                let line = if up { "link back: resuming where it stopped".to_string() } else { format!("link lost ({}); reconnecting", r.link_state) };
                match &bar {
                    Some((_, b)) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
            show_progress(&mut bar, &r);
            if r.ready_to_switch && r.switch_seconds.is_none() && !announced_ready {
                announced_ready = true;
                let line = format!("pre-copy done; ready to switch: migrate switch --server {} {id}", src.address());
                match &bar {
                    Some((_, b)) => b.println(line),
                    None => eprintln!("{line}"),
                }
            }
            if r.downtime_ms.is_some() && !announced_switch {
                announced_switch = true;
                let line = format!(
                    "switched over after {:.2} s: {} is now served by {dest} (downtime {:.1} ms)",
                    r.switch_seconds.unwrap_or_default(),
                    r.disk,
                    r.downtime_ms.unwrap_or_default()
                );
                match &bar {
                    Some((_, b)) => b.println(line),
                    None => println!("{line}"),
                }
            }
        }
        if r.is_finished() {
            break r;
        }
        if let Some(t) = timeout {
            if started.elapsed() > Duration::from_secs(t) {
                bail!("migration {id} still running after {t} s (phase {:?})", r.phase);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if let Some((_, b)) = bar.take() {
        b.finish_and_clear();
    }
    if hidden {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if report.phase != Phase::Done {
        bail!("migration failed: {}", report.error.unwrap_or_default());
    }
    Ok(())
}

fn show_progress(bar: &mut Option<(Phase, ProgressBar)>, r: &MigrationReport) {
    let phase_name = match r.phase {
        Phase::Connecting => "connecting",
        Phase::PreCopy => "pre-copy",
        Phase::SwitchingOver => "switch-over",
        Phase::PostCopy => "post-copy",
        Phase::Interrupted => "interrupted",
        Phase::Done | Phase::Failed | Phase::Cancelled => return,
    };
    if bar.as_ref().map(|(p, _)| *p) != Some(r.phase) {
        if let Some((_, b)) = bar.take() {
            b.finish();
        }
        let b = ProgressBar::new(1);
        b.set_style(ProgressStyle::with_template("{prefix:>11} [{bar:30}] {pos}/{len} blocks  {msg}").expect("template").progress_chars("=> "));
        b.set_prefix(phase_name);
        *bar = Some((r.phase, b));
    }
    let (_, b) = bar.as_ref().expect("set above");
    b.set_length(r.blocks_wanted.max(1));
    b.set_position(r.blocks_sent.min(r.blocks_wanted));
    let rate = if r.elapsed_seconds > 0.0 { r.link.total_bytes as f64 / r.elapsed_seconds } else { 0.0 };
    let remaining = r.blocks_wanted.saturating_sub(r.blocks_sent) as f64 * r.block_size as f64;
    let ratio = if r.link.data_raw_bytes > 0 { r.link.data_wire_bytes as f64 / r.link.data_raw_bytes as f64 } else { 1.0 };
    let eta = if rate > 0.0 { remaining * ratio / rate } else { 0.0 };
    b.set_message(format!("{} over the link, {}/s, eta {:.0} s, zstd {}", format_size(r.link.total_bytes), format_size(rate as u64), eta, r.zstd_level));
}

fn print_report(r: &MigrationReport) {
    let d = &r.destination;
    let bs = u64::from(r.block_size);
    let l = &r.link;
    println!("migration {} of {} ({}): {:?}", r.id, r.disk, format_size(r.disk_bytes), r.phase);
    let rows = vec![
        vec!["total time".into(), format!("{:.2} s", r.total_seconds.unwrap_or(r.elapsed_seconds))],
        vec!["switch-over at".into(), r.switch_seconds.map(|s| format!("{s:.2} s")).unwrap_or_else(|| "-".into())],
        vec!["downtime".into(), r.downtime_ms.map(|m| format!("{m:.1} ms")).unwrap_or_else(|| "-".into())],
        vec!["rounds".into(), format!("{} ({:?} blocks listed)", r.rounds, r.round_blocks)],
        vec!["link: fingerprints".into(), format_size(l.fingerprint_bytes)],
        vec!["link: block data raw".into(), format_size(l.data_raw_bytes)],
        vec!["link: block data compressed".into(), format!("{} (zstd level {})", format_size(l.data_wire_bytes), r.zstd_level)],
        vec!["link: control".into(), format_size(l.control_bytes)],
        vec![
            "link: reconnections".into(),
            format!("{} ({} of block data and {} of fingerprints sent twice)", l.reconnects, format_size(l.resent_raw_bytes), format_size(l.replayed_bytes)),
        ],
        vec![
            "link: total".into(),
            format!(
                "{} = {:.1}% of the disk's allocated bytes",
                format_size(l.total_bytes),
                100.0 * l.total_bytes as f64 / ((d.blocks_listed.max(1)) * bs) as f64
            ),
        ],
        vec!["blocks: from neighbours".into(), d.neighbour_hits.to_string()],
        vec!["blocks: zero".into(), d.zero_blocks.to_string()],
        vec!["blocks: duplicates within the disk".into(), d.duplicates.to_string()],
        vec!["blocks: sent before switch-over".into(), d.received_before_switch.to_string()],
        vec!["blocks: fetched on demand".into(), d.fetched_on_demand.to_string()],
        vec!["blocks: fetched in background".into(), d.fetched_background.to_string()],
    ];
    print!("{}", table::render(&["", ""], &rows));
    if let Some(e) = &r.error {
        println!("error: {e}");
    }
}
