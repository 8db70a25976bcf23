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

use std::io::{self, BufRead, BufReader, Read};
use std::net::Shutdown;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, error, trace, warn, Instrument};

mod calls;
mod early_writes;
mod grouped_writes;

use super::reply::{block_status_reply, error_frame, read_reply, Frame};
use super::socket::{bridge, BlockingSocket, IntoBlockingSocket};
use super::ConnError;
use crate::budget::{Budget, Grant};
use crate::buffer::PooledBuf;
use crate::export::{DeviceError, DeviceResult, Export, Op, WriteGuard, WriteRefused, FREEZE_HOLD_LIMIT};
use crate::proto::consts::*;
use crate::proto::{parse_request_header, validate_request, Errno, Rejection, Request, RequestHeader, RequestPolicy};
use crate::server::Shared;
use crate::transport::Transport;
use calls::DeviceCalls;
use early_writes::reach_of;

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

    /// Reads one request (and a WRITE's payload), with the budgets `prepaid` if given, else
    /// taking them (waiting while they are spent). `None`: reading is over.
    fn read_request(&self, side: &mut ReadSide, prepaid: Option<Prepaid>) -> Result<Option<Work>, ConnError> {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        match side.rd.read_exact(&mut raw) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof || self.failure.lock().is_some() => {
                debug!("client closed the connection");
                side.state = ReadState::Ended;
                self.calls.abandon(&self.export);
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
        // A bad magic means we lost framing: nothing to do but hang up.
        let h = parse_request_header(&raw)?;
        trace!(command = h.command, flags = h.flags, offset = h.offset, length = h.length, "request");
        if h.command == CMD_DISC {
            debug!("client sent DISC");
            // The spec: finish every outstanding request, then close.
            side.state = ReadState::Disconnected;
            return Ok(None);
        }
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let (request, bytes) = match prepaid {
            Some(Prepaid { request, bytes }) => (request, Some(bytes)),
            None => (self.shared.requests.take(1), None),
        };
        let mut slot = Slot { _request: request, _bytes: None, in_flight: Arc::clone(&self.in_flight) };
        let job = self.admit(&h, side, &mut slot, bytes)?;
        Ok(Some(Work { header: h, slot, job, client_waits: false }))
    }

    /// Decides whether a request goes to the device, takes the buffer bytes of a READ or
    /// WRITE, and reads a WRITE's payload (a refused WRITE's payload is drained).
    fn admit(
        &self,
        h: &RequestHeader,
        side: &mut ReadSide,
        slot: &mut Slot,
        prepaid_bytes: Option<(Grant, Grant)>,
    ) -> Result<Job, ConnError> {
        let refusal = if self.shared.shutdown.is_triggered() {
            Some(Rejection { errno: Errno::Shutdown, message: "server is shutting down" })
        } else if self.export.is_closed() {
            Some(Rejection { errno: Errno::Shutdown, message: "export was closed" })
        } else if self.export.is_moved() && h.command != CMD_FLUSH {
            // The disk lives on another server now. FLUSH still reaches the device below: the
            // source's copy is made durable (the destination may still fetch from it), and the
            // hypervisor completing its own migration needs that flush to succeed.
            Some(Rejection { errno: Errno::Shutdown, message: MOVED })
        } else {
            None
        };
        let request = match refusal.map_or_else(|| validate_request(h, &self.policy()), Err) {
            Ok(request) => request,
            Err(rejection) => {
                if h.command == CMD_WRITE {
                    self.with_stall_timeout(side, h.length as usize, |rd| drain(rd, h.length))?;
                }
                return Ok(Job::Refuse(rejection));
            }
        };
        Ok(match request {
            Request::Read { offset, length } => {
                let prefix = self.read_reply_prefix();
                slot._bytes = Some(self.take_bytes(prefix + length as usize));
                Job::Read { offset, length }
            }
            Request::Write { offset, length, fua } => {
                slot._bytes = Some(prepaid_bytes.unwrap_or_else(|| self.take_bytes(length as usize)));
                let mut payload = self.shared.buffers.get_unfilled(length as usize);
                // If the client vanishes or stalls mid-payload this fails and the connection
                // ends; nothing of the partial write reaches the device.
                self.with_stall_timeout(side, length as usize, |rd| payload.fill_blocking(rd))?;
                Job::Write { offset, payload, fua }
            }
            Request::WriteZeroes { fast_zero: true, .. } if !self.export.device().supports_fast_zero() => {
                Job::Refuse(Rejection { errno: Errno::NotSup, message: "fast zeroing is not supported" })
            }
            other => Job::Other(other),
        })
    }

    /// Bytes in front of READ data in its reply buffer (the reply header, written last).
    fn read_reply_prefix(&self) -> usize {
        if self.structured {
            OFFSET_DATA_PREFIX_LEN
        } else {
            SIMPLE_REPLY_HEADER_LEN
        }
    }

    fn policy(&self) -> RequestPolicy {
        RequestPolicy {
            export_size: self.export.size(),
            structured: self.structured,
            block_status: self.block_status,
            read_only: self.export.is_read_only(),
            max_payload: MAX_PAYLOAD_LEN,
        }
    }

    /// Buffer bytes from the connection's budget, then the server's.
    fn take_bytes(&self, n: usize) -> (Grant, Grant) {
        (self.bytes.take(n), self.shared.bytes.take(n))
    }

    /// Runs a payload read with the stall timeout on the socket, unless the read buffer
    /// already holds all of it (no system calls then).
    fn with_stall_timeout<T>(
        &self,
        side: &mut ReadSide,
        len: usize,
        read: impl FnOnce(&mut BufReader<BlockingSocket>) -> io::Result<T>,
    ) -> io::Result<T> {
        if side.rd.buffer().len() >= len {
            return read(&mut side.rd);
        }
        self.socket.set_read_timeout(Some(self.shared.config.payload_stall_timeout))?;
        let result = read(&mut side.rd).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                io::Error::new(io::ErrorKind::TimedOut, "client stalled in the middle of a payload")
            }
            _ => e,
        });
        self.socket.set_read_timeout(None)?;
        result
    }

    /// Runs a request on the device and writes its reply.
    fn execute(&self, work: Work) {
        let Work { header: h, slot, job, client_waits } = work;
        let handle = h.handle;
        let (op, bytes, write) = match &job {
            Job::Refuse(rejection) => {
                debug!(
                    command = crate::proto::transmission::command_name(h.command),
                    offset = h.offset,
                    length = h.length,
                    errno = %rejection.errno,
                    "request refused: {}",
                    rejection.message
                );
                self.export.stats().record_rejected();
                self.send(error_frame(handle, rejection.errno, rejection.message, self.structured), slot);
                return;
            }
            Job::Read { length, .. } => (Op::Read, u64::from(*length), false),
            Job::Write { payload, .. } => (Op::Write, payload.len() as u64, true),
            Job::Other(request) => op_of(request),
        };
        // The latency a client sees, less the network: a write held by a freeze counts.
        let started = std::time::Instant::now();
        // A write waits here while the export is frozen (a switch-over takes milliseconds).
        let guard = match write.then(|| self.admit_write()) {
            Some(Err(refused)) => {
                self.export.stats().record_rejected();
                let r = rejection(refused);
                self.send(error_frame(handle, r.errno, r.message, self.structured), slot);
                return;
            }
            Some(Ok(guard)) => Some(guard),
            None => None,
        };
        if !self.calls.start(write) {
            debug!(?op, "connection lost before the request started: dropped");
            return;
        }
        let behind = self.export.writes_behind();
        let early = match &job {
            Job::Write { offset, payload, fua: false } if client_waits && self.answers_writes_early() => {
                // Registered before the reply goes out: whatever the client sends after it
                // finds this write and waits for it.
                let early = behind.begin(*offset, payload.len() as u64);
                if let Err(e) = Frame::ok(handle).write_to(&mut *self.writer.lock()) {
                    self.fail(e.into());
                }
                early.wait_for_earlier();
                Some(early)
            }
            job => {
                if let Some(reach) = reach_of(job) {
                    behind.settle(reach);
                }
                None
            }
        };
        // A panicking device must not leave the client waiting forever for this handle.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.device_call(handle, job)))
            .unwrap_or_else(|_| Err(DeviceError::Io("device panicked".into())));
        let answered = early.is_some();
        if let (Some(mut early), Err(e)) = (early, &result) {
            error!(
                export = self.export.name(),
                offset = h.offset,
                length = h.length,
                "a write answered before it reached the device failed; the next FLUSH of each connection reports it: {e}"
            );
            early.failed();
        }
        drop(guard);
        if write {
            self.calls.finish_write(&self.export);
        }
        self.export.stats().record(op, bytes, result.is_ok());
        self.export.stats().record_latency(op, started.elapsed());
        if answered {
            // Budgets and the in-flight count were held until the device call returned.
            drop(slot);
            return;
        }
        let frame = result.unwrap_or_else(|e| self.device_error_frame(handle, op, &e));
        self.send(frame, slot);
    }

    /// The reply to a request the device failed, logged by how bad it is.
    fn device_error_frame(&self, handle: u64, op: Op, e: &DeviceError) -> Frame {
        let errno = e.errno();
        if errno == Errno::Io {
            warn!(export = self.export.name(), ?op, "device error: {e}");
        } else {
            debug!(export = self.export.name(), ?op, "device error: {e}");
        }
        error_frame(handle, errno, &e.to_string(), self.structured)
    }

    fn device_call(&self, handle: u64, job: Job) -> DeviceResult<Frame> {
        let device = self.export.device();
        let ok = Frame::ok(handle);
        match job {
            Job::Read { offset, length } => {
                let prefix = self.read_reply_prefix();
                let mut buf = self.shared.buffers.get(prefix + length as usize);
                device.read(offset, &mut buf[prefix..])?;
                Ok(read_reply(buf, handle, offset, length, self.structured))
            }
            Job::Write { offset, payload, fua } => device.write(offset, &payload, fua).map(|()| ok),
            Job::Other(Request::WriteZeroes { offset, length, fua, no_hole, .. }) => {
                device.write_zeroes(offset, length.into(), fua, no_hole).map(|()| ok)
            }
            Job::Other(Request::Trim { offset, length, fua }) => device.trim(offset, length.into(), fua).map(|()| ok),
            Job::Other(Request::Flush) => {
                device.flush()?;
                self.report_early_write_failures().map(|()| ok)
            }
            Job::Other(Request::Cache { offset, length }) => device.cache(offset, length.into()).map(|()| ok),
            Job::Other(Request::BlockStatus { offset, length, req_one }) => {
                block_status_reply(device.as_ref(), handle, offset, length, req_one)
            }
            Job::Other(request) => unreachable!("{request:?} never reaches the device"),
            Job::Refuse(_) => unreachable!("refusals never reach the device"),
        }
    }

    /// Admits a write: at once unless the export is frozen, else waits on the runtime.
    fn admit_write(&self) -> Result<WriteGuard, WriteRefused> {
        if let Some(guard) = self.export.try_admit_write() {
            return Ok(guard);
        }
        let export = Arc::clone(&self.export);
        self.runtime.block_on(async move { export.admit_write(FREEZE_HOLD_LIMIT).await }.in_current_span())
    }

    /// Writes a reply; the slot is released once it is on the socket.
    fn send(&self, frame: Frame, slot: Slot) {
        let written = frame.write_to(&mut *self.writer.lock());
        drop(frame);
        drop(slot);
        if let Err(e) = written {
            // The client is gone or stuck; the reader sees the cut socket and stops.
            self.fail(e.into());
        }
    }
}

