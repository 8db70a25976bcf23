//! Transmission: a connection's requests served on threads of its own.
//!
//! ```text
//!            +-------------------- read lock ---------------------+
//!   socket --| thread A: header [+ payload] -> release -> device -> write lock: reply
//!            | thread B: (waits for the read lock, then the same)  |
//!            +-----------------------------------------------------+
//! ```
//!
//! This is nbdkit's "parallel" model rather than a reader task handing requests to a pool:
//! the thread that reads a request also runs its device call (RocksDB, `pread`, fsync,
//! post-copy fetches: all blocking, none on a tokio worker) and writes its reply. A request
//! costs no hand-off between threads; at queue depth 1 the only wake-ups are the socket's and
//! the next reader's. Measured on this project's two-core machines, the reader-task design
//! took 10 context switches and ~97 µs of CPU per 4 KiB read; see `bench/RESULTS.md`.
//!
//! * A thread that took a READ while nothing else waits in the read buffer or the socket
//!   keeps the read side while it serves it: at queue depth 1 the next request wakes the same
//!   thread, one wake-up per request. Otherwise (more input waiting, a write, a request that
//!   may wait long, such as a read while a write answered early still runs) it lets the read
//!   side go first.
//! * Threads are started on demand: when a thread lets the read side go and no other thread
//!   waits for it, one more starts, up to `max_in_flight_per_connection`. A thread that waits
//!   for the read lock for [`IDLE_THREAD`] leaves (one always stays). So an idle connection
//!   holds one thread, and the threads match the concurrency the client really uses.
//! * Budgets: a request takes a slot of the server-wide request budget after its header was
//!   read, and READ/WRITE buffer bytes from the connection's and the server's byte budgets
//!   (all [`Budget`]s). When one is spent the reader waits, holding the read lock: the socket
//!   is not read and TCP pushes back on the client.
//! * Small writes waiting back to back in the read buffer are taken together and committed
//!   as one device call when the device groups writes (see [`grouped_writes`]).
//! * Replies are written whole under the write lock, in completion order. A READ reply is
//!   written only after all its data was read, so a simple-reply header is never followed by
//!   an error.
//! * A WRITE without FUA to a device that allows it is answered once admitted, before its
//!   device call ([`WritesBehind`]); every later request touching its range waits for it, and
//!   FLUSH for all of them. `ServerConfig::write_behind` turns it off.
//! * DISC stops reading; the threads still running finish their replies, and the last thread
//!   out closes the socket. If the connection ends any other way (EOF, error, server
//!   shutdown), requests that have not started on the device are dropped, and its writes
//!   still running become the export's *orphaned writes*: a new connection to the export
//!   enters transmission only once they are done, so a client that reconnects never sees a
//!   stale write of its dead connection land after its new ones.
//! * Plain TCP and Unix sockets are taken over from tokio as blocking sockets. A TLS stream
//!   (or any other stream) is bridged to a socket pair by a copy task (see [`bridge`]).
//!
//! Here: the session, its threads and the read side. [`requests`] reads a request (header,
//! admission, payload), [`execute`] runs it on the device and replies, [`grouped_writes`] and
//! [`early_writes`] are the two ways a write is served other than one by one.

use std::io::{self, BufReader};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::warn;

mod calls;
mod early_writes;
mod execute;
mod grouped_writes;
mod requests;

use super::socket::{bridge, BlockingSocket, IntoBlockingSocket};
use super::ConnError;
use crate::budget::{Budget, Grant};
use crate::buffer::PooledBuf;
use crate::export::Export;
use crate::proto::{Rejection, Request, RequestHeader};
use crate::server::Shared;
use crate::transport::Transport;
use calls::DeviceCalls;

/// Socket read buffer: many small requests per read system call.
const READ_BUFFER: usize = 128 * 1024;
/// A thread that waited this long to read leaves (one thread always stays).
const IDLE_THREAD: Duration = Duration::from_secs(10);
/// Stack of a connection thread: device calls go through RocksDB and the migration client,
/// nothing recursive.
const THREAD_STACK: usize = 1 << 20;

/// What a request at an export whose disk moved is told (with `ESHUTDOWN`).
const MOVED: &str = "the disk moved to another server (live migration); reconnect there";

/// Negotiation done: an export and the options that shape replies.
pub(crate) struct Transmission<S> {
    io: Transport<S>,
    export: Arc<Export>,
    structured: bool,
    block_status: bool,
}

impl<S> Transmission<S> {
    pub(super) fn new(io: Transport<S>, export: Arc<Export>, structured: bool, block_status: bool) -> Transmission<S> {
        Transmission { io, export, structured, block_status }
    }
}

