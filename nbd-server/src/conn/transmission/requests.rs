//! Reading a request: its header, what it is admitted to (budgets, refusals) and a WRITE's
//! payload, read under the read side's lock.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::{debug, trace};

use super::{Job, Prepaid, ReadSide, ReadState, Session, Slot, Work, MOVED};
use crate::budget::Grant;
use crate::conn::socket::BlockingSocket;
use crate::conn::ConnError;
use crate::proto::consts::*;
use crate::proto::{parse_request_header, validate_request, Errno, Rejection, Request, RequestHeader, RequestPolicy};

impl Session {
    /// Reads one request (and a WRITE's payload), with the budgets `prepaid` if given, else
    /// taking them (waiting while they are spent). `None`: reading is over.
    pub(super) fn read_request(
        &self,
        side: &mut ReadSide,
        prepaid: Option<Prepaid>,
    ) -> Result<Option<Work>, ConnError> {
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
    pub(super) fn admit(
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
    pub(super) fn read_reply_prefix(&self) -> usize {
        if self.structured {
            OFFSET_DATA_PREFIX_LEN
        } else {
            SIMPLE_REPLY_HEADER_LEN
        }
    }

    pub(super) fn policy(&self) -> RequestPolicy {
        RequestPolicy {
            export_size: self.export.size(),
            structured: self.structured,
            block_status: self.block_status,
            read_only: self.export.is_read_only(),
            max_payload: MAX_PAYLOAD_LEN,
        }
    }

    /// Buffer bytes from the connection's budget, then the server's.
    pub(super) fn take_bytes(&self, n: usize) -> (Grant, Grant) {
        (self.bytes.take(n), self.shared.bytes.take(n))
    }

    /// Runs a payload read with the stall timeout on the socket, unless the read buffer
    /// already holds all of it (no system calls then).
    pub(super) fn with_stall_timeout<T>(
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
}

/// Reads and discards `len` bytes (payloads the server refuses), in bounded memory.
fn drain<R: BufRead>(reader: &mut R, len: u32) -> io::Result<()> {
    let copied = io::copy(&mut reader.take(u64::from(len)), &mut io::sink())?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}
