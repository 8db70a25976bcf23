//! A flood of idle and trickling connections from one address must not lock the hypervisors
//! out: connections still negotiating have their own budget with a per-peer share, and the
//! handshake deadline tightens as that budget fills (see `nbd-server/src/admission.rs`).
//!
//! The flood comes from 127.0.0.2, the legitimate clients from 127.0.0.1 (both loopback).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{require_tool, run_ok, start_server, ServerProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const IDLE: usize = 5000;
const TRICKLE: usize = 500;
/// What the server may hold in memory under the flood (it is about 20 MiB idle).
const RSS_BOUND_KIB: u64 = 256 << 10;

/// 4 KiB random reads at depth 8 for `secs` seconds; returns IOPS.
fn fio_iops(server: &ServerProcess, dir: &std::path::Path, secs: u32) -> f64 {
    let fio = require_tool("fio");
    let out = run_ok(Command::new(fio).current_dir(dir).args([
        "--name=flood",
        "--ioengine=nbd",
        &format!("--uri={}", server.uri("d0")),
        "--rw=randread",
        "--bs=4k",
        "--iodepth=8",
        "--size=32M",
        "--time_based",
        &format!("--runtime={secs}"),
        "--output-format=json",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = &stdout[stdout.find('{').expect("fio JSON report")..];
    let report: serde_json::Value = serde_json::from_str(json).unwrap();
    report["jobs"][0]["read"]["iops"].as_f64().unwrap()
}

/// Keeps `IDLE` connections open that send nothing and `TRICKLE` that send one handshake
/// byte a second, all from 127.0.0.2, reopening each one the server closes, until `stop`.
fn flood(rt: &tokio::runtime::Runtime, port: u16, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    let target: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for i in 0..IDLE + TRICKLE {
        let (stop, opened) = (stop.clone(), opened.clone());
        rt.spawn(async move {
            let trickle = i >= IDLE;
            while !stop.load(Ordering::Relaxed) {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
                if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), socket.connect(target)).await {
                    opened.fetch_add(1, Ordering::Relaxed);
                    let mut buf = [0u8; 64];
                    loop {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if trickle && s.write_all(&[0]).await.is_err() {
                            break;
                        }
                        // Idle until the server closes (or a second passes, for the trickle).
                        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            _ => {}
                        }
                    }
                }
                // A refused connection comes back after a while, as a scanner or a broken client
                // retrying would (not in a tight loop: that would measure this machine's two cores).
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
    }
}

#[test]
fn a_flood_from_one_address_does_not_lock_out_the_hypervisors() {
    let (dir, server) = start_server(&["d0:64M"], &[]);
    let nbdinfo = require_tool("nbdinfo");
    let qemu_io = require_tool("qemu-io");
    run_ok(Command::new(&qemu_io).args(["-f", "raw", "-c", "write -P 7 0 32M", &server.uri("d0")]));
    let quiet = fio_iops(&server, dir.path(), 4);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    flood(&rt, server.port(), stop.clone(), opened.clone());
    std::thread::sleep(Duration::from_secs(3));

    // Legitimate clients connect and finish at once, again and again, under the flood.
    let mut slowest = Duration::ZERO;
    for round in 0..5 {
        let t = Instant::now();
        run_ok(Command::new(&nbdinfo).arg(server.uri("d0")));
        let info = t.elapsed();
        let t = Instant::now();
        let pattern = format!("write -P {} {}M 1M", 10 + round, round);
        run_ok(Command::new(&qemu_io).args([
            "-f",
            "raw",
            "-c",
            &pattern,
            "-c",
            &format!("read -P {} {}M 1M", 10 + round, round),
            &server.uri("d0"),
        ]));
        let io = t.elapsed();
        assert!(
            info < Duration::from_secs(1) && io < Duration::from_secs(1),
            "round {round}: nbdinfo {info:?}, qemu-io {io:?}"
        );
        slowest = slowest.max(info).max(io);
    }
    let flooded = fio_iops(&server, dir.path(), 4);
    let rss = server.rss_kib();
    stop.store(true, Ordering::Relaxed);
    rt.shutdown_timeout(Duration::from_secs(2));

    let ratio = flooded / quiet;
    let refusals = server.stderr().matches("connection refused").count();
    eprintln!(
        "flood: {} connections opened from 127.0.0.2; slowest legitimate nbdinfo/qemu-io {slowest:?}; fio 4k randread QD8 {quiet:.0} IOPS quiet, {flooded:.0} under the flood (ratio {ratio:.2}); server RSS {} MiB; {refusals} refusal log lines",
        opened.load(Ordering::Relaxed),
        rss >> 10
    );
    assert!(opened.load(Ordering::Relaxed) >= (IDLE + TRICKLE) as u64, "the flood really ran");
    assert!(ratio >= 0.8, "fio under the flood: {ratio:.2} of its quiet rate");
    assert!(rss < RSS_BOUND_KIB, "server RSS {} MiB under the flood", rss >> 10);
    assert!(
        refusals >= 1 && refusals <= 20,
        "refusals are logged, at most once per interval per peer: {refusals} lines"
    );
}
