//! One client connection, in three typestates:
//!
//! ```text
//! Greeting --exchange()--> Options --haggle()--> Transmission --serve()--> closed
//!                                 \--(ABORT, bad input, unknown EXPORT_NAME)--> closed
//! ```
//!
//! Transmission runs as three kinds of tasks:
//!
//! ```text
//!   socket read half --> [request reader] --spawn_blocking--> [device call] --+
//!                          | (refusals)                                        |
//!                          +---------------> mpsc of finished replies <--------+
//!                                                   |
//!                                          [reply writer] --> socket write half
//! ```
//!
//! * The reader parses headers, validates them, reads WRITE payloads into pooled buffers and
//!   hands each request to tokio's blocking pool: device calls (RocksDB) never run on a
//!   runtime worker thread, and many run at once.
//! * Before reading a request the reader takes a slot (per-connection and global request
//!   semaphores) and, for READ/WRITE, reserves its bytes (per-connection and global byte
//!   semaphores). Slots are released only once the reply was handed to the socket, so
//!   in-flight work and buffered bytes are bounded; when they are exhausted the reader stops
//!   reading and TCP pushes back on the client.
//! * The writer is the only task that writes to the socket. Replies go out in completion
//!   order, batched into one flush when several are ready. A READ reply is queued only after
//!   all its data was read, so a simple-reply header is never followed by an error.
//! * DISC stops the reader; the writer ends when the last in-flight request has replied
//!   (every request task holds a sender), then shuts the stream down. If the connection ends
//!   any other way (EOF, error, server shutdown), requests that have not started on the device
//!   are dropped, and its writes still running become the export's *orphaned writes*: a new
//!   connection to the export enters transmission only once they are done, so a client that
//!   reconnects never sees a stale write of its dead connection land after its new ones.

use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, trace, warn, Instrument};

use crate::admission::Negotiating;
use crate::buffer::{is_all_zero, PooledBuf};
use crate::export::{BlockDevice, DeviceError, DeviceResult, Export, Op, WriteRefused, FREEZE_HOLD_LIMIT};
use crate::proto::consts::*;
use crate::proto::handshake::{
    encode_export_name_reply, encode_info_block_size, encode_info_export, encode_info_string, encode_option_error,
    encode_option_reply, encode_rep_meta_context, encode_rep_server, match_meta_query, parse_string, MetaQueryMatch,
};
use crate::proto::transmission::{
    allocation_flags, encode_block_status, encode_error_chunk, encode_none_chunk, encode_offset_data_prefix,
    encode_offset_hole, encode_simple_reply, encode_simple_reply_header,
};
use crate::proto::{
    encode_greeting, parse_client_flags, parse_info_request, parse_meta_context_request, parse_option_header,
    parse_request_header, validate_request, BlockSizeConstraints, ClientFlags, DescriptorBuilder, Errno, OptionCode,
    ProtoError, Rejection, Request, RequestHeader, RequestPolicy,
};
use crate::server::Shared;
use crate::transport::Transport;

