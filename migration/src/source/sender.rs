//! One connection's reader, writer and data sender.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use cas_store::{DiskId, Fingerprint, Store};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::delta::DeltaPlanner;
use super::*;
use crate::compress::{compress, encode_records, Record, RecordLayout};
use crate::protocol::Message;
use crate::stream::{StreamEncoder, StreamId};
use crate::wire::{read_message, write_frame, write_frames, Frame};
use crate::{blocking, MigrationError};

#[derive(Debug)]
pub(crate) enum SendWork {
    Want(Vec<Fingerprint>),
    Fetch(Vec<Fingerprint>),
    /// The destination's answer to REF_QUERY `id`.
    RefsHeld {
        id: u64,
        held: Vec<bool>,
    },
    /// Deltas the destination could not use: send these blocks whole.
    Refetch(Vec<Fingerprint>),
}

/// Answers the destination's READs (its standby export, before the switch-over) from the
/// disk as it is here now, a few at a time, on the urgent queue.
#[derive(Debug, Clone)]
pub(crate) struct ReadServer {
    store: Arc<Store>,
    disk: DiskId,
    replies: mpsc::Sender<DataFrame>,
    /// READs being served at most (each holds up to `MAX_READ` bytes): a destination that
    /// floods READs waits on its own link instead of growing this server's memory.
    permits: Arc<tokio::sync::Semaphore>,
}

/// READs served at once.
const CONCURRENT_READS: usize = 8;

/// Sequenced frames that are ready together are written at once up to this many bytes.
const COALESCE_BYTES: usize = 64 << 10;

impl ReadServer {
    pub(crate) fn new(store: Arc<Store>, disk: DiskId, replies: mpsc::Sender<DataFrame>) -> ReadServer {
        ReadServer { store, disk, replies, permits: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_READS)) }
    }

    /// Starts answering one READ; waits while `CONCURRENT_READS` are in progress.
    async fn serve(&self, id: u64, offset: u64, length: u32) {
        let permit = self.permits.clone().acquire_owned().await.expect("never closed");
        let (store, disk, replies) = (self.store.clone(), self.disk, self.replies.clone());
        tokio::spawn(async move {
            let read = blocking(move || {
                let mut buf = vec![0u8; length as usize];
                store.read(disk, offset, &mut buf).map(|()| buf)
            })
            .await;
            let result = read.map_err(|e| e.to_string());
            if let Err(why) = &result {
                tracing::warn!(offset, length, error = %why, "cannot answer the destination's read");
            }
            let frame = Frame::new(&Message::ReadData { id, result });
            let _ = replies.send(DataFrame { frame, fps: Vec::new(), record_bytes: 0 }).await;
            drop(permit);
        });
    }
}

pub(crate) async fn run_reader<R: AsyncRead + Unpin>(
    mut reader: R,
    events: mpsc::UnboundedSender<Event>,
    work: mpsc::UnboundedSender<SendWork>,
    reads: ReadServer,
    outbox: Arc<Outbox>,
    status: Arc<MigrationStatus>,
) -> Result<(), MigrationError> {
    loop {
        let msg = match read_message(&mut reader, &status.traffic).await {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "migration link read failed");
                return Err(e);
            }
        };
        let sent = match msg {
            Message::Ack { processed } => {
                outbox.ack(processed)?;
                true
            }
            Message::Want(fps) => {
                status.update(|r| r.blocks_wanted += fps.len() as u64);
                work.send(SendWork::Want(fps)).is_ok()
            }
            Message::WantListed { seq, wanted } => match outbox.listed_wanted(seq, &wanted)? {
                Some(fps) => {
                    status.update(|r| r.blocks_wanted += fps.len() as u64);
                    work.send(SendWork::Want(fps)).is_ok()
                }
                None => {
                    tracing::debug!(seq, "WANT_LISTED for a listing already acknowledged (a superseded connection's): ignored");
                    true
                }
            },
            Message::Fetch(fps) => {
                status.cap.urgent(status.link_member());
                work.send(SendWork::Fetch(fps)).is_ok()
            }
            Message::Read { id, offset, length } => {
                reads.serve(id, offset, length).await;
                true
            }
            Message::RefHeld { id, held } => work.send(SendWork::RefsHeld { id, held }).is_ok(),
            Message::Refetch(fps) => {
                tracing::info!(blocks = fps.len(), "the destination could not use some deltas; sending those blocks whole");
                work.send(SendWork::Refetch(fps)).is_ok()
            }
            Message::RoundDone { round } => events.send(Event::RoundDone(round)).is_ok(),
            Message::Switched(r) => {
                tracing::debug!("SWITCHED read");
                status.switched_read(&r);
                events.send(Event::Switched(r)).is_ok()
            }
            Message::Complete(r) => events.send(Event::Complete(r)).is_ok(),
            Message::Error(e) => {
                tracing::error!(message = %e.message, "destination reported an error");
                status.update(|r| r.error = Some(format!("destination: {}", e.message)));
                return Err(MigrationError::Refused(e.message));
            }
            other => {
                tracing::error!(message = other.name(), "unexpected message from the destination");
                return Err(MigrationError::Unexpected(other.name()));
            }
        };
        if !sent {
            return Ok(());
        }
    }
}

