//! Gang migrations between two real `nbd-server` processes, driven by the real `migrate`
//! command: three disks that share most of their content move together, and what they share
//! crosses once.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::data::vm_image;
use common::server::{free_port, load, run, wait_for_migration, Server, MIGRATE};

/// Blocks per disk; the first `SHARED` are the gang's common stack, of which the destination's
/// neighbour holds the first `AT_DEST`.
const BLOCKS: usize = 8192;
const SHARED: usize = 6000;
const AT_DEST: usize = 2000;
const DISKS: [&str; 3] = ["web-a", "web-b", "web-c"];

/// Distinct blocks the destination lacks: the shared ones it does not hold, once, and each
/// disk's own.
const DISTINCT_MISSING: u64 = (SHARED - AT_DEST + DISKS.len() * (BLOCKS - SHARED)) as u64;

struct Gang {
    src: Server,
    dst: Server,
    contents: Vec<Vec<u8>>,
}

fn gang(d: &Path, dst_listen: &str) -> Gang {
    let dst = Server::start(d, "dst", &["--migration-listen", dst_listen, "--migration-insecure"]);
    let src = Server::start(d, "src", &["--migration-insecure"]);
    let mut contents = Vec::new();
    for (i, name) in DISKS.iter().enumerate() {
        let path = d.join(format!("{name}.raw"));
        contents.push(vm_image(&path, BLOCKS, SHARED, 11 + i as u64, 0));
        load(&src, name, &path);
    }
    vm_image(&d.join("neighbour.raw"), 4096, AT_DEST, 99, 0);
    load(&dst, "neighbour", &d.join("neighbour.raw"));
    Gang { src, dst, contents }
}

fn start_gang(g: &Gang, extra: &[&str]) -> Child {
    let mut cmd = Command::new(MIGRATE);
    cmd.args(["--source", g.src.ctl(), "--dest", g.dst.ctl(), "--json", "--timeout", "300"]);
    for disk in DISKS {
        cmd.args(["--disk", disk]);
    }
    cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("start migrate")
}

fn assert_same(server: &Server, disk: &str, content: &[u8], d: &Path) {
    let out = d.join(format!("{disk}.out"));
    let _ = std::fs::remove_file(&out);
    run(Command::new("nbdcopy").arg(server.uri(disk)).arg(&out));
    assert!(std::fs::read(&out).unwrap() == content, "{disk} differs at the destination");
}

fn sum(disks: &[Value], f: impl Fn(&Value) -> u64) -> u64 {
    disks.iter().map(f).sum()
}

#[test]
fn a_gang_sends_each_shared_block_once_and_every_disk_arrives_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let g = gang(d, "127.0.0.1:0");
    // The plan counts what the gang shares once, and what the disks would need one by one.
    let mut cmd = Command::new(MIGRATE);
    cmd.args(["plan", "--source", g.src.ctl(), "--dest", g.dst.ctl(), "--json"]);
    for disk in DISKS {
        cmd.args(["--disk", disk]);
    }
    let plan: Value = serde_json::from_slice(&run(&mut cmd).stdout).unwrap();
    let p = &plan["gang_plans"][0];
    assert_eq!(p["gang"]["missing_blocks"], DISTINCT_MISSING, "{plan:#}");
    let singles = sum(p["one_by_one"].as_array().unwrap(), |r| r["missing_blocks"].as_u64().unwrap());
    assert_eq!(singles, (DISKS.len() * (BLOCKS - AT_DEST)) as u64, "{plan:#}");
    assert!(p["gang"]["estimated_link_bytes"].as_u64().unwrap() < p["one_by_one_link_bytes"].as_u64().unwrap(), "{plan:#}");

    let out = start_gang(&g, &[]).wait_with_output().unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let disks = report["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 3);
    let gang_name = report["gang"].as_str().unwrap();
    for r in disks {
        assert_eq!(r["phase"], "done", "{r}");
        assert_eq!(r["gang"], gang_name);
    }
    // Each distinct missing block crossed once for the whole gang; the blocks two disks
    // share with a third that brought them are counted as taken from the gang (or, when the
    // third's copy had already arrived by the time they listed it, found here).
    let sent = sum(disks, |r| r["blocks_sent"].as_u64().unwrap());
    let wanted = sum(disks, |r| r["destination"]["wanted"].as_u64().unwrap());
    assert_eq!(wanted, DISTINCT_MISSING, "{report:#}");
    assert_eq!(sent, DISTINCT_MISSING, "{report:#}");
    let shared = sum(disks, |r| r["destination"]["gang_shared"].as_u64().unwrap());
    let hits = sum(disks, |r| r["destination"]["neighbour_hits"].as_u64().unwrap());
    assert_eq!(shared + hits, (DISKS.len() * AT_DEST + (DISKS.len() - 1) * (SHARED - AT_DEST)) as u64, "{report:#}");
    assert!(shared > 0, "{report:#}");
    assert_eq!(report["total"]["blocks_sent"], sent);
    assert_eq!(report["total"]["done"], 3);
    for (name, content) in DISKS.iter().zip(&g.contents) {
        assert_same(&g.dst, name, content, d);
    }
    g.dst.fsck_clean();
    g.src.fsck_clean();
    // The shared blocks are stored once at the destination.
    let stats = g.dst.ok("store.stats", json!({}));
    let unique = stats["store"]["stored_blocks"].as_u64().unwrap();
    assert_eq!(unique, 4096 + DISTINCT_MISSING, "{stats}");
}

