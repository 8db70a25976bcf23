//! `nbd-server`: serve every disk of a CAS store over NBD.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use cas_store::{Store, StoreError, StoreOptions};
mod cli;

use cli::{parse_size, Args};
use nbd_server::access::AccessRules;
use nbd_server::compaction::{spawn_compaction, DEFAULT_COMPACT_BELOW, DEFAULT_COMPACT_INTERVAL_SECS};
use nbd_server::control::{serve_control, serve_migrations, ControlListener};
use nbd_server::link_socket::LinkSocket;
use nbd_server::link_tls::LinkTls;
use nbd_server::metrics::{serve_metrics, Metrics, SpaceSampler, DEFAULT_SPACE_INTERVAL};
use nbd_server::node::Node;
use nbd_server::{serve, ExportRegistry, Listener, ServerConfig, TlsConfig};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

fn main() -> ExitCode {
    nbd_server::arenas::bound_malloc_arenas();
    let args = Args::from_env_and_config();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match args.and_then(run) {
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
    let store_dir = args.store.as_deref().context("--store is required (on the command line or in --config)")?;
    let blocks = args.blocks.as_deref().unwrap_or("rocksdb");
    let pool = cas_rados::pool_from_spec(blocks, args.ceph_conf.as_deref(), args.ceph_user.as_deref())
        .with_context(|| format!("block pool {blocks}"))?;
    let mut options = StoreOptions {
        block_size: args.block_size,
        pool,
        verify_reads: args.verify_reads,
        reuse_dead_slots: !args.no_slot_reuse,
        ..StoreOptions::default()
    };
    if let Some(size) = &args.container_size {
        let bytes = parse_size(size).map_err(|e| anyhow::anyhow!("--container-size {size}: {e}"))?;
        if !(64 << 10..=1 << 40).contains(&bytes) {
            bail!("--container-size {size}: from 64K to 1T");
        }
        options.container_bytes = bytes;
    }
    let store = Store::open(store_dir, options).with_context(|| format!("opening store {}", store_dir.display()))?;
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
    let records = store_dir.join("migrations");
    let state = migration::FileStateStore::open(&records)
        .with_context(|| format!("migration records in {}", records.display()))?;
    let node = Node::new(
        Arc::clone(&store),
        Arc::clone(&registry),
        args.read_only,
        link_tls(args)?,
        link_socket(args),
        Arc::new(state),
    )?;
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

fn link_socket(args: &Args) -> LinkSocket {
    LinkSocket::new(args.migration_congestion.as_deref().unwrap_or(nbd_server::link_socket::DEFAULT_CONGESTION))
}

/// `--allow` rules, checked against the TLS settings they depend on.
fn access_rules(args: &Args) -> anyhow::Result<Arc<AccessRules>> {
    let rules = AccessRules::parse(args.allow.iter().map(String::as_str))?;
    if !rules.is_open() && (args.tls_client_ca.is_none() || !args.tls_required) {
        bail!("--allow needs --tls-client-ca and --tls-required: the rules match names in client certificates");
    }
    Ok(Arc::new(rules))
}

/// The TCP control API's mutual TLS; None when it has no TCP listener.
fn control_tls(args: &Args) -> anyhow::Result<Option<TlsConfig>> {
    match (&args.control_cert, &args.control_key, &args.control_ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsConfig::from_pem_files(cert, key, Some(ca), true)?)),
        (None, None, None) if args.control_listen.is_empty() => Ok(None),
        (None, None, None) => {
            bail!("--control-listen needs mutual TLS: --control-cert, --control-key and --control-ca (or use --control, a Unix socket)")
        }
        _ => bail!("--control-cert, --control-key and --control-ca go together"),
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut config = ServerConfig { tls: tls_config(&args)?, access: access_rules(&args)?, ..ServerConfig::default() };
    let control_tls = control_tls(&args)?;
    if let Some(n) = args.max_in_flight {
        config.max_in_flight_per_connection = n;
    }
    config.write_behind = !args.no_write_behind;
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
    let (interval, below) = if interval == 0.0 {
        info!("background compaction off (--compact-interval 0)");
        (DEFAULT_COMPACT_INTERVAL_SECS as f64, None)
    } else {
        (interval, Some(below))
    };
    let interval = std::time::Duration::try_from_secs_f64(interval)
        .map_err(|_| anyhow::anyhow!("--compact-interval {interval} is not a number of seconds"))?;
    spawn_compaction(Arc::clone(&store), interval, below).context("starting the background thread")?;

    let space_interval = match args.metrics_space_interval {
        Some(secs) => std::time::Duration::try_from_secs_f64(secs)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--metrics-space-interval {secs} is not a positive number of seconds"))?,
        None => DEFAULT_SPACE_INTERVAL,
    };

    // The runtime's workers answer the migration links' control messages: short time slices
    // (the migration crate gives the blocking-pool threads it uses the default back), and the
    // real-time class while a switch-over is under way (so its threads are registered).
    let threads = migration::sched::RuntimeThreads::new();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(move || threads.join())
        .on_thread_stop(migration::sched::RuntimeThreads::leave)
        .on_thread_unpark(migration::sched::as_worker)
        .build()?;
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
            let tls = control_tls.clone().context("the TCP control API has no TLS settings")?;
            control.push(ControlListener::bind_tcp(addr, tls).await.with_context(|| format!("control on {addr}"))?);
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
        let mut sighup = signal(SignalKind::hangup())?;
        let (nbd_tls, link_tls, control_tls) = (config.tls.clone(), node.link_tls.clone(), control_tls.clone());
        tokio::spawn(async move {
            while sighup.recv().await.is_some() {
                let (nbd_tls, link_tls, control_tls) = (nbd_tls.clone(), link_tls.clone(), control_tls.clone());
                // Reading files: on the blocking pool.
                let _ = tokio::task::spawn_blocking(move || {
                    reload_certificates(nbd_tls.as_ref(), link_tls.as_ref(), control_tls.as_ref())
                })
                .await;
            }
        });
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
        let control_task = tokio::spawn(serve_control(
            control,
            Arc::clone(&node),
            config.admission_limits(),
            config.access.clone(),
            stopped(),
        ));
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

/// SIGHUP: the NBD, control API and migration certificates are read again; the next
/// handshake uses them, connections already up keep theirs. A file that does not load leaves the old one in force.
fn reload_certificates(nbd: Option<&TlsConfig>, link: Option<&LinkTls>, control: Option<&TlsConfig>) {
    for (what, tls) in [("NBD TLS", nbd), ("control API", control)] {
        if let Some(tls) = tls {
            match tls.reload() {
                Ok(()) => info!("SIGHUP: {what} certificates reloaded"),
                Err(e) => error!("SIGHUP: {what} certificates not reloaded, the old ones stay: {e}"),
            }
        }
    }
    if let Some(tls) = link {
        match tls.reload() {
            Ok(()) => info!("SIGHUP: migration link certificates reloaded"),
            Err(e) => error!("SIGHUP: migration link certificates not reloaded, the old ones stay: {e}"),
        }
    }
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
