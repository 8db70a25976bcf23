//! Writes answered before their device call returns: what a client sees must not change
//! (reads, writes and FLUSH after the reply wait for the write; a failure reaches the next
//! FLUSH; a freeze waits for it).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use super::{fixture, fixture_with, Client, Fixture, GatedDevice, SIZE};
use crate::proto::consts::*;
use crate::{BlockDevice, Export, ServerConfig};

const EIO: u32 = 5;
/// How long a reply that must not come is waited for.
const SETTLE: Duration = Duration::from_millis(300);

/// A server with a gated device that allows early answers, and a client in transmission
/// with it (the fixture is returned to keep the server alive).
async fn gated_with(config: ServerConfig) -> (Fixture, Arc<GatedDevice>, Arc<Export>, Client) {
    let f = fixture_with(config);
    let device = Arc::new(GatedDevice::new(true));
    let export = Arc::new(Export::new("gated", device.clone() as Arc<dyn BlockDevice>));
    f.server.registry().insert(export.clone());
    let mut c = Client::connect(&f.server);
    c.simple_go("gated").await;
    (f, device, export, c)
}

async fn gated() -> (Fixture, Arc<GatedDevice>, Arc<Export>, Client) {
    gated_with(ServerConfig::default()).await
}

/// An early write of 4 KiB of `byte` at `offset`, answered while the device holds it.
async fn early_write(c: &mut Client, handle: u64, offset: u64, byte: u8) {
    c.request(CMD_WRITE, 0, handle, offset, 4096, &[byte; 4096]).await;
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), c.simple_reply()).await.unwrap(), (0, handle));
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::time::timeout(SETTLE, f).await.ok()
}

