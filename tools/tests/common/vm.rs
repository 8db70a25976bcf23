//! A small Linux guest under QEMU (TCG) whose disk is an NBD export, and a minimal QMP client.
//!
//! The guest is `scripts/guest-kit.sh`'s kernel and initramfs; its `/init` reads its job from
//! the kernel command line and reports marker lines (`GUEST READY`, `GUEST PROGRESS n`,
//! `GUEST OK`, `GUEST FAIL ...`, ...) on ttyS0, which QEMU writes to a log file the test
//! polls. A second serial port, ttyS1, is a Unix socket the test writes commands to (`stop`).
//!
//! QEMU runs with `-accel tcg`: `/dev/kvm` on these machines cannot boot a stock kernel.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::server::workspace;

pub const QEMU: &str = "qemu-system-x86_64";
/// Set (test.sh does) to turn a missing QEMU or guest kit into a failure instead of a skip.
pub const REQUIRE_ENV: &str = "NBD_CAS_REQUIRE_QEMU";

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct Kit {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// QEMU and the guest kit (built by `scripts/guest-kit.sh` on first use, then cached), or
/// `None` after printing loudly why `test` is skipped. With NBD_CAS_REQUIRE_QEMU=1 a missing
/// piece fails the test instead.
pub fn kit_or_skip(test: &str) -> Option<Kit> {
    let skip = |why: String| -> Option<Kit> {
        assert!(std::env::var_os(REQUIRE_ENV).is_none(), "{REQUIRE_ENV} is set but {test} cannot run: {why}");
        let banner = format!("########## SKIPPED {test}: {why} (scripts/install-deps.sh installs QEMU; set {REQUIRE_ENV}=1 to fail instead)");
        eprintln!("{banner}");
        println!("{banner}");
        None
    };
    match Command::new(QEMU).arg("--version").output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => return skip(format!("`{QEMU} --version` failed: {}", String::from_utf8_lossy(&out.stderr).trim())),
        Err(e) => return skip(format!("{QEMU} not found ({e})")),
    }
    // The first build downloads about 30 MB of Debian packages; later runs print the cached path.
    let script = workspace().join("scripts/guest-kit.sh");
    let out = match Command::new("timeout").arg("900").arg(&script).stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) => return skip(format!("cannot run {}: {e}", script.display())),
    };
    if !out.status.success() {
        return skip(format!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim());
    let kit = Kit { kernel: dir.join("vmlinuz"), initrd: dir.join("initramfs.cpio.gz") };
    if !kit.kernel.is_file() || !kit.initrd.is_file() {
        return skip(format!("guest-kit.sh printed {}, which has no vmlinuz and initramfs.cpio.gz", dir.display()));
    }
    Some(kit)
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Names the files in the test directory (NAME.serial.log, NAME.qmp, ...).
    pub name: String,
    /// The guest's job, e.g. `guest.mode=writer`; appended to the kernel command line.
    pub append: String,
    /// The disk: (server's Unix socket, export name), as virtio-blk (/dev/vda).
    pub disk: Option<(PathBuf, String)>,
    /// A virtio NIC on QEMU's user-mode network (the host's loopback is 10.0.2.2).
    pub user_net: bool,
    /// `-incoming defer`: the destination of a live migration.
    pub incoming: bool,
    pub memory_mb: u32,
}

impl VmConfig {
    pub fn new(name: &str, append: &str) -> VmConfig {
        VmConfig { name: name.to_string(), append: append.to_string(), disk: None, user_net: false, incoming: false, memory_mb: 256 }
    }
}

/// A running QEMU; killed when dropped.
#[derive(Debug)]
pub struct Qemu {
    pub name: String,
    child: Child,
    pub serial_log: PathBuf,
    pub qemu_log: PathBuf,
    pub qmp_socket: PathBuf,
    pub ctl_socket: PathBuf,
    /// The connection to ttyS1, kept open so that nothing written is dropped by a close.
    ctl: Option<UnixStream>,
    pub started: Instant,
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines in the serial log that mean the guest's disk failed it.
pub fn trouble(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("GUEST FAIL") || l.contains("I/O error") || l.contains("EXT4-fs error")).collect()
}

