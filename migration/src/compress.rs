//! Block data on the wire: batches of block records compressed as one zstd frame each, at a
//! level that follows the link.
//!
//! Records come in one of two layouts (see [`RecordLayout`]), chosen per connection:
//! * **named** (every peer speaks it): `fingerprint (16) | flag (u8) | ...`;
//! * **unnamed** (when HELLO and ACCEPT both say `unnamed_blocks`): `flag (u8) | ...`, and a
//!   whole block carries no fingerprint at all.
//!
//! Flag 0 is a whole block (`block bytes` follow); flag 1 means the source no longer holds
//! that block (it changed since it was listed; a later round lists its new content) and
//! carries its fingerprint in both layouts; flag 2 is a delta, `[fingerprint (16) in the
//! unnamed layout] | reference fingerprint (16) | length (u16 LE) | delta` (see
//! [`crate::delta`]), which keeps its fingerprint so that a delta the destination cannot use
//! can be asked for again by name.
//!
//! A whole block need not be named because the content is its name: the destination hashes
//! every block it receives anyway, to check it, and keeps it only if that fingerprint is one
//! it asked for. The name was 16 incompressible bytes beside about 1.7 KB of compressed block,
//! close to 1 % of the link's bytes.
//!
//! Compressing many blocks in one frame lets zstd find redundancy across blocks, which 4 KiB
//! blocks compressed one by one cannot.

use std::time::Duration;

use cas_store::Fingerprint;

use crate::protocol::{ProtocolError, MAX_RAW_DATA};

const RECORD_DATA: u8 = 0;
const RECORD_GONE: u8 = 1;
const RECORD_DELTA: u8 = 2;

/// How block records are laid out on a connection (see the module's notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordLayout {
    /// Every record starts with its block's fingerprint.
    Named,
    /// Records start with their flag; whole blocks carry no fingerprint.
    Unnamed,
}

impl RecordLayout {
    /// The layout two peers agreed on: unnamed when both offered it.
    pub fn agreed(unnamed: bool) -> RecordLayout {
        if unnamed {
            RecordLayout::Unnamed
        } else {
            RecordLayout::Named
        }
    }

    /// Bytes a record of a whole block takes before its content.
    pub fn block_overhead(self) -> usize {
        match self {
            RecordLayout::Named => 17,
            RecordLayout::Unnamed => 1,
        }
    }
}

/// One block in a DATA frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Block {
        fp: Fingerprint,
        data: Vec<u8>,
    },
    /// A whole block as the unnamed layout carries it: the receiver computes its fingerprint
    /// (a source builds [`Record::Block`], which that layout encodes without the name).
    Content(Vec<u8>),
    Gone(Fingerprint),
    /// Block `fp` as a difference from block `reference`, which the destination holds.
    Delta {
        fp: Fingerprint,
        reference: Fingerprint,
        delta: Vec<u8>,
    },
}

impl Record {
    /// The fingerprint the record names, if it names one.
    pub fn fingerprint(&self) -> Option<Fingerprint> {
        match self {
            Record::Block { fp, .. } | Record::Gone(fp) | Record::Delta { fp, .. } => Some(*fp),
            Record::Content(_) => None,
        }
    }
}

/// Serialises records (uncompressed) in `layout`.
///
/// # Panics
/// On a [`Record::Content`] in the named layout: it has no name to write (only a receiver
/// of the unnamed layout makes one).
pub fn encode_records(records: &[Record], layout: RecordLayout, out: &mut Vec<u8>) {
    let named = layout == RecordLayout::Named;
    for r in records {
        match r {
            Record::Block { fp, data } => {
                if named {
                    out.extend_from_slice(&fp.0);
                }
                out.push(RECORD_DATA);
                out.extend_from_slice(data);
            }
            Record::Content(data) => {
                assert!(!named, "a block without a fingerprint cannot be sent in the named layout");
                out.push(RECORD_DATA);
                out.extend_from_slice(data);
            }
            Record::Gone(fp) => {
                if named {
                    out.extend_from_slice(&fp.0);
                    out.push(RECORD_GONE);
                } else {
                    out.push(RECORD_GONE);
                    out.extend_from_slice(&fp.0);
                }
            }
            Record::Delta { fp, reference, delta } => {
                if named {
                    out.extend_from_slice(&fp.0);
                    out.push(RECORD_DELTA);
                } else {
                    out.push(RECORD_DELTA);
                    out.extend_from_slice(&fp.0);
                }
                out.extend_from_slice(&reference.0);
                out.extend_from_slice(&(delta.len() as u16).to_le_bytes());
                out.extend_from_slice(delta);
            }
        }
    }
}

