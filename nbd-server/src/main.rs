//! `nbd-server`: serve every disk of a CAS store over NBD.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context};
use argh::FromArgs;
use cas_store::{Store, StoreError, StoreOptions};
use nbd_server::compaction::{spawn_compaction, DEFAULT_COMPACT_BELOW, DEFAULT_COMPACT_INTERVAL_SECS};
use nbd_server::control::{serve_control, serve_migrations, ControlListener};
use nbd_server::link_tls::LinkTls;
use nbd_server::metrics::{serve_metrics, Metrics, SpaceSampler, DEFAULT_SPACE_INTERVAL};
use nbd_server::node::Node;
use nbd_server::{serve, ExportRegistry, Listener, ServerConfig, TlsConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// Serve every disk of a CAS store as an NBD export.
///
/// Prints "listening on <uri>" for each listener, then "ready", on standard output.
/// Logs go to standard error (filter with RUST_LOG, e.g. RUST_LOG=nbd_server=debug).
#[derive(FromArgs, Debug)]
struct Args {
    /// store directory (created on first use)
    #[argh(option)]
    store: PathBuf,

    /// TCP address to listen on, repeatable; port 0 picks a free port (default
    /// 127.0.0.1:10809 when no --unix is given)
    #[argh(option)]
    listen: Vec<String>,

    /// unix socket to listen on
    #[argh(option)]
    unix: Option<PathBuf>,

    /// NAME:SIZE: create this disk if it does not exist (SIZE in bytes, or with a K, M, G or
    /// T suffix; a multiple of 512); repeatable
    #[argh(option)]
    disk: Vec<DiskSpec>,

    /// export every disk read-only
    #[argh(switch)]
    read_only: bool,

    /// TLS certificate chain (PEM); enables NBD_OPT_STARTTLS
    #[argh(option)]
    tls_cert: Option<PathBuf>,

    /// TLS private key (PEM)
    #[argh(option)]
    tls_key: Option<PathBuf>,

    /// CA certificates (PEM): clients must present a certificate signed by one of them
    #[argh(option)]
    tls_client_ca: Option<PathBuf>,

    /// refuse clients that do not start TLS
    #[argh(switch)]
    tls_required: bool,

    /// block size of a new store (a power of two, 512 to 65536; default 4096)
    #[argh(option)]
    block_size: Option<u32>,

    /// where a new store keeps its blocks: "rocksdb" (default: in block containers in the
    /// store directory, RocksDB as their index) or
    /// "rados:POOL[/NAMESPACE]" (a Ceph pool the datacentre's servers share); fixed at creation
    #[argh(option, default = "String::from(\"rocksdb\")")]
    blocks: String,

    /// the Ceph configuration for --blocks rados:... (default /etc/ceph/ceph.conf)
    #[argh(option)]
    ceph_conf: Option<PathBuf>,

    /// the Ceph user for --blocks rados:... (default client.admin)
    #[argh(option)]
    ceph_user: Option<String>,

    /// seconds between background compaction passes over the block containers (default 300;
    /// 0 turns them off; `cas gc` runs one at any time)
    #[argh(option)]
    compact_interval: Option<f64>,

    /// size of the block containers a new container takes (default 64M; the unit compaction
    /// rewrites)
    #[argh(option)]
    container_size: Option<String>,

    /// compaction rewrites containers whose live blocks fill less than this share (default 0.5)
    #[argh(option)]
    compact_below: Option<f64>,

    /// re-hash every block read from the containers and fail reads whose bytes do not match
    /// their fingerprint (costs a hash per block read)
    #[argh(switch)]
    verify_reads: bool,

    /// requests one connection serves at once, each on a thread of its own (default 16)
    #[argh(option)]
    max_in_flight: Option<usize>,
    /// established NBD connections at most (default 1024); a newcomer is refused when they
    /// are all taken, an established client is never dropped for it
    #[argh(option)]
    max_connections: Option<usize>,
    /// NBD connections still negotiating at most, a budget apart from established ones
    /// (default 256)
    #[argh(option)]
    max_negotiating: Option<usize>,
    /// NBD connections negotiating from one source address at most (default 64)
    #[argh(option)]
    max_negotiating_per_peer: Option<usize>,
    /// seconds a client has to negotiate while the negotiating budget is empty (default 30);
    /// the deadline shrinks as it fills, to 1 s when it is nearly full
    #[argh(option)]
    handshake_timeout: Option<u64>,

    /// export served to clients that ask for the empty name (default: the first --disk, or
    /// the only disk of the store)
    #[argh(option)]
    default_export: Option<String>,

    /// unix socket for the control API (JSON lines; see CONTROL.md)
    #[argh(option)]
    control: Option<PathBuf>,

    /// TCP address for the control API, repeatable (no authentication: bind it to a
    /// management network or loopback only)
    #[argh(option)]
    control_listen: Vec<String>,

    /// TCP address where other servers send migrations (port 0 picks a free port)
    #[argh(option)]
    migration_listen: Option<String>,

    /// this server's certificate for the migration link's mutual TLS (PEM)
    #[argh(option)]
    migration_cert: Option<PathBuf>,

    /// the key of --migration-cert (PEM)
    #[argh(option)]
    migration_key: Option<PathBuf>,

    /// the CA that signs every server's migration certificate (PEM)
    #[argh(option)]
    migration_ca: Option<PathBuf>,

    /// allow migrations over plaintext TCP (tenant data crosses the WAN unencrypted and
    /// unauthenticated: for tests and trusted links only)
    #[argh(switch)]
    migration_insecure: bool,

    /// TCP address where Prometheus scrapes /metrics (plain HTTP: bind it to a management
    /// network or loopback)
    #[argh(option)]
    metrics_listen: Option<String>,

    /// seconds between two walks of the reference index for the store-space metrics
    /// (default 60)
    #[argh(option)]
    metrics_space_interval: Option<f64>,
}

/// `--disk NAME:SIZE`.
#[derive(Debug, Clone)]
struct DiskSpec {
    name: String,
    size: u64,
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskSpec, String> {
        let (name, size) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected NAME:SIZE"))?;
        if name.is_empty() {
            return Err(format!("{s:?}: empty disk name"));
        }
        let size = parse_size(size)?;
        if size == 0 || size % 512 != 0 {
            return Err(format!("{s:?}: size must be a positive multiple of 512"));
        }
        Ok(DiskSpec { name: name.to_owned(), size })
    }
}

/// "4096", "64M", "10G", "1T", "512k" (binary multiples).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

fn main() -> ExitCode {
    let args: Args = argh::from_env();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn tls_config(args: &Args) -> anyhow::Result<Option<TlsConfig>> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = TlsConfig::from_pem_files(cert, key, args.tls_client_ca.as_deref(), args.tls_required)?;
            Ok(Some(tls))
        }
        (None, None) => {
            if args.tls_client_ca.is_some() || args.tls_required {
                bail!("--tls-client-ca and --tls-required need --tls-cert and --tls-key");
            }
            Ok(None)
        }
        _ => bail!("--tls-cert and --tls-key go together"),
    }
}

