//! Small writes that arrive together are committed as one device call (a CAS store disk),
//! each with its own reply, refusals and errors included.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use cas_store::{Store, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Client, SIZE};
use crate::export::{DeviceResult, Extent};
use crate::proto::consts::*;
use crate::proto::transmission::encode_request_header;
use crate::proto::{Errno, RequestHeader};
use crate::{BlockDevice, CasDevice, Export, ExportRegistry, Server, ServerConfig};

/// A CAS disk that counts the grouped calls it gets.
#[derive(Debug)]
struct CountingGroups {
    disk: CasDevice,
    groups: AtomicUsize,
    grouped_writes: AtomicUsize,
}

impl BlockDevice for CountingGroups {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> DeviceResult<()> {
        self.disk.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> DeviceResult<()> {
        self.disk.write(offset, data, fua)
    }
    fn write_many(&self, writes: &[(u64, &[u8])], fua: bool) -> Vec<DeviceResult<()>> {
        self.groups.fetch_add(1, Ordering::SeqCst);
        self.grouped_writes.fetch_add(writes.len(), Ordering::SeqCst);
        self.disk.write_many(writes, fua)
    }
    fn groups_writes(&self) -> bool {
        true
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> DeviceResult<()> {
        self.disk.write_zeroes(offset, len, fua, no_hole)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> DeviceResult<()> {
        self.disk.trim(offset, len, fua)
    }
    fn flush(&self) -> DeviceResult<()> {
        self.disk.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> DeviceResult<Vec<Extent>> {
        self.disk.block_status(offset, len)
    }
}

fn block(seed: u64) -> Vec<u8> {
    (0..4096u64).map(|i| (i.wrapping_mul(seed * 2 + 1).wrapping_add(seed) >> 3) as u8).collect()
}

#[tokio::test]
async fn small_writes_sent_together_are_grouped_and_each_answered() {
    let store = Arc::new(Store::open_in_memory(StoreOptions::default()).unwrap());
    store.create_disk("disk", SIZE).unwrap();
    let device = Arc::new(CountingGroups {
        disk: CasDevice::open(store.clone(), "disk").unwrap(),
        groups: AtomicUsize::new(0),
        grouped_writes: AtomicUsize::new(0),
    });
    let registry = Arc::new(ExportRegistry::new());
    registry.insert(Arc::new(Export::new("disk", device.clone() as Arc<dyn BlockDevice>)));
    let server = Arc::new(Server::new(registry, ServerConfig::default()));
    let mut c = Client::connect(&server);
    c.simple_go("disk").await;

    // One buffer of requests, so they wait together in the server's read buffer: 48 whole
    // blocks (every fifth with FUA, two pairs with the same content), an unaligned write, a
    // write past the end (refused), and a block written twice (the later one is the one the
    // client sent last; either may land, NBD orders neither).
    let mut expected = vec![0u8; SIZE as usize];
    let mut wire = Vec::new();
    let mut push = |handle: u64, flags: u16, offset: u64, data: &[u8]| {
        let h = RequestHeader { flags, command: CMD_WRITE, handle, offset, length: data.len() as u32 };
        wire.extend_from_slice(&encode_request_header(&h));
        wire.extend_from_slice(data);
    };
    for i in 0..48u64 {
        let data = block(i % 46);
        let flags = if i % 5 == 0 { CMD_FLAG_FUA } else { 0 };
        push(i, flags, i * 3 * 4096, &data);
        expected[(i * 3 * 4096) as usize..][..4096].copy_from_slice(&data);
    }
    let unaligned = vec![0x5a; 1000];
    push(100, 0, 7 * 4096 + 100, &unaligned);
    expected[(7 * 4096 + 100) as usize..][..1000].copy_from_slice(&unaligned);
    push(101, 0, SIZE, &block(7));
    push(102, 0, 200 * 4096, &block(8));
    push(103, 0, 200 * 4096, &block(9));
    c.io.write_all(&wire).await.unwrap();

    let mut errors = std::collections::HashMap::new();
    for _ in 0..52 {
        let (error, handle) = c.simple_reply().await;
        assert!(errors.insert(handle, error).is_none(), "two replies for {handle}");
    }
    assert_eq!(errors.len(), 52);
    for (handle, error) in &errors {
        let want = if *handle == 101 { Errno::NoSpc.code() } else { 0 };
        assert_eq!(*error, want, "request {handle}");
    }
    assert!(device.groups.load(Ordering::SeqCst) >= 1, "no write was grouped");
    assert!(device.grouped_writes.load(Ordering::SeqCst) >= 2);

    let mut got = vec![0u8; SIZE as usize];
    device.read(0, &mut got).unwrap();
    let twice = &got[200 * 4096..201 * 4096];
    assert!(twice == &block(8)[..] || twice == &block(9)[..], "block written twice holds neither write");
    got[200 * 4096..201 * 4096].fill(0);
    assert!(got == expected, "disk content differs from what was written");
    assert!(store.fsck(true).unwrap().is_clean());

    // The server still reads requests after the group: a plain read.
    let h = RequestHeader { flags: 0, command: CMD_READ, handle: 7, offset: 3 * 4096, length: 4096 };
    c.io.write_all(&encode_request_header(&h)).await.unwrap();
    assert_eq!(c.simple_reply().await, (0, 7));
    let mut data = vec![0u8; 4096];
    c.io.read_exact(&mut data).await.unwrap();
    assert_eq!(data, block(1));
}
