//! The source side: lists fingerprints, sends the blocks the destination asks for, runs the
//! dirty rounds, freezes, switches over and serves post-copy fetches until the destination
//! has everything.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_store::{DiskId, Fingerprint, Store};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::compress::{compress, encode_records, LevelController, Record};
use crate::link::{Backoff, Connector, LinkStream, OneShot};
use crate::protocol::{DestReport, ErrorMessage, Hello, Message, Mode, Run};
use crate::report::{MigrationReport, Phase, PlanReport, SwitchAfter};
use crate::state::{MigrationRecord, Stage, StateStore};
use crate::wire::{exchange_greetings, read_message, write_frame, Frame, Traffic};
use crate::{blocking, MigrationError};

/// Entries per FINGERPRINTS frame (about 130 KiB).
const FINGERPRINTS_PER_FRAME: usize = 8192;

/// What the source server does at the edges of a migration (the NBD server implements it).
pub trait SourceHooks: Send + Sync {
    /// Stops new writes to the disk's export and waits for writes in flight.
    fn freeze<'a>(&'a self, disk: &'a str) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;
    /// Undoes `freeze`: the migration failed before the switch-over and the source stays
    /// authoritative.
    fn thaw(&self, disk: &str);
    /// The destination now serves the disk; the source must never accept writes to it again.
    fn switched(&self, disk: &str);
}

/// Hooks that do nothing (tests, and tools that migrate a disk no server exports).
#[derive(Debug, Default)]
pub struct NoHooks;

impl SourceHooks for NoHooks {
    fn freeze<'a>(&'a self, _: &'a str) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }
    fn thaw(&self, _: &str) {}
    fn switched(&self, _: &str) {}
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SourceConfig {
    pub migration_id: String,
    pub switch_after: SwitchAfter,
    /// Dirty rounds at most (converged mode).
    pub max_rounds: u32,
    /// A dirty set this small (in blocks) counts as converged.
    pub converge_blocks: u64,
    /// A fixed zstd level, or None to adapt to the link.
    pub zstd_level: Option<i32>,
    /// Uncompressed bytes per DATA frame.
    pub batch_bytes: usize,
    /// Delete the source disk once the destination has every block.
    pub delete_source: bool,
    /// Cap on what the source sends, in bits per second (None: as fast as the link goes).
    pub bandwidth_bps: Option<u64>,
    /// How long the source keeps reconnecting after a lost link before the migration is
    /// interrupted (0: a lost link fails it).
    pub reconnect_window_secs: u64,
    /// Set when a restarted server resumes the migration: where its record said it stood.
    #[serde(skip)]
    pub restarted_at: Option<Stage>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            migration_id: "migration".into(),
            switch_after: SwitchAfter::default(),
            max_rounds: 8,
            converge_blocks: 256,
            zstd_level: None,
            batch_bytes: 1 << 20,
            delete_source: false,
            bandwidth_bps: None,
            reconnect_window_secs: 600,
            restarted_at: None,
        }
    }
}

/// Live state of a migration, shared with whoever reports on it.
#[derive(Debug)]
pub struct MigrationStatus {
    pub traffic: Traffic,
    report: Mutex<MigrationReport>,
    started: Instant,
    cancel: tokio::sync::Notify,
    cancel_requested: std::sync::atomic::AtomicBool,
    /// Wakes a source's link supervisor: retry now (resume, or cancel needs the link).
    kick: tokio::sync::Notify,
    /// The phase an interrupted migration returns to when its link is back.
    phase_before_interrupt: Mutex<Option<Phase>>,
    /// When the source froze its export (downtime runs from here to SWITCHED).
    freeze_at: Mutex<Option<Instant>>,
}

impl MigrationStatus {
    pub fn new(report: MigrationReport) -> Arc<MigrationStatus> {
        Arc::new(MigrationStatus {
            traffic: Traffic::default(),
            report: Mutex::new(report),
            started: Instant::now(),
            cancel: tokio::sync::Notify::new(),
            cancel_requested: std::sync::atomic::AtomicBool::new(false),
            kick: tokio::sync::Notify::new(),
            phase_before_interrupt: Mutex::new(None),
            freeze_at: Mutex::new(None),
        })
    }

    /// Asks a source-side migration to stop before its switch-over. After the freeze it is
    /// too late: the destination is (about to be) authoritative.
    pub fn request_cancel(&self) -> Result<(), String> {
        let r = self.report.lock();
        if r.role != "source" {
            return Err("cancel a migration at its source".into());
        }
        if r.is_finished() {
            return Err(format!("migration {} has already ended ({:?})", r.id, r.phase));
        }
        if !r.cancellable {
            return Err(format!("migration {} is past its switch-over; it can no longer be cancelled", r.id));
        }
        self.cancel_requested.store(true, Ordering::SeqCst);
        self.cancel.notify_waiters();
        self.cancel.notify_one();
        // The destination learns of the cancel over the link: reconnect now if it is down.
        self.kick.notify_one();
        Ok(())
    }

    /// Asks an interrupted source-side migration to reconnect now.
    pub fn request_resume(&self) -> Result<(), String> {
        let r = self.report.lock();
        if r.role != "source" {
            return Err("resume a migration at its source".into());
        }
        if r.is_finished() {
            return Err(format!("migration {} has already ended ({:?})", r.id, r.phase));
        }
        self.kick.notify_one();
        Ok(())
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel_requested.load(Ordering::SeqCst)
    }

    async fn cancelled(&self) {
        loop {
            let notified = self.cancel.notified();
            if self.cancel_requested() {
                return;
            }
            notified.await;
        }
    }

