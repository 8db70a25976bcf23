//! Real `nbd-server` processes (a datacentre each) and the commands run against them.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const MIGRATE: &str = env!("CARGO_BIN_EXE_migrate");
pub const CAS: &str = env!("CARGO_BIN_EXE_cas");

/// How long a server may take to print "ready" (a RocksDB open, a restart restoring migrations).
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub fn nbd_server_bin() -> PathBuf {
    // Built by `cargo build --workspace` (test.sh does it first); same target directory.
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe.parent().and_then(Path::parent).map(|d| d.join("nbd-server")).expect("the test binary lives in target/PROFILE/deps");
    assert!(bin.exists(), "{} is missing: run `cargo build --release --workspace` first", bin.display());
    bin
}

pub fn workspace() -> PathBuf {
    tools_dir().parent().expect("tools/ is inside the workspace").to_path_buf()
}

/// This package's directory. The test runner's (cargo and nextest set it for every test
/// process) before the one compiled in: a test binary built from a checkout elsewhere that
/// cargo still finds fresh (same sources, shared target directory) names that checkout.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
}

/// A running server; killed when dropped.
#[derive(Debug)]
pub struct Server {
    pub child: Child,
    pub control: PathBuf,
    pub socket: PathBuf,
    /// The migration listener's address ("migrations on ADDR").
    pub migration: Option<String>,
    /// TCP NBD listeners ("listening on nbd://ADDR"), from `--listen` in `extra`.
    pub tcp: Vec<String>,
    /// TCP control API addresses (`--control-listen`), host:port.
    pub control_tcp: Vec<String>,
    /// The metrics URL (`--metrics-listen` in `extra`).
    pub metrics: Option<String>,
    pub log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `nbd-server --store DIR/NAME --unix DIR/NAME.sock --control DIR/NAME.ctl EXTRA...`
    /// and waits until it prints "ready".
    pub fn start(dir: &Path, name: &str, extra: &[&str]) -> Server {
        let control = dir.join(format!("{name}.ctl"));
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let mut child = Command::new(nbd_server_bin())
            .arg("--store")
            .arg(dir.join(name))
            .arg("--unix")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the server log"))
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbd-server");
        // The startup lines arrive through a thread so that a server that hangs before "ready"
        // fails the test after START_TIMEOUT instead of blocking it.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut migration = None;
        let mut tcp = Vec::new();
        let mut control_tcp = Vec::new();
        let mut metrics = None;
        let deadline = Instant::now() + START_TIMEOUT;
        let server = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{name} did not get ready ({e:?}): {}", std::fs::read_to_string(&log).unwrap_or_default());
                }
            };
            if let Some(addr) = line.strip_prefix("migrations on ") {
                migration = Some(addr.to_string());
            }
            if let Some(addr) = line.strip_prefix("listening on nbd://") {
                tcp.push(addr.to_string());
            }
            if let Some(addr) = line.strip_prefix("control on ").filter(|a| !a.starts_with('/')) {
                control_tcp.push(addr.to_string());
            }
            if let Some(url) = line.strip_prefix("metrics on ") {
                metrics = Some(url.to_string());
            }
            if line == "ready" {
                break Server { child, control, socket, migration, tcp, control_tcp, metrics, log };
            }
        };
        // Keep draining stdout (the thread ends at the server's exit).
        std::thread::spawn(move || rx.into_iter().for_each(drop));
        server
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn ctl(&self) -> &str {
        self.control.to_str().expect("UTF-8 path")
    }

    /// The port of the first TCP NBD listener (`--listen 127.0.0.1:0` in `extra`).
    pub fn tcp_port(&self) -> u16 {
        let addr = self.tcp.first().expect("the server was started with --listen");
        addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {addr}"))
    }

    /// One control API call; panics on a transport failure, returns the reply.
    pub fn call(&self, method: &str, params: Value) -> Value {
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap_or_else(|e| panic!("connect {}: {e}", self.control.display()));
        s.set_read_timeout(Some(Duration::from_secs(300))).expect("set_read_timeout");
        let mut line = serde_json::to_vec(&json!({"id": 1, "method": method, "params": params})).expect("JSON");
        line.push(b'\n');
        s.write_all(&line).unwrap_or_else(|e| panic!("{method}: {e}"));
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply).unwrap_or_else(|e| panic!("{method}: {e}"));
        serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{method}: {e}: {reply:?}"))
    }

    pub fn ok(&self, method: &str, params: Value) -> Value {
        let r = self.call(method, params);
        assert_eq!(r["ok"], true, "{method}: {r}\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        r["result"].clone()
    }

    pub fn disks(&self) -> Vec<String> {
        let list = self.ok("disk.list", json!({}));
        list.as_array().expect("disk.list returns an array").iter().map(|d| d["name"].as_str().unwrap_or_default().to_string()).collect()
    }

    /// The names this server exports now (`server.info`).
    pub fn exports(&self) -> Vec<String> {
        let info = self.ok("server.info", json!({}));
        info["exports"].as_array().map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_string)).collect()).unwrap_or_default()
    }

    pub fn fsck_clean(&self) {
        let r = self.ok("store.fsck", json!({"verify": true}));
        assert_eq!(r["problem_count"], 0, "fsck: {r}");
    }
}

