//! One zstd stream per link connection and direction of urgency.
//!
//! Compressing each ~1 MiB DATA frame on its own throws away the redundancy between frames
//! (the same library in two packages, a config file in every VM). Here one compression
//! context lives as long as the connection, with a long window, and each DATA_STREAM frame is
//! the stream *flushed* at the frame's end: the peer decodes it as soon as it arrives, and
//! later frames may reference everything earlier in the window.
//!
//! * Two streams per connection: background data and on-demand (urgent) data. The writer
//!   sends urgent frames ahead of queued background ones, and frames of one stream must
//!   reach the decoder in the order they were encoded, so each queue has its own stream.
//! * The compressor runs in zstd's multithreaded mode (see [`STREAM_WORKERS`]), which also
//!   lets the level change between frames without ending the stream; long-distance matching
//!   finds repeats across the whole window cheaply.
//! * A new connection starts both streams afresh on both sides (frames in flight when a link
//!   drops are lost with it; their blocks are asked for again).
//!
//! Memory per connection: the source's background context holds its window (128 MiB) plus
//! match tables, the destination's decoder its window; `memory()` reports what zstd holds.

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

use crate::protocol::ProtocolError;

/// The background stream's window: 128 MiB.
pub const BACKGROUND_WINDOW_LOG: u32 = 27;
/// The urgent stream carries few, small frames: 8 MiB.
pub const URGENT_WINDOW_LOG: u32 = 23;

/// Which stream of a connection a DATA_STREAM frame continues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamId {
    Background = 0,
    Urgent = 1,
}

impl StreamId {
    pub fn from_u8(v: u8) -> Option<StreamId> {
        match v {
            0 => Some(StreamId::Background),
            1 => Some(StreamId::Urgent),
            _ => None,
        }
    }

    pub fn window_log(self) -> u32 {
        match self {
            StreamId::Background => BACKGROUND_WINDOW_LOG,
            StreamId::Urgent => URGENT_WINDOW_LOG,
        }
    }
}

/// zstd refused an operation (out of memory, or a bad parameter).
#[derive(Debug, thiserror::Error)]
#[error("zstd stream: {0}")]
pub struct StreamError(&'static str);

fn zstd_error(code: usize) -> StreamError {
    StreamError(zstd_safe::get_error_name(code))
}

/// zstd worker threads per stream. Frames are compressed one at a time (each waits for its
/// flush), so one worker would do, but zstd's pool of one thread refuses the next frame's job
/// until the worker is back in the pool, and the caller then retries in a loop instead of
/// waiting (zstd's `ZSTDMT_createCompressionJob` / `POOL_tryAdd`). When the two cores are
/// busy the worker is often preempted right after it hands over its last output (the woken
/// caller takes its core), and the caller spins for the rest of a time slice: `perf` put 23 %
/// of a gang source's CPU in zstd's mutex calls. With a second thread the pool takes the job
/// at once. Three streams compressing at once on these two cores (`cargo run --release -p
/// migration --example stream_workers -- FILE`, FILE the 198 MiB bookworm-web lacks in the
/// paper neighbourhood, level 4): 3.4-3.8 CPU seconds and 1.9 s with two workers against 4.8
/// and 2.5 s with one, the same bytes.
pub const STREAM_WORKERS: u32 = 2;

/// The compressing end of a stream.
pub struct StreamEncoder {
    cctx: CCtx<'static>,
    level: i32,
}

impl std::fmt::Debug for StreamEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEncoder").field("level", &self.level).field("memory", &self.memory()).finish()
    }
}

impl StreamEncoder {
    pub fn new(stream: StreamId, level: i32) -> Result<StreamEncoder, StreamError> {
        StreamEncoder::with_workers(stream, level, STREAM_WORKERS)
    }

    /// [`StreamEncoder::new`] with another number of zstd worker threads (at least 1: the
    /// level changes mid-stream only in multithreaded mode); the output is the same
    /// whatever the number (`examples/stream_workers.rs` compares their CPU time).
    pub fn with_workers(stream: StreamId, level: i32, workers: u32) -> Result<StreamEncoder, StreamError> {
        let mut cctx = CCtx::try_create().ok_or(StreamError("cannot allocate a compression context"))?;
        for p in [
            CParameter::CompressionLevel(level),
            CParameter::WindowLog(stream.window_log()),
            CParameter::EnableLongDistanceMatching(true),
            CParameter::ChecksumFlag(false),
            CParameter::NbWorkers(workers.max(1)),
        ] {
            cctx.set_parameter(p).map_err(zstd_error)?;
        }
        Ok(StreamEncoder { cctx, level })
    }

    /// Compresses `raw` as the next piece of the stream at `level`, flushed: the returned
    /// bytes decode whole on their own, given everything before them.
    pub fn encode(&mut self, raw: &[u8], level: i32) -> Result<Vec<u8>, StreamError> {
        if level != self.level {
            // Takes effect from the next job: multithreaded mode allows it mid-stream.
            self.cctx.set_parameter(CParameter::CompressionLevel(level)).map_err(zstd_error)?;
            self.level = level;
        }
        let mut out: Vec<u8> = Vec::with_capacity(zstd_safe::compress_bound(raw.len()) + 512);
        let mut input = InBuffer::around(raw);
        loop {
            if out.capacity() - out.len() < 4096 {
                out.reserve(64 << 10);
            }
            let pos = out.len();
            let mut output = OutBuffer::around_pos(&mut out, pos);
            let remaining = self.cctx.compress_stream2(&mut output, &mut input, zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush).map_err(zstd_error)?;
            drop(output);
            if input.pos() == raw.len() && remaining == 0 {
                return Ok(out);
            }
        }
    }

