//! Durability under SIGKILL: clients write (some with FUA, the rest covered by FLUSHes),
//! the server is killed with SIGKILL mid-stream, restarted on the same store, and everything
//! that was acknowledged durable must be there. Several rounds, two connections (a FLUSH on
//! one covers writes acknowledged on the other: CAN_MULTI_CONN). Meanwhile a third client
//! overwrites a churn disk over and over, and the server runs compaction every 50 ms on small
//! containers, so the durable blocks are moved between containers while the kills land.

mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{RawClient, Rng, ServerOptions, ServerProcess};
use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::{encode_info_request, encode_option_header};
use nbd_server::proto::transmission::encode_request_header;
use nbd_server::proto::RequestHeader;

const BLOCK: u64 = 4096;
const ROUNDS: u64 = 4;
const WRITERS: u64 = 2;
/// Distinct blocks per writer per round (blocks are never rewritten, so each has exactly
/// one expected content once durable).
const PER_WRITER: u64 = 1500;
const DISK: &str = "disk:64M";
const CHURN: &str = "churn:4M";
/// Small containers, compaction every 50 ms rewriting any container with a dead block.
const COMPACTING: &[&str] = &["--container-size", "256K", "--compact-interval", "0.05", "--compact-below", "1"];

fn pattern(seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; BLOCK as usize];
    Rng::new(seed).fill(&mut data);
    data
}

#[derive(Default)]
struct Ledger {
    /// block -> seed of its content: acknowledged with FUA, or acknowledged before a FLUSH
    /// that completed.
    durable: HashMap<u64, u64>,
    /// Acknowledged, not yet covered by a completed FLUSH.
    acked: Vec<(u64, u64)>,
    /// Wrong answers from the server (not connection loss, which the kill causes).
    failures: Vec<String>,
}

/// A minimal client whose every step can fail (the server dies under it).
struct Conn(TcpStream);

impl Conn {
    fn open(addr: &str) -> io::Result<Conn> {
        Conn::open_export(addr, "disk")
    }

