//! The in-process tests' raw client, fixtures and a device whose writes wait for the test.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::proto::consts::*;
use crate::proto::handshake::{encode_info_request, encode_meta_context_request, encode_option_header};
use crate::proto::transmission::encode_request_header;
use crate::proto::RequestHeader;
use crate::{BlockDevice, Export, ExportRegistry, MemDevice, Server, ServerConfig};

pub(super) const SIZE: u64 = 1 << 20;

pub(super) struct Fixture {
    pub(super) server: Arc<Server>,
    pub(super) device: Arc<MemDevice>,
    pub(super) export: Arc<Export>,
}

pub(super) fn fixture() -> Fixture {
    fixture_with(ServerConfig::default())
}

pub(super) fn fixture_with(config: ServerConfig) -> Fixture {
    let registry = Arc::new(ExportRegistry::new());
    let device = Arc::new(MemDevice::new(SIZE));
    let export = Arc::new(Export::new("disk", device.clone() as Arc<dyn BlockDevice>).with_description("a test disk"));
    registry.insert(export.clone());
    registry.insert(Arc::new(Export::new("ro", Arc::new(MemDevice::new(SIZE))).with_read_only(true)));
    registry.set_default(Some("disk"));
    Fixture { server: Arc::new(Server::new(registry, config)), device, export }
}

pub(super) struct Client {
    pub(super) io: DuplexStream,
    pub(super) task: tokio::task::JoinHandle<()>,
}

pub(super) struct OptReply {
    pub(super) option: u32,
    pub(super) kind: u32,
    pub(super) data: Vec<u8>,
}

pub(super) struct Chunk {
    pub(super) flags: u16,
    pub(super) kind: u16,
    pub(super) handle: u64,
    pub(super) data: Vec<u8>,
}

impl Client {
    pub(super) fn connect(server: &Arc<Server>) -> Client {
        let (client, server_side) = tokio::io::duplex(4 << 20);
        let server = server.clone();
        let task = tokio::spawn(async move { server.serve_stream(server_side).await });
        Client { io: client, task }
    }

    pub(super) async fn greeting(&mut self) -> u16 {
        let mut g = [0u8; 18];
        self.io.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        u16::from_be_bytes([g[16], g[17]])
    }

    pub(super) async fn handshake(&mut self) {
        assert_eq!(self.greeting().await, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        self.io.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes()).await.unwrap();
    }

    pub(super) async fn option(&mut self, option: u32, data: &[u8]) {
        self.io.write_all(&encode_option_header(option, data.len() as u32)).await.unwrap();
        self.io.write_all(data).await.unwrap();
    }

    pub(super) async fn reply(&mut self) -> OptReply {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await.unwrap();
        OptReply {
            option: u32::from_be_bytes(h[8..12].try_into().unwrap()),
            kind: u32::from_be_bytes(h[12..16].try_into().unwrap()),
            data,
        }
    }

    /// Replies up to and including the final one (ACK or an error).
    pub(super) async fn replies(&mut self) -> Vec<OptReply> {
        let mut out = Vec::new();
        loop {
            let r = self.reply().await;
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    pub(super) async fn option_final(&mut self, option: u32, data: &[u8]) -> u32 {
        self.option(option, data).await;
        self.replies().await.last().unwrap().kind
    }

    /// GO to `name`; returns (size, transmission flags).
    pub(super) async fn go(&mut self, name: &str) -> (u64, u16) {
        self.option(OPT_GO, &encode_info_request(name, &[INFO_BLOCK_SIZE])).await;
        let replies = self.replies().await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "GO failed");
        let info = replies.iter().find(|r| r.kind == REP_INFO && r.data[0..2] == [0, 0]).unwrap();
        let size = u64::from_be_bytes(info.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub(super) async fn structured_go(&mut self, name: &str) -> u16 {
        self.handshake().await;
        assert_eq!(self.option_final(OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);
        let set =
            self.option_final(OPT_SET_META_CONTEXT, &encode_meta_context_request(name, &["base:allocation"])).await;
        assert_eq!(set, REP_ACK);
        self.go(name).await.1
    }

    pub(super) async fn simple_go(&mut self, name: &str) -> u16 {
        self.handshake().await;
        self.go(name).await.1
    }

    pub(super) async fn request(
        &mut self,
        command: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let h = RequestHeader { flags, command, handle, offset, length };
        self.io.write_all(&encode_request_header(&h)).await.unwrap();
        self.io.write_all(payload).await.unwrap();
    }

    /// (error, handle)
    pub(super) async fn simple_reply(&mut self) -> (u32, u64) {
        let mut r = [0u8; 16];
        self.io.read_exact(&mut r).await.unwrap();
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        (u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap()))
    }

    pub(super) async fn chunk(&mut self) -> Chunk {
        let mut r = [0u8; 20];
        self.io.read_exact(&mut r).await.unwrap();
        assert_eq!(u32::from_be_bytes(r[0..4].try_into().unwrap()), STRUCTURED_REPLY_MAGIC);
        let len = u32::from_be_bytes(r[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await.unwrap();
        Chunk {
            flags: u16::from_be_bytes(r[4..6].try_into().unwrap()),
            kind: u16::from_be_bytes(r[6..8].try_into().unwrap()),
            handle: u64::from_be_bytes(r[8..16].try_into().unwrap()),
            data,
        }
    }

    pub(super) async fn expect_closed(&mut self) {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut b)).await.expect("server did not close");
        assert!(matches!(n, Ok(0) | Err(_)), "expected EOF, got data");
    }
}

pub(super) fn error_of(chunk: &Chunk) -> u32 {
    assert_eq!(chunk.kind, REPLY_TYPE_ERROR);
    u32::from_be_bytes(chunk.data[0..4].try_into().unwrap())
}

/// A device whose writes wait until the test opens the gate (and then fail, if told to).
#[derive(Debug)]
pub(super) struct GatedDevice {
    pub(super) inner: MemDevice,
    pub(super) open: std::sync::Mutex<bool>,
    pub(super) opened: std::sync::Condvar,
    pub(super) writes_entered: std::sync::atomic::AtomicU64,
    /// What `writes_behind` says.
    pub(super) behind: bool,
    pub(super) fail_writes: std::sync::atomic::AtomicBool,
}

impl GatedDevice {
    pub(super) fn new(behind: bool) -> GatedDevice {
        GatedDevice {
            inner: MemDevice::new(SIZE),
            open: std::sync::Mutex::new(false),
            opened: std::sync::Condvar::new(),
            writes_entered: Default::default(),
            behind,
            fail_writes: Default::default(),
        }
    }

    pub(super) fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> crate::DeviceResult<()> {
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> crate::DeviceResult<()> {
        self.writes_entered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::DeviceError::Io("the test's device failed the write".into()));
        }
        self.inner.write(offset, data, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool) -> crate::DeviceResult<()> {
        self.inner.write_zeroes(offset, len, fua, no_hole)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> crate::DeviceResult<()> {
        self.inner.trim(offset, len, fua)
    }
    fn flush(&self) -> crate::DeviceResult<()> {
        self.inner.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> crate::DeviceResult<Vec<crate::Extent>> {
        self.inner.block_status(offset, len)
    }
    fn writes_behind(&self) -> bool {
        self.behind
    }
}