/// Opens the store, creates the `--disk`s, and registers every disk as an export. All of it
/// runs before the async runtime starts: RocksDB calls never run on a runtime thread.
fn open_exports(args: &Args) -> anyhow::Result<(Arc<Store>, Arc<Node>)> {
    let pool = cas_rados::pool_from_spec(&args.blocks, args.ceph_conf.as_deref(), args.ceph_user.as_deref())
        .with_context(|| format!("block pool {}", args.blocks))?;
    let mut options =
        StoreOptions { block_size: args.block_size, pool, verify_reads: args.verify_reads, ..StoreOptions::default() };
    if let Some(size) = &args.container_size {
        let bytes = parse_size(size).map_err(|e| anyhow::anyhow!("--container-size {size}: {e}"))?;
        if !(64 << 10..=1 << 40).contains(&bytes) {
            bail!("--container-size {size}: from 64K to 1T");
        }
        options.container_bytes = bytes;
    }
    let store = Store::open(&args.store, options).with_context(|| format!("opening store {}", args.store.display()))?;
    let store = Arc::new(store);

    for spec in &args.disk {
        match store.create_disk(&spec.name, spec.size) {
            Ok(info) => info!(disk = %info.name, size = info.size, "created disk"),
            Err(StoreError::DiskExists(_)) => {
                let info = store.disk(&spec.name)?;
                if info.size != spec.size {
                    warn!(disk = %info.name, size = info.size, requested = spec.size, "disk exists with another size; keeping it");
                }
            }
            Err(e) => return Err(e).with_context(|| format!("creating disk {}", spec.name)),
        }
    }

    let registry = Arc::new(ExportRegistry::new());
    // Migration records live beside the store's data, so they move and vanish with it.
    let records = args.store.join("migrations");
    let state = migration::FileStateStore::open(&records)
        .with_context(|| format!("migration records in {}", records.display()))?;
    let node = Node::new(Arc::clone(&store), Arc::clone(&registry), args.read_only, link_tls(args)?, Arc::new(state))?;
    node.export_all()?;
    let disks: Vec<_> =
        store.list_disks()?.into_iter().filter(|d| Node::is_exportable(&d.name) && !node.is_held(&d.name)).collect();
    for disk in &disks {
        info!(export = %disk.name, size = disk.size, read_only = args.read_only, "export");
    }
    let default = args
        .default_export
        .clone()
        .or_else(|| args.disk.first().map(|d| d.name.clone()))
        .or_else(|| (disks.len() == 1).then(|| disks[0].name.clone()));
    if let Some(name) = &default {
        if registry.get(name).is_none() {
            bail!("default export {name:?} is not a disk of the store");
        }
    }
    registry.set_default(default.as_deref());
    if registry.is_empty() {
        warn!("the store has no disks: create one with --disk NAME:SIZE");
    }
    Ok((store, node))
}

