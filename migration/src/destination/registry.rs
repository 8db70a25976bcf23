//! A server's incoming migrations (live and parked) and their lifecycle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_store::{DiskId, Fingerprint, Store};
use parking_lot::{Condvar, Mutex};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::protocol::{AcceptInfo, ErrorMessage, Hello, Message, Mode};
use crate::report::{MigrationReport, Phase};
use crate::source::MigrationStatus;
use crate::state::{MigrationRecord, Stage, StateStore};
use crate::wire::{exchange_greetings, read_message, write_frame, Frame};
use crate::{blocking, MigrationError};

use super::*;

/// How long a new migration connection has to send its greeting and HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Room in the prepared post-copy journal beyond the listing window, which bounds the blocks
/// missing at once in the initial listing; dirty rounds can add some. A longer list at the
/// switch-over takes the journal's slow path. 24 bytes each: 3.4 MiB of file per incoming
/// migration with the default window.
const JOURNAL_SPARE_ENTRIES: usize = 16 * 1024;

/// A server's incoming migrations, live and parked, by migration id. A migration outlives
/// its connections: after a lost link it is parked until the source reconnects (or, before
/// the switch-over, until `park_timeout` passes or an operator cancels it).
pub struct Destination {
    pub(crate) store: Arc<Store>,
    pub(crate) hooks: Arc<dyn DestHooks>,
    pub(crate) state: Arc<dyn StateStore>,
    pub(crate) sessions: Mutex<HashMap<String, Arc<Session>>>,
    pub(crate) park_timeout: Duration,
    /// Gangs with migrations here, by name.
    pub(crate) gangs: Mutex<HashMap<String, Arc<Gang>>>,
    /// Blocks of the initial listing that may be missing at once (see
    /// [`LISTING_WINDOW_BLOCKS`]).
    pub(crate) listing_window: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination").field("sessions", &self.sessions.lock().keys().collect::<Vec<_>>()).finish()
    }
}

/// One incoming migration, across its connections.
pub(crate) struct Session {
    pub(crate) hello: Hello,
    pub(crate) incoming: Arc<Incoming>,
    /// Frames to the source; the connection of the moment writes them.
    pub(crate) out: mpsc::UnboundedSender<Frame>,
    pub(crate) outbound: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Frame>>>,
    pub(crate) proto: Mutex<Proto>,
    pub(crate) status: Arc<MigrationStatus>,
    /// Bumped by each new connection; an older connection stops when it sees the change.
    pub(crate) generation: AtomicU64,
    pub(crate) superseded: tokio::sync::Notify,
    pub(crate) ended: AtomicBool,
    /// Held by a switch-over in progress (see `Connection::apply_switch`).
    pub(crate) switching: Arc<tokio::sync::Mutex<()>>,
    /// Held by a connection while it applies one sequenced message and counts it, and by a
    /// new connection while it reads that count for ACCEPT.
    pub(crate) applying: Arc<tokio::sync::Mutex<()>>,
    /// From SWITCH read until SWITCHED written, the runtime's workers run in the real-time
    /// class (see [`crate::sched::RuntimeThreads`]).
    pub(crate) urgent: Mutex<Option<crate::sched::Urgent>>,
}

impl Session {
    /// Asks the source for `want`, in frames of at most [`crate::protocol::MAX_LIST`].
    pub(crate) fn send_wants(&self, want: &[Fingerprint]) -> Result<(), MigrationError> {
        for chunk in want.chunks(crate::protocol::MAX_LIST) {
            self.out.send(Frame::new(&Message::Want(chunk.to_vec()))).map_err(|_| MigrationError::Closed)?;
        }
        Ok(())
    }
}

/// Where the sequenced stream stands (see the protocol's resume section).
#[derive(Debug, Default)]
pub(crate) struct Proto {
    pub(crate) processed: u64,
    pub(crate) ended_rounds: Vec<u32>,
    pub(crate) last_done: Option<u32>,
    pub(crate) listed_round0: u64,
    pub(crate) completed: bool,
    /// Switched over, but the store still names the disk by its temporary name (the rename
    /// runs just after SWITCHED, outside the downtime): completion, which reopens the disk
    /// by its real name, waits for it.
    pub(crate) renaming: bool,
    /// Restored after a restart before the switch-over: the place in the rounds is lost.
    pub(crate) needs_rebuild: bool,
    /// The sequenced count when SWITCH was applied (kept across a restart).
    pub(crate) processed_at_switch: u64,
}

