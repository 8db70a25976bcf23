//! The destination side: maps every listed block it already holds, asks for the rest once
//! each, verifies and stores what arrives, switches over on request, and then serves the disk
//! through a [`PostCopyDisk`] that fetches missing blocks on demand.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_store::{DiskId, Extent, Fingerprint, Store, StoreError};
use parking_lot::{Condvar, Mutex};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::compress::{decode_frame, Record};
use crate::protocol::{AcceptInfo, DestReport, ErrorMessage, Hello, Message, Mode, Run};
use crate::report::{MigrationReport, Phase};
use crate::source::MigrationStatus;
use crate::state::{MigrationRecord, Stage, StateStore};
use crate::wire::{exchange_greetings, read_message, write_frame, Frame};
use crate::{blocking, MigrationError};

/// What the destination server does at the edges of a migration.
pub trait DestHooks: Send + Sync {
    /// The disk is ready: serve it, writable, through `disk` from now on.
    fn switch_over(&self, name: &str, disk: Arc<PostCopyDisk>) -> Result<(), String>;
    /// Every block is local; the export may serve the store's disk directly again.
    fn complete(&self, name: &str);
    /// A migration arrived (or was restored after a restart): the server lists it.
    fn registered(&self, _id: &str, _status: Arc<MigrationStatus>) {}
}

/// How long a read of a block that has not arrived waits for it before failing with EIO.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);

/// Blocks of the incoming disk that are listed but not local yet.
#[derive(Debug, Default)]
struct Pending {
    /// Block -> the content it must get.
    by_block: HashMap<u64, Fingerprint>,
    /// Content asked for -> blocks that may be waiting for it (entries are checked against
    /// `by_block` on arrival: a later round or a local write may have superseded them).
    waiting: HashMap<Fingerprint, Vec<u64>>,
    /// Fingerprints asked for and not arrived.
    wanted: HashSet<Fingerprint>,
    /// Fingerprints that arrived during this migration.
    received: HashSet<Fingerprint>,
    /// Fingerprints asked for on demand (a read or a partial write waits for them).
    urgent: HashSet<Fingerprint>,
    /// Missing content that deferred rounds listed (`Hello::defer_dirty`): asked for at the
    /// switch-over, if a block still needs it then.
    deferred: HashSet<Fingerprint>,
    switched: bool,
    failed: Option<String>,
    report: DestReport,
}

/// The state a [`PostCopyDisk`] shares with the migration that fills it.
#[derive(Debug)]
struct Incoming {
    store: Arc<Store>,
    disk: DiskId,
    block_size: u64,
    pending: Mutex<Pending>,
    arrived: Condvar,
    /// FETCH frames go to the writer through this.
    fetch: mpsc::UnboundedSender<Frame>,
    /// After the switch-over: what is still missing, kept across a restart.
    journal: Mutex<Option<PendingJournal>>,
}

/// The disk as the destination serves it after the switch-over: blocks already local come
/// from the store; a read of a block still in flight asks the source for it at once (ahead of
/// the background transfer) and waits; a write that covers a missing block wins over its
/// late arrival; a partial write of a missing block fetches it first.
#[derive(Debug)]
pub struct PostCopyDisk {
    inner: Arc<Incoming>,
}

/// Errors a [`PostCopyDisk`] returns.
#[derive(Debug, thiserror::Error)]
pub enum PostCopyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("block not available: {0}")]
    Unavailable(String),
}

impl PostCopyDisk {
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    pub fn disk_id(&self) -> DiskId {
        self.inner.disk
    }

    pub fn size(&self) -> Result<u64, StoreError> {
        self.inner.store.disk_size(self.inner.disk)
    }

    /// Blocks still missing locally.
    pub fn missing_blocks(&self) -> usize {
        self.inner.pending.lock().by_block.len()
    }

