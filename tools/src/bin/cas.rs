//! `cas`: the operator's tool for disks in a content-addressed store.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use argh::FromArgs;
use cas_store::{FingerprintAlgorithm, Store, StoreOptions};
use indicatif::{ProgressBar, ProgressStyle};
use tools::similarity::{pairwise, scan_image, PAPER_BLOCK_SIZES};
use tools::size::{format_size, parse_size};
use tools::{image, table};

/// Manage the disks of a content-addressed block store.
#[derive(FromArgs, Debug)]
struct Cas {
    #[argh(subcommand)]
    command: Command,
}

#[derive(FromArgs, Debug)]
#[argh(subcommand)]
enum Command {
    Create(CreateCmd),
    Import(ImportCmd),
    Export(ExportCmd),
    Ls(LsCmd),
    Rm(RmCmd),
    Stats(StatsCmd),
    Fsck(FsckCmd),
    Similarity(SimilarityCmd),
}

/// Create an empty disk.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "create")]
struct CreateCmd {
    /// disk name
    #[argh(positional)]
    name: String,
    /// size, e.g. 10G (binary units; a multiple of 512 bytes)
    #[argh(option)]
    size: String,
    /// store directory (opened directly; no server may hold it open)
    #[argh(option)]
    store: PathBuf,
    /// block size when the store is created (default 4096)
    #[argh(option)]
    block_size: Option<u32>,
    /// fingerprint algorithm when the store is created: blake3-128 (default) or xxh3-128
    #[argh(option)]
    algorithm: Option<FingerprintAlgorithm>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Import an image file (raw, or any format qemu-img reads) into a disk, creating it if needed.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "import")]
struct ImportCmd {
    /// disk name
    #[argh(positional)]
    name: String,
    /// image file
    #[argh(positional)]
    file: PathBuf,
    /// store directory
    #[argh(option)]
    store: PathBuf,
    /// block size when the store is created (default 4096)
    #[argh(option)]
    block_size: Option<u32>,
    /// fingerprint algorithm when the store is created
    #[argh(option)]
    algorithm: Option<FingerprintAlgorithm>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Export a disk to a sparse raw file.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "export")]
struct ExportCmd {
    /// disk name
    #[argh(positional)]
    name: String,
    /// output file (raw)
    #[argh(positional)]
    file: PathBuf,
    /// store directory
    #[argh(option)]
    store: PathBuf,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// List disks.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "ls")]
struct LsCmd {
    /// store directory
    #[argh(option)]
    store: PathBuf,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Delete a disk (blocks other disks share stay).
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "rm")]
struct RmCmd {
    /// disk name
    #[argh(positional)]
    name: String,
    /// store directory
    #[argh(option)]
    store: PathBuf,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Space accounting of the store, or of one disk.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "stats")]
struct StatsCmd {
    /// a disk name (default: the whole store and every disk)
    #[argh(positional)]
    name: Option<String>,
    /// store directory
    #[argh(option)]
    store: PathBuf,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Check reference counts, block presence and (with --verify) block contents.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "fsck")]