/// The context id this server gives `base:allocation` in `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;
/// Socket read buffer: many small requests per read system call.
const READ_BUFFER: usize = 128 * 1024;
/// Socket write buffer for small replies; large READ data bypasses it.
const WRITE_BUFFER: usize = 128 * 1024;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtoError),
    /// The server ends the session on purpose (as the spec requires, e.g. after an
    /// `NBD_OPT_EXPORT_NAME` it cannot satisfy).
    #[error("{0}")]
    Refused(String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl ConnError {
    /// Client-side disconnects are routine, not worth a warning.
    fn is_disconnect(&self) -> bool {
        match self {
            ConnError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            _ => false,
        }
    }
}

/// Per-connection limits; the server-wide ones live in [`Shared`].
#[derive(Debug)]
struct ConnLimits {
    requests: Arc<Semaphore>,
    max_requests: usize,
    bytes: Arc<Semaphore>,
}

impl ConnLimits {
    fn new(max_requests: usize, max_bytes: usize) -> ConnLimits {
        ConnLimits {
            requests: Arc::new(Semaphore::new(max_requests)),
            max_requests,
            bytes: Arc::new(Semaphore::new(max_bytes)),
        }
    }

    /// Requests admitted whose reply has not been written yet.
    fn in_flight(&self) -> usize {
        self.max_requests - self.requests.available_permits()
    }
}

/// Serves one accepted connection until it ends. Never panics on client input; errors are
/// logged here.
pub(crate) async fn run_connection<S>(stream: S, shared: Arc<Shared>, negotiating: Negotiating)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = &shared.config;
    let limits = ConnLimits::new(config.max_in_flight_per_connection, config.max_buffered_bytes_per_connection);
    let session = async {
        // The deadline was set at accept, shorter the more connections were negotiating.
        let options = tokio::time::timeout(negotiating.timeout, async {
            Greeting { io: Transport::Plain(stream) }.exchange().await?.haggle(&shared).await
        })
        .await
        .map_err(|_| ConnError::Refused(format!("handshake not finished within {:?}", negotiating.timeout)))??;
        match options {
            Some(transmission) => {
                let _established = shared
                    .admission
                    .establish(negotiating)
                    .map_err(|refusal| ConnError::Refused(refusal.to_string()))?;
                transmission.serve(&shared, &limits).await
            }
            None => Ok(()),
        }
    };
    tokio::select! {
        result = session => match result {
            Ok(()) => debug!("connection closed"),
            Err(e) if e.is_disconnect() => debug!("client disconnected: {e}"),
            Err(e) => info!("connection ended: {e}"),
        },
        () = close_when_drained(&shared, &limits) => info!("server shutdown: connection closed"),
    }
}

