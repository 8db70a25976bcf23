//! The Xen path with a real kernel: a Linux guest under QEMU attaches an export of a real
//! `nbd-server` with Debian's `nbd-client` (as a Xen host attaches a VBD), makes an ext4
//! filesystem on /dev/nbd0, writes and reads back a file with O_DIRECT, checks the
//! filesystem and disconnects. The host then checks what landed in the store.
//!
//! Needs qemu-system-x86_64 and the guest kit (scripts/install-deps.sh, scripts/guest-kit.sh);
//! skips loudly without them, fails under NBD_CAS_REQUIRE_QEMU=1.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

mod common;
use common::server::{run, Server, TestDir};
use common::vm::{kit_or_skip, Qemu, VmConfig};

#[test]
fn kernel_nbd_client_in_a_guest_makes_a_clean_ext4_filesystem() {
    let Some(kit) = kit_or_skip("kernel_nbd_client_in_a_guest_makes_a_clean_ext4_filesystem") else { return };
    let dir = TestDir::new();
    let d = dir.path();
    let t0 = Instant::now();
    // The kernel client speaks TCP here (QEMU's user network reaches the host's loopback).
    let server = Server::start(d, "dc", &["--listen", "127.0.0.1:0"]);
    let size: u64 = 256 << 20;
    server.ok("disk.create", json!({"name": "xen", "size": size}));

    let append = format!("guest.mode=nbd-client guest.server=10.0.2.2 guest.port={} guest.export=xen", server.tcp_port());
    let mut cfg = VmConfig::new("guest", &append);
    cfg.user_net = true;
    let mut vm = Qemu::start(d, &kit, &cfg);
    vm.wait_serial("GUEST READY", Duration::from_secs(120));
    let booted = vm.started.elapsed();
    let ok = vm.wait_serial("GUEST OK", Duration::from_secs(300));
    let status = vm.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "QEMU exit {status}\n{}", vm.diagnostics());
    vm.assert_no_trouble();
    let field = |key: &str| ok.split_whitespace().find_map(|w| w.strip_prefix(key)).map(str::to_string);
    let md5 = field("md5=").unwrap_or_else(|| panic!("no md5 in {ok:?}"));
    eprintln!("guest booted in {:.1} s; {ok}", booted.as_secs_f64());

    // On the host: the export holds a clean ext4 filesystem with the guest's file in it.
    let copy = d.join("xen.raw");
    run(Command::new("nbdcopy").arg(server.uri("xen")).arg(&copy));
    assert_eq!(std::fs::metadata(&copy).expect("the copy").len(), size);
    let fsck = run(Command::new("e2fsck").arg("-fn").arg(&copy));
    eprintln!("host e2fsck -fn: {}", String::from_utf8_lossy(&fsck.stdout).lines().last().unwrap_or_default());
    let data = d.join("data.out");
    run(Command::new("debugfs").arg("-R").arg(format!("dump /data {}", data.display())).arg(&copy));
    let sum = run(Command::new("md5sum").arg(&data));
    let host_md5 = String::from_utf8_lossy(&sum.stdout).split_whitespace().next().unwrap_or_default().to_string();
    assert_eq!(host_md5, md5, "the file in the export differs from what the guest wrote");
    assert_eq!(std::fs::metadata(&data).expect("dumped file").len(), 8 << 20);
    server.fsck_clean();
    eprintln!("kernel-client test: {:.1} s in all", t0.elapsed().as_secs_f64());
}