impl<S: IntoBlockingSocket> Transmission<S> {
    /// Serves requests until DISC, EOF or an error. Dropping the future cuts the connection
    /// (its threads see the socket shut down and leave).
    pub(super) async fn serve(self, shared: &Arc<Shared>, in_flight: &Arc<AtomicUsize>) -> Result<(), ConnError> {
        let Transmission { io, export, structured, block_status } = self;
        export.stats().connection_opened();
        let _counted = ConnectionCounted(Arc::clone(&export));
        let (socket, copier) = match io {
            Transport::Plain(stream) => match stream.into_blocking() {
                Ok(socket) => (socket?, None),
                Err(stream) => bridged(stream)?,
            },
            tls => bridged(tls)?,
        };
        let (done_tx, done_rx) = oneshot::channel();
        let session = Arc::new(Session {
            reader: Mutex::new(ReadSide {
                rd: BufReader::with_capacity(READ_BUFFER, socket.try_clone()?),
                state: ReadState::Open,
            }),
            writer: Mutex::new(socket.try_clone()?),
            socket,
            bytes: Budget::new(shared.config.max_buffered_bytes_per_connection),
            max_threads: shared.config.max_in_flight_per_connection,
            threads: AtomicUsize::new(0),
            waiting_readers: AtomicUsize::new(0),
            in_flight: Arc::clone(in_flight),
            calls: DeviceCalls::default(),
            behind_failures_seen: AtomicU64::new(export.writes_behind().failures()),
            failure: Mutex::new(None),
            done: Mutex::new(Some(done_tx)),
            span: tracing::Span::current(),
            runtime: tokio::runtime::Handle::current(),
            export,
            shared: Arc::clone(shared),
            structured,
            block_status,
        });
        let cut = CutOnDrop(Arc::clone(&session));
        session.threads.store(1, Ordering::SeqCst);
        if let Err(e) = session.start_thread() {
            session.threads.store(0, Ordering::SeqCst);
            return Err(e.into());
        }
        // Sent by the last thread to leave; a dropped sender means the same.
        let _ = done_rx.await;
        let outcome = session.failure.lock().take().map_or(Ok(()), Err);
        drop(cut);
        drop(session);
        if let Some(mut copier) = copier {
            // The bridge flushes the last replies and closes the stream (TLS close_notify);
            // a client that keeps its end open does not hold the connection.
            let _ = tokio::time::timeout(shared.config.shutdown_grace, &mut copier.0).await;
        }
        outcome
    }
}

fn bridged<T>(stream: T) -> io::Result<(BlockingSocket, Option<AbortOnDrop>)>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (socket, copier) = bridge(stream)?;
    Ok((socket, Some(AbortOnDrop(copier))))
}

/// Keeps an export's active-connection gauge right however the connection ends.
struct ConnectionCounted(Arc<Export>);

impl Drop for ConnectionCounted {
    fn drop(&mut self) {
        self.0.stats().connection_closed();
    }
}

/// Aborts the bridge's copy task when dropped (the connection is being torn down).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Shuts the socket down when `serve` ends or is dropped: blocked threads return and leave.
struct CutOnDrop(Arc<Session>);

impl Drop for CutOnDrop {
    fn drop(&mut self) {
        let _ = self.0.socket.shutdown(Shutdown::Both);
    }
}

/// Where the read side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    Open,
    /// The client sent DISC: replies still go out, nothing more is read.
    Disconnected,
    /// EOF, an error, or the socket was cut.
    Ended,
}

struct ReadSide {
    rd: BufReader<BlockingSocket>,
    state: ReadState,
}

/// One connection in transmission, shared by its threads.
struct Session {
    export: Arc<Export>,
    shared: Arc<Shared>,
    structured: bool,
    block_status: bool,
    /// For shutdown and the payload read timeout (both apply to every handle).
    socket: BlockingSocket,
    reader: Mutex<ReadSide>,
    writer: Mutex<BlockingSocket>,
    /// READ/WRITE buffer bytes of this connection.
    bytes: Arc<Budget>,
    max_threads: usize,
    threads: AtomicUsize,
    /// Threads waiting for the read lock.
    waiting_readers: AtomicUsize,
    /// Requests read whose reply is not written yet (the shutdown drain watches it).
    in_flight: Arc<AtomicUsize>,
    calls: DeviceCalls,
    /// Failed early writes of the export already reported by a FLUSH of this connection.
    behind_failures_seen: AtomicU64,
    /// The first error that ended the connection.
    failure: Mutex<Option<ConnError>>,
    done: Mutex<Option<oneshot::Sender<()>>>,
    span: tracing::Span,
    /// For the rare waits that are async: a write held by a frozen export.
    runtime: tokio::runtime::Handle,
}