/// Resolves once the server is shutting down and this connection has been idle for the
/// grace period (in-flight work done, the client had time to see ESHUTDOWN and send DISC),
/// or the drain timeout passed.
async fn close_when_drained(shared: &Shared, limits: &ConnLimits) {
    shared.shutdown.wait().await;
    let deadline = Instant::now() + shared.config.drain_timeout;
    let idle = || async {
        while limits.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    idle().await;
    tokio::time::sleep_until(deadline.min(Instant::now() + shared.config.shutdown_grace)).await;
    idle().await;
}

// ---- Negotiation --------------------------------------------------------------------------

/// A fresh connection: nothing sent yet.
struct Greeting<S> {
    io: Transport<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Greeting<S> {
    /// Sends the greeting and reads the client flags.
    async fn exchange(mut self) -> Result<Options<S>, ConnError> {
        self.io.write_all(&encode_greeting(SERVER_HANDSHAKE_FLAGS)).await?;
        self.io.flush().await?;
        let mut raw = [0u8; 4];
        self.io.read_exact(&mut raw).await?;
        // Unknown client flags: the spec says the server MUST drop the connection.
        let client = parse_client_flags(raw)?;
        trace!(?client, "client flags");
        Ok(Options { io: self.io, client, structured: false, meta_export: None, out: Vec::with_capacity(256) })
    }
}

/// Option haggling: the state options change.
struct Options<S> {
    io: Transport<S>,
    client: ClientFlags,
    structured: bool,
    /// Canonical name of the export `base:allocation` was selected for.
    meta_export: Option<String>,
    /// Replies being built.
    out: Vec<u8>,
}

/// What one option leads to.
enum Step {
    Continue,
    StartTls,
    Abort,
    /// Enter transmission with this export (the reply was already sent).
    Transmission(Arc<Export>),
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Options<S> {
    /// Answers options until the client picks an export (`Some`) or aborts (`None`).
    async fn haggle(mut self, shared: &Arc<Shared>) -> Result<Option<Transmission<S>>, ConnError> {
        loop {
            let mut raw = [0u8; OPTION_HEADER_LEN];
            self.io.read_exact(&mut raw).await?;
            let header = parse_option_header(&raw)?;
            let code = header.code();
            trace!(option = header.option, length = header.length, "option");

            if header.length > MAX_OPTION_DATA_LEN {
                if code == OptionCode::ExportName {
                    return Err(ConnError::Refused("export name longer than the option limit".into()));
                }
                drain(&mut self.io, header.length).await?;
                self.error(header.option, REP_ERR_TOO_BIG, "option data too long");
                self.send().await?;
                continue;
            }
            let mut data = vec![0u8; header.length as usize];
            self.io.read_exact(&mut data).await?;

            let step = self.handle_option(header.option, code, &data, shared);
            if let Ok(Step::Transmission(export)) = &step {
                // Before the client may send anything: no write of a lost earlier connection
                // may still be running (it could land after the new connection's writes).
                // Bounded well inside the handshake timeout, which also covers this wait.
                if !export.wait_for_orphaned_writes(shared.config.handshake_timeout / 2).await {
                    warn!(export = export.name(), "writes of a lost connection still running; going ahead");
                }
            }
            self.send().await?;
            match step? {
                Step::Continue => {}
                Step::Abort => {
                    debug!("client aborted negotiation");
                    let _ = self.io.shutdown().await;
                    return Ok(None);
                }
                Step::StartTls => {
                    let acceptor = shared.tls.as_ref().expect("STARTTLS is only acknowledged with TLS").acceptor();
                    self.io = self.io.start_tls(&acceptor).await.map_err(ConnError::Tls)?;
                    // The spec: no negotiation state survives STARTTLS.
                    self.structured = false;
                    self.meta_export = None;
                    debug!("TLS established");
                }
                Step::Transmission(export) => {
                    let block_status = self.structured && self.meta_export.as_deref() == Some(export.name());
                    info!(
                        export = export.name(),
                        structured = self.structured,
                        block_status,
                        tls = self.io.is_tls(),
                        "transmission"
                    );
                    return Ok(Some(Transmission { io: self.io, export, structured: self.structured, block_status }));
                }
            }
        }
    }

    async fn send(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.io.write_all(&self.out).await?;
            self.io.flush().await?;
            self.out.clear();
        }
        Ok(())
    }

    fn error(&mut self, option: u32, reply: u32, message: &str) {
        debug!(option, reply = reply & !(1 << 31), "option refused: {message}");
        encode_option_error(&mut self.out, option, reply, message);
    }

    fn ack(&mut self, option: u32) {
        encode_option_reply(&mut self.out, option, REP_ACK, &[]);
    }

    /// Looks up an export that may be offered (exists and is not closed).
    fn find_export(shared: &Shared, name: &str) -> Option<Arc<Export>> {
        shared.registry.get(name).filter(|e| !e.is_closed())
    }

    /// Handles one option, appending its replies to `self.out`.
    fn handle_option(
        &mut self,
        option: u32,
        code: OptionCode,
        data: &[u8],
        shared: &Shared,
    ) -> Result<Step, ConnError> {
        let tls_needed = shared.tls.as_ref().is_some_and(|t| t.required) && !self.io.is_tls();

        if code == OptionCode::Abort {
            self.ack(option);
            return Ok(Step::Abort);
        }
        if shared.shutdown.is_triggered() {
            if code == OptionCode::ExportName {
                return Err(ConnError::Refused("server is shutting down".into()));
            }
            self.error(option, REP_ERR_SHUTDOWN, "server is shutting down");
            return Ok(Step::Continue);
        }
        if tls_needed && code != OptionCode::StartTls {
            if code == OptionCode::ExportName {
                return Err(ConnError::Refused("EXPORT_NAME without TLS on a TLS-only server".into()));
            }
            self.error(option, REP_ERR_TLS_REQD, "this server requires TLS (NBD_OPT_STARTTLS)");
            return Ok(Step::Continue);
        }

        match code {
            OptionCode::ExportName => self.export_name(data, shared),
            OptionCode::List => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    for export in shared.registry.list().iter().filter(|e| !e.is_closed()) {
                        encode_rep_server(&mut self.out, export.name(), export.description());
                    }
                    self.ack(option);
                }
                Ok(Step::Continue)
            }
            OptionCode::StartTls => Ok(self.start_tls(option, data, shared)),
            OptionCode::Info | OptionCode::Go => Ok(self.info_or_go(option, code == OptionCode::Go, data, shared)),
            OptionCode::StructuredReply => {
                if !data.is_empty() {
                    self.error(option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    self.ack(option);
                }
                Ok(Step::Continue)
            }
            OptionCode::ListMetaContext | OptionCode::SetMetaContext => {
                self.meta_context(option, code == OptionCode::ListMetaContext, data, shared);
                Ok(Step::Continue)
            }
            OptionCode::Abort => unreachable!("handled above"),
            OptionCode::Other(n) => {
                self.error(option, REP_ERR_UNSUP, &format!("option {n} is not supported"));
                Ok(Step::Continue)
            }
        }
    }

    fn export_name(&mut self, data: &[u8], shared: &Shared) -> Result<Step, ConnError> {
        // No way to report an error here: the spec says to end the session.
        let name = parse_string(data).map_err(|e| ConnError::Refused(format!("bad export name: {e}")))?;
        let export = Self::find_export(shared, name)
            .ok_or_else(|| ConnError::Refused(format!("client asked for unknown export {name:?}")))?;
        let flags = transmission_flags(&export, self.structured);
        encode_export_name_reply(&mut self.out, export.size(), flags, self.client.no_zeroes);
        Ok(Step::Transmission(export))
    }

    fn start_tls(&mut self, option: u32, data: &[u8], shared: &Shared) -> Step {
        if shared.tls.is_none() {
            self.error(option, REP_ERR_UNSUP, "TLS is not configured on this server");
        } else if !data.is_empty() {
            self.error(option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        } else if self.io.is_tls() {
            self.error(option, REP_ERR_INVALID, "TLS is already active");
        } else if !self.client.fixed_newstyle {
            // The spec: TLS only with fixed newstyle on both sides.
            self.error(option, REP_ERR_POLICY, "TLS needs fixed newstyle negotiation");
        } else {
            self.ack(option);
            return Step::StartTls;
        }
        Step::Continue
    }

    fn info_or_go(&mut self, option: u32, go: bool, data: &[u8], shared: &Shared) -> Step {
        let request = match parse_info_request(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &format!("malformed request: {e}"));
                return Step::Continue;
            }
        };
        let Some(export) = Self::find_export(shared, request.name) else {
            self.error(option, REP_ERR_UNKNOWN, &format!("no export named {:?}", request.name));
            return Step::Continue;
        };
        let device = export.device();
        let flags = transmission_flags(&export, self.structured);
        encode_info_export(&mut self.out, option, device.size(), flags);
        if request.wants(INFO_NAME) {
            encode_info_string(&mut self.out, option, INFO_NAME, export.name());
        }
        if request.wants(INFO_DESCRIPTION) && !export.description().is_empty() {
            encode_info_string(&mut self.out, option, INFO_DESCRIPTION, export.description());
        }
        // Always sent (qemu does the same): clients that did not ask ignore it.
        encode_info_block_size(&mut self.out, option, block_sizes(device.as_ref()));
        self.ack(option);
        if go {
            Step::Transmission(export)
        } else {
            Step::Continue
        }
    }

    fn meta_context(&mut self, option: u32, listing: bool, data: &[u8], shared: &Shared) {
        if !listing {
            // SET replaces the selection even when it fails.
            self.meta_export = None;
        }
        if !self.structured {
            self.error(option, REP_ERR_INVALID, "negotiate structured replies first");
            return;
        }
        let request = match parse_meta_context_request(data) {
            Ok(r) => r,
            Err(e) => {
                self.error(option, REP_ERR_INVALID, &format!("malformed request: {e}"));
                return;
            }
        };
        let Some(export) = Self::find_export(shared, request.export) else {
            self.error(option, REP_ERR_UNKNOWN, &format!("no export named {:?}", request.export));
            return;
        };
        let base_allocation = if listing {
            request.queries.is_empty()
                || request.queries.iter().any(|q| match_meta_query(q, true) == MetaQueryMatch::BaseAllocation)
        } else {
            request.queries.iter().any(|q| match_meta_query(q, false) == MetaQueryMatch::BaseAllocation)
        };
        if base_allocation {
            // LIST replies carry id 0 ("reserved"); SET gives the real id.
            let id = if listing { 0 } else { BASE_ALLOCATION_ID };
            encode_rep_meta_context(&mut self.out, option, id, META_CONTEXT_BASE_ALLOCATION);
            if !listing {
                self.meta_export = Some(export.name().to_owned());
            }
        }
        self.ack(option);
    }
}

