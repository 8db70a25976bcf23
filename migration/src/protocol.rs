//! The migration wire protocol: a pure codec, no I/O.
//!
//! # Connection
//! The source server connects to the destination server's migration listener. Both send an
//! 8-byte preamble `CASMIGR\0` and a big-endian u16 protocol version, then frames:
//!
//! ```text
//! frame   = type (u8) | payload length (u32 BE) | payload
//! ```
//!
//! A payload longer than [`MAX_PAYLOAD`] is refused before anything is allocated for it.
//! Control messages carry JSON (unknown fields are ignored); bulk messages are binary.
//!
//! # Message diagram (one migration)
//! ```text
//! source                                              destination
//!   preamble+version  ------------------------------>
//!                     <------------------------------  preamble+version
//!   HELLO {id,disk,size,block_size,algorithm,mode} >  checks, creates the incoming disk
//!                     <------------------------------  ACCEPT {processed:0} | ERROR
//!   FINGERPRINTS (round 0: the map snapshot) ------->  has_many: hits mapped at once
//!                     <------------------------------  ACK n (after each sequenced message)
//!                     <------------------------------  WANT (fingerprints it lacks, once each)
//!   DATA (zstd frames of block records) ------------>  verify fingerprint, store, map
//!   ROUND_END 0 ------------------------------------>
//!                     <------------------------------  ROUND_DONE 0 (everything wanted arrived)
//!   FINGERPRINTS/ROUND_END (dirty rounds) ---------->  ... (as round 0; with defer_dirty,
//!                     <------------------------------  ROUND_DONE k   only mapped: no WANT)
//!   [source export frozen; background DATA held]
//!   FINGERPRINTS (final dirty blocks), ROUND_END last
//!   SWITCH ----------------------------------------->  export becomes writable (post-copy)
//!                     <------------------------------  SWITCHED {report}
//!                     <------------------------------  WANT (what deferred rounds left)
//!                     <------------------------------  FETCH (a read needs these now)
//!   DATA (on-demand ahead of background) ----------->
//!                     <------------------------------  COMPLETE {report}: every block local
//!   BYE -------------------------------------------->  [source releases its disk]
//! ```
//! The switch-over's pause is the final listing's round trip, so everything before the freeze
//! works to keep that listing small and the link empty: dirty rounds repeat while the dirty
//! set shrinks (with `defer_dirty` they carry fingerprints only, so they take milliseconds),
//! and from the freeze until SWITCH is written the source sends no background DATA (a deep
//! queue on a WAN link would otherwise hold SWITCH behind megabytes of data).
//!
//! A *plan* (mode `plan`) sends round 0's fingerprints and ROUND_END, and the destination
//! answers PLAN with what it would need, changing nothing.
//!
//! # Resume (a lost link, or a restart of either side)
//! FINGERPRINTS, ROUND_END, SWITCH and BYE are *sequenced*: the destination counts those it
//! has applied and acknowledges the count (ACK); the source keeps the unacknowledged ones.
//! Everything else is regenerated from state, so nothing is lost with a connection:
//! ```text
//!   HELLO {same id, resume:true, rebuild} ---------->  finds the parked migration
//!                     <------------------------------  ACCEPT {processed n, switched, rebuild}
//!                     <------------------------------  FETCH (every block a reader waits for)
//!                     <------------------------------  WANT (every fingerprint still missing)
//!                     <------------------------------  ROUND_DONE / SWITCHED again if already sent
//!   sequenced messages from n on (or, with rebuild,
//!   the whole map again with zero runs) ----------->  blocks it holds are not asked for again
//! ```
//! Only data in flight when the link dropped crosses twice: what arrived was verified and
//! stored, and is no longer wanted. A destination restarted before the switch-over has its
//! partial disk but not its place in the rounds, so it answers `rebuild`; a source restarted
//! before the switch-over asks for one. A source that gave up reconnecting keeps its state
//! (`interrupted`) until an operator resumes or cancels it; cancel sends ERROR, on which the
//! destination deletes its partial disk.
//!
//! # State machines
//! Source: `Hello -> Rounds(k) -> Frozen -> FinalRound -> Switching -> PostCopy -> Done`.
//! Destination: `Hello -> Receiving -> Switched (post-copy) -> Complete`. Either side sends
//! ERROR and closes on a violation; a destination that fails before SWITCHED deletes its
//! partial disk, and the source, still authoritative, thaws its export. A lost link is not a
//! violation: both sides keep their state (the destination *parks* it under the migration
//! id) and the source reconnects with backoff. A source frozen for the switch-over never
//! thaws once SWITCH may have reached the destination: only the destination can say whether
//! it switched, so the source waits for it.
//!
//! # Version policy
//! [`VERSION`] changes only when a message changes meaning or layout. Peers must speak the
//! same version; a mismatch is answered with ERROR naming both versions. New optional JSON
//! fields and new message types that an older peer never receives do not change it.
//! Version 2 added resume (ACCEPT's payload, ACK, HELLO's resume fields).