pub fn certs(dir: &Path, names: &str) -> PathBuf {
    let out = dir.join(format!("certs-{}", names.replace(',', "-")));
    let st = Command::new(workspace().join("scripts/make-certs.sh")).arg(&out).arg(names).stdout(Stdio::null()).status().expect("run make-certs.sh");
    assert!(st.success(), "make-certs.sh {names} failed");
    out
}

pub fn tls_args(certs: &Path, name: &str) -> Vec<String> {
    cert_args("migration", certs, name)
}

/// The TCP control API's mutual TLS for a server holding `certs/NAME.pem`.
pub fn control_tls_args(certs: &Path, name: &str) -> Vec<String> {
    cert_args("control", certs, name)
}

/// `--WHAT-cert certs/NAME.pem --WHAT-key certs/NAME.key --WHAT-ca certs/ca.pem`.
fn cert_args(what: &str, certs: &Path, name: &str) -> Vec<String> {
    vec![
        format!("--{what}-cert"),
        certs.join(format!("{name}.pem")).display().to_string(),
        format!("--{what}-key"),
        certs.join(format!("{name}.key")).display().to_string(),
        format!("--{what}-ca"),
        certs.join("ca.pem").display().to_string(),
    ]
}

/// Makes `cmd` (cas, migrate) present `certs/NAME.pem` to a TCP control API.
pub fn as_client<'a>(cmd: &'a mut Command, certs: &Path, name: &str) -> &'a mut Command {
    cmd.env("NBD_CAS_CONTROL_CERT", certs.join(format!("{name}.pem")))
        .env("NBD_CAS_CONTROL_KEY", certs.join(format!("{name}.key")))
        .env("NBD_CAS_CONTROL_CA", certs.join("ca.pem"))
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(out.status.success(), "{:?} failed:\n{}\n{}", cmd, String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// Writes an image into a new export of a running server with qemu-img.
pub fn load(server: &Server, name: &str, file: &Path) {
    let size = std::fs::metadata(file).unwrap_or_else(|e| panic!("{}: {e}", file.display())).len();
    server.ok("disk.create", json!({"name": name, "size": size}));
    run(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw"]).arg(file).arg(server.uri(name)));
}

/// Starts `migrate` under a bandwidth cap in the background; returns it and the migration id
/// once the source lists the migration.
pub fn start_capped(src: &Server, dst: &Server, disk: &str, rate: &str) -> (Child, String) {
    let child = Command::new(MIGRATE)
        .args(["--source", src.ctl(), "--dest", dst.ctl(), "--disk", disk, "--bandwidth", rate, "--json", "--timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start migrate");
    let started = Instant::now();
    loop {
        if let Some(m) = src.ok("migration.list", json!({})).as_array().expect("a list").first() {
            return (child, m["id"].as_str().expect("an id").to_string());
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the migration did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

/// Polls a server's migrations until `pred` holds for one of them.
pub fn wait_for_migration(server: &Server, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let list = server.ok("migration.list", json!({}));
        if let Some(m) = list.as_array().expect("migration.list returns an array").iter().find(|m| pred(m)) {
            return m.clone();
        }
        assert!(Instant::now() < deadline, "{what}: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A temporary directory for one test. When the test fails it is kept and its path printed:
/// the servers' logs and the guests' consoles in it are what explains a failure.
#[derive(Debug)]
pub struct TestDir(Option<tempfile::TempDir>);

impl TestDir {
    pub fn new() -> TestDir {
        TestDir(Some(tempfile::tempdir().expect("create a temporary directory")))
    }

    pub fn path(&self) -> &Path {
        self.0.as_ref().expect("present until dropped").path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if std::thread::panicking() {
                eprintln!("test files kept in {}", dir.keep().display());
            }
        }
    }
}

/// A command running in the background with its output in files (no pipe to fill); killed
/// when dropped.
#[derive(Debug)]
pub struct Background {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Background {
    pub fn spawn(dir: &Path, name: &str, cmd: &mut Command) -> Background {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("create stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("create stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e}"));
        Background { name: name.to_string(), child, stdout, stderr }
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits at most `timeout` for the exit; panics (killing it) when it runs longer.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("{} still running after {timeout:?}; killed.\nstdout: {}\nstderr: {}", self.name, self.stdout(), self.stderr());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.try_wait().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