impl Destination {
    pub fn new(store: Arc<Store>, hooks: Arc<dyn DestHooks>, state: Arc<dyn StateStore>, park_timeout: Duration) -> Arc<Destination> {
        Arc::new(Destination {
            store,
            hooks,
            state,
            sessions: Mutex::new(HashMap::new()),
            park_timeout,
            gangs: Mutex::default(),
            listing_window: std::sync::atomic::AtomicUsize::new(LISTING_WINDOW_BLOCKS),
        })
    }

    /// Sets how many blocks of a migration's initial listing may be missing at once before
    /// the destination holds further listing back (default [`LISTING_WINDOW_BLOCKS`]; at
    /// least one listing frame is always let in). Connections made after the call use it.
    pub fn set_listing_window(&self, blocks: usize) {
        self.listing_window.store(blocks, Ordering::Relaxed);
    }

    pub fn status(&self, id: &str) -> Option<Arc<MigrationStatus>> {
        self.sessions.lock().get(id).map(|s| s.status.clone())
    }

    /// Lays out the post-copy journal's pending file for this migration ahead of its
    /// switch-over; on failure the switch-over writes a new file instead (slower, as safe).
    pub(crate) async fn prepare_journal(&self, id: &str) -> Option<PreparedJournal> {
        let capacity = self.listing_window.load(Ordering::Relaxed).saturating_add(JOURNAL_SPARE_ENTRIES);
        let (state, id) = (self.state.clone(), id.to_string());
        match blocking(move || PendingJournal::prepare(state.as_ref(), &id, capacity)).await {
            Ok(prepared) => prepared,
            Err(e) => {
                tracing::warn!(error = %e, "cannot lay out the post-copy journal ahead; the switch-over will write it whole");
                None
            }
        }
    }

    pub(crate) fn new_session(
        &self,
        hello: Hello,
        disk: DiskId,
        status: Arc<MigrationStatus>,
        pending: Pending,
        proto: Proto,
        journal: Option<PendingJournal>,
        prepared_journal: Option<PreparedJournal>,
    ) -> Result<Arc<Session>, MigrationError> {
        let (out_tx, out_rx) = mpsc::unbounded_channel::<Frame>();
        let incoming = Arc::new(Incoming {
            store: self.store.clone(),
            disk,
            block_size: u64::from(self.store.block_size()),
            pending: Mutex::new(pending),
            arrived: Condvar::new(),
            fetch: out_tx.clone(),
            journal: Mutex::new(journal),
            prepared_journal: Mutex::new(prepared_journal),
            read_through: hello.read_through,
            gang: hello.gang.as_deref().map(|name| GangMember::join(&self.gangs, name, &hello.migration_id)),
            backlog: MapBacklog::default(),
        });
        let session = Arc::new(Session {
            hello,
            incoming,
            out: out_tx,
            outbound: Arc::new(tokio::sync::Mutex::new(out_rx)),
            proto: Mutex::new(proto),
            status,
            generation: AtomicU64::new(0),
            superseded: tokio::sync::Notify::new(),
            ended: AtomicBool::new(false),
            switching: Arc::new(tokio::sync::Mutex::new(())),
            applying: Arc::new(tokio::sync::Mutex::new(())),
            urgent: Mutex::new(None),
        });
        session.status.update(|r| r.gang = session.hello.gang.clone());
        self.sessions.lock().insert(session.hello.migration_id.clone(), session.clone());
        self.hooks.registered(&session.hello.migration_id, session.status.clone());
        let disk = Arc::new(MigratingDisk { inner: session.incoming.clone() });
        if let Err(why) = self.hooks.attach(&session.hello.disk, disk) {
            self.sessions.lock().remove(&session.hello.migration_id);
            if let Some(member) = &session.incoming.gang {
                member.leave(&self.gangs);
            }
            return Err(MigrationError::Hook(why.to_string()));
        }
        spawn_borrow_settler(&session, self.hooks.clone());
        Ok(session)
    }

    /// Cancels a migration here before its switch-over: the partial disk goes.
    pub async fn cancel(&self, id: &str) -> Result<(), CancelError> {
        let session = self.sessions.lock().get(id).cloned().ok_or_else(|| CancelError::Unknown(id.to_string()))?;
        if session.incoming.pending.lock().phase.has_switched() {
            return Err(CancelError::Switched(id.to_string()));
        }
        session.generation.fetch_add(1, Ordering::SeqCst);
        session.superseded.notify_waiters();
        self.fail(&session, &MigrationError::Cancelled).await;
        Ok(())
    }