use serde::{Deserialize, Serialize};

use cas_store::Fingerprint;

pub const PREAMBLE: [u8; 8] = *b"CASMIGR\0";
pub const VERSION: u16 = 2;
/// Preamble and version.
pub const GREETING_LEN: usize = 10;
pub const HEADER_LEN: usize = 5;
/// Largest frame payload (a DATA frame holds at most a few MiB of compressed blocks).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Largest decompressed DATA payload.
pub const MAX_RAW_DATA: usize = 16 << 20;
/// Most fingerprints in one WANT or FETCH frame, and entries in one FINGERPRINTS frame.
pub const MAX_LIST: usize = 1 << 18;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("not a migration peer (bad preamble)")]
    BadPreamble,
    #[error("peer speaks migration protocol version {peer}, this server speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("frame of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("unknown message type {0}")]
    UnknownType(u8),
    #[error("malformed {what}: {why}")]
    Malformed { what: &'static str, why: String },
}

fn malformed(what: &'static str, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed { what, why: why.into() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Migrate,
    Plan,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub migration_id: String,
    pub disk: String,
    pub size: u64,
    pub block_size: u32,
    pub algorithm: String,
    pub mode: Mode,
    /// This connection continues migration `migration_id` after a lost link or a restart.
    #[serde(default)]
    pub resume: bool,
    /// The source lost its place (it restarted): it lists the whole disk again, zero runs
    /// included, and the destination keeps what it already holds.
    #[serde(default)]
    pub rebuild: bool,
    /// Rounds after round 0 (the final one included) are listings only: the destination maps
    /// what it already holds and leaves the rest missing until the switch-over, when it asks
    /// for it as post-copy. A block rewritten while the VM runs then crosses once, with its
    /// last content, and the source can repeat cheap rounds until the listing left for the
    /// freeze is small. A destination that predates this field asks at once, which is still
    /// correct (the rounds then wait for the data).
    #[serde(default)]
    pub defer_dirty: bool,
}

/// The destination's answer to HELLO: where a resumed migration continues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptInfo {
    /// Sequenced messages (see [`Message::is_sequenced`]) the destination has applied; the
    /// source resends those after them.
    pub processed: u64,
    /// The destination already serves the disk.
    pub switched: bool,
    /// The destination lost its place (it restarted before the switch-over) or the source
    /// asked for it: the source lists the whole disk again from a fresh snapshot.
    pub rebuild: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    pub message: String,
}

/// A run of consecutive blocks in a FINGERPRINTS frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Run {
    /// Blocks `first..first + fps.len()` hold these fingerprints.
    Mapped { first: u64, fps: Vec<Fingerprint> },
    /// Blocks `first..first + count` read as zeros.
    Zero { first: u64, count: u64 },
}

impl Run {
    pub fn blocks(&self) -> u64 {
        match self {
            Run::Mapped { fps, .. } => fps.len() as u64,
            Run::Zero { count, .. } => *count,
        }
    }
}

/// What the destination reports about itself (in SWITCHED, COMPLETE and PLAN).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestReport {
    /// Blocks the source listed as allocated.
    pub blocks_listed: u64,
    /// Blocks whose content the destination already had from other disks.
    pub neighbour_hits: u64,
    /// Blocks whose content occurs earlier in the same disk (crossed once).
    pub duplicates: u64,
    /// Blocks that read as zeros (never cross).
    pub zero_blocks: u64,
    /// Distinct fingerprints the destination asked for.
    pub wanted: u64,
    /// Distinct blocks received before the switch-over, on demand after it, in the
    /// background after it.
    pub received_before_switch: u64,
    pub fetched_on_demand: u64,
    pub fetched_background: u64,
    /// Fingerprints the source no longer had (the block changed; a later round resent it).
    pub gone: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    Accept(AcceptInfo),
    /// The destination has applied this many sequenced messages (the source may forget them).
    Ack {
        processed: u64,
    },
    Fingerprints {
        round: u32,
        runs: Vec<Run>,
    },
    RoundEnd {
        round: u32,
        last: bool,
    },
    Want(Vec<Fingerprint>),
    Fetch(Vec<Fingerprint>),
    /// A zstd frame of block records (see [`crate::compress`]); `raw_len` is its size
    /// decompressed.
    Data {
        raw_len: u32,
        frame: Vec<u8>,
    },
    RoundDone {
        round: u32,
    },
    Switch,
    Switched(DestReport),
    Complete(DestReport),
    Plan(DestReport),
    Error(ErrorMessage),
    Bye,
}

