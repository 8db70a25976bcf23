//! The switch-over on command (`SwitchAfter::Manual`) and the destination's standby disk:
//! what a hypervisor sees between creating the incoming VM and resuming it.

mod common;
use common::read_all;

use std::sync::Arc;
use std::time::Duration;

use cas_store::{Store, StoreOptions};
use migration::{run_destination, run_source, DestHooks, MigratingDisk, MigrationError, MigrationReport, MigrationStatus, NoHooks, SourceConfig, SwitchAfter};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

const BS: usize = 4096;
const BLOCKS: usize = 1024;

fn store() -> Arc<Store> {
    Arc::new(Store::open_in_memory(StoreOptions { block_size: Some(BS as u32), ..Default::default() }).unwrap())
}

/// A disk whose blocks all differ (nothing deduplicates, so everything crosses).
fn fill(store: &Store, name: &str) -> Vec<u8> {
    let d = store.create_disk(name, (BLOCKS * BS) as u64).unwrap();
    let mut content = vec![0u8; BLOCKS * BS];
    for (i, block) in content.chunks_mut(BS).enumerate() {
        for (k, word) in block.chunks_mut(8).enumerate() {
            word.copy_from_slice(&((i as u64) << 32 | k as u64).to_le_bytes());
        }
    }
    store.write(d.id, 0, &content, false).unwrap();
    content
}

#[derive(Default)]
struct Hooks {
    disk: Mutex<Option<Arc<MigratingDisk>>>,
    switched: Mutex<bool>,
    abandoned: Mutex<bool>,
}

impl DestHooks for Hooks {
    fn attach(&self, _name: &str, disk: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        *self.disk.lock() = Some(disk);
        Ok(())
    }
    fn switched(&self, _name: &str) {
        *self.switched.lock() = true;
    }
    fn complete(&self, _name: &str) {}
    fn abandoned(&self, _name: &str) {
        *self.abandoned.lock() = true;
    }
}

struct Running {
    status: Arc<MigrationStatus>,
    hooks: Arc<Hooks>,
    source: tokio::task::JoinHandle<Result<MigrationReport, MigrationError>>,
    destination: tokio::task::JoinHandle<Result<MigrationReport, MigrationError>>,
}

/// Starts a manual migration of "vm" and waits until it is ready to switch.
async fn start(src: Arc<Store>, dst: Arc<Store>) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hooks = Arc::new(Hooks::default());
    let dst_hooks: Arc<dyn DestHooks> = hooks.clone();
    let destination = tokio::spawn(async move {
        let (conn, peer) = listener.accept().await.unwrap();
        run_destination(dst, conn, dst_hooks, MigrationStatus::new(MigrationReport::new("?", "?", "destination", &peer.to_string()))).await
    });
    let conn = TcpStream::connect(addr).await.unwrap();
    let status = MigrationStatus::new(MigrationReport::new("manual", "vm", "source", &addr.to_string()));
    let config = SourceConfig { migration_id: "manual".into(), switch_after: SwitchAfter::Manual, ..Default::default() };
    let source = tokio::spawn(run_source(src, "vm", conn, config, Arc::new(NoHooks), status.clone()));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !status.report().ready_to_switch {
        assert!(tokio::time::Instant::now() < deadline, "never ready to switch: {:?}", status.report());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Running { status, hooks, source, destination }
}

fn standby(r: &Running) -> Arc<MigratingDisk> {
    r.hooks.disk.lock().clone().expect("the destination attaches the disk when the migration arrives")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_reads_come_from_the_source_and_writes_wait_for_the_switch() {
    let (src, dst) = (store(), store());
    let mut content = fill(&src, "vm");
    let r = start(src.clone(), dst.clone()).await;
    let disk = standby(&r);
    assert!(disk.is_standby());

    // The guest, still at the source, writes after the pre-copy pass.
    let id = src.disk("vm").unwrap().id;
    let newer = vec![0xabu8; BS];
    src.write(id, 5 * BS as u64, &newer, false).unwrap();
    content[5 * BS..6 * BS].copy_from_slice(&newer);

    // The standby disk answers with the source's current content, never a stale copy.
    let d = disk.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; BLOCKS * BS];
        d.read(0, &mut buf).map(|()| buf)
    })
    .await
    .unwrap()
    .unwrap();
    assert!(seen == content, "standby reads are the source's current content");
    // FLUSH has nothing to persist here.
    disk.flush().unwrap();

    // A write at the standby waits for the switch-over, then lands.
    let d = disk.clone();
    let mine = vec![0x5au8; BS];
    let held = {
        let mine = mine.clone();
        tokio::task::spawn_blocking(move || d.write(7 * BS as u64, &mine, false))
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!held.is_finished(), "a write before the switch-over is held");
    assert!(!*r.hooks.switched.lock());

    r.status.request_switch().unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), r.status.wait_switched()).await.unwrap().unwrap();
    assert!(report.downtime_ms.is_some(), "{report:?}");
    assert!(*r.hooks.switched.lock());
    tokio::time::timeout(Duration::from_secs(30), held).await.unwrap().unwrap().unwrap();
    content[7 * BS..8 * BS].copy_from_slice(&mine);
    // Asking again after the switch is not an error.
    r.status.request_switch().unwrap();

    let source = r.source.await.unwrap().unwrap();
    assert_eq!(source.phase, migration::Phase::Done);
    assert!(source.rounds >= 2, "the freeze listed the blocks written since the pre-copy: {source:?}");
    r.destination.await.unwrap().unwrap();
    assert!(read_all(&dst, "vm") == content, "byte-exact: the source's writes and the held one");
    assert!(dst.fsck(true).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_before_the_switch_fails_standby_requests_and_keeps_the_source() {
    let (src, dst) = (store(), store());
    let content = fill(&src, "vm");
    let r = start(src.clone(), dst.clone()).await;
    let disk = standby(&r);
    let d = disk.clone();
    let held = tokio::task::spawn_blocking(move || d.write(0, &[1u8; BS], false));
    tokio::time::sleep(Duration::from_millis(100)).await;
    r.status.request_cancel().unwrap();
    assert!(r.status.request_switch().is_err(), "no switch once cancelled");
    let end = r.source.await.unwrap();
    assert!(matches!(end, Err(MigrationError::Cancelled)), "{end:?}");
    let _ = tokio::time::timeout(Duration::from_secs(30), r.destination).await.unwrap();
    assert!(tokio::time::timeout(Duration::from_secs(30), held).await.unwrap().unwrap().is_err(), "the held write fails, it is never applied");
    assert!(*r.hooks.abandoned.lock());
    let mut buf = vec![0u8; BS];
    assert!(disk.read(0, &mut buf).is_err(), "no reads from an abandoned standby disk");
    assert!(read_all(&src, "vm") == content, "the source is untouched");
    assert!(dst.disk("vm.incoming").is_err() && dst.disk("vm").is_err(), "the destination let go");
}
