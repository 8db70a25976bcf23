//! `cas`: the operator's tool for disks in a content-addressed store.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cas_store::{FingerprintAlgorithm, Store, StoreOptions};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tools::control::ControlClient;
use tools::similarity::{pairwise, scan_image, PAPER_BLOCK_SIZES};
use tools::size::{format_size, parse_size};
use tools::{image, table};

mod args;

use args::*;

fn open_store(path: &PathBuf, block_size: Option<u32>, algorithm: Option<FingerprintAlgorithm>, create: bool) -> Result<Store> {
    if !create && !path.join("CURRENT").exists() {
        bail!("no store at {} (create one with `cas create` or `cas import`)", path.display());
    }
    Store::open(path, StoreOptions { block_size, algorithm, ..Default::default() })
        .with_context(|| format!("opening the store at {} (is a server holding it open?)", path.display()))
}

/// Where a command works: a store directory it opens itself, or a running server.
enum Target {
    Store(PathBuf),
    Server(String),
}

fn target(store: &Option<PathBuf>, server: &Option<String>) -> Result<Target> {
    match (store, server) {
        (Some(p), None) => Ok(Target::Store(p.clone())),
        (None, Some(s)) => Ok(Target::Server(s.clone())),
        (None, None) => bail!("give --store DIR (a store no server holds open) or --server CONTROL (a running server)"),
        (Some(_), Some(_)) => bail!("give --store or --server, not both"),
    }
}

/// A disk as the server lists it.
fn server_disk(server: &mut ControlClient, name: &str) -> Result<serde_json::Value> {
    let disks = server.call("disk.list", json!({}))?;
    disks.as_array().and_then(|d| d.iter().find(|d| d["name"] == name)).cloned().with_context(|| format!("disk {name:?} not found"))
}

/// The NBD URI of a disk's export at a server (its Unix socket if it has one).
fn export_uri(server: &mut ControlClient, disk: &str) -> Result<String> {
    let info = server.call("server.info", json!({}))?;
    let uris: Vec<String> = info["addresses"]["nbd"].as_array().context("server.info")?.iter().filter_map(|u| u.as_str().map(str::to_string)).collect();
    let pick = uris.iter().find(|u| u.starts_with("nbd+unix")).or_else(|| uris.first()).context("the server has no NBD listener")?;
    Ok(match pick.strip_prefix("nbd+unix:///") {
        // nbd+unix:///?socket=PATH -> nbd+unix:///DISK?socket=PATH
        Some(rest) => format!("nbd+unix:///{disk}{}", &rest[rest.find('?').unwrap_or(rest.len())..]),
        None => format!("{}/{disk}", pick.trim_end_matches('/')),
    })
}

/// CPU seconds (user and system, every thread) this process has used so far.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return f64::NAN;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// `cpu_seconds`: this process's CPU until the import's end (with `--store`; the resemblance
/// index is updated after it), for the import's MB/s per core.
fn report_import(c: &ImportCmd, format: &str, bytes: u64, secs: f64, stats: &cas_store::DiskStats) -> Result<()> {
    if c.json {
        print_json(&serde_json::json!({
            "disk": c.name, "format": format, "bytes": bytes, "seconds": secs, "cpu_seconds": process_cpu_seconds(),
            "allocated_bytes": stats.allocated_bytes, "exclusive_bytes": stats.exclusive_bytes,
            "shared_bytes": stats.shared_bytes,
        }))
    } else {
        println!(
            "imported {} ({format}, {}) into {} in {secs:.1} s: {} allocated, {} shared with other blocks",
            c.file.display(),
            format_size(bytes),
            c.name,
            format_size(stats.allocated_bytes),
            format_size(stats.shared_bytes)
        );
        Ok(())
    }
}

