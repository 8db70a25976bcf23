//! The source side: lists fingerprints, sends the blocks the destination asks for, runs the
//! dirty rounds, freezes, switches over and serves post-copy fetches until the destination
//! has everything.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use cas_store::{DiskId, Fingerprint, Store};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::compress::{compress, encode_records, LevelController, Record};
use crate::protocol::{DestReport, Hello, Message, Mode, Run};
use crate::report::{MigrationReport, Phase, PlanReport, SwitchAfter};
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

#[derive(Debug, Clone)]
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
}

impl MigrationStatus {
    pub fn new(report: MigrationReport) -> Arc<MigrationStatus> {
        Arc::new(MigrationStatus {
            traffic: Traffic::default(),
            report: Mutex::new(report),
            started: Instant::now(),
            cancel: tokio::sync::Notify::new(),
            cancel_requested: std::sync::atomic::AtomicBool::new(false),
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
        Ok(())
    }

    fn cancel_requested(&self) -> bool {
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

    pub(crate) fn update(&self, f: impl FnOnce(&mut MigrationReport)) {
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
}

/// Events the reader passes to the main task.
#[derive(Debug)]
enum Event {
    RoundDone(u32),
    Switched(DestReport),
    Complete(DestReport),
}

/// Work for the data sender.
#[derive(Debug)]
enum SendWork {
    Want(Vec<Fingerprint>),
    Fetch(Vec<Fingerprint>),
}

/// Runs a whole migration of `disk` over `stream` (connected to the destination's migration
/// listener). Returns the final report; `status` shows progress meanwhile.
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
    let info = store.disk(disk)?;
    status.update(|r| {
        r.switch_after = config.switch_after;
        r.disk_bytes = info.size;
        r.block_size = store.block_size();
    });
    let mut frozen = false;
    let mut switched = false;
    let result = migrate(&store, info.id, disk, stream, &config, &hooks, &status, &mut frozen, &mut switched).await;
    match &result {
        Ok(()) => {
            if config.delete_source {
                let s = store.clone();
                let name = disk.to_string();
                blocking(move || s.delete_disk(&name)).await?;
            }
            status.finish(Phase::Done, None);
        }
        Err(e) => {
            let _ = store.dirty_stop(info.id);
            if frozen && !switched {
                hooks.thaw(disk);
            }
            let phase = if matches!(e, MigrationError::Cancelled) { Phase::Cancelled } else { Phase::Failed };
            status.finish(phase, Some(e.to_string()));
            tracing::error!(disk, error = %e, switched, "migration ended without completing");
        }
    }
    result.map(|_| status.report())
}

#[allow(clippy::too_many_arguments)]
async fn migrate<S>(
    store: &Arc<Store>,
    disk_id: DiskId,
    disk: &str,
    mut stream: S,
    config: &SourceConfig,
    hooks: &Arc<dyn SourceHooks>,
    status: &Arc<MigrationStatus>,
    frozen: &mut bool,
    switched: &mut bool,
) -> Result<(), MigrationError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    exchange_greetings(&mut stream, &status.traffic).await?;
    let info = store.disk(disk)?;
    let hello = Hello {
        migration_id: config.migration_id.clone(),
        disk: disk.to_string(),
        size: info.size,
        block_size: store.block_size(),
        algorithm: store.algorithm().name().to_string(),
        mode: Mode::Migrate,
    };
    crate::wire::write_message(&mut stream, &Message::Hello(hello), &status.traffic).await?;
    match read_message(&mut stream, &status.traffic).await? {
        Some(Message::Accept) => {}
        Some(Message::Error(e)) => return Err(MigrationError::Refused(e.message)),
        Some(other) => return Err(MigrationError::Unexpected(other.name())),
        None => return Err(MigrationError::Closed),
    }
    status.update(|r| r.phase = Phase::PreCopy);

    // Dirty tracking starts before the snapshot: a write either is in the snapshot or marks
    // its block dirty (or both).
    store.dirty_start(disk_id)?;
    let snapshot = {
        let s = store.clone();
        blocking(move || s.map_snapshot(disk_id)).await?
    };

    let (reader, writer) = tokio::io::split(stream);
    // Fingerprints, control and on-demand data share one FIFO queue, so their order on the
    // wire is the order they were produced in (a later round must never overtake an earlier
    // one). Background data has its own queue, written only when the first is empty.
    let (high_tx, high_rx) = mpsc::channel::<Frame>(64);
    let (low_tx, low_rx) = mpsc::channel::<Frame>(4);
    let limiter = config.bandwidth_bps.map(crate::ratelimit::TokenBucket::new);
    let writer_task = tokio::spawn(run_writer(writer, high_rx, low_rx, status.clone(), limiter));
    let (event_tx, mut event_rx) = mpsc::unbounded_channel::<Event>();
    let (work_tx, work_rx) = mpsc::unbounded_channel::<SendWork>();
    let reader_task = tokio::spawn(run_reader(reader, event_tx, work_tx, status.clone()));
    let sender_task = tokio::spawn(run_data_sender(store.clone(), work_rx, high_tx.clone(), low_tx.clone(), config.clone(), status.clone()));

    let outcome = async {
        let pre_switch = async {
        // Round 0: the whole map.
        let listed = send_snapshot(snapshot, &high_tx).await?;
        status.update(|r| {
            r.rounds = 1;
            r.round_blocks.push(listed);
        });
        send(&high_tx, Message::RoundEnd { round: 0, last: false }).await?;
        let mut round = 0u32;
        // Dirty blocks taken by a converged loop that then stopped: the final round lists them.
        let mut carried: Vec<u64> = Vec::new();
        if config.switch_after != SwitchAfter::Fingerprints {
            wait_round(&mut event_rx, round).await?;
            if config.switch_after == SwitchAfter::Converged {
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
                    send_dirty_round(store, disk_id, round, &blocks, &high_tx).await?;
                    status.update(|r| {
                        r.rounds = round + 1;
                        r.round_blocks.push(count);
                    });
                    send(&high_tx, Message::RoundEnd { round, last: false }).await?;
                    wait_round(&mut event_rx, round).await?;
                }
            }
        }

        Ok::<_, MigrationError>((round, carried))
        };
        // Until the freeze, an operator may cancel: the source stays authoritative.
        let (mut round, carried) = tokio::select! {
            r = pre_switch => r?,
            _ = status.cancelled() => return Err(MigrationError::Cancelled),
        };
        if status.cancel_requested() {
            return Err(MigrationError::Cancelled);
        }
        status.update(|r| r.cancellable = false);

        // Switch-over: freeze, final dirty set, SWITCH, wait for SWITCHED.
        status.update(|r| r.phase = Phase::SwitchingOver);
        let freeze_start = Instant::now();
        hooks.freeze(disk).await.map_err(MigrationError::Hook)?;
        *frozen = true;
        round += 1;
        let dirty = store.dirty_take(disk_id)?;
        store.dirty_stop(disk_id)?;
        let mut blocks: Vec<u64> = dirty.iter().collect();
        if !carried.is_empty() {
            blocks.extend(carried);
            blocks.sort_unstable();
            blocks.dedup();
        }
        send_dirty_round(store, disk_id, round, &blocks, &high_tx).await?;
        send(&high_tx, Message::RoundEnd { round, last: true }).await?;
        send(&high_tx, Message::Switch).await?;
        let report = loop {
            match event_rx.recv().await {
                Some(Event::Switched(r)) => break r,
                Some(Event::RoundDone(_)) => {}
                Some(Event::Complete(_)) => return Err(MigrationError::Unexpected("COMPLETE")),
                None => return Err(MigrationError::Closed),
            }
        };
        *switched = true;
        hooks.switched(disk);
        let downtime = freeze_start.elapsed();
        let at = status.since_start();
        status.update(|r| {
            r.rounds = round + 1;
            r.round_blocks.push(blocks.len() as u64);
            r.downtime_ms = Some(downtime.as_secs_f64() * 1000.0);
            r.switch_seconds = Some(at);
            r.phase = Phase::PostCopy;
            r.destination = report;
        });
        tracing::info!(disk, downtime_ms = downtime.as_secs_f64() * 1000.0, "switched over");

        // Post-copy: serve fetches until the destination has everything.
        let report = loop {
            match event_rx.recv().await {
                Some(Event::Complete(r)) => break r,
                Some(_) => {}
                None => return Err(MigrationError::Closed),
            }
        };
        status.update(|r| r.destination = report);
        send(&high_tx, Message::Bye).await?;
        Ok::<(), MigrationError>(())
    }
    .await;

    drop(high_tx);
    drop(low_tx);
    sender_task.abort();
    if outcome.is_err() {
        reader_task.abort();
        writer_task.abort();
        return outcome;
    }
    // Let the writer drain (BYE) before the connection closes.
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(MigrationError::Closed),
    }
    reader_task.abort();
    Ok(())
}