/// Transmission flags for an export, as negotiated now.
fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let device = export.device();
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_CACHE;
    if export.is_read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if device.can_multi_conn() {
        flags |= TFLAG_CAN_MULTI_CONN;
    }
    if structured {
        // Every READ reply is a single chunk, so "don't fragment" is always honoured.
        flags |= TFLAG_SEND_DF;
    }
    flags
}

fn block_sizes(device: &dyn BlockDevice) -> BlockSizeConstraints {
    let preferred = device.preferred_block_size().clamp(512, MAX_PAYLOAD_LEN);
    BlockSizeConstraints { minimum: 1, preferred, maximum: MAX_PAYLOAD_LEN }
}

/// Reads and discards `len` bytes (payloads the server refuses), in bounded memory.
async fn drain<R: AsyncRead + Unpin>(reader: &mut R, len: u32) -> io::Result<()> {
    let copied = tokio::io::copy(&mut reader.take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

// ---- Transmission -------------------------------------------------------------------------

/// Negotiation done: an export and the options that shape replies.
struct Transmission<S> {
    io: Transport<S>,
    export: Arc<Export>,
    structured: bool,
    block_status: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Transmission<S> {
    async fn serve(self, shared: &Arc<Shared>, limits: &ConnLimits) -> Result<(), ConnError> {
        let Transmission { io, export, structured, block_status } = self;
        export.stats().connection_opened();
        let _counted = ConnectionCounted(Arc::clone(&export));

        let (rd, wr) = tokio::io::split(io);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut writer = AbortOnDrop(tokio::spawn(write_replies(wr, rx).in_current_span()));
        let mut reader = RequestReader {
            rd: BufReader::with_capacity(READ_BUFFER, rd),
            export,
            structured,
            block_status,
            shared: Arc::clone(shared),
            limits,
            tx,
            calls: Arc::new(DeviceCalls::default()),
            disconnected_cleanly: false,
        };
        let read_result = reader.run().await;
        // Dropping the reader drops its sender: the writer ends after the last reply.
        drop(reader);
        let write_result = match (&mut writer.0).await {
            Ok(r) => r.map_err(ConnError::from),
            Err(e) => Err(ConnError::Io(io::Error::other(format!("reply writer failed: {e}")))),
        };
        read_result.and(write_result)
    }
}

/// Keeps an export's active-connection gauge right however the connection ends.
struct ConnectionCounted(Arc<Export>);

impl Drop for ConnectionCounted {
    fn drop(&mut self) {
        self.0.stats().connection_closed();
    }
}

/// Aborts the task when dropped (the connection is being torn down).
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Capacity held by one request until its reply has been written.
#[derive(Debug)]
struct Slot {
    _request: OwnedSemaphorePermit,
    _global_request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
    _global_bytes: Option<OwnedSemaphorePermit>,
}

/// One reply ready for the socket.
#[derive(Debug)]
enum Frame {
    /// A simple reply without data.
    Simple([u8; SIMPLE_REPLY_HEADER_LEN]),
    /// Small encoded chunks (errors, holes, block status).
    Bytes(Vec<u8>),
    /// Reply header and READ data in one pooled buffer.
    Data(PooledBuf),
}

#[derive(Debug)]
struct Outgoing {
    frame: Frame,
    /// Released when the reply has been written.
    _slot: Slot,
}

/// The error reply for a request, in the form the session uses.
fn error_frame(handle: u64, errno: Errno, message: &str, structured: bool) -> Frame {
    if structured {
        let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 6 + message.len());
        encode_error_chunk(&mut out, handle, errno, message);
        Frame::Bytes(out)
    } else {
        Frame::Simple(encode_simple_reply(handle, errno.code()))
    }
}

struct RequestReader<'a, S> {
    rd: BufReader<ReadHalf<Transport<S>>>,
    export: Arc<Export>,
    structured: bool,
    block_status: bool,
    shared: Arc<Shared>,
    limits: &'a ConnLimits,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Device calls of this connection, for when it ends without DISC.
    calls: Arc<DeviceCalls>,
    disconnected_cleanly: bool,
}

impl<S> Drop for RequestReader<'_, S> {
    fn drop(&mut self) {
        if !self.disconnected_cleanly {
            self.calls.abandon(&self.export);
        }
    }
}

