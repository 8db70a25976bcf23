//! Migrations between two real `nbd-server` processes (two datacentres on one machine),
//! driven by the real `migrate` command, with a real NBD client writing to the disk.

use std::io::Write;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::data::vm_image as image;
use common::server::{certs, free_port, load, run, start_capped, tls_args, wait_for_migration, workspace, Server, MIGRATE};

fn migrate(src: &Server, dst: &Server, disk: &str, extra: &[&str]) -> Output {
    Command::new(MIGRATE).args(["--source", src.ctl(), "--dest", dst.ctl(), "--disk", disk, "--json", "--timeout", "300"]).args(extra).output().unwrap()
}

#[test]
fn migration_while_a_guest_writes_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = certs(d, "dc1,dc2");
    let dst = Server::start(
        d,
        "dst",
        &[&["--migration-listen", "127.0.0.1:0"][..], &tls_args(&certs, "dc2").iter().map(String::as_str).collect::<Vec<_>>()].concat(),
    );
    let src = Server::start(d, "src", &tls_args(&certs, "dc1").iter().map(String::as_str).collect::<Vec<_>>());
    // 48 MiB VM: 6000 OS blocks, the rest its own, every 7th block zero. The destination's
    // neighbour has the same OS blocks and other data of its own.
    let vm = d.join("vm.raw");
    image(&vm, 12288, 6000, 7, 7);
    image(&d.join("neighbour.raw"), 8192, 6000, 9, 5);
    load(&src, "vm", &vm);
    load(&dst, "neighbour", &d.join("neighbour.raw"));

    let mirror = d.join("mirror.raw");
    std::fs::copy(&vm, &mirror).unwrap();
    let stats = d.join("writer.json");
    let mut writer = Command::new("/usr/bin/python3")
        .arg(workspace().join("scripts/guest-writer.py"))
        .args(["--source", &src.uri("vm"), "--dest", &dst.uri("vm")])
        .arg("--mirror")
        .arg(&mirror)
        .args(["--after-switch", "100", "--interval", "0.001", "--timeout", "300"])
        .arg("--stats")
        .arg(&stats)
        .spawn()
        .expect("/usr/bin/python3 with python3-libnbd");
    std::thread::sleep(Duration::from_millis(500));
    let out = migrate(&src, &dst, "vm", &[]);
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(writer.wait().unwrap().success(), "the guest followed its disk");
    let writes: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert!(writes["writes_at_source"].as_u64().unwrap() > 10, "{writes}");
    assert_eq!(writes["writes_at_destination"], 100);

    // The destination holds the source's content at the freeze plus the later writes.
    let out_file = d.join("out.raw");
    run(Command::new("nbdcopy").arg(dst.uri("vm")).arg(&out_file));
    assert!(std::fs::read(&out_file).unwrap() == std::fs::read(&mirror).unwrap(), "destination differs from the guest's view");

    let dest = &report["destination"];
    assert_eq!(report["phase"], "done");
    assert!(dest["neighbour_hits"].as_u64().unwrap() >= 3500, "OS blocks came from the neighbour: {dest}");
    assert!(dest["zero_blocks"].as_u64().unwrap() > 1000, "{dest}");
    assert!(report["downtime_ms"].as_f64().is_some());
    let link = &report["link"];
    assert!(link["data_wire_bytes"].as_u64().unwrap() < link["data_raw_bytes"].as_u64().unwrap(), "compressed: {link}");
    // The source no longer serves the disk; both stores are consistent.
    assert!(!src.ok("server.info", json!({}))["exports"].as_array().unwrap().iter().any(|e| e == "vm"));
    assert!(Command::new("nbdinfo").arg(src.uri("vm")).output().unwrap().status.code() != Some(0));
    src.fsck_clean();
    dst.fsck_clean();
    assert_eq!(dst.disks(), vec!["neighbour".to_string(), "vm".to_string()]);
}