/// Decompresses a DATA frame and splits it into records of `block_size` bytes.
pub fn decode_frame(raw_len: u32, frame: &[u8], block_size: usize, layout: RecordLayout) -> Result<Vec<Record>, ProtocolError> {
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
    parse_records(&raw, block_size, layout)
}

fn take_fingerprint(rest: &[u8]) -> Result<(Fingerprint, &[u8]), ProtocolError> {
    match rest.split_first_chunk::<16>() {
        Some((fp, rest)) => Ok((Fingerprint(*fp), rest)),
        None => Err(ProtocolError::Malformed { what: "DATA", why: "truncated fingerprint".into() }),
    }
}

/// Splits decompressed DATA (or DATA_STREAM) bytes in `layout` into records of `block_size`
/// bytes.
pub fn parse_records(raw: &[u8], block_size: usize, layout: RecordLayout) -> Result<Vec<Record>, ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed { what: "DATA", why };
    let mut records = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        // The record's name (in the named layout, before its flag) and flag.
        let (named, flag, body) = match layout {
            RecordLayout::Named => {
                let (fp, after) = take_fingerprint(rest)?;
                let Some((&flag, body)) = after.split_first() else {
                    return Err(bad("truncated record".into()));
                };
                (Some(fp), flag, body)
            }
            RecordLayout::Unnamed => {
                let (&flag, body) = rest.split_first().expect("not empty");
                (None, flag, body)
            }
        };
        // Records other than whole blocks carry their name in both layouts.
        let name = |body| match named {
            Some(fp) => Ok((fp, body)),
            None => take_fingerprint(body),
        };
        match flag {
            RECORD_DATA => {
                let Some((data, after)) = body.split_at_checked(block_size) else {
                    return Err(bad("truncated block".into()));
                };
                records.push(match named {
                    Some(fp) => Record::Block { fp, data: data.to_vec() },
                    None => Record::Content(data.to_vec()),
                });
                rest = after;
            }
            RECORD_GONE => {
                let (fp, after) = name(body)?;
                records.push(Record::Gone(fp));
                rest = after;
            }
            RECORD_DELTA => {
                let (fp, body) = name(body)?;
                let (reference, body) = take_fingerprint(body)?;
                let Some((len, body)) = body.split_first_chunk::<2>() else {
                    return Err(bad("truncated delta".into()));
                };
                let len = u16::from_le_bytes(*len) as usize;
                let Some((delta, after)) = body.split_at_checked(len).filter(|_| len <= block_size) else {
                    return Err(bad(format!("delta of {len} bytes does not fit")));
                };
                records.push(Record::Delta { fp, reference, delta: delta.to_vec() });
                rest = after;
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

/// Chooses the zstd level so that compression keeps pace with the link, like `zstd --adapt`.
///
/// The background stream is compressed on a thread of its own, ahead of the link, into a
/// short queue the link writer drains. Over windows of [`LEVEL_WINDOW`] of that thread's
/// wall time the controller sees where the time went:
/// * **blocked on the link** (the queue was full) for a fair share of the window: there is
///   CPU to spare, and a higher level sends fewer bytes in the same time: up one level, or
///   two when the compressor waited for the link most of the window;
/// * **busy and never blocked** (the writer drained every frame at once: the link waited for
///   the compressor): down one level, but only after two such windows in a row, so that a
///   moment of CPU contention (a build, the destination's own work on a shared host) does not
///   make the level collapse;
/// * **waiting for blocks to compress** (listing, reading, the destination's WANT): no signal.
///
/// A gang's compressors share one controller (see `SharedLink`), fed each member's times
/// weighed by the number of members, and a *core budget*: when they keep more cores busy
/// than that (all of them but one), the level goes down one per window and never up. A
/// member alone keeps at most one core busy, so the budget changes nothing for it; several,
/// each blocked on a link they share (or on a destination short of CPU), would otherwise
/// raise the level together until the CPU, not the link, held them all back.
#[derive(Debug, Clone)]
pub struct LevelController {
    level: i32,
    min: i32,
    max: i32,
    fixed: bool,
    busy: Duration,
    blocked: Duration,
    idle: Duration,
    /// Compression-bound windows in a row.
    strikes: u32,
    /// Members whose times are summed, each divided by `members`, and the cores their
    /// compression may keep busy together.
    members: u32,
    core_budget: f64,
}

/// The controller's observation window (compressor wall time).
pub const LEVEL_WINDOW: Duration = Duration::from_millis(500);

/// The adaptive range: above 15 zstd slows by an order of magnitude for about 1 % fewer
/// bytes on disk blocks, which no WAN link this system targets makes worth it.
const ADAPTIVE_MIN: i32 = 1;
const ADAPTIVE_MAX: i32 = 15;
const ADAPTIVE_START: i32 = 3;

impl LevelController {
    /// `fixed`: always use that level. Otherwise start at 3 and adapt within 1..=15.
    pub fn new(fixed: Option<i32>) -> LevelController {
        match fixed {
            Some(l) => LevelController { level: l, min: l, max: l, fixed: true, ..Self::adaptive() },
            None => Self::adaptive(),
        }
    }

    fn adaptive() -> LevelController {
        LevelController {
            level: ADAPTIVE_START,
            min: ADAPTIVE_MIN,
            max: ADAPTIVE_MAX,
            fixed: false,
            busy: Duration::ZERO,
            blocked: Duration::ZERO,
            idle: Duration::ZERO,
            strikes: 0,
            members: 1,
            core_budget: f64::INFINITY,
        }
    }

    /// The next observations come from `members` compressors (each duration divided by
    /// `members`), which together may keep `core_budget` cores busy.
    pub fn set_gang(&mut self, members: u32, core_budget: f64) {
        self.members = members.max(1);
        self.core_budget = core_budget;
    }

    pub fn level(&self) -> i32 {
        self.level
    }

    /// Records one frame: time spent compressing it, blocked handing it to the link (the
    /// queue was full), and waiting for its blocks. Returns the new level when it changed.
    pub fn observe(&mut self, busy: Duration, blocked_on_link: Duration, waiting_for_input: Duration) -> Option<i32> {
        if self.fixed {
            return None;
        }
        self.busy += busy;
        self.blocked += blocked_on_link;
        self.idle += waiting_for_input;
        let window = self.busy + self.blocked + self.idle;
        if window < LEVEL_WINDOW {
            return None;
        }
        let before = self.level;
        let busy_cores = self.busy.as_secs_f64() * f64::from(self.members) / window.as_secs_f64();
        if busy_cores > self.core_budget {
            self.level = (self.level - 1).max(self.min);
            self.strikes = 0;
        } else if self.blocked * 2 > window {
            self.level = (self.level + 2).min(self.max);
            self.strikes = 0;
        } else if self.blocked * 5 > window {
            self.level = (self.level + 1).min(self.max);
            self.strikes = 0;
        } else if self.blocked * 20 < window && self.idle * 5 < window {
            self.strikes += 1;
            if self.strikes >= 2 {
                self.level = (self.level - 1).max(self.min);
                self.strikes = 0;
            }
        } else {
            self.strikes = 0;
        }
        self.busy = Duration::ZERO;
        self.blocked = Duration::ZERO;
        self.idle = Duration::ZERO;
        (self.level != before).then_some(self.level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUTS: [RecordLayout; 2] = [RecordLayout::Named, RecordLayout::Unnamed];

    /// What a receiver parses from `records` sent in `layout`: unnamed whole blocks come as
    /// their content alone.
    fn as_received(records: &[Record], layout: RecordLayout) -> Vec<Record> {
        records
            .iter()
            .map(|r| match (r, layout) {
                (Record::Block { data, .. }, RecordLayout::Unnamed) => Record::Content(data.clone()),
                _ => r.clone(),
            })
            .collect()
    }

    #[test]
    fn records_round_trip_through_zstd() {
        let records = vec![
            Record::Block { fp: Fingerprint([1; 16]), data: vec![7; 4096] },
            Record::Gone(Fingerprint([2; 16])),
            Record::Block { fp: Fingerprint([3; 16]), data: (0..4096).map(|i| (i % 256) as u8).collect() },
        ];
        for layout in LAYOUTS {
            let mut raw = Vec::new();
            encode_records(&records, layout, &mut raw);
            let frame = compress(&raw, 3);
            assert!(frame.len() < raw.len() / 4);
            assert_eq!(decode_frame(raw.len() as u32, &frame, 4096, layout).unwrap(), as_received(&records, layout));
            assert!(decode_frame(raw.len() as u32 - 1, &frame, 4096, layout).is_err(), "length mismatch");
            assert!(decode_frame(raw.len() as u32, &frame[..frame.len() / 2], 4096, layout).is_err());
            assert!(decode_frame(raw.len() as u32, &frame, 8192, layout).is_err(), "wrong block size");
            assert!(decode_frame(u32::MAX, &frame, 4096, layout).is_err());
        }
    }

    #[test]
    fn the_unnamed_layout_leaves_out_the_fingerprint_of_whole_blocks_only() {
        let block = Record::Block { fp: Fingerprint([1; 16]), data: vec![7; 4096] };
        let gone = Record::Gone(Fingerprint([2; 16]));
        let delta = Record::Delta { fp: Fingerprint([4; 16]), reference: Fingerprint([5; 16]), delta: vec![9; 37] };
        let size = |r: &Record, layout| {
            let mut raw = Vec::new();
            encode_records(std::slice::from_ref(r), layout, &mut raw);
            raw.len()
        };
        assert_eq!(size(&block, RecordLayout::Named), 17 + 4096);
        assert_eq!(size(&block, RecordLayout::Unnamed), RecordLayout::Unnamed.block_overhead() + 4096);
        assert_eq!(size(&gone, RecordLayout::Unnamed), size(&gone, RecordLayout::Named));
        assert_eq!(size(&delta, RecordLayout::Unnamed), size(&delta, RecordLayout::Named));
        assert_eq!(RecordLayout::agreed(true), RecordLayout::Unnamed);
        assert_eq!(RecordLayout::agreed(false), RecordLayout::Named);
    }

    /// Delta records round-trip, and random or damaged record bytes are an error, never a
    /// panic or an allocation past the input (a deterministic fuzz loop: it runs in every
    /// test run; the parser is also what a fuzzer would target).
    #[test]
    fn delta_records_round_trip_and_garbage_is_refused() {
        let records = vec![
            Record::Delta { fp: Fingerprint([4; 16]), reference: Fingerprint([5; 16]), delta: vec![9; 37] },
            Record::Block { fp: Fingerprint([1; 16]), data: vec![7; 4096] },
            Record::Delta { fp: Fingerprint([6; 16]), reference: Fingerprint([7; 16]), delta: Vec::new() },
            Record::Gone(Fingerprint([2; 16])),
        ];
        for layout in LAYOUTS {
            let expected = as_received(&records, layout);
            let mut raw = Vec::new();
            encode_records(&records, layout, &mut raw);
            assert_eq!(parse_records(&raw, 4096, layout).unwrap(), expected);
            for cut in 0..raw.len() {
                // A cut parses only at a record boundary, as the records before it.
                if let Ok(parsed) = parse_records(&raw[..cut], 4096, layout) {
                    assert_eq!(parsed[..], expected[..parsed.len()], "a cut at {cut}");
                }
            }
            let mut long = Vec::new();
            encode_records(&[Record::Delta { fp: Fingerprint([1; 16]), reference: Fingerprint([2; 16]), delta: vec![0; 5000] }], layout, &mut long);
            assert!(parse_records(&long, 4096, layout).is_err(), "a delta longer than a block");
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            for round in 0..20_000 {
                let mut bytes = raw.clone();
                for _ in 0..(round % 8 + 1) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let at = (x % bytes.len() as u64) as usize;
                    bytes[at] = (x >> 32) as u8;
                }
                bytes.truncate((x >> 40) as usize % (bytes.len() + 1));
                if let Ok(parsed) = parse_records(&bytes, 4096, layout) {
                    let size: usize = parsed
                        .iter()
                        .map(|r| match r {
                            Record::Block { data, .. } | Record::Content(data) => data.len(),
                            Record::Delta { delta, .. } => delta.len(),
                            Record::Gone(_) => 0,
                        })
                        .sum();
                    assert!(size <= bytes.len());
                }
            }
        }
    }

    #[test]
    fn level_follows_the_bottleneck() {
        let ms = Duration::from_millis;
        let mut c = LevelController::new(None);
        // Link-bound: the compressor waits for the link most of each window.
        for _ in 0..20 {
            c.observe(ms(10), ms(40), ms(0));
        }
        assert_eq!(c.level(), 7, "two windows of a slow link: two levels up each");
        for _ in 0..100 {
            c.observe(ms(10), ms(15), ms(0));
        }
        assert_eq!(c.level(), 15, "capped");
        // One window of CPU contention does not lower it; two in a row lower it by one.
        for _ in 0..10 {
            c.observe(ms(50), ms(0), ms(0));
        }
        assert_eq!(c.level(), 15, "one busy window is not enough");
        for _ in 0..10 {
            c.observe(ms(50), ms(0), ms(0));
        }
        assert_eq!(c.level(), 14);
        // Waiting for blocks to compress says nothing about the link.
        for _ in 0..100 {
            c.observe(ms(5), ms(0), ms(45));
        }
        assert_eq!(c.level(), 14);
        for _ in 0..400 {
            c.observe(ms(50), ms(0), ms(0));
        }
        assert_eq!(c.level(), 1, "compression-bound for long: fastest level");
        let mut f = LevelController::new(Some(7));
        assert_eq!(f.observe(Duration::from_secs(1), Duration::ZERO, Duration::ZERO), None);
        assert_eq!(f.level(), 7);
    }

    #[test]
    fn a_gang_over_its_core_budget_lowers_the_level_even_when_blocked_on_the_link() {
        let ms = Duration::from_millis;
        let mut c = LevelController::new(None);
        for _ in 0..20 {
            c.observe(ms(10), ms(40), ms(0));
        }
        assert_eq!(c.level(), 7);
        // Four members, each compressing 60 % of the time (2.4 cores) and blocked the rest,
        // on a budget of one core: down one level per window.
        c.set_gang(4, 1.0);
        for _ in 0..10 {
            c.observe(ms(60) / 4, ms(40) / 4, ms(0));
            c.observe(ms(60) / 4, ms(40) / 4, ms(0));
            c.observe(ms(60) / 4, ms(40) / 4, ms(0));
            c.observe(ms(60) / 4, ms(40) / 4, ms(0));
        }
        assert_eq!(c.level(), 5, "two windows over the budget");
        // Within the budget (0.8 cores) and blocked on the link: up again.
        for _ in 0..10 {
            for _ in 0..4 {
                c.observe(ms(20) / 4, ms(80) / 4, ms(0));
            }
        }
        assert_eq!(c.level(), 9);
    }
}
