//! TCP settings of migration links, on both ends.
//!
//! A migration shares its WAN link with the other members of its gang, with its own
//! on-demand (post-copy) fetches and with SWITCH, the one message the paused VM waits for.
//! Loss-based congestion control (the kernel's default, cubic) fills the bottleneck's buffer
//! until it drops packets, and every urgent message then waits behind that queue: a gang
//! member's switch-over took 80 ms instead of 3 ms behind a router buffer of 400 ms. BBR paces
//! at the bottleneck rate it measures and keeps that queue near empty at the same throughput.
//! `TCP_NOTSENT_LOWAT` bounds what waits unsent in the kernel's socket buffer (which grows to
//! megabytes on its own), so urgent frames that the sender queues ahead of background data
//! are not stuck behind background data the kernel already holds.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use migration::link::LinkQueue;
use migration::ratelimit::SharedLink;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Unsent bytes the kernel keeps per link socket: 20 ms at 100 Mbit/s, 2 ms at 1 Gbit/s,
/// enough for the writer to refill it before the link runs dry.
pub const NOTSENT_LOWAT: u32 = 256 << 10;

/// The congestion control every link socket asks for, unless told otherwise.
pub const DEFAULT_CONGESTION: &str = "bbr";

/// How this server sets up each migration link's TCP socket (`--migration-congestion`).
#[derive(Debug, Clone)]
pub struct LinkSocket {
    /// None keeps the kernel's default (`system`).
    congestion: Option<String>,
    /// A missing algorithm is logged once, not on every connection.
    warned: Arc<AtomicBool>,
}

impl Default for LinkSocket {
    fn default() -> Self {
        LinkSocket::new(DEFAULT_CONGESTION)
    }
}

impl LinkSocket {
    /// `system` keeps the kernel's default congestion control; any other name
    /// (`/proc/sys/net/ipv4/tcp_available_congestion_control`) is asked for on each socket.
    pub fn new(congestion: &str) -> LinkSocket {
        let congestion = (congestion != "system").then(|| congestion.to_string());
        LinkSocket { congestion, warned: Arc::default() }
    }

    /// The algorithm asked for (None: the kernel's default).
    pub fn congestion(&self) -> Option<&str> {
        self.congestion.as_deref()
    }

    /// Applies the settings to a link socket, before TLS. A setting the kernel refuses is
    /// logged (once) and the link goes on without it: it changes latency, not correctness.
    pub fn apply(&self, stream: &TcpStream) {
        let _ = stream.set_nodelay(true);
        let socket = SockRef::from(stream);
        if let Err(e) = socket.set_tcp_notsent_lowat(NOTSENT_LOWAT) {
            self.warn_once(format_args!("TCP_NOTSENT_LOWAT: {e}"));
        }
        if let Some(name) = &self.congestion {
            if let Err(e) = socket.set_tcp_congestion(name.as_bytes()) {
                self.warn_once(format_args!(
                    "congestion control {name:?} is not available ({e}); links use the kernel's default"
                ));
            }
        }
    }

    fn warn_once(&self, what: std::fmt::Arguments<'_>) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("migration link socket: {what}");
        }
    }
}

/// An outgoing link's TCP stream whose send queue its gang can read (the kernel's `SIOCOUTQ`:
/// bytes written and not yet acknowledged), so that a switch-over this server decides starts
/// with the network's queues empty (`SharedLink::drain`).
#[derive(Debug)]
pub struct WatchedTcp {
    queue: Arc<SocketQueue>,
    stream: TcpStream,
}

/// The descriptor of a live [`WatchedTcp`]; None once the stream is dropped, so a reading
/// never reaches a descriptor number the process has reused.
#[derive(Debug)]
struct SocketQueue(parking_lot::Mutex<Option<RawFd>>);