#[test]
fn plan_finds_the_cheapest_destination_without_moving_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = Server::start(d, "src", &["--migration-insecure"]);
    let near = Server::start(d, "near", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    let far = Server::start(d, "far", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    image(&d.join("vm.raw"), 2048, 1500, 3, 0);
    image(&d.join("n.raw"), 2048, 1500, 4, 0);
    load(&src, "vm", &d.join("vm.raw"));
    load(&near, "n", &d.join("n.raw"));
    let out = run(Command::new(MIGRATE).args([
        "plan",
        "--source",
        src.ctl(),
        "--dest",
        far.ctl(),
        "--dest",
        near.ctl(),
        "--disk",
        "vm",
        "--link-rate",
        "100mbit",
        "--json",
    ]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["cheapest"], near.ctl());
    let plans = v["plans"].as_array().unwrap();
    assert_eq!(plans[0]["missing_blocks"], 2048);
    assert_eq!(plans[1]["missing_blocks"], 548);
    assert_eq!(plans[1]["neighbour_hits"], 1500);
    assert!(plans[1]["estimated_seconds"].as_f64().unwrap() < plans[0]["estimated_seconds"].as_f64().unwrap());
    assert_eq!(near.disks(), vec!["n".to_string()], "a plan moves nothing");
    assert!(far.disks().is_empty());
}

#[test]
fn a_peer_without_a_valid_certificate_is_refused_before_data_moves() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = certs(d, "dc1,dc2");
    let other = certs(d, "rogue");
    let dst =
        Server::start(d, "dst", &[&["--migration-listen", "127.0.0.1:0"][..], &tls_args(&good, "dc2").iter().map(String::as_str).collect::<Vec<_>>()].concat());
    image(&d.join("vm.raw"), 256, 0, 1, 0);
    for (name, args) in [("rogue", tls_args(&other, "rogue")), ("plain", vec!["--migration-insecure".to_string()])] {
        let src = Server::start(d, name, &args.iter().map(String::as_str).collect::<Vec<_>>());
        load(&src, "vm", &d.join("vm.raw"));
        let out = migrate(&src, &dst, "vm", &[]);
        assert!(!out.status.success(), "{name}: the migration must fail");
        let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
        assert!(err.contains("TLS") || err.contains("tls") || err.contains("closed") || err.contains("link"), "{name}: {err}");
        assert!(dst.disks().is_empty(), "{name}: nothing arrived");
        let migrations = dst.ok("migration.list", json!({}));
        for m in migrations.as_array().unwrap() {
            assert_eq!(m["link"]["data_wire_bytes"], 0, "no disk data crossed: {m}");
        }
        // The source still serves its disk, writable.
        run(Command::new("qemu-io").args(["-f", "raw", &src.uri("vm"), "-c", "write -P 0x11 0 4k"]));
    }
    dst.fsck_clean();
}

#[test]
fn cancel_before_switch_over_keeps_the_source_and_cleans_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dst = Server::start(d, "dst", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    let src = Server::start(d, "src", &["--migration-insecure"]);
    let vm = d.join("vm.raw");
    let content = image(&vm, 8192, 0, 5, 0); // 32 MiB, nothing at the destination
    load(&src, "vm", &vm);
    // 20 Mbit/s: about 10 s for the data, time enough to cancel.
    let (mut run_migrate, id) = start_capped(&src, &dst, "vm", "20mbit");
    std::thread::sleep(Duration::from_millis(1000));
    let out = run(Command::new(MIGRATE).args(["cancel", "--server", src.ctl(), &id, "--json"]));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["phase"], "cancelled");
    let status = run_migrate.wait().unwrap();
    assert!(!status.success(), "migrate reports that the migration did not complete");
    // The destination let go of its partial disk.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dst.disks().is_empty() || dst.ok("store.stats", json!({}))["store"]["disks"] != 0 {
        assert!(Instant::now() < deadline, "partial disk left at the destination: {:?}", dst.ok("store.stats", json!({})));
        std::thread::sleep(Duration::from_millis(50));
    }
    dst.fsck_clean();
    src.fsck_clean();
    // The source is untouched and writable.
    let back = d.join("back.raw");
    run(Command::new("nbdcopy").arg(src.uri("vm")).arg(&back));
    assert!(std::fs::read(&back).unwrap() == content);
    run(Command::new("qemu-io").args(["-f", "raw", &src.uri("vm"), "-c", "write -P 0x22 0 4k"]));
    // After the end, cancelling again is refused with a clear message.
    let again = Command::new(MIGRATE).args(["cancel", "--server", src.ctl(), &id]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already ended"));
}