fn bytes_bar(len: u64, hidden: bool, what: &str) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}").expect("valid template").progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// `cas snapshot` and `cas clone`.
fn copy_disk(from: &str, to: &str, store: &Option<PathBuf>, server: &Option<String>, json: bool, read_only: bool) -> Result<()> {
    let started = std::time::Instant::now();
    let info: cas_store::DiskInfo = match target(store, server)? {
        Target::Store(path) => {
            let store = open_store(&path, None, None, false)?;
            let info = if read_only { store.snapshot_disk(from, to)? } else { store.clone_disk(from, to)? };
            store.flush()?;
            info
        }
        Target::Server(addr) => {
            let method = if read_only { "disk.snapshot" } else { "disk.clone" };
            serde_json::from_value(ControlClient::connect(&addr)?.call(method, json!({"source": from, "name": to}))?)?
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if json {
        let mut v = serde_json::to_value(&info)?;
        v["seconds"] = json!(seconds);
        print_json(&v)?;
    } else {
        let what = if read_only { "snapshot" } else { "clone" };
        println!("{what} {} of {from} ({}) made in {seconds:.2} s", info.name, format_size(info.size));
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn main() {
    let cas: Cas = argh::from_env();
    if let Err(e) = run(cas) {
        eprintln!("cas: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cas: Cas) -> Result<()> {
    match cas.command {
        Command::Create(c) => {
            let size = parse_size(&c.size).map_err(anyhow::Error::msg)?;
            let info: cas_store::DiskInfo = match target(&c.store, &c.server)? {
                Target::Store(path) => open_store(&path, c.block_size, c.algorithm, true)?.create_disk(&c.name, size)?,
                Target::Server(addr) => {
                    if c.block_size.is_some() || c.algorithm.is_some() {
                        bail!("--block-size and --algorithm apply to a new store, not to a running server");
                    }
                    serde_json::from_value(ControlClient::connect(&addr)?.call("disk.create", json!({"name": c.name, "size": size}))?)?
                }
            };
            if c.json {
                print_json(&info)?;
            } else {
                println!("created disk {} ({})", info.name, format_size(info.size));
            }
        }
        Command::Import(c) => {
            let started = std::time::Instant::now();
            match target(&c.store, &c.server)? {
                Target::Store(path) => {
                    let raw = image::open_raw(&c.file)?;
                    let store = open_store(&path, c.block_size, c.algorithm, true)?;
                    let disk = match store.disk(&c.name) {
                        Ok(d) => d,
                        Err(cas_store::StoreError::DiskNotFound(_)) => store.create_disk(&c.name, raw.virtual_size.div_ceil(512) * 512)?,
                        Err(e) => return Err(e.into()),
                    };
                    let bar = bytes_bar(raw.virtual_size, c.json, "import");
                    let bytes = image::import_raw(&store, disk.id, &raw.path, |done| bar.set_position(done))?;
                    bar.finish_and_clear();
                    let stats = store.disk_stats(&c.name)?;
                    report_import(&c, &raw.format, bytes, started.elapsed().as_secs_f64(), &stats)?;
                    // The resemblance index a migration from this store looks in (what a
                    // server's background pass would do; the container still appended to
                    // is sketched at the next open).
                    store.update_sketches()?;
                }
                Target::Server(addr) => {
                    if c.block_size.is_some() || c.algorithm.is_some() {
                        bail!("--block-size and --algorithm apply to a new store, not to a running server");
                    }
                    let (format, size) = image::probe(&c.file)?;
                    let mut server = ControlClient::connect(&addr)?;
                    let disks = server.call("disk.list", json!({}))?;
                    if !disks.as_array().is_some_and(|d| d.iter().any(|d| d["name"] == c.name.as_str())) {
                        server.call("disk.create", json!({"name": c.name, "size": size.div_ceil(512) * 512}))?;
                    }
                    let uri = export_uri(&mut server, &c.name)?;
                    // qemu-img writes through the export: any format it reads, parallel and
                    // out-of-order requests, zero ranges as WRITE_ZEROES (free in the store).
                    let status = std::process::Command::new("qemu-img")
                        .args(["convert", "-n", "-W", "-m", "16", "-f", &format, "-O", "raw"])
                        .args(if c.json { vec![] } else { vec!["-p"] })
                        .arg(&c.file)
                        .arg(&uri)
                        .status()
                        .context("running qemu-img (install qemu-utils)")?;
                    if !status.success() {
                        bail!("qemu-img convert into {uri} failed");
                    }
                    let stats: serde_json::Value = server.call("disk.stats", json!({"name": c.name}))?;
                    let stats: cas_store::DiskStats = serde_json::from_value(stats["disks"][0].clone())?;
                    report_import(&c, &format, size, started.elapsed().as_secs_f64(), &stats)?;
                }
            }
        }
        Command::Export(c) => {
            let bytes = match target(&c.store, &c.server)? {
                Target::Store(path) => {
                    let store = open_store(&path, None, None, false)?;
                    let disk = store.disk(&c.name)?;
                    let bar = bytes_bar(disk.size, c.json, "export");
                    let bytes = image::export_raw(&store, disk.id, &c.file, |done| bar.set_position(done))?;
                    bar.finish_and_clear();
                    bytes
                }
                Target::Server(addr) => {
                    let mut server = ControlClient::connect(&addr)?;
                    let disk = server_disk(&mut server, &c.name)?;
                    let uri = export_uri(&mut server, &c.name)?;
                    let status = std::process::Command::new("qemu-img")
                        .args(["convert", "-f", "raw", "-O", "raw"])
                        .args(if c.json { vec![] } else { vec!["-p"] })
                        .arg(&uri)
                        .arg(&c.file)
                        .status()
                        .context("running qemu-img (install qemu-utils)")?;
                    if !status.success() {
                        bail!("qemu-img convert from {uri} failed");
                    }
                    disk["size"].as_u64().unwrap_or(0)
                }
            };
            if c.json {
                print_json(&serde_json::json!({ "disk": c.name, "file": c.file, "bytes": bytes }))?;
            } else {
                println!("exported {} ({}) to {}", c.name, format_size(bytes), c.file.display());
            }
        }
        Command::Ls(c) => {
            let disks: Vec<(String, u64)> = match target(&c.store, &c.server)? {
                Target::Store(path) => open_store(&path, None, None, false)?.list_disks()?.into_iter().map(|d| (d.name, d.size)).collect(),
                Target::Server(addr) => ControlClient::connect(&addr)?
                    .call("disk.list", json!({}))?
                    .as_array()
                    .context("disk.list")?
                    .iter()
                    .map(|d| (d["name"].as_str().unwrap_or_default().to_string(), d["size"].as_u64().unwrap_or(0)))
                    .collect(),
            };
            if c.json {
                print_json(&disks.iter().map(|(n, s)| json!({"name": n, "size": s})).collect::<Vec<_>>())?;
            } else {
                let rows: Vec<Vec<String>> = disks.iter().map(|(n, s)| vec![n.clone(), format_size(*s), s.to_string()]).collect();
                print!("{}", table::render(&["disk", "size", "bytes"], &rows));
            }
        }
        Command::Rm(c) => {
            match target(&c.store, &c.server)? {
                Target::Store(path) => {
                    let store = open_store(&path, None, None, false)?;
                    store.delete_disk(&c.name)?;
                    store.flush()?;
                }
                Target::Server(addr) => {
                    ControlClient::connect(&addr)?.call("disk.delete", json!({"name": c.name}))?;
                }
            }
            if c.json {
                print_json(&serde_json::json!({ "deleted": c.name }))?;
            } else {
                println!("deleted disk {}", c.name);
            }
        }
        Command::Snapshot(c) => copy_disk(&c.disk, &c.name, &c.store, &c.server, c.json, true)?,
        Command::Clone(c) => copy_disk(&c.source, &c.name, &c.store, &c.server, c.json, false)?,
        Command::Stats(c) => {
            // The store's totals, and each disk's sharing, are absent when the server keeps them
            // from this client (they cover every tenant's disks; see `nbd-server --allow`).
            let (total, disks): (Option<cas_store::StoreStats>, Vec<serde_json::Value>) = match target(&c.store, &c.server)? {
                Target::Store(path) => {
                    let store = open_store(&path, None, None, false)?;
                    let names: Vec<String> = match &c.name {
                        Some(n) => vec![n.clone()],
                        None => store.list_disks()?.into_iter().map(|d| d.name).collect(),
                    };
                    let disks = names.iter().map(|n| store.disk_stats(n)).collect::<Result<Vec<_>, _>>()?;
                    (Some(store.stats()?), disks.iter().map(serde_json::to_value).collect::<Result<_, _>>()?)
                }
                Target::Server(addr) => {
                    let v = ControlClient::connect(&addr)?.call("disk.stats", json!({"name": c.name}))?;
                    (serde_json::from_value(v["store"].clone())?, serde_json::from_value(v["disks"].clone())?)
                }
            };
            if c.json {
                print_json(&serde_json::json!({ "store": total, "disks": disks }))?;
            } else {
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .map(|d| {
                        let size = |field: &str| d[field].as_u64().map(format_size).unwrap_or_else(|| "-".into());
                        let name = d["name"].as_str().unwrap_or_default().to_string();
                        vec![name, size("size"), size("allocated_bytes"), size("shared_bytes"), size("exclusive_bytes")]
                    })
                    .collect();
                print!("{}", table::render(&["disk", "size", "allocated", "shared", "exclusive"], &rows));
                let Some(total) = total else { return Ok(()) };
                println!(
                    "store: {} disks, {} logical, {} allocated, {} stored in {} blocks of {} ({}), dedupe {:.2}x{}",
                    total.disks,
                    format_size(total.logical_bytes),
                    format_size(total.allocated_bytes),
                    format_size(total.stored_bytes),
                    total.stored_blocks,
                    total.block_size,
                    total.algorithm,
                    total.dedupe_ratio,
                    total.engine_bytes.map(|b| format!(", index {} (files and memtables)", format_size(b))).unwrap_or_default()
                );
                if let Some(containers) = total.container_bytes {
                    println!(
                        "containers: {} on disk, {} reclaimable by `cas gc`{}",
                        format_size(containers),
                        format_size(total.reclaimable_bytes),
                        total.index_bytes_per_block.map(|b| format!("; index {b:.0} bytes per stored block")).unwrap_or_default()
                    );
                }
            }
        }
        Command::Fsck(c) => {
            let report: cas_store::FsckReport = match target(&c.store, &c.server)? {
                Target::Store(path) => open_store(&path, None, None, false)?.fsck(c.verify)?,
                Target::Server(addr) => serde_json::from_value(ControlClient::connect(&addr)?.call("store.fsck", json!({"verify": c.verify}))?)?,
            };
            if c.json {
                print_json(&report)?;
            } else {
                for p in &report.problems {
                    println!("problem: {p}");
                }
                println!(
                    "fsck: {} disks, {} map entries, {} stored blocks, {} verified: {}",
                    report.disks,
                    report.map_entries,
                    report.stored_blocks,
                    report.verified_blocks,
                    if report.is_clean() { "clean".to_string() } else { format!("{} problems", report.problem_count) }
                );
                if report.stale_hints > 0 {
                    println!(
                        "fsck: {} old block locations that map entries still hint at, left by an interrupted compaction pass (valid; `cas gc` deletes them)",
                        report.stale_hints
                    );
                }
            }
            if !report.is_clean() {
                std::process::exit(2);
            }
        }
        Command::Gc(c) => {
            if !(0.0..=1.0).contains(&c.below) {
                bail!("--below {} is not a share from 0 to 1", c.below);
            }
            let report: cas_store::CompactionReport = match target(&c.store, &c.server)? {
                Target::Store(path) => open_store(&path, None, None, false)?.compact(c.below)?,
                Target::Server(addr) => serde_json::from_value(ControlClient::connect(&addr)?.call("store.gc", json!({"below": c.below}))?)?,
            };
            if c.json {
                print_json(&report)?;
            } else {
                println!(
                    "gc: {} containers checked, {} rewritten, {} deleted, {} blocks moved; containers {} -> {} ({} given back)",
                    report.containers_checked,
                    report.containers_rewritten,
                    report.containers_deleted,
                    report.blocks_moved,
                    format_size(report.bytes_before),
                    format_size(report.bytes_after),
                    format_size(report.bytes_before.saturating_sub(report.bytes_after))
                );
            }
        }
        Command::Upgrade(c) => {
            let report = Store::upgrade(&c.store, &StoreOptions::default()).with_context(|| format!("converting the store at {}", c.store.display()))?;
            if c.json {
                print_json(&report)?;
            } else if report.from_format == report.to_format {
                println!("the store at {} is in the current format ({}): nothing to do", c.store.display(), report.to_format);
            } else {
                println!(
                    "converted the store at {}: format {} -> {}, {} blocks moved to containers",
                    c.store.display(),
                    report.from_format,
                    report.to_format,
                    report.blocks_moved
                );
            }
        }
        Command::Similarity(c) => {
            if c.images.len() < 2 {
                bail!("give two or more image files");
            }
            for p in &c.images {
                if !p.is_file() {
                    bail!("{}: no such file", p.display());
                }
            }
            let total: u64 = c.images.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
            let bar = bytes_bar(total, c.json, "similarity");
            // Two images at a time (these machines have two cores): each is read once for all
            // four block sizes.
            let mut scanned = Vec::new();
            let mut base = 0u64;
            for pair in c.images.chunks(2) {
                let results: Vec<_> = std::thread::scope(|s| {
                    let handles: Vec<_> = pair.iter().map(|p| s.spawn(|| scan_image(p, &PAPER_BLOCK_SIZES, |_| {}))).collect();
                    handles.into_iter().map(|h| h.join().expect("scan thread")).collect()
                });
                for (p, r) in pair.iter().zip(results) {
                    scanned.push(r.with_context(|| format!("reading {}", p.display()))?);
                    base += std::fs::metadata(p)?.len();
                    bar.set_position(base);
                }
            }
            bar.finish_and_clear();
            let cells = pairwise(&scanned);
            if c.json {
                print_json(
                    &serde_json::json!({ "block_sizes": PAPER_BLOCK_SIZES, "images": scanned.iter().map(|s| &s.name).collect::<Vec<_>>(), "pairs": cells }),
                )?;
            } else {
                for &bs in &PAPER_BLOCK_SIZES {
                    println!("block size {bs}: share of the row image's non-zero blocks found in the column image");
                    let mut header = vec!["image \\ neighbour".to_string()];
                    header.extend(scanned.iter().map(|s| s.name.clone()));
                    let rows: Vec<Vec<String>> = scanned
                        .iter()
                        .map(|b| {
                            let mut row = vec![b.name.clone()];
                            for a in &scanned {
                                row.push(match cells.iter().find(|c| c.block_size == bs && c.a == a.name && c.b == b.name) {
                                    Some(cell) => format!("{:.1}%", cell.share * 100.0),
                                    None => "-".to_string(),
                                });
                            }
                            row
                        })
                        .collect();
                    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
                    println!("{}", table::render(&header_refs, &rows));
                }
            }
        }
    }
    Ok(())
}
