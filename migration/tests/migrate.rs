//! Migrations between two in-process stores over a real TCP connection on loopback.

mod common;
use common::{guest_writer, read_all};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_store::{Store, StoreOptions};
use migration::{
    run_destination, run_destination_windowed, run_source, DestHooks, MigratingDisk, MigrationReport, NoHooks, SourceConfig, SourceHooks, SwitchAfter,
};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

const BS: usize = 4096;

fn store() -> Arc<Store> {
    Arc::new(Store::open_in_memory(StoreOptions { block_size: Some(BS as u32), ..Default::default() }).unwrap())
}

fn rocks_store(dir: &std::path::Path) -> Arc<Store> {
    Arc::new(Store::open(dir, StoreOptions { block_size: Some(BS as u32), ..Default::default() }).unwrap())
}

/// Block `i` of "OS" content: the same in every VM built from it.
fn os_block(i: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (k, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i * 1_000_003 + k as u64 / 3).to_le_bytes());
    }
    b
}

/// Block `i` of a VM's own data.
fn own_block(vm: u64, i: u64) -> Vec<u8> {
    let mut b = os_block(i + 10_000 * (vm + 1));
    b[0] = vm as u8;
    b
}

/// A disk of `blocks` blocks: `os` OS blocks, then `own` blocks of its own (with `dups` of
/// them repeating one block), the rest zeros.
fn fill(store: &Store, name: &str, blocks: u64, os: u64, own: u64, vm: u64, dups: u64) -> Vec<u8> {
    let d = store.create_disk(name, blocks * BS as u64).unwrap();
    let mut content = vec![0u8; blocks as usize * BS];
    for i in 0..os {
        content[i as usize * BS..(i as usize + 1) * BS].copy_from_slice(&os_block(i));
    }
    for i in 0..own {
        let b = if i < dups { own_block(vm, 0) } else { own_block(vm, i) };
        let at = (os + i) as usize * BS;
        content[at..at + BS].copy_from_slice(&b);
    }
    store.write(d.id, 0, &content, false).unwrap();
    content
}

#[derive(Default)]
struct CaptureHooks {
    disk: Mutex<Option<Arc<MigratingDisk>>>,
    completed: AtomicBool,
}

impl DestHooks for CaptureHooks {
    fn attach(&self, _name: &str, disk: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        *self.disk.lock() = Some(disk);
        Ok(())
    }
    fn complete(&self, _name: &str) {
        self.completed.store(true, Ordering::SeqCst);
    }
}

/// Runs one migration over loopback TCP and returns both reports.
async fn migrate(
    src: Arc<Store>,
    dst: Arc<Store>,
    disk: &str,
    config: SourceConfig,
    src_hooks: Arc<dyn SourceHooks>,
    dst_hooks: Arc<dyn DestHooks>,
) -> (MigrationReport, MigrationReport) {
    migrate_windowed(src, dst, disk, config, src_hooks, dst_hooks, migration::LISTING_WINDOW_BLOCKS).await
}

