//! The codec: frames to messages and back, refusing bad input before allocating for it.

use serde::{Deserialize, Serialize};

use cas_store::Fingerprint;

use super::*;

/// SWITCHED's tag, for the writer that logs when the answer leaves.
pub(crate) const SWITCHED_TAG: u8 = tag::SWITCHED;
/// SWITCH's tag, for the source's writer, which logs when it leaves.
pub(crate) const SWITCH_TAG: u8 = tag::SWITCH;

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
    pub const READ: u8 = 16;
    pub const READ_DATA: u8 = 17;
    pub const DATA_STREAM: u8 = 18;
    pub const REF_QUERY: u8 = 19;
    pub const REF_HELD: u8 = 20;
    pub const REFETCH: u8 = 21;
    pub const WANT_LISTED: u8 = 22;
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
    if !(tag::HELLO..=tag::WANT_LISTED).contains(&h[0]) {
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

/// A bitmap: its length in bits (u32 BE), then bit i at `byte[i / 8] & 1 << (i % 8)`.
fn put_bits(out: &mut Vec<u8>, flags: &[bool]) {
    out.extend_from_slice(&(flags.len() as u32).to_be_bytes());
    let mut bits = vec![0u8; flags.len().div_ceil(8)];
    for (i, _) in flags.iter().enumerate().filter(|(_, f)| **f) {
        bits[i / 8] |= 1 << (i % 8);
    }
    out.extend_from_slice(&bits);
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
        Message::DataStream { stream, raw_len, frame } => {
            payload.reserve(5 + frame.len());
            payload.push(*stream);
            payload.extend_from_slice(&raw_len.to_be_bytes());
            payload.extend_from_slice(frame);
            tag::DATA_STREAM
        }
        Message::Read { id, offset, length } => {
            payload.extend_from_slice(&id.to_be_bytes());
            payload.extend_from_slice(&offset.to_be_bytes());
            payload.extend_from_slice(&length.to_be_bytes());
            tag::READ
        }
        Message::ReadData { id, result } => {
            payload.extend_from_slice(&id.to_be_bytes());
            match result {
                Ok(data) => {
                    payload.push(0);
                    payload.extend_from_slice(data);
                }
                Err(why) => {
                    payload.push(1);
                    payload.extend_from_slice(why.as_bytes());
                }
            }
            tag::READ_DATA
        }
        Message::RefQuery { id, refs } => {
            payload.extend_from_slice(&id.to_be_bytes());
            put_fps(&mut payload, refs);
            tag::REF_QUERY
        }
        Message::RefHeld { id, held } => {
            payload.extend_from_slice(&id.to_be_bytes());
            put_bits(&mut payload, held);
            tag::REF_HELD
        }
        Message::WantListed { seq, wanted } => {
            payload.extend_from_slice(&seq.to_be_bytes());
            put_bits(&mut payload, wanted);
            tag::WANT_LISTED
        }
        Message::Refetch(fps) => {
            put_fps(&mut payload, fps);
            tag::REFETCH
        }
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
    /// A bitmap of at most [`MAX_LIST`] bits (see `put_bits`).
    fn bits(&mut self) -> Result<Vec<bool>, ProtocolError> {
        let n = self.u32()? as usize;
        if n > MAX_LIST {
            return Err(malformed(self.what, format!("{n} bits is over the limit")));
        }
        let bits = self.take(n.div_ceil(8))?;
        Ok((0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect())
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
        tag::DATA_STREAM => {
            let mut c = Cursor { buf: payload, what: "DATA_STREAM" };
            let stream = c.u8()?;
            if crate::stream::StreamId::from_u8(stream).is_none() {
                return Err(malformed("DATA_STREAM", format!("stream {stream}")));
            }
            let raw_len = c.u32()?;
            if raw_len as usize > MAX_RAW_DATA {
                return Err(malformed("DATA_STREAM", format!("{raw_len} bytes decompressed is over the limit")));
            }
            Ok(Message::DataStream { stream, raw_len, frame: c.buf.to_vec() })
        }
        tag::READ => {
            let mut c = Cursor { buf: payload, what: "READ" };
            let (id, offset, length) = (c.u64()?, c.u64()?, c.u32()?);
            c.done()?;
            if length > MAX_READ {
                return Err(malformed("READ", format!("{length} bytes is over the limit")));
            }
            Ok(Message::Read { id, offset, length })
        }
        tag::READ_DATA => {
            let mut c = Cursor { buf: payload, what: "READ_DATA" };
            let id = c.u64()?;
            let result = match c.u8()? {
                0 if c.buf.len() <= MAX_READ as usize => Ok(c.buf.to_vec()),
                0 => return Err(malformed("READ_DATA", "more data than a READ asks for")),
                1 => Err(String::from_utf8_lossy(c.buf).into_owned()),
                k => return Err(malformed("READ_DATA", format!("status {k}"))),
            };
            Ok(Message::ReadData { id, result })
        }
        tag::REF_QUERY => {
            let mut c = Cursor { buf: payload, what: "REF_QUERY" };
            let id = c.u64()?;
            let refs = c.fps()?;
            c.done()?;
            Ok(Message::RefQuery { id, refs })
        }
        tag::REF_HELD => {
            let mut c = Cursor { buf: payload, what: "REF_HELD" };
            let id = c.u64()?;
            let held = c.bits()?;
            c.done()?;
            Ok(Message::RefHeld { id, held })
        }
        tag::WANT_LISTED => {
            let mut c = Cursor { buf: payload, what: "WANT_LISTED" };
            let seq = c.u64()?;
            let wanted = c.bits()?;
            c.done()?;
            Ok(Message::WantListed { seq, wanted })
        }
        tag::REFETCH => {
            let mut c = Cursor { buf: payload, what: "REFETCH" };
            let fps = c.fps()?;
            c.done()?;
            Ok(Message::Refetch(fps))
        }
        other => Err(ProtocolError::UnknownType(other)),
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
            read_through: true,
            data_stream: true,
            gang: Some("g1".into()),
            delta: true,
            unnamed_blocks: true,
            want_listed: true,
        }));
        round_trip(Message::Accept(AcceptInfo { processed: 7, switched: true, rebuild: false, data_stream: true, delta: true, unnamed_blocks: true }));
        round_trip(Message::RefQuery { id: 3, refs: vec![fp(6), fp(7)] });
        round_trip(Message::RefHeld { id: 3, held: vec![true, false, false, true, true, false, true, false, true] });
        round_trip(Message::RefHeld { id: 4, held: vec![] });
        round_trip(Message::WantListed { seq: 9, wanted: vec![false, true, true, false, false, false, false, false, true, true] });
        round_trip(Message::WantListed { seq: 0, wanted: vec![] });
        round_trip(Message::Refetch(vec![fp(8)]));
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
        round_trip(Message::Read { id: 9, offset: 4096, length: 512 });
        round_trip(Message::DataStream { stream: 1, raw_len: 10, frame: vec![4, 5] });
        round_trip(Message::ReadData { id: 9, result: Ok(vec![7; 512]) });
        round_trip(Message::ReadData { id: 10, result: Err("gone".into()) });
    }

    /// Random payloads for every message type: decoded or refused, never a panic (a
    /// deterministic fuzz loop that runs with the tests).
    #[test]
    fn random_payloads_never_panic() {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let t = (next() % 24) as u8;
            let len = (next() % 80) as usize;
            let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let _ = decode(t, &payload);
        }
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
        let mut huge_read = vec![0u8; 16];
        huge_read.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(tag::READ, &huge_read).is_err(), "READ over the limit");
        assert!(decode(tag::READ_DATA, &[0, 0, 0, 0, 0, 0, 0, 1, 5]).is_err(), "bad READ_DATA status");
        assert!(decode(tag::DATA_STREAM, &[2, 0, 0, 0, 1]).is_err(), "unknown stream");
        assert!(decode(tag::DATA_STREAM, &[0, 0xff, 0xff, 0xff, 0xff]).is_err(), "huge raw length");
        assert!(decode(tag::REF_HELD, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0xff]).is_err(), "nine answers in one byte");
        assert!(decode(tag::REF_HELD, &[0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err(), "huge count");
        assert!(decode(tag::WANT_LISTED, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 9, 0xff]).is_err(), "nine bits in one byte");
        assert!(decode(tag::WANT_LISTED, &[0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err(), "huge count");
        assert!(decode(tag::WANT_LISTED, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0]).is_err(), "trailing bytes");
        assert!(decode(tag::REF_QUERY, &[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]).is_err(), "short fingerprint");
        let mut g = greeting();
        assert!(check_greeting(&g).is_ok());
        g[9] = 9;
        assert_eq!(check_greeting(&g), Err(ProtocolError::Version { peer: 9, ours: VERSION }));
        g[0] = b'X';
        assert_eq!(check_greeting(&g), Err(ProtocolError::BadPreamble));
    }
}
