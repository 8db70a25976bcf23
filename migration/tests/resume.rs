//! Fault injection: a proxy between source and destination that understands the frames of the
//! source's direction cuts the connection at chosen points of each phase. Every migration
//! must complete with the destination byte-exact, and what crossed twice must stay within
//! what can be in flight at a cut.

mod common;
use common::{guest_writer, later_version, older_version, read_all, serve_destination, write_disk};

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_store::{Store, StoreOptions};
use migration::{
    DestHooks, Destination, LinkStream, MemStateStore, MigratingDisk, MigrationReport, MigrationStatus, NoHooks, SourceConfig, SourceHooks, SwitchAfter,
};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BS: usize = 4096;
/// Frame types of the source's direction (see migration::protocol).
const FINGERPRINTS: u8 = 3;
const ROUND_END: u8 = 4;
const DATA: u8 = 7;
/// DATA_STREAM: block data as a piece of the connection's zstd stream. The rules count it as
/// DATA, so cuts land inside a compression stream.
const DATA_STREAM: u8 = 18;
const SWITCH: u8 = 9;
/// REF_QUERY: the source asks whether the destination holds candidate references for deltas.
const REF_QUERY: u8 = 19;

fn store() -> Arc<Store> {
    Arc::new(Store::open_in_memory(StoreOptions { block_size: Some(BS as u32), ..Default::default() }).unwrap())
}

/// Incompressible blocks, then blocks shared with the destination's neighbour, then zeros.
fn fill(store: &Store, name: &str, random_blocks: usize, shared_blocks: usize, zero_blocks: usize, seed: u64) -> Vec<u8> {
    let blocks = random_blocks + shared_blocks + zero_blocks;
    let d = store.create_disk(name, (blocks * BS) as u64).unwrap();
    let mut content = vec![0u8; blocks * BS];
    let mut x = seed | 1;
    for byte in content[..random_blocks * BS].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = x as u8;
    }
    for i in 0..shared_blocks {
        let at = (random_blocks + i) * BS;
        content[at..at + 8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        content[at + 8] = 0x5a;
    }
    store.write(d.id, 0, &content, false).unwrap();
    content
}

/// When to cut: called for each frame from the source with its type and how many frames of
/// that type went before it (on every connection).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Cut {
    No,
    /// Drop the frame and the connection: it was in flight.
    Before,
    /// Deliver the frame, then drop the connection (its answer is lost).
    After,
}

type Rule = Box<dyn FnMut(u8, u64) -> Cut + Send>;

struct Proxy {
    addr: SocketAddr,
    cuts: Arc<AtomicU64>,
    /// Every frame from the source, in order: its type and the first 4 bytes of its
    /// payload (a FINGERPRINTS frame's round).
    log: Arc<Mutex<Vec<(u8, u32)>>>,
}

/// A TCP proxy to `upstream` that parses the source's frames and cuts as `rule` says.
async fn proxy(upstream: SocketAddr, rule: Rule) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicU64::new(0));
    let rule = Arc::new(Mutex::new(rule));
    let counts = Arc::new(Mutex::new([0u64; 256]));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (c, frames) = (cuts.clone(), log.clone());
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let (rule, counts, cuts, frames) = (rule.clone(), counts.clone(), c.clone(), frames.clone());
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let back = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let forward = async {
                    let mut greeting = [0u8; 10];
                    cr.read_exact(&mut greeting).await?;
                    sw.write_all(&greeting).await?;
                    loop {
                        let mut header = [0u8; 5];
                        cr.read_exact(&mut header).await?;
                        let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
                        let mut payload = vec![0u8; len];
                        cr.read_exact(&mut payload).await?;
                        let t = if header[0] == DATA_STREAM { DATA } else { header[0] };
                        let head = payload.get(..4).map_or(0, |h| u32::from_be_bytes(h.try_into().unwrap()));
                        frames.lock().push((t, head));
                        let n = {
                            let mut c = counts.lock();
                            c[t as usize] += 1;
                            c[t as usize] - 1
                        };
                        let cut = (rule.lock())(t, n);
                        if cut == Cut::Before {
                            return Ok::<bool, std::io::Error>(true);
                        }
                        sw.write_all(&header).await?;
                        sw.write_all(&payload).await?;
                        if cut == Cut::After {
                            sw.flush().await?;
                            // Give the frame time to arrive before the connection dies.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            return Ok(true);
                        }
                    }
                };
                if let Ok(true) = forward.await {
                    cuts.fetch_add(1, Ordering::SeqCst);
                }
                back.abort();
                // Dropping both halves of both sockets closes the connections.
            });
        }
    });
    Proxy { addr, cuts, log }
}

