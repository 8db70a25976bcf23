//! The destination side: maps every listed block it already holds, asks for the rest once
//! each, verifies and stores what arrives, switches over on request, and then serves the disk
//! through a [`PostCopyDisk`] that fetches missing blocks on demand.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_store::{DiskId, Extent, Fingerprint, Store, StoreError};
use parking_lot::{Condvar, Mutex};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::compress::{decode_frame, Record};
use crate::protocol::{DestReport, ErrorMessage, Hello, Message, Mode, Run};
use crate::report::{MigrationReport, Phase};
use crate::source::MigrationStatus;
use crate::wire::{exchange_greetings, read_message, write_frame, Frame};
use crate::{blocking, MigrationError};

/// What the destination server does at the edges of a migration.
pub trait DestHooks: Send + Sync {
    /// The disk is ready: serve it, writable, through `disk` from now on.
    fn switch_over(&self, name: &str, disk: Arc<PostCopyDisk>) -> Result<(), String>;
    /// Every block is local; the export may serve the store's disk directly again.
    fn complete(&self, name: &str);
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
    fn change(&self, offset: u64, len: u64, apply: impl FnOnce() -> Result<(), StoreError>) -> Result<(), PostCopyError> {
        let bs = self.inner.block_size;
        let blocks = self.blocks(offset, len);
        let end = offset + len;
        let partial = |b: u64| b * bs < offset || (b + 1) * bs > end;
        let guard = self.inner.pending.lock();
        let mut guard = self.wait_local(guard, |p| {
            let mut fps: Vec<Fingerprint> = blocks
                .clone()
                .filter(|&b| partial(b))
                .filter_map(|b| p.by_block.get(&b).copied())
                .collect();
            fps.sort_unstable();
            fps.dedup();
            fps
        })?;
        let covered: Vec<u64> = if guard.by_block.is_empty() {
            Vec::new()
        } else {
            blocks.filter(|b| guard.by_block.contains_key(b)).collect()
        };
        if covered.is_empty() {
            drop(guard);
            return Ok(apply()?);
        }
        // Keep the lock while writing, so no reader sees these blocks neither old nor new.
        for b in covered {
            guard.by_block.remove(&b);
        }
        apply()?;
        Ok(())
    }

    pub fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, data.len() as u64, || i.store.write(i.disk, offset, data, fua))
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, len, || i.store.write_zeroes(i.disk, offset, len, fua))
    }

    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), PostCopyError> {
        let i = &self.inner;
        self.change(offset, len, || i.store.trim(i.disk, offset, len, fua))
    }

    pub fn flush(&self) -> Result<(), PostCopyError> {
        Ok(self.inner.store.flush()?)
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

/// Serves one incoming migration connection to completion. `status` may start as a
/// placeholder; the source's HELLO fills in the migration's id and disk.
pub async fn run_destination<S>(store: Arc<Store>, stream: S, hooks: Arc<dyn DestHooks>, status: Arc<MigrationStatus>) -> Result<MigrationReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let result = serve_connection(store, stream, hooks, status.clone()).await;
    if let Err(e) = &result {
        if !status.report().is_finished() {
            status.finish(Phase::Failed, Some(e.to_string()));
        }
    }
    result
}

async fn serve_connection<S>(store: Arc<Store>, mut stream: S, hooks: Arc<dyn DestHooks>, status: Arc<MigrationStatus>) -> Result<MigrationReport, MigrationError>
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
    if let Err(why) = check_hello(&store, &hello) {
        refuse(&mut stream, &why, &status).await;
        return Err(MigrationError::Refused(why));
    }
    status.update(|r| {
        r.id = hello.migration_id.clone();
        r.disk = hello.disk.clone();
        r.disk_bytes = hello.size;
        r.block_size = hello.block_size;
    });
    match hello.mode {
        Mode::Plan => {
            crate::wire::write_message(&mut stream, &Message::Accept, &status.traffic).await?;
            plan(store, stream, &hello, &status).await?;
            status.finish(Phase::Done, None);
            Ok(status.report())
        }
        Mode::Migrate => receive(store, stream, hello, hooks, status).await,
    }
}

