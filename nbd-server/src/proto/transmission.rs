//! Transmission phase frames: request headers, request validation, simple replies and
//! structured reply chunks.
//!
//! Data-carrying replies are built *in place*: the caller reserves
//! [`SIMPLE_REPLY_HEADER_LEN`] or [`OFFSET_DATA_PREFIX_LEN`] bytes in front of the read
//! buffer and fills them with [`encode_simple_reply_header`] / [`encode_offset_data_prefix`]
//! once the data is there, so a reply goes to the socket as one buffer without a copy.

use super::consts::*;
use super::{Errno, ProtoError};

// ---- Requests -----------------------------------------------------------------------------

/// A request header as it came off the wire (magic already checked). `command` and `flags`
/// are raw: [`validate_request`] decides what they mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// Opaque to the server; echoed in every reply to this request.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parses a 28-byte request header. A bad magic means framing is lost: the caller must
/// drop the connection (there is no way to find the next request).
pub fn parse_request_header(raw: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, ProtoError> {
    let magic = u32::from_be_bytes(raw[0..4].try_into().expect("4 bytes"));
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    Ok(RequestHeader {
        flags: u16::from_be_bytes(raw[4..6].try_into().expect("2 bytes")),
        command: u16::from_be_bytes(raw[6..8].try_into().expect("2 bytes")),
        handle: u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes")),
        offset: u64::from_be_bytes(raw[16..24].try_into().expect("8 bytes")),
        length: u32::from_be_bytes(raw[24..28].try_into().expect("4 bytes")),
    })
}

/// Encodes a request header (for tests and clients).
pub fn encode_request_header(h: &RequestHeader) -> [u8; REQUEST_HEADER_LEN] {
    let mut out = [0u8; REQUEST_HEADER_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&h.flags.to_be_bytes());
    out[6..8].copy_from_slice(&h.command.to_be_bytes());
    out[8..16].copy_from_slice(&h.handle.to_be_bytes());
    out[16..24].copy_from_slice(&h.offset.to_be_bytes());
    out[24..28].copy_from_slice(&h.length.to_be_bytes());
    out
}

/// What the negotiated session (and the export's current state) allows. The inputs of
/// [`validate_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestPolicy {
    /// Current size of the export.
    pub export_size: u64,
    /// Structured replies were negotiated (enables `NBD_CMD_FLAG_DF`).
    pub structured: bool,
    /// `base:allocation` was selected for this export (enables `NBD_CMD_BLOCK_STATUS`).
    pub block_status: bool,
    /// The export refuses writes (`EPERM`).
    pub read_only: bool,
    /// Largest READ/WRITE length.
    pub max_payload: u32,
}

/// A request that passed validation: command, flags and range make sense for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read { offset: u64, length: u32 },
    Write { offset: u64, length: u32, fua: bool },
    Disconnect,
    Flush,
    Trim { offset: u64, length: u32, fua: bool },
    Cache { offset: u64, length: u32 },
    WriteZeroes { offset: u64, length: u32, fua: bool, no_hole: bool, fast_zero: bool },
    BlockStatus { offset: u64, length: u32, req_one: bool },
}

/// Why a request is refused, with a message for structured error chunks and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: Errno,
    pub message: &'static str,
}