    /// A snapshot of the report with the live counters filled in.
    pub fn report(&self) -> MigrationReport {
        let mut r = self.report.lock().clone();
        r.link = self.traffic.report();
        if r.total_seconds.is_none() {
            r.elapsed_seconds = self.started.elapsed().as_secs_f64();
        }
        r
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationReport)) {
        f(&mut self.report.lock());
    }

    pub(crate) fn since_start(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn finish(&self, phase: Phase, error: Option<String>) {
        let elapsed = self.since_start();
        self.update(|r| {
            r.phase = phase;
            r.error = error;
            r.total_seconds = Some(elapsed);
            r.elapsed_seconds = elapsed;
        });
    }

    /// Marks the migration interrupted (its state kept) until the link is back.
    pub fn interrupt(&self, why: &str) {
        let mut r = self.report.lock();
        if r.is_finished() {
            return;
        }
        if r.phase != Phase::Interrupted {
            *self.phase_before_interrupt.lock() = Some(r.phase);
        }
        r.phase = Phase::Interrupted;
        r.link_state = format!("down: {why}");
    }

    pub(crate) fn link_up(&self) {
        let mut r = self.report.lock();
        if r.phase == Phase::Interrupted {
            if let Some(p) = self.phase_before_interrupt.lock().take() {
                r.phase = p;
            }
        }
        r.link_state = "up".into();
    }

    pub(crate) fn link_down(&self, why: &str) {
        self.report.lock().link_state = format!("down: {why}");
    }
}

/// Events the link passes to the main task.
#[derive(Debug)]
enum Event {
    RoundDone(u32),
    Switched(DestReport),
    Complete(DestReport),
    /// The destination asked for (or the source needs) a fresh listing; `epoch` is the
    /// outbox's new epoch.
    Rebuild {
        epoch: u64,
    },
    /// The connection dropped; the link reconnects.
    LinkDown,
    /// The link cannot go on (the destination refused, or broke the protocol).
    Fatal(MigrationError),
}

/// Work for the data sender.
#[derive(Debug)]
enum SendWork {
    Want(Vec<Fingerprint>),
    Fetch(Vec<Fingerprint>),
}