fn check_hello(store: &Store, hello: &Hello) -> Result<(), String> {
    if hello.block_size != store.block_size() {
        return Err(format!("block size {} differs from this store's {}", hello.block_size, store.block_size()));
    }
    if hello.algorithm != store.algorithm().name() {
        return Err(format!("fingerprint algorithm {} differs from this store's {}", hello.algorithm, store.algorithm()));
    }
    if hello.mode == Mode::Migrate {
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

async fn receive<S>(store: Arc<Store>, mut stream: S, hello: Hello, hooks: Arc<dyn DestHooks>, status: Arc<MigrationStatus>) -> Result<MigrationReport, MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let temp = incoming_name(&hello.disk);
    let info = {
        let s = store.clone();
        let (name, size) = (temp.clone(), hello.size);
        match blocking(move || Ok::<_, MigrationError>(s.create_disk(&name, size)?)).await {
            Ok(i) => i,
            Err(e) => {
                refuse(&mut stream, &e.to_string(), &status).await;
                return Err(e);
            }
        }
    };
    crate::wire::write_message(&mut stream, &Message::Accept, &status.traffic).await?;
    status.update(|r| r.phase = Phase::PreCopy);
    tracing::info!(disk = %hello.disk, size = hello.size, "receiving a migration");

    let (mut reader, mut writer) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Frame>();
    let st = status.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            write_frame(&mut writer, &frame, &st.traffic).await?;
            if out_rx.is_empty() {
                writer.flush().await?;
            }
        }
        writer.shutdown().await.ok();
        Ok::<(), MigrationError>(())
    });
    let incoming = Arc::new(Incoming {
        store: store.clone(),
        disk: info.id,
        block_size: u64::from(store.block_size()),
        pending: Mutex::new(Pending::default()),
        arrived: Condvar::new(),
        fetch: out_tx.clone(),
    });

    let mut state = Receiver { incoming: incoming.clone(), out: out_tx, ended_rounds: Vec::new(), listed_round0: 0, hello: hello.clone(), completed: false };
    let result = state.run(&mut reader, &hooks, &status).await;
    match &result {
        Ok(()) => {}
        Err(e) => {
            let switched = {
                let mut p = incoming.pending.lock();
                p.failed = Some(e.to_string());
                p.switched
            };
            incoming.arrived.notify_all();
            let _ = state.out.send(Frame::new(&Message::Error(ErrorMessage { message: e.to_string() })));
            if !switched {
                // The source is still authoritative: drop the partial disk.
                let s = store.clone();
                let name = temp.clone();
                let _ = blocking(move || Ok::<_, MigrationError>(s.delete_disk(&name)?)).await;
                tracing::warn!(disk = %hello.disk, error = %e, "migration failed before the switch-over; partial disk removed");
            } else {
                tracing::error!(disk = %hello.disk, error = %e, "migration link failed after the switch-over; missing blocks cannot be read");
            }
        }
    }
    drop(state);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    let report = incoming.pending.lock().report.clone();
    status.update(|r| r.destination = report);
    match result {
        Ok(()) => {
            status.finish(Phase::Done, None);
            Ok(status.report())
        }
        Err(e) => {
            status.finish(Phase::Failed, Some(e.to_string()));
            Err(e)
        }
    }
}

struct Receiver {
    incoming: Arc<Incoming>,
    out: mpsc::UnboundedSender<Frame>,
    ended_rounds: Vec<u32>,
    listed_round0: u64,
    hello: Hello,
    completed: bool,
}

impl Receiver {
    fn send(&self, msg: Message) -> Result<(), MigrationError> {
        self.out.send(Frame::new(&msg)).map_err(|_| MigrationError::Closed)
    }