    /// Bytes zstd holds for this stream.
    pub fn memory(&self) -> usize {
        self.cctx.sizeof()
    }
}

/// The decompressing end of a stream.
pub struct StreamDecoder {
    dctx: DCtx<'static>,
    /// The last piece decoded: reused, so that a fresh megabyte is not faulted in (and
    /// zeroed by the kernel) for every frame.
    out: Vec<u8>,
}

impl std::fmt::Debug for StreamDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDecoder").field("memory", &self.memory()).finish()
    }
}

impl StreamDecoder {
    /// A decoder that accepts at most `stream`'s window (a peer cannot make it allocate more).
    pub fn new(stream: StreamId) -> Result<StreamDecoder, StreamError> {
        let mut dctx = DCtx::try_create().ok_or(StreamError("cannot allocate a decompression context"))?;
        dctx.set_parameter(DParameter::WindowLogMax(stream.window_log())).map_err(zstd_error)?;
        Ok(StreamDecoder { dctx, out: Vec::new() })
    }

    /// Decodes the next piece of the stream: exactly `raw_len` bytes must come out of exactly
    /// `frame` (the caller bounds `raw_len`). The bytes stay valid until the next call.
    pub fn decode(&mut self, frame: &[u8], raw_len: usize) -> Result<&[u8], ProtocolError> {
        let bad = |why: String| ProtocolError::Malformed { what: "DATA_STREAM", why };
        let out = &mut self.out;
        out.clear();
        out.reserve(raw_len);
        let mut input = InBuffer::around(frame);
        while input.pos() < frame.len() {
            let (before_in, before_out) = (input.pos(), out.len());
            let mut output = OutBuffer::around_pos(out, before_out);
            self.dctx.decompress_stream(&mut output, &mut input).map_err(|c| bad(format!("zstd: {}", zstd_safe::get_error_name(c))))?;
            drop(output);
            if input.pos() == before_in && out.len() == before_out {
                return Err(bad(format!("more than the {raw_len} bytes announced")));
            }
        }
        // Everything the frame holds must be out now: a byte still inside the decoder would
        // mean the frame decodes to more than announced (or was not flushed).
        let mut probe: Vec<u8> = Vec::with_capacity(1);
        let mut rest = OutBuffer::around(&mut probe);
        self.dctx.decompress_stream(&mut rest, &mut InBuffer::around(&[])).map_err(|c| bad(format!("zstd: {}", zstd_safe::get_error_name(c))))?;
        let extra = rest.pos();
        if extra > 0 || out.len() != raw_len {
            return Err(bad(format!("decoded to {}{} bytes, {raw_len} announced", out.len(), if extra > 0 { "+" } else { "" })));
        }
        Ok(&self.out[..])
    }

    pub fn memory(&self) -> usize {
        self.dctx.sizeof() + self.out.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pseudo-random bytes (incompressible on their own).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn frames_decode_in_order_and_later_frames_reuse_earlier_ones() {
        let mut enc = StreamEncoder::new(StreamId::Background, 3).unwrap();
        let mut dec = StreamDecoder::new(StreamId::Background).unwrap();
        let first = noise(1 << 20, 7);
        let a = enc.encode(&first, 3).unwrap();
        assert!(a.len() > first.len() * 9 / 10, "noise does not compress on its own");
        // The same content two frames later (another VM's copy of a file), at another level.
        let filler = vec![5u8; 1 << 20];
        let b = enc.encode(&filler, 5).unwrap();
        let c = enc.encode(&first, 5).unwrap();
        assert!(c.len() < first.len() / 20, "a repeat from an earlier frame costs little: {} bytes", c.len());
        assert_eq!(dec.decode(&a, first.len()).unwrap(), &first[..]);
        assert_eq!(dec.decode(&b, filler.len()).unwrap(), &filler[..]);
        assert_eq!(dec.decode(&c, first.len()).unwrap(), &first[..]);
        assert!(enc.memory() > 0 && dec.memory() > 0);
    }

    #[test]
    fn a_lying_length_or_a_damaged_frame_is_an_error() {
        let data = noise(64 << 10, 3);
        let mut enc = StreamEncoder::new(StreamId::Urgent, 3).unwrap();
        let f = enc.encode(&data, 3).unwrap();
        assert!(StreamDecoder::new(StreamId::Urgent).unwrap().decode(&f, data.len() - 1).is_err(), "more than announced");
        assert!(StreamDecoder::new(StreamId::Urgent).unwrap().decode(&f, data.len() + 1).is_err(), "less than announced");
        assert!(StreamDecoder::new(StreamId::Urgent).unwrap().decode(&f[..f.len() / 2], data.len()).is_err(), "truncated");
        assert!(StreamDecoder::new(StreamId::Urgent).unwrap().decode(&[0xff; 64], 10).is_err(), "garbage");
        // A frame of the background stream's window is refused by a decoder bounded smaller.
        let mut big = StreamEncoder::new(StreamId::Background, 3).unwrap();
        let mut g = big.encode(&noise(1 << 20, 1), 3).unwrap();
        g.extend(big.encode(&noise(1 << 20, 1), 3).unwrap());
        assert!(StreamDecoder::new(StreamId::Urgent).unwrap().decode(&g, 2 << 20).is_err(), "window over the decoder's limit");
    }
}