    fn open_export(addr: &str, export: &str) -> io::Result<Conn> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting)?;
        s.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())?;
        let data = encode_info_request(export, &[]);
        s.write_all(&encode_option_header(OPT_GO, data.len() as u32))?;
        s.write_all(&data)?;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let mut payload = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
            s.read_exact(&mut payload)?;
            match kind {
                REP_ACK => return Ok(Conn(s)),
                REP_INFO => {}
                other => return Err(io::Error::other(format!("GO failed: {other:#x}"))),
            }
        }
    }

    /// Sends a request (with payload) and returns the reply's error value.
    fn call(&mut self, command: u16, flags: u16, offset: u64, payload: &[u8]) -> io::Result<u32> {
        let h = RequestHeader { flags, command, handle: offset, offset, length: payload.len() as u32 };
        let mut msg = encode_request_header(&h).to_vec();
        msg.extend_from_slice(payload);
        self.0.write_all(&msg)?;
        let mut r = [0u8; 16];
        self.0.read_exact(&mut r)?;
        if u32::from_be_bytes(r[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC || r[8..16] != offset.to_be_bytes() {
            return Err(io::Error::other("bad reply"));
        }
        Ok(u32::from_be_bytes(r[4..8].try_into().unwrap()))
    }
}

fn writer(addr: String, round: u64, w: u64, ledger: Arc<Mutex<Ledger>>, stop: Arc<AtomicBool>) {
    let Ok(mut conn) = Conn::open(&addr) else { return };
    for i in 0..PER_WRITER {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let block = (round * WRITERS + w) * PER_WRITER + i;
        let seed = block * 1000 + round + 1;
        let fua = i % 3 == 0;
        match conn.call(CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, block * BLOCK, &pattern(seed)) {
            Ok(0) => {}
            Ok(err) => return ledger.lock().unwrap().failures.push(format!("write of block {block}: error {err}")),
            Err(_) => return, // killed
        }
        {
            let mut l = ledger.lock().unwrap();
            if fua {
                l.durable.insert(block, seed);
            } else {
                l.acked.push((block, seed));
            }
        }
        if w == 0 && i % 16 == 15 {
            // Everything acknowledged so far, on either connection, is covered by this flush.
            let covered = ledger.lock().unwrap().acked.clone();
            match conn.call(CMD_FLUSH, 0, 0, &[]) {
                Ok(0) => {
                    let mut l = ledger.lock().unwrap();
                    for &(b, s) in &covered {
                        l.durable.insert(b, s);
                    }
                    l.acked.retain(|x| !covered.contains(x));
                }
                Ok(err) => return ledger.lock().unwrap().failures.push(format!("flush: error {err}")),
                Err(_) => return,
            }
        }
    }
}

/// Overwrites the churn disk's 64 first blocks with fresh content until stopped, so their old
/// contents die and compaction has containers to rewrite. Errors after the kill end it.
fn churn(addr: String, round: u64, stop: Arc<AtomicBool>) {
    let Ok(mut conn) = Conn::open_export(&addr, "churn") else { return };
    let mut seed = 1_000_000_000 + round * 1_000_000;
    while !stop.load(Ordering::SeqCst) {
        for block in 0..64 {
            seed += 1;
            if conn.call(CMD_WRITE, 0, block * BLOCK, &pattern(seed)).is_err() {
                return;
            }
        }
    }
}

fn verify(server: &ServerProcess, ledger: &Ledger) {
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    let mut blocks: Vec<_> = ledger.durable.iter().collect();
    blocks.sort();
    for (&block, &seed) in blocks {
        let data = c.read(block * BLOCK, BLOCK as u32).expect("read");
        assert!(data == pattern(seed), "block {block} lost or corrupted after SIGKILL");
    }
    // A block no round ever wrote is still zero.
    assert_eq!(c.read(16383 * BLOCK, BLOCK as u32).unwrap(), vec![0; BLOCK as usize]);
    c.disconnect();
}

/// The logs of every server run in `dir` (what compaction did when, for a failed check).
fn print_server_logs(dir: &std::path::Path) {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for path in logs {
        eprintln!("==== {}\n{}", path.display(), std::fs::read_to_string(&path).unwrap_or_default());
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut rng = Rng::new(99);

    // Compaction passes that rewrote or deleted containers, over every round.
    let mut passes = 0;
    for round in 0..ROUNDS {
        let mut server =
            ServerProcess::start(ServerOptions { store: &store, disks: &[DISK, CHURN], extra: COMPACTING });
        verify(&server, &ledger.lock().unwrap());
        let durable_before = ledger.lock().unwrap().durable.len();

        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (addr, ledger, stop) = (server.tcp.clone(), ledger.clone(), stop.clone());
                std::thread::spawn(move || writer(addr, round, w, ledger, stop))
            })
            .collect();
        let churn = {
            let (addr, stop) = (server.tcp.clone(), stop.clone());
            std::thread::spawn(move || churn(addr, round, stop))
        };
        std::thread::sleep(Duration::from_millis(250 + rng.below(300)));
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        churn.join().unwrap();
        passes +=
            std::fs::read_to_string(&server.stderr_path).unwrap_or_default().matches("background compaction").count();
        let l = ledger.lock().unwrap();
        assert!(l.failures.is_empty(), "server errors: {:?}", l.failures);
        assert!(l.durable.len() > durable_before + 10, "round {round}: too few durable writes to test anything");
        // Writes acknowledged but never flushed may or may not have survived: forget them.
        drop(l);
        ledger.lock().unwrap().acked.clear();
    }

    let mut server = ServerProcess::start(ServerOptions { store: &store, disks: &[DISK, CHURN], extra: COMPACTING });
    let l = ledger.lock().unwrap();
    verify(&server, &l);
    // Killed once more, with reference changes still only in the journal (a fold needs
    // 128 Ki of them): reopened, every count and location agrees with the maps.
    server.kill9();
    let reopened = cas_store::Store::open(&store, cas_store::StoreOptions::default()).expect("reopening the store");
    let report = reopened.fsck(true).expect("fsck");
    if !report.is_clean() {
        print_server_logs(dir.path());
    }
    assert!(report.is_clean(), "fsck after SIGKILL: {:?}", report.problems);
    assert!(
        passes >= ROUNDS as usize,
        "only {passes} compaction passes moved anything: the kills did not meet compaction"
    );
    eprintln!("{passes} compaction passes rewrote containers during the rounds");
    eprintln!("verified {} durable blocks over {ROUNDS} SIGKILL rounds", l.durable.len());
}