async fn send(tx: &mpsc::Sender<Frame>, msg: Message) -> Result<(), MigrationError> {
    tx.send(Frame::new(&msg)).await.map_err(|_| MigrationError::Closed)
}

async fn wait_round(events: &mut mpsc::UnboundedReceiver<Event>, round: u32) -> Result<(), MigrationError> {
    loop {
        match events.recv().await {
            Some(Event::RoundDone(r)) if r == round => return Ok(()),
            Some(Event::RoundDone(_)) => {}
            Some(Event::Switched(_)) => return Err(MigrationError::Unexpected("SWITCHED")),
            Some(Event::Complete(_)) => return Err(MigrationError::Unexpected("COMPLETE")),
            None => return Err(MigrationError::Closed),
        }
    }
}

/// Streams a map snapshot as FINGERPRINTS frames of consecutive-block runs.
async fn send_snapshot(mut snapshot: cas_store::MapSnapshot, tx: &mpsc::Sender<Frame>) -> Result<u64, MigrationError> {
    let mut listed = 0u64;
    loop {
        let (batch, snap) = blocking(move || {
            let batch = snapshot.next_batch(FINGERPRINTS_PER_FRAME);
            batch.map(|b| (b, snapshot))
        })
        .await?;
        snapshot = snap;
        if batch.is_empty() {
            return Ok(listed);
        }
        listed += batch.len() as u64;
        let runs = runs_of(batch.into_iter().map(|(b, fp)| (b, Some(fp))));
        send(tx, Message::Fingerprints { round: 0, runs }).await?;
    }
}

