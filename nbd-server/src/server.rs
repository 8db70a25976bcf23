//! Listeners, connection accounting and graceful shutdown.
//!
//! [`serve`] (or [`Server::run`]) accepts on every listener and runs each connection as its
//! own task. When the shutdown future resolves (or [`ShutdownHandle::shutdown`] is called):
//! listeners close, connections answer new requests with `ESHUTDOWN` (and new options with
//! `NBD_REP_ERR_SHUTDOWN`), in-flight requests finish and get their replies, each client
//! gets a short grace period to disconnect, and `run` returns once every connection is gone.

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, info_span, warn, Instrument};

use crate::access::AccessRules;
use crate::admission::{Admission, AdmissionLimits};
use crate::budget::Budget;
use crate::buffer::BufferPool;
use crate::conn::{run_connection, NotASocket};
use crate::export::ExportRegistry;
use crate::proto::consts::{MAX_PAYLOAD_LEN, OFFSET_DATA_PREFIX_LEN};
use crate::tls::TlsConfig;

/// Tunables of a server. `Default` gives production values.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `Some`: offer STARTTLS (and, with `required`, insist on it).
    pub tls: Option<TlsConfig>,
    /// Which certified clients may see and open which exports (empty: all of them).
    pub access: Arc<AccessRules>,
    /// Requests one connection serves at once: its threads, each of which reads a request,
    /// runs it and writes its reply (nbdkit's default is 16). A client with more requests in
    /// flight (the kernel client sends up to 128) queues them in the socket.
    pub max_in_flight_per_connection: usize,
    /// Requests in flight across all connections (a thread past it waits before its device
    /// call).
    pub max_in_flight_total: usize,
    /// READ/WRITE buffer bytes one connection may hold (at least 33 MiB is enforced).
    pub max_buffered_bytes_per_connection: usize,
    /// READ/WRITE buffer bytes all connections together may hold.
    pub max_buffered_bytes_total: usize,
    /// Established connections (past negotiation). A client that negotiates while this many
    /// are established is refused; an established one is never dropped for a newcomer.
    pub max_connections: usize,
    /// Connections still negotiating, a budget of their own (see [`crate::admission`]).
    pub max_negotiating: usize,
    /// Connections negotiating from one source address (all Unix-socket clients share one).
    pub max_negotiating_per_peer: usize,
    /// Time a client has to finish negotiation (including the TLS handshake) while few others
    /// negotiate; it shrinks as the negotiating budget fills, down to `min_handshake_timeout`.
    pub handshake_timeout: Duration,
    pub min_handshake_timeout: Duration,
    /// Longest pause allowed while receiving a WRITE payload (a stalled client holds buffer
    /// budget; after this it is disconnected).
    pub payload_stall_timeout: Duration,
    /// On shutdown, how long an idle client gets to disconnect by itself.
    pub shutdown_grace: Duration,
    /// On shutdown, the longest wait for in-flight requests before connections are cut.
    pub drain_timeout: Duration,
    /// Answer a WRITE without FUA once it is admitted, before the device call returns, on
    /// devices that allow it (see [`crate::export::WritesBehind`]); FLUSH and FUA keep their
    /// promises either way.
    pub write_behind: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: None,
            access: Arc::new(AccessRules::default()),
            max_in_flight_per_connection: 16,
            max_in_flight_total: 512,
            max_buffered_bytes_per_connection: 128 << 20,
            max_buffered_bytes_total: 1 << 30,
            max_connections: 1024,
            max_negotiating: 256,
            max_negotiating_per_peer: 64,
            handshake_timeout: Duration::from_secs(30),
            min_handshake_timeout: Duration::from_secs(1),
            payload_stall_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_millis(500),
            drain_timeout: Duration::from_secs(30),
            write_behind: true,
        }
    }
}