#[test]
fn garbage_on_the_migration_port_changes_nothing() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dst = Server::start(d, "dst", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    let addr = dst.migration.clone().unwrap();
    for junk in [&b"GET / HTTP/1.0\r\n\r\n"[..], &[0u8; 64][..], b"CASMIGR\0\x00\x07"] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(junk).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
    // Still serving, nothing created.
    assert!(dst.disks().is_empty());
    // Connections that never named a migration are logged, not listed as migrations.
    let listed = dst.ok("migration.list", json!({}));
    assert!(listed.as_array().unwrap().is_empty(), "{listed}");
    dst.ok("disk.create", json!({"name": "ok", "size": 1 << 20}));
    assert_eq!(dst.call("disk.create", json!({"name": "ok", "size": 1 << 20}))["error"]["kind"], "exists");
    assert_eq!(dst.call("no.such.method", json!({}))["error"]["kind"], "unknown_method");
    assert_eq!(dst.call("disk.create", json!({"name": "x"}))["error"]["kind"], "invalid");
}

#[test]
fn cas_works_through_a_running_server() {
    let cas = env!("CARGO_BIN_EXE_cas");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = Server::start(d, "dc", &[]);
    let raw = d.join("vm.raw");
    image(&raw, 2048, 1000, 2, 3);
    let qcow = d.join("vm.qcow2");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow));
    let out = run(Command::new(cas).args(["import", "vm", qcow.to_str().unwrap(), "--server", server.ctl(), "--json"]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert!(v["allocated_bytes"].as_u64().unwrap() > 0);
    let back = d.join("back.raw");
    run(Command::new(cas).args(["export", "vm", back.to_str().unwrap(), "--server", server.ctl()]));
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&raw).unwrap(), "round trip through the export is byte-exact");
    run(Command::new(cas).args(["create", "blank", "--size", "1M", "--server", server.ctl()]));
    let ls: Value = serde_json::from_slice(&run(Command::new(cas).args(["ls", "--server", server.ctl(), "--json"])).stdout).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let stats: Value = serde_json::from_slice(&run(Command::new(cas).args(["stats", "--server", server.ctl(), "--json"])).stdout).unwrap();
    assert_eq!(stats["store"]["disks"], 2);
    assert!(String::from_utf8_lossy(&run(Command::new(cas).args(["fsck", "--verify", "--server", server.ctl()])).stdout).contains("clean"));
    run(Command::new(cas).args(["rm", "blank", "--server", server.ctl()]));
    // Bad input: clear messages, non-zero exit.
    let fail = |args: &[&str], needle: &str| {
        let out = Command::new(cas).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    fail(&["rm", "nope", "--server", server.ctl()], "not found");
    fail(&["export", "nope", "/tmp/x.raw", "--server", server.ctl()], "not found");
    fail(&["ls", "--server", d.join("no.ctl").to_str().unwrap()], "no server at");
    fail(&["ls"], "--store DIR");
    fail(&["ls", "--server", server.ctl(), "--store", "/tmp"], "not both");
    fail(&["create", "x", "--size", "1M", "--server", server.ctl(), "--block-size", "512"], "new store");
}