    fn blocks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let bs = self.inner.block_size;
        if len == 0 {
            #[allow(clippy::reversed_empty_ranges)]
            return 1..=0;
        }
        offset / bs..=(offset + len - 1) / bs
    }

    /// Waits until none of `blocks` is pending, asking for them on demand. Returns with the
    /// pending lock held, so the caller can act before an arrival changes anything.
    fn wait_local<'a>(
        &'a self,
        mut guard: parking_lot::MutexGuard<'a, Pending>,
        needed: impl Fn(&Pending) -> Vec<Fingerprint>,
    ) -> Result<parking_lot::MutexGuard<'a, Pending>, PostCopyError> {
        let deadline = Instant::now() + FETCH_TIMEOUT;
        loop {
            let missing = needed(&guard);
            if missing.is_empty() {
                return Ok(guard);
            }
            if let Some(why) = &guard.failed {
                return Err(PostCopyError::Unavailable(format!("migration link failed: {why}")));
            }
            let ask: Vec<Fingerprint> = missing.into_iter().filter(|fp| guard.urgent.insert(*fp)).collect();
            if !ask.is_empty() {
                let _ = self.inner.fetch.send(Frame::new(&Message::Fetch(ask)));
            }
            if self.inner.arrived.wait_until(&mut guard, deadline).timed_out() {
                return Err(PostCopyError::Unavailable(format!("waited {FETCH_TIMEOUT:?} for the source")));
            }
        }
    }

    fn pending_in(&self, p: &Pending, blocks: std::ops::RangeInclusive<u64>) -> Vec<Fingerprint> {
        if p.by_block.is_empty() {
            return Vec::new();
        }
        let mut fps: Vec<Fingerprint> = blocks.filter_map(|b| p.by_block.get(&b).copied()).collect();
        fps.sort_unstable();
        fps.dedup();
        fps
    }

    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), PostCopyError> {
        let blocks = self.blocks(offset, buf.len() as u64);
        let guard = self.inner.pending.lock();
        let guard = self.wait_local(guard, |p| self.pending_in(p, blocks.clone()))?;
        // Blocks never become pending again after the switch-over, and arrivals only write
        // pending blocks: once none is pending here, the store has them.
        drop(guard);
        Ok(self.inner.store.read(self.inner.disk, offset, buf)?)
    }

    /// A write-like change of `[offset, offset + len)`: missing blocks the range covers
    /// entirely are dropped from the pending set (the write wins); partially covered ones are
    /// fetched first, since the write keeps part of their old content.
    fn change(&self, offset: u64, len: u64, fua: bool, apply: impl FnOnce() -> Result<(), StoreError>) -> Result<(), PostCopyError> {
        let bs = self.inner.block_size;
        let blocks = self.blocks(offset, len);
        let end = offset + len;
        let partial = |b: u64| b * bs < offset || (b + 1) * bs > end;
        let guard = self.inner.pending.lock();
        let mut guard = self.wait_local(guard, |p| {
            let mut fps: Vec<Fingerprint> = blocks.clone().filter(|&b| partial(b)).filter_map(|b| p.by_block.get(&b).copied()).collect();
            fps.sort_unstable();
            fps.dedup();
            fps
        })?;
        let covered: Vec<u64> = if guard.by_block.is_empty() { Vec::new() } else { blocks.filter(|b| guard.by_block.contains_key(b)).collect() };
        if covered.is_empty() {
            drop(guard);
            if fua {
                self.sync_journal()?;
            }
            return Ok(apply()?);
        }
        // Keep the lock while writing, so no reader sees these blocks neither old nor new.
        // The journal learns first that these blocks no longer wait for the source, so a
        // restart never lets a late arrival overwrite this write.
        if let Some(j) = self.inner.journal.lock().as_mut() {
            j.note_removed(&covered)
                .and_then(|_| if fua { j.sync() } else { Ok(()) })
                .map_err(|e| PostCopyError::Unavailable(format!("post-copy journal: {e}")))?;
        }
        for b in covered {
            guard.by_block.remove(&b);
        }
        apply()?;
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, data.len() as u64, fua, || i.store.write(i.disk, offset, data, fua))
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, len, fua, || i.store.write_zeroes(i.disk, offset, len, fua))
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, len, fua, || i.store.trim(i.disk, offset, len, fua))
    }

    pub fn flush(&self) -> Result<(), PostCopyError> {
        self.sync_journal()?;
        Ok(self.inner.store.flush()?)
    }

    /// Makes the journal's removals durable before a write that must survive a crash.
    fn sync_journal(&self) -> Result<(), PostCopyError> {
        if let Some(j) = self.inner.journal.lock().as_mut() {
            j.sync().map_err(|e| PostCopyError::Unavailable(format!("post-copy journal: {e}")))?;
        }
        Ok(())
    }

    /// The store's allocation, with blocks still in flight reported as allocated (they hold
    /// data; reporting them as holes would let a copying client skip them).
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, PostCopyError> {
        let extents = self.inner.store.block_status(self.inner.disk, offset, len)?;
        let p = self.inner.pending.lock();
        if p.by_block.is_empty() || len == 0 {
            return Ok(extents);
        }
        let bs = self.inner.block_size;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |from: u64, to: u64, allocated: bool| match out.last_mut() {
            Some(e) if e.allocated == allocated && e.offset + e.length == from => e.length += to - from,
            _ => out.push(Extent { offset: from, length: to - from, allocated }),
        };
        for e in extents {
            if e.allocated {
                push(e.offset, e.offset + e.length, true);
                continue;
            }
            // Split holes at blocks that are pending.
            let mut cursor = e.offset;
            for b in self.blocks(e.offset, e.length) {
                if p.by_block.contains_key(&b) {
                    let from = (b * bs).max(e.offset);
                    let to = ((b + 1) * bs).min(e.offset + e.length).min(end);
                    push(cursor, from, false);
                    push(from, to, true);
                    cursor = to;
                }
            }
            let stop = e.offset + e.length;
            if cursor < stop {
                push(cursor, stop, false);
            }
        }
        out.retain(|e| e.length > 0);
        Ok(out)
    }
}

/// A server's incoming migrations, live and parked, by migration id. A migration outlives
/// its connections: after a lost link it is parked until the source reconnects (or, before
/// the switch-over, until `park_timeout` passes or an operator cancels it).
pub struct Destination {
    store: Arc<Store>,
    hooks: Arc<dyn DestHooks>,
    state: Arc<dyn StateStore>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    park_timeout: Duration,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination").field("sessions", &self.sessions.lock().keys().collect::<Vec<_>>()).finish()
    }
}

