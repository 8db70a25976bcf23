//! Frames over an async byte stream, with the bytes counted by kind.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::protocol::{self, Message, GREETING_LEN, HEADER_LEN};
use crate::MigrationError;

/// What crossed the link, in bytes, both directions together.
#[derive(Debug, Default)]
pub struct Traffic {
    /// FINGERPRINTS, WANT and FETCH frames.
    pub fingerprints: AtomicU64,
    /// DATA frames as sent (compressed, with headers).
    pub data_wire: AtomicU64,
    /// Block records in DATA frames before compression.
    pub data_raw: AtomicU64,
    /// Everything else: greetings, HELLO, round markers, reports.
    pub control: AtomicU64,
    /// Sequenced frames sent again after a lost link (the destination had not applied them).
    pub replayed: AtomicU64,
    /// Block records (uncompressed bytes) sent again after a lost link: they were in flight.
    pub resent_raw: AtomicU64,
    /// Connections after the first (reconnections after a lost link or a restart).
    pub reconnects: AtomicU64,
}

/// A copy of [`Traffic`] for reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TrafficReport {
    pub fingerprint_bytes: u64,
    pub data_wire_bytes: u64,
    pub data_raw_bytes: u64,
    pub control_bytes: u64,
    /// Everything that crossed the link, both directions.
    pub total_bytes: u64,
    /// Of those: sequenced frames sent twice, and block records (uncompressed) sent twice,
    /// because a connection dropped while they were in flight.
    #[serde(default)]
    pub replayed_bytes: u64,
    #[serde(default)]
    pub resent_raw_bytes: u64,
    #[serde(default)]
    pub reconnects: u64,
}

impl Traffic {
    pub fn report(&self) -> TrafficReport {
        let f = self.fingerprints.load(Ordering::Relaxed);
        let d = self.data_wire.load(Ordering::Relaxed);
        let c = self.control.load(Ordering::Relaxed);
        TrafficReport {
            fingerprint_bytes: f,
            data_wire_bytes: d,
            data_raw_bytes: self.data_raw.load(Ordering::Relaxed),
            control_bytes: c,
            total_bytes: f + d + c,
            replayed_bytes: self.replayed.load(Ordering::Relaxed),
            resent_raw_bytes: self.resent_raw.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
        }
    }

    fn count(&self, msg: &Message, frame_len: usize) {
        let n = frame_len as u64;
        match msg {
            Message::Fingerprints { .. } | Message::Want(_) | Message::WantListed { .. } | Message::Fetch(_) => &self.fingerprints,
            Message::Data { .. } | Message::DataStream { .. } => &self.data_wire,
            _ => &self.control,
        }
        .fetch_add(n, Ordering::Relaxed);
    }
}

/// An encoded frame, ready to write, with what it is for counting. Cloning shares the bytes
/// (the source keeps unacknowledged frames to resend after a lost link).
#[derive(Debug, Clone)]
pub struct Frame {
    bytes: std::sync::Arc<Vec<u8>>,
    kind: FrameKind,
}

#[derive(Debug, Clone, Copy)]
enum FrameKind {
    Fingerprints,
    Data,
    Control,
}

impl Frame {
    /// The message's type (its first byte; see the protocol's tags).
    pub(crate) fn tag(&self) -> u8 {
        self.bytes[0]
    }

    pub fn new(msg: &Message) -> Frame {
        let kind = match msg {
            Message::Fingerprints { .. } | Message::Want(_) | Message::WantListed { .. } | Message::Fetch(_) => FrameKind::Fingerprints,
            Message::Data { .. } | Message::DataStream { .. } => FrameKind::Data,
            _ => FrameKind::Control,
        };
        Frame { bytes: std::sync::Arc::new(protocol::encode(msg)), kind }
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The message this frame holds (the source reads its kept listings back this way).
    pub fn message(&self) -> Result<Message, protocol::ProtocolError> {
        let header: &[u8; HEADER_LEN] = self.bytes[..HEADER_LEN].try_into().expect("a frame has a header");
        let (t, _) = protocol::decode_header(header)?;
        protocol::decode(t, &self.bytes[HEADER_LEN..])
    }

    /// Adds this frame's bytes to its kind's counter.
    fn count(&self, traffic: &Traffic) {
        match self.kind {
            FrameKind::Fingerprints => &traffic.fingerprints,
            FrameKind::Data => &traffic.data_wire,
            FrameKind::Control => &traffic.control,
        }
        .fetch_add(self.bytes.len() as u64, Ordering::Relaxed);
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Writes frames and counts them.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame, traffic: &Traffic) -> Result<(), MigrationError> {
    w.write_all(&frame.bytes).await?;
    frame.count(traffic);
    Ok(())
}

/// Writes several frames with one write: small frames that are ready together leave in one
/// TCP segment (and one TLS record) instead of one each.
pub async fn write_frames<W: AsyncWrite + Unpin>(w: &mut W, frames: &[Frame], traffic: &Traffic) -> Result<(), MigrationError> {
    let mut bytes = Vec::with_capacity(frames.iter().map(Frame::len).sum());
    for frame in frames {
        bytes.extend_from_slice(&frame.bytes);
    }
    w.write_all(&bytes).await?;
    for frame in frames {
        frame.count(traffic);
    }
    Ok(())
}

pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message, traffic: &Traffic) -> Result<(), MigrationError> {
    write_frame(w, &Frame::new(msg), traffic).await?;
    w.flush().await?;
    Ok(())
}

/// Sends our greeting and checks the peer's.
pub async fn exchange_greetings<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, traffic: &Traffic) -> Result<(), MigrationError> {
    s.write_all(&protocol::greeting()).await?;
    s.flush().await?;
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await?;
    traffic.control.fetch_add(2 * GREETING_LEN as u64, Ordering::Relaxed);
    protocol::check_greeting(&g)?;
    Ok(())
}

/// Reads one message; `None` at a clean end of stream (between frames).
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R, traffic: &Traffic) -> Result<Option<Message>, MigrationError> {
    let mut header = [0u8; HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    // The length is checked against the limit before the buffer is allocated.
    let (t, len) = protocol::decode_header(&header)?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    let msg = protocol::decode(t, &payload)?;
    traffic.count(&msg, HEADER_LEN + len);
    Ok(Some(msg))
}