/// A DATA frame and the blocks in it (to count what a lost link makes cross twice).
#[derive(Debug)]
pub(crate) struct DataFrame {
    pub(crate) frame: Frame,
    pub(crate) fps: Vec<Fingerprint>,
    pub(crate) record_bytes: u64,
}

/// Writes frames: on-demand data first, then the sequenced frames from `cursor` on, then
/// background data.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_writer<W: AsyncWrite + Unpin>(
    mut writer: W,
    outbox: Arc<Outbox>,
    mut cursor: u64,
    mut urgent: mpsc::Receiver<DataFrame>,
    mut low: mpsc::Receiver<DataFrame>,
    status: Arc<MigrationStatus>,
    ever_sent: Arc<Mutex<RecentFingerprints>>,
) -> Result<(), MigrationError> {
    use tokio::io::AsyncWriteExt;
    let switch_ended = status.cap.switch_ended();
    loop {
        let notified = outbox.changed.notified();
        // Taken before the holds are looked at, so the end of a switch-over is not missed.
        let ended = switch_ended.notified();
        let mut sequenced = None;
        // Sequenced frames written with `frame` in the same write.
        let mut following: Vec<Frame> = Vec::new();
        let mut data = None;
        let mut background = false;
        let frame = if let Ok(d) = urgent.try_recv() {
            status.cap.urgent(status.link_member());
            let f = d.frame.clone();
            data = Some(d);
            f
        } else if let Some((f, again)) = if status.cap.another_switching(status.link_member()) { None } else { outbox.get(cursor) } {
            // (Another member of the gang switching over holds this one's listing too.)
            if again {
                status.traffic.replayed.fetch_add(f.len() as u64, Ordering::Relaxed);
            }
            sequenced = Some(cursor);
            cursor += 1;
            // Small sequenced frames that are ready together (the final round's end and
            // SWITCH) leave in one write, so in one TCP segment, not one segment each.
            let mut bytes = f.len();
            while let Some((next, again)) = outbox.get(cursor) {
                if bytes + next.len() > COALESCE_BYTES {
                    break;
                }
                if again {
                    status.traffic.replayed.fetch_add(next.len() as u64, Ordering::Relaxed);
                }
                bytes += next.len();
                sequenced = Some(cursor);
                cursor += 1;
                following.push(next);
            }
            f
        } else if let Some(d) = if outbox.background_held() || status.cap.switching() { None } else { low.try_recv().ok() } {
            background = true;
            let f = d.frame.clone();
            data = Some(d);
            f
        } else {
            writer.flush().await?;
            // A member of the gang switching over holds everyone's background data (and the
            // others' listings) until it ends.
            let gang_held = status.cap.switching();
            let held = outbox.background_held() || gang_held;
            let d = tokio::select! {
                biased;
                d = urgent.recv() => match d {
                    Some(d) => {
                        status.cap.urgent(status.link_member());
                        d
                    }
                    None => return Ok(()),
                },
                _ = notified => continue,
                _ = ended, if gang_held => continue,
                // A hold lapses after a while (a member whose link was lost).
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)), if gang_held => continue,
                Some(d) = low.recv(), if !held => {
                    background = true;
                    d
                }
            };
            let f = d.frame.clone();
            data = Some(d);
            f
        };
        // Another migration of the gang has on-demand data on its way: it goes first.
        if background {
            loop {
                let wait = status.cap.yield_to_urgent(status.link_member());
                if wait.is_zero() {
                    break;
                }
                writer.flush().await?;
                tokio::time::sleep(wait).await;
            }
        }
        // The cap applies to every frame, so on-demand data, which goes first, stays first
        // under the cap. It is looked at again while waiting: the operator may change it.
        loop {
            let wait = status.cap.wait();
            if wait.is_zero() {
                break;
            }
            writer.flush().await?;
            tokio::time::sleep(wait).await;
        }
        status.cap.charge(frame.len() + following.iter().map(Frame::len).sum::<usize>());
        let switch = sequenced.is_some() && std::iter::once(&frame).chain(&following).any(|f| f.tag() == crate::protocol::SWITCH_TAG);
        if following.is_empty() {
            write_frame(&mut writer, &frame, &status.traffic).await?;
        } else {
            following.insert(0, frame);
            write_frames(&mut writer, &following, &status.traffic).await?;
        }
        if let Some(d) = data {
            let mut ever = ever_sent.lock();
            let again = d.fps.iter().filter(|fp| !ever.insert(**fp)).count() as u64;
            if again > 0 {
                let per = d.record_bytes / d.fps.len().max(1) as u64;
                status.traffic.resent_raw.fetch_add(again * per, Ordering::Relaxed);
            }
        }
        if let Some(seq) = sequenced {
            if switch || (urgent.is_empty() && low.is_empty()) {
                writer.flush().await?;
            }
            if switch {
                // Beside the destination's "SWITCH read": where a long downtime's first hop waited.
                tracing::debug!("SWITCH written");
            }
            outbox.mark_written(seq);
        }
    }
}