/// A simple reply, and a READ's data if its handle is in `reads`.
async fn reply_with_data(c: &mut Client, reads: &[(u64, usize)]) -> (u32, u64, Vec<u8>) {
    let (error, handle) = c.simple_reply().await;
    let mut data = Vec::new();
    if let Some(&(_, len)) = reads.iter().find(|(h, _)| *h == handle) {
        if error == 0 {
            data = vec![0u8; len];
            c.io.read_exact(&mut data).await.unwrap();
        }
    }
    (error, handle, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_write_is_seen_by_later_reads_and_flushes() {
    let (_f, device, export, mut c) = gated().await;

    early_write(&mut c, 1, 4096, 0xaa).await;
    assert_eq!(export.writes_behind().running(), 1);

    // A read elsewhere goes ahead; a read overlapping the write and a FLUSH wait for it.
    c.request(CMD_READ, 0, 2, 6000, 4096, &[]).await;
    c.request(CMD_READ, 0, 3, 3 * 4096, 4096, &[]).await;
    c.request(CMD_FLUSH, 0, 4, 0, 0, &[]).await;
    let reads = [(2, 4096), (3, 4096)];
    let (error, handle, data) = tokio::time::timeout(Duration::from_secs(5), reply_with_data(&mut c, &reads))
        .await
        .expect("the read elsewhere");
    assert_eq!((error, handle), (0, 3));
    assert!(data.iter().all(|&b| b == 0));
    assert!(within(c.simple_reply()).await.is_none(), "a request overtook the early write");

    device.release();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let (error, handle, data) = reply_with_data(&mut c, &reads).await;
        assert_eq!(error, 0);
        if handle == 2 {
            // Bytes 6000..8192 come from the write, the rest of the block was zero.
            assert!(data[..8192 - 6000].iter().all(|&b| b == 0xaa));
            assert!(data[8192 - 6000..].iter().all(|&b| b == 0));
        }
        seen.push(handle);
    }
    seen.sort_unstable();
    assert_eq!(seen, [2, 4]);
    assert_eq!(export.writes_behind().running(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_write_to_the_same_range_lands_after_the_early_one() {
    let (_f, device, _export, mut c) = gated().await;
    early_write(&mut c, 1, 0, 1).await;
    // FUA: answered after its device call, which waits for the first write's.
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 0, 4096, &[2; 4096]).await;
    assert!(within(c.simple_reply()).await.is_none());
    device.release();
    assert_eq!(c.simple_reply().await, (0, 2));
    let mut buf = vec![0u8; 4096];
    device.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 2), "the first write landed last");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_early_write_fails_the_next_flush_of_each_connection_once() {
    let (f, device, export, mut a) = gated().await;
    let mut b = Client::connect(&f.server);
    b.simple_go("gated").await;
    // A round trip: b is in transmission before the write fails.
    b.request(CMD_FLUSH, 0, 9, 0, 0, &[]).await;
    assert_eq!(b.simple_reply().await, (0, 9));
    device.fail_writes.store(true, Ordering::SeqCst);
    device.release();

    early_write(&mut a, 1, 0, 7).await;
    a.request(CMD_FLUSH, 0, 2, 0, 0, &[]).await;
    assert_eq!(a.simple_reply().await, (EIO, 2));
    a.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(a.simple_reply().await, (0, 3));
    // The other connection was open when the write failed: its next FLUSH says so too.
    b.request(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
    assert_eq!(b.simple_reply().await, (EIO, 1));
    assert_eq!(export.writes_behind().failures(), 1);
    // A FUA write's failure is its own reply's, as before.
    a.request(CMD_WRITE, CMD_FLAG_FUA, 4, 0, 4096, &[7; 4096]).await;
    assert_eq!(a.simple_reply().await, (EIO, 4));
    assert_eq!(export.writes_behind().failures(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_waits_for_early_writes() {
    let (_f, device, export, mut c) = gated().await;
    early_write(&mut c, 1, 0, 3).await;
    let freezing = {
        let export = export.clone();
        tokio::spawn(async move { export.freeze().await })
    };
    tokio::time::sleep(SETTLE).await;
    assert!(!freezing.is_finished(), "the switch-over must not start with an answered write still running");
    device.release();
    tokio::time::timeout(Duration::from_secs(5), freezing).await.unwrap().unwrap();
    let mut buf = vec![0u8; 4096];
    device.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_write_behind_a_write_is_answered_after_its_device_call() {
    let (f, device, export, mut c) = gated_with(ServerConfig { write_behind: false, ..ServerConfig::default() }).await;
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[3; 4096]).await;
    assert!(within(c.simple_reply()).await.is_none());
    device.release();
    assert_eq!(c.simple_reply().await, (0, 1));
    assert_eq!(export.writes_behind().failures(), 0);
    // And a device that does not opt in is never answered early (the fixture's MemDevice).
    assert!(!f.device.writes_behind());
}

/// The CAS store behind a real connection: a client writing at queue depth 1 and reading
/// each range back at once always reads what it wrote.
#[cfg(feature = "cas")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cas_disk_reads_back_what_was_answered_early() {
    use cas_store::{Store, StoreOptions};
    let f = fixture();
    let store = Arc::new(Store::open_in_memory(StoreOptions::default()).unwrap());
    store.create_disk("cas", SIZE).unwrap();
    let device = Arc::new(crate::CasDevice::open(store, "cas").unwrap());
    assert!(device.writes_behind());
    let export = Arc::new(Export::new("cas", device as Arc<dyn BlockDevice>));
    f.server.registry().insert(export.clone());
    let mut c = Client::connect(&f.server);
    c.simple_go("cas").await;
    let len = 64 * 1024usize;
    for round in 0..3u64 {
        for i in 0..(SIZE / len as u64) {
            let data: Vec<u8> = (0..len).map(|j| (j as u64 ^ (i * 7919) ^ (round * 104_729)) as u8 | 1).collect();
            c.request(CMD_WRITE, 0, 2 * i, i * len as u64, len as u32, &data).await;
            assert_eq!(c.simple_reply().await, (0, 2 * i));
            c.request(CMD_READ, 0, 2 * i + 1, i * len as u64, len as u32, &[]).await;
            assert_eq!(c.simple_reply().await, (0, 2 * i + 1));
            let mut back = vec![0u8; len];
            c.io.read_exact(&mut back).await.unwrap();
            assert!(back == data, "round {round}, write {i}: read back other bytes");
        }
    }
    c.request(CMD_FLUSH, 0, 1 << 40, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 1 << 40));
    assert_eq!(export.writes_behind().running(), 0);
    assert_eq!(export.writes_behind().failures(), 0);
}
