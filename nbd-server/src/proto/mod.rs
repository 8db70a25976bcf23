//! The NBD wire protocol as a pure codec: no I/O, no async, no allocation driven by a length
//! read from the wire (every such length is checked first).
//!
//! The connection code (`conn`) reads exact byte counts from the socket and hands
//! them to the parsers here; it builds replies with the encoders here.
//!
//! # State machine
//!
//! ```text
//!            TCP / Unix accept
//!                   |
//!                   v
//!   +-------------------------------+   bad client flags        +--------+
//!   | Greeting                      |-------------------------->| Closed |
//!   |  S: NBDMAGIC IHAVEOPT flags   |                           +--------+
//!   |  C: client flags              |                              ^  ^  ^
//!   +-------------------------------+                              |  |  |
//!                   |                                              |  |  |
//!                   v                                              |  |  |
//!   +-------------------------------+  bad option magic, EOF,      |  |  |
//!   | Options (repeat)              |  EXPORT_NAME of an unknown --+  |  |
//!   |  C: IHAVEOPT opt len data     |  export, handshake timeout      |  |
//!   |  S: option reply(s)           |                                 |  |
//!   |  STARTTLS: ACK, then TLS,     |  ABORT: ACK --------------------+  |
//!   |  option state is reset        |                                    |
//!   +-------------------------------+                                    |
//!          | EXPORT_NAME (size, flags[, zeroes])                         |
//!          | GO (INFO replies, ACK)                                      |
//!          v                                                             |
//!   +-------------------------------+  DISC: finish in-flight work ------+
//!   | Transmission                  |  bad request magic, EOF -----------+
//!   |  C: request [+ write payload] |  server shutdown: new requests get
//!   |  S: replies, any order        |  ESHUTDOWN, in-flight work drains,
//!   +-------------------------------+  then close
//! ```
//!
//! # Messages
//!
//! ```text
//! Handshake (all big-endian)
//!   S: u64 NBDMAGIC  u64 IHAVEOPT  u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//!   C: u32 client flags
//!   C: u64 IHAVEOPT  u32 option  u32 length  [length bytes]            -- option
//!   S: u64 0x3e889045565a9  u32 option  u32 reply type  u32 length  [length bytes]
//!   S (EXPORT_NAME only): u64 size  u16 transmission flags  [124 zeroes unless NO_ZEROES]
//!
//! Transmission
//!   C: u32 0x25609513  u16 flags  u16 command  u64 handle  u64 offset  u32 length
//!      [length bytes for WRITE]                                         -- 28-byte request
//!   S: u32 0x67446698  u32 error  u64 handle  [length bytes for a successful READ]
//!                                                                       -- simple reply
//!   S: u32 0x668e33ef  u16 flags  u16 type  u64 handle  u32 length  [payload]
//!                                                                       -- structured chunk
//!      OFFSET_DATA  (1): u64 offset, data
//!      OFFSET_HOLE  (2): u64 offset, u32 hole length
//!      BLOCK_STATUS (5): u32 context id, (u32 length, u32 flags) x n
//!      ERROR   (32769): u32 error, u16 message length, message
//! ```
//!
//! # Version policy
//!
//! The server implements the fixed newstyle handshake of the NBD specification
//! (NetworkBlockDevice/nbd, doc/proto.md): the baseline (INFO, GO, EXPORT_NAME, LIST, ABORT),
//! STARTTLS, structured replies and `base:allocation` block status. It does not implement
//! the oldstyle handshake, extended headers (64-bit lengths) or RESIZE: those options get
//! `NBD_REP_ERR_UNSUP`, which every client handles by falling back. New features are added
//! the way the spec wants: an option the client must ask for (never a handshake flag), so
//! an older client never sees them. Constants are never renumbered; a value is added to
//! [`consts`] with a unit test of its encoding when a feature is implemented.

pub mod consts;
mod errno;
pub mod handshake;
pub mod transmission;

pub use errno::Errno;
pub use handshake::{
    encode_greeting, parse_client_flags, parse_info_request, parse_meta_context_request, parse_option_header,
    BlockSizeConstraints, ClientFlags, InfoRequest, MetaContextRequest, OptionCode, OptionHeader,
};
pub use transmission::{
    parse_request_header, validate_request, BlockStatusDescriptor, DescriptorBuilder, Rejection, Request,
    RequestHeader, RequestPolicy,
};

/// Malformed input. Which of these end the connection is the caller's decision, following
/// the spec: bad magic and unknown client flags do; malformed option data gets
/// `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    #[error("option data is truncated or its counts disagree with its length")]
    Truncated,
    #[error("{0} unexpected bytes after the option data")]
    TrailingData(usize),
    #[error("string of {0} bytes is longer than 4096")]
    StringTooLong(usize),
    #[error("string is not UTF-8 or contains NUL")]
    BadString,
}
