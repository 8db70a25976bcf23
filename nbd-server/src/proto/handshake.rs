//! Handshake phase frames: the greeting, client flags, option requests and option replies.
//!
//! Parsers take byte slices that the caller has already read (with lengths checked against
//! [`MAX_OPTION_DATA_LEN`] before allocating); encoders
//! append to a `Vec<u8>`.

use super::consts::*;
use super::ProtoError;

// ---- Greeting and client flags ------------------------------------------------------------

/// Bytes of the server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const GREETING_LEN: usize = 18;

/// The first thing the server sends.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client speaks fixed newstyle (required for anything but `NBD_OPT_EXPORT_NAME`
    /// per the spec; this server honours the other options anyway, except STARTTLS).
    pub fixed_newstyle: bool,
    /// The client does not want the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

/// Parses the client flags. Unknown bits are an error: the spec says the server MUST then
/// drop the connection.
pub fn parse_client_flags(raw: [u8; 4]) -> Result<ClientFlags, ProtoError> {
    let flags = u32::from_be_bytes(raw);
    if flags & !KNOWN_CLIENT_FLAGS != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & CLIENT_FLAG_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

// ---- Option requests ----------------------------------------------------------------------

/// An option the client can send, decoded from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionCode {
    ExportName,
    Abort,
    List,
    StartTls,
    Info,
    Go,
    StructuredReply,
    ListMetaContext,
    SetMetaContext,
    /// Anything else (including options this server deliberately does not implement, such
    /// as `NBD_OPT_EXTENDED_HEADERS`): answered with `NBD_REP_ERR_UNSUP`.
    Other(u32),
}

impl OptionCode {
    pub fn from_u32(code: u32) -> OptionCode {
        match code {
            OPT_EXPORT_NAME => OptionCode::ExportName,
            OPT_ABORT => OptionCode::Abort,
            OPT_LIST => OptionCode::List,
            OPT_STARTTLS => OptionCode::StartTls,
            OPT_INFO => OptionCode::Info,
            OPT_GO => OptionCode::Go,
            OPT_STRUCTURED_REPLY => OptionCode::StructuredReply,
            OPT_LIST_META_CONTEXT => OptionCode::ListMetaContext,
            OPT_SET_META_CONTEXT => OptionCode::SetMetaContext,
            other => OptionCode::Other(other),
        }
    }

    pub fn to_u32(self) -> u32 {
        match self {
            OptionCode::ExportName => OPT_EXPORT_NAME,
            OptionCode::Abort => OPT_ABORT,
            OptionCode::List => OPT_LIST,
            OptionCode::StartTls => OPT_STARTTLS,
            OptionCode::Info => OPT_INFO,
            OptionCode::Go => OPT_GO,
            OptionCode::StructuredReply => OPT_STRUCTURED_REPLY,
            OptionCode::ListMetaContext => OPT_LIST_META_CONTEXT,
            OptionCode::SetMetaContext => OPT_SET_META_CONTEXT,
            OptionCode::Other(code) => code,
        }
    }
}

/// The fixed part of every option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The raw option number (echoed in every reply).
    pub option: u32,
    /// Bytes of option data that follow. Not yet checked against any limit.
    pub length: u32,
}

impl OptionHeader {
    pub fn code(&self) -> OptionCode {
        OptionCode::from_u32(self.option)
    }
}

/// Parses an option header. A wrong magic means the client is not speaking NBD (or lost
/// framing): the caller must drop the connection.
pub fn parse_option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let magic = u64::from_be_bytes(raw[0..8].try_into().expect("8 bytes"));
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: u32::from_be_bytes(raw[8..12].try_into().expect("4 bytes")),
        length: u32::from_be_bytes(raw[12..16].try_into().expect("4 bytes")),
    })
}

/// Encodes an option header (used by tests and by clients written with this codec).
pub fn encode_option_header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut out = [0u8; OPTION_HEADER_LEN];
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&option.to_be_bytes());
    out[12..16].copy_from_slice(&length.to_be_bytes());
    out
}

/// A cursor over option data that never reads past the end.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u16(&mut self) -> Result<u16, ProtoError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.data.len() {
            return Err(ProtoError::Truncated);
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    /// A length-prefixed (u32) string.
    fn string(&mut self) -> Result<&'a str, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(ProtoError::StringTooLong(len));
        }
        parse_string(self.take(len)?)
    }

    fn finish(self) -> Result<(), ProtoError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingData(self.data.len()))
        }
    }
}