/// Lists the current content of dirty blocks (zero runs for blocks that read as zeros).
async fn send_dirty_round(store: &Arc<Store>, disk: DiskId, round: u32, blocks: &[u64], tx: &mpsc::Sender<Frame>) -> Result<(), MigrationError> {
    for chunk in blocks.chunks(FINGERPRINTS_PER_FRAME) {
        let s = store.clone();
        let owned = chunk.to_vec();
        let fps = blocking(move || s.block_fingerprints(disk, &owned)).await?;
        let runs = runs_of(chunk.iter().copied().zip(fps));
        send(tx, Message::Fingerprints { round, runs }).await?;
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

/// Writes frames: control and on-demand data first, then fingerprints and background data.
async fn run_writer<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut high: mpsc::Receiver<Frame>,
    mut low: mpsc::Receiver<Frame>,
    status: Arc<MigrationStatus>,
    mut limiter: Option<crate::ratelimit::TokenBucket>,
) -> Result<(), MigrationError> {
    use tokio::io::AsyncWriteExt;
    loop {
        let frame = tokio::select! {
            biased;
            f = high.recv() => match f {
                Some(f) => f,
                None => break,
            },
            Some(f) = low.recv() => f,
        };
        // The cap applies to every frame, so on-demand data, which the queues put first,
        // stays first under the cap.
        if let Some(bucket) = limiter.as_mut() {
            let wait = bucket.charge(frame.len());
            if !wait.is_zero() {
                writer.flush().await?;
                tokio::time::sleep(wait).await;
            }
        }
        write_frame(&mut writer, &frame, &status.traffic).await?;
        if high.is_empty() && low.is_empty() {
            writer.flush().await?;
        }
    }
    writer.flush().await?;
    writer.shutdown().await.ok();
    Ok(())
}

/// Sends DATA frames for wanted blocks: on-demand fetches go first, in small frames, on the
/// high-priority queue; the background queue fills larger frames.
async fn run_data_sender(
    store: Arc<Store>,
    mut work: mpsc::UnboundedReceiver<SendWork>,
    high: mpsc::Sender<Frame>,
    low: mpsc::Sender<Frame>,
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
            Ok::<_, MigrationError>((raw.len(), frame, started.elapsed(), records.len(), gone))
        })
        .await;
        let (raw_len, frame, compress_time, count, gone) = match built {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "reading blocks to send failed");
                return;
            }
        };
        // A block that is gone was not sent; if it is asked for again, try again.
        for fp in gone {
            sent.remove(&fp);
        }
        status.traffic.data_raw.fetch_add(raw_len as u64, Ordering::Relaxed);
        status.update(|r| {
            r.blocks_sent += count as u64;
            r.zstd_level = lvl;
        });
        let frame = Frame::new(&Message::Data { raw_len: raw_len as u32, frame });
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

/// Compares a disk's fingerprints with a destination's store without moving any data.
pub async fn run_plan<S>(store: Arc<Store>, disk: &str, destination: &str, mut stream: S, link_rate_bps: Option<u64>, zstd_level: i32) -> Result<PlanReport, MigrationError>
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
    };
    crate::wire::write_message(&mut stream, &Message::Hello(hello), &traffic).await?;
    match read_message(&mut stream, &traffic).await? {
        Some(Message::Accept) => {}
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
    let listed = send_snapshot(snapshot, &tx).await?;
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
            let records: Vec<Record> = chunk
                .iter()
                .zip(blocks)
                .filter_map(|(fp, b)| b.map(|d| Record::Block { fp: *fp, data: d.to_vec() }))
                .collect();
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
}
