//! One connection of an incoming migration: applies what the source sends.

use std::sync::Arc;

use cas_store::Fingerprint;
use tokio::io::AsyncRead;

use parking_lot::Mutex;

use crate::compress::{decode_frame, parse_records, RecordLayout};
use crate::protocol::{Message, Run};
use crate::state::StateStore;
use crate::stream::{StreamDecoder, StreamId};
use crate::wire::{read_message, Frame};
use crate::{blocking, MigrationError};

use super::*;

/// One connection's view of a session: applies what the source sends.
pub(crate) struct Connection<'a> {
    pub(crate) session: &'a Arc<Session>,
    pub(crate) hooks: &'a Arc<dyn DestHooks>,
    pub(crate) state: &'a Arc<dyn StateStore>,
    /// This connection's zstd streams (DATA_STREAM), when ACCEPT offered them; they start
    /// afresh with every connection, as the source's do.
    pub(crate) streams: Option<Arc<Mutex<StreamDecoders>>>,
    /// Blocks of the initial listing that may be missing at once (see [`LISTING_WINDOW_BLOCKS`]).
    pub(crate) listing_window: usize,
    /// The session's connection count when this one attached: a newer one supersedes it.
    pub(crate) generation: u64,
}

/// The decoding ends of a connection's two streams, made on their first frame.
#[derive(Debug, Default)]
pub(crate) struct StreamDecoders {
    background: Option<StreamDecoder>,
    urgent: Option<StreamDecoder>,
}

impl StreamDecoders {
    fn decode(&mut self, stream: StreamId, frame: &[u8], raw_len: usize) -> Result<&[u8], MigrationError> {
        let slot = match stream {
            StreamId::Background => &mut self.background,
            StreamId::Urgent => &mut self.urgent,
        };
        if slot.is_none() {
            *slot = Some(StreamDecoder::new(stream).map_err(|e| MigrationError::Hook(e.to_string()))?);
        }
        Ok(slot.as_mut().expect("made above").decode(frame, raw_len)?)
    }

    /// Bytes zstd holds for this connection's streams.
    pub(crate) fn memory(&self) -> usize {
        self.background.as_ref().map_or(0, StreamDecoder::memory) + self.urgent.as_ref().map_or(0, StreamDecoder::memory)
    }
}

/// Blocks of the initial listing that may be missing at once (listed, not yet local) before
/// the destination holds back further listing frames: what bounds the memory of the missing
/// blocks' bookkeeping (about 130 bytes each: 17 MiB here) whatever the disk's size. A window
/// of 512 MiB of 4 KiB blocks keeps far more data asked for than a link carries in a round
/// trip (0.4 s of 10 Gbit/s), so the link does not wait for it.
pub const LISTING_WINDOW_BLOCKS: usize = 1 << 17;

/// Sequenced messages read but not applied yet (held back while the listing window is full)
/// are at most this many: the source keeps at most [`crate::source::OUTBOX_FRAMES`]
/// unacknowledged, plus the few of a switch-over; a source that sends more is broken.
const MAX_HELD_BACK: usize = 4 * crate::source::OUTBOX_FRAMES;

/// Whether the connection goes on after a message.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Ended,
}

/// Sequenced messages read and not applied yet, in order. Not acknowledged, so the source
/// stops listing when its outbox is full: this is the listing's flow control, with no
/// message of its own. Held messages belong to the connection: after a lost link the source
/// resends them, as they were never acknowledged.
#[derive(Debug, Default)]
struct HeldBack {
    messages: std::collections::VecDeque<Message>,
    /// A message other than the initial listing is held: the source is past the listing (the
    /// switch-over, which holds data back, may be among them), so everything is applied now
    /// regardless of the window.
    draining: bool,
}

impl HeldBack {
    fn is_holding(&self) -> bool {
        !self.messages.is_empty()
    }

    fn hold(&mut self, msg: Message) -> Result<(), MigrationError> {
        if self.messages.len() >= MAX_HELD_BACK {
            return Err(MigrationError::Protocol(crate::protocol::ProtocolError::Malformed {
                what: "FINGERPRINTS",
                why: format!("more than {MAX_HELD_BACK} sequenced messages sent without acknowledgement"),
            }));
        }
        if !matches!(msg, Message::Fingerprints { round: 0, .. } | Message::RoundEnd { round: 0, .. }) {
            self.draining = true;
        }
        self.messages.push_back(msg);
        Ok(())
    }

