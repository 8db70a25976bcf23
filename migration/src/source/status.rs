//! A migration's live state and figures, shared with whoever reports on it, and the
//! operator's requests to it (cancel, resume, switch).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use tokio::sync::Notify;

use super::SourceHooks;
use crate::protocol::DestReport;
use crate::report::{MigrationReport, Phase};
use crate::state::StateStore;
use crate::wire::Traffic;

/// Why an operator's request to a migration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{what} a migration at its source")]
    WrongSide { what: &'static str },
    #[error("migration {id} has already ended ({phase:?})")]
    Ended { id: String, phase: Phase },
    #[error("migration {id} is past its switch-over; it can no longer be cancelled")]
    PastSwitch { id: String },
    #[error("migration {id} is being cancelled")]
    Cancelling { id: String },
    #[error("migration {id} is {phase:?}: its link is down, resume it first")]
    Interrupted { id: String, phase: Phase },
    #[error("migration {id} failed during its switch-over: {why}")]
    SwitchFailed { id: String, why: String },
}

/// The end of a switch-over at the source: stop serving the disk here, stamp the downtime,
/// and tell whoever waits (`wait_switched`: the hypervisor, to resume its VM). The link's
/// reader does it the moment it reads SWITCHED, so the downtime does not also hold a wake-up
/// of the driver task, which on a busy gang has taken a millisecond (the driver still records
/// the stage durably afterwards).
pub(crate) enum SwitchSignal {
    /// No SWITCH sent: a SWITCHED read now (after a restart) is the driver's to handle.
    Idle,
    /// SWITCH is on its way: the first of the reader and the driver to see SWITCHED ends the
    /// switch-over with these hooks.
    Armed { hooks: Arc<dyn SourceHooks>, disk: String },
    /// Ended; the other party does nothing.
    Done,
}

impl std::fmt::Debug for SwitchSignal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwitchSignal::Idle => f.write_str("Idle"),
            SwitchSignal::Armed { disk, .. } => f.debug_struct("Armed").field("disk", disk).finish_non_exhaustive(),
            SwitchSignal::Done => f.write_str("Done"),
        }
    }
}

/// Live state of a migration, shared with whoever reports on it.
#[derive(Debug)]
pub struct MigrationStatus {
    pub traffic: Traffic,
    pub(crate) report: Mutex<MigrationReport>,
    pub(crate) started: Instant,
    pub(crate) cancel: Notify,
    pub(crate) cancel_requested: AtomicBool,
    /// Wakes a source's link supervisor: retry now (resume, or cancel needs the link).
    pub(crate) kick: Notify,
    /// The phase an interrupted migration returns to when its link is back.
    pub(crate) phase_before_interrupt: Mutex<Option<Phase>>,
    /// When the source froze its export (downtime runs from here to SWITCHED).
    pub(crate) freeze_at: Mutex<Option<Instant>>,
    /// Who ends the switch-over when SWITCHED arrives (see [`SwitchSignal`]).
    pub(crate) switch_signal: Mutex<SwitchSignal>,
    /// From the switch's request or the freeze until SWITCHED, the runtime's workers run in
    /// the real-time class (see [`crate::sched::RuntimeThreads`]).
    urgent: Mutex<Option<crate::sched::Urgent>>,
    /// An operator (the hypervisor's hook) asked for the switch-over.
    pub(crate) switch_requested: AtomicBool,
    pub(crate) switch: Notify,
    /// Wakes whoever waits for the report to change (`wait_switched`).
    pub(crate) changed: Notify,
    /// The bandwidth cap in force (the operator may change it while the migration runs).
    pub(crate) cap: Arc<crate::ratelimit::SharedLink>,
    /// Held while the migration's record is written, with the cap read under it: the last
    /// record written holds the cap set last (the driver and `persist_cap` both write it).
    pub(crate) record_lock: tokio::sync::Mutex<()>,
}

impl MigrationStatus {
    pub fn new(report: MigrationReport) -> Arc<MigrationStatus> {
        Self::with_cap(report, Arc::default())
    }

    /// What this migration shares with the other migrations of its gang (its own when alone):
    /// the transport registers each link connection's send queue with it.
    pub fn shared_link(&self) -> Arc<crate::ratelimit::SharedLink> {
        self.cap.clone()
    }