#[test]
fn cancelling_one_disk_of_a_gang_leaves_the_others_to_finish() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let g = gang(d, "127.0.0.1:0");
    // 30 Mbit/s for the whole gang: about 12 s of data, time to cancel one.
    let child = start_gang(&g, &["--bandwidth", "30mbit"]);
    let m = wait_for_migration(&g.src, "the gang runs", |m| m["disk"] == "web-b" && m["blocks_sent"].as_u64().unwrap_or(0) > 200);
    let id = m["id"].as_str().unwrap();
    run(Command::new(MIGRATE).args(["cancel", "--server", g.src.ctl(), id]));
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "one disk did not migrate");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    for r in report["disks"].as_array().unwrap() {
        let want = if r["disk"] == "web-b" { "cancelled" } else { "done" };
        assert_eq!(r["phase"], want, "{r}");
    }
    // The others took over what the cancelled one had not delivered.
    for (name, content) in DISKS.iter().zip(&g.contents) {
        if *name != "web-b" {
            assert_same(&g.dst, name, content, d);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.dst.disks().contains(&"web-b".to_string()) || g.dst.disks().iter().any(|n| n.contains("incoming")) {
        assert!(Instant::now() < deadline, "partial disk left: {:?}", g.dst.disks());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The cancelled disk is untouched at the source, the others gone from it.
    assert_same(&g.src, "web-b", &g.contents[1], d);
    g.dst.fsck_clean();
    g.src.fsck_clean();
}

#[test]
fn a_gang_survives_a_restart_of_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut g = gang(d, &listen);
    let child = start_gang(&g, &["--bandwidth", "40mbit", "--reconnect-window", "120"]);
    wait_for_migration(&g.src, "data is crossing", |m| m["blocks_sent"].as_u64().unwrap_or(0) > 1000);
    g.dst.child.kill().unwrap();
    g.dst.child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    g.dst = Server::start(d, "dst", &["--migration-listen", &listen, "--migration-insecure"]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["total"]["link_data_raw_bytes"].as_u64().unwrap() > 0);
    for (name, content) in DISKS.iter().zip(&g.contents) {
        wait_for_migration(&g.dst, "destination done", |m| m["disk"] == *name && m["phase"] == "done");
        assert_same(&g.dst, name, content, d);
    }
    g.dst.fsck_clean();
    g.src.fsck_clean();
}

#[test]
fn a_gang_survives_a_restart_of_the_source_and_resumes_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut g = gang(d, &listen);
    let child = start_gang(&g, &["--bandwidth", "40mbit", "--reconnect-window", "120"]);
    let m = wait_for_migration(&g.src, "data is crossing", |m| m["blocks_sent"].as_u64().unwrap_or(0) > 1000);
    let name = m["gang"].as_str().expect("a member names its gang").to_string();
    g.src.child.kill().unwrap();
    g.src.child.wait().unwrap();
    // `migrate` was following the source, which is gone.
    assert!(!child.wait_with_output().unwrap().status.success());
    g.src = Server::start(d, "src", &["--migration-insecure"]);
    let listed = g.src.ok("migration.list", json!({}));
    let members: Vec<&Value> = listed.as_array().unwrap().iter().filter(|m| m["gang"] == name.as_str()).collect();
    assert_eq!(members.len(), DISKS.len(), "every member is back after the restart: {listed}");
    assert!(members.iter().all(|m| m["phase"] == "interrupted"), "{listed}");
    // One command resumes the gang and follows it to its end.
    let out = run(Command::new(MIGRATE).args(["resume", "--server", g.src.ctl(), "--gang", &name, "--json", "--timeout", "300"]));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let disks = report["disks"].as_array().unwrap();
    assert_eq!(disks.len(), DISKS.len(), "{report}");
    assert!(disks.iter().all(|m| m["phase"] == "done"), "{report}");
    for (disk, content) in DISKS.iter().zip(&g.contents) {
        wait_for_migration(&g.dst, "destination done", |m| m["disk"] == *disk && m["phase"] == "done");
        assert_same(&g.dst, disk, content, d);
    }
    g.dst.fsck_clean();
    g.src.fsck_clean();
}