/// One incoming migration, across its connections.
struct Session {
    hello: Hello,
    incoming: Arc<Incoming>,
    /// Frames to the source; the connection of the moment writes them.
    out: mpsc::UnboundedSender<Frame>,
    outbound: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Frame>>>,
    proto: Mutex<Proto>,
    status: Arc<MigrationStatus>,
    /// Bumped by each new connection; an older connection stops when it sees the change.
    generation: AtomicU64,
    superseded: tokio::sync::Notify,
    ended: AtomicBool,
}

/// Where the sequenced stream stands (see the protocol's resume section).
#[derive(Debug, Default)]
struct Proto {
    processed: u64,
    ended_rounds: Vec<u32>,
    last_done: Option<u32>,
    listed_round0: u64,
    completed: bool,
    /// Restored after a restart before the switch-over: the place in the rounds is lost.
    needs_rebuild: bool,
    /// The sequenced count when SWITCH was applied (kept across a restart).
    processed_at_switch: u64,
}

impl Destination {
    pub fn new(store: Arc<Store>, hooks: Arc<dyn DestHooks>, state: Arc<dyn StateStore>, park_timeout: Duration) -> Arc<Destination> {
        Arc::new(Destination { store, hooks, state, sessions: Mutex::new(HashMap::new()), park_timeout })
    }

    pub fn status(&self, id: &str) -> Option<Arc<MigrationStatus>> {
        self.sessions.lock().get(id).map(|s| s.status.clone())
    }