impl LinkQueue for SocketQueue {
    fn unacknowledged_bytes(&self) -> Option<u64> {
        let fd = self.0.lock();
        let fd = (*fd)?;
        let mut bytes: libc::c_int = 0;
        // SAFETY: `fd` is the open socket of a live `WatchedTcp` (its drop clears it under this
        // lock before the socket closes); SIOCOUTQ (= TIOCOUTQ) writes one int.
        let r = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut bytes) };
        (r == 0 && bytes >= 0).then_some(bytes as u64)
    }
}

impl WatchedTcp {
    /// Wraps `stream` and registers its send queue with `shared` (the gang's link).
    pub fn new(stream: TcpStream, shared: &SharedLink) -> WatchedTcp {
        let queue = Arc::new(SocketQueue(parking_lot::Mutex::new(Some(stream.as_raw_fd()))));
        let weak: std::sync::Weak<dyn LinkQueue> = Arc::downgrade(&queue) as std::sync::Weak<dyn LinkQueue>;
        shared.watch_queue(weak);
        WatchedTcp { queue, stream }
    }
}

impl Drop for WatchedTcp {
    fn drop(&mut self) {
        // Before the field `stream` closes the descriptor.
        *self.queue.0.lock() = None;
    }
}

impl AsyncRead for WatchedTcp {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WatchedTcp {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    #[tokio::test]
    async fn a_watched_stream_reports_what_its_peer_has_not_acknowledged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shared = SharedLink::default();
        let (client, mut server) = pair().await;
        let mut client = WatchedTcp::new(client, &shared);
        assert_eq!(shared.unacknowledged_bytes(), Some(0));

        // The peer does not read: once its receive buffer is full, what is written waits
        // unacknowledged in the sender's queue.
        let chunk = vec![7u8; 1 << 20];
        let mut written = 0usize;
        while let Ok(Ok(n)) = tokio::time::timeout(std::time::Duration::from_millis(200), client.write(&chunk)).await {
            written += n;
        }
        let queued = shared.unacknowledged_bytes().unwrap();
        assert!(queued > 0 && queued <= written as u64, "queued {queued} of {written} written");

        // Once the peer has read everything, the queue drains.
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; written];
            server.read_exact(&mut buf).await.unwrap();
            assert!(buf.iter().all(|&b| b == 7));
            server
        });
        let drained = shared.drain(std::time::Duration::from_secs(10)).await;
        assert_eq!(drained.left, Some(0), "{drained:?}");
        let _server = reader.await.unwrap();

        drop(client);
        assert_eq!(shared.unacknowledged_bytes(), None, "a closed stream is no longer read");
    }

    /// The socket's algorithm (the kernel pads the name with NULs).
    fn congestion(stream: &TcpStream) -> String {
        let name = SockRef::from(stream).tcp_congestion().unwrap();
        String::from_utf8_lossy(&name).trim_end_matches('\0').to_string()
    }

    #[tokio::test]
    async fn link_sockets_get_the_congestion_control_and_unsent_bound_asked_for() {
        let (client, _server) = pair().await;
        let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control").unwrap();
        let wanted = if available.split_whitespace().any(|a| a == "bbr") { "bbr" } else { "reno" };
        LinkSocket::new(wanted).apply(&client);
        let socket = SockRef::from(&client);
        assert_eq!(congestion(&client), wanted);
        assert_eq!(socket.tcp_notsent_lowat().unwrap(), NOTSENT_LOWAT);
        assert!(client.nodelay().unwrap());
    }

    #[tokio::test]
    async fn an_unknown_algorithm_leaves_the_default_and_the_link_usable() {
        let (client, _server) = pair().await;
        let before = congestion(&client);
        let link = LinkSocket::new("no-such-algorithm");
        link.apply(&client);
        assert_eq!(congestion(&client), before);
        assert!(link.warned.load(Ordering::Relaxed));
        LinkSocket::new("system").apply(&client);
        assert_eq!(congestion(&client), before);
    }
}
