//! The store's property test (cas-store/tests/common/model.rs) run with its blocks in RADOS:
//! every case in a fresh namespace of the test cluster, and after the store's own checks
//! (bytes, block status, accounting, fsck against the pool) every disk is deleted and the
//! namespace must hold no block. 50 cases by default (PROPTEST_CASES overrides).

mod common;
#[allow(clippy::duplicate_mod)]
#[path = "../../cas-store/tests/common/model.rs"]
mod model;

use std::sync::Arc;

use cas_rados::{RadosOptions, RadosPool};
use cas_store::pool::BlockPool;
use cas_store::{Store, StoreOptions};
use model::*;

struct RadosBackend {
    dir: tempfile::TempDir,
    opts: RadosOptions,
}

impl Backend for RadosBackend {
    fn open(&self, mut opts: StoreOptions) -> Store {
        opts.pool = Some(Arc::new(RadosPool::connect(&self.opts).unwrap()));
        Store::open(self.dir.path(), opts).unwrap()
    }

    fn check(&self, store: &Store, distinct: u64) -> Result<(), TestCaseError> {
        let pool = RadosPool::connect(&self.opts).unwrap();
        let holder = store.pool_holder().unwrap().to_string();
        let blocks: Vec<_> = pool.scan(&holder).unwrap().map(|b| b.unwrap()).collect();
        prop_assert_eq!(blocks.len() as u64, distinct, "one object per distinct block");
        prop_assert!(blocks.iter().all(|b| b.holder_refs == 1 && b.total_refs == 1));
        for disk in store.list_disks().unwrap() {
            store.delete_disk(&disk.name).unwrap();
        }
        prop_assert_eq!(pool.scan(&holder).unwrap().count(), 0, "blocks left after every disk was deleted");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 50, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn rados_store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let Some(opts) = common::cluster("model") else { return Ok(()) };
        run(ops, &RadosBackend { dir: tempfile::tempdir().unwrap(), opts })?;
    }
}
