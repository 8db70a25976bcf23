//! The source's main task: listing, dirty rounds, freeze, switch-over, post-copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_store::{DiskId, Store};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use super::state::SourceState;
use super::*;
use crate::link::{Connector, OneShot};
use crate::protocol::{DestReport, ErrorMessage, Hello, Message, Mode};
use crate::report::{MigrationReport, Phase, SwitchAfter};
use crate::state::{MigrationRecord, Stage, StateStore};
use crate::{blocking, MigrationError};

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
    status.cap.set(config.bandwidth_bps);
    status.update(|r| {
        r.bandwidth_bps = config.bandwidth_bps;
        r.gang = config.gang.clone();
        r.switch_after = config.switch_after;
        r.disk_bytes = info.size;
        r.block_size = store.block_size();
    });
    let mut at = SourceState::restarted_at(config.restarted_at);
    let src =
        Source { store: store.clone(), disk_id: info.id, disk: disk.to_string(), config: config.clone(), hooks: hooks.clone(), status: status.clone(), state };
    let result = src.migrate(connector, &mut at).await;
    match &result {
        Ok(()) => {
            if config.delete_source {
                let s = store.clone();
                let name = disk.to_string();
                blocking(move || s.delete_disk(&name)).await?;
            }
            src.forget().await;
            status.finish(Phase::Done, None);
        }
        Err(e) => {
            let _ = store.dirty_stop(info.id);
            // Once SWITCH may have reached the destination, only it knows whether it switched:
            // thawing here could leave two writable copies.
            if at.may_thaw() {
                hooks.thaw(disk);
            }
            if at.switch_in_doubt() {
                tracing::error!(disk, "the link failed during the switch-over; the disk stays frozen here until the migration is resumed");
                status.interrupt(&e.to_string());
                status.update(|r| r.error = Some(e.to_string()));
            } else {
                if !at.has_switched() {
                    src.forget().await;
                }
                let phase = if matches!(e, MigrationError::Cancelled) { Phase::Cancelled } else { Phase::Failed };
                status.finish(phase, Some(e.to_string()));
            }
            tracing::error!(disk, error = %e, state = ?at, "migration ended without completing");
        }
    }
    result.map(|_| status.report())
}

pub(crate) struct Source {
    pub(crate) store: Arc<Store>,
    pub(crate) disk_id: DiskId,
    pub(crate) disk: String,
    pub(crate) config: SourceConfig,
    pub(crate) hooks: Arc<dyn SourceHooks>,
    pub(crate) status: Arc<MigrationStatus>,
    pub(crate) state: Option<Arc<dyn StateStore>>,
}

/// Rounds listed so far before the freeze, and dirty blocks left for the final round.
pub(crate) struct Rounds {
    pub(crate) round: u32,
    pub(crate) carried: Vec<u64>,
}

/// How often a manual migration lists the blocks written since its last round.
const MANUAL_ROUND_INTERVAL: Duration = Duration::from_millis(500);

/// Rounds whose block counts the report keeps (a manual migration may run many).
const MAX_ROUNDS_REPORTED: usize = 32;

/// How long a switch-over this server decides waits at most for the gang's links to drain
/// before the freeze (while the gang's background data is held): a few times a 100 Mbit/s
/// bottleneck's queue under a gang of four; a slower link freezes with data still queued.
const PRE_FREEZE_DRAIN: Duration = Duration::from_millis(500);

/// What the main task waits on, and what it sends through.
pub(crate) struct LinkHandle {
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
}