const fn reject(errno: Errno, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// Checks a request against the session. Order of checks: command, flags, permissions,
/// length limits, range (so a write past the end of a read-only export gets `EPERM`).
///
/// A refused `NBD_CMD_WRITE` still has `length` payload bytes on the wire after the header:
/// the caller must drain them before reading the next request.
pub fn validate_request(h: &RequestHeader, policy: &RequestPolicy) -> Result<Request, Rejection> {
    let fua = h.flags & CMD_FLAG_FUA != 0;
    // FUA is accepted on every command (the spec says so, and clients set it on reads).
    let allowed_flags = CMD_FLAG_FUA
        | match h.command {
            CMD_READ if policy.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => 0,
        };
    let known_command = matches!(
        h.command,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if !known_command {
        return Err(reject(Errno::Inval, "unknown command"));
    }
    if h.flags & !allowed_flags != 0 {
        return Err(reject(Errno::Inval, "command flag not valid for this command"));
    }

    let writes_data = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes_data && policy.read_only {
        return Err(reject(Errno::Perm, "export is read-only"));
    }
    if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > policy.max_payload {
        return Err(reject(Errno::Inval, "request length over the maximum block size"));
    }
    if h.command == CMD_BLOCK_STATUS && !policy.block_status {
        return Err(reject(Errno::Inval, "no metadata context was negotiated"));
    }

    // Range check for commands that address the export.
    let ranged = !matches!(h.command, CMD_DISC | CMD_FLUSH);
    if ranged {
        let end = h.offset.checked_add(u64::from(h.length));
        let in_range = matches!(end, Some(end) if end <= policy.export_size);
        if !in_range {
            let errno = if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) { Errno::NoSpc } else { Errno::Inval };
            return Err(reject(errno, "request goes past the end of the export"));
        }
    }

    let (offset, length) = (h.offset, h.length);
    Ok(match h.command {
        CMD_READ => Request::Read { offset, length },
        CMD_WRITE => Request::Write { offset, length, fua },
        CMD_DISC => Request::Disconnect,
        CMD_FLUSH => Request::Flush,
        CMD_TRIM => Request::Trim { offset, length, fua },
        CMD_CACHE => Request::Cache { offset, length },
        CMD_WRITE_ZEROES => Request::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: h.flags & CMD_FLAG_NO_HOLE != 0,
            fast_zero: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            if length == 0 {
                return Err(reject(Errno::Inval, "block status of an empty range"));
            }
            Request::BlockStatus { offset, length, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 }
        }
        _ => unreachable!("known_command checked above"),
    })
}

/// Short name of a command number, for logs and counters.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disc",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write_zeroes",
        CMD_BLOCK_STATUS => "block_status",
        _ => "unknown",
    }
}

// ---- Simple replies -----------------------------------------------------------------------

/// Fills a 16-byte simple reply header (magic, error, handle) at the start of `out`.
pub fn encode_simple_reply_header(out: &mut [u8], handle: u64, error: u32) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
}

/// A whole simple reply without data.
pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_HEADER_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_LEN];
    encode_simple_reply_header(&mut out, handle, error);
    out
}

// ---- Structured reply chunks --------------------------------------------------------------

/// Fills a 20-byte structured chunk header at the start of `out`.
pub fn encode_chunk_header(out: &mut [u8], flags: u16, chunk_type: u16, handle: u64, length: u32) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Fills the 28 bytes in front of `data_len` bytes of `OFFSET_DATA` payload: chunk header
/// and offset. `data_len` must be at least 1 and at most `u32::MAX - 8`.
pub fn encode_offset_data_prefix(out: &mut [u8], handle: u64, offset: u64, data_len: u32, done: bool) {
    debug_assert!((1..=u32::MAX - 8).contains(&data_len));
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_DATA, handle, data_len + 8);
    out[20..28].copy_from_slice(&offset.to_be_bytes());
}

