//! Replies as the session writes them: a small fixed header, small encoded chunks, or READ
//! data in the pooled buffer it was read into (header in front, no copy).

use std::io::{self, Write};

use super::BASE_ALLOCATION_ID;
use crate::buffer::{is_all_zero, PooledBuf};
use crate::export::{BlockDevice, DeviceResult};
use crate::proto::consts::*;
use crate::proto::transmission::{
    allocation_flags, encode_block_status, encode_error_chunk, encode_none_chunk, encode_offset_data_prefix,
    encode_offset_hole, encode_simple_reply, encode_simple_reply_header,
};
use crate::proto::{DescriptorBuilder, Errno};

/// One reply ready for the socket.
#[derive(Debug)]
pub(super) enum Frame {
    /// A simple reply without data.
    Simple([u8; SIMPLE_REPLY_HEADER_LEN]),
    /// Small encoded chunks (errors, holes, block status).
    Bytes(Vec<u8>),
    /// Reply header and READ data in one pooled buffer.
    Data(PooledBuf),
}

impl Frame {
    /// Success without data.
    pub(super) fn ok(handle: u64) -> Frame {
        Frame::Simple(encode_simple_reply(handle, 0))
    }

    /// Writes the whole reply (one write call for all but huge READ data).
    pub(super) fn write_to<W: Write>(&self, out: &mut W) -> io::Result<()> {
        match self {
            Frame::Simple(bytes) => out.write_all(bytes),
            Frame::Bytes(bytes) => out.write_all(bytes),
            Frame::Data(buf) => out.write_all(buf),
        }
    }
}

/// The error reply for a request, in the form the session uses.
pub(super) fn error_frame(handle: u64, errno: Errno, message: &str, structured: bool) -> Frame {
    if structured {
        let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 6 + message.len());
        encode_error_chunk(&mut out, handle, errno, message);
        Frame::Bytes(out)
    } else {
        Frame::Simple(encode_simple_reply(handle, errno.code()))
    }
}

/// The reply to a successful READ whose data is in `buf` after the reserved prefix.
pub(super) fn read_reply(mut buf: PooledBuf, handle: u64, offset: u64, length: u32, structured: bool) -> Frame {
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
pub(super) fn block_status_reply(
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