#[derive(Default)]
struct Hooks {
    disk: Mutex<Option<Arc<MigratingDisk>>>,
    status: Mutex<Option<Arc<MigrationStatus>>>,
    /// Read the whole disk through the post-copy device right after the switch-over.
    read_at_switch: Option<Vec<u8>>,
    read_ok: Arc<AtomicBool>,
}

impl DestHooks for Hooks {
    fn attach(&self, _name: &str, disk: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        *self.disk.lock() = Some(disk);
        Ok(())
    }
    fn switched(&self, _name: &str) {
        let disk = self.disk.lock().clone().expect("attached before the switch-over");
        if let Some(expected) = self.read_at_switch.clone() {
            let ok = self.read_ok.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; expected.len()];
                // Backwards, block by block: reads hit blocks the background has not sent,
                // while the link is being cut.
                for b in (0..expected.len() / BS).rev() {
                    if let Err(e) = disk.read((b * BS) as u64, &mut buf[b * BS..(b + 1) * BS]) {
                        panic!("post-copy read of block {b} failed: {e}");
                    }
                }
                ok.store(buf == expected, Ordering::SeqCst);
            });
        }
    }
    fn complete(&self, _name: &str) {}
    fn registered(&self, _id: &str, status: Arc<MigrationStatus>) {
        *self.status.lock() = Some(status);
    }
}

struct Outcome {
    source: MigrationReport,
    destination: MigrationReport,
    cuts: u64,
    frames: Vec<(u8, u32)>,
}

async fn run(src: Arc<Store>, dst: Arc<Store>, config: SourceConfig, src_hooks: Arc<dyn SourceHooks>, dst_hooks: Arc<Hooks>, rule: Rule) -> Outcome {
    run_windowed(src, dst, config, src_hooks, dst_hooks, rule, migration::LISTING_WINDOW_BLOCKS).await
}

async fn run_windowed(
    src: Arc<Store>,
    dst: Arc<Store>,
    config: SourceConfig,
    src_hooks: Arc<dyn SourceHooks>,
    dst_hooks: Arc<Hooks>,
    rule: Rule,
    listing_window: usize,
) -> Outcome {
    let dest = Destination::new(dst, dst_hooks.clone(), Arc::new(MemStateStore::default()), Duration::from_secs(120));
    dest.set_listing_window(listing_window);
    let dest_addr = serve_destination(dest).await;
    let p = proxy(dest_addr, rule).await;
    let addr = p.addr;
    let connector = Arc::new(move || async move {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Box::new(s) as LinkStream)
    });
    let status = MigrationStatus::new(MigrationReport::new("m-1", "vm", "source", &addr.to_string()));
    let config = SourceConfig { migration_id: "m-1".into(), reconnect_window_secs: 60, ..config };
    let source = tokio::time::timeout(Duration::from_secs(120), migration::run_source_with(src, "vm", connector, config, src_hooks, status, None))
        .await
        .expect("the migration finishes")
        .expect("the migration succeeds");
    let dst_status = dst_hooks.status.lock().clone().expect("the destination registered the migration");
    for _ in 0..500 {
        if dst_status.report().is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let frames = p.log.lock().clone();
    Outcome { source, destination: dst_status.report(), cuts: p.cuts.load(Ordering::SeqCst), frames }
}

/// What can be in flight when a connection drops: the source's queued DATA frames (4 of
/// about 1 MiB, one being built, 16 urgent small ones) and the socket buffers of both hops.
const IN_FLIGHT_BOUND: u64 = 6 << 20;

fn check(name: &str, o: &Outcome, min_cuts: u64) {
    let l = &o.source.link;
    eprintln!(
        "{name}: cuts {} reconnects {} resent raw {} KiB replayed {} KiB, total {} KiB, data raw {} KiB",
        o.cuts,
        l.reconnects,
        l.resent_raw_bytes >> 10,
        l.replayed_bytes >> 10,
        l.total_bytes >> 10,
        l.data_raw_bytes >> 10
    );
    assert!(o.cuts >= min_cuts, "{name}: the proxy cut {} times", o.cuts);
    assert!(l.reconnects >= o.cuts, "{name}: the source reconnected after each cut");
    assert!(l.resent_raw_bytes <= o.cuts * IN_FLIGHT_BOUND, "{name}: {} bytes resent for {} cuts", l.resent_raw_bytes, o.cuts);
    assert_eq!(o.source.phase, migration::Phase::Done, "{name}");
    assert_eq!(o.destination.phase, migration::Phase::Done, "{name}: {:?}", o.destination.error);
}

