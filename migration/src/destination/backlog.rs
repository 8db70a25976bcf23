//! Mapping the initial listing's blocks that are already here, beside the listing rather than
//! in its way.
//!
//! Applying a FINGERPRINTS frame of the initial listing has two parts: looking its contents
//! up (which tells what to ask the source for) and mapping the blocks whose content is here
//! (a map entry and a reference count each: engine writes). The connection applies frames
//! one at a time, in order, and data frames queue behind listing frames on the link, so while
//! both parts ran inline the source's data waited for every mapping of the listing: on an
//! older version of the VM (223 k listed blocks, 39 k missing) the link carried a fifth of
//! its rate for the first second and a half. Now the connection only looks up and asks; the
//! blocks to map go to this backlog, which a task of the session maps in engine-sized batches
//! while data flows.
//!
//! Why that is safe: a block is listed once in the initial listing, so nothing else writes a
//! queued block until a later round lists it again, and every path that could do so first
//! waits until the backlog is empty ([`MapBacklog::wait_drained`]): a later round's listing,
//! the switch-over (nothing is served from the disk before it: standby reads go to the
//! source), and a rebuilt listing after a reconnection. A listed round counts as done (and the
//! migration as complete) only once the backlog is empty, so the source never freezes the VM
//! with mapping still queued. The session's memory keeps the queue across a lost link; a
//! restart before the switch-over rebuilds the listing from scratch anyway.
//!
//! Memory: at most [`MAX_BACKLOG_BLOCKS`] entries (24 bytes each, 6 MiB); the connection waits
//! for room beyond that.

use std::collections::VecDeque;
use std::sync::Arc;

use cas_store::Fingerprint;
use parking_lot::{Condvar, Mutex};

use crate::{blocking, MigrationError};

use super::*;

/// Most blocks queued for mapping at once.
pub(crate) const MAX_BACKLOG_BLOCKS: usize = 1 << 18;

/// Blocks mapped per engine call (the store commits them a chunk at a time).
const MAP_BATCH_BLOCKS: usize = 1 << 14;

/// The blocks of a session's initial listing still to map, and the task that maps them.
#[derive(Debug, Default)]
pub(crate) struct MapBacklog {
    state: Mutex<BacklogState>,
    drained: Condvar,
}

#[derive(Debug, Default)]
struct BacklogState {
    queued: VecDeque<(u64, Fingerprint)>,
    /// Queued plus taken by the task and not yet committed.
    outstanding: usize,
    worker: Worker,
    /// The task's first failure, for the connection to fail the session with.
    failed: Option<MigrationError>,
}

/// Whether a task of the session is mapping.
#[derive(Debug, Default, PartialEq, Eq)]
enum Worker {
    #[default]
    Idle,
    Running,
}

impl MapBacklog {
    /// Whether nothing is queued or being mapped.
    pub(crate) fn is_empty(&self) -> bool {
        self.state.lock().outstanding == 0
    }

    /// Queues blocks to map; returns whether a mapping task must be started for them.
    fn push(&self, entries: Vec<(u64, Fingerprint)>) -> bool {
        let mut s = self.state.lock();
        s.outstanding += entries.len();
        s.queued.extend(entries);
        if s.worker == Worker::Idle {
            s.worker = Worker::Running;
            true
        } else {
            false
        }
    }

    /// The next batch to map, or `None` (and the task stops) when the queue is empty.
    fn take_batch(&self) -> Option<Vec<(u64, Fingerprint)>> {
        let mut s = self.state.lock();
        if s.queued.is_empty() {
            s.worker = Worker::Idle;
            return None;
        }
        let n = s.queued.len().min(MAP_BATCH_BLOCKS);
        Some(s.queued.drain(..n).collect())
    }

    fn committed(&self, n: usize) {
        let mut s = self.state.lock();
        s.outstanding -= n;
        if s.outstanding == 0 {
            self.drained.notify_all();
        }
    }

    fn fail(&self, e: MigrationError) {
        let mut s = self.state.lock();
        s.queued.clear();
        s.outstanding = 0;
        s.worker = Worker::Idle;
        s.failed.get_or_insert(e);
        self.drained.notify_all();
    }

