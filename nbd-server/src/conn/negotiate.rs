//! Negotiation, in two typestates: [`Greeting`] (nothing sent yet) and [`Options`] (option
//! haggling), which ends in [`Transmission`] or a closed connection.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, trace, warn};

use super::transmission::Transmission;
use super::{ConnError, BASE_ALLOCATION_ID};
use crate::access::Client;
use crate::export::{BlockDevice, Export};
use crate::proto::consts::*;
use crate::proto::handshake::{
    encode_export_name_reply, encode_info_block_size, encode_info_export, encode_info_string, encode_option_error,
    encode_option_reply, encode_rep_meta_context, encode_rep_server, match_meta_query, parse_string, MetaQueryMatch,
};
use crate::proto::{
    encode_greeting, parse_client_flags, parse_info_request, parse_meta_context_request, parse_option_header,
    BlockSizeConstraints, ClientFlags, OptionCode,
};
use crate::server::Shared;
use crate::transport::Transport;

/// A fresh connection: nothing sent yet.
pub(super) struct Greeting<S> {
    pub(super) io: Transport<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Greeting<S> {
    /// Sends the greeting and reads the client flags.
    pub(super) async fn exchange(mut self) -> Result<Options<S>, ConnError> {
        self.io.write_all(&encode_greeting(SERVER_HANDSHAKE_FLAGS)).await?;
        self.io.flush().await?;
        let mut raw = [0u8; 4];
        self.io.read_exact(&mut raw).await?;
        // Unknown client flags: the spec says the server MUST drop the connection.
        let client = parse_client_flags(raw)?;
        trace!(?client, "client flags");
        Ok(Options {
            io: self.io,
            client,
            who: Client::Anonymous,
            structured: false,
            meta_export: None,
            out: Vec::with_capacity(256),
        })
    }
}

/// Option haggling: the state options change.
pub(super) struct Options<S> {
    io: Transport<S>,
    client: ClientFlags,
    /// Who the client is, for the access rules: anonymous until its certificate is verified.
    who: Client,
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
    pub(super) async fn haggle(mut self, shared: &Arc<Shared>) -> Result<Option<Transmission<S>>, ConnError> {
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
                    self.who = Client::from_chain(self.io.peer_certificates());
                    debug!(client = %self.who.describe(), "TLS established");
                }
                Step::Transmission(export) => {
                    let block_status = self.structured && self.meta_export.as_deref() == Some(export.name());
                    info!(
                        export = export.name(),
                        client = %self.who.describe(),
                        structured = self.structured,
                        block_status,
                        tls = self.io.is_tls(),
                        "transmission"
                    );
                    return Ok(Some(Transmission::new(self.io, export, self.structured, block_status)));
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

    /// Looks up an export that may be offered to this client: it exists, is not closed, and
    /// the access rules allow it (one not allowed is answered as one that does not exist).
    fn find_export(&self, shared: &Shared, name: &str) -> Option<Arc<Export>> {
        shared.registry.get(name).filter(|e| !e.is_closed() && self.may_use(shared, e))
    }

    fn may_use(&self, shared: &Shared, export: &Export) -> bool {
        let allowed = shared.config.access.may_use(&self.who, export.name());
        if !allowed {
            debug!(export = export.name(), client = %self.who.describe(), "export not allowed to this client");
        }
        allowed
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
                    let exports = shared.registry.list();
                    for export in
                        exports.iter().filter(|e| !e.is_closed() && shared.config.access.may_use(&self.who, e.name()))
                    {
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
        let export = self
            .find_export(shared, name)
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
        let Some(export) = self.find_export(shared, request.name) else {
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
        let Some(export) = self.find_export(shared, request.export) else {
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