struct FsckCmd {
    /// store directory
    #[argh(option)]
    store: PathBuf,
    /// re-hash every stored block
    #[argh(switch)]
    verify: bool,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Pairwise block similarity of image files (the paper's table) at 512, 1024, 2048, 4096 bytes.
#[derive(FromArgs, Debug)]
#[argh(subcommand, name = "similarity")]
struct SimilarityCmd {
    /// raw image files (two or more)
    #[argh(positional)]
    images: Vec<PathBuf>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

fn open_store(path: &PathBuf, block_size: Option<u32>, algorithm: Option<FingerprintAlgorithm>, create: bool) -> Result<Store> {
    if !create && !path.join("CURRENT").exists() {
        bail!("no store at {} (create one with `cas create` or `cas import`)", path.display());
    }
    Store::open(path, StoreOptions { block_size, algorithm, ..Default::default() })
        .with_context(|| format!("opening the store at {} (is a server holding it open?)", path.display()))
}

fn bytes_bar(len: u64, hidden: bool, what: &str) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
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
            let store = open_store(&c.store, c.block_size, c.algorithm, true)?;
            let info = store.create_disk(&c.name, size)?;
            if c.json {
                print_json(&info)?;
            } else {
                println!("created disk {} ({})", info.name, format_size(info.size));
            }
        }
        Command::Import(c) => {
            let raw = image::open_raw(&c.file)?;
            let store = open_store(&c.store, c.block_size, c.algorithm, true)?;
            let disk = match store.disk(&c.name) {
                Ok(d) => d,
                Err(cas_store::StoreError::DiskNotFound(_)) => store.create_disk(&c.name, raw.virtual_size.div_ceil(512) * 512)?,
                Err(e) => return Err(e.into()),
            };
            let bar = bytes_bar(raw.virtual_size, c.json, "import");
            let started = std::time::Instant::now();
            let bytes = image::import_raw(&store, disk.id, &raw.path, |done| bar.set_position(done))?;
            bar.finish_and_clear();
            let secs = started.elapsed().as_secs_f64();
            let stats = store.disk_stats(&c.name)?;
            if c.json {
                print_json(&serde_json::json!({
                    "disk": disk.name, "format": raw.format, "bytes": bytes, "seconds": secs,
                    "allocated_bytes": stats.allocated_bytes, "exclusive_bytes": stats.exclusive_bytes,
                    "shared_bytes": stats.shared_bytes,
                }))?;
            } else {
                println!(
                    "imported {} ({}, {}) into {} in {secs:.1} s: {} allocated, {} shared with other blocks",
                    c.file.display(), raw.format, format_size(bytes), disk.name,
                    format_size(stats.allocated_bytes), format_size(stats.shared_bytes)
                );
            }
        }
        Command::Export(c) => {
            let store = open_store(&c.store, None, None, false)?;
            let disk = store.disk(&c.name)?;
            let bar = bytes_bar(disk.size, c.json, "export");
            let bytes = image::export_raw(&store, disk.id, &c.file, |done| bar.set_position(done))?;
            bar.finish_and_clear();
            if c.json {
                print_json(&serde_json::json!({ "disk": disk.name, "file": c.file, "bytes": bytes }))?;
            } else {
                println!("exported {} ({}) to {}", disk.name, format_size(bytes), c.file.display());
            }
        }
        Command::Ls(c) => {
            let store = open_store(&c.store, None, None, false)?;
            let disks = store.list_disks()?;
            if c.json {
                print_json(&disks)?;
            } else {
                let rows: Vec<Vec<String>> = disks.iter().map(|d| vec![d.name.clone(), format_size(d.size), d.size.to_string()]).collect();
                print!("{}", table::render(&["disk", "size", "bytes"], &rows));
            }
        }
        Command::Rm(c) => {
            let store = open_store(&c.store, None, None, false)?;
            store.delete_disk(&c.name)?;
            store.flush()?;
            if c.json {
                print_json(&serde_json::json!({ "deleted": c.name }))?;
            } else {
                println!("deleted disk {}", c.name);
            }
        }
        Command::Stats(c) => {
            let store = open_store(&c.store, None, None, false)?;
            let names: Vec<String> = match &c.name {
                Some(n) => vec![n.clone()],
                None => store.list_disks()?.into_iter().map(|d| d.name).collect(),
            };
            let disks = names.iter().map(|n| store.disk_stats(n)).collect::<Result<Vec<_>, _>>()?;
            let total = store.stats()?;
            if c.json {
                print_json(&serde_json::json!({ "store": total, "disks": disks }))?;
            } else {
                let rows: Vec<Vec<String>> = disks
                    .iter()
                    .map(|d| vec![d.name.clone(), format_size(d.size), format_size(d.allocated_bytes), format_size(d.shared_bytes), format_size(d.exclusive_bytes)])
                    .collect();
                print!("{}", table::render(&["disk", "size", "allocated", "shared", "exclusive"], &rows));
                println!(
                    "store: {} disks, {} logical, {} allocated, {} stored in {} blocks of {} ({}), dedupe {:.2}x{}",
                    total.disks, format_size(total.logical_bytes), format_size(total.allocated_bytes),
                    format_size(total.stored_bytes), total.stored_blocks, total.block_size, total.algorithm,
                    total.dedupe_ratio,
                    total.engine_bytes.map(|b| format!(", {} on disk", format_size(b))).unwrap_or_default()
                );
            }
        }
        Command::Fsck(c) => {
            let store = open_store(&c.store, None, None, false)?;
            let report = store.fsck(c.verify)?;
            if c.json {
                print_json(&report)?;
            } else {
                for p in &report.problems {
                    println!("problem: {p}");
                }
                println!(
                    "fsck: {} disks, {} map entries, {} stored blocks, {} verified: {}",
                    report.disks, report.map_entries, report.stored_blocks, report.verified_blocks,
                    if report.is_clean() { "clean".to_string() } else { format!("{} problems", report.problem_count) }
                );
            }
            if !report.is_clean() {
                std::process::exit(2);
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
                print_json(&serde_json::json!({ "block_sizes": PAPER_BLOCK_SIZES, "images": scanned.iter().map(|s| &s.name).collect::<Vec<_>>(), "pairs": cells }))?;
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