/// Capacity held by one request until its reply has been written.
struct Slot {
    _request: Grant,
    _bytes: Option<(Grant, Grant)>,
    in_flight: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Budgets taken for a request before its header is read (see [`grouped_writes`]).
struct Prepaid {
    request: Grant,
    bytes: (Grant, Grant),
}

/// A request read from the socket, to run outside the read lock.
struct Work {
    header: RequestHeader,
    slot: Slot,
    job: Job,
    /// Nothing followed this request in the read buffer or the socket when it was read: the
    /// client may be waiting for its reply before it sends more, so a write is worth
    /// answering early. A client that already pipelines gains nothing from it, and its
    /// writes, left to queue, are committed in groups (see [`grouped_writes`]).
    client_waits: bool,
}

enum Job {
    Refuse(Rejection),
    Read { offset: u64, length: u32 },
    Write { offset: u64, payload: PooledBuf, fua: bool },
    Other(Request),
}

impl Session {
    fn start_thread(self: &Arc<Self>) -> io::Result<()> {
        let session = Arc::clone(self);
        std::thread::Builder::new().name("nbd-conn".into()).stack_size(THREAD_STACK).spawn(move || session.run())?;
        Ok(())
    }

    fn run(self: Arc<Self>) {
        let _span = self.span.clone().entered();
        'reading: loop {
            let Some(mut side) = self.lock_read_side() else {
                return; // retired
            };
            loop {
                let Some(mut work) = self.next(&mut side, None) else {
                    break 'reading;
                };
                if self.nothing_else_to_read(&side, &work) {
                    // Nobody needs the read side before this request is done (the client
                    // waits for its reply, queue depth 1): run it while keeping the read
                    // side, so the next request wakes this thread and no other.
                    self.execute(work);
                } else {
                    let behind = self.buffered_writes(&work, &mut side);
                    work.client_waits =
                        behind.is_empty() && side.rd.buffer().is_empty() && !self.socket.has_pending_input();
                    drop(side);
                    self.more_threads_if_needed();
                    if behind.is_empty() {
                        self.execute(work);
                    } else {
                        self.execute_grouped(work, behind);
                    }
                    continue 'reading;
                }
            }
        }
        self.leave();
    }

    /// No request follows in the read buffer or the socket, and this one is a read that
    /// cannot wait on anything slow (a post-copy fetch, or a write answered early that it
    /// must not overtake: the next request would sit unread behind it). Writes always let
    /// another thread read: if the client vanishes while a write runs, the connection must be
    /// seen gone at once, so that the write counts as orphaned and a reconnecting client
    /// waits for it (see [`DeviceCalls`]).
    fn nothing_else_to_read(&self, side: &ReadSide, work: &Work) -> bool {
        let quick = match &work.job {
            Job::Refuse(_) => true,
            Job::Read { .. } | Job::Other(Request::BlockStatus { .. }) => {
                !self.export.device().may_wait() && self.export.writes_behind().running() == 0
            }
            Job::Write { .. } | Job::Other(_) => false,
        };
        quick && side.rd.buffer().is_empty() && !self.socket.has_pending_input()
    }

    /// Called by a thread on its way out (unless retired).
    fn leave(&self) {
        if self.threads.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last one: every reply was written. Close our side (the bridge, if any,
            // sees EOF and closes the client's stream).
            let _ = self.socket.shutdown(Shutdown::Both);
            if let Some(done) = self.done.lock().take() {
                let _ = done.send(());
            }
        }
    }

    /// Lowers the thread count if this idle thread is not the last one.
    fn retire(&self) -> bool {
        self.threads.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n > 1).then(|| n - 1)).is_ok()
    }

    /// After a request was taken: if nobody waits to read the next one, start a thread.
    fn more_threads_if_needed(self: &Arc<Self>) {
        if self.waiting_readers.load(Ordering::SeqCst) > 0 {
            return;
        }
        let grown =
            self.threads.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < self.max_threads).then_some(n + 1));
        if grown.is_ok() {
            if let Err(e) = self.start_thread() {
                warn!("could not start a connection thread: {e}");
                self.threads.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Waits for the read side. `None`: this thread waited idle for [`IDLE_THREAD`] and
    /// left (the thread count was lowered; one thread always stays).
    fn lock_read_side(&self) -> Option<parking_lot::MutexGuard<'_, ReadSide>> {
        self.waiting_readers.fetch_add(1, Ordering::SeqCst);
        let side = loop {
            if let Some(side) = self.reader.try_lock_for(IDLE_THREAD) {
                break Some(side);
            }
            if self.retire() {
                break None;
            }
        };
        self.waiting_readers.fetch_sub(1, Ordering::SeqCst);
        side
    }

    /// Reads the next request. `None`: reading is over (DISC, EOF, error).
    fn next(&self, side: &mut ReadSide, prepaid: Option<Prepaid>) -> Option<Work> {
        if side.state != ReadState::Open {
            return None;
        }
        match self.read_request(side, prepaid) {
            Ok(work) => work,
            Err(e) => {
                side.state = ReadState::Ended;
                self.calls.abandon(&self.export);
                self.fail(e);
                None
            }
        }
    }

    /// Records why the connection ended (the first reason wins) and cuts the socket.
    fn fail(&self, e: ConnError) {
        let _ = self.socket.shutdown(Shutdown::Both);
        let mut failure = self.failure.lock();
        if failure.is_none() {
            *failure = Some(e);
        }
    }
}
