//! `nbd-server --metrics-listen`: scraped while an NBD client writes and a migration runs,
//! every scrape parsed by a real OpenMetrics parser, the figures checked against what was done.

use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::data::noise;
use common::metrics::{http_get, scrape, Scrape};
use common::server::{load, run, start_capped, wait_for_migration, Server, TestDir};

const METRICS: [&str; 4] = ["--metrics-listen", "127.0.0.1:0", "--metrics-space-interval", "0.5"];

fn url(server: &Server) -> &str {
    server.metrics.as_deref().expect("started with --metrics-listen")
}

fn export_value(s: &Scrape, name: &str, export: &str, op: &str) -> f64 {
    s.get(name, &[("export", export), ("op", op)])
}

#[test]
fn metrics_follow_io_and_a_migration_and_parse() {
    let dir = TestDir::new();
    let d = dir.path();
    let dst_args: Vec<&str> = ["--migration-listen", "127.0.0.1:0", "--migration-insecure"].into_iter().chain(METRICS).collect();
    let dst = Server::start(d, "dst", &dst_args);
    let src_args: Vec<&str> = ["--migration-insecure"].into_iter().chain(METRICS).collect();
    let src = Server::start(d, "src", &src_args);
    assert_eq!(http_get(&url(&src).replace("/metrics", "/other")).0, 404);

    // I/O first: the export counters and latency histograms follow it exactly.
    let image = d.join("vm.raw");
    std::fs::write(&image, noise(16 << 20)).unwrap();
    load(&src, "vm", &image);
    src.ok("disk.create", serde_json::json!({"name": "busy", "size": 64 << 20}));
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 7 0 1M", "-c", "read 0 512k", "-c", "flush", &src.uri("busy")]));
    let s = scrape(url(&src));
    assert_eq!(export_value(&s, "nbdcas_export_bytes_total", "busy", "write"), f64::from(1 << 20));
    assert_eq!(export_value(&s, "nbdcas_export_bytes_total", "busy", "read"), f64::from(512 << 10));
    assert_eq!(export_value(&s, "nbdcas_export_bytes_total", "vm", "write"), f64::from(16 << 20));
    for op in ["read", "write", "flush"] {
        let requests = export_value(&s, "nbdcas_export_requests_total", "busy", op);
        assert!(requests >= 1.0, "{op}: {requests}");
        let count = export_value(&s, "nbdcas_export_request_duration_seconds_count", "busy", op);
        assert_eq!(count, requests, "one latency per {op} request");
        let inf = s.get("nbdcas_export_request_duration_seconds_bucket", &[("export", "busy"), ("op", op), ("le", "+Inf")]);
        assert_eq!(inf, requests);
    }
    // The server notices qemu-io's disconnection on its own time.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape(url(&src)).get("nbdcas_export_connections", &[("export", "busy")]) != 0.0 {
        assert!(Instant::now() < deadline, "the connection of qemu-io, gone, is still counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(s.get("nbdcas_export_connections_opened_total", &[("export", "busy")]) >= 1.0);

    // The store-space gauges catch up within the sampling interval.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = scrape(url(&src));
        let allocated = s.get("nbdcas_store_allocated_bytes", &[]);
        if allocated >= f64::from(17 << 20) {
            assert!(s.get("nbdcas_store_stored_bytes", &[]) >= f64::from(16 << 20));
            assert_eq!(s.get("nbdcas_store_logical_bytes", &[]), f64::from(80 << 20));
            assert!(s.get("nbdcas_store_space_age_seconds", &[]) < 20.0);
            break;
        }
        assert!(Instant::now() < deadline, "store space never showed the 17 MiB written: {allocated}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A migration at 16 Mbit/s (about 8 s) while a client keeps writing another disk.
    let (mut migrate, id) = start_capped(&src, &dst, "vm", "16mbit");
    let writer_uri = src.uri("busy");
    let writer = std::thread::spawn(move || {
        for i in 0..20 {
            let cmd = format!("write -P {i} {} 256k", (i % 8) * (1 << 20));
            run(Command::new("qemu-io").args(["-f", "raw", "-c", &cmd, "-c", "flush", &writer_uri]));
        }
    });
    let labels = [("id", id.as_str()), ("role", "source")];
    let mut first_data = None;
    let mut saw_rate = false;
    let mut saw_eta = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = scrape(url(&src));
        let data = s.get("nbdcas_migration_link_bytes_total", &[labels[0], labels[1], ("kind", "data")]);
        let precopy = s.get("nbdcas_migration_phase", &[labels[0], ("phase", "pre-copy")]);
        if precopy == 1.0 && data > 0.0 {
            first_data.get_or_insert(data);
            saw_rate |= s.get("nbdcas_migration_link_rate_bits_per_second", &labels) > 0.0;
            if let Some(eta) = s.value("nbdcas_migration_eta_seconds", &labels) {
                assert!(eta.is_finite() && eta >= 0.0, "ETA {eta}");
                saw_eta = true;
            }
            assert!(s.get("nbdcas_migration_blocks_remaining", &labels) > 0.0);
            assert_eq!(s.get("nbdcas_migration_bandwidth_cap_bits_per_second", &labels), 16e6);
            // The destination reports the same migration from its side.
            let ds = scrape(url(&dst));
            assert!(ds.0.iter().any(|x| x.name == "nbdcas_migration_phase" && x.labels["role"] == "destination" && x.value == 1.0));
        }
        if first_data.is_some_and(|f| data > f) && saw_rate && saw_eta {
            break;
        }
        assert!(Instant::now() < deadline, "the scrapes never showed the migration's data flowing");
        std::thread::sleep(Duration::from_millis(700));
    }
    let status = migrate.wait().unwrap();
    assert!(status.success(), "migrate failed");
    writer.join().unwrap();
    wait_for_migration(&src, "migration done", |m| m["phase"] == "done");

    let s = scrape(url(&src));
    assert_eq!(s.get("nbdcas_migration_phase", &[labels[0], ("phase", "done")]), 1.0);
    assert_eq!(s.get("nbdcas_migration_phase", &[labels[0], ("phase", "pre-copy")]), 0.0);
    let downtime = s.get("nbdcas_migration_downtime_seconds", &labels);
    assert!(downtime > 0.0 && downtime < 10.0, "downtime {downtime}");
    assert_eq!(s.get("nbdcas_migration_blocks_remaining", &labels), 0.0);
    let report = src.ok("migration.status", serde_json::json!({"id": id}));
    assert_eq!(
        s.get("nbdcas_migration_link_bytes_total", &[labels[0], labels[1], ("kind", "data")]),
        report["link"]["data_wire_bytes"].as_f64().unwrap(),
        "the metric and the control API agree"
    );
    assert!(export_value(&s, "nbdcas_export_bytes_total", "busy", "write") >= f64::from(1 << 20) + 20.0 * f64::from(256 << 10));
    for family in ["nbdcas_export_requests", "nbdcas_store_stored_bytes", "nbdcas_migration_link_bytes"] {
        assert!(s.0.iter().any(|x| x.family == family), "{family} missing");
    }
    assert!(s.0.iter().filter(|x| x.family == "nbdcas_export_request_duration_seconds").all(|x| x.kind == "histogram"));
}