    async fn run<R: AsyncRead + Unpin>(&mut self, reader: &mut R, hooks: &Arc<dyn DestHooks>, status: &Arc<MigrationStatus>) -> Result<(), MigrationError> {
        loop {
            let msg = read_message(reader, &status.traffic).await?.ok_or(MigrationError::Closed)?;
            match msg {
                Message::Fingerprints { round, runs } => {
                    if self.incoming.pending.lock().switched {
                        return Err(MigrationError::Unexpected("FINGERPRINTS after SWITCH"));
                    }
                    let want = self.apply_fingerprints(round, runs).await?;
                    if !want.is_empty() {
                        self.send(Message::Want(want))?;
                    }
                }
                Message::RoundEnd { round, .. } => {
                    if round == 0 {
                        let blocks = self.hello.size.div_ceil(u64::from(self.hello.block_size));
                        self.incoming.pending.lock().report.zero_blocks = blocks.saturating_sub(self.listed_round0);
                    }
                    self.ended_rounds.push(round);
                    self.after_progress(hooks)?;
                }
                Message::Data { raw_len, frame } => {
                    self.apply_data(raw_len, frame).await?;
                    self.after_progress(hooks)?;
                }
                Message::Switch => {
                    self.switch_over(hooks, status).await?;
                    self.after_progress(hooks)?;
                }
                Message::Bye => {
                    if !self.completed {
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
    async fn apply_fingerprints(&mut self, round: u32, runs: Vec<Run>) -> Result<Vec<Fingerprint>, MigrationError> {
        let blocks = self.hello.size.div_ceil(u64::from(self.hello.block_size));
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
        let inc = self.incoming.clone();
        let listed: u64 = runs.iter().filter(|r| matches!(r, Run::Mapped { .. })).map(Run::blocks).sum();
        if round == 0 {
            self.listed_round0 += listed;
        }
        blocking(move || apply_fingerprints(&inc, runs)).await
    }

    async fn apply_data(&mut self, raw_len: u32, frame: Vec<u8>) -> Result<(), MigrationError> {
        let inc = self.incoming.clone();
        blocking(move || {
            let records = decode_frame(raw_len, &frame, inc.block_size as usize)?;
            apply_records(&inc, records)
        })
        .await?;
        self.incoming.arrived.notify_all();
        Ok(())
    }

    async fn switch_over(&mut self, hooks: &Arc<dyn DestHooks>, status: &Arc<MigrationStatus>) -> Result<(), MigrationError> {
        let s = self.incoming.store.clone();
        let (temp, name) = (incoming_name(&self.hello.disk), self.hello.disk.clone());
        blocking(move || Ok::<_, MigrationError>(s.rename_disk(&temp, &name)?)).await?;
        let report = {
            let mut p = self.incoming.pending.lock();
            p.switched = true;
            p.report.clone()
        };
        hooks
            .switch_over(&self.hello.disk, Arc::new(PostCopyDisk { inner: self.incoming.clone() }))
            .map_err(MigrationError::Hook)?;
        let at = status.since_start();
        status.update(|r| {
            r.phase = Phase::PostCopy;
            r.switch_seconds = Some(at);
        });
        tracing::info!(disk = %self.hello.disk, missing = self.incoming.pending.lock().by_block.len(), "switched over: serving the disk here");
        self.send(Message::Switched(report))
    }

    /// Reports finished rounds, and completion after the switch-over.
    fn after_progress(&mut self, hooks: &Arc<dyn DestHooks>) -> Result<(), MigrationError> {
        let (idle, switched, report) = {
            let p = self.incoming.pending.lock();
            (p.wanted.is_empty(), p.switched, p.report.clone())
        };
        if !idle {
            return Ok(());
        }
        for round in std::mem::take(&mut self.ended_rounds) {
            self.send(Message::RoundDone { round })?;
        }
        if switched && !self.completed {
            self.completed = true;
            hooks.complete(&self.hello.disk);
            tracing::info!(disk = %self.hello.disk, "every block is local");
            self.send(Message::Complete(report))?;
        }
        Ok(())
    }
}

fn apply_fingerprints(inc: &Incoming, runs: Vec<Run>) -> Result<Vec<Fingerprint>, MigrationError> {
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
                let blocks: Vec<u64> = p
                    .waiting
                    .remove(&fp)
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|b| p.by_block.get(b) == Some(&fp))
                    .collect();
                let Some((&first, rest)) = blocks.split_first() else { continue };
                // Written while the pending lock is held: a reader waits for the lock rather
                // than seeing the block neither missing nor written.
                store.write(inc.disk, first * bs, &data, false)?;
                if !rest.is_empty() {
                    let entries: Vec<(u64, Fingerprint)> = rest.iter().map(|&b| (b, fp)).collect();
                    store.map_existing(inc.disk, &entries)?;
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
