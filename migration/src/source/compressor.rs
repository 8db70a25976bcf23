//! The background stream's compressor: a thread of its own per connection, ahead of the link.
//!
//! Blocks are read on tokio's blocking pool and handed here; this thread compresses them
//! into the connection's background zstd stream (or one frame each, without DATA_STREAM)
//! and queues the frames for the link writer. Reading, compressing and sending overlap, and
//! the thread's own timing (compressing, blocked on a full link queue, waiting for blocks)
//! is what the [`LevelController`](crate::compress::LevelController) reads (one for a
//! gang's compressors, in its [`SharedLink`](crate::ratelimit::SharedLink)): it raises the level while the link is the
//! bottleneck and lowers it only when compression has held the link up for a while.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cas_store::Fingerprint;
use tokio::sync::mpsc;

use super::sender::DataFrame;
use super::MigrationStatus;
use crate::compress::compress;
use crate::protocol::Message;
use crate::stream::{StreamEncoder, StreamId};
use crate::wire::Frame;

/// Block records for the background stream, uncompressed.
#[derive(Debug)]
pub(crate) struct RawBatch {
    pub(crate) raw: Vec<u8>,
    /// The blocks whose data is in `raw` (not those the source no longer holds).
    pub(crate) sent: Vec<Fingerprint>,
}

/// Raw batches queued for the compressor at most: with 1 MiB batches, 2 MiB of blocks.
pub(crate) const RAW_QUEUE: usize = 2;

/// Bytes zstd holds for each stream of the connection (reported as their sum).
#[derive(Debug, Default)]
pub(crate) struct StreamMemory([AtomicU64; 2]);

impl StreamMemory {
    pub(crate) fn set(&self, stream: StreamId, bytes: usize, status: &MigrationStatus) {
        self.0[stream as usize].store(bytes as u64, Ordering::Relaxed);
        let total = self.0.iter().map(|m| m.load(Ordering::Relaxed)).sum();
        status.update(|r| r.link_stream_memory_bytes = total);
    }
}

/// Starts the compressor thread of one connection. It ends when `raw` closes (the sender is
/// gone) or the writer drops `low` (the connection is gone).
pub(crate) fn spawn_compressor(
    mut raw: mpsc::Receiver<RawBatch>,
    low: mpsc::Sender<DataFrame>,
    streaming: bool,
    fixed_level: Option<i32>,
    status: Arc<MigrationStatus>,
    memory: Arc<StreamMemory>,
) -> std::io::Result<()> {
    std::thread::Builder::new().name("migration-zstd".into()).spawn(move || {
        // Holds no lock others wait for: the bulk class for its whole life (see `sched`).
        let _class = crate::sched::BulkClass::for_thread_life();
        let mut encoder: Option<StreamEncoder> = None;
        // The level is the gang's (a migration alone is a gang of one): see `SharedLink`.
        let member = status.link_member();
        let mut recorded = status.cap.level(fixed_level);
        status.update(|r| r.record_level(status.started.elapsed().as_secs_f64(), recorded));
        loop {
            let waiting = Instant::now();
            let Some(batch) = raw.blocking_recv() else { return };
            let idle = waiting.elapsed();
            let lvl = status.cap.level(fixed_level);
            let compressing = Instant::now();
            let msg = if streaming {
                let enc = match encoder.as_mut() {
                    Some(e) => e,
                    None => match StreamEncoder::new(StreamId::Background, lvl) {
                        Ok(e) => encoder.insert(e),
                        Err(e) => {
                            tracing::error!(error = %e, "cannot start the link's zstd stream");
                            return;
                        }
                    },
                };
                match enc.encode(&batch.raw, lvl) {
                    Ok(frame) => Message::DataStream { stream: StreamId::Background as u8, raw_len: batch.raw.len() as u32, frame },
                    Err(e) => {
                        tracing::error!(error = %e, "compressing block data failed");
                        return;
                    }
                }
            } else {
                Message::Data { raw_len: batch.raw.len() as u32, frame: compress(&batch.raw, lvl) }
            };
            let busy = compressing.elapsed();
            status.traffic.data_raw.fetch_add(batch.raw.len() as u64, Ordering::Relaxed);
            status.update(|r| r.blocks_sent += batch.sent.len() as u64);
            if let Some(e) = &encoder {
                memory.set(StreamId::Background, e.memory(), &status);
            }
            let frame = DataFrame { frame: Frame::new(&msg), fps: batch.sent, record_bytes: batch.raw.len() as u64 };
            let sending = Instant::now();
            if low.blocking_send(frame).is_err() {
                return;
            }
            status.cap.observe_level(member, fixed_level, busy, sending.elapsed(), idle);
            let now = status.cap.level(fixed_level);
            if now != recorded {
                recorded = now;
                tracing::debug!(level = now, "zstd level");
                status.update(|r| r.record_level(status.started.elapsed().as_secs_f64(), now));
            }
        }
    })?;
    Ok(())
}