/// Two servers of one datacentre keep their blocks in one Ceph pool (issue 8). Needs the
/// throwaway cluster (`scripts/ceph-cluster.sh start`); test.sh starts it and sets
/// NBD_CAS_REQUIRE_CEPH=1, which turns a missing cluster into a failure instead of a skip.
#[test]
fn two_servers_sharing_a_rados_pool() {
    let (Ok(conf), pool) = (std::env::var("NBD_CAS_CEPH_CONF"), std::env::var("NBD_CAS_CEPH_POOL").unwrap_or_else(|_| "nbd-cas".into())) else {
        assert!(std::env::var("NBD_CAS_REQUIRE_CEPH").is_err(), "NBD_CAS_REQUIRE_CEPH is set but NBD_CAS_CEPH_CONF is not");
        eprintln!(
            "########## SKIPPED two_servers_sharing_a_rados_pool: no Ceph cluster (scripts/ceph-cluster.sh start; eval \"$(scripts/ceph-cluster.sh env)\")"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Each run uses its own RADOS namespace, so runs never see each other's blocks.
    let ns = format!("e2e-{}-{}", std::process::id(), d.file_name().unwrap().to_string_lossy().replace('.', ""));
    let blocks = format!("rados:{pool}/{ns}");
    let args = ["--blocks", blocks.as_str(), "--ceph-conf", conf.as_str(), "--migration-insecure"];
    let a = Server::start(d, "a", &args);
    let b = Server::start(d, "b", &[&args[..], &["--migration-listen", "127.0.0.1:0"]].concat());
    let vm = d.join("vm.raw");
    let content = image(&vm, 1024, 512, 3, 4);
    load(&a, "vm", &vm);
    // A copy of the same VM on B (another tenant's clone): B's store references the same
    // pool blocks.
    load(&b, "clone", &vm);
    a.fsck_clean();
    b.fsck_clean();
    // Migrating vm from A to B inside the datacentre: B already has every block in the pool.
    let out = migrate(&a, &b, "vm", &[]);
    assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["link"]["data_wire_bytes"], 0, "only fingerprints crossed: {}", report["link"]);
    assert_eq!(report["destination"]["wanted"], 0);
    let got = d.join("got.raw");
    run(Command::new("nbdcopy").arg(b.uri("vm")).arg(&got));
    assert!(std::fs::read(&got).unwrap() == content);
    // A deletes its copy (it still had vm: the migration kept the source disk); B keeps
    // reading both of its disks, whose blocks the pool must keep.
    let left = a.disks();
    for name in left {
        a.ok("disk.delete", json!({"name": name}));
    }
    assert!(a.disks().is_empty());
    for name in ["vm", "clone"] {
        run(Command::new("nbdcopy").arg(b.uri(name)).arg(&got));
        assert!(std::fs::read(&got).unwrap() == content, "{name} intact on B after A deleted its disks");
    }
    a.fsck_clean();
    b.fsck_clean();
}

/// Kill -9 of one server in the middle of a migration (before the switch-over, or after it
/// with `post_copy`), a restart on the same store, and the migration goes on to a byte-exact
/// disk at the destination.
fn kill_mid_migration(kill_source: bool, post_copy: bool) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let certs = certs(d, "dc1,dc2");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let dst_args: Vec<String> = [vec!["--migration-listen".to_string(), listen.clone()], tls_args(&certs, "dc2")].concat();
    let dst_args: Vec<&str> = dst_args.iter().map(String::as_str).collect();
    let src_args = tls_args(&certs, "dc1");
    let src_args: Vec<&str> = src_args.iter().map(String::as_str).collect();
    let mut dst = Server::start(d, "dst", &dst_args);
    let mut src = Server::start(d, "src", &src_args);
    // 48 MiB, mostly data of its own; a neighbour at the destination holds 2000 blocks.
    let vm = d.join("vm.raw");
    let content = image(&vm, 12288, 2000, 7, 9);
    image(&d.join("neighbour.raw"), 4096, 2000, 9, 0);
    load(&src, "vm", &vm);
    load(&dst, "neighbour", &d.join("neighbour.raw"));
    // A capped link, so the kill lands in the middle of the data.
    let switch_after = if post_copy { "fingerprints" } else { "precopy" };
    let migrate_cmd = Command::new(MIGRATE)
        .args(["--source", src.ctl(), "--dest", dst.ctl(), "--disk", "vm", "--json", "--timeout", "300", "--bandwidth", "60mbit", "--reconnect-window", "120"])
        .args(["--switch-after", switch_after])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let phase = if post_copy { "post-copy" } else { "pre-copy" };
    let m = wait_for_migration(&src, "data is crossing", |m| m["role"] == "source" && m["phase"] == phase && m["blocks_sent"].as_u64().unwrap_or(0) > 3000);
    let id = m["id"].as_str().unwrap().to_string();
    if kill_source {
        // The operator changes the cap; the restarted source keeps the new one.
        run(Command::new(MIGRATE).args(["set-bandwidth", "--server", src.ctl(), &id, "50mbit"]));
        src.child.kill().unwrap();
        src.child.wait().unwrap();
        // `migrate` was following the source, which is gone.
        let out = migrate_cmd.wait_with_output().unwrap();
        assert!(!out.status.success());
        src = Server::start(d, "src", &src_args);
        // After the restart the control API shows the migration, interrupted, and the
        // disk is still served here (the switch-over had not happened).
        let r = src.ok("migration.status", json!({"id": id}));
        assert_eq!(r["phase"], "interrupted", "{r}");
        assert_eq!(r["bandwidth_bps"], 50_000_000, "the cap set before the kill: {r}");
        // Before the switch-over the source still serves the disk; after it, never again.
        let exported = src.ok("server.info", json!({}))["exports"].as_array().unwrap().iter().any(|e| e == "vm");
        assert_eq!(exported, !post_copy);
        let status = run(Command::new(MIGRATE).args(["status", "--server", src.ctl(), "--json"]));
        let listed: Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(listed[0]["id"], id.as_str());
        let out = run(Command::new(MIGRATE).args(["resume", "--server", src.ctl(), &id, "--json", "--timeout", "300"]));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["phase"], "done", "{report}");
        assert_eq!(report["bandwidth_bps"], 50_000_000, "the resumed migration ran under the cap set before the kill");
        eprintln!("source killed at {} blocks sent; after the restart: {} blocks sent, link {}", m["blocks_sent"], report["blocks_sent"], report["link"]);
        assert!(report["blocks_sent"].as_u64().unwrap() < 10288, "blocks the destination had were not sent again");
        // Cancel is refused after the switch-over, and for a finished migration.
        let again = Command::new(MIGRATE).args(["cancel", "--server", src.ctl(), &id]).output().unwrap();
        assert!(!again.status.success());
    } else {
        dst.child.kill().unwrap();
        dst.child.wait().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        dst = Server::start(d, "dst", &dst_args);
        // The restarted destination knows the migration and parks it for the source; the
        // partial disk is kept (not exported).
        let parked = dst.ok("migration.status", json!({"id": id}));
        assert_eq!(parked["role"], "destination", "{parked}");
        // The disk is exported under its name at once: before the switch-over as a standby
        // export whose reads come from the source (over the resumed link), after it as the
        // disk itself, missing blocks waiting for the source.
        let exported = dst.ok("server.info", json!({}))["exports"].as_array().unwrap().iter().any(|e| e == "vm");
        assert!(exported, "{parked}");
        let early = d.join("early.raw");
        run(Command::new("nbdcopy").arg(dst.uri("vm")).arg(&early));
        assert!(std::fs::read(&early).unwrap() == content, "reads while the rest is still on its way");
        let out = migrate_cmd.wait_with_output().unwrap();
        assert!(out.status.success(), "migrate: {}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["phase"], "done", "{report}");
        assert!(report["link"]["reconnects"].as_u64().unwrap() >= 1, "{report}");
        // Blocks verified before the kill were not sent again: at most what was in flight.
        let sent = report["blocks_sent"].as_u64().unwrap();
        eprintln!("destination killed at {} blocks sent: {sent} blocks sent in all, link {}", m["blocks_sent"], report["link"]);
        assert!(sent < 10288 + 2048, "{sent} blocks sent for 10288 missing ones");
    }
    let out_file = d.join("out.raw");
    // The destination has finished; wait until it lists the migration as done.
    wait_for_migration(&dst, "destination done", |m| m["id"] == id.as_str() && m["phase"] == "done");
    run(Command::new("nbdcopy").arg(dst.uri("vm")).arg(&out_file));
    assert!(std::fs::read(&out_file).unwrap() == content, "destination differs from the source");
    assert_eq!(dst.disks(), vec!["neighbour".to_string(), "vm".to_string()]);
    dst.fsck_clean();
    src.fsck_clean();
    assert!(std::fs::read_dir(d.join("dst/migrations")).unwrap().next().is_none(), "no migration record left at the destination");
    assert!(std::fs::read_dir(d.join("src/migrations")).unwrap().next().is_none(), "no migration record left at the source");
}

