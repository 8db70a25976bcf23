//! Live migration of a running VM whose disk is an NBD export: QEMU moves the memory and
//! devices between two QEMUs while `migrate` moves the disk between two `nbd-server`s, and the
//! disk switches over at the moment QEMU pauses the VM for the last time (QEMU's
//! `pause-before-switchover`, the hook libvirt uses; `migrate --switch-after manual` plus
//! `migrate switch`).
//!
//! The guest (scripts/guest-kit.sh, writer mode) writes numbered files on ext4 with fsync the
//! whole time and verifies every one of them at the end, after the move.
//!
//! Needs qemu-system-x86_64 and the guest kit (scripts/install-deps.sh, scripts/guest-kit.sh);
//! skips loudly without them, fails under NBD_CAS_REQUIRE_QEMU=1.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::data::noise;
use common::server::{load, run, Background, Server, TestDir, CAS, MIGRATE};
use common::vm::{kit_or_skip, Kit, Qemu, Qmp, VmConfig};

const DISK_SIZE: u64 = 256 << 20;
const SEED_BYTES: usize = 48 << 20;

/// Two servers, the VM running at A and writing, and `migrate` running until the switch.
struct Setup {
    vm_a: Qemu,
    migrate: Background,
    a: Server,
    b: Server,
    kit: Kit,
    id: String,
    /// Last: dropped after the processes that write into it.
    dir: TestDir,
}

impl Setup {
    fn d(&self) -> &Path {
        self.dir.path()
    }
}

/// `migrate status --server CTL --json`: the reports of the server's migrations.
fn status(server: &Server) -> Vec<Value> {
    let out = run(Command::new(MIGRATE).args(["status", "--server", server.ctl(), "--json"]));
    match serde_json::from_slice(&out.stdout) {
        Ok(Value::Array(list)) => list,
        other => panic!("migrate status --json: {other:?}: {}", String::from_utf8_lossy(&out.stdout)),
    }
}