mod tag {
    pub const HELLO: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const FINGERPRINTS: u8 = 3;
    pub const ROUND_END: u8 = 4;
    pub const WANT: u8 = 5;
    pub const FETCH: u8 = 6;
    pub const DATA: u8 = 7;
    pub const ROUND_DONE: u8 = 8;
    pub const SWITCH: u8 = 9;
    pub const SWITCHED: u8 = 10;
    pub const COMPLETE: u8 = 11;
    pub const PLAN: u8 = 12;
    pub const ERROR: u8 = 13;
    pub const BYE: u8 = 14;
    pub const ACK: u8 = 15;
}

pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[..8].copy_from_slice(&PREAMBLE);
    g[8..].copy_from_slice(&VERSION.to_be_bytes());
    g
}

/// Checks a peer's greeting.
pub fn check_greeting(g: &[u8; GREETING_LEN]) -> Result<(), ProtocolError> {
    if g[..8] != PREAMBLE {
        return Err(ProtocolError::BadPreamble);
    }
    let peer = u16::from_be_bytes([g[8], g[9]]);
    if peer != VERSION {
        return Err(ProtocolError::Version { peer, ours: VERSION });
    }
    Ok(())
}

/// Parses a frame header into (type, payload length), refusing oversized frames.
pub fn decode_header(h: &[u8; HEADER_LEN]) -> Result<(u8, usize), ProtocolError> {
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    if !(tag::HELLO..=tag::ACK).contains(&h[0]) {
        return Err(ProtocolError::UnknownType(h[0]));
    }
    Ok((h[0], len))
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("protocol structs serialise")
}

fn put_fps(out: &mut Vec<u8>, fps: &[Fingerprint]) {
    out.extend_from_slice(&(fps.len() as u32).to_be_bytes());
    for fp in fps {
        out.extend_from_slice(&fp.0);
    }
}

/// Encodes a message as a whole frame (header and payload).
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut payload = Vec::new();
    let t = match msg {
        Message::Hello(h) => {
            payload = json(h);
            tag::HELLO
        }
        Message::Accept(info) => {
            payload = json(info);
            tag::ACCEPT
        }
        Message::Ack { processed } => {
            payload.extend_from_slice(&processed.to_be_bytes());
            tag::ACK
        }
        Message::Fingerprints { round, runs } => {
            payload.extend_from_slice(&round.to_be_bytes());
            for run in runs {
                match run {
                    Run::Mapped { first, fps } => {
                        payload.push(0);
                        payload.extend_from_slice(&first.to_be_bytes());
                        put_fps(&mut payload, fps);
                    }
                    Run::Zero { first, count } => {
                        payload.push(1);
                        payload.extend_from_slice(&first.to_be_bytes());
                        payload.extend_from_slice(&count.to_be_bytes());
                    }
                }
            }
            tag::FINGERPRINTS
        }
        Message::RoundEnd { round, last } => {
            payload.extend_from_slice(&round.to_be_bytes());
            payload.push(u8::from(*last));
            tag::ROUND_END
        }
        Message::Want(fps) => {
            put_fps(&mut payload, fps);
            tag::WANT
        }
        Message::Fetch(fps) => {
            put_fps(&mut payload, fps);
            tag::FETCH
        }
        Message::Data { raw_len, frame } => {
            payload.reserve(4 + frame.len());
            payload.extend_from_slice(&raw_len.to_be_bytes());
            payload.extend_from_slice(frame);
            tag::DATA
        }
        Message::RoundDone { round } => {
            payload.extend_from_slice(&round.to_be_bytes());
            tag::ROUND_DONE
        }
        Message::Switch => tag::SWITCH,
        Message::Switched(r) => {
            payload = json(r);
            tag::SWITCHED
        }
        Message::Complete(r) => {
            payload = json(r);
            tag::COMPLETE
        }
        Message::Plan(r) => {
            payload = json(r);
            tag::PLAN
        }
        Message::Error(e) => {
            payload = json(e);
            tag::ERROR
        }
        Message::Bye => tag::BYE,
    };
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.push(t);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame
}