/// The device calls of one connection. When the connection ends without DISC (client
/// vanished, protocol error, server cut it) it is *abandoned*: requests not yet started are
/// dropped (nobody can receive their replies), and its writes still running are counted as
/// the export's orphaned writes, which new connections wait for (see
/// [`Export::wait_for_orphaned_writes`]).
#[derive(Debug, Default)]
struct DeviceCalls {
    state: parking_lot::Mutex<CallsState>,
}

#[derive(Debug, Default)]
struct CallsState {
    running_writes: u64,
    abandoned: bool,
}

impl DeviceCalls {
    /// Before a device call: false if the connection is abandoned (skip the call).
    fn start(&self, write: bool) -> bool {
        let mut state = self.state.lock();
        if state.abandoned {
            return false;
        }
        state.running_writes += u64::from(write);
        true
    }

    /// After a write's device call.
    fn finish_write(&self, export: &Export) {
        let mut state = self.state.lock();
        state.running_writes -= 1;
        if state.abandoned {
            export.orphaned_write_done();
        }
    }

    fn abandon(&self, export: &Export) {
        let mut state = self.state.lock();
        if !state.abandoned {
            state.abandoned = true;
            export.add_orphaned_writes(state.running_writes);
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> RequestReader<'_, S> {
    /// Reads requests until DISC, EOF, a framing error, or the writer failing.
    async fn run(&mut self) -> Result<(), ConnError> {
        let mut raw = [0u8; REQUEST_HEADER_LEN];
        loop {
            tokio::select! {
                biased;
                read = self.rd.read_exact(&mut raw) => match read {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                        debug!("client closed the connection");
                        return Ok(());
                    }
                    Err(e) => return Err(e.into()),
                },
                // The writer is gone (socket broken): nobody would see our replies.
                () = self.tx.closed() => return Ok(()),
            }
            // A bad magic means we lost framing: nothing to do but hang up.
            let header = parse_request_header(&raw)?;
            trace!(
                command = header.command,
                flags = header.flags,
                offset = header.offset,
                length = header.length,
                "request"
            );
            if header.command == CMD_DISC {
                debug!("client sent DISC");
                // The spec: finish every outstanding request, then close.
                self.disconnected_cleanly = true;
                return Ok(());
            }
            let slot = self.acquire_slot().await;
            self.dispatch(header, slot).await?;
        }
    }

    async fn acquire_slot(&self) -> Slot {
        // The semaphores are never closed, so acquiring cannot fail.
        let request = Arc::clone(&self.limits.requests).acquire_owned().await.expect("semaphore never closed");
        let global = Arc::clone(&self.shared.requests).acquire_owned().await.expect("semaphore never closed");
        Slot { _request: request, _global_request: global, _bytes: None, _global_bytes: None }
    }

    /// Reserves buffer bytes for a READ or WRITE (at most 32 MiB plus a header: always fits
    /// in both budgets, which the server config guarantees are larger).
    async fn reserve_bytes(&self, slot: &mut Slot, bytes: usize) {
        let n = u32::try_from(bytes).expect("payload lengths are capped at 32 MiB");
        slot._bytes = Some(Arc::clone(&self.limits.bytes).acquire_many_owned(n).await.expect("never closed"));
        slot._global_bytes = Some(Arc::clone(&self.shared.bytes).acquire_many_owned(n).await.expect("never closed"));
    }

    fn send(&self, frame: Frame, slot: Slot) {
        // Fails only if the writer is gone; the reader notices and stops.
        let _ = self.tx.send(Outgoing { frame, _slot: slot });
    }

    /// Refuses a request without touching the device.
    async fn refuse(&mut self, h: &RequestHeader, slot: Slot, rejection: Rejection) -> Result<(), ConnError> {
        if h.command == CMD_WRITE {
            drain(&mut self.rd, h.length).await?;
        }
        debug!(
            command = crate::proto::transmission::command_name(h.command),
            offset = h.offset,
            length = h.length,
            errno = %rejection.errno,
            "request refused: {}",
            rejection.message
        );
        self.export.stats().record_rejected();
        self.send(error_frame(h.handle, rejection.errno, rejection.message, self.structured), slot);
        Ok(())
    }

    async fn dispatch(&mut self, h: RequestHeader, mut slot: Slot) -> Result<(), ConnError> {
        if self.shared.shutdown.is_triggered() || self.export.is_closed() {
            let message = if self.export.is_closed() { "export was closed" } else { "server is shutting down" };
            return self.refuse(&h, slot, Rejection { errno: Errno::Shutdown, message }).await;
        }
        if self.export.is_moved() && h.command != CMD_FLUSH {
            // The disk lives on another server now. FLUSH still reaches the device below: the
            // source's copy is made durable (the destination may still fetch from it), and the
            // hypervisor completing its own migration needs that flush to succeed.
            return self.refuse(&h, slot, Rejection { errno: Errno::Shutdown, message: MOVED }).await;
        }
        let device = self.export.device();
        let policy = RequestPolicy {
            export_size: device.size(),
            structured: self.structured,
            block_status: self.block_status,
            read_only: self.export.is_read_only(),
            max_payload: MAX_PAYLOAD_LEN,
        };
        let request = match validate_request(&h, &policy) {
            Ok(request) => request,
            Err(rejection) => return self.refuse(&h, slot, rejection).await,
        };
        let handle = h.handle;
        let ok = Frame::Simple(encode_simple_reply(handle, 0));

        match request {
            Request::Read { offset, length } => {
                let structured = self.structured;
                let prefix = if structured { OFFSET_DATA_PREFIX_LEN } else { SIMPLE_REPLY_HEADER_LEN };
                let total = prefix + length as usize;
                self.reserve_bytes(&mut slot, total).await;
                let mut buf = self.shared.buffers.get(total);
                self.spawn(handle, slot, Op::Read, length.into(), move || {
                    device.read(offset, &mut buf[prefix..])?;
                    Ok(read_reply(buf, handle, offset, length, structured))
                });
            }
            Request::Write { offset, length, fua } => {
                self.reserve_bytes(&mut slot, length as usize).await;
                let mut buf = self.shared.buffers.get_unfilled(length as usize);
                // If the client vanishes or stalls mid-payload this fails and the connection
                // ends; nothing of the partial write reaches the device.
                buf.fill_from(&mut self.rd, self.shared.config.payload_stall_timeout).await?;
                // Admit the write only now, so a stalled client cannot hold up `freeze`. A
                // frozen export holds it here (the switch-over takes milliseconds).
                let guard = match self.export.admit_write(FREEZE_HOLD_LIMIT).await {
                    Ok(guard) => guard,
                    Err(refused) => {
                        self.export.stats().record_rejected();
                        let r = rejection(refused);
                        self.send(error_frame(handle, r.errno, r.message, self.structured), slot);
                        return Ok(());
                    }
                };
                self.spawn(handle, slot, Op::Write, length.into(), move || {
                    let result = device.write(offset, &buf, fua);
                    drop(guard);
                    result.map(|()| ok)
                });
            }
            Request::WriteZeroes { offset, length, fua, no_hole, fast_zero } => {
                if fast_zero && !device.supports_fast_zero() {
                    let rejection = Rejection { errno: Errno::NotSup, message: "fast zeroing is not supported" };
                    return self.refuse(&h, slot, rejection).await;
                }
                let guard = match self.export.admit_write(FREEZE_HOLD_LIMIT).await {
                    Ok(guard) => guard,
                    Err(refused) => return self.refuse(&h, slot, rejection(refused)).await,
                };
                self.spawn(handle, slot, Op::WriteZeroes, length.into(), move || {
                    let result = device.write_zeroes(offset, length.into(), fua, no_hole);
                    drop(guard);
                    result.map(|()| ok)
                });
            }
            Request::Trim { offset, length, fua } => {
                let guard = match self.export.admit_write(FREEZE_HOLD_LIMIT).await {
                    Ok(guard) => guard,
                    Err(refused) => return self.refuse(&h, slot, rejection(refused)).await,
                };
                self.spawn(handle, slot, Op::Trim, length.into(), move || {
                    let result = device.trim(offset, length.into(), fua);
                    drop(guard);
                    result.map(|()| ok)
                });
            }
            Request::Flush => self.spawn(handle, slot, Op::Flush, 0, move || device.flush().map(|()| ok)),
            Request::Cache { offset, length } => self.spawn(handle, slot, Op::Cache, length.into(), move || {
                device.cache(offset, length.into()).map(|()| ok)
            }),
            Request::BlockStatus { offset, length, req_one } => {
                self.spawn(handle, slot, Op::BlockStatus, length.into(), move || {
                    block_status_reply(device.as_ref(), handle, offset, length, req_one)
                });
            }
            // Handled before a slot is taken.
            Request::Disconnect => {}
        }
        Ok(())
    }

    /// Runs a device call on the blocking pool and queues its reply.
    fn spawn<F>(&self, handle: u64, slot: Slot, op: Op, bytes: u64, work: F)
    where
        F: FnOnce() -> DeviceResult<Frame> + Send + 'static,
    {
        let tx = self.tx.clone();
        let export = Arc::clone(&self.export);
        let structured = self.structured;
        let calls = Arc::clone(&self.calls);
        let write = matches!(op, Op::Write | Op::WriteZeroes | Op::Trim);
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _enter = span.enter();
            if !calls.start(write) {
                debug!(?op, "connection lost before the request started: dropped");
                return;
            }
            // A panicking device must not leave the client waiting forever for this handle.
            let result = std::panic::catch_unwind(AssertUnwindSafe(work))
                .unwrap_or_else(|_| Err(DeviceError::Io("device panicked".into())));
            if write {
                calls.finish_write(&export);
            }
            export.stats().record(op, bytes, result.is_ok());
            let frame = match result {
                Ok(frame) => frame,
                Err(e) => {
                    let errno = e.errno();
                    if errno == Errno::Io {
                        warn!(export = export.name(), ?op, "device error: {e}");
                    } else {
                        debug!(export = export.name(), ?op, "device error: {e}");
                    }
                    error_frame(handle, errno, &e.to_string(), structured)
                }
            };
            let _ = tx.send(Outgoing { frame, _slot: slot });
        });
    }
}

