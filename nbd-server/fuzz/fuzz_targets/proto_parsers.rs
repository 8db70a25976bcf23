//! Fuzzes the pure codec: every parser on arbitrary bytes, request validation against an
//! arbitrary session, and the block status descriptor builder. Checks invariants, not just
//! absence of panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::{encode_info_request, encode_meta_context_request, match_meta_query};
use nbd_server::proto::transmission::encode_request_header;
use nbd_server::proto::{
    parse_client_flags, parse_info_request, parse_meta_context_request, parse_option_header, parse_request_header,
    validate_request, DescriptorBuilder, Request, RequestPolicy,
};

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_be_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    // Handshake parsers.
    if data.len() >= 4 {
        let _ = parse_client_flags(data[..4].try_into().unwrap());
    }
    if data.len() >= OPTION_HEADER_LEN {
        let _ = parse_option_header(data[..OPTION_HEADER_LEN].try_into().unwrap());
    }
    if let Ok(req) = parse_info_request(data) {
        assert!(req.name.len() <= MAX_STRING_LEN);
        // What parses re-encodes to the same bytes.
        assert_eq!(encode_info_request(req.name, &req.requests), data);
    }
    if let Ok(req) = parse_meta_context_request(data) {
        assert_eq!(encode_meta_context_request(req.export, &req.queries), data);
        for q in &req.queries {
            let _ = match_meta_query(q, true);
            let _ = match_meta_query(q, false);
        }
    }

    // Request header and validation.
    if data.len() >= REQUEST_HEADER_LEN {
        if let Ok(h) = parse_request_header(data[..REQUEST_HEADER_LEN].try_into().unwrap()) {
            assert_eq!(&encode_request_header(&h)[..], &data[..REQUEST_HEADER_LEN]);
            let bits = data.get(REQUEST_HEADER_LEN).copied().unwrap_or(0);
            let policy = RequestPolicy {
                export_size: u64_at(data, REQUEST_HEADER_LEN + 1),
                structured: bits & 1 != 0,
                block_status: bits & 2 != 0,
                read_only: bits & 4 != 0,
                max_payload: MAX_PAYLOAD_LEN,
            };
            if let Ok(req) = validate_request(&h, &policy) {
                let range = match req {
                    Request::Read { offset, length } | Request::Cache { offset, length } => Some((offset, length)),
                    Request::Write { offset, length, .. }
                    | Request::Trim { offset, length, .. }
                    | Request::WriteZeroes { offset, length, .. }
                    | Request::BlockStatus { offset, length, .. } => Some((offset, length)),
                    Request::Flush | Request::Disconnect => None,
                };
                if let Some((offset, length)) = range {
                    assert!(offset.checked_add(u64::from(length)).is_some_and(|end| end <= policy.export_size));
                }
                if matches!(req, Request::Read { .. } | Request::Write { .. }) {
                    assert!(h.length <= MAX_PAYLOAD_LEN);
                }
                if matches!(req, Request::Write { .. } | Request::Trim { .. } | Request::WriteZeroes { .. }) {
                    assert!(!policy.read_only);
                }
            }
        }
    }

    // Descriptor builder: arbitrary runs (from 24-byte records) into a window.
    if data.len() >= 12 {
        let offset = u64_at(data, 0) >> (data[0] % 64);
        let length = u32::from_be_bytes(data[8..12].try_into().unwrap());
        let max = 1 + (data[11] as usize % 8);
        let mut b = DescriptorBuilder::new(offset, length, max);
        for rec in data[12..].chunks_exact(24) {
            let start = u64_at(rec, 0);
            let len = u64_at(rec, 8);
            let flags = u32::from_be_bytes(rec[16..20].try_into().unwrap()) & 3;
            if !b.push(start, len, flags) {
                break;
            }
        }
        let d = b.finish();
        assert!(!d.is_empty() || length == 0);
        assert!(d.len() <= max);
        assert!(d.iter().all(|x| x.length > 0) || length == 0);
        let total: u64 = d.iter().map(|x| u64::from(x.length)).sum();
        assert!(total <= u64::from(length));
    }
});
