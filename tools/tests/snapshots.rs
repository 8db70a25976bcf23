//! Snapshots and clones of a running server's disks, made with `cas` through the control API
//! and read and written with real NBD clients (qemu-img, qemu-io, nbdcopy).

use std::process::Command;

use serde_json::json;

mod common;
use common::data::noise;
use common::server::{load, run, Server, TestDir};

fn cas(args: &[&str]) -> serde_json::Value {
    let out = run(Command::new(env!("CARGO_BIN_EXE_cas")).args(args));
    serde_json::from_slice(&out.stdout).expect("cas --json prints JSON")
}

fn copy_of(server: &Server, export: &str, dir: &std::path::Path) -> Vec<u8> {
    let file = dir.join(format!("{export}.copy"));
    run(Command::new("nbdcopy").arg(server.uri(export)).arg(&file));
    std::fs::read(&file).unwrap()
}

#[test]
fn snapshot_and_clone_share_blocks_and_are_exported_like_any_disk() {
    let dir = TestDir::new();
    let server = Server::start(dir.path(), "dc", &[]);
    let mut image = noise(8 << 20);
    image[(4 << 20)..(5 << 20)].fill(0);
    let file = dir.path().join("vm.raw");
    std::fs::write(&file, &image).unwrap();
    load(&server, "vm", &file);
    let stored = server.ok("store.stats", json!({}))["store"]["stored_bytes"].as_u64().expect("stored_bytes");

    let snap = cas(&["snapshot", "vm", "vm@monday", "--server", server.ctl(), "--json"]);
    assert_eq!(snap["read_only"], true);
    assert_eq!(snap["origin"], "vm");
    let clone = cas(&["clone", "vm@monday", "vm2", "--server", server.ctl(), "--json"]);
    assert_eq!(clone["read_only"], false);
    assert_eq!(server.ok("store.stats", json!({}))["store"]["stored_bytes"].as_u64(), Some(stored), "no block was copied");
    let exports = server.exports();
    assert!(exports.contains(&"vm@monday".to_string()) && exports.contains(&"vm2".to_string()), "{exports:?}");

    // The guest goes on writing its disk; the snapshot keeps the content it had.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x5a 0 1M", &server.uri("vm")]));
    assert_eq!(copy_of(&server, "vm@monday", dir.path()), image);
    // A snapshot is read-only: clients see READ_ONLY, and a write is refused.
    let info = run(Command::new("nbdinfo").args(["--json", &server.uri("vm@monday")]));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["exports"][0]["is_read_only"], true, "{info}");
    let write = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 1 0 4k", &server.uri("vm@monday")]).output().unwrap();
    assert!(!write.status.success() || String::from_utf8_lossy(&write.stdout).contains("failed"), "a write to a snapshot must fail");
    assert_eq!(copy_of(&server, "vm@monday", dir.path()), image);

    // The clone is a disk of its own.
    run(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x33 4M 64k", &server.uri("vm2")]));
    let mut expected = image.clone();
    expected[(4 << 20)..(4 << 20) + (64 << 10)].fill(0x33);
    assert_eq!(copy_of(&server, "vm2", dir.path()), expected);

    // Deleting the origin and the snapshot leaves the clone whole, and the counts right.
    server.ok("disk.delete", json!({"name": "vm"}));
    server.ok("disk.delete", json!({"name": "vm@monday"}));
    assert_eq!(copy_of(&server, "vm2", dir.path()), expected);
    server.fsck_clean();

    // Bad requests get clear errors.
    let again = Command::new(env!("CARGO_BIN_EXE_cas")).args(["clone", "vm2", "vm2", "--server", server.ctl()]).output().unwrap();
    assert!(!again.status.success() && String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let missing = Command::new(env!("CARGO_BIN_EXE_cas")).args(["snapshot", "nothing", "s", "--server", server.ctl()]).output().unwrap();
    assert!(!missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("not found"));
}
