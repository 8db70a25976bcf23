//! Sequenced frames kept until the destination acknowledges them (resent after a lost link).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::Mutex;

use cas_store::Fingerprint;

use crate::protocol::{Message, ProtocolError, Run};
use crate::wire::Frame;
use crate::MigrationError;

/// Sequenced frames not yet acknowledged by the destination, numbered from `base`: what the
/// source resends after a lost link.
#[derive(Debug)]
pub(crate) struct Outbox {
    pub(crate) inner: Mutex<OutboxInner>,
    pub(crate) changed: tokio::sync::Notify,
    /// Set while background DATA must wait (the switch-over).
    pub(crate) hold: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub(crate) struct OutboxInner {
    pub(crate) base: u64,
    pub(crate) frames: VecDeque<Frame>,
    /// Bumped when the listing starts over (a rebuild): pushes of an older epoch fail.
    pub(crate) epoch: u64,
    /// Sequence numbers below this were written to some connection already.
    pub(crate) written: u64,
    /// A restarted source has no frames to resend: it takes the destination's count as is.
    pub(crate) adopt: bool,
}

/// Keeps background DATA off the link while it lives (see [`Outbox::hold_background`]).
#[derive(Debug)]
pub(crate) struct BackgroundHold(Arc<Outbox>);

impl Drop for BackgroundHold {
    fn drop(&mut self) {
        self.0.hold.store(false, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Unacknowledged sequenced frames the source holds at most (about 8 MiB of fingerprints).
pub(crate) const OUTBOX_FRAMES: usize = 64;

impl Outbox {
    pub(crate) fn new(adopt: bool) -> Outbox {
        Outbox {
            inner: Mutex::new(OutboxInner { base: 0, frames: VecDeque::new(), epoch: 0, written: 0, adopt }),
            changed: tokio::sync::Notify::new(),
            hold: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Holds background DATA back until the returned guard is dropped; sequenced frames and
    /// on-demand data still go.
    pub(crate) fn hold_background(self: &Arc<Self>) -> BackgroundHold {
        self.hold.store(true, Ordering::SeqCst);
        BackgroundHold(self.clone())
    }

    pub(crate) fn background_held(&self) -> bool {
        self.hold.load(Ordering::SeqCst)
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Appends a sequenced message, waiting while the destination is far behind. Fails with
    /// `Restart` once the listing has started over.
    pub(crate) async fn push(&self, epoch: u64, msg: &Message) -> Result<u64, MigrationError> {
        self.push_with(epoch, msg, false).await
    }

    /// Appends a message of the switch-over (the final round, SWITCH) without waiting for
    /// room. The destination may hold back acknowledgements of the initial listing while its
    /// listing window is full (see the destination's `connection.rs`), waiting for data the
    /// source holds back from the freeze until SWITCH: a switch-over waiting for room would
    /// wait for ever. The destination applies everything it held back when it sees them.
    pub(crate) async fn push_switch_over(&self, epoch: u64, msg: &Message) -> Result<u64, MigrationError> {
        self.push_with(epoch, msg, true).await
    }

    async fn push_with(&self, epoch: u64, msg: &Message, beyond_cap: bool) -> Result<u64, MigrationError> {
        debug_assert!(msg.is_sequenced() || matches!(msg, Message::Error(_)));
        let frame = Frame::new(msg);
        loop {
            let notified = self.changed.notified();
            {
                let mut g = self.inner.lock();
                if g.epoch != epoch {
                    return Err(MigrationError::Restart);
                }
                if g.frames.len() < OUTBOX_FRAMES || beyond_cap || matches!(msg, Message::Error(_)) {
                    g.frames.push_back(frame);
                    let seq = g.base + g.frames.len() as u64 - 1;
                    drop(g);
                    self.changed.notify_waiters();
                    return Ok(seq);
                }
            }
            notified.await;
        }
    }

    /// The destination has applied everything below `processed`.
    pub(crate) fn ack(&self, processed: u64) -> Result<(), MigrationError> {
        let mut g = self.inner.lock();
        let end = g.base + g.frames.len() as u64;
        if processed > end {
            if !g.adopt {
                return Err(MigrationError::Protocol(crate::protocol::ProtocolError::Malformed {
                    what: "ACK",
                    why: format!("{processed} messages acknowledged, {end} sent"),
                }));
            }
            g.frames.clear();
            g.base = processed;
            g.written = g.written.max(processed);
        }
        while g.base < processed {
            g.frames.pop_front();
            g.base += 1;
        }
        g.adopt = false;
        drop(g);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Starts the listing over: drops every frame and numbers from 0 again.
    pub(crate) fn restart(&self) -> u64 {
        let mut g = self.inner.lock();
        g.epoch += 1;
        g.frames.clear();
        g.base = 0;
        g.written = 0;
        g.adopt = false;
        let e = g.epoch;
        drop(g);
        self.changed.notify_waiters();
        e
    }

    /// The frame numbered `seq`, if it is here; and whether it was written before.
    pub(crate) fn get(&self, seq: u64) -> Option<(Frame, bool)> {
        let g = self.inner.lock();
        let i = seq.checked_sub(g.base)?;
        g.frames.get(i as usize).map(|f| (f.clone(), seq < g.written))
    }

    /// The fingerprints a WANT_LISTED asks for: those of frame `seq`'s listed blocks whose
    /// flag is set (see the protocol's "Asking by position"). None when the frame was
    /// acknowledged already: a stale WANT_LISTED, whose content is asked for again by WANT.
    pub(crate) fn listed_wanted(&self, seq: u64, wanted: &[bool]) -> Result<Option<Vec<Fingerprint>>, MigrationError> {
        let bad = |why: String| MigrationError::Protocol(ProtocolError::Malformed { what: "WANT_LISTED", why });
        let frame = {
            let g = self.inner.lock();
            if seq < g.base {
                return Ok(None);
            }
            // Not checked against `written`: the writer marks a frame written after the
            // write returns, and the destination's answer can come back before that.
            match g.frames.get((seq - g.base) as usize) {
                Some(f) => f.clone(),
                None => return Err(bad(format!("names frame {seq}, which was not sent"))),
            }
        };
        let Message::Fingerprints { runs, .. } = frame.message()? else {
            return Err(bad(format!("frame {seq} is not a listing")));
        };
        let listed = Run::fingerprints(runs);
        if listed.len() != wanted.len() {
            return Err(bad(format!("{} flags for frame {seq}, which lists {} blocks", wanted.len(), listed.len())));
        }
        Ok(Some(listed.into_iter().zip(wanted).filter(|(_, w)| **w).map(|(fp, _)| fp).collect()))
    }

    pub(crate) fn mark_written(&self, seq: u64) {
        let mut g = self.inner.lock();
        g.written = g.written.max(seq + 1);
        drop(g);
        self.changed.notify_waiters();
    }

    /// Whether every frame pushed so far has been written to a connection.
    pub(crate) fn all_written(&self) -> bool {
        let g = self.inner.lock();
        g.written >= g.base + g.frames.len() as u64
    }

    /// Waits until frame `seq` has been written to a connection.
    pub(crate) async fn wait_written(&self, seq: u64) {
        loop {
            let notified = self.changed.notified();
            if self.inner.lock().written > seq {
                return;
            }
            notified.await;
        }
    }
}