/// What the two sides agreed on for this connection's block data (HELLO and ACCEPT).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DataFeatures {
    /// DATA_STREAM: one zstd stream per connection and urgency.
    pub(crate) streaming: bool,
    /// Deltas against similar blocks the destination holds.
    pub(crate) delta: bool,
    pub(crate) layout: RecordLayout,
}

/// Sends DATA frames for wanted blocks: on-demand fetches go first, in small frames
/// compressed here, on the urgent queue; background blocks are read here and compressed
/// ahead of the link by the connection's compressor thread (see [`super::compressor`]).
/// With `delta`, wanted background blocks are first looked up in the resemblance index (see
/// [`super::delta`]); those with a candidate reference wait for the destination's REF_HELD.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_data_sender(
    store: Arc<Store>,
    mut work: mpsc::UnboundedReceiver<SendWork>,
    high: mpsc::Sender<DataFrame>,
    low: mpsc::Sender<DataFrame>,
    config: SourceConfig,
    status: Arc<MigrationStatus>,
    features: DataFeatures,
) {
    let DataFeatures { streaming, delta, layout } = features;
    let block_size = store.block_size() as usize;
    let memory = Arc::new(StreamMemory::default());
    let (raw_tx, raw_rx) = mpsc::channel::<RawBatch>(RAW_QUEUE);
    if let Err(e) = spawn_compressor(raw_rx, low, streaming, config.zstd_level, status.clone(), memory.clone()) {
        tracing::error!(error = %e, "cannot start the compressor thread");
        return;
    }
    // With DATA_STREAM, the urgent queue's zstd stream for this connection's lifetime (see
    // `crate::stream`); made on first use, dropped with the connection.
    let mut urgent_encoder: Option<StreamEncoder> = None;
    let per_batch = (config.batch_bytes / (block_size + layout.block_overhead())).max(1);
    let mut urgent: VecDeque<Fingerprint> = VecDeque::new();
    // In a gang, content several disks use (more than one reference here) goes before the
    // rest, each in the order asked: if the gang is cut short, what crossed serves most disks.
    let mut shared: VecDeque<Fingerprint> = VecDeque::new();
    let mut background: VecDeque<Fingerprint> = VecDeque::new();
    let mut sent = RecentFingerprints::default();
    let mut deltas = DeltaPlanner::new(delta);
    loop {
        // Take everything queued, then block for more only when idle.
        loop {
            let item = if urgent.is_empty() && shared.is_empty() && background.is_empty() && !deltas.has_work() {
                match work.recv().await {
                    Some(w) => w,
                    None => return,
                }
            } else {
                match work.try_recv() {
                    Ok(w) => w,
                    Err(_) => break,
                }
            };
            match item {
                SendWork::Want(fps) if config.gang.is_some() => {
                    let s = store.clone();
                    let lookup = fps.clone();
                    match blocking(move || s.reference_counts(&lookup)).await {
                        Ok(counts) => {
                            for (fp, count) in fps.into_iter().zip(counts) {
                                if count.unwrap_or(0) > 1 {
                                    shared.push_back(fp);
                                } else {
                                    background.push_back(fp);
                                }
                            }
                        }
                        // Only the order is lost: the blocks are read (or found gone) as usual.
                        Err(_) => background.extend(fps),
                    }
                }
                SendWork::Want(fps) if deltas.enabled() => deltas.wanted(fps, &mut background),
                SendWork::Want(fps) => background.extend(fps),
                SendWork::Fetch(fps) => urgent.extend(fps),
                SendWork::RefsHeld { id, held } => deltas.answered(id, &held, &mut background),
                SendWork::Refetch(fps) => {
                    for fp in &fps {
                        sent.remove(fp);
                    }
                    deltas.refused(&fps);
                    background.extend(fps);
                }
            }
        }
        // Look for references for the next wanted blocks, a slice at a time between data
        // frames, and ask the destination about them ahead of their turn (far enough ahead
        // to hide the round trip, no further: what the deltas sent so far say decides whether
        // to go on looking).
        let ahead = background.len() < super::delta::LOOK_AHEAD_BLOCKS;
        if let Some(query) = if ahead { deltas.propose_next(&store, &status, &mut background).await } else { None } {
            if high.send(DataFrame { frame: Frame::new(&query), fps: Vec::new(), record_bytes: 0 }).await.is_err() {
                return;
            }
        }
        let is_urgent = !urgent.is_empty();
        let queue = if is_urgent {
            &mut urgent
        } else if !shared.is_empty() {
            &mut shared
        } else {
            &mut background
        };
        let mut batch = Vec::with_capacity(per_batch.min(queue.len()));
        while batch.len() < per_batch {
            match queue.pop_front() {
                Some(fp) if sent.insert(fp) => batch.push(fp),
                Some(_) => {}
                None => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        let s = store.clone();
        // On-demand frames are small and compressed at once at the background's level.
        let lvl = status.report.lock().zstd_level.max(1);
        let mut encoder = if is_urgent && streaming { Some(urgent_encoder.take()) } else { None };
        let references = deltas.references_for(&batch);
        let built = blocking(move || {
            let blocks = s.get_blocks(&batch)?;
            let records = super::delta::block_records(&s, &batch, blocks, references, lvl);
            let deltas = super::delta::DeltaCount::of(&records);
            let (mut sent_fps, mut gone) = (Vec::with_capacity(records.len()), Vec::new());
            for r in &records {
                match (r, r.fingerprint()) {
                    (Record::Gone(_), Some(fp)) => gone.push(fp),
                    (_, Some(fp)) => sent_fps.push(fp),
                    (_, None) => {}
                }
            }
            let mut raw = Vec::with_capacity(records.len() * (block_size + layout.block_overhead()));
            encode_records(&records, layout, &mut raw);
            let msg = if !is_urgent {
                None
            } else {
                Some(match encoder.as_mut() {
                    None => Message::Data { raw_len: raw.len() as u32, frame: compress(&raw, lvl) },
                    Some(slot) => {
                        let enc = match slot {
                            Some(e) => e,
                            None => slot.insert(StreamEncoder::new(StreamId::Urgent, lvl).map_err(|e| MigrationError::Hook(e.to_string()))?),
                        };
                        let frame = enc.encode(&raw, lvl).map_err(|e| MigrationError::Hook(e.to_string()))?;
                        Message::DataStream { stream: StreamId::Urgent as u8, raw_len: raw.len() as u32, frame }
                    }
                })
            };
            Ok::<_, MigrationError>((raw, msg, sent_fps, gone, encoder, deltas))
        })
        .await;
        let (raw, msg, sent_fps, gone, encoder, sent_deltas) = match built {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reading blocks to send failed");
                return;
            }
        };
        if let Some(enc) = encoder {
            urgent_encoder = enc;
            if let Some(e) = &urgent_encoder {
                memory.set(StreamId::Urgent, e.memory(), &status);
            }
        }
        // A block that is gone was not sent; if it is asked for again, try again.
        for fp in &gone {
            sent.remove(fp);
        }
        deltas.sent(sent_deltas.blocks);
        if sent_deltas.blocks > 0 {
            status.update(|r| {
                r.blocks_sent_as_delta += sent_deltas.blocks;
                r.delta_bytes += sent_deltas.bytes;
            });
        }
        let delivered = match msg {
            Some(msg) => {
                status.traffic.data_raw.fetch_add(raw.len() as u64, Ordering::Relaxed);
                status.update(|r| r.blocks_sent += sent_fps.len() as u64);
                high.send(DataFrame { frame: Frame::new(&msg), fps: sent_fps, record_bytes: raw.len() as u64 }).await.is_ok()
            }
            None => raw_tx.send(RawBatch { raw, sent: sent_fps }).await.is_ok(),
        };
        if !delivered {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::MigrationReport;
    use crate::source::outbox::Outbox;
    use crate::wire::Traffic;
    use std::time::Duration;

    /// The switch-over's hold: background DATA queued before the freeze goes out only after
    /// the sequenced frames pushed while held (the final listing, SWITCH).
    #[tokio::test]
    pub(crate) async fn held_background_data_goes_after_switch() {
        let outbox = Arc::new(Outbox::new(false));
        let (_urgent_tx, urgent_rx) = mpsc::channel(4);
        let (low_tx, low_rx) = mpsc::channel(4);
        let status = MigrationStatus::new(MigrationReport::new("t", "vm", "source", "peer"));
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let hold = outbox.hold_background();
        let data = Message::Data { raw_len: 3, frame: vec![1, 2, 3] };
        low_tx.send(DataFrame { frame: Frame::new(&data), fps: vec![Fingerprint([9; 16])], record_bytes: 3 }).await.unwrap();
        let writer = tokio::spawn(run_writer(ours, outbox.clone(), 0, urgent_rx, low_rx, status.clone(), Default::default()));
        let traffic = Traffic::default();
        let nothing = tokio::time::timeout(Duration::from_millis(100), read_message(&mut theirs, &traffic)).await;
        assert!(nothing.is_err(), "nothing goes out while only held data is queued: {nothing:?}");
        outbox.push(0, &Message::RoundEnd { round: 1, last: true }).await.unwrap();
        outbox.push(0, &Message::Switch).await.unwrap();
        drop(hold);
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(read_message(&mut theirs, &traffic).await.unwrap().unwrap());
        }
        assert_eq!(got, vec![Message::RoundEnd { round: 1, last: true }, Message::Switch, data]);
        writer.abort();
    }

    /// In a gang, content the source store references more than once (several disks use it)
    /// is sent before the rest, each in the order asked.
    #[tokio::test]
    async fn gang_members_send_content_several_disks_use_first() {
        let store = Arc::new(Store::open_in_memory(cas_store::StoreOptions::default()).unwrap());
        let block = |seed: u8| vec![seed; 4096];
        let a = store.create_disk("a", 4 * 4096).unwrap();
        let b = store.create_disk("b", 2 * 4096).unwrap();
        for (i, seed) in [1u8, 2, 3, 4].into_iter().enumerate() {
            store.write(a.id, i as u64 * 4096, &block(seed), false).unwrap();
        }
        store.write(b.id, 0, &block(2), false).unwrap();
        store.write(b.id, 4096, &block(4), false).unwrap();
        let fp = |seed: u8| store.fingerprint(&block(seed));
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        let (high_tx, _high_rx) = mpsc::channel(8);
        let (low_tx, mut low_rx) = mpsc::channel(8);
        // One block per frame, so the frames show the order.
        let config = SourceConfig { gang: Some("g".into()), data_stream: false, zstd_level: Some(1), batch_bytes: 4096 + 1, ..SourceConfig::default() };
        let status = MigrationStatus::new(MigrationReport::new("t", "a", "source", "peer"));
        let features = DataFeatures { streaming: false, delta: false, layout: RecordLayout::Unnamed };
        work_tx.send(SendWork::Want(vec![fp(1), fp(2), fp(3), fp(4)])).unwrap();
        let sender = tokio::spawn(run_data_sender(store.clone(), work_rx, high_tx, low_tx, config, status, features));
        let mut order = Vec::new();
        for _ in 0..4 {
            let frame = tokio::time::timeout(Duration::from_secs(10), low_rx.recv()).await.unwrap().unwrap();
            order.extend(frame.fps);
        }
        assert_eq!(order, vec![fp(2), fp(4), fp(1), fp(3)]);
        sender.abort();
    }
}