/// Sequenced frames not yet acknowledged by the destination, numbered from `base`: what the
/// source resends after a lost link.
#[derive(Debug)]
struct Outbox {
    inner: Mutex<OutboxInner>,
    changed: tokio::sync::Notify,
    /// Set while background DATA must wait (the switch-over).
    hold: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
struct OutboxInner {
    base: u64,
    frames: VecDeque<Frame>,
    /// Bumped when the listing starts over (a rebuild): pushes of an older epoch fail.
    epoch: u64,
    /// Sequence numbers below this were written to some connection already.
    written: u64,
    /// A restarted source has no frames to resend: it takes the destination's count as is.
    adopt: bool,
}

/// Keeps background DATA off the link while it lives (see [`Outbox::hold_background`]).
#[derive(Debug)]
struct BackgroundHold(Arc<Outbox>);

impl Drop for BackgroundHold {
    fn drop(&mut self) {
        self.0.hold.store(false, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

/// Unacknowledged sequenced frames the source holds at most (about 8 MiB of fingerprints).
const OUTBOX_FRAMES: usize = 64;

impl Outbox {
    fn new(adopt: bool) -> Outbox {
        Outbox {
            inner: Mutex::new(OutboxInner { base: 0, frames: VecDeque::new(), epoch: 0, written: 0, adopt }),
            changed: tokio::sync::Notify::new(),
            hold: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Holds background DATA back until the returned guard is dropped; sequenced frames and
    /// on-demand data still go.
    fn hold_background(self: &Arc<Self>) -> BackgroundHold {
        self.hold.store(true, Ordering::SeqCst);
        BackgroundHold(self.clone())
    }

    fn background_held(&self) -> bool {
        self.hold.load(Ordering::SeqCst)
    }

    fn epoch(&self) -> u64 {
        self.inner.lock().epoch
    }

    /// Appends a sequenced message, waiting while the destination is far behind. Fails with
    /// `Restart` once the listing has started over.
    async fn push(&self, epoch: u64, msg: &Message) -> Result<u64, MigrationError> {
        debug_assert!(msg.is_sequenced() || matches!(msg, Message::Error(_)));
        let frame = Frame::new(msg);
        loop {
            let notified = self.changed.notified();
            {
                let mut g = self.inner.lock();
                if g.epoch != epoch {
                    return Err(MigrationError::Restart);
                }
                if g.frames.len() < OUTBOX_FRAMES || matches!(msg, Message::Error(_)) {
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
    fn ack(&self, processed: u64) -> Result<(), MigrationError> {
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
    fn restart(&self) -> u64 {
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
    fn get(&self, seq: u64) -> Option<(Frame, bool)> {
        let g = self.inner.lock();
        let i = seq.checked_sub(g.base)?;
        g.frames.get(i as usize).map(|f| (f.clone(), seq < g.written))
    }

    fn mark_written(&self, seq: u64) {
        let mut g = self.inner.lock();
        g.written = g.written.max(seq + 1);
        drop(g);
        self.changed.notify_waiters();
    }

    /// Waits until frame `seq` has been written to a connection.
    async fn wait_written(&self, seq: u64) {
        loop {
            let notified = self.changed.notified();
            if self.inner.lock().written > seq {
                return;
            }
            notified.await;
        }
    }
}

/// Runs a whole migration of `disk` over `stream` (connected to the destination's migration
/// listener). A lost link fails the migration: `stream` cannot be reopened. Servers use
/// [`run_source_with`], which reconnects.
pub async fn run_source<S>(
    store: Arc<Store>,
    disk: &str,
    stream: S,
    config: SourceConfig,
    hooks: Arc<dyn SourceHooks>,
    status: Arc<MigrationStatus>,
) -> Result<MigrationReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let config = SourceConfig { reconnect_window_secs: 0, ..config };
    run_source_with(store, disk, Arc::new(OneShot::new(stream)), config, hooks, status, None).await
}

/// Runs a whole migration of `disk`, connecting (and after a lost link, reconnecting with
/// backoff) through `connector`. `state` keeps a record a restarted server resumes from.
pub async fn run_source_with(
    store: Arc<Store>,
    disk: &str,
    connector: Arc<dyn Connector>,
    config: SourceConfig,
    hooks: Arc<dyn SourceHooks>,
    status: Arc<MigrationStatus>,
    state: Option<Arc<dyn StateStore>>,
) -> Result<MigrationReport, MigrationError> {
    let info = store.disk(disk)?;
    status.update(|r| {
        r.switch_after = config.switch_after;
        r.disk_bytes = info.size;
        r.block_size = store.block_size();
    });
    let mut flags = Flags { frozen: false, switch_sent: false, switched: false };
    let src =
        Source { store: store.clone(), disk_id: info.id, disk: disk.to_string(), config: config.clone(), hooks: hooks.clone(), status: status.clone(), state };
    let result = src.migrate(connector, &mut flags).await;
    match &result {
        Ok(()) => {
            if config.delete_source {
                let s = store.clone();
                let name = disk.to_string();
                blocking(move || s.delete_disk(&name)).await?;
            }
            src.forget();
            status.finish(Phase::Done, None);
        }
        Err(e) => {
            let _ = store.dirty_stop(info.id);
            // Once SWITCH may have reached the destination, only it knows whether it switched:
            // thawing here could leave two writable copies.
            if flags.frozen && !flags.switch_sent {
                hooks.thaw(disk);
            }
            if flags.switch_sent && !flags.switched {
                tracing::error!(disk, "the link failed during the switch-over; the disk stays frozen here until the migration is resumed");
                status.interrupt(&e.to_string());
                status.update(|r| r.error = Some(e.to_string()));
            } else {
                if !flags.switched {
                    src.forget();
                }
                let phase = if matches!(e, MigrationError::Cancelled) { Phase::Cancelled } else { Phase::Failed };
                status.finish(phase, Some(e.to_string()));
            }
            tracing::error!(disk, error = %e, switched = flags.switched, "migration ended without completing");
        }
    }
    result.map(|_| status.report())
}

struct Flags {
    frozen: bool,
    switch_sent: bool,
    switched: bool,
}

struct Source {
    store: Arc<Store>,
    disk_id: DiskId,
    disk: String,
    config: SourceConfig,
    hooks: Arc<dyn SourceHooks>,
    status: Arc<MigrationStatus>,
    state: Option<Arc<dyn StateStore>>,
}

/// What the main task waits on, and what it sends through.
struct LinkHandle {
    outbox: Arc<Outbox>,
    events: mpsc::UnboundedReceiver<Event>,
}

impl Source {
    /// Saves where the migration stands (two fsyncs: on the blocking pool).
    async fn record(&self, stage: Stage) {
        let Some(state) = self.state.clone() else { return };
        let peer = self.status.report().peer;
        let record = MigrationRecord {
            id: self.config.migration_id.clone(),
            role: "source".into(),
            disk: self.disk.clone(),
            peer,
            stage,
            config: Some(self.config.clone()),
            hello: None,
        };
        let id = record.id.clone();
        if let Err(e) = blocking(move || state.save(&record)).await {
            tracing::error!(id = %id, error = %e, "cannot record the migration's progress; a restart would lose it");
        }
    }

    fn forget(&self) {
        if let Some(state) = &self.state {
            if let Err(e) = state.remove(&self.config.migration_id) {
                tracing::warn!(error = %e, "cannot remove a finished migration's record");
            }
        }
    }

    async fn migrate(&self, connector: Arc<dyn Connector>, flags: &mut Flags) -> Result<(), MigrationError> {
        let info = self.store.disk(&self.disk)?;
        let restarted = self.config.restarted_at;
        let hello = Hello {
            migration_id: self.config.migration_id.clone(),
            disk: self.disk.clone(),
            size: info.size,
            block_size: self.store.block_size(),
            algorithm: self.store.algorithm().name().to_string(),
            mode: Mode::Migrate,
            resume: restarted.is_some(),
            rebuild: false,
            // Converged mode wants the dirty data before the switch-over; the others leave
            // it for post-copy, so their dirty rounds only list.
            defer_dirty: self.config.switch_after != SwitchAfter::Converged,
        };
        let outbox = Arc::new(Outbox::new(restarted.is_some()));
        let (event_tx, events) = mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let supervisor = LinkSupervisor {
            connector,
            hello,
            ask_rebuild: matches!(restarted, Some(Stage::PreCopy)),
            outbox: outbox.clone(),
            events: event_tx,
            store: self.store.clone(),
            config: self.config.clone(),
            status: self.status.clone(),
            stop: stop_rx,
            ever_sent: Arc::new(Mutex::new(HashSet::new())),
            ever_connected: false,
        };
        let link_task = tokio::spawn(supervisor.run());
        let mut link = LinkHandle { outbox, events };
        let result = self.drive(&mut link, flags).await;
        if matches!(result, Err(MigrationError::Cancelled)) {
            // Tell the destination, so it deletes its partial disk; give it a few seconds
            // (the link may be down: then its operator cancels there, or it times out).
            let epoch = link.outbox.epoch();
            if let Ok(seq) = link.outbox.push(epoch, &Message::Error(ErrorMessage { message: "cancelled by the operator at the source".into() })).await {
                self.status.kick.notify_one();
                if tokio::time::timeout(Duration::from_secs(10), link.outbox.wait_written(seq)).await.is_err() {
                    tracing::warn!("could not tell the destination about the cancel; its partial disk stays until it is cancelled there");
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let _ = stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), link_task).await;
        result
    }

    async fn drive(&self, link: &mut LinkHandle, flags: &mut Flags) -> Result<(), MigrationError> {
        let mut stage = self.config.restarted_at.unwrap_or(Stage::PreCopy);
        let mut rebuild = stage != Stage::Switched && self.config.restarted_at.is_some();
        if stage == Stage::SwitchingOver {
            // Restarted while frozen: the disk was never exported again, and SWITCH may have
            // arrived before the restart.
            flags.frozen = true;
            flags.switch_sent = true;
            self.status.update(|r| r.cancellable = false);
        }
        self.record(stage).await;
        if stage != Stage::Switched {
            let report = loop {
                let epoch = link.outbox.epoch();
                match self.pre_switch(link, epoch, rebuild, flags).await {
                    Ok(r) => break r,
                    Err(MigrationError::Restart) => {
                        tracing::info!(disk = %self.disk, "listing the disk again for the destination");
                        rebuild = true;
                    }
                    Err(MigrationError::AlreadySwitched(r)) => break r,
                    Err(e) => return Err(e),
                }
            };
            flags.switched = true;
            stage = Stage::Switched;
            // The guest follows its disk as soon as this export closes, so that comes first;
            // a restart before the record below still finds `SwitchingOver`, which never
            // exports the disk again either.
            self.hooks.switched(&self.disk);
            self.record(stage).await;
            let at = self.status.since_start();
            self.status.update(|r| {
                r.switch_seconds = Some(at);
                r.phase = Phase::PostCopy;
                r.cancellable = false;
                r.destination = report;
            });
        } else {
            flags.frozen = true;
            flags.switch_sent = true;
            flags.switched = true;
            self.hooks.switched(&self.disk);
            self.status.update(|r| {
                r.phase = Phase::PostCopy;
                r.cancellable = false;
            });
        }
        let _ = stage;

        // Post-copy: serve fetches until the destination has everything.
        let report = loop {
            if let Event::Complete(r) = self.next_event(link, u64::MAX).await? {
                break r;
            }
        };
        self.status.update(|r| r.destination = report);
        let epoch = link.outbox.epoch();
        let bye = link.outbox.push(epoch, &Message::Bye).await?;
        if tokio::time::timeout(Duration::from_secs(30), link.outbox.wait_written(bye)).await.is_err() {
            tracing::warn!("the destination has every block, but BYE could not be sent");
        }
        Ok(())
    }

    /// Waits for the link's next event. A fatal link error ends the migration; a rebuild
    /// newer than `epoch` restarts the listing; a lost link only shows in the status.
    async fn next_event(&self, link: &mut LinkHandle, epoch: u64) -> Result<Event, MigrationError> {
        loop {
            match link.events.recv().await {
                Some(Event::Fatal(e)) => return Err(e),
                Some(Event::Rebuild { epoch: e }) if e > epoch && epoch != u64::MAX => return Err(MigrationError::Restart),
                Some(Event::Rebuild { .. }) => {}
                Some(Event::LinkDown) => {}
                Some(other) => return Ok(other),
                None => return Err(MigrationError::Closed),
            }
        }
    }

    async fn wait_round(&self, link: &mut LinkHandle, epoch: u64, round: u32) -> Result<(), MigrationError> {
        loop {
            match self.next_event(link, epoch).await? {
                Event::RoundDone(r) if r == round => return Ok(()),
                Event::RoundDone(_) => {}
                Event::Switched(r) => return Err(MigrationError::AlreadySwitched(r)),
                Event::Complete(_) => return Err(MigrationError::Unexpected("COMPLETE")),
                _ => {}
            }
        }
    }

    /// Everything up to the destination's SWITCHED: the listing, the dirty rounds, the
    /// freeze and the final round. Starts over (`Restart`) when the destination asks.
    async fn pre_switch(&self, link: &mut LinkHandle, epoch: u64, rebuild: bool, flags: &mut Flags) -> Result<DestReport, MigrationError> {
        let (store, disk_id, config, status) = (&self.store, self.disk_id, &self.config, &self.status);
        let tracking = !flags.frozen;
        if tracking {
            // Dirty tracking starts before the snapshot: a write either is in the snapshot or
            // marks its block dirty (or both).
            store.dirty_start(disk_id)?;
            status.update(|r| r.phase = Phase::PreCopy);
        }
        let snapshot = {
            let s = store.clone();
            blocking(move || s.map_snapshot(disk_id)).await?
        };
        let outbox = link.outbox.clone();
        let listing = async {
            let listed = send_snapshot(snapshot, &outbox, epoch, rebuild).await?;
            status.update(|r| {
                r.rounds = 1;
                r.round_blocks = vec![listed];
            });
            outbox.push(epoch, &Message::RoundEnd { round: 0, last: false }).await?;
            Ok::<_, MigrationError>(())
        };
        let mut round = 0u32;
        let mut carried: Vec<u64> = Vec::new();
        let mut hold: Option<BackgroundHold> = None;
        if !flags.frozen {
            let pre = async {
                listing.await?;
                if config.switch_after != SwitchAfter::Fingerprints {
                    self.wait_round(link, epoch, round).await?;
                    // Dirty rounds while the set shrinks, so that little is left to list
                    // inside the freeze. In converged mode each round waits for its data; in
                    // precopy mode the destination defers the data to post-copy
                    // (`defer_dirty`), so a round is a listing and takes milliseconds.
                    let mut previous = u64::MAX;
                    while round + 1 < config.max_rounds {
                        let dirty = store.dirty_take(disk_id)?;
                        let count = dirty.count();
                        if count <= config.converge_blocks || count >= previous {
                            carried = dirty.iter().collect();
                            break;
                        }
                        previous = count;
                        round += 1;
                        let blocks: Vec<u64> = dirty.iter().collect();
                        send_dirty_round(store, disk_id, round, &blocks, &link.outbox, epoch).await?;
                        status.update(|r| {
                            r.rounds = round + 1;
                            r.round_blocks.push(count);
                        });
                        link.outbox.push(epoch, &Message::RoundEnd { round, last: false }).await?;
                        self.wait_round(link, epoch, round).await?;
                    }
                }
                Ok::<_, MigrationError>(())
            };
            // Until the freeze, an operator may cancel: the source stays authoritative.
            tokio::select! {
                r = pre => r?,
                _ = status.cancelled() => return Err(MigrationError::Cancelled),
            }
            if status.cancel_requested() {
                return Err(MigrationError::Cancelled);
            }
            status.update(|r| {
                r.cancellable = false;
                r.phase = Phase::SwitchingOver;
            });
            // A restart from here on keeps the disk frozen until the destination says.
            self.record(Stage::SwitchingOver).await;
            // From the freeze until SWITCH is written, no background data enters the link:
            // SWITCH must not wait behind it in the link's queue.
            hold = Some(link.outbox.hold_background());
            let freeze_start = Instant::now();
            self.hooks.freeze(&self.disk).await.map_err(MigrationError::Hook)?;
            flags.frozen = true;
            self.freeze_started(freeze_start);
        } else {
            listing.await?;
        }

        // Switch-over: the final dirty set, SWITCH, then wait for SWITCHED.
        round += 1;
        let mut blocks: Vec<u64> = Vec::new();
        if tracking {
            blocks = store.dirty_take(disk_id)?.iter().collect();
            store.dirty_stop(disk_id)?;
        }
        if !carried.is_empty() {
            blocks.extend(carried);
            blocks.sort_unstable();
            blocks.dedup();
        }
        send_dirty_round(store, disk_id, round, &blocks, &link.outbox, epoch).await?;
        link.outbox.push(epoch, &Message::RoundEnd { round, last: true }).await?;
        flags.switch_sent = true;
        link.outbox.push(epoch, &Message::Switch).await?;
        // The writer sends sequenced frames before background data, so SWITCH goes first.
        drop(hold);
        let report = loop {
            match self.next_event(link, epoch).await? {
                Event::Switched(r) => break r,
                Event::Complete(_) => return Err(MigrationError::Unexpected("COMPLETE")),
                _ => {}
            }
        };
        let downtime = self.freeze_elapsed();
        status.update(|r| {
            r.rounds = round + 1;
            r.round_blocks.push(blocks.len() as u64);
            r.downtime_ms = downtime.map(|d| d.as_secs_f64() * 1000.0);
        });
        tracing::info!(disk = %self.disk, downtime_ms = downtime.map(|d| d.as_secs_f64() * 1000.0), "switched over");
        Ok(report)
    }

    fn freeze_started(&self, at: Instant) {
        self.status.freeze_at.lock().replace(at);
    }

    fn freeze_elapsed(&self) -> Option<Duration> {
        self.status.freeze_at.lock().map(|t| t.elapsed())
    }
}
/// Owns the connection: connects (again after a lost link, with backoff), resumes where the
/// destination stands, and runs the reader, writer and data sender of each connection.
struct LinkSupervisor {
    connector: Arc<dyn Connector>,
    hello: Hello,
    /// The first HELLO asks for a fresh listing (a restarted source lost its dirty bitmap).
    ask_rebuild: bool,
    outbox: Arc<Outbox>,
    events: mpsc::UnboundedSender<Event>,
    store: Arc<Store>,
    config: SourceConfig,
    status: Arc<MigrationStatus>,
    stop: tokio::sync::watch::Receiver<bool>,
    /// Every fingerprint sent on any connection (to count what a lost link made us resend).
    ever_sent: Arc<Mutex<HashSet<Fingerprint>>>,
    /// A connection was accepted once (later failures are lost links, not a bad address).
    ever_connected: bool,
}

enum SessionEnd {
    Stopped,
    Lost(MigrationError),
    Fatal(MigrationError),
}

impl LinkSupervisor {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn run(mut self) {
        let mut first = true;
        loop {
            let Some(stream) = self.connect().await else {
                return;
            };
            if !first {
                self.status.traffic.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            match self.session(stream, first).await {
                (SessionEnd::Stopped, _) => return,
                (SessionEnd::Fatal(e), _) => {
                    let _ = self.events.send(Event::Fatal(e));
                    return;
                }
                (SessionEnd::Lost(e), accepted) => {
                    if self.stopping() {
                        return;
                    }
                    tracing::warn!(error = %e, "migration link lost; reconnecting");
                    self.status.link_down(&e.to_string());
                    let _ = self.events.send(Event::LinkDown);
                    if accepted {
                        self.ever_connected = true;
                        first = false;
                        self.ask_rebuild = false;
                        self.hello.resume = true;
                    }
                }
            }
        }
    }

    /// Connects, retrying with backoff; past the reconnect window the migration is
    /// interrupted until an operator resumes it (or it is stopped). None when stopped.
    async fn connect(&mut self) -> Option<LinkStream> {
        let mut backoff = Backoff::default();
        let mut since = Instant::now();
        let window = Duration::from_secs(self.config.reconnect_window_secs);
        loop {
            if self.stopping() {
                return None;
            }
            let attempt = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(30), self.connector.connect()) => r,
                _ = self.stop.changed() => return None,
            };
            let err = match attempt {
                Ok(Ok(s)) => return Some(s),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connecting timed out".to_string(),
            };
            tracing::warn!(error = %err, "cannot reach the destination");
            self.status.link_down(&err);
            if window.is_zero() || (!self.hello.resume && self.status.traffic.reconnects.load(Ordering::Relaxed) == 0 && !self.ever_connected) {
                // No reconnecting (a one-shot link), or a new migration whose destination
                // cannot be reached at all: fail now.
                let _ = self.events.send(Event::Fatal(MigrationError::Io(std::io::Error::new(std::io::ErrorKind::NotConnected, err))));
                return None;
            }
            if since.elapsed() >= window {
                tracing::error!(window_secs = window.as_secs(), "gave up reconnecting; the migration is interrupted until it is resumed");
                self.status.interrupt(&err);
                tokio::select! {
                    _ = self.status.kick.notified() => {}
                    _ = self.stop.changed() => return None,
                }
                backoff = Backoff::default();
                since = Instant::now();
                continue;
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.status.kick.notified() => {}
                _ = self.stop.changed() => return None,
            }
        }
    }

    /// One connection; also says whether the destination accepted it.
    async fn session(&mut self, mut stream: LinkStream, first: bool) -> (SessionEnd, bool) {
        let traffic = &self.status.traffic;
        let handshake = async {
            exchange_greetings(&mut stream, traffic).await?;
            let hello = Hello { rebuild: self.ask_rebuild, ..self.hello.clone() };
            crate::wire::write_message(&mut stream, &Message::Hello(hello), traffic).await?;
            match read_message(&mut stream, traffic).await? {
                Some(Message::Accept(info)) => Ok(info),
                Some(Message::Error(e)) => Err(MigrationError::Refused(e.message)),
                Some(other) => Err(MigrationError::Unexpected(other.name())),
                None => Err(MigrationError::Closed),
            }
        };
        let info = match tokio::time::timeout(Duration::from_secs(60), handshake).await {
            Ok(Ok(info)) => info,
            // A destination that refuses the very first connection of a new migration is
            // not a lost link: fail at once. A resumed one may be restarting: retry.
            Ok(Err(e)) if is_link_error(&e) && (!first || self.hello.resume) => return (SessionEnd::Lost(e), false),
            Ok(Err(e)) => return (SessionEnd::Fatal(e), false),
            Err(_) => return (SessionEnd::Lost(MigrationError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))), false),
        };
        let cursor = if info.rebuild {
            let epoch = self.outbox.restart();
            let _ = self.events.send(Event::Rebuild { epoch });
            0
        } else {
            if let Err(e) = self.outbox.ack(info.processed) {
                return (SessionEnd::Fatal(e), true);
            }
            info.processed
        };
        if !first {
            tracing::info!(processed = info.processed, switched = info.switched, rebuild = info.rebuild, "migration link resumed");
        }
        self.status.link_up();

        let (reader, writer) = tokio::io::split(stream);
        let (urgent_tx, urgent_rx) = mpsc::channel::<DataFrame>(16);
        let (low_tx, low_rx) = mpsc::channel::<DataFrame>(4);
        let (work_tx, work_rx) = mpsc::unbounded_channel::<SendWork>();
        let limiter = self.config.bandwidth_bps.map(crate::ratelimit::TokenBucket::new);
        let mut writer_task =
            tokio::spawn(run_writer(writer, self.outbox.clone(), cursor, urgent_rx, low_rx, self.status.clone(), limiter, self.ever_sent.clone()));
        let mut reader_task = tokio::spawn(run_reader(reader, self.events.clone(), work_tx, self.outbox.clone(), self.status.clone()));
        let sender_task = tokio::spawn(run_data_sender(self.store.clone(), work_rx, urgent_tx, low_tx, self.config.clone(), self.status.clone()));
        let mut writer_done = false;
        let end = tokio::select! {
            r = &mut reader_task => match r {
                Ok(Ok(())) if self.stopping() => SessionEnd::Stopped,
                Ok(Ok(())) => SessionEnd::Lost(MigrationError::Closed),
                Ok(Err(e)) if is_link_error(&e) => SessionEnd::Lost(e),
                Ok(Err(e)) => SessionEnd::Fatal(e),
                Err(_) => SessionEnd::Lost(MigrationError::Closed),
            },
            w = &mut writer_task => {
                writer_done = true;
                match w {
                Ok(Ok(())) if self.stopping() => SessionEnd::Stopped,
                Ok(Ok(())) => SessionEnd::Lost(MigrationError::Closed),
                Ok(Err(e)) if is_link_error(&e) => SessionEnd::Lost(e),
                Ok(Err(e)) => SessionEnd::Fatal(e),
                Err(_) => SessionEnd::Lost(MigrationError::Closed),
                }
            }
            _ = self.stop.changed() => SessionEnd::Stopped,
        };
        if matches!(end, SessionEnd::Stopped) && !writer_done {
            // Let the writer finish what is queued (BYE, ERROR) before closing.
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut writer_task).await;
        }
        sender_task.abort();
        reader_task.abort();
        writer_task.abort();
        (end, true)
    }
}

/// Errors that a new connection may cure. A TLS alert (the peer refused our certificate, or
/// sent garbage) is not one of them.
fn is_link_error(e: &MigrationError) -> bool {
    match e {
        MigrationError::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
        MigrationError::Closed => true,
        _ => false,
    }
}

async fn send(tx: &mpsc::Sender<Frame>, msg: Message) -> Result<(), MigrationError> {
    tx.send(Frame::new(&msg)).await.map_err(|_| MigrationError::Closed)
}

/// The next frame's worth of a map snapshot (read on the blocking pool; the snapshot moves
/// there and back).
async fn next_batch(mut snapshot: cas_store::MapSnapshot) -> Result<(Vec<(u64, Fingerprint)>, cas_store::MapSnapshot), MigrationError> {
    blocking(move || {
        let batch = snapshot.next_batch(FINGERPRINTS_PER_FRAME);
        batch.map(|b| (b, snapshot))
    })
    .await
}

/// Streams a map snapshot as FINGERPRINTS frames of consecutive-block runs. With `gaps`, the
/// blocks between mapped ones are listed as zero runs (a destination that already holds
/// part of the disk must clear blocks the source no longer has).
async fn send_snapshot(mut snapshot: cas_store::MapSnapshot, outbox: &Outbox, epoch: u64, gaps: bool) -> Result<u64, MigrationError> {
    let mut listed = 0u64;
    let mut next_block = 0u64;
    let blocks = snapshot.disk_size().div_ceil(u64::from(snapshot.block_size()));
    loop {
        let (batch, snap) = next_batch(snapshot).await?;
        snapshot = snap;
        if batch.is_empty() {
            if gaps && next_block < blocks {
                let runs = vec![Run::Zero { first: next_block, count: blocks - next_block }];
                outbox.push(epoch, &Message::Fingerprints { round: 0, runs }).await?;
            }
            return Ok(listed);
        }
        listed += batch.len() as u64;
        let mut runs = Vec::with_capacity(batch.len() / 8 + 2);
        for (block, fp) in batch {
            if gaps && block > next_block {
                runs.push(Run::Zero { first: next_block, count: block - next_block });
            }
            next_block = block + 1;
            match runs.last_mut() {
                Some(Run::Mapped { first, fps }) if *first + fps.len() as u64 == block => fps.push(fp),
                _ => runs.push(Run::Mapped { first: block, fps: vec![fp] }),
            }
        }
        outbox.push(epoch, &Message::Fingerprints { round: 0, runs }).await?;
    }
}

/// Lists the current content of dirty blocks (zero runs for blocks that read as zeros).
async fn send_dirty_round(store: &Arc<Store>, disk: DiskId, round: u32, blocks: &[u64], outbox: &Outbox, epoch: u64) -> Result<(), MigrationError> {
    for chunk in blocks.chunks(FINGERPRINTS_PER_FRAME) {
        let s = store.clone();
        let owned = chunk.to_vec();
        let fps = blocking(move || s.block_fingerprints(disk, &owned)).await?;
        let runs = runs_of(chunk.iter().copied().zip(fps));
        outbox.push(epoch, &Message::Fingerprints { round, runs }).await?;
    }
    Ok(())
}

/// Groups ascending (block, content) pairs into runs of consecutive blocks.
pub(crate) fn runs_of(entries: impl IntoIterator<Item = (u64, Option<Fingerprint>)>) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for (block, fp) in entries {
        match (runs.last_mut(), fp) {
            (Some(Run::Mapped { first, fps }), Some(fp)) if *first + fps.len() as u64 == block => fps.push(fp),
            (Some(Run::Zero { first, count }), None) if *first + *count == block => *count += 1,
            (_, Some(fp)) => runs.push(Run::Mapped { first: block, fps: vec![fp] }),
            (_, None) => runs.push(Run::Zero { first: block, count: 1 }),
        }
    }
    runs
}

async fn run_reader<R: AsyncRead + Unpin>(
    mut reader: R,
    events: mpsc::UnboundedSender<Event>,
    work: mpsc::UnboundedSender<SendWork>,
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
            Message::Fetch(fps) => work.send(SendWork::Fetch(fps)).is_ok(),
            Message::RoundDone { round } => events.send(Event::RoundDone(round)).is_ok(),
            Message::Switched(r) => events.send(Event::Switched(r)).is_ok(),
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
struct DataFrame {
    frame: Frame,
    fps: Vec<Fingerprint>,
    record_bytes: u64,
}

/// Writes frames: on-demand data first, then the sequenced frames from `cursor` on, then
/// background data.
#[allow(clippy::too_many_arguments)]
async fn run_writer<W: AsyncWrite + Unpin>(
    mut writer: W,
    outbox: Arc<Outbox>,
    mut cursor: u64,
    mut urgent: mpsc::Receiver<DataFrame>,
    mut low: mpsc::Receiver<DataFrame>,
    status: Arc<MigrationStatus>,
    mut limiter: Option<crate::ratelimit::TokenBucket>,
    ever_sent: Arc<Mutex<HashSet<Fingerprint>>>,
) -> Result<(), MigrationError> {
    use tokio::io::AsyncWriteExt;
    loop {
        let notified = outbox.changed.notified();
        let mut sequenced = None;
        let mut data = None;
        let frame = if let Ok(d) = urgent.try_recv() {
            let f = d.frame.clone();
            data = Some(d);
            f
        } else if let Some((f, again)) = outbox.get(cursor) {
            if again {
                status.traffic.replayed.fetch_add(f.len() as u64, Ordering::Relaxed);
            }
            sequenced = Some(cursor);
            cursor += 1;
            f
        } else if let Some(d) = if outbox.background_held() { None } else { low.try_recv().ok() } {
            let f = d.frame.clone();
            data = Some(d);
            f
        } else {
            writer.flush().await?;
            let held = outbox.background_held();
            let d = tokio::select! {
                biased;
                d = urgent.recv() => match d {
                    Some(d) => d,
                    None => return Ok(()),
                },
                _ = notified => continue,
                Some(d) = low.recv(), if !held => d,
            };
            let f = d.frame.clone();
            data = Some(d);
            f
        };
        // The cap applies to every frame, so on-demand data, which goes first, stays first
        // under the cap.
        if let Some(bucket) = limiter.as_mut() {
            let wait = bucket.charge(frame.len());
            if !wait.is_zero() {
                writer.flush().await?;
                tokio::time::sleep(wait).await;
            }
        }
        write_frame(&mut writer, &frame, &status.traffic).await?;
        if let Some(d) = data {
            let mut ever = ever_sent.lock();
            let again = d.fps.iter().filter(|fp| !ever.insert(**fp)).count() as u64;
            if again > 0 {
                let per = d.record_bytes / d.fps.len().max(1) as u64;
                status.traffic.resent_raw.fetch_add(again * per, Ordering::Relaxed);
            }
        }
        if let Some(seq) = sequenced {
            if urgent.is_empty() && low.is_empty() {
                writer.flush().await?;
            }
            outbox.mark_written(seq);
        }
    }
}

/// Sends DATA frames for wanted blocks: on-demand fetches go first, in small frames, on the
/// urgent queue; the background queue fills larger frames.
async fn run_data_sender(
    store: Arc<Store>,
    mut work: mpsc::UnboundedReceiver<SendWork>,
    high: mpsc::Sender<DataFrame>,
    low: mpsc::Sender<DataFrame>,
    config: SourceConfig,
    status: Arc<MigrationStatus>,
) {
    let block_size = store.block_size() as usize;
    let per_batch = (config.batch_bytes / (block_size + 17)).max(1);
    let mut urgent: VecDeque<Fingerprint> = VecDeque::new();
    let mut background: VecDeque<Fingerprint> = VecDeque::new();
    let mut sent: HashSet<Fingerprint> = HashSet::new();
    let mut level = LevelController::new(config.zstd_level);
    loop {
        // Take everything queued, then block for more only when idle.
        loop {
            let item = if urgent.is_empty() && background.is_empty() {
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
                SendWork::Want(fps) => background.extend(fps),
                SendWork::Fetch(fps) => urgent.extend(fps),
            }
        }
        let is_urgent = !urgent.is_empty();
        let queue = if is_urgent { &mut urgent } else { &mut background };
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
        let lvl = level.level();
        let built = blocking(move || {
            let blocks = s.get_blocks(&batch)?;
            let records: Vec<Record> = batch
                .iter()
                .zip(blocks)
                .map(|(fp, b)| match b {
                    Some(data) => Record::Block { fp: *fp, data: data.to_vec() },
                    None => Record::Gone(*fp),
                })
                .collect();
            let gone: Vec<Fingerprint> = records.iter().filter_map(|r| if let Record::Gone(fp) = r { Some(*fp) } else { None }).collect();
            let mut raw = Vec::with_capacity(records.len() * (block_size + 17));
            encode_records(&records, &mut raw);
            let started = Instant::now();
            let frame = compress(&raw, lvl);
            Ok::<_, MigrationError>((raw.len(), frame, started.elapsed(), batch, gone))
        })
        .await;
        let (raw_len, frame, compress_time, batch, gone) = match built {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reading blocks to send failed");
                return;
            }
        };
        // A block that is gone was not sent; if it is asked for again, try again.
        for fp in &gone {
            sent.remove(fp);
        }
        status.traffic.data_raw.fetch_add(raw_len as u64, Ordering::Relaxed);
        status.update(|r| {
            r.blocks_sent += (batch.len() - gone.len()) as u64;
            r.zstd_level = lvl;
        });
        let sent_fps: Vec<Fingerprint> = batch.into_iter().filter(|fp| !gone.contains(fp)).collect();
        let frame = DataFrame { frame: Frame::new(&Message::Data { raw_len: raw_len as u32, frame }), fps: sent_fps, record_bytes: raw_len as u64 };
        let wait_start = Instant::now();
        let tx = if is_urgent { &high } else { &low };
        if tx.send(frame).await.is_err() {
            return;
        }
        let waited = wait_start.elapsed();
        if !is_urgent {
            level.observe(compress_time, waited);
        }
    }
}

/// Streams a map snapshot for a plan (no resume: a plan is cheap to run again).
async fn send_plan_snapshot(mut snapshot: cas_store::MapSnapshot, tx: &mpsc::Sender<Frame>) -> Result<u64, MigrationError> {
    let mut listed = 0u64;
    loop {
        let (batch, snap) = next_batch(snapshot).await?;
        snapshot = snap;
        if batch.is_empty() {
            return Ok(listed);
        }
        listed += batch.len() as u64;
        let runs = runs_of(batch.into_iter().map(|(b, fp)| (b, Some(fp))));
        send(tx, Message::Fingerprints { round: 0, runs }).await?;
    }
}

/// Compares a disk's fingerprints with a destination's store without moving any data.
pub async fn run_plan<S>(
    store: Arc<Store>,
    disk: &str,
    destination: &str,
    mut stream: S,
    link_rate_bps: Option<u64>,
    zstd_level: i32,
) -> Result<PlanReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let traffic = Traffic::default();
    exchange_greetings(&mut stream, &traffic).await?;
    let info = store.disk(disk)?;
    let hello = Hello {
        migration_id: format!("plan-{disk}"),
        disk: disk.to_string(),
        size: info.size,
        block_size: store.block_size(),
        algorithm: store.algorithm().name().to_string(),
        mode: Mode::Plan,
        resume: false,
        rebuild: false,
        defer_dirty: false,
    };
    crate::wire::write_message(&mut stream, &Message::Hello(hello), &traffic).await?;
    match read_message(&mut stream, &traffic).await? {
        Some(Message::Accept(_)) => {}
        Some(Message::Error(e)) => return Err(MigrationError::Refused(e.message)),
        Some(other) => return Err(MigrationError::Unexpected(other.name())),
        None => return Err(MigrationError::Closed),
    }
    let snapshot = {
        let s = store.clone();
        blocking(move || s.map_snapshot(info.id)).await?
    };
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(4);
    let traffic = Arc::new(traffic);
    let t = traffic.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            write_frame(&mut writer, &f, &t).await?;
        }
        use tokio::io::AsyncWriteExt;
        writer.flush().await?;
        Ok::<_, MigrationError>(writer)
    });
    let listed = send_plan_snapshot(snapshot, &tx).await?;
    send(&tx, Message::RoundEnd { round: 0, last: true }).await?;
    drop(tx);
    let _writer = writer_task.await.map_err(|_| MigrationError::Closed)??;
    let mut wanted: Vec<Fingerprint> = Vec::new();
    let report = loop {
        match read_message(&mut reader, &traffic).await? {
            Some(Message::Want(fps)) => wanted.extend(fps),
            Some(Message::Plan(r)) => break r,
            Some(Message::Error(e)) => return Err(MigrationError::Refused(e.message)),
            Some(other) => return Err(MigrationError::Unexpected(other.name())),
            None => return Err(MigrationError::Closed),
        }
    };
    // What the missing blocks would cost on the wire: compress them here, as a migration
    // would, in batches of the same size.
    let s = store.clone();
    let block_size = store.block_size() as usize;
    let compressed = blocking(move || {
        let mut total = 0u64;
        for chunk in wanted.chunks((1 << 20) / (block_size + 17)) {
            let blocks = s.get_blocks(chunk)?;
            let records: Vec<Record> = chunk.iter().zip(blocks).filter_map(|(fp, b)| b.map(|d| Record::Block { fp: *fp, data: d.to_vec() })).collect();
            let mut raw = Vec::new();
            encode_records(&records, &mut raw);
            total += (compress(&raw, zstd_level).len() + 9) as u64;
        }
        Ok::<_, MigrationError>(total)
    })
    .await?;
    let fingerprint_bytes = traffic.report().total_bytes;
    let estimated = compressed + fingerprint_bytes;
    Ok(PlanReport {
        disk: disk.to_string(),
        destination: destination.to_string(),
        disk_bytes: info.size,
        block_size: store.block_size(),
        allocated_blocks: listed,
        neighbour_hits: report.neighbour_hits,
        duplicates: report.duplicates,
        zero_blocks: report.zero_blocks,
        missing_blocks: report.wanted,
        missing_bytes: report.wanted * block_size as u64,
        missing_compressed_bytes: compressed,
        fingerprint_bytes,
        estimated_link_bytes: estimated,
        link_rate_bps,
        estimated_seconds: link_rate_bps.map(|r| estimated as f64 * 8.0 / r as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_blocks() {
        let fp = |b: u8| Some(Fingerprint([b; 16]));
        let runs = runs_of(vec![(1, fp(1)), (2, fp(2)), (4, fp(4)), (5, None), (6, None), (7, fp(7))]);
        assert_eq!(
            runs,
            vec![
                Run::Mapped { first: 1, fps: vec![fp(1).unwrap(), fp(2).unwrap()] },
                Run::Mapped { first: 4, fps: vec![fp(4).unwrap()] },
                Run::Zero { first: 5, count: 2 },
                Run::Mapped { first: 7, fps: vec![fp(7).unwrap()] },
            ]
        );
    }

    /// The switch-over's hold: background DATA queued before the freeze goes out only after
    /// the sequenced frames pushed while held (the final listing, SWITCH).
    #[tokio::test]
    async fn held_background_data_goes_after_switch() {
        let outbox = Arc::new(Outbox::new(false));
        let (_urgent_tx, urgent_rx) = mpsc::channel(4);
        let (low_tx, low_rx) = mpsc::channel(4);
        let status = MigrationStatus::new(MigrationReport::new("t", "vm", "source", "peer"));
        let (ours, mut theirs) = tokio::io::duplex(1 << 20);
        let hold = outbox.hold_background();
        let data = Message::Data { raw_len: 3, frame: vec![1, 2, 3] };
        low_tx.send(DataFrame { frame: Frame::new(&data), fps: vec![Fingerprint([9; 16])], record_bytes: 3 }).await.unwrap();
        let writer = tokio::spawn(run_writer(ours, outbox.clone(), 0, urgent_rx, low_rx, status.clone(), None, Default::default()));
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
}
