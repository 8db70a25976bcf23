//! A destination that stops at the switch-over's edge: after its journal of missing blocks is
//! committed and SWITCHED has gone, before the record that says so is written. The restarted
//! destination must serve the disk as switched over (the source, which heard SWITCHED, no
//! longer does) and finish the post-copy byte-exact. And one that lost power there before
//! the journal reached its disk: it comes back before its switch-over, and the source, frozen
//! since, lists the disk again and switches over again.

mod common;
use common::{read_all, serve_destinations, CurrentDestination};

use std::io;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use cas_store::{Store, StoreOptions};
use migration::{
    DestHooks, Destination, FileStateStore, LinkStream, MigratingDisk, MigrationRecord, MigrationReport, MigrationStatus, NoHooks, Phase, SourceConfig, Stage,
    StateStore, SwitchAfter,
};
use parking_lot::{Condvar, Mutex};
use tokio::net::TcpStream;

const BS: usize = 4096;

fn store() -> Arc<Store> {
    Arc::new(Store::open_in_memory(StoreOptions { block_size: Some(BS as u32), ..Default::default() }).unwrap())
}

/// Records in files, except that saving the Switched record is where the server dies: the
/// save tells the test and never returns until the test lets it fail.
#[derive(Debug)]
struct DiesRecordingTheSwitch {
    files: FileStateStore,
    reached: Mutex<Option<mpsc::Sender<()>>>,
    released: Arc<(Mutex<bool>, Condvar)>,
}

impl StateStore for DiesRecordingTheSwitch {
    fn save(&self, record: &MigrationRecord) -> io::Result<()> {
        if record.stage == Stage::Switched {
            if let Some(tx) = self.reached.lock().take() {
                let _ = tx.send(());
            }
            let (lock, cv) = &*self.released;
            let mut released = lock.lock();
            while !*released {
                cv.wait(&mut released);
            }
            return Err(io::Error::other("the server died here"));
        }
        self.files.save(record)
    }
    fn remove(&self, id: &str) -> io::Result<()> {
        self.files.remove(id)
    }
    fn load(&self) -> io::Result<Vec<MigrationRecord>> {
        self.files.load()
    }
    fn dir(&self) -> Option<&std::path::Path> {
        self.files.dir()
    }
}

#[derive(Default)]
struct Hooks {
    status: Mutex<Option<Arc<MigrationStatus>>>,
}

impl DestHooks for Hooks {
    fn attach(&self, _name: &str, _disk: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        Ok(())
    }
    fn switched(&self, _name: &str) {}
    fn complete(&self, _name: &str) {}
    fn registered(&self, _id: &str, status: Arc<MigrationStatus>) {
        *self.status.lock() = Some(status);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
}

/// A migration whose destination died while recording its switch-over (SWITCHED has gone),
/// its runtime shut down; the source still runs and will reconnect to `current`'s next
/// destination.
struct DiedAtTheSwitch {
    src: Arc<Store>,
    dst: Arc<Store>,
    content: Vec<u8>,
    state_dir: tempfile::TempDir,
    current: CurrentDestination,
    source: tokio::task::JoinHandle<Result<MigrationReport, migration::MigrationError>>,
}

async fn die_at_the_switch_record(id: &str) -> DiedAtTheSwitch {
    let (src, dst) = (store(), store());
    // 2048 blocks of random content: none at the destination, all missing at the switch-over.
    let blocks = 2048;
    let d = src.create_disk("vm", (blocks * BS) as u64).unwrap();
    let mut content = vec![0u8; blocks * BS];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for byte in content.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    src.write(d.id, 0, &content, false).unwrap();

    let state_dir = tempfile::tempdir().unwrap();
    let (reached_tx, reached_rx) = mpsc::channel();
    let released = Arc::new((Mutex::new(false), Condvar::new()));
    let dying_state = Arc::new(DiesRecordingTheSwitch {
        files: FileStateStore::open(state_dir.path()).unwrap(),
        reached: Mutex::new(Some(reached_tx)),
        released: released.clone(),
    });
    let first_rt = runtime();
    let first = Destination::new(dst.clone(), Arc::new(Hooks::default()), dying_state, Duration::from_secs(120));
    let current: CurrentDestination = Arc::new(Mutex::new(Some((first, first_rt.handle().clone()))));
    let addr = serve_destinations(current.clone()).await;

    let connector = Arc::new(move || async move {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Box::new(s) as LinkStream)
    });
    // Switch at once, with a slow background pass: most blocks are still missing when the
    // destination dies.
    let config = SourceConfig {
        migration_id: id.into(),
        switch_after: SwitchAfter::Fingerprints,
        batch_bytes: 64 << 10,
        bandwidth_bps: Some(40_000_000),
        reconnect_window_secs: 60,
        ..Default::default()
    };
    let status = MigrationStatus::new(MigrationReport::new(id, "vm", "source", &addr.to_string()));
    let source = tokio::spawn(migration::run_source_with(src.clone(), "vm", connector, config, Arc::new(NoHooks), status, None));