/// [`migrate`] with the destination's listing window set.
async fn migrate_windowed(
    src: Arc<Store>,
    dst: Arc<Store>,
    disk: &str,
    config: SourceConfig,
    src_hooks: Arc<dyn SourceHooks>,
    dst_hooks: Arc<dyn DestHooks>,
    window: usize,
) -> (MigrationReport, MigrationReport) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = tokio::spawn(async move {
        let (conn, peer) = listener.accept().await.unwrap();
        let status = migration::MigrationStatus::new(MigrationReport::new("?", "?", "destination", &peer.to_string()));
        run_destination_windowed(dst, conn, dst_hooks, status, window).await
    });
    let conn = TcpStream::connect(addr).await.unwrap();
    let status = migration::MigrationStatus::new(MigrationReport::new("t", disk, "source", &addr.to_string()));
    let src_report = run_source(src, disk, conn, config, src_hooks, status).await.expect("source side");
    let dst_report = dest.await.unwrap().expect("destination side");
    (src_report, dst_report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbours_supply_what_they_have_and_only_the_rest_crosses() {
    let (src, dst) = (store(), store());
    // The migrating VM: 300 OS blocks, 100 blocks of its own (10 of them one repeated
    // block), 112 zero blocks.
    let content = fill(&src, "vm", 512, 300, 100, 1, 10);
    // The destination holds another VM with the same OS (200 of the 300 OS blocks).
    fill(&dst, "neighbour", 512, 200, 50, 2, 0);
    let (report, dest_report) = migrate(src.clone(), dst.clone(), "vm", SourceConfig::default(), Arc::new(NoHooks), Arc::new(CaptureHooks::default())).await;
    assert_eq!(read_all(&dst, "vm"), content, "byte-exact at the destination");
    let d = &report.destination;
    assert_eq!(d.blocks_listed, 400);
    assert_eq!(d.neighbour_hits, 200);
    assert_eq!(d.zero_blocks, 112);
    assert_eq!(d.wanted, 100 + 91, "100 OS blocks the neighbour lacks, 91 distinct own blocks");
    assert_eq!(d.duplicates, 9);
    assert_eq!(d.received_before_switch, 191);
    assert_eq!(report.blocks_sent, 191);
    assert!(report.link.data_raw_bytes >= 191 * BS as u64);
    assert!(report.link.data_wire_bytes < report.link.data_raw_bytes, "compressed");
    assert!(report.downtime_ms.unwrap() < 1000.0);
    assert_eq!(dest_report.phase, migration::Phase::Done);
    assert!(dst.fsck(true).unwrap().is_clean());
    assert!(dst.disk("vm.incoming").is_err(), "the temporary name is gone");
}

/// Migrates `content`'s disk "vm" from `src` into an empty store with `config`; checks it
/// arrived byte-exact with every one of its 181 distinct blocks sent once.
async fn migrate_into_empty(src: &Arc<Store>, content: &[u8], config: SourceConfig) -> MigrationReport {
    let dst = store();
    let what = format!("{config:?}");
    let (report, _) = migrate(src.clone(), dst.clone(), "vm", config, Arc::new(NoHooks), Arc::new(CaptureHooks::default())).await;
    assert_eq!(read_all(&dst, "vm"), content, "byte-exact with {what}");
    assert!(dst.fsck(true).unwrap().is_clean());
    assert_eq!(report.blocks_wanted, 181);
    assert_eq!(report.blocks_sent, 181);
    report
}

/// Whole blocks cross without their fingerprint (the destination names them by hashing);
/// a source that names every block, as older ones do, still migrates byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_blocks_leave_their_fingerprints_off_the_link_and_named_ones_still_work() {
    let src = store();
    let content = fill(&src, "vm", 256, 100, 100, 1, 20);
    let unnamed = migrate_into_empty(&src, &content, SourceConfig::default()).await;
    let named = migrate_into_empty(&src, &content, SourceConfig { unnamed_blocks: false, ..SourceConfig::default() }).await;
    assert_eq!(named.link.data_raw_bytes - unnamed.link.data_raw_bytes, 181 * 16, "16 bytes of name per block sent");
}

/// The destination asks for a listing's missing content by position (a bit per listed
/// block) when the source offers it, and by fingerprint otherwise; both byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_content_is_asked_for_by_position_in_the_listing() {
    let src = store();
    let content = fill(&src, "vm", 256, 100, 100, 1, 20);
    let by_position = migrate_into_empty(&src, &content, SourceConfig::default()).await;
    let by_fingerprint = migrate_into_empty(&src, &content, SourceConfig { want_listed: false, ..SourceConfig::default() }).await;
    // WANT: 181 fingerprints; WANT_LISTED: 200 listed blocks' flags in 25 bytes.
    let (a, b) = (by_position.link.fingerprint_bytes, by_fingerprint.link.fingerprint_bytes);
    assert!(b - a >= 181 * 16 - 48, "listing and asking, by position {a} and by fingerprint {b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_destination_gets_every_block_once_and_identical_one_gets_none() {
    let (src, dst) = (store(), store());
    let content = fill(&src, "vm", 256, 100, 100, 1, 20);
    let (report, _) = migrate(src.clone(), dst.clone(), "vm", SourceConfig::default(), Arc::new(NoHooks), Arc::new(CaptureHooks::default())).await;
    assert_eq!(read_all(&dst, "vm"), content);
    assert_eq!(report.destination.neighbour_hits, 0);
    assert_eq!(report.destination.wanted, 181, "every distinct non-zero block crosses once");
    assert_eq!(report.blocks_sent, 181);

    // An identical copy already at the destination: only fingerprints and control cross.
    let dst2 = store();
    fill(&dst2, "old-copy", 256, 100, 100, 1, 20);
    let (report, _) = migrate(src.clone(), dst2.clone(), "vm", SourceConfig::default(), Arc::new(NoHooks), Arc::new(CaptureHooks::default())).await;
    assert_eq!(read_all(&dst2, "vm"), content);
    assert_eq!(report.destination.wanted, 0);
    assert_eq!(report.link.data_wire_bytes, 0, "no block data crossed");
    assert!(report.link.fingerprint_bytes > 0);
    assert!(report.link.total_bytes < 200 * 20 + 2000, "about 16 bytes per block listed: {:?}", report.link);
}

