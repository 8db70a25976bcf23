//! Deltas against similar blocks: a VM whose older version both ends hold crosses as
//! differences, byte-exact; a delta the destination cannot use (its copy of the reference is
//! damaged, forced here) is detected, asked for whole and never stored.

mod common;
use common::{later_version, older_version, read_all, write_disk};

use std::sync::Arc;

use cas_store::{Store, StoreOptions, CONTAINERS_DIR};
use migration::{run_destination, run_source, DestHooks, MigratingDisk, MigrationReport, NoHooks, SourceConfig};
use tokio::net::{TcpListener, TcpStream};

const BS: usize = common::BS;
const BLOCKS: usize = 256;

fn store(dir: &std::path::Path) -> Arc<Store> {
    // Containers of 64 blocks, so that the test's disks fill sealed ones (only those are
    // sketched).
    Arc::new(Store::open(dir, StoreOptions { block_size: Some(BS as u32), container_bytes: 64 * BS as u64, ..Default::default() }).unwrap())
}

/// A destination that serves nothing (the test reads the store).
struct Attached;

impl DestHooks for Attached {
    fn attach(&self, _: &str, _: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        Ok(())
    }
    fn complete(&self, _: &str) {}
}

async fn migrate(src: Arc<Store>, dst: Arc<Store>, config: SourceConfig) -> (MigrationReport, MigrationReport) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = tokio::spawn(async move {
        let (conn, peer) = listener.accept().await.unwrap();
        let status = migration::MigrationStatus::new(MigrationReport::new("?", "?", "destination", &peer.to_string()));
        run_destination(dst, conn, Arc::new(Attached), status).await
    });
    let conn = TcpStream::connect(addr).await.unwrap();
    let status = migration::MigrationStatus::new(MigrationReport::new("t", "vm", "source", &addr.to_string()));
    let report = run_source(src, "vm", conn, config, Arc::new(NoHooks), status).await.expect("source side");
    (report, dest.await.unwrap().expect("destination side"))
}

/// A source that keeps the VM's older version (indexed) and the VM; a destination that holds
/// the older version.
fn setup(root: &std::path::Path) -> (Arc<Store>, Arc<Store>, Vec<u8>) {
    let (src, dst) = (store(&root.join("src")), store(&root.join("dst")));
    let old = older_version(BLOCKS);
    let vm = later_version(&old);
    write_disk(&src, "vm-monday", &old);
    write_disk(&src, "vm", &vm);
    let indexed = src.update_sketches().unwrap();
    assert!(indexed.blocks >= BLOCKS as u64, "{indexed:?}");
    write_disk(&dst, "vm-monday", &old);
    (src, dst, vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_version_at_both_ends_makes_the_blocks_cross_as_deltas() {
    let root = tempfile::tempdir().unwrap();
    let (src, dst, vm) = setup(root.path());
    let (report, _) = migrate(src.clone(), dst.clone(), SourceConfig::default()).await;
    assert_eq!(read_all(&dst, "vm"), vm, "byte-exact at the destination");
    assert!(dst.fsck(true).unwrap().is_clean());
    assert_eq!(report.blocks_sent, BLOCKS as u64);
    assert!(report.blocks_sent_as_delta >= BLOCKS as u64 * 9 / 10, "{} of {BLOCKS} as deltas", report.blocks_sent_as_delta);
    assert_eq!(report.destination.delta_blocks, report.blocks_sent_as_delta);
    assert_eq!(report.destination.delta_refetched, 0);
    assert!(report.delta_bytes < report.blocks_sent_as_delta * 200, "{} bytes of deltas", report.delta_bytes);

    // The same migration without deltas, into a destination that holds the same: the
    // deltas are what made the difference.
    let plain_root = tempfile::tempdir().unwrap();
    let (src, dst, _) = setup(plain_root.path());
    let (plain, _) = migrate(src, dst, SourceConfig { delta: false, ..SourceConfig::default() }).await;
    assert_eq!(plain.blocks_sent_as_delta, 0);
    assert!(
        report.link.data_wire_bytes * 3 < plain.link.data_wire_bytes,
        "block data on the link: {} with deltas, {} without",
        report.link.data_wire_bytes,
        plain.link.data_wire_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_against_a_damaged_reference_is_refetched_whole() {
    let root = tempfile::tempdir().unwrap();
    let (src, dst, vm) = setup(root.path());
    // Damage the destination's copy of every block of the older version, behind the store's
    // back (it does not re-hash reads unless asked to): a delta decoded against it cannot
    // match its fingerprint.
    for entry in std::fs::read_dir(root.path().join("dst").join(CONTAINERS_DIR)).unwrap() {
        let path = entry.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        for slot in bytes.chunks_mut(BS) {
            slot[BS / 2] ^= 0x20;
        }
        std::fs::write(&path, bytes).unwrap();
    }
    let (report, _) = migrate(src, dst.clone(), SourceConfig::default()).await;
    assert!(report.blocks_sent_as_delta > 0);
    assert_eq!(report.destination.delta_blocks, 0, "no delta decoded to its fingerprint");
    assert_eq!(report.destination.delta_refetched, report.blocks_sent_as_delta);
    assert_eq!(read_all(&dst, "vm"), vm, "every block came again, whole, and byte-exact");
}
