//! Makes the slots of dead blocks reusable without waiting for a client's FLUSH.
//!
//! A dead block's slot may be written again only once the batch that dropped its count to
//! zero is durable (see the containers' `free_slots`). A client's FLUSH makes it so
//! ([`Store::flush`]); a workload that never flushes (fio, a guest with its cache in
//! write-back between syncs) would leave every freed slot pending. So a thread of the store's
//! own syncs every [`PROMOTE_INTERVAL`] while freed slots wait, as a FLUSH does: the
//! containers written since the last sync first, then the engine's log (a log sync makes every
//! batch before it durable, and the blocks those batches name must be on disk before them).
//! A few times a second, only while blocks die.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use super::Store;
use crate::container::Containers;
use crate::engine::KvEngine;
use crate::Result;

/// How long a freed slot waits at most (without a FLUSH) before it may be taken again. Each
/// promotion fdatasyncs the containers written since the last one: every 500 ms keeps that
/// to a couple of syncs a second while 4 KiB writes at 40 k/s leave about 20 k slots pending.
const PROMOTE_INTERVAL: Duration = Duration::from_millis(500);

/// The thread and how to stop it.
pub(super) struct SlotReuse {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl SlotReuse {
    pub(super) fn start(engine: Arc<dyn KvEngine>, containers: Arc<Containers>) -> SlotReuse {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("slot-reuse".into())
            .spawn(move || loop {
                {
                    let mut stopped = signal.0.lock();
                    if !*stopped {
                        signal.1.wait_for(&mut stopped, PROMOTE_INTERVAL);
                    }
                    if *stopped {
                        return;
                    }
                }
                if containers.has_pending_free() {
                    if let Err(e) = sync_then_free(engine.as_ref(), &containers, Grace::Wait) {
                        tracing::warn!(error = %e, "syncing the engine's log to reuse dead slots failed; retried");
                    }
                }
            })
            .expect("spawning the slot-reuse thread");
        SlotReuse { stop, thread: Some(thread) }
    }

    pub(super) fn stop(&mut self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether making freed slots ready waits for readers by fingerprint to finish.
#[derive(Clone, Copy)]
enum Grace {
    /// The store's own sync: it waits (no client waits on it).
    Wait,
    /// A client's FLUSH: it does not wait; the slots stay pending for the next sync.
    Try,
}

/// Syncs the containers and the engine's log (in that order: the log names the containers'
/// new slots), then lets the slots freed before it began be taken.
fn sync_then_free(engine: &dyn KvEngine, containers: &Containers, grace: Grace) -> Result<()> {
    let epoch = containers.begin_free_sync();
    containers.sync()?;
    engine.sync()?;
    match grace {
        Grace::Wait => containers.free_synced(epoch),
        Grace::Try => containers.try_free_synced(epoch),
    }
    Ok(())
}

impl Store {
    /// Makes every write that has returned durable (containers first, then the engine's log),
    /// and the slots of blocks that died before it reusable.
    pub fn flush(&self) -> Result<()> {
        match self.containers() {
            Some(containers) => sync_then_free(self.engine.as_ref(), containers, Grace::Try),
            None => self.engine.sync(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate::container::Location;
    use crate::{DiskId, Store, StoreOptions};

    fn block(seed: u32, bs: usize) -> Vec<u8> {
        (0..bs).map(|i| (seed as usize * 131 + i * 7 + i / 251) as u8 ^ (seed >> 8) as u8).collect()
    }

    fn location(store: &Store, disk: DiskId, block: u64) -> Location {
        store.map_lookup(disk, block, block).unwrap()[0].and_then(|e| e.hint).expect("a stored block")
    }

    fn small_container_store(reuse: bool) -> Store {
        // Small containers, so that compaction has several to choose from.
        let opts = StoreOptions { block_size: Some(512), container_bytes: 64 * 512, reuse_dead_slots: reuse, ..StoreOptions::default() };
        Store::open_in_memory(opts).unwrap()
    }

    /// A store with a disk whose block 0 was written twice: the first content's slot is dead.
    fn one_dead_slot(reuse: bool) -> (Store, DiskId, Location) {
        let store = small_container_store(reuse);
        let vm = store.create_disk("vm", 1 << 20).unwrap().id;
        store.write(vm, 0, &block(1, 512), false).unwrap();
        let first = location(&store, vm, 0);
        store.write(vm, 0, &block(2, 512), false).unwrap();
        (store, vm, first)
    }

    fn check_blocks(store: &Store, disk: DiskId, expected: &[(u64, Vec<u8>)]) {
        let mut buf = vec![0u8; 512];
        for (b, data) in expected {
            store.read(disk, b * 512, &mut buf).unwrap();
            assert!(buf == *data, "block {b}");
        }
        let report = store.fsck(true).unwrap();
        assert!(report.is_clean(), "{:?}", report.problems);
    }

    #[test]
    fn a_small_write_takes_a_dead_blocks_slot_once_its_death_is_flushed() {
        let (store, vm, first) = one_dead_slot(true);
        store.write(vm, 512, &block(3, 512), false).unwrap();
        // The slot-reuse thread may have synced in between; without it, only a flush does.
        store.flush().unwrap();
        store.write(vm, 1024, &block(4, 512), false).unwrap();
        let taken = [location(&store, vm, 1), location(&store, vm, 2)];
        assert!(taken.contains(&first), "the dead block's slot {first} is taken again: {taken:?}");
        check_blocks(&store, vm, &[(0, block(2, 512)), (1, block(3, 512)), (2, block(4, 512))]);
    }

    #[test]
    fn without_a_flush_the_store_makes_dead_slots_reusable_by_itself() {
        let (store, vm, first) = one_dead_slot(true);
        let started = Instant::now();
        let mut expected = vec![(0, block(2, 512))];
        for n in 1u64.. {
            assert!(started.elapsed().as_secs() < 30, "the dead slot was never taken again");
            std::thread::sleep(std::time::Duration::from_millis(20));
            store.write(vm, n * 512, &block(100 + n as u32, 512), false).unwrap();
            expected.push((n, block(100 + n as u32, 512)));
            if location(&store, vm, n) == first {
                break;
            }
        }
        check_blocks(&store, vm, &expected);
    }

    #[test]
    fn compaction_and_reuse_keep_every_byte_and_the_counts() {
        let store = small_container_store(true);
        let vm = store.create_disk("vm", 4 << 20).unwrap().id;
        let mut expected: Vec<(u64, Vec<u8>)> = Vec::new();
        // Fill several containers, then overwrite most blocks one by one: dead slots pile up,
        // some are taken again, and compaction rewrites the emptiest containers in between.
        for b in 0..256u64 {
            store.write(vm, b * 512, &block(b as u32, 512), false).unwrap();
        }
        for round in 1..4u32 {
            for b in (0..256u64).filter(|b| b % 4 != 0) {
                store.write(vm, b * 512, &block(round * 1000 + b as u32, 512), false).unwrap();
            }
            store.flush().unwrap();
            store.compact(0.5).unwrap();
        }
        for b in 0..256u64 {
            let seed = if b % 4 == 0 { b as u32 } else { 3000 + b as u32 };
            expected.push((b, block(seed, 512)));
        }
        check_blocks(&store, vm, &expected);
    }

    #[test]
    fn with_reuse_off_every_new_block_is_appended() {
        let (store, vm, first) = one_dead_slot(false);
        store.flush().unwrap();
        store.write(vm, 512, &block(3, 512), false).unwrap();
        assert_ne!(location(&store, vm, 1), first);
        assert_ne!(location(&store, vm, 0), first);
    }
}