    /// After a restart: parks every migration a record names, and deletes partial disks no
    /// record explains. Call before exporting the store's disks.
    pub async fn restore(self: &Arc<Self>) -> Result<(), MigrationError> {
        let records = self.state.load()?;
        let mut known: HashSet<String> = HashSet::new();
        for record in records.into_iter().filter(|r| r.role == "destination") {
            let Some(hello) = record.hello.clone() else {
                continue;
            };
            known.insert(incoming_name(&hello.disk));
            match self.restore_one(&record, hello).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(id = %record.id, error = %e, "cannot restore an incoming migration");
                    let _ = self.state.remove(&record.id);
                }
            }
        }
        let s = self.store.clone();
        let disks = blocking(move || Ok::<_, MigrationError>(s.list_disks()?)).await?;
        for disk in disks {
            if disk.name.ends_with(".incoming") && !known.contains(&disk.name) {
                tracing::warn!(disk = %disk.name, "removing a partial disk no migration record explains");
                let s = self.store.clone();
                blocking(move || Ok::<_, MigrationError>(s.delete_disk(&disk.name)?)).await?;
            }
        }
        Ok(())
    }

    async fn restore_one(self: &Arc<Self>, record: &MigrationRecord, hello: Hello) -> Result<(), MigrationError> {
        let switched = record.stage == Stage::Switched;
        let name = if switched { hello.disk.clone() } else { incoming_name(&hello.disk) };
        if switched {
            // Stopped between recording the switch-over and renaming the disk: rename it now.
            let s = self.store.clone();
            let (temp, real) = (incoming_name(&hello.disk), hello.disk.clone());
            blocking(move || {
                if s.disk(&real).is_err() && s.disk(&temp).is_ok() {
                    tracing::warn!(disk = %real, "finishing a switch-over that a restart interrupted");
                    s.rename_disk(&temp, &real)?;
                }
                Ok::<_, MigrationError>(())
            })
            .await?;
        }
        let s = self.store.clone();
        let n = name.clone();
        let info = match blocking(move || Ok::<_, MigrationError>(s.disk(&n)?)).await {
            Ok(i) => i,
            Err(_) => {
                tracing::warn!(id = %record.id, disk = %name, "a migration record names a disk that is gone; dropping the record");
                self.state.remove(&record.id)?;
                return Ok(());
            }
        };
        let status = MigrationStatus::new(MigrationReport::new(&record.id, &hello.disk, "destination", &record.peer));
        status.update(|r| {
            r.disk_bytes = hello.size;
            r.block_size = hello.block_size;
            r.cancellable = !switched;
            r.phase = if switched { Phase::PostCopy } else { Phase::PreCopy };
        });
        let mut pending = Pending::default();
        let mut proto = Proto { needs_rebuild: !switched, ..Default::default() };
        if switched {
            let (entries, processed) = PendingJournal::load_from(self.state.as_ref(), &record.id)?;
            proto.processed = processed;
            proto.processed_at_switch = processed;
            // A block whose content is the one it waited for arrived (its journal entry was
            // lost with the crash); the rest is still missing.
            let blocks: Vec<u64> = entries.iter().map(|e| e.0).collect();
            let s = self.store.clone();
            let id = info.id;
            let current = blocking(move || Ok::<_, MigrationError>(s.block_fingerprints(id, &blocks)?)).await?;
            for ((block, fp), now) in entries.into_iter().zip(current) {
                if now == Some(fp) {
                    continue;
                }
                pending.by_block.insert(block, fp);
                pending.waiting.entry(fp).or_default().push(block);
                pending.wanted.insert(fp);
            }
            pending.switched = true;
        }
        status.interrupt("parked after a restart; waiting for the source to reconnect");
        let journal = if switched { PendingJournal::open(self.state.as_ref(), &record.id)? } else { None };
        let session = self.new_session(hello.clone(), info.id, status, pending, proto, journal)?;
        if switched {
            let disk = Arc::new(PostCopyDisk { inner: session.incoming.clone() });
            tracing::warn!(id = %record.id, disk = %hello.disk, missing = disk.missing_blocks(), "serving a migrated disk whose post-copy was interrupted by a restart; missing blocks wait for the source");
            self.hooks.switch_over(&hello.disk, disk).map_err(MigrationError::Hook)?;
            if session.incoming.pending.lock().by_block.is_empty() {
                self.finish(&session, Ok(()));
                return Ok(());
            }
        } else {
            tracing::warn!(id = %record.id, disk = %hello.disk, "parked an incoming migration after a restart; the source resumes it");
            self.park_timer(&session);
        }
        Ok(())
    }

    fn new_session(
        &self,
        hello: Hello,
        disk: DiskId,
        status: Arc<MigrationStatus>,
        pending: Pending,
        proto: Proto,
        journal: Option<PendingJournal>,
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
        });
        self.sessions.lock().insert(session.hello.migration_id.clone(), session.clone());
        self.hooks.registered(&session.hello.migration_id, session.status.clone());
        Ok(session)
    }

    /// Cancels a migration here before its switch-over: the partial disk goes.
    pub async fn cancel(&self, id: &str) -> Result<(), String> {
        let session = self.sessions.lock().get(id).cloned().ok_or_else(|| format!("no incoming migration {id:?}"))?;
        if session.incoming.pending.lock().switched {
            return Err(format!("migration {id} has switched over: this server serves the disk now"));
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
        exchange_greetings(&mut stream, &status.traffic).await?;
        let hello = match read_message(&mut stream, &status.traffic).await? {
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
                if let Err(e) = self.state.save(&record) {
                    tracing::error!(error = %e, "cannot record an incoming migration; a restart would lose it");
                }
                tracing::info!(disk = %hello.disk, size = hello.size, id = %hello.migration_id, "receiving a migration");
                self.new_session(hello.clone(), info.id, status, Pending::default(), Proto::default(), None)?
            }
        };
        if hello.resume {
            session.status.traffic.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.attach(session, stream, hello.rebuild).await
    }

    /// Runs one connection of a session to its end: done, failed, or parked.
    async fn attach<S>(self: &Arc<Self>, session: Arc<Session>, mut stream: S, rebuild: bool) -> Result<MigrationReport, MigrationError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Take the session from an older connection (a half-dead one may not know yet).
        let generation = session.generation.fetch_add(1, Ordering::SeqCst) + 1;
        session.superseded.notify_waiters();
        let mut out_rx = session.outbound.clone().lock_owned().await;
        while out_rx.try_recv().is_ok() {}
        let status = session.status.clone();
        let info = {
            let mut proto = session.proto.lock();
            let switched = session.incoming.pending.lock().switched;
            let rebuild = !switched && (rebuild || proto.needs_rebuild);
            if rebuild {
                let keep_switch = proto.processed_at_switch;
                *proto = Proto { processed_at_switch: keep_switch, ..Default::default() };
            }
            AcceptInfo { processed: proto.processed, switched, rebuild }
        };
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
            for chunk in wanted.chunks(crate::protocol::MAX_LIST) {
                let _ = session.out.send(Frame::new(&Message::Want(chunk.to_vec())));
            }
            let proto = session.proto.lock();
            if let Some(round) = proto.last_done {
                let _ = session.out.send(Frame::new(&Message::RoundDone { round }));
            }
            if p.switched {
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
                if out_rx.is_empty() {
                    writer.flush().await?;
                }
            }
            writer.flush().await.ok();
            writer.shutdown().await.ok();
            drop(out_rx);
            Ok::<(), MigrationError>(())
        });

        let result = {
            let conn = Connection { session: &session, hooks: &self.hooks, state: &self.state };
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
    fn park_timer(self: &Arc<Self>, session: &Arc<Session>) {
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
            } else if !session.incoming.pending.lock().switched {
                tracing::warn!(id = %session.hello.migration_id, "the source did not come back; dropping the partial disk");
                this.fail(&session, &MigrationError::Refused(format!("the source did not reconnect within {timeout:?}"))).await;
            }
        });
    }

    fn finish(&self, session: &Arc<Session>, _: Result<(), ()>) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        self.sessions.lock().remove(&session.hello.migration_id);
        if let Err(e) = self.state.remove(&session.hello.migration_id) {
            tracing::warn!(error = %e, "cannot remove a finished migration's record");
        }
        PendingJournal::remove(self.state.as_ref(), &session.hello.migration_id);
        let report = session.incoming.pending.lock().report.clone();
        session.status.update(|r| {
            r.destination = report;
            r.link_state = "closed".into();
        });
        session.status.finish(Phase::Done, None);
    }

    async fn fail(&self, session: &Arc<Session>, e: &MigrationError) {
        if session.ended.swap(true, Ordering::SeqCst) {
            return;
        }
        let switched = {
            let mut p = session.incoming.pending.lock();
            p.failed = Some(e.to_string());
            p.switched
        };
        session.incoming.arrived.notify_all();
        self.sessions.lock().remove(&session.hello.migration_id);
        if !switched {
            // The source is still authoritative: drop the partial disk.
            let s = self.store.clone();
            let name = incoming_name(&session.hello.disk);
            if let Err(err) = blocking(move || Ok::<_, MigrationError>(s.delete_disk(&name)?)).await {
                tracing::error!(error = %err, "cannot delete a partial incoming disk");
            }
            let _ = self.state.remove(&session.hello.migration_id);
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

fn is_link_error(e: &MigrationError) -> bool {
    matches!(e, MigrationError::Io(_) | MigrationError::Closed)
}

/// Serves one incoming migration connection to completion with no resume (tests and tools):
/// a lost link parks nothing anyone will come back for.
pub async fn run_destination<S>(
    store: Arc<Store>,
    stream: S,
    hooks: Arc<dyn DestHooks>,
    status: Arc<MigrationStatus>,
) -> Result<MigrationReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let dest = Destination::new(store, hooks, Arc::new(crate::state::MemStateStore::default()), Duration::ZERO);
    let result = dest.serve(stream, status.clone()).await;
    if let Err(e) = &result {
        let sessions: Vec<Arc<Session>> = dest.sessions.lock().values().cloned().collect();
        for s in sessions {
            dest.fail(&s, e).await;
        }
        if !status.report().is_finished() {
            status.finish(Phase::Failed, Some(e.to_string()));
        }
    }
    result
}

fn check_hello(store: &Store, hello: &Hello) -> Result<(), String> {
    if hello.block_size != store.block_size() {
        return Err(format!("block size {} differs from this store's {}", hello.block_size, store.block_size()));
    }
    if hello.algorithm != store.algorithm().name() {
        return Err(format!("fingerprint algorithm {} differs from this store's {}", hello.algorithm, store.algorithm()));
    }
    Ok(())
}

/// Checks for a new (not resumed) migration.
fn check_new(store: &Store, hello: &Hello) -> Result<(), String> {
    {
        if store.disk(&hello.disk).is_ok() {
            return Err(format!("disk {:?} already exists at the destination", hello.disk));
        }
        if store.disk(&incoming_name(&hello.disk)).is_ok() {
            return Err(format!("a migration of {:?} is already arriving here", hello.disk));
        }
        if hello.size % 512 != 0 {
            return Err(format!("size {} is not a multiple of 512", hello.size));
        }
    }
    Ok(())
}

/// The name an arriving disk has until the switch-over: it is never exported under its real
/// name while partial.
pub fn incoming_name(disk: &str) -> String {
    format!("{disk}.incoming")
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, why: &str, status: &MigrationStatus) {
    tracing::warn!(reason = why, "refusing a migration");
    let _ = crate::wire::write_message(stream, &Message::Error(ErrorMessage { message: why.to_string() }), &status.traffic).await;
    let _ = stream.shutdown().await;
}

/// Plan mode: count what the listed fingerprints would need, and say which are missing.
async fn plan<S>(store: Arc<Store>, mut stream: S, hello: &Hello, status: &MigrationStatus) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut report = DestReport::default();
    let mut seen: HashSet<Fingerprint> = HashSet::new();
    loop {
        match read_message(&mut stream, &status.traffic).await? {
            Some(Message::Fingerprints { runs, .. }) => {
                let fps: Vec<Fingerprint> = runs
                    .into_iter()
                    .flat_map(|r| match r {
                        Run::Mapped { fps, .. } => fps,
                        Run::Zero { .. } => Vec::new(),
                    })
                    .collect();
                report.blocks_listed += fps.len() as u64;
                let s = store.clone();
                let lookup = fps.clone();
                let present = blocking(move || Ok::<_, MigrationError>(s.has_many(&lookup)?)).await?;
                let mut want = Vec::new();
                for (fp, have) in fps.into_iter().zip(present) {
                    if have {
                        report.neighbour_hits += 1;
                    } else if !seen.insert(fp) {
                        report.duplicates += 1;
                    } else {
                        report.wanted += 1;
                        want.push(fp);
                    }
                }
                if !want.is_empty() {
                    crate::wire::write_message(&mut stream, &Message::Want(want), &status.traffic).await?;
                }
            }
            Some(Message::RoundEnd { .. }) => {
                let blocks = hello.size.div_ceil(u64::from(hello.block_size));
                report.zero_blocks = blocks.saturating_sub(report.blocks_listed);
                crate::wire::write_message(&mut stream, &Message::Plan(report), &status.traffic).await?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            Some(other) => return Err(MigrationError::Unexpected(other.name())),
            None => return Err(MigrationError::Closed),
        }
    }
}

/// One connection's view of a session: applies what the source sends.
struct Connection<'a> {
    session: &'a Arc<Session>,
    hooks: &'a Arc<dyn DestHooks>,
    state: &'a Arc<dyn StateStore>,
}