/// Validates an NBD string: UTF-8, no NUL, at most 4096 bytes.
pub fn parse_string(bytes: &[u8]) -> Result<&str, ProtoError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong(bytes.len()));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| ProtoError::BadString)?;
    if s.contains('\0') {
        return Err(ProtoError::BadString);
    }
    Ok(s)
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name ("" is the default export).
    pub name: &'a str,
    /// Information types the client asked for, in order (unknown ones included; the server
    /// ignores what it does not know).
    pub requests: Vec<u16>,
}

impl InfoRequest<'_> {
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data: u32 name length, name, u16 count, u16 × count.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, ProtoError> {
    let mut cur = Cursor { data };
    let name = cur.string()?;
    let count = cur.u16()? as usize;
    // The count is bounded by the data actually present: no allocation beyond it.
    if count * 2 != cur.data.len() {
        return Err(ProtoError::Truncated);
    }
    let mut requests = Vec::with_capacity(count);
    for _ in 0..count {
        requests.push(cur.u16()?);
    }
    cur.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Encodes `NBD_OPT_INFO` / `NBD_OPT_GO` data (for tests and clients).
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + 2 + requests.len() * 2);
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    pub export: &'a str,
    pub queries: Vec<&'a str>,
}

/// Parses meta context option data: u32 export name length, name, u32 query count, then
/// count × (u32 length, query).
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest<'_>, ProtoError> {
    let mut cur = Cursor { data };
    let export = cur.string()?;
    let count = cur.u32()? as usize;
    // Each query takes at least its 4-byte length: a count the data cannot hold is invalid,
    // and it bounds the allocation below.
    if count > cur.data.len() / 4 {
        return Err(ProtoError::Truncated);
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(cur.string()?);
    }
    cur.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Encodes meta context option data (for tests and clients).
pub fn encode_meta_context_request(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(export.len() as u32).to_be_bytes());
    out.extend_from_slice(export.as_bytes());
    out.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        out.extend_from_slice(&(q.len() as u32).to_be_bytes());
        out.extend_from_slice(q.as_bytes());
    }
    out
}

/// What a meta context query selects on this server, which knows only `base:allocation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaQueryMatch {
    /// The query names (or, when listing, wildcards) `base:allocation`.
    BaseAllocation,
    /// Nothing this server knows; the spec says to ignore it.
    Nothing,
}

/// Matches one query. `listing` is true for `NBD_OPT_LIST_META_CONTEXT`, where the bare
/// namespace `base:` is a wildcard; for SET it selects nothing.
pub fn match_meta_query(query: &str, listing: bool) -> MetaQueryMatch {
    match query {
        META_CONTEXT_BASE_ALLOCATION => MetaQueryMatch::BaseAllocation,
        "base:" if listing => MetaQueryMatch::BaseAllocation,
        _ => MetaQueryMatch::Nothing,
    }
}

// ---- Option replies -----------------------------------------------------------------------

/// Bytes of an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Appends one option reply with its payload.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    encode_option_reply_header(out, option, reply_type, payload.len() as u32);
    out.extend_from_slice(payload);
}

/// Appends an option reply header; the caller appends exactly `length` payload bytes.
pub fn encode_option_reply_header(out: &mut Vec<u8>, option: u32, reply_type: u32, length: u32) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

/// Appends an error reply with a human-readable message (truncated to the string limit).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & (1 << 31) != 0, "error replies have bit 31 set");
    let message = truncate_str(message, MAX_STRING_LEN);
    encode_option_reply(out, option, reply_type, message.as_bytes());
}

/// Appends `NBD_REP_SERVER` for one export in reply to `NBD_OPT_LIST`.
pub fn encode_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let payload_len = 4 + name.len() + description.len();
    encode_option_reply_header(out, OPT_LIST, REP_SERVER, payload_len as u32);
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
}