fn link_tls(args: &Args) -> anyhow::Result<Option<LinkTls>> {
    match (&args.migration_cert, &args.migration_key, &args.migration_ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(LinkTls::from_pem_files(cert, key, ca)?)),
        (None, None, None) => {
            if args.migration_listen.is_some() && !args.migration_insecure {
                bail!("--migration-listen needs --migration-cert, --migration-key and --migration-ca (or --migration-insecure)");
            }
            if args.migration_insecure {
                warn!("MIGRATIONS ARE NOT ENCRYPTED OR AUTHENTICATED (--migration-insecure): tenant data crosses the link in the clear");
            }
            Ok(None)
        }
        _ => bail!("--migration-cert, --migration-key and --migration-ca go together"),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = ServerConfig { tls: tls_config(&args)?, ..ServerConfig::default() };
    if let Some(n) = args.max_in_flight {
        config.max_in_flight_per_connection = n;
    }
    if let Some(n) = args.max_connections {
        config.max_connections = n;
    }
    if let Some(n) = args.max_negotiating {
        config.max_negotiating = n;
    }
    if let Some(n) = args.max_negotiating_per_peer {
        config.max_negotiating_per_peer = n;
    }
    if let Some(secs) = args.handshake_timeout {
        config.handshake_timeout = std::time::Duration::from_secs(secs);
    }
    let (store, node) = open_exports(&args)?;
    let registry = Arc::clone(&node.exports);
    let below = args.compact_below.unwrap_or(DEFAULT_COMPACT_BELOW);
    if !(0.0..=1.0).contains(&below) {
        bail!("--compact-below {below} is not a share from 0 to 1");
    }
    let interval = args.compact_interval.unwrap_or(DEFAULT_COMPACT_INTERVAL_SECS as f64);
    if interval == 0.0 {
        info!("background compaction off (--compact-interval 0)");
    } else {
        let interval = std::time::Duration::try_from_secs_f64(interval)
            .map_err(|_| anyhow::anyhow!("--compact-interval {interval} is not a number of seconds"))?;
        spawn_compaction(Arc::clone(&store), interval, below).context("starting the compaction thread")?;
    }

    let space_interval = match args.metrics_space_interval {
        Some(secs) => std::time::Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--metrics-space-interval {secs} is not a positive number of seconds"))?,
        None => DEFAULT_SPACE_INTERVAL,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut listeners = Vec::new();
        let mut tcp = args.listen.clone();
        if tcp.is_empty() && args.unix.is_none() {
            tcp.push("127.0.0.1:10809".to_owned());
        }
        for addr in &tcp {
            listeners.push(Listener::bind_tcp(addr).await.with_context(|| format!("listening on {addr}"))?);
        }
        if let Some(path) = &args.unix {
            listeners.push(Listener::bind_unix(path).with_context(|| format!("listening on {}", path.display()))?);
        }
        let mut control = Vec::new();
        if let Some(path) = &args.control {
            control.push(
                ControlListener::bind_unix(path.clone())
                    .with_context(|| format!("control socket {}", path.display()))?,
            );
        }
        for addr in &args.control_listen {
            control.push(ControlListener::bind_tcp(addr).await.with_context(|| format!("control on {addr}"))?);
        }
        let metrics_listener = match &args.metrics_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics on {addr}"))?)
            }
            None => None,
        };
        let migration_listener = match &args.migration_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("migrations on {addr}"))?)
            }
            None => None,
        };
        {
            let mut addresses = node.addresses.write();
            addresses.nbd = listeners.iter().map(|l| l.describe()).collect();
            addresses.control = control.iter().map(|c| c.describe()).collect();
            addresses.migration = migration_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string());
            addresses.metrics =
                metrics_listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| format!("http://{a}/metrics"));
        }
        // Migrations a restart interrupted: parked again (a switched disk is served post-copy)
        // before anything is served.
        node.restore_migrations().await.context("restoring migrations in progress")?;
        let mut stdout = std::io::stdout().lock();
        for l in &listeners {
            writeln!(stdout, "listening on {}", l.describe())?;
        }
        for c in &control {
            writeln!(stdout, "control on {}", c.describe())?;
        }
        if let Some(addr) = &node.addresses.read().migration {
            writeln!(stdout, "migrations on {addr}")?;
        }
        if let Some(url) = &node.addresses.read().metrics {
            writeln!(stdout, "metrics on {url}")?;
        }
        writeln!(stdout, "ready")?;
        stdout.flush()?;
        drop(stdout);

        let mut sigterm = signal(SignalKind::terminate())?;
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigusr1 = signal(SignalKind::user_defined1())?;
        let stats_registry = Arc::clone(&registry);
        tokio::spawn(async move {
            while sigusr1.recv().await.is_some() {
                log_stats(&stats_registry);
            }
        });
        // One signal stops everything: the NBD server drains, the control API and the
        // migration listener stop accepting.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = sigterm.recv() => info!("SIGTERM received"),
                _ = sigint.recv() => info!("SIGINT received"),
            }
            let _ = stop_tx.send(true);
        });
        let control_task =
            tokio::spawn(serve_control(control, Arc::clone(&node), config.admission_limits(), stopped()));
        let metrics_task = match metrics_listener {
            Some(listener) => {
                let space = SpaceSampler::start(&store, space_interval).context("starting the store-space sampler")?;
                let metrics = Metrics::new(Arc::clone(&node), space);
                Some(tokio::spawn(serve_metrics(listener, metrics, stopped())))
            }
            None => None,
        };
        let migration_task = migration_listener
            .map(|l| tokio::spawn(serve_migrations(l, Arc::clone(&node), config.admission_limits(), stopped())));
        serve(listeners, Arc::clone(&registry), config, stopped()).await;
        let _ = control_task.await;
        if let Some(t) = migration_task {
            let _ = t.await;
        }
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        anyhow::Ok(())
    })?;
    // Waits for any blocking store call still running.
    drop(runtime);
    store.flush().context("final flush")?;
    log_stats(&registry);
    info!("exiting");
    Ok(())
}

fn log_stats(registry: &ExportRegistry) {
    for export in registry.list() {
        let s = export.stats().snapshot();
        info!(
            export = export.name(),
            reads = s.read.requests,
            read_bytes = s.read.bytes,
            writes = s.write.requests,
            write_bytes = s.write.bytes,
            zeroes = s.write_zeroes.requests,
            trims = s.trim.requests,
            flushes = s.flush.requests,
            block_status = s.block_status.requests,
            errors = s.read.errors + s.write.errors + s.write_zeroes.errors + s.trim.errors + s.flush.errors,
            rejected = s.rejected,
            connections = s.connections_total,
            "export counters"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn disk_specs() {
        let d: DiskSpec = "vm-1:10G".parse().unwrap();
        assert_eq!((d.name.as_str(), d.size), ("vm-1", 10 << 30));
        assert!("novalue".parse::<DiskSpec>().is_err());
        assert!(":1M".parse::<DiskSpec>().is_err());
        assert!("d:1000".parse::<DiskSpec>().is_err());
        assert!("d:0".parse::<DiskSpec>().is_err());
    }
}