impl Connection<'_> {
    fn send(&self, msg: Message) -> Result<(), MigrationError> {
        self.session.out.send(Frame::new(&msg)).map_err(|_| MigrationError::Closed)
    }

    fn incoming(&self) -> &Arc<Incoming> {
        &self.session.incoming
    }

    /// Counts an applied sequenced message and acknowledges it.
    fn applied(&self) -> Result<(), MigrationError> {
        let processed = {
            let mut proto = self.session.proto.lock();
            proto.processed += 1;
            proto.processed
        };
        self.send(Message::Ack { processed })
    }

    async fn run<R: AsyncRead + Unpin>(&self, reader: &mut R) -> Result<(), MigrationError> {
        let status = &self.session.status;
        loop {
            let msg = read_message(reader, &status.traffic).await?.ok_or(MigrationError::Closed)?;
            match msg {
                Message::Fingerprints { round, runs } => {
                    if self.incoming().pending.lock().switched {
                        return Err(MigrationError::Unexpected("FINGERPRINTS after SWITCH"));
                    }
                    let defer = round > 0 && self.session.hello.defer_dirty;
                    let want = self.apply_fingerprints(round, runs, defer).await?;
                    if !want.is_empty() {
                        self.send(Message::Want(want))?;
                    }
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
                Message::Data { raw_len, frame } => {
                    self.apply_data(raw_len, frame).await?;
                    self.after_progress()?;
                }
                Message::Switch => {
                    if !self.incoming().pending.lock().switched {
                        self.switch_over().await?;
                    }
                    self.applied()?;
                    self.after_progress()?;
                }
                Message::Bye => {
                    if !self.session.proto.lock().completed {
                        return Err(MigrationError::Unexpected("BYE before COMPLETE"));
                    }
                    return Ok(());
                }
                Message::Error(e) => return Err(MigrationError::Refused(e.message)),
                other => return Err(MigrationError::Unexpected(other.name())),
            }
        }
    }

    /// Maps what is here, records what is missing; returns the fingerprints to ask for.
    async fn apply_fingerprints(&self, round: u32, runs: Vec<Run>, defer: bool) -> Result<Vec<Fingerprint>, MigrationError> {
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
        blocking(move || apply_fingerprints(&inc, runs, defer)).await
    }

    async fn apply_data(&self, raw_len: u32, frame: Vec<u8>) -> Result<(), MigrationError> {
        let inc = self.incoming().clone();
        blocking(move || {
            let records = decode_frame(raw_len, &frame, inc.block_size as usize)?;
            apply_records(&inc, records)
        })
        .await?;
        self.incoming().arrived.notify_all();
        Ok(())
    }

    async fn switch_over(&self) -> Result<(), MigrationError> {
        let session = self.session;
        let id = session.hello.migration_id.clone();
        // What is still missing is written down before the disk can be written: after a
        // restart, it tells blocks still to come from blocks the guest has written since.
        let processed = session.proto.lock().processed + 1;
        let entries: Vec<(u64, Fingerprint)> = session.incoming.pending.lock().by_block.iter().map(|(b, fp)| (*b, *fp)).collect();
        let state = self.state.clone();
        let journal = {
            let id = id.clone();
            blocking(move || PendingJournal::create(state.as_ref(), &id, &entries, processed)).await?
        };
        *session.incoming.journal.lock() = journal;
        // The record says Switched before the disk takes its real name: a restart in between
        // finishes the rename (see `restore_one`), so a partial disk never shows under the
        // real name without the list of what it still lacks.
        let record = MigrationRecord {
            id: id.clone(),
            role: "destination".into(),
            disk: session.hello.disk.clone(),
            peer: session.status.report().peer,
            stage: Stage::Switched,
            config: None,
            hello: Some(session.hello.clone()),
        };
        let state = self.state.clone();
        blocking(move || state.save(&record)).await?;
        let s = session.incoming.store.clone();
        let (temp, name) = (incoming_name(&session.hello.disk), session.hello.disk.clone());
        blocking(move || Ok::<_, MigrationError>(s.rename_disk(&temp, &name)?)).await?;
        let (report, deferred) = {
            let mut p = session.incoming.pending.lock();
            p.switched = true;
            // What deferred rounds left is asked for now, once, for the blocks that still
            // need it (a later round may have listed other content for them since).
            let deferred: Vec<Fingerprint> = std::mem::take(&mut p.deferred)
                .into_iter()
                .filter(|fp| p.waiting.get(fp).is_some_and(|blocks| blocks.iter().any(|b| p.by_block.get(b) == Some(fp))))
                .collect();
            p.report.wanted += deferred.len() as u64;
            p.wanted.extend(deferred.iter().copied());
            (p.report.clone(), deferred)
        };
        session.proto.lock().processed_at_switch = processed;
        self.hooks.switch_over(&session.hello.disk, Arc::new(PostCopyDisk { inner: session.incoming.clone() })).map_err(MigrationError::Hook)?;
        let at = session.status.since_start();
        session.status.update(|r| {
            r.phase = Phase::PostCopy;
            r.switch_seconds = Some(at);
            r.cancellable = false;
        });
        tracing::info!(disk = %session.hello.disk, missing = session.incoming.pending.lock().by_block.len(), "switched over: serving the disk here");
        self.send(Message::Switched(report))?;
        for chunk in deferred.chunks(crate::protocol::MAX_LIST) {
            self.send(Message::Want(chunk.to_vec()))?;
        }
        Ok(())
    }

    /// Reports finished rounds, and completion after the switch-over.
    fn after_progress(&self) -> Result<(), MigrationError> {
        let (idle, switched, report) = {
            let p = self.incoming().pending.lock();
            (p.wanted.is_empty(), p.switched, p.report.clone())
        };
        if !idle {
            return Ok(());
        }
        let (rounds, complete_now) = {
            let mut proto = self.session.proto.lock();
            let rounds = std::mem::take(&mut proto.ended_rounds);
            if let Some(&r) = rounds.last() {
                proto.last_done = Some(r);
            }
            let complete_now = switched && !proto.completed;
            if complete_now {
                proto.completed = true;
            }
            (rounds, complete_now)
        };
        for round in rounds {
            self.send(Message::RoundDone { round })?;
        }
        if complete_now {
            self.hooks.complete(&self.session.hello.disk);
            tracing::info!(disk = %self.session.hello.disk, "every block is local");
            self.send(Message::Complete(report))?;
        }
        Ok(())
    }
}