    // The destination committed its journal, made it durable, renamed the disk, answered
    // SWITCHED and is now writing its record: it dies there.
    tokio::task::spawn_blocking(move || reached_rx.recv_timeout(Duration::from_secs(60)).expect("the switch-over reached its record")).await.unwrap();
    current.lock().take();
    first_rt.shutdown_background();
    {
        let (lock, cv) = &*released;
        *lock.lock() = true;
        cv.notify_all();
    }
    DiedAtTheSwitch { src, dst, content, state_dir, current, source }
}

/// A new destination over the same store and directory, restored and serving, that the
/// source cannot reach yet (see [`reachable`]): what the restore left can be looked at before
/// the source's reconnection moves it on.
async fn restart(died: &DiedAtTheSwitch) -> (Arc<Hooks>, Arc<Destination>, tokio::runtime::Runtime) {
    let rt = runtime();
    let hooks = Arc::new(Hooks::default());
    let dest = Destination::new(died.dst.clone(), hooks.clone(), Arc::new(FileStateStore::open(died.state_dir.path()).unwrap()), Duration::from_secs(120));
    let restore = dest.clone();
    rt.spawn(async move { restore.restore().await }).await.unwrap().expect("the restart restores the migration");
    (hooks, dest, rt)
}

/// Lets the source's next reconnection reach the restarted destination.
fn reachable(died: &DiedAtTheSwitch, dest: Arc<Destination>, rt: &tokio::runtime::Runtime) {
    *died.current.lock() = Some((dest, rt.handle().clone()));
}

/// The migration ends done on both sides, byte-exact and fsck clean, leaving no state files.
async fn finishes(died: DiedAtTheSwitch, dst_status: Arc<MigrationStatus>) -> MigrationReport {
    let report = tokio::time::timeout(Duration::from_secs(120), died.source).await.expect("the migration finishes").unwrap().expect("the migration succeeds");
    assert_eq!(report.phase, Phase::Done);
    assert!(report.link.reconnects >= 1);
    for _ in 0..500 {
        if dst_status.report().is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(dst_status.report().phase, Phase::Done, "{:?}", dst_status.report().error);
    assert_eq!(read_all(&died.dst, "vm"), died.content, "byte-exact after the restart");
    assert_eq!(read_all(&died.src, "vm"), died.content, "the source's disk was never written");
    assert!(died.dst.fsck(true).unwrap().is_clean());
    for _ in 0..500 {
        if std::fs::read_dir(died.state_dir.path()).unwrap().next().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left: Vec<_> = std::fs::read_dir(died.state_dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the record and the journal go with the finished migration: {left:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_dies_before_recording_the_switch_over_serves_the_disk_after_restart() {
    let died = die_at_the_switch_record("m-restart").await;
    let state_dir = &died.state_dir;
    let dst = died.dst.clone();
    let records = FileStateStore::open(state_dir.path()).unwrap().load().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].stage, Stage::PreCopy, "the record still says pre-copy");

    let (hooks, dest, second_rt) = restart(&died).await;
    assert!(dst.disk("vm").is_ok(), "the disk is served under its own name");
    assert!(dst.disk("vm.incoming").is_err());
    let records = FileStateStore::open(state_dir.path()).unwrap().load().unwrap();
    assert_eq!(records[0].stage, Stage::Switched, "the restart recorded the switch-over");
    let dst_status = hooks.status.lock().clone().expect("the restart registered the migration");
    // Parked as a switched migration: not cancellable (the source no longer serves the disk).
    assert_eq!(dst_status.report().phase, Phase::Interrupted);
    assert!(!dst_status.report().cancellable);
    reachable(&died, dest, &second_rt);
    finishes(died, dst_status).await;
    second_rt.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_lost_power_before_its_switch_over_was_durable_is_switched_over_again() {
    let died = die_at_the_switch_record("m-power").await;
    // What a power loss just after SWITCHED leaves: the list of missing blocks, written in
    // place and not yet synced, reads as zeros (the file laid out beforehand), and the rename
    // (after the sync) never happened. The store's contents are whatever survived; here all.
    let pending = died.state_dir.path().join("m-power.pending");
    let len = std::fs::metadata(&pending).unwrap().len();
    std::fs::write(&pending, vec![0u8; len as usize]).unwrap();
    died.dst.rename_disk("vm", "vm.incoming").unwrap();
    let records = FileStateStore::open(died.state_dir.path()).unwrap().load().unwrap();
    assert_eq!(records[0].stage, Stage::PreCopy);

    let (hooks, dest, second_rt) = restart(&died).await;
    let dst_status = hooks.status.lock().clone().expect("the restart registered the migration");
    assert!(died.dst.disk("vm.incoming").is_ok(), "restored as before its switch-over");
    reachable(&died, dest, &second_rt);
    let report = finishes(died, dst_status).await;
    assert!(report.switch_seconds.is_some());
    second_rt.shutdown_background();
}