fn cut_once(kind: u8, at: u64, how: Cut) -> Rule {
    Box::new(move |t, n| if t == kind && n == at { how } else { Cut::No })
}

/// 12 MiB that must cross, 4 MiB the neighbour has, 4 MiB of zeros; 2 FINGERPRINTS frames.
async fn simple(name: &str, config: SourceConfig, rule: Rule, min_cuts: u64) -> Outcome {
    let (src, dst) = (store(), store());
    let content = fill(&src, "vm", 3072, 1024 * 5, 1024 * 4, 7);
    let neighbour_content = fill(&dst, "neighbour", 0, 1024 * 5, 0, 1);
    let hooks = Arc::new(Hooks::default());
    let o = run(src.clone(), dst.clone(), config, Arc::new(NoHooks), hooks, rule).await;
    assert_eq!(read_all(&dst, "vm"), content, "{name}: byte-exact at the destination");
    assert_eq!(read_all(&dst, "neighbour"), neighbour_content);
    assert!(dst.disk("vm.incoming").is_err());
    assert!(dst.fsck(true).unwrap().is_clean(), "{name}: fsck at the destination");
    check(name, &o, min_cuts);
    assert_eq!(o.source.destination.neighbour_hits, 1024 * 5, "{name}: the neighbour's blocks never crossed");
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_while_listing_fingerprints() {
    let o = simple("listing", SourceConfig::default(), cut_once(FINGERPRINTS, 0, Cut::Before), 1).await;
    assert!(o.source.link.replayed_bytes > 0, "the lost FINGERPRINTS frame was sent again");
}

/// The destination holds the second listing frame back (its window of 64 blocks is full of
/// the first frame's 3072 missing blocks) when the link drops: the held frame was never
/// acknowledged, so the source sends it again on the new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_while_the_listing_window_holds_a_frame_back() {
    let (src, dst) = (store(), store());
    // 3072 + 10240 allocated blocks: two listing frames of 8192, the missing ones in the first.
    let content = fill(&src, "vm", 3072, 10240, 0, 7);
    fill(&dst, "neighbour", 0, 10240, 0, 1);
    let o = run_windowed(src.clone(), dst.clone(), SourceConfig::default(), Arc::new(NoHooks), Arc::new(Hooks::default()), cut_once(DATA, 1, Cut::Before), 64)
        .await;
    assert_eq!(read_all(&dst, "vm"), content, "byte-exact at the destination");
    assert!(dst.fsck(true).unwrap().is_clean());
    check("window", &o, 1);
    assert!(o.source.link.replayed_bytes > 0, "the held FINGERPRINTS frame was sent again");
    assert_eq!(o.source.destination.neighbour_hits, 10240);
    assert!(o.source.destination.missing_peak <= 64 + 8192, "{:?}", o.source.destination);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_while_data_crosses_before_the_switch_over() {
    let o = simple("pre-copy data", SourceConfig::default(), cut_once(DATA, 4, Cut::Before), 1).await;
    assert!(o.source.destination.received_before_switch >= 3072, "{:?}", o.source.destination);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_repeatedly_under_a_bandwidth_cap() {
    // Every fifth DATA frame is lost with its connection.
    let config = SourceConfig { bandwidth_bps: Some(400_000_000), batch_bytes: 256 << 10, ..Default::default() };
    simple("repeated", config, Box::new(|t, n| if t == DATA && n % 5 == 4 { Cut::Before } else { Cut::No }), 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_when_switch_reaches_the_destination_but_switched_is_lost() {
    let o = simple("after SWITCH", SourceConfig::default(), cut_once(SWITCH, 0, Cut::After), 1).await;
    assert!(o.source.downtime_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_during_the_switch_over_before_switch_arrives() {
    // The last ROUND_END (round 1) is lost: the source is frozen and must not thaw.
    simple("switch-over", SourceConfig::default(), cut_once(ROUND_END, 1, Cut::Before), 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_during_post_copy_while_a_reader_waits() {
    let (src, dst) = (store(), store());
    let content = fill(&src, "vm", 3072, 1024, 1024, 11);
    let hooks = Arc::new(Hooks { read_at_switch: Some(content.clone()), ..Default::default() });
    // Switch at once; small frames so the background pass takes many; cut twice after it.
    let config = SourceConfig { switch_after: SwitchAfter::Fingerprints, batch_bytes: 64 << 10, bandwidth_bps: Some(200_000_000), ..Default::default() };
    let rule: Rule = Box::new(|t, n| if t == DATA && (n == 5 || n == 20) { Cut::Before } else { Cut::No });
    let o = run(src.clone(), dst.clone(), config, Arc::new(NoHooks), hooks.clone(), rule).await;
    for _ in 0..1000 {
        if hooks.read_ok.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(hooks.read_ok.load(Ordering::SeqCst), "reads during the cuts waited for the link and returned the source's bytes");
    assert_eq!(read_all(&dst, "vm"), content);
    check("post-copy", &o, 2);
    let d = &o.source.destination;
    assert_eq!(d.received_before_switch, 0);
    assert!(d.fetched_on_demand + d.fetched_background >= 3072, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_during_dirty_rounds_while_the_guest_writes() {
    let (src, dst) = (store(), store());
    fill(&src, "vm", 2048, 1024, 1024, 3);
    fill(&dst, "neighbour", 0, 1024, 0, 1);
    let (freeze, writer) = guest_writer(src.clone(), "vm", Duration::from_micros(300), |s, id, i| {
        let block = (i * 7919) % 4096;
        s.write(id, block * BS as u64 + 100, &[(i % 251) as u8 + 1; 3000], false).unwrap();
    });
    // Converged rounds; the connection drops in round 0's data, at the second round's
    // listing, and at its end.
    let config = SourceConfig { switch_after: SwitchAfter::Converged, converge_blocks: 8, bandwidth_bps: Some(300_000_000), ..Default::default() };
    let rule: Rule = Box::new(|t, n| match (t, n) {
        (DATA, 3) => Cut::Before,
        (FINGERPRINTS, 3) => Cut::Before,
        (ROUND_END, 2) => Cut::After,
        _ => Cut::No,
    });
    let hooks = Arc::new(Hooks::default());
    let o = run(src.clone(), dst.clone(), config, Arc::new(freeze), hooks, rule).await;
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    assert_eq!(read_all(&dst, "vm"), read_all(&src, "vm"), "the destination equals the source at the freeze");
    assert!(dst.fsck(true).unwrap().is_clean());
    check("dirty rounds", &o, 2);
    assert!(o.source.rounds >= 2, "{:?}", o.source.round_blocks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_reconnect_is_interrupted_and_resumes_when_asked() {
    let (src, dst) = (store(), store());
    let content = fill(&src, "vm", 2048, 0, 0, 5);
    let dest_addr =
        serve_destination(Destination::new(dst.clone(), Arc::new(Hooks::default()), Arc::new(MemStateStore::default()), Duration::from_secs(120))).await;
    // The "network" is down (connections refused) while `down` is set, after a first cut.
    let down = Arc::new(AtomicBool::new(false));
    let d = down.clone();
    let p = proxy(
        dest_addr,
        Box::new(move |t, n| {
            if t == DATA && n == 2 {
                d.store(true, Ordering::SeqCst);
                Cut::Before
            } else {
                Cut::No
            }
        }),
    )
    .await;
    let (addr, d) = (p.addr, down.clone());
    let connector = Arc::new(move || {
        let d = d.clone();
        async move {
            if d.load(Ordering::SeqCst) {
                return Err(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "network down (test)"));
            }
            Ok(Box::new(TcpStream::connect(addr).await?) as LinkStream)
        }
    });
    let status = MigrationStatus::new(MigrationReport::new("m-2", "vm", "source", &addr.to_string()));
    let config = SourceConfig { migration_id: "m-2".into(), reconnect_window_secs: 1, bandwidth_bps: Some(100_000_000), ..Default::default() };
    let run = tokio::spawn(migration::run_source_with(src.clone(), "vm", connector, config, Arc::new(NoHooks), status.clone(), None));
    let mut seen = false;
    for _ in 0..400 {
        if status.report().phase == migration::Phase::Interrupted {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen, "the migration shows as interrupted: {:?}", status.report());
    assert!(status.report().link_state.starts_with("down"), "{}", status.report().link_state);
    down.store(false, Ordering::SeqCst);
    status.request_resume().unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), run).await.unwrap().unwrap().unwrap();
    assert_eq!(report.phase, migration::Phase::Done);
    assert_eq!(read_all(&dst, "vm"), content);
}

/// Precopy mode's dirty rounds are listings only (`defer_dirty`): no DATA crosses from the
/// first dirty round to SWITCH, the rounds repeat while the dirty set shrinks, and every
/// block still missing at the switch-over crosses after it, with its content at the freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_dirty_rounds_list_only_and_their_data_follows_the_switch() {
    let (src, dst) = (store(), store());
    fill(&src, "vm", 2048, 1024, 30_000, 9);
    fill(&dst, "neighbour", 0, 1024, 0, 1);
    // A guest writing new content into the region that was zero, until the freeze.
    let (freeze, writer) = guest_writer(src.clone(), "vm", Duration::from_micros(200), |s, id, i| {
        let mut b = [0u8; BS];
        b[..8].copy_from_slice(&(i + 1).to_le_bytes());
        b[8] = 0xd7;
        s.write(id, (3072 + (i * 7) % 30_000) * BS as u64, &b, false).unwrap();
    });
    let config = SourceConfig { switch_after: SwitchAfter::Precopy, converge_blocks: 4, bandwidth_bps: Some(50_000_000), ..Default::default() };
    let o = run(src.clone(), dst.clone(), config, Arc::new(freeze), Arc::new(Hooks::default()), Box::new(|_, _| Cut::No)).await;
    let writes = writer.join().unwrap();
    assert_eq!(read_all(&dst, "vm"), read_all(&src, "vm"), "the destination equals the source at the freeze");
    assert!(dst.fsck(true).unwrap().is_clean());
    let rounds = &o.source.round_blocks;
    assert!(rounds.len() >= 3, "round 0, at least one dirty round, the final one: {rounds:?} after {writes} writes");
    let first_dirty = o.frames.iter().position(|&(t, r)| t == FINGERPRINTS && r == 1).expect("a dirty round was listed");
    let switch = o.frames.iter().position(|&(t, _)| t == SWITCH).expect("SWITCH was sent");
    let data_inside = o.frames[first_dirty..switch].iter().filter(|&&(t, _)| t == DATA).count();
    assert_eq!(data_inside, 0, "DATA frames during the listing-only rounds");
    let d = &o.source.destination;
    assert!(d.fetched_background + d.fetched_on_demand > 0, "dirty blocks crossed after the switch-over: {d:?}");
    assert!(*rounds.last().unwrap() <= rounds[1], "the final listing is no larger than the first dirty round: {rounds:?}");
}

/// Deltas across cuts: a query lost in flight, a query whose answer is lost, and a stream
/// frame full of deltas lost. Query state belongs to a connection, so the next one asks
/// again; every block arrives once usable and byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_inside_delta_exchanges() {
    let small_containers =
        || Arc::new(Store::open_in_memory(StoreOptions { block_size: Some(BS as u32), container_bytes: 64 * BS as u64, ..Default::default() }).unwrap());
    let (src, dst) = (small_containers(), small_containers());
    let old = older_version(2048);
    let vm = later_version(&old);
    write_disk(&src, "vm-monday", &old);
    write_disk(&src, "vm", &vm);
    src.update_sketches().unwrap();
    write_disk(&dst, "vm-monday", &old);
    let rule: Rule = Box::new(|t, n| match (t, n) {
        (REF_QUERY, 0) => Cut::Before,
        (REF_QUERY, 2) => Cut::After,
        (DATA, 1) => Cut::Before,
        _ => Cut::No,
    });
    let o = run(src, dst.clone(), SourceConfig::default(), Arc::new(NoHooks), Arc::new(Hooks::default()), rule).await;
    assert_eq!(read_all(&dst, "vm"), vm, "byte-exact at the destination");
    assert!(dst.fsck(true).unwrap().is_clean());
    check("cut inside delta exchanges", &o, 3);
    assert!(o.frames.iter().filter(|(t, _)| *t == REF_QUERY).count() > 3, "queries asked again after the cuts");
    let d = &o.source.destination;
    assert!(d.delta_blocks > 1024, "{} blocks rebuilt from deltas", d.delta_blocks);
    assert_eq!(d.delta_refetched, 0);
}