/// Polls `migrate status` at `server` until the migration of `vm` satisfies `pred`.
fn wait_status(server: &Server, what: &str, timeout: Duration, migrate: &mut Background, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let list = status(server);
        if let Some(m) = list.iter().find(|m| m["disk"] == "vm" && m["role"] == "source" && pred(m)) {
            return m.clone();
        }
        if let Some(st) = migrate.try_wait() {
            panic!("migrate exited ({st}) while waiting for {what}: {list:?}\nstdout: {}\nstderr: {}", migrate.stdout(), migrate.stderr());
        }
        assert!(Instant::now() < deadline, "{what}: not after {timeout:?}: {list:?}\nmigrate stderr: {}", migrate.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A makes the disk (ext4 made on the host), the writer guest boots at A and writes, and the
/// disk's migration runs to the point where it is ready to switch over.
fn setup(test: &str) -> Option<Setup> {
    let kit = kit_or_skip(test)?;
    let dir = TestDir::new();
    let d = dir.path().to_path_buf();
    let a = Server::start(&d, "a", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    let b = Server::start(&d, "b", &["--migration-listen", "127.0.0.1:0", "--migration-insecure"]);
    // The filesystem carries SEED_BYTES of data besides the guest's files, so that the
    // disk's pre-copy overlaps the guest's writes; the host compares it at the end.
    let seed = d.join("seed");
    std::fs::create_dir(&seed).expect("mkdir seed");
    std::fs::write(seed.join("blob"), noise(SEED_BYTES)).expect("write the seed blob");
    let raw = d.join("vm.raw");
    std::fs::File::create(&raw).and_then(|f| f.set_len(DISK_SIZE)).expect("create vm.raw");
    run(Command::new("mkfs.ext4").args(["-F", "-q", "-L", "vm", "-d"]).arg(&seed).arg(&raw));
    load(&a, "vm", &raw);
    std::fs::remove_file(&raw).expect("remove vm.raw");

    let mut vm_a = Qemu::start(&d, &kit, &vm_config("vm-a", &a, false));
    vm_a.wait_serial("GUEST READY", Duration::from_secs(120));
    eprintln!("{test}: guest booted in {:.1} s", vm_a.started.elapsed().as_secs_f64());
    vm_a.wait_serial("GUEST PROGRESS", Duration::from_secs(120));

    // The disk's migration runs in the background until the hypervisor's hook switches it.
    let mut migrate = Background::spawn(
        &d,
        "migrate",
        Command::new(MIGRATE)
            .args(["--source", a.ctl(), "--dest", b.ctl(), "--disk", "vm", "--switch-after", "manual", "--delete-source", "--json"])
            .args(["--timeout", "600"]),
    );
    let m = wait_status(&a, "the migration of vm", Duration::from_secs(60), &mut migrate, |_| true);
    let id = m["id"].as_str().unwrap_or_else(|| panic!("no id in {m}")).to_string();
    let ready = Instant::now();
    let m = wait_status(&a, "ready_to_switch", Duration::from_secs(180), &mut migrate, |m| m["ready_to_switch"] == true);
    eprintln!("{test}: migration {id} ready to switch after {:.1} s (phase {})", ready.elapsed().as_secs_f64(), m["phase"]);
    // Writes after the pre-copy: the disk's migration has to track them until the switch.
    let p = vm_a.progress().unwrap_or(0);
    vm_a.wait_progress_beyond(p + 20, Duration::from_secs(120));
    Some(Setup { vm_a, migrate, a, b, kit, id, dir })
}

fn vm_config(name: &str, server: &Server, incoming: bool) -> VmConfig {
    let mut cfg = VmConfig::new(name, "guest.mode=writer");
    cfg.disk = Some((server.socket.clone(), "vm".to_string()));
    cfg.incoming = incoming;
    cfg
}

/// QEMU at B waits for the VM (its disk is B's standby export `vm`), QEMU at A migrates to it
/// and stops at `pre-switchover`: the VM is paused, its drives drained and flushed.
fn qemu_migrate_to_pre_switchover(s: &mut Setup) -> (Qemu, Qmp, Qmp) {
    let d = s.d().to_path_buf();
    let uri = format!("unix:{}", d.join("qemu-migration.sock").display());
    let vm_b = Qemu::start(&d, &s.kit, &vm_config("vm-b", &s.b, true));
    let mut qmp_b = vm_b.qmp();
    qmp_b.ok("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}));
    qmp_b.ok("migrate-incoming", json!({"uri": uri}));
    let mut qmp_a = s.vm_a.qmp();
    qmp_a.ok(
        "migrate-set-capabilities",
        json!({"capabilities": [{"capability": "events", "state": true}, {"capability": "pause-before-switchover", "state": true}]}),
    );
    qmp_a.ok("migrate", json!({"uri": uri}));
    if let Err(e) = qmp_a.wait_event("MIGRATION", Duration::from_secs(180), |d| d["status"] == "pre-switchover") {
        let q = qmp_a.execute("query-migrate", json!({}));
        panic!("QEMU A: {e}; query-migrate: {q:?}\n{}", s.vm_a.diagnostics());
    }
    (vm_b, qmp_a, qmp_b)
}

/// Polls `query-status` until the VM runs.
fn wait_running(qmp: &mut Qmp, who: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let st = qmp.ok("query-status", json!({}));
        if st["status"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "{who}: VM not running after {timeout:?}: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops the writer, which verifies every file it wrote, unmounts and powers off.
fn stop_and_verify(vm: &mut Qemu) -> String {
    vm.send("stop");
    let ok = vm.wait_serial("GUEST VERIFY OK", Duration::from_secs(300));
    vm.wait_serial("GUEST DONE", Duration::from_secs(60));
    let st = vm.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{}: QEMU exit {st}\n{}", vm.name, vm.diagnostics());
    vm.assert_no_trouble();
    ok
}

/// The store's own check through the `cas` command.
fn cas_fsck(server: &Server) {
    let out = run(Command::new(CAS).args(["fsck", "--verify", "--server", server.ctl()]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("clean"), "cas fsck: {}", String::from_utf8_lossy(&out.stdout));
}

/// e2fsck -fn on a copy of an export, and the seed data made on the host still intact.
fn check_export(server: &Server, dir: &Path) {
    let copy: PathBuf = dir.join("check.raw");
    run(Command::new("nbdcopy").arg(server.uri("vm")).arg(&copy));
    let out = run(Command::new("e2fsck").arg("-fn").arg(&copy));
    eprintln!("e2fsck -fn: {}", String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default());
    let blob = dir.join("blob.out");
    run(Command::new("debugfs").arg("-R").arg(format!("dump /blob {}", blob.display())).arg(&copy));
    assert!(std::fs::read(&blob).expect("dumped blob") == noise(SEED_BYTES), "the seed data in the filesystem changed");
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_file(&blob);
}

#[test]
fn a_running_vm_and_its_disk_move_together_at_the_pause() {
    let Some(mut s) = setup("a_running_vm_and_its_disk_move_together_at_the_pause") else { return };
    let (mut vm_b, mut qmp_a, mut qmp_b) = qemu_migrate_to_pre_switchover(&mut s);
    let at_pause = s.vm_a.progress().unwrap_or(0);

    // The hook: the VM is paused; switch the disk over, then let QEMU send the last state.
    let asked = Instant::now();
    let mut switch = Background::spawn(s.d(), "switch", Command::new(MIGRATE).args(["switch", "--server", s.a.ctl(), &s.id, "--json"]));
    let st = switch.wait(Duration::from_secs(120));
    let switch_wall = asked.elapsed();
    assert!(st.success(), "migrate switch: {st}\nstdout: {}\nstderr: {}", switch.stdout(), switch.stderr());
    let switched: Value = serde_json::from_str(&switch.stdout()).unwrap_or_else(|e| panic!("migrate switch --json: {e}: {}", switch.stdout()));
    qmp_a.ok("migrate-continue", json!({"state": "pre-switchover"}));

    let done = qmp_a.wait_migration(&["completed", "failed", "cancelled"], Duration::from_secs(120));
    assert_eq!(done["status"], "completed", "QEMU A: {done}\n{}", s.vm_a.diagnostics());
    wait_running(&mut qmp_b, "QEMU B", Duration::from_secs(60));
    // QEMU A's last flushes (at completion and at quit) reach a source that has switched over.
    match qmp_a.execute("quit", json!({})) {
        Ok(Ok(_)) | Err(_) => {} // the connection may close before the answer
        Ok(Err(e)) => panic!("quit: {e}"),
    }
    let st = s.vm_a.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "QEMU A exit {st}\n{}", s.vm_a.diagnostics());
    s.vm_a.assert_no_trouble();

    // The guest goes on writing at B, then verifies every file it wrote at A and at B.
    let after = vm_b.wait_progress_beyond(at_pause, Duration::from_secs(120));
    let verified = stop_and_verify(&mut vm_b);
    drop(qmp_b);

    // `migrate` ends once B has every block and A's copy is deleted.
    let st = s.migrate.wait(Duration::from_secs(300));
    assert!(st.success(), "migrate: {st}\nstdout: {}\nstderr: {}", s.migrate.stdout(), s.migrate.stderr());
    let report: Value = serde_json::from_str(&s.migrate.stdout()).unwrap_or_else(|e| panic!("migrate --json: {e}: {}", s.migrate.stdout()));
    assert_eq!(report["phase"], "done", "{report}");
    assert!(!s.a.disks().contains(&"vm".to_string()), "--delete-source: A still lists vm: {:?}", s.a.disks());
    assert_eq!(s.b.disks(), vec!["vm".to_string()]);
    check_export(&s.b, s.d());
    cas_fsck(&s.a);
    cas_fsck(&s.b);

    eprintln!(
        "VM downtime (QEMU): {} ms; disk downtime (migrate switch): {} ms; `migrate switch` took {:.1} ms (its own measure: {} ms); \
         guest progress {at_pause} at the pause, {after} at B; {verified}",
        done["downtime"],
        switched["downtime_ms"],
        switch_wall.as_secs_f64() * 1000.0,
        switched["switch_call_ms"],
    );
}

#[test]
fn cancel_at_the_pause_leaves_the_vm_running_at_the_source() {
    let Some(mut s) = setup("cancel_at_the_pause_leaves_the_vm_running_at_the_source") else { return };
    assert!(s.b.exports().contains(&"vm".to_string()), "B serves a standby export for the incoming VM: {:?}", s.b.exports());
    let (vm_b, mut qmp_a, qmp_b) = qemu_migrate_to_pre_switchover(&mut s);
    let at_pause = s.vm_a.progress().unwrap_or(0);

    // The hook gives up at the pause: cancel the disk's migration, then QEMU's.
    let out = run(Command::new(MIGRATE).args(["cancel", "--server", s.a.ctl(), &s.id, "--json"]));
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("migrate cancel --json: {e}"));
    assert_eq!(r["phase"], "cancelled", "{r}");
    qmp_a.ok("migrate_cancel", json!({}));
    let q = qmp_a.wait_migration(&["cancelled", "failed"], Duration::from_secs(60));
    assert_eq!(q["status"], "cancelled", "{q}");
    wait_running(&mut qmp_a, "QEMU A", Duration::from_secs(60));

    let st = s.migrate.wait(Duration::from_secs(120));
    assert!(!st.success(), "migrate reports that the migration did not complete");
    // The incoming QEMU exits on its own once its migration fails; it is killed otherwise.
    drop(qmp_b);
    let mut vm_b = vm_b;
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm_b.try_wait().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(vm_b);
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.b.exports().contains(&"vm".to_string()) || !s.b.disks().is_empty() {
        assert!(Instant::now() < deadline, "B still has vm: exports {:?}, disks {:?}", s.b.exports(), s.b.disks());
        std::thread::sleep(Duration::from_millis(100));
    }

    // The VM runs on at A with its disk intact.
    let after = s.vm_a.wait_progress_beyond(at_pause, Duration::from_secs(120));
    let verified = stop_and_verify(&mut s.vm_a);
    assert_eq!(s.a.disks(), vec!["vm".to_string()]);
    check_export(&s.a, s.d());
    cas_fsck(&s.a);
    cas_fsck(&s.b);
    eprintln!("after the cancel: guest progress {at_pause} at the pause, {after} later at A; {verified}");
}
