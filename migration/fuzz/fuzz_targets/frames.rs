//! Fuzzes everything the destination decodes from the link: message frames (header and
//! payload), DATA payloads (zstd frames of block records, deltas included), the per-connection
//! zstd streams, and deltas against a reference block. Checks invariants, not just the absence
//! of panics: a decoded message encodes back to a frame that decodes to the same message,
//! block records hold exactly one block, nothing decodes past the length it announced.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::compress::{decode_frame, parse_records, Record, RecordLayout};
use migration::protocol::{decode, decode_header, encode, HEADER_LEN};
use migration::stream::{StreamDecoder, StreamId};

const BLOCK: usize = 4096;

fn check_records(records: &[Record]) {
    for r in records {
        if let Record::Block { data, .. } | Record::Content(data) = r {
            assert_eq!(data.len(), BLOCK, "a block record of another size");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    match selector % 5 {
        // One message frame as it comes off the link.
        0 => {
            let Some(header) = rest.get(..HEADER_LEN) else { return };
            let Ok((t, len)) = decode_header(header.try_into().unwrap()) else { return };
            let payload = &rest[HEADER_LEN..];
            let payload = &payload[..len.min(payload.len())];
            if let Ok(msg) = decode(t, payload) {
                let frame = encode(&msg);
                let (t2, len2) = decode_header(frame[..HEADER_LEN].try_into().unwrap()).expect("our own header");
                assert_eq!(len2, frame.len() - HEADER_LEN);
                assert_eq!(decode(t2, &frame[HEADER_LEN..]).expect("our own frame"), msg);
            }
        }
        // A DATA payload: a zstd frame of records (in either layout, chosen by the length's
        // top bit).
        1 => {
            let Some((len, frame)) = rest.split_at_checked(4) else { return };
            let raw_len = u32::from_le_bytes(len.try_into().unwrap());
            let layout = RecordLayout::agreed(raw_len >> 31 == 1);
            if let Ok(records) = decode_frame(raw_len & !(1 << 31), frame, BLOCK, layout) {
                check_records(&records);
            }
        }
        // Records already decompressed, in both layouts.
        2 => {
            for layout in [RecordLayout::Named, RecordLayout::Unnamed] {
                if let Ok(records) = parse_records(rest, BLOCK, layout) {
                    check_records(&records);
                }
            }
        }
        // Frames of one connection's stream, in order (each with the raw length it announces).
        3 => {
            let Ok(mut decoder) = StreamDecoder::new(StreamId::Background) else { return };
            let mut at = rest;
            while let Some((head, tail)) = at.split_at_checked(4) {
                let frame_len = usize::from(u16::from_le_bytes([head[0], head[1]])).min(tail.len());
                let raw_len = usize::from(u16::from_le_bytes([head[2], head[3]]));
                let (frame, next) = tail.split_at(frame_len);
                match decoder.decode(frame, raw_len) {
                    Ok(out) => assert_eq!(out.len(), raw_len, "decoded another length than announced"),
                    Err(_) => break,
                }
                at = next;
            }
        }
        // A delta against a reference block the destination holds.
        _ => {
            let reference: Vec<u8> = (0..BLOCK).map(|i| (i * 7 % 251) as u8).collect();
            if let Ok(block) = migration::delta::decode(rest, &reference, BLOCK) {
                assert_eq!(block.len(), BLOCK);
            }
        }
    }
});