/// What a request at an export whose disk moved is told (with `ESHUTDOWN`).
const MOVED: &str = "the disk moved to another server (live migration); reconnect there";

fn rejection(refused: WriteRefused) -> Rejection {
    let message = match refused {
        WriteRefused::Moved => MOVED,
        WriteRefused::Closed => "export was closed",
        WriteRefused::HeldTooLong => "the export stayed frozen too long (a stuck migration switch-over)",
    };
    Rejection { errno: refused.errno(), message }
}

/// The reply to a successful READ whose data is in `buf` after the reserved prefix.
fn read_reply(mut buf: PooledBuf, handle: u64, offset: u64, length: u32, structured: bool) -> Frame {
    if !structured {
        encode_simple_reply_header(&mut buf[..SIMPLE_REPLY_HEADER_LEN], handle, 0);
        return Frame::Data(buf);
    }
    if length == 0 {
        let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN);
        encode_none_chunk(&mut out, handle);
        return Frame::Bytes(out);
    }
    if is_all_zero(&buf[OFFSET_DATA_PREFIX_LEN..]) {
        // A hole chunk instead of the zeroes themselves (valid with DF too: one chunk).
        drop(buf);
        let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 12);
        encode_offset_hole(&mut out, handle, offset, length, true);
        return Frame::Bytes(out);
    }
    encode_offset_data_prefix(&mut buf[..OFFSET_DATA_PREFIX_LEN], handle, offset, length, true);
    Frame::Data(buf)
}