    fn front(&self) -> Option<&Message> {
        self.messages.front()
    }

    fn draining(&self) -> bool {
        self.draining
    }

    fn pop(&mut self) -> Option<Message> {
        let msg = self.messages.pop_front();
        if self.messages.is_empty() {
            self.draining = false;
        }
        msg
    }
}

impl Connection<'_> {
    pub(crate) fn send(&self, msg: Message) -> Result<(), MigrationError> {
        self.session.out.send(Frame::new(&msg)).map_err(|_| MigrationError::Closed)
    }

    pub(crate) fn incoming(&self) -> &Arc<Incoming> {
        &self.session.incoming
    }

    /// Before background data: another member of the gang switching over goes first.
    async fn yield_to_switch(&self) {
        if let Some(gang) = &self.session.incoming.gang {
            if !gang.yield_to_switch().await {
                tracing::debug!(disk = %self.session.hello.disk, "a gang member's switch-over outlasted the wait; background data goes on");
            }
        }
    }

    /// Counts an applied sequenced message and acknowledges it.
    pub(crate) fn applied(&self) -> Result<(), MigrationError> {
        let processed = {
            let mut proto = self.session.proto.lock();
            proto.processed += 1;
            proto.processed
        };
        self.send(Message::Ack { processed })
    }

    pub(crate) async fn run<R: AsyncRead + Unpin>(&self, reader: &mut R) -> Result<(), MigrationError> {
        let status = &self.session.status;
        // How long the last message took to arrive and to apply: a slow switch-over's log says
        // whether SWITCH waited on the link or behind the frames before it.
        let mut previous_apply = std::time::Duration::ZERO;
        let mut held = HeldBack::default();
        loop {
            let reading = std::time::Instant::now();
            let msg = read_message(reader, &status.traffic).await?.ok_or(MigrationError::Closed)?;
            let read_wait = reading.elapsed();
            let applying = std::time::Instant::now();
            if matches!(msg, Message::Switch) {
                // The source's VM is paused until SWITCHED has been written.
                self.session.urgent.lock().get_or_insert_with(crate::sched::urgent);
                tracing::debug!(
                    disk = %self.session.hello.disk,
                    read_wait_ms = read_wait.as_secs_f64() * 1000.0,
                    previous_apply_ms = previous_apply.as_secs_f64() * 1000.0,
                    "SWITCH read"
                );
            }
            if msg.is_sequenced() {
                if held.is_holding() || self.window_full_for(&msg) {
                    held.hold(msg)?;
                } else if self.apply_sequenced(msg).await? == Flow::Ended {
                    return Ok(());
                }
            } else {
                match msg {
                    Message::Data { raw_len, frame } => {
                        self.yield_to_switch().await;
                        self.apply_data(raw_len, frame).await?;
                        self.after_progress()?;
                    }
                    Message::DataStream { stream, raw_len, frame } => {
                        let (Some(streams), Some(id)) = (self.streams.clone(), StreamId::from_u8(stream)) else {
                            return Err(MigrationError::Unexpected("DATA_STREAM on a connection that did not agree to it"));
                        };
                        if id == StreamId::Background {
                            self.yield_to_switch().await;
                        }
                        self.apply_stream(streams, id, raw_len, frame).await?;
                        self.after_progress()?;
                    }
                    Message::ReadData { id, result } => self.read_answered(id, result),
                    Message::RefQuery { id, refs } => self.answer_ref_query(id, refs).await?,
                    Message::Error(e) => return Err(MigrationError::Refused(e.message)),
                    other => return Err(MigrationError::Unexpected(other.name())),
                }
            }
            // What arrived may have made room in the window for what was held back.
            while let Some(front) = held.front() {
                if !held.draining() && self.window_full_for(front) {
                    break;
                }
                let msg = held.pop().expect("front exists");
                if self.apply_sequenced(msg).await? == Flow::Ended {
                    return Ok(());
                }
            }
            previous_apply = applying.elapsed();
        }
    }

    /// Whether `msg` must wait for room in the listing window: it lists blocks of the initial
    /// pass while the window's worth of blocks are missing and content this connection
    /// asked for is still on its way (which will make room: nothing else is waited for, so
    /// blocks that wait on a gang's other member or on the switch-over never hold it back).
    fn window_full_for(&self, msg: &Message) -> bool {
        if !matches!(msg, Message::Fingerprints { round: 0, .. }) {
            return false;
        }
        let p = self.incoming().pending.lock();
        !p.wanted.is_empty() && p.by_block.len() >= self.listing_window
    }

    /// Applies one sequenced message (in order) and acknowledges it. Under the session's
    /// `applying` lock, and only while this connection is the session's newest: a connection
    /// superseded while it waited must not apply (or count) a message after the new one has
    /// told the source how many were applied.
    async fn apply_sequenced(&self, msg: Message) -> Result<Flow, MigrationError> {
        let _applying = self.session.applying.lock().await;
        if self.session.generation.load(std::sync::atomic::Ordering::SeqCst) != self.generation {
            return Err(MigrationError::Superseded);
        }
        match msg {
            Message::Fingerprints { round, runs } => {
                if self.incoming().pending.lock().phase.has_switched() {
                    return Err(MigrationError::Unexpected("FINGERPRINTS after SWITCH"));
                }
                let defer = round > 0 && self.session.hello.defer_dirty;
                self.apply_fingerprints(round, runs, defer).await?;
                self.applied()?;
            }
            Message::RoundEnd { round, .. } => {
                {
                    let mut proto = self.session.proto.lock();
                    if round == 0 {
                        let blocks = self.session.hello.size.div_ceil(u64::from(self.session.hello.block_size));
                        self.incoming().pending.lock().report.zero_blocks = blocks.saturating_sub(proto.listed_round0);
                    }
                    proto.ended_rounds.push(round);
                }
                self.applied()?;
                self.after_progress()?;
            }
            Message::Switch => {
                self.apply_switch().await?;
                self.applied()?;
                self.after_progress()?;
            }
            Message::Bye => {
                if !self.session.proto.lock().completed {
                    return Err(MigrationError::Unexpected("BYE before COMPLETE"));
                }
                return Ok(Flow::Ended);
            }
            other => return Err(MigrationError::Unexpected(other.name())),
        }
        Ok(Flow::Continue)
    }

    /// Maps what is here (the initial listing's blocks through the session's backlog, see
    /// `backlog.rs`), records what is missing and asks for it.
    pub(crate) async fn apply_fingerprints(&self, round: u32, runs: Vec<Run>, defer: bool) -> Result<(), MigrationError> {
        let hello = &self.session.hello;
        let blocks = hello.size.div_ceil(u64::from(hello.block_size));
        for run in &runs {
            let (first, n) = match run {
                Run::Mapped { first, fps } => (*first, fps.len() as u64),
                Run::Zero { first, count } => (*first, *count),
            };
            if first.checked_add(n).is_none_or(|end| end > blocks) {
                return Err(MigrationError::Protocol(crate::protocol::ProtocolError::Malformed {
                    what: "FINGERPRINTS",
                    why: format!("blocks {first}+{n} are past the end of the disk"),
                }));
            }
        }
        let inc = self.incoming().clone();
        let listed: u64 = runs.iter().filter(|r| matches!(r, Run::Mapped { .. })).map(Run::blocks).sum();
        if round == 0 {
            self.session.proto.lock().listed_round0 += listed;
        }
        if round > 0 {
            // A later round may list blocks the backlog still holds: their mapping goes first.
            drain_mapping(&inc).await?;
            let (listed, later) = blocking(move || {
                let mut listed = apply_fingerprints(&inc, runs, defer)?;
                let later = map_present(&inc, std::mem::take(&mut listed.present))?;
                Ok::<_, MigrationError>((listed, later))
            })
            .await?;
            self.ask_listed(listed.want, listed.want_flags)?;
            return self.ask(later);
        }
        let listed = {
            let inc = inc.clone();
            blocking(move || apply_fingerprints(&inc, runs, defer)).await?
        };
        self.ask_listed(listed.want, listed.want_flags)?;
        queue_mapping(self.session, self.hooks, listed.present).await
    }

    fn ask(&self, want: Vec<Fingerprint>) -> Result<(), MigrationError> {
        if want.is_empty() {
            return Ok(());
        }
        self.send(Message::Want(want))
    }

    /// Asks for what the sequenced FINGERPRINTS frame being applied lacks (called before
    /// its ACK): by position when the source takes WANT_LISTED and that is shorter, a bit
    /// per listed block against 16 bytes per wanted one (see the protocol's "Asking by
    /// position").
    fn ask_listed(&self, want: Vec<Fingerprint>, flags: Vec<bool>) -> Result<(), MigrationError> {
        if want.is_empty() {
            return Ok(());
        }
        if self.session.hello.want_listed && flags.len().div_ceil(8) + 12 < want.len() * 16 {
            // Under the session's `applying` lock: the count is this frame's number.
            let seq = self.session.proto.lock().processed;
            return self.send(Message::WantListed { seq, wanted: flags });
        }
        self.send(Message::Want(want))
    }

    pub(crate) async fn apply_data(&self, raw_len: u32, frame: Vec<u8>) -> Result<(), MigrationError> {
        let inc = self.incoming().clone();
        let layout = RecordLayout::agreed(self.session.hello.unnamed_blocks);
        let refetch = blocking(move || {
            let records = decode_frame(raw_len, &frame, inc.block_size as usize, layout)?;
            let refetch = apply_records(&inc, records)?;
            super::journal::sync_journal_if_due(&inc.journal, &inc.store);
            Ok::<_, MigrationError>(refetch)
        })
        .await?;
        self.incoming().arrived.notify_all();
        self.refetch(refetch)
    }

    /// Asks again, whole, for blocks whose deltas could not be used.
    fn refetch(&self, fps: Vec<Fingerprint>) -> Result<(), MigrationError> {
        if fps.is_empty() {
            return Ok(());
        }
        self.send(Message::Refetch(fps))
    }

    /// Answers a source's REF_QUERY: which candidate references are held here.
    async fn answer_ref_query(&self, id: u64, refs: Vec<Fingerprint>) -> Result<(), MigrationError> {
        if !self.session.hello.delta {
            return Err(MigrationError::Unexpected("REF_QUERY on a connection that did not agree to deltas"));
        }
        let store = self.incoming().store.clone();
        let held = blocking(move || store.has_many(&refs)).await?;
        self.send(Message::RefHeld { id, held })
    }

    /// Decodes the next piece of a stream and applies its records (frames of a connection are
    /// applied one at a time, in order, which the stream needs).
    pub(crate) async fn apply_stream(&self, streams: Arc<Mutex<StreamDecoders>>, id: StreamId, raw_len: u32, frame: Vec<u8>) -> Result<(), MigrationError> {
        let inc = self.incoming().clone();
        let layout = RecordLayout::agreed(self.session.hello.unnamed_blocks);
        let memory = blocking(move || {
            let class = crate::sched::BulkClass::enter();
            let mut s = streams.lock();
            let records = parse_records(s.decode(id, &frame, raw_len as usize)?, inc.block_size as usize, layout)?;
            let memory = s.memory();
            drop(s);
            drop(class);
            let refetch = apply_records(&inc, records)?;
            super::journal::sync_journal_if_due(&inc.journal, &inc.store);
            Ok::<_, MigrationError>((memory, refetch))
        })
        .await?;
        let (memory, refetch) = memory;
        self.session.status.update(|r| r.link_stream_memory_bytes = memory as u64);
        self.incoming().arrived.notify_all();
        self.refetch(refetch)
    }

    /// SWITCH. The switch-over runs to its end on a task of its own even if this connection
    /// is superseded meanwhile (its future dropped at an await): dropped halfway it would
    /// leave the disk renamed but not marked switched, and the newer connection, applying the
    /// SWITCH the source sends again, would switch a second time. The newer connection waits
    /// for the switch-over in progress instead, and then finds the disk switched.
    async fn apply_switch(&self) -> Result<(), MigrationError> {
        let guard = self.session.switching.clone().lock_owned().await;
        if self.incoming().pending.lock().phase.has_switched() {
            return Ok(());
        }
        let (session, hooks, state) = (self.session.clone(), self.hooks.clone(), self.state.clone());
        tokio::spawn(async move {
            let _exclusive = guard;
            switch_over(&session, &hooks, &state).await
        })
        .await
        .map_err(|e| MigrationError::Hook(format!("the switch-over task failed: {e}")))?
    }

    /// The source answered a standby read (an answer nobody waits for any more is dropped).
    pub(crate) fn read_answered(&self, id: u64, result: Result<Vec<u8>, String>) {
        let mut p = self.incoming().pending.lock();
        if p.reads.asked.remove(&id).is_some() {
            p.reads.answers.insert(id, result);
            drop(p);
            self.incoming().arrived.notify_all();
        }
    }

    /// Reports finished rounds, and completion after the switch-over.
    pub(crate) fn after_progress(&self) -> Result<(), MigrationError> {
        self.incoming().backlog.take_error()?;
        report_progress(self.session, self.hooks)
    }
}