    /// The mapping task's failure, once.
    pub(crate) fn take_error(&self) -> Result<(), MigrationError> {
        match self.state.lock().failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits (blocking: call it on the blocking pool) until at most `limit` blocks are
    /// outstanding.
    fn wait_at_most(&self, limit: usize) -> Result<(), MigrationError> {
        let mut s = self.state.lock();
        while s.outstanding > limit {
            self.drained.wait(&mut s);
        }
        match s.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits (blocking) until every queued block is mapped.
    pub(crate) fn wait_drained(&self) -> Result<(), MigrationError> {
        self.wait_at_most(0)
    }
}

/// Queues a listing's blocks that are here for mapping and starts the session's mapping task
/// if it is idle; waits first while the backlog is full.
pub(crate) async fn queue_mapping(session: &Arc<Session>, hooks: &Arc<dyn DestHooks>, entries: Vec<(u64, Fingerprint)>) -> Result<(), MigrationError> {
    if entries.is_empty() {
        return Ok(());
    }
    let inc = session.incoming.clone();
    inc.backlog.take_error()?;
    if inc.backlog.state.lock().outstanding + entries.len() > MAX_BACKLOG_BLOCKS {
        let limit = MAX_BACKLOG_BLOCKS.saturating_sub(entries.len());
        let waiting = inc.clone();
        blocking(move || waiting.backlog.wait_at_most(limit)).await?;
    }
    if inc.backlog.push(entries) {
        let (session, hooks) = (session.clone(), hooks.clone());
        tokio::spawn(async move { run_mapping(session, hooks).await });
    }
    Ok(())
}

/// Waits until the backlog is empty (on the blocking pool).
pub(crate) async fn drain_mapping(inc: &Arc<Incoming>) -> Result<(), MigrationError> {
    if inc.backlog.is_empty() {
        return inc.backlog.take_error();
    }
    let inc = inc.clone();
    blocking(move || inc.backlog.wait_drained()).await
}

/// The mapping task: maps batches until the queue is empty, asks for blocks whose content
/// went meanwhile, then reports progress (a round may have been waiting for the backlog).
async fn run_mapping(session: Arc<Session>, hooks: Arc<dyn DestHooks>) {
    while let Some(batch) = session.incoming.backlog.take_batch() {
        if session.ended.load(std::sync::atomic::Ordering::SeqCst) {
            // Failed or cancelled: its disk goes, and nothing waits for the rest.
            session.incoming.backlog.fail(MigrationError::Cancelled);
            return;
        }
        let n = batch.len();
        let inc = session.incoming.clone();
        match blocking(move || map_present(&inc, batch)).await {
            Ok(want) => {
                let _ = session.send_wants(&want);
                session.incoming.backlog.committed(n);
            }
            Err(e) => {
                tracing::warn!(id = %session.hello.migration_id, error = %e, "cannot map listed blocks that are here");
                session.incoming.backlog.fail(e);
                return;
            }
        }
    }
    if let Err(e) = report_progress(&session, &hooks) {
        tracing::debug!(error = %e, "progress not reported (the link is down)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Run;
    use cas_store::{Store, StoreOptions};

    fn incoming(store: &Arc<Store>, disk: cas_store::DiskId) -> Incoming {
        Incoming {
            store: store.clone(),
            disk,
            block_size: u64::from(store.block_size()),
            pending: Mutex::new(Pending::new(DiskPhase::Standby)),
            arrived: Condvar::new(),
            fetch: tokio::sync::mpsc::unbounded_channel().0,
            journal: Mutex::new(None),
            prepared_journal: Mutex::new(None),
            read_through: false,
            gang: None,
            backlog: MapBacklog::default(),
        }
    }

    /// Content here at the lookup and gone by the mapping (its only other disk was deleted
    /// meanwhile, which the backlog's delay makes likelier) is asked for, not mapped.
    #[test]
    fn content_deleted_between_the_lookup_and_the_mapping_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        let bs = store.block_size() as usize;
        let content: Vec<u8> = (0..8 * bs).map(|i| (i / bs * 7 + i % 251) as u8).collect();
        let neighbour = store.create_disk("neighbour", content.len() as u64).unwrap();
        store.write(neighbour.id, 0, &content, false).unwrap();
        let fps = store.block_fingerprints(neighbour.id, &(0..8).collect::<Vec<u64>>()).unwrap();
        let fps: Vec<Fingerprint> = fps.into_iter().map(|fp| fp.expect("written")).collect();
        let arriving = store.create_disk("vm.incoming", content.len() as u64).unwrap();
        let inc = incoming(&store, arriving.id);

        let listed = apply_fingerprints(&inc, vec![Run::Mapped { first: 0, fps: fps.clone() }], false).unwrap();
        assert!(listed.want.is_empty(), "every block's content is here at the lookup");
        assert_eq!(listed.present.len(), 8);
        // The first four are mapped at once; then the neighbour goes, with the last four's
        // content.
        let (now, later) = listed.present.split_at(4);
        assert!(map_present(&inc, now.to_vec()).unwrap().is_empty());
        store.delete_disk("neighbour").unwrap();
        let want = map_present(&inc, later.to_vec()).unwrap();
        assert_eq!(want, fps[4..].to_vec());
        let p = inc.pending.lock();
        assert_eq!(p.by_block.len(), 4);
        assert!((4..8).all(|b| p.by_block.get(&b) == Some(&fps[b as usize])));
        assert!(fps[4..].iter().all(|fp| p.wanted.contains(fp)));
        drop(p);
        let mut first = vec![0u8; 4 * bs];
        store.read(arriving.id, 0, &mut first).unwrap();
        assert_eq!(first, content[..4 * bs], "the blocks mapped before the deletion read back");
    }
}