impl Source {
    /// Saves where the migration stands (two fsyncs: on the blocking pool).
    pub(crate) async fn record(&self, stage: Stage) {
        let Some(state) = self.state.clone() else {
            return;
        };
        let peer = self.status.report().peer;
        let _record = self.status.record_lock.lock().await;
        // The cap in force, which an operator may have changed since the start.
        let config = SourceConfig { bandwidth_bps: self.status.cap.get(), ..self.config.clone() };
        let record = MigrationRecord {
            id: self.config.migration_id.clone(),
            role: "source".into(),
            disk: self.disk.clone(),
            peer,
            stage,
            config: Some(config),
            hello: None,
        };
        let id = record.id.clone();
        if let Err(e) = blocking(move || state.save(&record)).await {
            tracing::error!(id = %id, error = %e, "cannot record the migration's progress; a restart would lose it");
        }
    }

    /// Removes the record (a file and a directory fsync: on the blocking pool).
    pub(crate) async fn forget(&self) {
        // Under the record lock: a cap being recorded (`persist_cap`) cannot write the record
        // back after this removed it.
        let _record = self.status.record_lock.lock().await;
        if let Some(state) = self.state.clone() {
            let id = self.config.migration_id.clone();
            if let Err(e) = blocking(move || state.remove(&id)).await {
                tracing::warn!(error = %e, "cannot remove a finished migration's record");
            }
        }
    }

    pub(crate) async fn migrate(&self, connector: Arc<dyn Connector>, at: &mut SourceState) -> Result<(), MigrationError> {
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
            read_through: true,
            data_stream: self.config.data_stream,
            gang: self.config.gang.clone(),
            delta: self.config.delta,
            unnamed_blocks: self.config.unnamed_blocks,
            want_listed: self.config.want_listed,
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
            disk_id: self.disk_id,
            config: self.config.clone(),
            status: self.status.clone(),
            stop: stop_rx,
            ever_sent: Arc::new(Mutex::new(RecentFingerprints::default())),
            ever_connected: false,
        };
        let link_task = tokio::spawn(supervisor.run());
        let mut link = LinkHandle { outbox, events };
        let result = self.drive(&mut link, at).await;
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