#[test]
fn sigkill_of_the_destination_mid_migration_then_restart_resumes_byte_exact() {
    kill_mid_migration(false, false);
}

#[test]
fn sigkill_of_the_destination_in_post_copy_then_restart_resumes_byte_exact() {
    kill_mid_migration(false, true);
}

#[test]
fn sigkill_of_the_source_mid_migration_then_restart_and_migrate_resume_is_byte_exact() {
    kill_mid_migration(true, false);
}

#[test]
fn sigkill_of_the_source_in_post_copy_then_restart_and_migrate_resume_is_byte_exact() {
    kill_mid_migration(true, true);
}

/// Bytes a migration has put on its link so far, from its source's report.
fn link_bytes(src: &Server, id: &str) -> u64 {
    src.ok("migration.status", json!({ "id": id }))["link"]["total_bytes"].as_u64().expect("link.total_bytes")
}

/// The link rate over `window`, in bytes per second.
fn link_rate(src: &Server, id: &str, window: Duration) -> f64 {
    let (b0, t0) = (link_bytes(src, id), Instant::now());
    std::thread::sleep(window);
    (link_bytes(src, id) - b0) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn the_bandwidth_cap_of_a_running_migration_changes_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dst = Server::start(d, "dst", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    let src = Server::start(d, "src", &["--migration-insecure"]);
    let vm = d.join("vm.raw");
    let content = image(&vm, 24576, 0, 9, 0); // 96 MiB, nothing at the destination
    load(&src, "vm", &vm);
    let (mut run_migrate, id) = start_capped(&src, &dst, "vm", "8mbit");
    let started = Instant::now();
    let set = |rate: &str| {
        let out = run(Command::new(MIGRATE).args(["set-bandwidth", "--server", src.ctl(), &id, rate, "--json"]));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["bandwidth_bps"].clone()
    };
    // Wait for the data to flow (after the listing), then measure each setting for a second.
    while link_bytes(&src, &id) < 1 << 20 {
        assert!(started.elapsed() < Duration::from_secs(30), "no data on the link");
        std::thread::sleep(Duration::from_millis(50));
    }
    let capped = link_rate(&src, &id, Duration::from_millis(1500));
    assert_eq!(set("200mbit"), json!(200_000_000u64));
    let raised = link_rate(&src, &id, Duration::from_millis(600));
    assert_eq!(set("8mbit"), json!(8_000_000u64));
    std::thread::sleep(Duration::from_millis(300));
    let lowered = link_rate(&src, &id, Duration::from_millis(1000));
    eprintln!("link rate: {:.2} MB/s at 8 Mbit/s, {:.2} MB/s raised to 200 Mbit/s, {:.2} MB/s lowered again", capped / 1e6, raised / 1e6, lowered / 1e6);
    assert!(capped > 0.4e6 && capped < 1.5e6, "capped at 1 MB/s: {capped:.0} B/s");
    assert!(raised > 4.0 * capped, "raised: {raised:.0} B/s against {capped:.0}");
    assert!(lowered < 1.5e6, "lowered again: {lowered:.0} B/s");
    let status = src.ok("migration.status", json!({ "id": id }));
    assert_eq!(status["bandwidth_bps"], json!(8_000_000u64));
    assert_eq!(set("off"), Value::Null);
    assert!(run_migrate.wait().unwrap().success());
    let out = d.join("out.raw");
    run(Command::new("nbdcopy").arg(dst.uri("vm")).arg(&out));
    assert!(std::fs::read(&out).unwrap() == content, "byte-exact at the destination");
    // At the destination, and once it has ended, the cap cannot be set.
    let refused = Command::new(MIGRATE).args(["set-bandwidth", "--server", src.ctl(), &id, "10mbit"]).output().unwrap();
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("already ended"));
}