async fn migrate_while_writing(switch_after: SwitchAfter) {
    let dir = tempfile::tempdir().unwrap();
    let src = rocks_store(&dir.path().join("src"));
    let dst = rocks_store(&dir.path().join("dst"));
    fill(&src, "vm", 1024, 600, 300, 1, 0);
    fill(&dst, "fresh-install", 1024, 600, 0, 3, 0);
    // A guest doing unaligned writes all over its disk until the export freezes.
    let (freeze, writer) = guest_writer(src.clone(), "vm", Duration::from_micros(200), |s, id, i| {
        let block = (i * 7919) % 1024;
        s.write(id, block * BS as u64 + 100, &own_block(50 + i % 13, i)[..3000], false).unwrap();
    });
    let hooks = Arc::new(CaptureHooks::default());
    let config = SourceConfig { switch_after, ..Default::default() };
    let (report, _) = migrate(src.clone(), dst.clone(), "vm", config, Arc::new(freeze), hooks.clone()).await;
    assert!(writer.join().unwrap() > 0);
    // The source is frozen: its content is the content at the freeze.
    let at_freeze = read_all(&src, "vm");
    assert_eq!(read_all(&dst, "vm"), at_freeze, "{switch_after:?}: destination equals the source at the freeze");
    // Writes at the destination after the switch-over land on top.
    let disk = hooks.disk.lock().clone().unwrap();
    let mut expect = at_freeze.clone();
    let d2 = disk.clone();
    tokio::task::spawn_blocking(move || d2.write(5000, &[0xab; 10000], true).unwrap()).await.unwrap();
    expect[5000..15000].fill(0xab);
    assert_eq!(read_all(&dst, "vm"), expect);
    assert!(report.rounds >= 2);
    assert!(dst.fsck(true).unwrap().is_clean());
    assert!(src.fsck(true).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_precopy_are_resent() {
    migrate_while_writing(SwitchAfter::Precopy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_converging_rounds_are_resent() {
    migrate_while_writing(SwitchAfter::Converged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_with_switch_after_fingerprints() {
    migrate_while_writing(SwitchAfter::Fingerprints).await;
}

/// Entries in one FINGERPRINTS frame of the source (`FINGERPRINTS_PER_FRAME`).
const LISTING_FRAME: u64 = 8192;

/// A disk of five listing frames' worth of blocks with 1000 distinct contents in turn: the
/// listing runs far ahead of the data unless the destination's window holds it back.
async fn listing_held_by_the_window(switch_after: SwitchAfter) {
    let (src, dst) = (store(), store());
    let blocks = 5 * LISTING_FRAME;
    let d = src.create_disk("vm", blocks * BS as u64).unwrap();
    let mut content = vec![0u8; blocks as usize * BS];
    for (i, b) in content.chunks_mut(BS).enumerate() {
        b.copy_from_slice(&own_block(1, i as u64 % 1000));
    }
    src.write(d.id, 0, &content, false).unwrap();
    let window = 100;
    let config = SourceConfig { switch_after, ..Default::default() };
    let (report, _) = migrate_windowed(src.clone(), dst.clone(), "vm", config, Arc::new(NoHooks), Arc::new(CaptureHooks::default()), window).await;
    assert_eq!(read_all(&dst, "vm"), content, "{switch_after:?}: byte-exact");
    let d = &report.destination;
    assert_eq!(d.blocks_listed, blocks);
    assert_eq!(d.wanted, 1000);
    // A frame is let in while fewer than `window` blocks are missing: at most one over. Not
    // when switched over right after the listing: every block not yet here is post-copy's to
    // fetch then, and the destination has to know them all.
    if switch_after != SwitchAfter::Fingerprints {
        assert!(d.missing_peak > 0 && d.missing_peak <= window as u64 + LISTING_FRAME, "{switch_after:?}: {} blocks missing at once", d.missing_peak);
    }
    assert!(dst.fsck(true).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listing_window_bounds_what_the_destination_tracks() {
    listing_held_by_the_window(SwitchAfter::Precopy).await;
}

/// With `--switch-after fingerprints` the source freezes (and holds its data back) right
/// after listing, while the destination may still hold listing frames back waiting for data:
/// the switch-over's frames must get through (they make the destination apply what it held)
/// or the migration would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_over_right_after_the_listing_is_not_held_by_the_window() {
    listing_held_by_the_window(SwitchAfter::Fingerprints).await;
}

/// Reads the whole disk through the post-copy device as soon as it is switched over.
struct ReadAtSwitch {
    disk: Mutex<Option<Arc<MigratingDisk>>>,
    src_content: Vec<u8>,
    ok: AtomicBool,
    missing_at_switch: AtomicU64,
}

impl DestHooks for ReadAtSwitch {
    fn attach(&self, _name: &str, disk: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        *self.disk.lock() = Some(disk);
        Ok(())
    }
    fn switched(&self, _name: &str) {
        let disk = self.disk.lock().clone().expect("attached before the switch-over");
        self.missing_at_switch.store(disk.missing_blocks() as u64, Ordering::SeqCst);
        let expected = self.src_content.clone();
        // A reader on another thread (the NBD server's blocking pool), so the migration
        // keeps running while it waits.
        let ok = Arc::new(AtomicBool::new(false));
        let handle = std::thread::spawn(move || {
            let mut buf = vec![0u8; expected.len()];
            // Read from the end backwards, block by block, so reads hit blocks the
            // background pass has not reached.
            for b in (0..expected.len() / BS).rev() {
                disk.read((b * BS) as u64, &mut buf[b * BS..(b + 1) * BS]).unwrap();
            }
            buf == expected
        });
        // Keep the result for the test.
        std::thread::spawn({
            let ok = ok.clone();
            move || ok.store(handle.join().unwrap(), Ordering::SeqCst)
        });
        POSTCOPY_OK.lock().push(ok);
        let _ = &self.ok;
    }
    fn complete(&self, _: &str) {}
}

static POSTCOPY_OK: Mutex<Vec<Arc<AtomicBool>>> = Mutex::new(Vec::new());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_blocks_not_yet_arrived_fetch_them_on_demand() {
    let (src, dst) = (store(), store());
    let content = fill(&src, "vm", 2048, 200, 1800, 1, 0);
    let hooks =
        Arc::new(ReadAtSwitch { disk: Mutex::new(None), src_content: content.clone(), ok: AtomicBool::new(false), missing_at_switch: AtomicU64::new(0) });
    // Small frames so the background transfer takes many steps.
    let config = SourceConfig { switch_after: SwitchAfter::Fingerprints, batch_bytes: 16 * BS, ..Default::default() };
    let (report, _) = migrate(src.clone(), dst.clone(), "vm", config, Arc::new(NoHooks), hooks.clone()).await;
    assert!(hooks.missing_at_switch.load(Ordering::SeqCst) > 1000, "switched before the data crossed");
    // Wait for the reader thread.
    for _ in 0..500 {
        if POSTCOPY_OK.lock().iter().any(|o| o.load(Ordering::SeqCst)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(POSTCOPY_OK.lock().iter().any(|o| o.load(Ordering::SeqCst)), "post-copy reads returned the source's bytes");
    assert_eq!(read_all(&dst, "vm"), content);
    let d = &report.destination;
    assert_eq!(d.received_before_switch + d.fetched_on_demand + d.fetched_background, d.wanted);
    assert!(d.fetched_on_demand > 0, "some blocks were fetched on demand: {d:?}");
    assert!(d.fetched_background > 0, "and some in the background: {d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_get_a_clear_error_and_change_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dst = store();
    fill(&dst, "existing", 16, 4, 4, 1, 0);
    let before = dst.list_disks().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = {
        let dst = dst.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for _ in 0..4 {
                let (conn, peer) = listener.accept().await.unwrap();
                let r = run_destination(
                    dst.clone(),
                    conn,
                    Arc::new(CaptureHooks::default()),
                    migration::MigrationStatus::new(MigrationReport::new("?", "?", "destination", &peer.to_string())),
                )
                .await;
                errors.push(r.unwrap_err().to_string());
            }
            errors
        })
    };
    // 1. Garbage instead of a greeting.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink).await;
    // 2. Another protocol version.
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut g = migration::protocol::greeting();
    g[9] = 42;
    c.write_all(&g).await.unwrap();
    let _ = c.read_to_end(&mut sink).await;
    // 3. A HELLO for a disk that already exists here.
    let hello = |disk: &str, bs: u32| {
        migration::protocol::encode(&migration::protocol::Message::Hello(migration::protocol::Hello {
            migration_id: "x".into(),
            disk: disk.into(),
            size: 16 * BS as u64,
            block_size: bs,
            algorithm: "blake3-128".into(),
            mode: migration::protocol::Mode::Migrate,
            resume: false,
            rebuild: false,
            defer_dirty: false,
            read_through: false,
            data_stream: false,
            gang: None,
            delta: false,
            unnamed_blocks: false,
            want_listed: false,
        }))
    };
    for frame in [hello("existing", BS as u32), hello("new", 512)] {
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&migration::protocol::greeting()).await.unwrap();
        c.write_all(&frame).await.unwrap();
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply).await;
        assert!(String::from_utf8_lossy(&reply).contains("message"), "an ERROR frame came back");
    }
    let errors = server.await.unwrap();
    assert!(errors[0].contains("preamble"), "{errors:?}");
    assert!(errors[1].contains("version 42"), "{errors:?}");
    assert!(errors[2].contains("already exists"), "{errors:?}");
    assert!(errors[3].contains("block size"), "{errors:?}");
    assert_eq!(dst.list_disks().unwrap(), before, "nothing changed");
    assert!(dst.fsck(true).unwrap().is_clean());
}

/// Records thaw calls.
#[derive(Default)]
struct ThawWatch {
    thawed: AtomicBool,
}

impl SourceHooks for ThawWatch {
    fn freeze<'a>(&'a self, _: &'a str) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), migration::HookError>> + Send + 'a>> {
        Box::pin(async { Ok(()) })
    }
    fn thaw(&self, _: &str) {
        self.thawed.store(true, Ordering::SeqCst);
    }
    fn switched(&self, _: &str) {}
}

/// Incompressible blocks, so a capped link is the bottleneck.
fn random_disk(store: &Store, name: &str, blocks: usize, seed: u64) -> Vec<u8> {
    let d = store.create_disk(name, (blocks * BS) as u64).unwrap();
    let mut x = seed | 1;
    let content: Vec<u8> = (0..blocks * BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    store.write(d.id, 0, &content, false).unwrap();
    content
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_before_switch_over_leaves_the_source_authoritative() {
    let (src, dst) = (store(), store());
    let content = random_disk(&src, "vm", 2048, 7);
    fill(&dst, "neighbour", 64, 10, 10, 2, 0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst2 = dst.clone();
    let dest = tokio::spawn(async move {
        let (conn, _) = listener.accept().await.unwrap();
        let status = migration::MigrationStatus::new(MigrationReport::new("?", "?", "destination", "peer"));
        run_destination(dst2, conn, Arc::new(CaptureHooks::default()), status).await
    });
    let conn = TcpStream::connect(addr).await.unwrap();
    let status = migration::MigrationStatus::new(MigrationReport::new("c", "vm", "source", "peer"));
    // 8 MiB at 16 Mbit/s takes about 4 s: plenty of time to cancel.
    let config = SourceConfig { bandwidth_bps: Some(16_000_000), ..Default::default() };
    let hooks = Arc::new(ThawWatch::default());
    let run = tokio::spawn(run_source(src.clone(), "vm", conn, config, hooks.clone(), status.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    status.request_cancel().unwrap();
    let err = run.await.unwrap().unwrap_err();
    assert!(matches!(err, migration::MigrationError::Cancelled), "{err}");
    assert_eq!(status.report().phase, migration::Phase::Cancelled);
    assert!(status.request_cancel().is_err(), "already ended");
    assert!(dest.await.unwrap().is_err(), "the destination saw the migration stop");
    assert_eq!(dst.list_disks().unwrap().iter().map(|d| d.name.clone()).collect::<Vec<_>>(), vec!["neighbour".to_string()], "partial disk removed");
    assert!(dst.fsck(true).unwrap().is_clean());
    assert_eq!(read_all(&src, "vm"), content, "source untouched");
    let id = src.disk("vm").unwrap().id;
    assert!(src.dirty_take(id).is_err(), "dirty tracking stopped");
    assert!(src.fsck(true).unwrap().is_clean());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_is_honoured() {
    let (src, dst) = (store(), store());
    let content = random_disk(&src, "vm", 1024, 11); // 4 MiB, incompressible
    let started = std::time::Instant::now();
    let config = SourceConfig { bandwidth_bps: Some(16_000_000), ..Default::default() };
    let (report, _) = migrate(src.clone(), dst.clone(), "vm", config, Arc::new(NoHooks), Arc::new(CaptureHooks::default())).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(read_all(&dst, "vm"), content);
    // What the source sent, at 2 MB/s, less the first burst: a lower bound on the time.
    let sent = (report.link.data_wire_bytes + report.link.fingerprint_bytes) as f64;
    let floor = (sent - 128.0 * 1024.0) / 2_000_000.0;
    assert!(elapsed >= floor * 0.95, "took {elapsed:.2} s for {sent} bytes at 16 Mbit/s (at least {floor:.2} s)");
}