impl Qemu {
    pub fn start(dir: &Path, kit: &Kit, cfg: &VmConfig) -> Qemu {
        let serial_log = dir.join(format!("{}.serial.log", cfg.name));
        let qemu_log = dir.join(format!("{}.qemu.log", cfg.name));
        let qmp_socket = dir.join(format!("{}.qmp", cfg.name));
        let ctl_socket = dir.join(format!("{}.ttyS1", cfg.name));
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-machine", "pc", "-smp", "1", "-m", &cfg.memory_mb.to_string()])
            // No default devices (VGA, NIC, serial on stdio): exactly the ones below, so that
            // the source and destination of a live migration have the same hardware.
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&kit.kernel)
            .arg("-initrd")
            .arg(&kit.initrd)
            // loglevel=4: only warnings and errors on the console, so kernel messages rarely
            // land inside a marker line; panic=-1 with -no-reboot ends QEMU on a guest crash.
            .arg("-append")
            .arg(format!("console=ttyS0 loglevel=4 panic=-1 {}", cfg.append))
            .arg("-chardev")
            .arg(format!("file,id=con,path={}", serial_log.display()))
            .args(["-serial", "chardev:con"])
            .arg("-chardev")
            .arg(format!("socket,id=ctl,path={},server=on,wait=off", ctl_socket.display()))
            .args(["-serial", "chardev:ctl"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_socket.display()));
        if let Some((socket, export)) = &cfg.disk {
            cmd.arg("-blockdev").arg(format!("driver=nbd,node-name=disk0,server.type=unix,server.path={},export={export}", socket.display()));
            cmd.args(["-device", "virtio-blk-pci,drive=disk0"]);
        }
        if cfg.user_net {
            cmd.args(["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"]);
        }
        if cfg.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let log = std::fs::File::create(&qemu_log).expect("create the QEMU log");
        let child =
            cmd.stdin(Stdio::null()).stdout(log.try_clone().expect("clone the log file")).stderr(log).spawn().unwrap_or_else(|e| panic!("start {QEMU}: {e}"));
        Qemu { name: cfg.name.clone(), child, serial_log, qemu_log, qmp_socket, ctl_socket, ctl: None, started: Instant::now() }
    }

    /// Everything the guest has written to its console so far.
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    /// The serial log's tail and QEMU's own messages, for assertion messages.
    pub fn diagnostics(&self) -> String {
        let serial = self.serial();
        let lines: Vec<&str> = serial.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        let qemu = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
        format!("--- {} serial (last 30 lines of {}) ---\n{tail}\n--- {} QEMU log ---\n{qemu}", self.name, self.serial_log.display(), self.name)
    }

    /// Waits for a console line for which `pred` holds and returns it. Fails at once on
    /// `GUEST FAIL` (unless that is what `pred` looks for), or if QEMU exits first.
    pub fn wait_line(&mut self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if let Some(line) = serial.lines().find(|l| pred(l)) {
                return line.to_string();
            }
            if let Some(fail) = serial.lines().find(|l| l.contains("GUEST FAIL")) {
                panic!("{}: waiting for {what}, the guest failed: {fail}\n{}", self.name, self.diagnostics());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                // The last lines may have landed between the read and the exit.
                if let Some(line) = self.serial().lines().find(|l| pred(l)) {
                    return line.to_string();
                }
                panic!("{}: QEMU exited ({st}) while waiting for {what}\n{}", self.name, self.diagnostics());
            }
            assert!(Instant::now() < deadline, "{}: no {what} after {timeout:?}\n{}", self.name, self.diagnostics());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a console line containing `marker` and returns it.
    pub fn wait_serial(&mut self, marker: &str, timeout: Duration) -> String {
        self.wait_line(marker, timeout, |l| l.contains(marker))
    }

    /// The highest `GUEST PROGRESS n` so far.
    pub fn progress(&self) -> Option<u64> {
        self.serial().lines().filter_map(|l| l.split("GUEST PROGRESS ").nth(1)?.split_whitespace().next()?.parse().ok()).max()
    }

    /// Waits until the guest reports progress beyond `n`; returns the new count.
    pub fn wait_progress_beyond(&mut self, n: u64, timeout: Duration) -> u64 {
        let line = self.wait_line(&format!("GUEST PROGRESS beyond {n}"), timeout, |l| {
            l.split("GUEST PROGRESS ").nth(1).and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok()).is_some_and(|p| p > n)
        });
        line.split("GUEST PROGRESS ").nth(1).and_then(|r| r.split_whitespace().next()?.parse().ok()).unwrap_or(n + 1)
    }

    /// Asserts that the console shows no `GUEST FAIL` and no I/O error.
    pub fn assert_no_trouble(&self) {
        let serial = self.serial();
        let bad = trouble(&serial);
        assert!(bad.is_empty(), "{}: {bad:?}\n{}", self.name, self.diagnostics());
    }

    /// Sends one line to the guest's ttyS1 (the writer reads `stop` there).
    pub fn send(&mut self, line: &str) {
        if self.ctl.is_none() {
            let s = retry_connect(&self.ctl_socket, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{}: ttyS1 socket: {e}", self.name));
            self.ctl = Some(s);
        }
        let s = self.ctl.as_mut().expect("connected above");
        s.write_all(format!("{line}\n").as_bytes()).unwrap_or_else(|e| panic!("{}: write to ttyS1: {e}", self.name));
    }

    /// Connects to QMP (greeting and `qmp_capabilities` done).
    pub fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp_socket, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{}: QMP: {e}\n{}", self.name, self.diagnostics()))
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `timeout` for QEMU to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return st;
            }
            assert!(Instant::now() < deadline, "{}: QEMU still running after {timeout:?}\n{}", self.name, self.diagnostics());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn retry_connect(path: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A QMP connection: JSON objects, one per line, over a Unix socket. Events that arrive while
/// a command runs are queued for `wait_event`.
#[derive(Debug)]
pub struct Qmp {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Bytes of a message whose end has not arrived yet (a read timed out in its middle).
    partial: Vec<u8>,
    events: VecDeque<Value>,
}

/// How long one QMP command may take to answer.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

impl Qmp {
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = retry_connect(path, timeout).map_err(|e| format!("connect {}: {e}", path.display()))?;
        let reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut qmp = Qmp { writer: stream, reader, partial: Vec::new(), events: VecDeque::new() };
        let greeting = qmp.read_message(deadline)?.ok_or("no QMP greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", json!({}))?.map_err(|e| format!("qmp_capabilities: {e}"))?;
        Ok(qmp)
    }

    /// The next message, or `None` at the deadline.
    fn read_message(&mut self, deadline: Instant) -> Result<Option<Value>, String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.reader.get_ref().set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.reader.read_until(b'\n', &mut self.partial) {
                Ok(0) => return Err("QMP connection closed".to_string()),
                Ok(_) if self.partial.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.partial);
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    return serde_json::from_str(text.trim()).map(Some).map_err(|e| format!("bad QMP message {text:?}: {e}"));
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => continue,
                Err(e) => return Err(format!("QMP read: {e}")),
            }
        }
    }

    /// Runs a command: `Ok(Ok(return))`, `Ok(Err(error))` for a QMP error, `Err` for a
    /// transport failure or a timeout.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Result<Value, Value>, String> {
        let mut msg = json!({"execute": command});
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| format!("{command}: {e}"))?;
        let deadline = Instant::now() + QMP_COMMAND_TIMEOUT;
        loop {
            let m = self.read_message(deadline)?.ok_or_else(|| format!("{command}: no answer in {QMP_COMMAND_TIMEOUT:?}"))?;
            if m.get("event").is_some() {
                self.events.push_back(m);
            } else if let Some(r) = m.get("return") {
                return Ok(Ok(r.clone()));
            } else if let Some(e) = m.get("error") {
                return Ok(Err(e.clone()));
            }
        }
    }

    /// Runs a command that must succeed; panics with QEMU's error otherwise.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        match self.execute(command, arguments.clone()) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("QMP {command} {arguments}: {e}"),
            Err(e) => panic!("QMP {command} {arguments}: {e}"),
        }
    }

    /// Waits for an event `name` whose `data` satisfies `pred` (earlier events are dropped).
    pub fn wait_event(&mut self, name: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some(e) = self.events.pop_front() {
                if e["event"] == name && pred(&e["data"]) {
                    return Ok(e);
                }
            }
            match self.read_message(deadline)? {
                Some(m) if m.get("event").is_some() => self.events.push_back(m),
                Some(_) => {}
                None => return Err(format!("no {name} event in {timeout:?}")),
            }
        }
    }

    /// Polls `query-migrate` until its status is one of `states`; returns the last answer.
    pub fn wait_migration(&mut self, states: &[&str], timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.ok("query-migrate", json!({}));
            if states.iter().any(|s| r["status"] == *s) {
                return r;
            }
            assert!(Instant::now() < deadline, "migration not {states:?} after {timeout:?}: {r}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
