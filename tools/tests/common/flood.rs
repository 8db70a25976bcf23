//! A hostile or broken peer: many idle connections and some that trickle one byte a second,
//! all from one loopback address (127.0.0.2, so the legitimate clients on 127.0.0.1 are
//! another peer), each reopened a while after the server closes it. Stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a closed flood connection waits before it connects again: about 1100 new
/// connections a second for 5500 (a tight loop would only measure these two cores).
pub const REOPEN_AFTER: Duration = Duration::from_secs(5);

/// Where the flood comes from.
pub const FLOOD_ADDRESS: &str = "127.0.0.2";

pub struct Flood {
    runtime: Option<tokio::runtime::Runtime>,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
}

impl Flood {
    /// `idle` connections that send nothing and `trickle` that send a byte a second, at
    /// `target`.
    pub fn start(target: SocketAddr, idle: usize, trickle: usize) -> Flood {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("flood runtime");
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(AtomicU64::new(0));
        for i in 0..idle + trickle {
            let (stop, opened) = (stop.clone(), opened.clone());
            let trickling = i >= idle;
            runtime.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                    socket.bind(format!("{FLOOD_ADDRESS}:0").parse().expect("address")).expect("bind 127.0.0.2");
                    if let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(2), socket.connect(target)).await {
                        opened.fetch_add(1, Ordering::Relaxed);
                        let mut buf = [0u8; 64];
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            if trickling && s.write_all(&[0]).await.is_err() {
                                break;
                            }
                            // Idle until the server closes (or a second passes, to trickle).
                            match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
                                Ok(Ok(0)) | Ok(Err(_)) => break,
                                _ => {}
                            }
                        }
                    }
                    // A refused connection comes back after a while, as a scanner or a broken
                    // client retrying would.
                    tokio::time::sleep(REOPEN_AFTER).await;
                }
            });
        }
        Flood { runtime: Some(runtime), stop, opened }
    }

    /// Connections the flood has opened so far (reopened ones counted again).
    pub fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("VmRSS in /proc/PID/status")
}