impl ServerConfig {
    /// The admission limits of a listener (the NBD one, and the control API's and migration
    /// listener's, which take the same settings).
    pub fn admission_limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_negotiating: self.max_negotiating.max(1),
            max_negotiating_per_peer: self.max_negotiating_per_peer.clamp(1, self.max_negotiating.max(1)),
            max_established: self.max_connections.max(1),
            handshake_timeout: self.handshake_timeout,
            min_handshake_timeout: self.min_handshake_timeout.min(self.handshake_timeout),
        }
    }

    /// Raises limits that would make the largest request impossible to admit.
    fn normalized(mut self) -> ServerConfig {
        let largest_request = MAX_PAYLOAD_LEN as usize + OFFSET_DATA_PREFIX_LEN;
        self.max_in_flight_per_connection = self.max_in_flight_per_connection.max(1);
        self.max_in_flight_total = self.max_in_flight_total.max(self.max_in_flight_per_connection);
        self.max_buffered_bytes_per_connection = self.max_buffered_bytes_per_connection.max(largest_request);
        self.max_buffered_bytes_total = self.max_buffered_bytes_total.max(self.max_buffered_bytes_per_connection);
        self.max_buffered_bytes_per_connection =
            self.max_buffered_bytes_per_connection.min(self.max_buffered_bytes_total);
        self.max_connections = self.max_connections.max(1);
        self.max_negotiating = self.max_negotiating.max(1);
        self.max_negotiating_per_peer = self.max_negotiating_per_peer.clamp(1, self.max_negotiating);
        self.min_handshake_timeout = self.min_handshake_timeout.min(self.handshake_timeout);
        self
    }
}

/// A socket to accept NBD clients on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds a TCP listener (use port 0 for any free port; see [`Listener::describe`]).
    pub async fn bind_tcp(addr: &str) -> io::Result<Listener> {
        Ok(Listener::Tcp(TcpListener::bind(addr).await?))
    }

    /// Binds a Unix socket. A stale socket file left by a dead server is replaced; any other
    /// existing file is an error.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        use std::os::unix::fs::FileTypeExt;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(io::ErrorKind::AddrInUse, format!("{} is in use", path.display())));
            }
            std::fs::remove_file(path)?;
        }
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// An NBD URI prefix for this listener: `nbd://127.0.0.1:10809` or
    /// `nbd+unix:///?socket=/path` (append an export name after the last `/`).
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => format!("nbd://{addr}"),
                Err(_) => "nbd://?".to_owned(),
            },
            Listener::Unix(l) => match l.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_path_buf)) {
                Some(path) => format!("nbd+unix:///?socket={}", path.display()),
                None => "nbd+unix:///?socket=?".to_owned(),
            },
        }
    }

    fn unix_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Unix(l) => l.local_addr().ok()?.as_pathname().map(Path::to_path_buf),
            Listener::Tcp(_) => None,
        }
    }
}

/// Server-wide state shared by every connection.
pub(crate) struct Shared {
    pub(crate) registry: Arc<ExportRegistry>,
    pub(crate) config: ServerConfig,
    pub(crate) tls: Option<TlsConfig>,
    /// Requests in flight, all connections.
    pub(crate) requests: Arc<Budget>,
    /// Buffer bytes in flight, all connections.
    pub(crate) bytes: Arc<Budget>,
    pub(crate) buffers: Arc<BufferPool>,
    pub(crate) shutdown: Arc<ShutdownSignal>,
    pub(crate) admission: Arc<Admission>,
    connections: AtomicUsize,
    connections_gone: Notify,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A latch: once triggered, stays triggered; tasks can wait for it.
#[derive(Debug, Default)]
pub(crate) struct ShutdownSignal {
    triggered: AtomicBool,
    notify: Notify,
}

impl ShutdownSignal {
    pub(crate) fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub(crate) fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::SeqCst)
    }

    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_triggered() {
                return;
            }
            notified.await;
        }
    }
}

/// Starts a graceful shutdown of the server it came from (like the shutdown future).
#[derive(Debug, Clone)]
pub struct ShutdownHandle(Arc<ShutdownSignal>);

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.0.trigger();
    }
}

/// An NBD server over a shared export registry.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
}

/// Counts a live connection; wakes `run` when the last one goes.
struct ConnectionGuard(Arc<Shared>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.connections_gone.notify_waiters();
        }
    }
}

impl Server {
    pub fn new(registry: Arc<ExportRegistry>, config: ServerConfig) -> Server {
        let config = config.normalized();
        let buffers = BufferPool::new(
            config.max_in_flight_total.min(256),
            (config.max_buffered_bytes_total / 4).min(256 << 20),
            4 << 20,
        );
        let shared = Shared {
            registry,
            tls: config.tls.clone(),
            requests: Budget::new(config.max_in_flight_total),
            bytes: Budget::new(config.max_buffered_bytes_total),
            buffers: Arc::new(buffers),
            shutdown: Arc::new(ShutdownSignal::default()),
            admission: Admission::new("nbd", config.admission_limits()),
            connections: AtomicUsize::new(0),
            connections_gone: Notify::new(),
            config,
        };
        Server { shared: Arc::new(shared) }
    }