/// The statistics kind of a request, its byte count, and whether it writes.
fn op_of(request: &Request) -> (Op, u64, bool) {
    match *request {
        Request::Read { length, .. } => (Op::Read, length.into(), false),
        Request::Write { length, .. } => (Op::Write, length.into(), true),
        Request::WriteZeroes { length, .. } => (Op::WriteZeroes, length.into(), true),
        Request::Trim { length, .. } => (Op::Trim, length.into(), true),
        Request::Flush => (Op::Flush, 0, false),
        Request::Cache { length, .. } => (Op::Cache, length.into(), false),
        Request::BlockStatus { length, .. } => (Op::BlockStatus, length.into(), false),
        Request::Disconnect => unreachable!("DISC ends reading before a request is made of it"),
    }
}

fn rejection(refused: WriteRefused) -> Rejection {
    let message = match refused {
        WriteRefused::Moved => MOVED,
        WriteRefused::Closed => "export was closed",
        WriteRefused::HeldTooLong => "the export stayed frozen too long (a stuck migration switch-over)",
    };
    Rejection { errno: refused.errno(), message }
}

/// Reads and discards `len` bytes (payloads the server refuses), in bounded memory.
fn drain<R: BufRead>(reader: &mut R, len: u32) -> io::Result<()> {
    let copied = io::copy(&mut reader.take(u64::from(len)), &mut io::sink())?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