/// Appends an `OFFSET_HOLE` chunk: `length` bytes at `offset` read as zeroes.
pub fn encode_offset_hole(out: &mut Vec<u8>, handle: u64, offset: u64, length: u32, done: bool) {
    let start = out.len();
    out.resize(start + STRUCTURED_REPLY_HEADER_LEN, 0);
    encode_chunk_header(&mut out[start..], done_flag(done), REPLY_TYPE_OFFSET_HOLE, handle, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends the `NONE` chunk that ends a structured reply.
pub fn encode_none_chunk(out: &mut Vec<u8>, handle: u64) {
    let start = out.len();
    out.resize(start + STRUCTURED_REPLY_HEADER_LEN, 0);
    encode_chunk_header(&mut out[start..], REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0);
}

/// Appends an `ERROR` chunk (always final here) with a human-readable message.
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, errno: Errno, message: &str) {
    let message = super::handshake::truncate_str(message, MAX_STRING_LEN);
    let start = out.len();
    out.resize(start + STRUCTURED_REPLY_HEADER_LEN, 0);
    let length = (6 + message.len()) as u32;
    encode_chunk_header(&mut out[start..], REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, length);
    out.extend_from_slice(&errno.code().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// One extent of a `BLOCK_STATUS` chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatusDescriptor {
    /// Never zero.
    pub length: u32,
    /// `STATE_HOLE` / `STATE_ZERO` for `base:allocation`.
    pub flags: u32,
}

/// Appends a `BLOCK_STATUS` chunk for one metadata context. `descriptors` must not be empty.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    handle: u64,
    context_id: u32,
    descriptors: &[BlockStatusDescriptor],
    done: bool,
) {
    debug_assert!(!descriptors.is_empty());
    let start = out.len();
    out.reserve(STRUCTURED_REPLY_HEADER_LEN + 4 + 8 * descriptors.len());
    out.resize(start + STRUCTURED_REPLY_HEADER_LEN, 0);
    let length = (4 + 8 * descriptors.len()) as u32;
    encode_chunk_header(&mut out[start..], done_flag(done), REPLY_TYPE_BLOCK_STATUS, handle, length);
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
}

/// `base:allocation` flags for an extent: a hole reads as zeroes.
pub fn allocation_flags(allocated: bool) -> u32 {
    if allocated {
        0
    } else {
        STATE_HOLE | STATE_ZERO
    }
}

/// Turns a device's extents into block status descriptors for a request window: clips to
/// the window, merges neighbours with the same flags, fills gaps with status 0 (always
/// safe: "allocated, contents unknown"), and stops at `max_descriptors`.
#[derive(Debug)]
pub struct DescriptorBuilder {
    /// Next offset not yet described.
    next: u64,
    /// End of the window (exclusive).
    end: u64,
    max_descriptors: usize,
    descriptors: Vec<BlockStatusDescriptor>,
}

impl DescriptorBuilder {
    pub fn new(offset: u64, length: u32, max_descriptors: usize) -> DescriptorBuilder {
        DescriptorBuilder {
            next: offset,
            end: offset.saturating_add(u64::from(length)),
            max_descriptors: max_descriptors.max(1),
            descriptors: Vec::new(),
        }
    }

    /// Adds the run `[start, start + length)` with `flags`. Runs must come in increasing
    /// order. Returns false once nothing more can be added (window covered or list full).
    pub fn push(&mut self, start: u64, length: u64, flags: u32) -> bool {
        let run_end = start.saturating_add(length).min(self.end);
        if start > self.next && !self.append(start.min(self.end) - self.next, 0) {
            return false;
        }
        if run_end > self.next {
            let len = run_end - self.next;
            if !self.append(len, flags) {
                return false;
            }
        }
        self.next < self.end
    }

    /// Appends `len` bytes at `self.next`; false if the descriptor list is full.
    fn append(&mut self, len: u64, flags: u32) -> bool {
        if len == 0 {
            return true;
        }
        // The window is at most u32::MAX long, so merged lengths fit in u32.
        let len = u32::try_from(len).expect("window is at most u32::MAX bytes");
        let full = self.descriptors.len() >= self.max_descriptors;
        match self.descriptors.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ if full => return false,
            _ => self.descriptors.push(BlockStatusDescriptor { length: len, flags }),
        }
        self.next += u64::from(len);
        true
    }

    /// The descriptors; at least one (the whole window with status 0 if nothing was pushed).
    pub fn finish(mut self) -> Vec<BlockStatusDescriptor> {
        if self.descriptors.is_empty() {
            let len = self.end - self.next;
            self.append(len, 0);
        }
        self.descriptors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(command: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { flags, command, handle: 0xdead_beef_0000_0001, offset, length }
    }

    fn policy() -> RequestPolicy {
        RequestPolicy {
            export_size: 1 << 20,
            structured: true,
            block_status: true,
            read_only: false,
            max_payload: MAX_PAYLOAD_LEN,
        }
    }

    #[test]
    fn request_header_round_trip() {
        let h = header(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let raw = encode_request_header(&h);
        assert_eq!(&raw[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(parse_request_header(&raw).unwrap(), h);
        let mut bad = raw;
        bad[3] = 0;
        assert!(matches!(parse_request_header(&bad), Err(ProtoError::BadRequestMagic(_))));
    }

    #[test]
    fn validates_commands() {
        let p = policy();
        assert_eq!(validate_request(&header(CMD_READ, 0, 0, 512), &p), Ok(Request::Read { offset: 0, length: 512 }));
        assert_eq!(
            validate_request(&header(CMD_WRITE, CMD_FLAG_FUA, 512, 512), &p),
            Ok(Request::Write { offset: 512, length: 512, fua: true })
        );
        assert_eq!(validate_request(&header(CMD_DISC, 0, 0, 0), &p), Ok(Request::Disconnect));
        assert_eq!(validate_request(&header(CMD_FLUSH, 0, 0, 0), &p), Ok(Request::Flush));
        // FUA is accepted anywhere.
        assert_eq!(validate_request(&header(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &p), Ok(Request::Flush));
        assert_eq!(
            validate_request(&header(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 4096), &p),
            Ok(Request::WriteZeroes { offset: 0, length: 4096, fua: false, no_hole: true, fast_zero: true })
        );
        assert_eq!(
            validate_request(&header(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 4096), &p),
            Ok(Request::BlockStatus { offset: 0, length: 4096, req_one: true })
        );
        assert_eq!(
            validate_request(&header(CMD_TRIM, 0, 0, 1 << 20), &p),
            Ok(Request::Trim { offset: 0, length: 1 << 20, fua: false })
        );
        assert_eq!(
            validate_request(&header(CMD_CACHE, 0, 0, 4096), &p),
            Ok(Request::Cache { offset: 0, length: 4096 })
        );
        assert_eq!(
            validate_request(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &p),
            Ok(Request::Read { offset: 0, length: 1 })
        );
    }

    #[test]
    fn rejects_unknown_commands_and_flags() {
        let p = policy();
        assert_eq!(validate_request(&header(8, 0, 0, 0), &p).unwrap_err().errno, Errno::Inval);
        assert_eq!(validate_request(&header(0xffff, 0, 0, 0), &p).unwrap_err().errno, Errno::Inval);
        assert_eq!(validate_request(&header(CMD_READ, 1 << 9, 0, 1), &p).unwrap_err().errno, Errno::Inval);
        assert_eq!(validate_request(&header(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &p).unwrap_err().errno, Errno::Inval);
        assert_eq!(validate_request(&header(CMD_TRIM, CMD_FLAG_REQ_ONE, 0, 1), &p).unwrap_err().errno, Errno::Inval);
        // DF only with structured replies.
        let simple = RequestPolicy { structured: false, ..p };
        assert_eq!(validate_request(&header(CMD_READ, CMD_FLAG_DF, 0, 1), &simple).unwrap_err().errno, Errno::Inval);
        // Block status only with a context.
        let no_meta = RequestPolicy { block_status: false, ..p };
        assert_eq!(validate_request(&header(CMD_BLOCK_STATUS, 0, 0, 1), &no_meta).unwrap_err().errno, Errno::Inval);
        assert_eq!(validate_request(&header(CMD_BLOCK_STATUS, 0, 0, 0), &p).unwrap_err().errno, Errno::Inval);
    }

    #[test]
    fn range_errors_depend_on_the_command() {
        let p = policy();
        let size = p.export_size;
        for (cmd, errno) in [
            (CMD_READ, Errno::Inval),
            (CMD_WRITE, Errno::NoSpc),
            (CMD_WRITE_ZEROES, Errno::NoSpc),
            (CMD_TRIM, Errno::Inval),
            (CMD_CACHE, Errno::Inval),
            (CMD_BLOCK_STATUS, Errno::Inval),
        ] {
            assert_eq!(validate_request(&header(cmd, 0, size - 511, 512), &p).unwrap_err().errno, errno);
            assert_eq!(validate_request(&header(cmd, 0, u64::MAX, 1), &p).unwrap_err().errno, errno);
            assert!(validate_request(&header(cmd, 0, size - 512, 512), &p).is_ok(), "{cmd}");
        }
        // Zero-length at the very end is in range.
        assert!(validate_request(&header(CMD_READ, 0, size, 0), &p).is_ok());
    }

    #[test]
    fn limits_and_permissions() {
        let p = RequestPolicy { export_size: u64::MAX, ..policy() };
        assert_eq!(validate_request(&header(CMD_READ, 0, 0, MAX_PAYLOAD_LEN + 1), &p).unwrap_err().errno, Errno::Inval);
        assert!(validate_request(&header(CMD_READ, 0, 0, MAX_PAYLOAD_LEN), &p).is_ok());
        // TRIM and WRITE_ZEROES have no payload and may be far larger.
        assert!(validate_request(&header(CMD_TRIM, 0, 0, u32::MAX), &p).is_ok());
        assert!(validate_request(&header(CMD_WRITE_ZEROES, 0, 0, u32::MAX), &p).is_ok());

        let ro = RequestPolicy { read_only: true, ..policy() };
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(validate_request(&header(cmd, 0, 0, 1), &ro).unwrap_err().errno, Errno::Perm);
            // EPERM wins over the range check.
            assert_eq!(validate_request(&header(cmd, 0, u64::MAX, 1), &ro).unwrap_err().errno, Errno::Perm);
        }
        assert!(validate_request(&header(CMD_READ, 0, 0, 1), &ro).is_ok());
        assert!(validate_request(&header(CMD_FLUSH, 0, 0, 0), &ro).is_ok());
    }

    #[test]
    fn simple_reply_layout() {
        let r = encode_simple_reply(0x0102_0304_0506_0708, 22);
        assert_eq!(&r[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &22u32.to_be_bytes());
        assert_eq!(&r[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn structured_chunk_layouts() {
        let mut buf = vec![0u8; OFFSET_DATA_PREFIX_LEN + 3];
        encode_offset_data_prefix(&mut buf, 9, 4096, 3, true);
        assert_eq!(&buf[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&buf[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&buf[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&buf[8..16], &9u64.to_be_bytes());
        assert_eq!(&buf[16..20], &11u32.to_be_bytes());
        assert_eq!(&buf[20..28], &4096u64.to_be_bytes());

        let mut out = Vec::new();
        encode_offset_hole(&mut out, 9, 512, 1024, true);
        assert_eq!(out.len(), 32);
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..28], &512u64.to_be_bytes());
        assert_eq!(&out[28..32], &1024u32.to_be_bytes());

        let mut out = Vec::new();
        encode_none_chunk(&mut out, 5);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_NONE.to_be_bytes());

        let mut out = Vec::new();
        encode_error_chunk(&mut out, 5, Errno::Inval, "bad");
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[16..20], &9u32.to_be_bytes());
        assert_eq!(&out[20..24], &22u32.to_be_bytes());
        assert_eq!(&out[24..26], &3u16.to_be_bytes());
        assert_eq!(&out[26..], b"bad");

        let mut out = Vec::new();
        let d = [
            BlockStatusDescriptor { length: 4096, flags: 0 },
            BlockStatusDescriptor { length: 8192, flags: STATE_HOLE | STATE_ZERO },
        ];
        encode_block_status(&mut out, 5, 1, &d, true);
        assert_eq!(&out[6..8], &REPLY_TYPE_BLOCK_STATUS.to_be_bytes());
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..28], &4096u32.to_be_bytes());
        assert_eq!(&out[28..32], &0u32.to_be_bytes());
        assert_eq!(&out[32..36], &8192u32.to_be_bytes());
        assert_eq!(&out[36..40], &3u32.to_be_bytes());
    }

    #[test]
    fn descriptor_builder_merges_clips_and_fills() {
        let hole = allocation_flags(false);
        let data = allocation_flags(true);
        // Window [1000, 1000 + 10000).
        let mut b = DescriptorBuilder::new(1000, 10_000, 100);
        assert!(b.push(0, 4096, data)); // starts before the window: clipped
        assert!(b.push(4096, 4096, data)); // merged
                                           // Gap [8192, 9000) is filled with status 0 (same as data: merged).
        assert!(!b.push(9000, 100_000, hole)); // runs past the end: clipped, window done
        let d = b.finish();
        assert_eq!(
            d,
            vec![BlockStatusDescriptor { length: 8000, flags: 0 }, BlockStatusDescriptor { length: 2000, flags: hole },]
        );
        assert_eq!(d.iter().map(|d| u64::from(d.length)).sum::<u64>(), 10_000);
    }

    #[test]
    fn descriptor_builder_limits() {
        let mut b = DescriptorBuilder::new(0, 4096 * 4, 1);
        assert!(b.push(0, 4096, 0));
        assert!(!b.push(4096, 4096, 3));
        assert_eq!(b.finish(), vec![BlockStatusDescriptor { length: 4096, flags: 0 }]);

        // Nothing pushed: one descriptor for the whole window.
        let b = DescriptorBuilder::new(512, 1024, 8);
        assert_eq!(b.finish(), vec![BlockStatusDescriptor { length: 1024, flags: 0 }]);

        // Extents entirely before the window are ignored; zero-length runs are harmless.
        let mut b = DescriptorBuilder::new(8192, 4096, 8);
        assert!(b.push(0, 4096, 3));
        assert!(b.push(8192, 0, 3));
        assert!(!b.push(8192, 4096, 3));
        assert_eq!(b.finish(), vec![BlockStatusDescriptor { length: 4096, flags: 3 }]);

        // The largest window fits in u32 descriptors.
        let mut b = DescriptorBuilder::new(u64::MAX - u64::from(u32::MAX), u32::MAX, 8);
        assert!(!b.push(0, u64::MAX, 0));
        assert_eq!(b.finish(), vec![BlockStatusDescriptor { length: u32::MAX, flags: 0 }]);
    }
}
