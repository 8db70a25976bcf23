//! Shared helpers for the integration tests: start the real `nbd-server` binary on a free
//! loopback port and a Unix socket, find the external clients, a small raw NBD client.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::{encode_info_request, encode_option_header};
use nbd_server::proto::transmission::encode_request_header;
use nbd_server::proto::RequestHeader;

pub const BIN: &str = env!("CARGO_BIN_EXE_nbd-server");

// ---- The server process -------------------------------------------------------------------

/// A running `nbd-server`; killed (SIGKILL) when dropped.
pub struct ServerProcess {
    child: Option<Child>,
    /// `127.0.0.1:PORT`
    pub tcp: String,
    pub unix: PathBuf,
    pub stderr_path: PathBuf,
}

/// How to start a server.
pub struct ServerOptions<'a> {
    pub store: &'a Path,
    /// `--disk` arguments (NAME:SIZE).
    pub disks: &'a [&'a str],
    pub extra: &'a [&'a str],
}

impl ServerProcess {
    /// Starts the binary with a TCP listener on a free port and a Unix socket next to the
    /// store, and waits until it prints "ready".
    pub fn start(opts: ServerOptions<'_>) -> ServerProcess {
        let dir = opts.store.parent().expect("store has a parent directory");
        let unix = dir.join(format!("nbd-{}.sock", unique()));
        let stderr_path = dir.join(format!("server-{}.log", unique()));
        let mut cmd = Command::new(BIN);
        cmd.arg("--store").arg(opts.store).args(["--listen", "127.0.0.1:0"]).arg("--unix").arg(&unix);
        for d in opts.disks {
            cmd.args(["--disk", d]);
        }
        cmd.args(opts.extra);
        cmd.env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()));
        cmd.stdout(Stdio::piped()).stderr(std::fs::File::create(&stderr_path).unwrap()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn nbd-server");

        // Read stdout on a thread so a hung server cannot hang the test.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut tcp = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(remaining) {
                Ok(line) if line == "ready" => break,
                Ok(line) => {
                    if let Some(addr) = line.strip_prefix("listening on nbd://") {
                        tcp = Some(addr.to_owned());
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().unwrap();
                    panic!(
                        "nbd-server did not become ready ({status}); stderr:\n{}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        }
        ServerProcess { child: Some(child), tcp: tcp.expect("TCP listener line"), unix, stderr_path }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn port(&self) -> u16 {
        self.tcp.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends a signal (SIGTERM, SIGINT, SIGKILL...).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Resident memory in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// A temp dir with a store path inside, and a server on it with the given disks.
pub fn start_server(disks: &[&str], extra: &[&str]) -> (tempfile::TempDir, ServerProcess) {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let server = ServerProcess::start(ServerOptions { store: &store, disks, extra });
    (dir, server)
}

// ---- External tools -----------------------------------------------------------------------

/// The path of a required external program; panics with an explanation if it is missing
/// (CI installs them: a missing tool must fail the test, not skip it).
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")]) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("required tool `{name}` is not installed (Debian: qemu-utils, libnbd-bin, python3-libnbd, fio, nbdkit)");
}

/// Debian's system Python, which has the libnbd bindings (`nbdsh` is `python3 -m nbd`).
pub fn require_python_libnbd() -> PathBuf {
    let python = PathBuf::from("/usr/bin/python3");
    let ok = python.is_file()
        && Command::new(&python).args(["-c", "import nbd"]).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "/usr/bin/python3 with the libnbd bindings is required (Debian: python3-libnbd)");
    python
}

/// Runs a command, panics with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `cmp a b` must succeed.
pub fn assert_cmp(a: &Path, b: &Path) {
    run_ok(Command::new(require_tool("cmp")).arg(a).arg(b));
}

// ---- Data ---------------------------------------------------------------------------------

/// A small deterministic PRNG (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes a raw image of `size` bytes: random data with zero runs (holes) and some
/// repeated blocks, so the copy exercises WRITE, WRITE_ZEROES and deduplication.
pub fn make_image(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    rng.fill(&mut data);
    let mib = 1 << 20;
    // Zero the second MiB and a few scattered 64 KiB runs.
    if size >= 2 * mib {
        data[mib..2 * mib].fill(0);
    }
    for _ in 0..size / (512 << 10) {
        let start = rng.below((size - 65536) as u64) as usize & !4095;
        data[start..start + 65536].fill(0);
    }
    std::fs::write(path, &data).unwrap();
    data
}

// ---- A raw, synchronous NBD client (for bad input and durability tests) -------------------

pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

pub struct RawClient {
    pub io: Box<dyn Stream>,
}

pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl RawClient {
    pub fn tcp(addr: &str) -> RawClient {
        let s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawClient { io: Box::new(s) }
    }

    pub fn unix(path: &Path) -> RawClient {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        RawClient { io: Box::new(s) }
    }

    /// Reads the greeting, checks it, returns the handshake flags.
    pub fn greeting(&mut self) -> u16 {
        let mut g = [0u8; 18];
        self.io.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
        u16::from_be_bytes([g[16], g[17]])
    }

    /// Greeting plus fixed-newstyle, no-zeroes client flags.
    pub fn handshake(&mut self) {
        self.greeting();
        self.io.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes()).unwrap();
    }

    pub fn option(&mut self, option: u32, data: &[u8]) {
        self.io.write_all(&encode_option_header(option, data.len() as u32)).unwrap();
        self.io.write_all(data).unwrap();
    }

    pub fn reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        assert!(len <= 1 << 20, "absurd option reply length");
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).unwrap();
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    /// Sends an option and returns the type of its final reply.
    pub fn option_final(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data);
        loop {
            let r = self.reply();
            if r.kind == REP_ACK || r.kind & (1 << 31) != 0 {
                return r.kind;
            }
        }
    }

    /// NBD_OPT_GO; returns (size, transmission flags). Simple replies (no structured).
    pub fn go(&mut self, export: &str) -> (u64, u16) {
        self.option(OPT_GO, &encode_info_request(export, &[]));
        let mut result = None;
        loop {
            let r = self.reply();
            match r.kind {
                REP_INFO if r.data[0..2] == [0, 0] => {
                    result = Some((
                        u64::from_be_bytes(r.data[2..10].try_into().unwrap()),
                        u16::from_be_bytes(r.data[10..12].try_into().unwrap()),
                    ))
                }
                REP_INFO => {}
                REP_ACK => return result.expect("NBD_INFO_EXPORT"),
                other => panic!("GO {export:?} failed: reply {other:#x}"),
            }
        }
    }

    /// Handshake and GO in one.
    pub fn connect_tcp(addr: &str, export: &str) -> (RawClient, u64) {
        let mut c = RawClient::tcp(addr);
        c.handshake();
        let (size, _) = c.go(export);
        (c, size)
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        let h = RequestHeader { flags, command, handle, offset, length };
        self.io.write_all(&encode_request_header(&h)).unwrap();
    }

    /// (error, handle) of a simple reply.
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.io.read_exact(&mut r).unwrap();
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC, "not a simple reply");
        (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))
    }

    /// A simple-reply command without payload; returns the error value.
    pub fn command(&mut self, command: u16, flags: u16, offset: u64, length: u32) -> u32 {
        self.request(command, flags, 1, offset, length);
        let (err, handle) = self.simple_reply();
        assert_eq!(handle, 1);
        err
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> u32 {
        self.request(CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, 2, offset, data.len() as u32);
        self.io.write_all(data).unwrap();
        let (err, handle) = self.simple_reply();
        assert_eq!(handle, 2);
        err
    }

    /// Reads with a simple reply; `Err(errno)` on an error reply (which has no data).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(CMD_READ, 0, 3, offset, len);
        let (err, handle) = self.simple_reply();
        assert_eq!(handle, 3);
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).unwrap();
        Ok(data)
    }

    pub fn flush(&mut self) -> u32 {
        self.command(CMD_FLUSH, 0, 0, 0)
    }

    pub fn disconnect(mut self) {
        self.request(CMD_DISC, 0, 0, 0, 0);
        let mut b = [0u8; 1];
        let _ = self.io.read(&mut b);
    }

    /// True if the server closed the connection (EOF or reset); false if it sent data.
    /// Panics if nothing happens within the read timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.io.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("server neither answered nor closed the connection")
            }
            Err(_) => true,
        }
    }
}