    /// The registry this server serves from (add/remove/replace exports at any time).
    pub fn registry(&self) -> &Arc<ExportRegistry> {
        &self.shared.registry
    }

    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// A handle that starts a graceful shutdown from anywhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::clone(&self.shared.shutdown))
    }

    /// Connections currently open (negotiating or transmitting).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Serves one already-established stream (any `AsyncRead + AsyncWrite`: an in-memory
    /// duplex in tests, a tunnel) until it ends. Counts towards `connections`. Transmission
    /// reaches it through a socket-pair bridge; the listeners serve sockets directly.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let negotiating = match self.shared.admission.begin(None) {
            Ok(n) => n,
            Err(refusal) => return self.shared.admission.log_refusal(None, refusal),
        };
        let guard = self.count();
        run_connection(NotASocket(stream), Arc::clone(&guard.0), negotiating).await;
        drop(guard);
    }

    /// Counts a connection until the guard drops (shutdown waits for the count to reach 0).
    fn count(&self) -> ConnectionGuard {
        self.shared.connections.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard(Arc::clone(&self.shared))
    }

    /// Accepts on every listener until `shutdown` resolves (or the shutdown handle fires),
    /// then drains and returns once every connection has ended.
    pub async fn run(self, listeners: Vec<Listener>, shutdown: impl Future<Output = ()>) {
        let server = Arc::new(self);
        let mut accepting = JoinSet::new();
        let mut unix_paths = Vec::new();
        for listener in listeners {
            info!("listening on {}", listener.describe());
            unix_paths.extend(listener.unix_path());
            accepting.spawn(Arc::clone(&server).accept_loop(listener));
        }

        let signal = Arc::clone(&server.shared.shutdown);
        tokio::select! {
            () = shutdown => {}
            () = signal.wait() => {}
        }
        info!(connections = server.connections(), "shutting down: no new connections, draining");
        server.shared.shutdown.trigger();
        accepting.shutdown().await;
        for path in unix_paths {
            let _ = std::fs::remove_file(path);
        }

        loop {
            let gone = server.shared.connections_gone.notified();
            tokio::pin!(gone);
            gone.as_mut().enable();
            if server.connections() == 0 {
                break;
            }
            gone.await;
        }
        info!("all connections closed");
    }

    async fn accept_loop(self: Arc<Self>, listener: Listener) {
        let mut next_id: u64 = 0;
        loop {
            let accepted = match &listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                    // Replies are often small and latency matters more than packet count
                    // (the spec asks for TCP_NODELAY).
                    let _ = s.set_nodelay(true);
                    (Accepted::Tcp(s), Some(peer.ip()), peer.to_string())
                }),
                Listener::Unix(l) => l.accept().await.map(|(s, _)| (Accepted::Unix(s), None, "unix".to_owned())),
            };
            let (stream, peer_ip, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            next_id += 1;
            // Nothing is allocated for a refused connection: it is closed here.
            let negotiating = match self.shared.admission.begin(peer_ip) {
                Ok(n) => n,
                Err(refusal) => {
                    self.shared.admission.log_refusal(peer_ip, refusal);
                    continue;
                }
            };
            let guard = self.count();
            let span = info_span!("conn", id = next_id, %peer);
            tokio::spawn(
                async move {
                    tracing::debug!("accepted");
                    match stream {
                        Accepted::Tcp(s) => run_connection(s, Arc::clone(&guard.0), negotiating).await,
                        Accepted::Unix(s) => run_connection(s, Arc::clone(&guard.0), negotiating).await,
                    }
                    drop(guard);
                }
                .instrument(span),
            );
        }
    }
}

enum Accepted {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// Serves `registry` on `listeners` until `shutdown` resolves, then drains (see the module
/// documentation) and returns.
pub async fn serve(
    listeners: Vec<Listener>,
    registry: Arc<ExportRegistry>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    Server::new(registry, config).run(listeners, shutdown).await
}