/// Appends `NBD_REP_META_CONTEXT`.
pub fn encode_rep_meta_context(out: &mut Vec<u8>, option: u32, context_id: u32, name: &str) {
    encode_option_reply_header(out, option, REP_META_CONTEXT, (4 + name.len()) as u32);
    out.extend_from_slice(&context_id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(out: &mut Vec<u8>, option: u32, size: u64, transmission_flags: u16) {
    encode_option_reply_header(out, option, REP_INFO, 12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn encode_info_string(out: &mut Vec<u8>, option: u32, info: u16, value: &str) {
    let value = truncate_str(value, MAX_STRING_LEN);
    encode_option_reply_header(out, option, REP_INFO, (2 + value.len()) as u32);
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizeConstraints {
    pub minimum: u32,
    pub preferred: u32,
    pub maximum: u32,
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(out: &mut Vec<u8>, option: u32, sizes: BlockSizeConstraints) {
    encode_option_reply_header(out, option, REP_INFO, 14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&sizes.minimum.to_be_bytes());
    out.extend_from_slice(&sizes.preferred.to_be_bytes());
    out.extend_from_slice(&sizes.maximum.to_be_bytes());
}

/// The reply to `NBD_OPT_EXPORT_NAME` (no option reply header: size, flags, maybe zeroes).
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, transmission_flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Cuts a string to at most `max` bytes on a character boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(SERVER_HANDSHAKE_FLAGS);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags([0, 0, 0, 3]).unwrap(), ClientFlags { fixed_newstyle: true, no_zeroes: true });
        assert_eq!(parse_client_flags([0, 0, 0, 0]).unwrap(), ClientFlags { fixed_newstyle: false, no_zeroes: false });
        assert!(matches!(parse_client_flags([0, 0, 0, 4]), Err(ProtoError::UnknownClientFlags(4))));
        assert!(parse_client_flags([0x80, 0, 0, 1]).is_err());
    }

    #[test]
    fn option_header_round_trip() {
        let raw = encode_option_header(OPT_GO, 1234);
        let h = parse_option_header(&raw).unwrap();
        assert_eq!(h, OptionHeader { option: OPT_GO, length: 1234 });
        assert_eq!(h.code(), OptionCode::Go);
        let mut bad = raw;
        bad[0] ^= 1;
        assert!(matches!(parse_option_header(&bad), Err(ProtoError::BadOptionMagic(_))));
    }

    #[test]
    fn option_codes() {
        for code in 0..16u32 {
            assert_eq!(OptionCode::from_u32(code).to_u32(), code);
        }
        assert_eq!(OptionCode::from_u32(OPT_EXTENDED_HEADERS), OptionCode::Other(11));
        assert_eq!(OptionCode::from_u32(OPT_PEEK_EXPORT), OptionCode::Other(4));
    }

    #[test]
    fn info_request_round_trip() {
        let data = encode_info_request("disk0", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let req = parse_info_request(&data).unwrap();
        assert_eq!(req.name, "disk0");
        assert_eq!(req.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(req.wants(INFO_NAME));
        assert!(!req.wants(INFO_DESCRIPTION));

        let empty = encode_info_request("", &[]);
        assert_eq!(parse_info_request(&empty).unwrap().name, "");
    }

    #[test]
    fn info_request_rejects_bad_lengths() {
        // Name length past the end.
        let mut data = encode_info_request("disk0", &[]);
        data[3] = 200;
        assert!(parse_info_request(&data).is_err());
        // Count disagreeing with the data.
        let mut data = encode_info_request("d", &[1, 2]);
        data.pop();
        assert!(parse_info_request(&data).is_err());
        let mut data = encode_info_request("d", &[1]);
        data.push(0);
        assert!(parse_info_request(&data).is_err());
        // Huge count with little data must not allocate.
        let mut data = encode_info_request("d", &[]);
        let n = data.len();
        data[n - 2..].copy_from_slice(&0xffffu16.to_be_bytes());
        assert!(parse_info_request(&data).is_err());
        // Too short for anything.
        assert!(parse_info_request(&[0, 0]).is_err());
        assert!(parse_info_request(&[]).is_err());
        // Invalid UTF-8 and embedded NUL.
        let mut data = encode_info_request("ab", &[]);
        data[4] = 0xff;
        assert!(matches!(parse_info_request(&data), Err(ProtoError::BadString)));
        let data = encode_info_request("a\0", &[]);
        assert!(matches!(parse_info_request(&data), Err(ProtoError::BadString)));
    }

    #[test]
    fn meta_context_request_round_trip() {
        let data = encode_meta_context_request("disk", &["base:allocation", "qemu:dirty-bitmap:x"]);
        let req = parse_meta_context_request(&data).unwrap();
        assert_eq!(req.export, "disk");
        assert_eq!(req.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        let none = encode_meta_context_request("", &[]);
        assert!(parse_meta_context_request(&none).unwrap().queries.is_empty());
    }

    #[test]
    fn meta_context_request_rejects_bad_lengths() {
        let mut data = encode_meta_context_request("disk", &["base:allocation"]);
        data.truncate(data.len() - 1);
        assert!(parse_meta_context_request(&data).is_err());
        let mut data = encode_meta_context_request("disk", &[]);
        let n = data.len();
        data[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_context_request(&data).is_err());
        let mut data = encode_meta_context_request("disk", &["base:"]);
        data.push(7);
        assert!(matches!(parse_meta_context_request(&data), Err(ProtoError::TrailingData(1))));
        // A string length over 4096 is refused before slicing.
        let mut data = Vec::new();
        data.extend_from_slice(&5000u32.to_be_bytes());
        data.extend_from_slice(&[b'a'; 5000]);
        data.extend_from_slice(&0u32.to_be_bytes());
        assert!(matches!(parse_meta_context_request(&data), Err(ProtoError::StringTooLong(5000))));
    }

    #[test]
    fn meta_query_matching() {
        assert_eq!(match_meta_query("base:allocation", false), MetaQueryMatch::BaseAllocation);
        assert_eq!(match_meta_query("base:allocation", true), MetaQueryMatch::BaseAllocation);
        assert_eq!(match_meta_query("base:", true), MetaQueryMatch::BaseAllocation);
        assert_eq!(match_meta_query("base:", false), MetaQueryMatch::Nothing);
        assert_eq!(match_meta_query("base:other", true), MetaQueryMatch::Nothing);
        assert_eq!(match_meta_query("qemu:dirty-bitmap:a", true), MetaQueryMatch::Nothing);
        assert_eq!(match_meta_query("nocolon", true), MetaQueryMatch::Nothing);
    }

    #[test]
    fn option_reply_layouts() {
        let mut out = Vec::new();
        encode_option_reply(&mut out, OPT_LIST, REP_ACK, &[]);
        assert_eq!(out.len(), OPTION_REPLY_HEADER_LEN);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_LIST.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ACK.to_be_bytes());
        assert_eq!(&out[16..20], &0u32.to_be_bytes());

        let mut out = Vec::new();
        encode_rep_server(&mut out, "disk", "");
        assert_eq!(&out[12..16], &REP_SERVER.to_be_bytes());
        assert_eq!(&out[16..20], &8u32.to_be_bytes());
        assert_eq!(&out[20..24], &4u32.to_be_bytes());
        assert_eq!(&out[24..28], b"disk");

        let mut out = Vec::new();
        encode_info_export(&mut out, OPT_GO, 1 << 30, 0x1234);
        assert_eq!(out.len(), 20 + 12);
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..22], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&out[22..30], &(1u64 << 30).to_be_bytes());
        assert_eq!(&out[30..32], &0x1234u16.to_be_bytes());

        let mut out = Vec::new();
        let sizes = BlockSizeConstraints { minimum: 1, preferred: 4096, maximum: MAX_PAYLOAD_LEN };
        encode_info_block_size(&mut out, OPT_INFO, sizes);
        assert_eq!(out.len(), 20 + 14);
        assert_eq!(&out[20..22], &INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(&out[22..26], &1u32.to_be_bytes());
        assert_eq!(&out[26..30], &4096u32.to_be_bytes());
        assert_eq!(&out[30..34], &MAX_PAYLOAD_LEN.to_be_bytes());

        let mut out = Vec::new();
        encode_info_string(&mut out, OPT_GO, INFO_NAME, "disk");
        assert_eq!(&out[16..20], &6u32.to_be_bytes());
        assert_eq!(&out[20..22], &INFO_NAME.to_be_bytes());
        assert_eq!(&out[22..], b"disk");

        let mut out = Vec::new();
        encode_rep_meta_context(&mut out, OPT_SET_META_CONTEXT, 7, META_CONTEXT_BASE_ALLOCATION);
        assert_eq!(&out[12..16], &REP_META_CONTEXT.to_be_bytes());
        assert_eq!(&out[16..20], &(4 + 15u32).to_be_bytes());
        assert_eq!(&out[20..24], &7u32.to_be_bytes());
        assert_eq!(&out[24..], b"base:allocation");

        let mut out = Vec::new();
        encode_option_error(&mut out, 99, REP_ERR_UNSUP, "nope");
        assert_eq!(&out[8..12], &99u32.to_be_bytes());
        assert_eq!(&out[12..16], &REP_ERR_UNSUP.to_be_bytes());
        assert_eq!(&out[20..], b"nope");
    }

    #[test]
    fn export_name_reply_layout() {
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 512, 0x0101, false);
        assert_eq!(out.len(), 8 + 2 + 124);
        assert!(out[10..].iter().all(|&b| b == 0));
        let mut out = Vec::new();
        encode_export_name_reply(&mut out, 512, 0x0101, true);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 2, 0, 1, 1]);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("héllo", 2), "h");
        assert_eq!(truncate_str("abc", 10), "abc");
    }
}
