//! Property test of the store against a plain model (harness in `common/model.rs`): on
//! RocksDB with its own blocks (1000 cases), and on an in-memory engine whose blocks are in a
//! shared in-memory pool with Ceph `cas` semantics, the external-pool path (300 cases).

mod common;

use std::sync::Arc;

use cas_store::engine::MemEngine;
use cas_store::{MemPool, Store, StoreOptions};
use common::model::*;

/// An in-memory engine (kept across the reopen) with its blocks in a `MemPool` that a
/// neighbour store shares: the neighbour's blocks must survive everything the case does.
struct SharedPoolBackend {
    engine: Arc<MemEngine>,
    pool: Arc<MemPool>,
    neighbour: Store,
    neighbour_data: Vec<u8>,
}

impl SharedPoolBackend {
    fn new() -> SharedPoolBackend {
        let pool = Arc::new(MemPool::new());
        let opts = StoreOptions { block_size: Some(BS as u32), pool: Some(pool.clone()), ..Default::default() };
        let neighbour = Store::with_engine(Arc::new(MemEngine::new()), opts).unwrap();
        let d = neighbour.create_disk("web", 8 * BS).unwrap();
        // Content 1 at shift 0: blocks the case's disks write too.
        let neighbour_data: Vec<u8> = (0..8 * BS).map(|i| ((i as u32).wrapping_mul(2_654_435_761).rotate_left(1) >> 13) as u8).collect();
        neighbour.write(d.id, 0, &neighbour_data, false).unwrap();
        SharedPoolBackend { engine: Arc::new(MemEngine::new()), pool, neighbour, neighbour_data }
    }
}

impl Backend for SharedPoolBackend {
    fn open(&self, mut opts: StoreOptions) -> Store {
        opts.pool = Some(self.pool.clone());
        Store::with_engine(self.engine.clone(), opts).unwrap()
    }

    fn check(&self, store: &Store, _distinct: u64) -> Result<(), TestCaseError> {
        prop_assert_eq!(store.block_pool(), "memory");
        let d = self.neighbour.disk("web").unwrap();
        let mut buf = vec![0u8; self.neighbour_data.len()];
        self.neighbour.read(d.id, 0, &mut buf).unwrap();
        prop_assert!(buf == self.neighbour_data, "the neighbour's disk changed");
        let report = self.neighbour.fsck(true).unwrap();
        prop_assert!(report.is_clean(), "neighbour fsck: {:?}", report.problems);
        // Both stores gone: the pool must be empty (no leaked reference).
        for disk in store.list_disks().unwrap() {
            store.delete_disk(&disk.name).unwrap();
        }
        self.neighbour.delete_disk("web").unwrap();
        prop_assert_eq!(self.pool.len(), 0, "blocks left in the pool after every disk was deleted");
        Ok(())
    }
}

proptest! {
    // At least 1000 cases in the default run (PROPTEST_CASES overrides).
    #![proptest_config(ProptestConfig { cases: 1000, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, &RocksBackend(tempfile::tempdir().unwrap()))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn external_pool_store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops, &SharedPoolBackend::new())?;
    }
}