    /// A status whose bandwidth cap is `cap`, which the other migrations of a gang share.
    pub fn with_cap(report: MigrationReport, cap: Arc<crate::ratelimit::SharedLink>) -> Arc<MigrationStatus> {
        Arc::new(MigrationStatus {
            traffic: Traffic::default(),
            report: Mutex::new(report),
            started: Instant::now(),
            cancel: Notify::new(),
            cancel_requested: AtomicBool::new(false),
            kick: Notify::new(),
            phase_before_interrupt: Mutex::new(None),
            freeze_at: Mutex::new(None),
            switch_signal: Mutex::new(SwitchSignal::Idle),
            urgent: Mutex::new(None),
            switch_requested: AtomicBool::new(false),
            switch: Notify::new(),
            changed: Notify::new(),
            cap,
            record_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Tells this migration apart from the others that share its [`SharedLink`](crate::ratelimit::SharedLink).
    pub(crate) fn link_member(&self) -> usize {
        self as *const MigrationStatus as usize
    }

    /// Sets the bandwidth cap of a migration at its source (None: no cap), from now on: the
    /// link follows within a tenth of a second, across reconnections too.
    pub fn set_bandwidth(&self, bits_per_second: Option<u64>) -> Result<(), RequestError> {
        let mut r = self.report.lock();
        if r.role != "source" {
            return Err(RequestError::WrongSide { what: "set the bandwidth of" });
        }
        if r.is_finished() {
            return Err(RequestError::Ended { id: r.id.clone(), phase: r.phase });
        }
        self.cap.set(bits_per_second);
        r.bandwidth_bps = bits_per_second;
        drop(r);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Writes the cap in force into the migration's record in `state`, so that a restart of
    /// this server keeps it (a migration without a record, finished or in memory only, has
    /// nothing to update).
    pub async fn persist_cap(&self, state: Arc<dyn StateStore>) -> std::io::Result<()> {
        let _record = self.record_lock.lock().await;
        let (id, cap) = (self.report.lock().id.clone(), self.cap.get());
        let write = move || {
            let Some(mut record) = state.load()?.into_iter().find(|r| r.id == id) else { return Ok(()) };
            if let Some(config) = record.config.as_mut() {
                config.bandwidth_bps = cap;
            }
            state.save(&record)
        };
        tokio::task::spawn_blocking(write).await.map_err(std::io::Error::other)?
    }

    /// Asks a source-side migration to stop before its switch-over. After the freeze it is
    /// too late: the destination is (about to be) authoritative.
    pub fn request_cancel(&self) -> Result<(), RequestError> {
        let r = self.report.lock();
        if r.role != "source" {
            return Err(RequestError::WrongSide { what: "cancel" });
        }
        if r.is_finished() {
            return Err(RequestError::Ended { id: r.id.clone(), phase: r.phase });
        }
        if !r.cancellable || self.switch_requested.load(Ordering::SeqCst) {
            return Err(RequestError::PastSwitch { id: r.id.clone() });
        }
        self.cancel_requested.store(true, Ordering::SeqCst);
        self.cancel.notify_waiters();
        self.cancel.notify_one();
        // The destination learns of the cancel over the link: reconnect now if it is down.
        self.kick.notify_one();
        Ok(())
    }

    /// Asks an interrupted source-side migration to reconnect now.
    pub fn request_resume(&self) -> Result<(), RequestError> {
        let r = self.report.lock();
        if r.role != "source" {
            return Err(RequestError::WrongSide { what: "resume" });
        }
        if r.is_finished() {
            return Err(RequestError::Ended { id: r.id.clone(), phase: r.phase });
        }
        self.kick.notify_one();
        Ok(())
    }

    /// Asks a source-side migration to switch over now (the VM is paused). Taken as soon
    /// as every fingerprint has been listed; what has not crossed yet comes post-copy.
    /// Asking again, or once switched, is not an error: [`wait_switched`] then reports.
    ///
    /// [`wait_switched`]: MigrationStatus::wait_switched
    pub fn request_switch(&self) -> Result<(), RequestError> {
        let r = self.report.lock();
        if r.role != "source" {
            return Err(RequestError::WrongSide { what: "switch" });
        }
        if r.switch_seconds.is_some() {
            return Ok(());
        }
        if r.is_finished() {
            return Err(RequestError::Ended { id: r.id.clone(), phase: r.phase });
        }
        if self.cancel_requested() {
            return Err(RequestError::Cancelling { id: r.id.clone() });
        }
        if r.phase == Phase::Interrupted && r.cancellable {
            return Err(RequestError::Interrupted { id: r.id.clone(), phase: r.phase });
        }
        self.switch_requested.store(true, Ordering::SeqCst);
        drop(r);
        // The VM is paused: its downtime runs from here.
        self.switch_urgent();
        self.switch.notify_waiters();
        self.switch.notify_one();
        Ok(())
    }

    pub fn switch_requested(&self) -> bool {
        self.switch_requested.load(Ordering::SeqCst)
    }

    /// Resolves once a switch-over has been asked for.
    pub(crate) async fn switch_asked(&self) {
        loop {
            let notified = self.switch.notified();
            if self.switch_requested() {
                return;
            }
            notified.await;
        }
    }

    /// The switch-over's downtime has begun: until it ends, the control path comes first.
    pub(crate) fn switch_urgent(&self) {
        let mut urgent = self.urgent.lock();
        if urgent.is_none() {
            *urgent = Some(crate::sched::urgent());
        }
    }

    /// The switch-over ended, or its attempt did (the link lost): the workers go back.
    pub(crate) fn end_urgent(&self) {
        let ended = self.urgent.lock().take();
        drop(ended);
    }

    /// SWITCH is about to be sent: whoever reads SWITCHED first ends the switch-over.
    pub(crate) fn arm_switch(&self, hooks: Arc<dyn SourceHooks>, disk: &str) {
        *self.switch_signal.lock() = SwitchSignal::Armed { hooks, disk: disk.to_string() };
    }

    /// The link's reader read SWITCHED: ends the switch-over if SWITCH was sent.
    pub(crate) fn switched_read(&self, report: &DestReport) {
        let signal = std::mem::replace(&mut *self.switch_signal.lock(), SwitchSignal::Done);
        match signal {
            SwitchSignal::Armed { hooks, disk } => self.end_switch(&*hooks, &disk, report),
            // Not ours to end (a SWITCHED after a restart: the driver ends it).
            SwitchSignal::Idle => *self.switch_signal.lock() = SwitchSignal::Idle,
            SwitchSignal::Done => {}
        }
    }

    /// The driver saw SWITCHED: ends the switch-over unless the reader already did.
    pub(crate) fn switched_seen(&self, hooks: &dyn SourceHooks, disk: &str, report: &DestReport) {
        let signal = std::mem::replace(&mut *self.switch_signal.lock(), SwitchSignal::Done);
        if !matches!(signal, SwitchSignal::Done) {
            self.end_switch(hooks, disk, report);
        }
    }

    fn end_switch(&self, hooks: &dyn SourceHooks, disk: &str, report: &DestReport) {
        // The guest follows its disk as soon as this export stops serving it, so that comes
        // first; a restart before the driver's record still finds `SwitchingOver`, which
        // never exports the disk again either.
        let hook = Instant::now();
        hooks.switched(disk);
        let downtime = self.freeze_at.lock().map(|t| t.elapsed().as_secs_f64() * 1000.0);
        let hook_ms = hook.elapsed().as_secs_f64() * 1000.0;
        let at = self.since_start();
        // The hypervisor's `wait_switched` wakes here, still inside the window.
        self.update(|r| {
            r.switch_seconds = Some(at);
            r.phase = Phase::PostCopy;
            r.cancellable = false;
            r.destination = report.clone();
            if downtime.is_some() {
                r.downtime_ms = downtime;
            }
        });
        // Last: a worker leaving the real-time class can lose its core at once to the
        // normal threads that waited meanwhile (2-3 ms in a gang's trace), so nothing of
        // the switch-over may come after it.
        self.end_urgent();
        tracing::debug!(disk, downtime_ms = downtime, hook_ms, "switch-over ended");
    }

    /// Waits until the destination serves the disk (the report then has `downtime_ms`), or
    /// the migration fails, is cancelled or loses its link on the way.
    pub async fn wait_switched(&self) -> Result<MigrationReport, RequestError> {
        loop {
            let notified = self.changed.notified();
            let r = self.report();
            if r.switch_seconds.is_some() {
                return Ok(r);
            }
            if r.is_finished() || r.phase == Phase::Interrupted {
                let why = r.error.clone().unwrap_or_else(|| format!("{:?}", r.phase));
                return Err(RequestError::SwitchFailed { id: r.id, why });
            }
            notified.await;
        }
    }

    pub fn cancel_requested(&self) -> bool {
        self.cancel_requested.load(Ordering::SeqCst)
    }

    pub(crate) async fn cancelled(&self) {
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
        if r.role == "source" && !r.is_finished() {
            // A gang's members share the cap: another member's `set-bandwidth` shows here too.
            r.bandwidth_bps = self.cap.get();
        }
        if r.total_seconds.is_none() {
            r.elapsed_seconds = self.started.elapsed().as_secs_f64();
        }
        r
    }

    pub fn update(&self, f: impl FnOnce(&mut MigrationReport)) {
        f(&mut self.report.lock());
        self.changed.notify_waiters();
    }

    /// When the migration started (this run of the server).
    pub fn started(&self) -> Instant {
        self.started
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
        drop(r);
        self.changed.notify_waiters();
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
