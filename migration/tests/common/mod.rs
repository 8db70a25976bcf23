//! Helpers shared by the migration test files.
// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_store::{DiskId, Store};
use migration::{Destination, MigrationReport, MigrationStatus, SourceHooks};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

/// A disk's whole content.
pub fn read_all(store: &Store, name: &str) -> Vec<u8> {
    let d = store.disk(name).unwrap();
    let mut buf = vec![0u8; d.size as usize];
    store.read(d.id, 0, &mut buf).unwrap();
    buf
}

/// Freezing stops the writer, as a frozen NBD export would: no new writes, and the one in
/// flight finishes first (the writer holds the gate shared while it writes).
pub struct WriterFreeze {
    pub frozen: Arc<AtomicBool>,
    pub gate: Arc<parking_lot::RwLock<()>>,
}

impl SourceHooks for WriterFreeze {
    fn freeze<'a>(&'a self, _: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), migration::HookError>> + Send + 'a>> {
        Box::pin(async move {
            let (gate, frozen) = (self.gate.clone(), self.frozen.clone());
            tokio::task::spawn_blocking(move || {
                let _exclusive = gate.write();
                frozen.store(true, Ordering::SeqCst);
            })
            .await
            .map_err(|e| e.into())
        })
    }
    fn thaw(&self, _: &str) {
        self.frozen.store(false, Ordering::SeqCst);
    }
    fn switched(&self, _: &str) {}
}

/// A guest on the source's disk `disk`: `write(store, disk, i)` makes its i-th write, then it
/// pauses, until the export freezes. Returns the hooks that freeze it and the thread, which
/// ends with the number of writes made.
pub fn guest_writer(
    store: Arc<Store>,
    disk: &str,
    pause: Duration,
    write: impl Fn(&Store, DiskId, u64) + Send + 'static,
) -> (WriterFreeze, std::thread::JoinHandle<u64>) {
    let frozen = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(parking_lot::RwLock::new(()));
    let id = store.disk(disk).unwrap().id;
    let (f, g) = (frozen.clone(), gate.clone());
    let thread = std::thread::spawn(move || {
        let mut i = 0u64;
        loop {
            {
                let _shared = g.read();
                if f.load(Ordering::SeqCst) {
                    return i;
                }
                write(&store, id, i);
                i += 1;
            }
            if !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
    });
    (WriterFreeze { frozen, gate }, thread)
}

/// The destination a test's listener hands connections to, with the runtime they run on; a
/// test swaps it to restart the destination (none: connections are dropped).
pub type CurrentDestination = Arc<Mutex<Option<(Arc<Destination>, tokio::runtime::Handle)>>>;

/// A destination server on loopback: each accepted connection goes to whichever destination
/// is current, on that destination's runtime (so a test can end every task of one by
/// shutting its runtime down, as a crash would).
pub async fn serve_destinations(current: CurrentDestination) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((conn, peer)) = listener.accept().await else {
                return;
            };
            let Some((dest, rt)) = current.lock().clone() else {
                continue;
            };
            let conn = conn.into_std().unwrap();
            rt.spawn(async move {
                let conn = TcpStream::from_std(conn).unwrap();
                let status = MigrationStatus::new(MigrationReport::new("?", "?", "destination", &peer.to_string()));
                let _ = dest.serve(conn, status).await;
            });
        }
    });
    addr
}

/// One destination, for good, on the caller's runtime.
pub async fn serve_destination(dest: Arc<Destination>) -> std::net::SocketAddr {
    serve_destinations(Arc::new(Mutex::new(Some((dest, tokio::runtime::Handle::current()))))).await
}

pub const BS: usize = 4096;

pub fn write_disk(store: &Store, name: &str, content: &[u8]) {
    let d = store.create_disk(name, content.len() as u64).unwrap();
    store.write(d.id, 0, content, false).unwrap();
}

/// An older version of a VM's data: text-like blocks, none equal to another.
pub fn older_version(blocks: usize) -> Vec<u8> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..blocks * BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"etaoinshrdlu cmfwypvbgkqjxz.,\n"[(x % 30) as usize]
        })
        .collect()
}

/// The same VM later: every block changed in a few places (rows updated, a log line added).
pub fn later_version(older: &[u8]) -> Vec<u8> {
    let mut out = older.to_vec();
    for (i, block) in out.chunks_mut(BS).enumerate() {
        let at = (i * 389) % (BS - 40);
        block[at..at + 8].copy_from_slice(b"refunded");
        block[BS - 30..BS].copy_from_slice(format!("{i:>10} shipped 2026-12-0{} ", i % 9).as_bytes());
    }
    out
}
