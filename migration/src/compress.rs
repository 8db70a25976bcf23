//! Block data on the wire: batches of block records compressed as one zstd frame each, at a
//! level that follows the link.
//!
//! A record is `fingerprint (16) | flag (u8) | block bytes (if flag = 0)`; flag 1 means the
//! source no longer holds that block (it changed since it was listed; a later round lists
//! its new content). Compressing many blocks in one frame lets zstd find redundancy across
//! blocks, which 4 KiB blocks compressed one by one cannot.

use std::time::Duration;

use cas_store::Fingerprint;

use crate::protocol::{ProtocolError, MAX_RAW_DATA};

const RECORD_DATA: u8 = 0;
const RECORD_GONE: u8 = 1;

/// One block in a DATA frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Block { fp: Fingerprint, data: Vec<u8> },
    Gone(Fingerprint),
}

/// Serialises records (uncompressed).
pub fn encode_records(records: &[Record], out: &mut Vec<u8>) {
    for r in records {
        match r {
            Record::Block { fp, data } => {
                out.extend_from_slice(&fp.0);
                out.push(RECORD_DATA);
                out.extend_from_slice(data);
            }
            Record::Gone(fp) => {
                out.extend_from_slice(&fp.0);
                out.push(RECORD_GONE);
            }
        }
    }
}

/// Decompresses a DATA frame and splits it into records of `block_size` bytes.
pub fn decode_frame(raw_len: u32, frame: &[u8], block_size: usize) -> Result<Vec<Record>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { what: "DATA", why };
    let raw_len = raw_len as usize;
    if raw_len > MAX_RAW_DATA {
        return Err(bad(format!("{raw_len} bytes decompressed is over the limit")));
    }
    // The capacity is the declared length, already bounded: a lying peer cannot make us
    // allocate more, and decompression stops at the capacity.
    let raw = zstd::bulk::decompress(frame, raw_len).map_err(|e| bad(format!("zstd: {e}")))?;
    if raw.len() != raw_len {
        return Err(bad(format!("decompressed to {} bytes, {raw_len} announced", raw.len())));
    }
    parse_records(&raw, block_size)
}

/// Splits decompressed DATA (or DATA_STREAM) bytes into records of `block_size` bytes.
pub fn parse_records(raw: &[u8], block_size: usize) -> Result<Vec<Record>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { what: "DATA", why };
    let mut records = Vec::new();
    let mut rest = &raw[..];
    while !rest.is_empty() {
        if rest.len() < 17 {
            return Err(bad("truncated record".into()));
        }
        let fp = Fingerprint(rest[..16].try_into().expect("16 bytes"));
        match rest[16] {
            RECORD_DATA => {
                if rest.len() < 17 + block_size {
                    return Err(bad("truncated block".into()));
                }
                records.push(Record::Block { fp, data: rest[17..17 + block_size].to_vec() });
                rest = &rest[17 + block_size..];
            }
            RECORD_GONE => {
                records.push(Record::Gone(fp));
                rest = &rest[17..];
            }
            f => return Err(bad(format!("record flag {f}"))),
        }
    }
    Ok(records)
}

/// Compresses one batch at `level`.
pub fn compress(raw: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(raw, level).expect("zstd compression of a memory buffer does not fail")
}

/// Chooses the zstd level so that compression keeps pace with the link, like `zstd --adapt`:
/// when the sender waits for the link longer than it spends compressing, there is CPU to
/// spare and a higher level sends fewer bytes; when compressing takes longer than sending,
/// the level drops so the link stays full.
#[derive(Debug, Clone)]
pub struct LevelController {
    level: i32,
    min: i32,
    max: i32,
    fixed: bool,
    compress_time: Duration,
    wait_time: Duration,
    batches: u32,
}

impl LevelController {
    /// `fixed`: always use that level. Otherwise start at 3 and adapt within 1..=19.
    pub fn new(fixed: Option<i32>) -> LevelController {
        match fixed {
            Some(l) => LevelController { level: l, min: l, max: l, fixed: true, ..Self::adaptive() },
            None => Self::adaptive(),
        }
    }

    fn adaptive() -> LevelController {
        LevelController { level: 3, min: 1, max: 19, fixed: false, compress_time: Duration::ZERO, wait_time: Duration::ZERO, batches: 0 }
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Records one batch: how long it took to compress and how long the sender then waited
    /// for room on the link.
    pub fn observe(&mut self, compress: Duration, waited_for_link: Duration) {
        if self.fixed {
            return;
        }
        self.compress_time += compress;
        self.wait_time += waited_for_link;
        self.batches += 1;
        if self.batches < 4 {
            return;
        }
        if self.wait_time > self.compress_time * 2 && self.level < self.max {
            self.level += 1;
        } else if self.compress_time > self.wait_time * 2 + Duration::from_millis(1) && self.level > self.min {
            self.level -= 1;
        }
        self.compress_time = Duration::ZERO;
        self.wait_time = Duration::ZERO;
        self.batches = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_zstd() {
        let records = vec![
            Record::Block { fp: Fingerprint([1; 16]), data: vec![7; 4096] },
            Record::Gone(Fingerprint([2; 16])),
            Record::Block { fp: Fingerprint([3; 16]), data: (0..4096).map(|i| (i % 256) as u8).collect() },
        ];
        let mut raw = Vec::new();
        encode_records(&records, &mut raw);
        let frame = compress(&raw, 3);
        assert!(frame.len() < raw.len() / 4);
        assert_eq!(decode_frame(raw.len() as u32, &frame, 4096).unwrap(), records);
        assert!(decode_frame(raw.len() as u32 - 1, &frame, 4096).is_err(), "length mismatch");
        assert!(decode_frame(raw.len() as u32, &frame[..frame.len() / 2], 4096).is_err());
        assert!(decode_frame(raw.len() as u32, &frame, 8192).is_err(), "wrong block size");
        assert!(decode_frame(u32::MAX, &frame, 4096).is_err());
    }

    #[test]
    fn level_follows_the_bottleneck() {
        let mut c = LevelController::new(None);
        for _ in 0..8 {
            c.observe(Duration::from_millis(1), Duration::from_millis(10));
        }
        assert_eq!(c.level(), 5, "slow link: compress harder");
        for _ in 0..40 {
            c.observe(Duration::from_millis(10), Duration::ZERO);
        }
        assert_eq!(c.level(), 1, "fast link: compress faster");
        let mut f = LevelController::new(Some(7));
        f.observe(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(f.level(), 7);
    }
}