/// A cursor over a payload that reports truncation instead of panicking.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(malformed(self.what, "truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn fps(&mut self) -> Result<Vec<Fingerprint>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST || n * 16 > self.buf.len() {
            return Err(malformed(self.what, format!("{n} fingerprints do not fit the frame")));
        }
        Ok((0..n).map(|_| Fingerprint(self.take(16).expect("checked").try_into().expect("16 bytes"))).collect())
    }
    fn done(&self) -> Result<(), ProtocolError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(malformed(self.what, format!("{} trailing bytes", self.buf.len())))
        }
    }
}

fn from_json<T: for<'de> Deserialize<'de>>(what: &'static str, payload: &[u8]) -> Result<T, ProtocolError> {
    serde_json::from_slice(payload).map_err(|e| malformed(what, e.to_string()))
}

/// Decodes a frame's payload, given the type from its header.
pub fn decode(t: u8, payload: &[u8]) -> Result<Message, ProtocolError> {
    let empty = |what: &'static str, m: Message| {
        if payload.is_empty() {
            Ok(m)
        } else {
            Err(malformed(what, "unexpected payload"))
        }
    };
    match t {
        tag::HELLO => Ok(Message::Hello(from_json("HELLO", payload)?)),
        tag::ACCEPT => Ok(Message::Accept(from_json("ACCEPT", payload)?)),
        tag::ACK => {
            let mut c = Cursor { buf: payload, what: "ACK" };
            let processed = c.u64()?;
            c.done()?;
            Ok(Message::Ack { processed })
        }
        tag::FINGERPRINTS => {
            let mut c = Cursor { buf: payload, what: "FINGERPRINTS" };
            let round = c.u32()?;
            let mut runs = Vec::new();
            let mut entries = 0usize;
            while !c.buf.is_empty() {
                let kind = c.u8()?;
                let first = c.u64()?;
                let run = match kind {
                    0 => Run::Mapped { first, fps: c.fps()? },
                    1 => Run::Zero { first, count: c.u64()? },
                    k => return Err(malformed("FINGERPRINTS", format!("run kind {k}"))),
                };
                if first.checked_add(run.blocks()).is_none() {
                    return Err(malformed("FINGERPRINTS", "run past the largest block number"));
                }
                entries += 1;
                if entries > MAX_LIST {
                    return Err(malformed("FINGERPRINTS", "too many runs"));
                }
                runs.push(run);
            }
            Ok(Message::Fingerprints { round, runs })
        }
        tag::ROUND_END => {
            let mut c = Cursor { buf: payload, what: "ROUND_END" };
            let round = c.u32()?;
            let last = match c.u8()? {
                0 => false,
                1 => true,
                b => return Err(malformed("ROUND_END", format!("flag {b}"))),
            };
            c.done()?;
            Ok(Message::RoundEnd { round, last })
        }
        tag::WANT | tag::FETCH => {
            let mut c = Cursor { buf: payload, what: if t == tag::WANT { "WANT" } else { "FETCH" } };
            let fps = c.fps()?;
            c.done()?;
            Ok(if t == tag::WANT { Message::Want(fps) } else { Message::Fetch(fps) })
        }
        tag::DATA => {
            let mut c = Cursor { buf: payload, what: "DATA" };
            let raw_len = c.u32()?;
            if raw_len as usize > MAX_RAW_DATA {
                return Err(malformed("DATA", format!("{raw_len} bytes decompressed is over the limit")));
            }
            Ok(Message::Data { raw_len, frame: c.buf.to_vec() })
        }
        tag::ROUND_DONE => {
            let mut c = Cursor { buf: payload, what: "ROUND_DONE" };
            let round = c.u32()?;
            c.done()?;
            Ok(Message::RoundDone { round })
        }
        tag::SWITCH => empty("SWITCH", Message::Switch),
        tag::SWITCHED => Ok(Message::Switched(from_json("SWITCHED", payload)?)),
        tag::COMPLETE => Ok(Message::Complete(from_json("COMPLETE", payload)?)),
        tag::PLAN => Ok(Message::Plan(from_json("PLAN", payload)?)),
        tag::ERROR => Ok(Message::Error(from_json("ERROR", payload)?)),
        tag::BYE => empty("BYE", Message::Bye),
        other => Err(ProtocolError::UnknownType(other)),
    }
}