/// After the switch-over, the blocks still missing, and the ones that stopped missing since
/// (arrived, or overwritten by the guest), as two files beside the migration's record. The
/// removals file is appended to without a sync; it is synced before any flush or FUA write
/// of the disk completes, so a write the guest was promised is never undone by a restart.
#[derive(Debug)]
pub(crate) struct PendingJournal {
    removed: std::fs::File,
    /// Removals appended since the last sync.
    unsynced: bool,
}

impl PendingJournal {
    fn paths(state: &dyn StateStore, id: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
        let dir = state.dir()?;
        Some((dir.join(format!("{id}.pending")), dir.join(format!("{id}.removed"))))
    }

    fn create(state: &dyn StateStore, id: &str, entries: &[(u64, Fingerprint)], processed: u64) -> Result<Option<PendingJournal>, MigrationError> {
        use std::io::Write;
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let mut buf = Vec::with_capacity(8 + entries.len() * 24);
        buf.extend_from_slice(&processed.to_le_bytes());
        for (b, fp) in entries {
            buf.extend_from_slice(&b.to_le_bytes());
            buf.extend_from_slice(&fp.0);
        }
        let tmp = pending.with_extension("pending.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &pending)?;
        let removed = std::fs::File::create(&removed)?;
        removed.sync_all()?;
        if let Some(dir) = state.dir() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(Some(PendingJournal { removed, unsynced: false }))
    }

    fn open(state: &dyn StateStore, id: &str) -> Result<Option<PendingJournal>, MigrationError> {
        let Some((_, removed)) = Self::paths(state, id) else {
            return Ok(None);
        };
        let f = std::fs::OpenOptions::new().append(true).create(true).open(removed)?;
        Ok(Some(PendingJournal { removed: f, unsynced: false }))
    }

    /// The entries still missing and the sequenced count at the switch-over.
    fn load_from(state: &dyn StateStore, id: &str) -> Result<(Vec<(u64, Fingerprint)>, u64), MigrationError> {
        let Some((pending, removed)) = Self::paths(state, id) else {
            return Err(MigrationError::Hook("post-copy state is not kept for this store".into()));
        };
        let buf = std::fs::read(pending)?;
        if buf.len() < 8 || (buf.len() - 8) % 24 != 0 {
            return Err(MigrationError::Corrupt("the pending-blocks file is truncated".into()));
        }
        let processed = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let gone: HashSet<u64> = match std::fs::read(removed) {
            Ok(r) => r.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashSet::new(),
            Err(e) => return Err(e.into()),
        };
        let entries = buf[8..]
            .chunks_exact(24)
            .map(|c| (u64::from_le_bytes(c[..8].try_into().expect("8 bytes")), Fingerprint(c[8..].try_into().expect("16 bytes"))))
            .filter(|(b, _)| !gone.contains(b))
            .collect();
        Ok((entries, processed))
    }

    fn remove(state: &dyn StateStore, id: &str) {
        if let Some((pending, removed)) = Self::paths(state, id) {
            let _ = std::fs::remove_file(pending);
            let _ = std::fs::remove_file(removed);
        }
    }

    fn note_removed(&mut self, blocks: &[u64]) -> std::io::Result<()> {
        use std::io::Write;
        let mut buf = Vec::with_capacity(blocks.len() * 8);
        for b in blocks {
            buf.extend_from_slice(&b.to_le_bytes());
        }
        self.unsynced = true;
        self.removed.write_all(&buf)
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.unsynced {
            self.removed.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }
}

/// `defer`: missing content is recorded for the switch-over instead of asked for now.
fn apply_fingerprints(inc: &Incoming, runs: Vec<Run>, defer: bool) -> Result<Vec<Fingerprint>, MigrationError> {
    let store = &inc.store;
    let mut entries: Vec<(u64, Fingerprint)> = Vec::new();
    let mut zero_runs: Vec<(u64, u64)> = Vec::new();
    for run in runs {
        match run {
            Run::Mapped { first, fps } => entries.extend(fps.into_iter().enumerate().map(|(i, fp)| (first + i as u64, fp))),
            Run::Zero { first, count } => zero_runs.push((first, count)),
        }
    }
    let bs = inc.block_size;
    for (first, count) in zero_runs {
        {
            let mut p = inc.pending.lock();
            for b in first..first + count {
                p.by_block.remove(&b);
            }
        }
        store.write_zeroes(inc.disk, first * bs, count * bs, false)?;
    }
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    // A listed block supersedes whatever it was waiting for.
    {
        let mut p = inc.pending.lock();
        if !p.by_block.is_empty() {
            for (b, _) in &entries {
                p.by_block.remove(b);
            }
        }
    }
    let mut distinct: Vec<Fingerprint> = entries.iter().map(|e| e.1).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let present: HashSet<Fingerprint> = distinct.iter().zip(store.has_many(&distinct)?).filter(|(_, h)| *h).map(|(fp, _)| *fp).collect();

    let mut to_map: Vec<(u64, Fingerprint)> = Vec::new();
    let mut want: Vec<Fingerprint> = Vec::new();
    let mut p = inc.pending.lock();
    for (block, fp) in entries {
        if p.wanted.contains(&fp) {
            p.report.duplicates += 1;
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
        } else if present.contains(&fp) {
            if p.received.contains(&fp) {
                p.report.duplicates += 1;
            } else {
                p.report.neighbour_hits += 1;
            }
            to_map.push((block, fp));
        } else if p.deferred.contains(&fp) {
            p.report.duplicates += 1;
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
        } else if defer {
            p.deferred.insert(fp);
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
        } else {
            p.report.wanted += 1;
            p.wanted.insert(fp);
            p.by_block.insert(block, fp);
            p.waiting.entry(fp).or_default().push(block);
            want.push(fp);
        }
        p.report.blocks_listed += 1;
    }
    drop(p);
    if !to_map.is_empty() {
        let applied = store.map_existing(inc.disk, &to_map)?;
        // A block deleted here between the lookup and the mapping (another disk let go of
        // it): ask for it like any missing block.
        let mut p = inc.pending.lock();
        for ((block, fp), ok) in to_map.into_iter().zip(applied) {
            if !ok {
                p.by_block.insert(block, fp);
                p.waiting.entry(fp).or_default().push(block);
                if p.wanted.insert(fp) {
                    p.report.wanted += 1;
                    want.push(fp);
                }
            }
        }
    }
    Ok(want)
}

fn apply_records(inc: &Incoming, records: Vec<Record>) -> Result<(), MigrationError> {
    let store = &inc.store;
    let bs = inc.block_size;
    let mut p = inc.pending.lock();
    for record in records {
        match record {
            Record::Block { fp, data } => {
                if store.fingerprint(&data) != fp {
                    return Err(MigrationError::Corrupt(format!("block {fp} arrived with content that does not match")));
                }
                if !p.wanted.remove(&fp) {
                    // Not asked for (or already here): ignore, but do not trust it further.
                    continue;
                }
                p.received.insert(fp);
                if !p.switched {
                    p.report.received_before_switch += 1;
                } else if p.urgent.remove(&fp) {
                    p.report.fetched_on_demand += 1;
                } else {
                    p.report.fetched_background += 1;
                }
                let blocks: Vec<u64> = p.waiting.remove(&fp).unwrap_or_default().into_iter().filter(|b| p.by_block.get(b) == Some(&fp)).collect();
                let Some((&first, rest)) = blocks.split_first() else {
                    continue;
                };
                // Written while the pending lock is held: a reader waits for the lock rather
                // than seeing the block neither missing nor written.
                store.write(inc.disk, first * bs, &data, false)?;
                if !rest.is_empty() {
                    let entries: Vec<(u64, Fingerprint)> = rest.iter().map(|&b| (b, fp)).collect();
                    store.map_existing(inc.disk, &entries)?;
                }
                if let Some(j) = inc.journal.lock().as_mut() {
                    j.note_removed(&blocks)?;
                }
                for b in blocks {
                    p.by_block.remove(&b);
                }
            }
            Record::Gone(fp) => {
                // The source changed every block that had this content; later rounds list
                // their new content, which supersedes these entries.
                p.report.gone += 1;
                p.wanted.remove(&fp);
                p.urgent.remove(&fp);
                for b in p.waiting.remove(&fp).unwrap_or_default() {
                    if p.by_block.get(&b) == Some(&fp) {
                        p.by_block.remove(&b);
                    }
                }
            }
        }
    }
    Ok(())
}