/// Queries the device and encodes the `base:allocation` chunk.
fn block_status_reply(
    device: &dyn BlockDevice,
    handle: u64,
    offset: u64,
    length: u32,
    req_one: bool,
) -> DeviceResult<Frame> {
    let extents = device.block_status(offset, length.into())?;
    let max = if req_one { 1 } else { MAX_BLOCK_STATUS_DESCRIPTORS };
    let mut builder = DescriptorBuilder::new(offset, length, max);
    for e in extents {
        if !builder.push(e.offset, e.length, allocation_flags(e.allocated)) {
            break;
        }
    }
    let descriptors = builder.finish();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 4 + 8 * descriptors.len());
    encode_block_status(&mut out, handle, BASE_ALLOCATION_ID, &descriptors, true);
    Ok(Frame::Bytes(out))
}

/// The only task writing to the socket: replies in completion order, batched per flush.
async fn write_replies<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Outgoing>) -> io::Result<()> {
    let mut out = BufWriter::with_capacity(WRITE_BUFFER, wr);
    while let Some(first) = rx.recv().await {
        write_frame(&mut out, &first.frame).await?;
        drop(first);
        // Whatever else is ready goes into the same flush.
        while let Ok(next) = rx.try_recv() {
            write_frame(&mut out, &next.frame).await?;
        }
        out.flush().await?;
    }
    // Every sender is gone: DISC/EOF and all in-flight requests answered.
    out.shutdown().await
}

async fn write_frame<W: AsyncWrite + Unpin>(out: &mut BufWriter<W>, frame: &Frame) -> io::Result<()> {
    match frame {
        Frame::Simple(bytes) => out.write_all(bytes).await,
        Frame::Bytes(bytes) => out.write_all(bytes).await,
        // Large buffers bypass BufWriter's buffer: written straight from the pooled buffer.
        Frame::Data(buf) => out.write_all(buf).await,
    }
}