impl Message {
    /// Messages from the source that the destination counts and acknowledges: after a lost
    /// link the source resends those the destination had not applied. Everything else is
    /// either regenerated from state on resume (WANT, FETCH, DATA, ROUND_DONE, SWITCHED,
    /// COMPLETE) or belongs to one connection (HELLO, ACCEPT, ERROR).
    pub fn is_sequenced(&self) -> bool {
        matches!(self, Message::Fingerprints { .. } | Message::RoundEnd { .. } | Message::Switch | Message::Bye)
    }

    /// Name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "HELLO",
            Message::Accept(_) => "ACCEPT",
            Message::Ack { .. } => "ACK",
            Message::Fingerprints { .. } => "FINGERPRINTS",
            Message::RoundEnd { .. } => "ROUND_END",
            Message::Want(_) => "WANT",
            Message::Fetch(_) => "FETCH",
            Message::Data { .. } => "DATA",
            Message::RoundDone { .. } => "ROUND_DONE",
            Message::Switch => "SWITCH",
            Message::Switched(_) => "SWITCHED",
            Message::Complete(_) => "COMPLETE",
            Message::Plan(_) => "PLAN",
            Message::Error(_) => "ERROR",
            Message::Bye => "BYE",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let frame = encode(&m);
        let (t, len) = decode_header(frame[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - HEADER_LEN);
        assert_eq!(decode(t, &frame[HEADER_LEN..]).unwrap(), m);
    }

    #[test]
    fn every_message_round_trips() {
        let fp = |b: u8| Fingerprint([b; 16]);
        round_trip(Message::Hello(Hello {
            migration_id: "m1".into(),
            disk: "vm".into(),
            size: 1 << 30,
            block_size: 4096,
            algorithm: "blake3-128".into(),
            mode: Mode::Migrate,
            resume: true,
            rebuild: false,
            defer_dirty: true,
        }));
        round_trip(Message::Accept(AcceptInfo { processed: 7, switched: true, rebuild: false }));
        round_trip(Message::Ack { processed: 1 << 40 });
        round_trip(Message::Fingerprints { round: 3, runs: vec![Run::Mapped { first: 7, fps: vec![fp(1), fp(2)] }, Run::Zero { first: 9, count: 100 }] });
        round_trip(Message::RoundEnd { round: 2, last: true });
        round_trip(Message::Want(vec![fp(3)]));
        round_trip(Message::Fetch(vec![fp(4), fp(5)]));
        round_trip(Message::Data { raw_len: 10, frame: vec![1, 2, 3] });
        round_trip(Message::RoundDone { round: 1 });
        round_trip(Message::Switch);
        round_trip(Message::Switched(DestReport { neighbour_hits: 5, ..Default::default() }));
        round_trip(Message::Complete(DestReport::default()));
        round_trip(Message::Plan(DestReport { wanted: 9, ..Default::default() }));
        round_trip(Message::Error(ErrorMessage { message: "no".into() }));
        round_trip(Message::Bye);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert_eq!(decode_header(&[99, 0, 0, 0, 0]), Err(ProtocolError::UnknownType(99)));
        assert!(matches!(decode_header(&[3, 0xff, 0xff, 0xff, 0xff]), Err(ProtocolError::TooLarge(_))));
        assert!(decode(tag::WANT, &[0, 0, 0, 2, 1, 2, 3]).is_err(), "count larger than the frame");
        assert!(decode(tag::WANT, &[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode(tag::FINGERPRINTS, &[0, 0, 0, 1, 7]).is_err(), "bad run kind");
        let mut overflow = vec![0, 0, 0, 0, 1];
        overflow.extend_from_slice(&u64::MAX.to_be_bytes());
        overflow.extend_from_slice(&2u64.to_be_bytes());
        assert!(decode(tag::FINGERPRINTS, &overflow).is_err(), "run past u64");
        assert!(decode(tag::ROUND_END, &[0, 0, 0, 1, 2]).is_err());
        assert!(decode(tag::HELLO, b"{not json").is_err());
        assert!(decode(tag::ACCEPT, b"x").is_err());
        assert!(decode(tag::ACK, &[0, 0, 1]).is_err(), "short ACK");
        assert!(decode(tag::DATA, &[0xff, 0xff, 0xff, 0xff]).is_err(), "huge raw length");
        let mut g = greeting();
        assert!(check_greeting(&g).is_ok());
        g[9] = 9;
        assert_eq!(check_greeting(&g), Err(ProtocolError::Version { peer: 9, ours: VERSION }));
        g[0] = b'X';
        assert_eq!(check_greeting(&g), Err(ProtocolError::BadPreamble));
    }
}