    pub(crate) async fn drive(&self, link: &mut LinkHandle, at: &mut SourceState) -> Result<(), MigrationError> {
        let mut rebuild = !at.has_switched() && self.config.restarted_at.is_some();
        if at.switch_in_doubt() {
            // Restarted while frozen: the disk was never exported again, and SWITCH may have
            // arrived before the restart.
            self.status.update(|r| r.cancellable = false);
        }
        self.record(self.config.restarted_at.unwrap_or(Stage::PreCopy)).await;
        let report = loop {
            if !at.has_switched() {
                let report = loop {
                    let epoch = link.outbox.epoch();
                    match self.pre_switch(link, epoch, rebuild, at).await {
                        Ok(r) => break r,
                        Err(MigrationError::Restart) => {
                            tracing::info!(disk = %self.disk, "listing the disk again for the destination");
                            rebuild = true;
                        }
                        Err(MigrationError::AlreadySwitched(r)) => break r,
                        Err(e) => {
                            self.status.end_urgent();
                            return Err(e);
                        }
                    }
                };
                at.switched();
                // Usually already done by the link's reader when it read SWITCHED.
                self.status.switched_seen(&*self.hooks, &self.disk, &report);
                self.record(Stage::Switched).await;
            } else {
                self.hooks.switched(&self.disk);
                self.status.update(|r| {
                    r.phase = Phase::PostCopy;
                    r.cancellable = false;
                });
            }

            // Post-copy: serve fetches until the destination has everything.
            let epoch = link.outbox.epoch();
            let ended = loop {
                match self.next_event(link, epoch).await {
                    Ok(Event::Complete(r)) => break Ok(r),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            match ended {
                Ok(r) => break r,
                // The destination came back from a power loss before its switch-over reached
                // its disk (see the protocol's "State machines"): it holds the disk as before
                // SWITCH and asks for the listing again. This disk has stayed frozen since,
                // so listing it again and switching over again loses nothing.
                Err(MigrationError::Restart) => {
                    tracing::warn!(disk = %self.disk, "the destination lost its switch-over (a restart before it was durable); listing the frozen disk again and switching over again");
                    at.switch_lost();
                    self.record(Stage::SwitchingOver).await;
                    self.status.update(|r| r.phase = Phase::SwitchingOver);
                    rebuild = true;
                }
                Err(e) => return Err(e),
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
    pub(crate) async fn next_event(&self, link: &mut LinkHandle, epoch: u64) -> Result<Event, MigrationError> {
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

    pub(crate) async fn wait_round(&self, link: &mut LinkHandle, epoch: u64, round: u32) -> Result<(), MigrationError> {
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
    pub(crate) async fn pre_switch(&self, link: &mut LinkHandle, epoch: u64, rebuild: bool, at: &mut SourceState) -> Result<DestReport, MigrationError> {
        let (store, disk_id, status) = (&self.store, self.disk_id, &self.status);
        let tracking = at.is_tracking();
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
        let mut rounds = Rounds { round: 0, carried: Vec::new() };
        let mut hold: Option<BackgroundHold> = None;
        let mut gang_hold: Option<crate::ratelimit::SwitchHold> = None;
        let mut drained: Option<crate::ratelimit::Drained> = None;
        if tracking {
            let pre = async {
                listing.await?;
                self.dirty_rounds(link, epoch, &mut rounds).await
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
            // The other migrations of the gang hold theirs too, and their listings, until
            // SWITCHED: the final listing and SWITCH must not queue behind them on the shared
            // link.
            gang_hold = Some(status.cap.hold_for_switch(status.link_member()));
            if self.config.switch_after != SwitchAfter::Manual {
                // This server picks the moment of the freeze: first let what the gang's links
                // hold cross the network (up to tens of milliseconds behind a shared
                // bottleneck), so the final round and SWITCH do not wait behind it inside the
                // downtime. A hypervisor's pause (manual) has already started the downtime.
                drained = Some(status.cap.drain(PRE_FREEZE_DRAIN).await);
            }
            // The downtime begins (a hypervisor's pause began it already).
            status.switch_urgent();
            let freeze_start = Instant::now();
            self.hooks.freeze(&self.disk).await.map_err(|e| MigrationError::Hook(e.to_string()))?;
            at.froze();
            self.freeze_started(freeze_start);
        } else {
            listing.await?;
        }

        // Switch-over: the final dirty set, SWITCH, then wait for SWITCHED.
        let round = rounds.round + 1;
        let mut blocks: Vec<u64> = Vec::new();
        if tracking {
            blocks = store.dirty_take(disk_id)?.iter().collect();
            store.dirty_stop(disk_id)?;
        }
        if !rounds.carried.is_empty() {
            blocks.append(&mut rounds.carried);
            blocks.sort_unstable();
            blocks.dedup();
        }
        send_dirty_round(store, disk_id, round, &blocks, &link.outbox, epoch, true).await?;
        link.outbox.push_switch_over(epoch, &Message::RoundEnd { round, last: true }).await?;
        at.switch_sent();
        let final_round = self.freeze_elapsed();
        // Before SWITCH leaves: the report the hypervisor gets at SWITCHED has the rounds.
        status.update(|r| {
            r.rounds = round + 1;
            if r.round_blocks.len() < MAX_ROUNDS_REPORTED {
                r.round_blocks.push(blocks.len() as u64);
            }
            r.final_round_blocks = Some(blocks.len() as u64);
        });
        status.arm_switch(self.hooks.clone(), &self.disk);
        link.outbox.push_switch_over(epoch, &Message::Switch).await?;
        // The writer sends sequenced frames before background data, so SWITCH goes first.
        drop(hold);
        let report = loop {
            match self.next_event(link, epoch).await? {
                Event::Switched(r) => break r,
                Event::Complete(_) => return Err(MigrationError::Unexpected("COMPLETE")),
                _ => {}
            }
        };
        drop(gang_hold);
        // Stamped by whoever ended the switch-over (the reader, as a rule).
        let downtime = status.report().downtime_ms;
        // Where a long downtime went: the final round (dirty blocks listed and queued) or the
        // answer (the link's queue, the destination's journal and record).
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        tracing::info!(
            disk = %self.disk,
            downtime_ms = downtime,
            final_round_ms = ms(final_round),
            final_round_blocks = blocks.len(),
            drain_ms = ms(drained.map(|d| d.waited)),
            left_in_links = drained.and_then(|d| d.left),
            "switched over"
        );
        Ok(report)
    }

    /// The rounds between the listing and the freeze, by `--switch-after`.
    pub(crate) async fn dirty_rounds(&self, link: &mut LinkHandle, epoch: u64, rounds: &mut Rounds) -> Result<(), MigrationError> {
        let (store, disk_id, config, status) = (&self.store, self.disk_id, &self.config, &self.status);
        match config.switch_after {
            SwitchAfter::Fingerprints => Ok(()),
            SwitchAfter::Precopy | SwitchAfter::Converged => {
                self.wait_round(link, epoch, 0).await?;
                // Dirty rounds while the set shrinks, so that little is left to list inside
                // the freeze. In converged mode each round waits for its data; in precopy
                // mode the destination defers the data to post-copy (`defer_dirty`), so a
                // round is a listing and takes milliseconds.
                let mut previous = u64::MAX;
                while rounds.round + 1 < config.max_rounds {
                    let dirty = store.dirty_take(disk_id)?;
                    let count = dirty.count();
                    if count <= config.converge_blocks || count >= previous {
                        rounds.carried = dirty.iter().collect();
                        break;
                    }
                    previous = count;
                    let blocks: Vec<u64> = dirty.iter().collect();
                    self.listing_round(link, epoch, rounds, &blocks).await?;
                }
                Ok(())
            }
            SwitchAfter::Manual => {
                // The pre-copy pass, unless the switch is asked for first (the rest then
                // comes post-copy).
                tokio::select! {
                    r = self.wait_round(link, epoch, 0) => r?,
                    _ = status.switch_asked() => return Ok(()),
                }
                status.update(|r| r.ready_to_switch = true);
                tracing::info!(disk = %self.disk, id = %config.migration_id, "pre-copy done: ready to switch over when asked");
                // Listing-only rounds keep the dirty set (what the freeze must list) small
                // however long the hypervisor takes to pause the VM.
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(MANUAL_ROUND_INTERVAL) => {}
                        _ = status.switch_asked() => return Ok(()),
                    }
                    let dirty = store.dirty_take(disk_id)?;
                    if dirty.count() == 0 {
                        continue;
                    }
                    let blocks: Vec<u64> = dirty.iter().collect();
                    self.listing_round(link, epoch, rounds, &blocks).await?;
                }
            }
        }
    }

    /// One dirty round before the freeze: lists `blocks` and waits for ROUND_DONE.
    pub(crate) async fn listing_round(&self, link: &mut LinkHandle, epoch: u64, rounds: &mut Rounds, blocks: &[u64]) -> Result<(), MigrationError> {
        rounds.round += 1;
        let round = rounds.round;
        send_dirty_round(&self.store, self.disk_id, round, blocks, &link.outbox, epoch, false).await?;
        self.status.update(|r| {
            r.rounds = round + 1;
            if r.round_blocks.len() < MAX_ROUNDS_REPORTED {
                r.round_blocks.push(blocks.len() as u64);
            }
        });
        link.outbox.push(epoch, &Message::RoundEnd { round, last: false }).await?;
        self.wait_round(link, epoch, round).await
    }

    pub(crate) fn freeze_started(&self, at: Instant) {
        self.status.freeze_at.lock().replace(at);
    }

    pub(crate) fn freeze_elapsed(&self) -> Option<Duration> {
        self.status.freeze_at.lock().map(|t| t.elapsed())
    }
}