    /// Serves one incoming connection: a new migration, the resumption of a parked one, or a
    /// plan. `status` tracks a new migration (a resumed one keeps its own).
    pub async fn serve<S>(self: &Arc<Self>, mut stream: S, status: Arc<MigrationStatus>) -> Result<MigrationReport, MigrationError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // A peer that connects and stalls holds nothing for long: the greeting and HELLO come
        // within HELLO_TIMEOUT or the connection goes.
        let greeted = tokio::time::timeout(HELLO_TIMEOUT, async {
            exchange_greetings(&mut stream, &status.traffic).await?;
            read_message(&mut stream, &status.traffic).await
        })
        .await
        .map_err(|_| MigrationError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no HELLO in time")))??;
        let hello = match greeted {
            Some(Message::Hello(h)) => h,
            Some(other) => {
                let err = MigrationError::Unexpected(other.name());
                refuse(&mut stream, &err.to_string(), &status).await;
                return Err(err);
            }
            None => return Err(MigrationError::Closed),
        };
        if let Err(why) = check_hello(&self.store, &hello) {
            refuse(&mut stream, &why, &status).await;
            return Err(MigrationError::Refused(why));
        }
        if hello.mode == Mode::Plan {
            status.update(|r| {
                r.id = hello.migration_id.clone();
                r.disk = hello.disk.clone();
            });
            crate::wire::write_message(&mut stream, &Message::Accept(AcceptInfo::default()), &status.traffic).await?;
            plan(self.store.clone(), stream, &hello, &status).await?;
            status.finish(Phase::Done, None);
            return Ok(status.report());
        }
        let existing = self.sessions.lock().get(&hello.migration_id).cloned();
        let session = match (hello.resume, existing) {
            (true, Some(s)) => {
                if s.hello.disk != hello.disk || s.hello.size != hello.size {
                    let why = format!("migration {} here is of disk {:?} ({} bytes)", hello.migration_id, s.hello.disk, s.hello.size);
                    refuse(&mut stream, &why, &status).await;
                    return Err(MigrationError::Refused(why));
                }
                s
            }
            (true, None) => {
                let why = format!("no migration {:?} to resume here (it ended, was cancelled, or never started)", hello.migration_id);
                refuse(&mut stream, &why, &status).await;
                return Err(MigrationError::Refused(why));
            }
            (false, Some(_)) => {
                let why = format!("migration {:?} is already in progress here", hello.migration_id);
                refuse(&mut stream, &why, &status).await;
                return Err(MigrationError::Refused(why));
            }
            (false, None) => {
                if let Err(why) = check_new(&self.store, &hello) {
                    refuse(&mut stream, &why, &status).await;
                    return Err(MigrationError::Refused(why));
                }
                let s = self.store.clone();
                let (name, size) = (incoming_name(&hello.disk), hello.size);
                let info = match blocking(move || Ok::<_, MigrationError>(s.create_disk(&name, size)?)).await {
                    Ok(i) => i,
                    Err(e) => {
                        refuse(&mut stream, &e.to_string(), &status).await;
                        return Err(e);
                    }
                };
                status.update(|r| {
                    r.id = hello.migration_id.clone();
                    r.disk = hello.disk.clone();
                    r.disk_bytes = hello.size;
                    r.block_size = hello.block_size;
                    r.phase = Phase::PreCopy;
                });
                let record = MigrationRecord {
                    id: hello.migration_id.clone(),
                    role: "destination".into(),
                    disk: hello.disk.clone(),
                    peer: status.report().peer,
                    stage: Stage::PreCopy,
                    config: None,
                    hello: Some(hello.clone()),
                };
                let state = self.state.clone();
                if let Err(e) = blocking(move || state.save(&record)).await {
                    tracing::error!(error = %e, "cannot record an incoming migration; a restart would lose it");
                }
                tracing::info!(disk = %hello.disk, size = hello.size, id = %hello.migration_id, "receiving a migration");
                let prepared = self.prepare_journal(&hello.migration_id).await;
                self.new_session(hello.clone(), info.id, status, Pending::new(DiskPhase::Standby), Proto::default(), None, prepared)?
            }
        };
        if hello.resume {
            session.status.traffic.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.attach(session, stream, hello.rebuild).await
    }

    /// Runs one connection of a session to its end: done, failed, or parked.
    pub(crate) async fn attach<S>(self: &Arc<Self>, session: Arc<Session>, mut stream: S, rebuild: bool) -> Result<MigrationReport, MigrationError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Take the session from an older connection (a half-dead one may not know yet).
        let generation = session.generation.fetch_add(1, Ordering::SeqCst) + 1;
        session.superseded.notify_waiters();
        let mut out_rx = session.outbound.clone().lock_owned().await;
        while out_rx.try_recv().is_ok() {}
        let status = session.status.clone();
        // An older connection may be applying a message: its count goes in before ACCEPT
        // says how many were applied (it applies nothing after; see `apply_sequenced`).
        let applying = session.applying.clone().lock_owned().await;
        let info = {
            let mut proto = session.proto.lock();
            let switched = session.incoming.pending.lock().phase.has_switched();
            let rebuild = !switched && (rebuild || proto.needs_rebuild);
            if rebuild {
                let keep_switch = proto.processed_at_switch;
                *proto = Proto { processed_at_switch: keep_switch, ..Default::default() };
            }
            AcceptInfo {
                processed: proto.processed,
                switched,
                rebuild,
                data_stream: session.hello.data_stream,
                delta: session.hello.delta,
                unnamed_blocks: session.hello.unnamed_blocks,
            }
        };
        drop(applying);
        if info.rebuild {
            // The listing starts over: what the last one queued for mapping goes first.
            drain_mapping(&session.incoming).await?;
        }
        crate::wire::write_message(&mut stream, &Message::Accept(info.clone()), &status.traffic).await?;
        status.link_up();
        // Everything the source must hear again: what readers wait for, what is missing, and
        // the answers it may have missed.
        {
            let p = session.incoming.pending.lock();
            let urgent: Vec<Fingerprint> = p.urgent.iter().copied().collect();
            let wanted: Vec<Fingerprint> = p.wanted.iter().filter(|fp| !p.urgent.contains(fp)).copied().collect();
            for chunk in urgent.chunks(crate::protocol::MAX_LIST) {
                let _ = session.out.send(Frame::new(&Message::Fetch(chunk.to_vec())));
            }
            let _ = session.send_wants(&wanted);
            // Standby reads still waiting for the source (their ids stay the same; an answer
            // that comes twice is ignored).
            for (&id, &(offset, length)) in &p.reads.asked {
                let _ = session.out.send(Frame::new(&Message::Read { id, offset, length }));
            }
            let proto = session.proto.lock();
            if let Some(round) = proto.last_done {
                let _ = session.out.send(Frame::new(&Message::RoundDone { round }));
            }
            if p.phase.has_switched() {
                let _ = session.out.send(Frame::new(&Message::Switched(p.report.clone())));
            }
            if proto.completed {
                let _ = session.out.send(Frame::new(&Message::Complete(p.report.clone())));
            }
        }
        if info.processed > 0 || info.rebuild || info.switched {
            tracing::info!(id = %session.hello.migration_id, processed = info.processed, rebuild = info.rebuild, switched = info.switched, "migration resumed");
        }

        let (mut reader, mut writer) = tokio::io::split(stream);
        let st = status.clone();
        let sess = session.clone();
        let writer_task = tokio::spawn(async move {
            loop {
                let superseded = sess.superseded.notified();
                if sess.generation.load(Ordering::SeqCst) != generation {
                    break;
                }
                let frame = tokio::select! {
                    f = out_rx.recv() => match f {
                        Some(f) => f,
                        None => break,
                    },
                    _ = superseded => break,
                };
                write_frame(&mut writer, &frame, &st.traffic).await?;
                let switched = frame.tag() == crate::protocol::SWITCHED_TAG;
                if switched || out_rx.is_empty() {
                    writer.flush().await?;
                }
                if switched {
                    // Beside the source's "SWITCHED read": where a long downtime's answer waited.
                    tracing::debug!(disk = %sess.hello.disk, "SWITCHED written");
                    let ended = sess.urgent.lock().take();
                    drop(ended);
                }
            }
            writer.flush().await.ok();
            writer.shutdown().await.ok();
            drop(out_rx);
            Ok::<(), MigrationError>(())
        });

        let result = {
            let streams = session.hello.data_stream.then(|| Arc::new(Mutex::new(StreamDecoders::default())));
            let listing_window = self.listing_window.load(Ordering::Relaxed);
            let conn = Connection { session: &session, hooks: &self.hooks, state: &self.state, streams, listing_window, generation };
            let superseded = async {
                loop {
                    let n = session.superseded.notified();
                    if session.generation.load(Ordering::SeqCst) != generation {
                        return;
                    }
                    n.await;
                }
            };
            tokio::select! {
                r = conn.run(&mut reader) => r,
                _ = superseded => Err(MigrationError::Superseded),
            }
        };
        match result {
            Ok(()) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
                self.finish(&session, Ok(()));
                Ok(session.status.report())
            }
            Err(MigrationError::Superseded) => {
                writer_task.abort();
                Err(MigrationError::Superseded)
            }
            Err(e) if is_link_error(&e) => {
                writer_task.abort();
                tracing::warn!(id = %session.hello.migration_id, error = %e, "migration link lost; parked until the source reconnects");
                session.status.link_down(&e.to_string());
                self.park_timer(&session);
                Err(e)
            }
            Err(e) => {
                let _ = session.out.send(Frame::new(&Message::Error(ErrorMessage { message: e.to_string() })));
                let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
                self.fail(&session, &e).await;
                Err(e)
            }
        }
    }

    /// A parked migration whose source does not come back within the park timeout: before
    /// the switch-over it is dropped (the source is still authoritative); once every block
    /// is here it is done (only BYE was lost); in between it waits, since only the source
    /// has the missing blocks.
    pub(crate) fn park_timer(self: &Arc<Self>, session: &Arc<Session>) {
        let generation = session.generation.load(Ordering::SeqCst);
        let (this, session) = (self.clone(), session.clone());
        let timeout = self.park_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            if session.generation.load(Ordering::SeqCst) != generation || session.ended.load(Ordering::SeqCst) {
                return;
            }
            if session.proto.lock().completed {
                this.finish(&session, Ok(()));
            } else if !session.incoming.pending.lock().phase.has_switched() {
                tracing::warn!(id = %session.hello.migration_id, "the source did not come back; dropping the partial disk");
                this.fail(&session, &MigrationError::Refused(format!("the source did not reconnect within {timeout:?}"))).await;
            }
        });
    }

    pub(crate) fn finish(&self, session: &Arc<Session>, _: Result<(), ()>) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        self.sessions.lock().remove(&session.hello.migration_id);
        if let Some(member) = &session.incoming.gang {
            member.leave(&self.gangs);
        }
        // File removals and a directory fsync: on the blocking pool. A crash before they land
        // leaves a record whose disk has every block, which the next start finishes at once.
        let (state, id) = (self.state.clone(), session.hello.migration_id.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = forget(state.as_ref(), &id) {
                tracing::warn!(error = %e, "cannot remove a finished migration's record");
            }
        });
        let report = session.incoming.pending.lock().report.clone();
        session.status.update(|r| {
            r.destination = report;
            r.link_state = "closed".into();
        });
        session.status.finish(Phase::Done, None);
    }

    pub(crate) async fn fail(&self, session: &Arc<Session>, e: &MigrationError) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let switched = {
            let mut p = session.incoming.pending.lock();
            p.phase = p.phase.failed(e.to_string());
            p.phase.has_switched()
        };
        session.incoming.arrived.notify_all();
        self.sessions.lock().remove(&session.hello.migration_id);
        // What it was bringing for the rest of its gang, they now ask their own sources for.
        if let Some(member) = &session.incoming.gang {
            member.leave(&self.gangs);
        }
        if !switched {
            // The source is still authoritative: the standby export goes, then the partial
            // disk.
            self.hooks.abandoned(&session.hello.disk);
            let s = self.store.clone();
            let name = incoming_name(&session.hello.disk);
            if let Err(err) = blocking(move || Ok::<_, MigrationError>(s.delete_disk(&name)?)).await {
                tracing::error!(error = %err, "cannot delete a partial incoming disk");
            }
            let (state, id) = (self.state.clone(), session.hello.migration_id.clone());
            let _ = blocking(move || forget(state.as_ref(), &id)).await;
            tracing::warn!(disk = %session.hello.disk, error = %e, "migration failed before the switch-over; partial disk removed");
        } else {
            // Keep the record: after a restart the disk must still be known as incomplete.
            tracing::error!(disk = %session.hello.disk, error = %e, "migration failed after the switch-over; missing blocks cannot be read");
        }
        let report = session.incoming.pending.lock().report.clone();
        session.status.update(|r| r.destination = report);
        let cancelled = matches!(e, MigrationError::Cancelled) || matches!(e, MigrationError::Refused(m) if m.contains("cancelled"));
        session.status.finish(if cancelled { Phase::Cancelled } else { Phase::Failed }, Some(e.to_string()));
    }
}

/// Removes a migration's record and its post-copy journal files (the journal even if the
/// record cannot be removed).
pub(crate) fn forget(state: &dyn StateStore, id: &str) -> std::io::Result<()> {
    let removed = state.remove(id);
    PendingJournal::remove(state, id);
    removed
}

pub(crate) fn is_link_error(e: &MigrationError) -> bool {
    matches!(e, MigrationError::Io(_) | MigrationError::Closed)
}

/// Why an incoming migration could not be cancelled here.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no incoming migration {0:?}")]
    Unknown(String),
    #[error("migration {0} has switched over: this server serves the disk now")]
    Switched(String),
}
