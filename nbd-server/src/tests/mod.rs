//! In-process tests of negotiation and transmission: a raw client over `tokio::io::duplex`
//! against [`Server::serve_stream`] with in-memory devices.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proto::consts::*;
use crate::proto::handshake::{encode_info_request, encode_meta_context_request, encode_option_header};
use crate::proto::transmission::encode_request_header;
use crate::proto::RequestHeader;
use crate::{BlockDevice, Export, MemDevice, ServerConfig};

mod support;

use support::*;

// ---- Negotiation --------------------------------------------------------------------------

#[tokio::test]
async fn list_info_and_unknown_options() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.handshake().await;

    c.option(OPT_LIST, &[]).await;
    let replies = c.replies().await;
    let names: Vec<_> = replies
        .iter()
        .filter(|r| r.kind == REP_SERVER)
        .map(|r| String::from_utf8(r.data[4..8.min(r.data.len())].to_vec()).unwrap())
        .collect();
    assert_eq!(replies.len(), 3);
    assert!(names.contains(&"disk".to_owned()));
    assert_eq!(c.option_final(OPT_LIST, b"x").await, REP_ERR_INVALID);

    c.option(OPT_INFO, &encode_info_request("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE])).await;
    let replies = c.replies().await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    assert!(replies.iter().all(|r| r.option == OPT_INFO));
    let info_types: Vec<u16> =
        replies.iter().filter(|r| r.kind == REP_INFO).map(|r| u16::from_be_bytes([r.data[0], r.data[1]])).collect();
    assert_eq!(info_types, vec![INFO_EXPORT, INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]);
    let bs = replies.iter().find(|r| r.kind == REP_INFO && r.data[1] == 3).unwrap();
    assert_eq!(&bs.data[2..6], &1u32.to_be_bytes());
    assert_eq!(&bs.data[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs.data[10..14], &MAX_PAYLOAD_LEN.to_be_bytes());

    assert_eq!(c.option_final(OPT_INFO, &encode_info_request("nope", &[])).await, REP_ERR_UNKNOWN);
    assert_eq!(c.option_final(OPT_INFO, &[0, 0, 0, 9, b'x']).await, REP_ERR_INVALID);
    assert_eq!(c.option_final(OPT_EXTENDED_HEADERS, &[]).await, REP_ERR_UNSUP);
    assert_eq!(c.option_final(0xdead_beef, b"whatever").await, REP_ERR_UNSUP);
    assert_eq!(c.option_final(OPT_STARTTLS, &[]).await, REP_ERR_UNSUP);
    // Meta contexts need structured replies first.
    assert_eq!(
        c.option_final(OPT_SET_META_CONTEXT, &encode_meta_context_request("disk", &["base:allocation"])).await,
        REP_ERR_INVALID
    );
    // Over-long option data is drained and refused; negotiation goes on.
    assert_eq!(c.option_final(OPT_GO, &vec![0u8; MAX_OPTION_DATA_LEN as usize + 1]).await, REP_ERR_TOO_BIG);

    // The default export, through the empty name.
    let (size, flags) = c.go("").await;
    assert_eq!(size, SIZE);
    assert_ne!(flags & TFLAG_HAS_FLAGS, 0);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & TFLAG_SEND_FLUSH, 0);
    assert_ne!(flags & TFLAG_SEND_FUA, 0);
    assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);
    assert_ne!(flags & TFLAG_SEND_FAST_ZERO, 0);
    assert_eq!(flags & (TFLAG_READ_ONLY | TFLAG_SEND_DF), 0);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]).await;
    c.expect_closed().await;
}

#[tokio::test]
async fn meta_context_negotiation() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.handshake().await;
    assert_eq!(c.option_final(OPT_STRUCTURED_REPLY, b"x").await, REP_ERR_INVALID);
    assert_eq!(c.option_final(OPT_STRUCTURED_REPLY, &[]).await, REP_ACK);

    c.option(OPT_LIST_META_CONTEXT, &encode_meta_context_request("disk", &[])).await;
    let r = c.replies().await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(&r[0].data[4..], b"base:allocation");

    c.option(OPT_LIST_META_CONTEXT, &encode_meta_context_request("disk", &["base:", "qemu:dirty-bitmap:x"])).await;
    let r = c.replies().await;
    assert_eq!(r.len(), 2);

    c.option(OPT_LIST_META_CONTEXT, &encode_meta_context_request("disk", &["other:thing"])).await;
    let r = c.replies().await;
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, REP_ACK);

    assert_eq!(
        c.option_final(OPT_SET_META_CONTEXT, &encode_meta_context_request("nope", &["base:allocation"])).await,
        REP_ERR_UNKNOWN
    );
    assert_eq!(c.option_final(OPT_SET_META_CONTEXT, &[1, 2, 3]).await, REP_ERR_INVALID);

    c.option(OPT_SET_META_CONTEXT, &encode_meta_context_request("disk", &["base:allocation"])).await;
    let r = c.replies().await;
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    let id = u32::from_be_bytes(r[0].data[0..4].try_into().unwrap());
    assert_ne!(id, 0);
    let flags = c.go("disk").await.1;
    assert_ne!(flags & TFLAG_SEND_DF, 0);

    c.request(CMD_BLOCK_STATUS, 0, 5, 0, 8192, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!(chunk.kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(chunk.flags, REPLY_FLAG_DONE);
    assert_eq!(u32::from_be_bytes(chunk.data[0..4].try_into().unwrap()), id);
}

#[tokio::test]
async fn export_name_path_with_and_without_zeroes() {
    let f = fixture();
    for no_zeroes in [true, false] {
        let mut c = Client::connect(&f.server);
        c.greeting().await;
        let flags = CLIENT_FLAG_FIXED_NEWSTYLE | if no_zeroes { CLIENT_FLAG_NO_ZEROES } else { 0 };
        c.io.write_all(&flags.to_be_bytes()).await.unwrap();
        c.option(OPT_EXPORT_NAME, b"disk").await;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        c.io.read_exact(&mut reply).await.unwrap();
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), SIZE);
        assert!(reply[10..].iter().all(|&b| b == 0));
        // Works: a write and a read with simple replies.
        c.request(CMD_WRITE, 0, 7, 0, 4, b"abcd").await;
        assert_eq!(c.simple_reply().await, (0, 7));
        c.request(CMD_READ, 0, 8, 0, 4, &[]).await;
        assert_eq!(c.simple_reply().await, (0, 8));
        let mut data = [0u8; 4];
        c.io.read_exact(&mut data).await.unwrap();
        assert_eq!(&data, b"abcd");
    }
    // Unknown export on EXPORT_NAME: the server must hang up.
    let mut c = Client::connect(&f.server);
    c.handshake().await;
    c.option(OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
}

#[tokio::test]
async fn malformed_handshakes_close_the_connection() {
    let f = fixture();
    // Unknown client flags.
    let mut c = Client::connect(&f.server);
    c.greeting().await;
    c.io.write_all(&0x8000_0001u32.to_be_bytes()).await.unwrap();
    c.expect_closed().await;
    // Garbage instead of IHAVEOPT.
    let mut c = Client::connect(&f.server);
    c.handshake().await;
    c.io.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    c.expect_closed().await;
    // ABORT is acknowledged, then the connection closes.
    let mut c = Client::connect(&f.server);
    c.handshake().await;
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.reply().await.kind, REP_ACK);
    c.expect_closed().await;
    // Client vanishing mid-option.
    let mut c = Client::connect(&f.server);
    c.handshake().await;
    c.io.write_all(&encode_option_header(OPT_GO, 100)).await.unwrap();
    c.io.write_all(&[0u8; 10]).await.unwrap();
    drop(c.io);
    tokio::time::timeout(Duration::from_secs(5), c.task).await.unwrap().unwrap();
    assert_eq!(f.server.connections(), 0);
}

#[tokio::test]
async fn handshake_timeout() {
    let f = fixture_with(ServerConfig { handshake_timeout: Duration::from_millis(100), ..ServerConfig::default() });
    let mut c = Client::connect(&f.server);
    c.greeting().await;
    c.expect_closed().await;
}

// ---- Transmission -------------------------------------------------------------------------

#[tokio::test]
async fn simple_reply_commands_and_errors() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;

    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192, &data).await;
    assert_eq!(c.simple_reply().await, (0, 1));
    c.request(CMD_READ, 0, 2, 4096, 8192, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 2));
    let mut back = vec![0u8; 8192];
    c.io.read_exact(&mut back).await.unwrap();
    assert_eq!(back, data);

    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 3));
    assert_eq!(f.device.flush_count(), 1);

    // Past the end: EINVAL for reads (and no data follows), ENOSPC for writes (payload
    // consumed), EINVAL for trims.
    c.request(CMD_READ, 0, 4, SIZE - 512, 1024, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 4));
    c.request(CMD_WRITE, 0, 5, SIZE - 512, 1024, &[9u8; 1024]).await;
    assert_eq!(c.simple_reply().await, (28, 5));
    c.request(CMD_WRITE_ZEROES, 0, 6, SIZE, 1, &[]).await;
    assert_eq!(c.simple_reply().await, (28, 6));
    c.request(CMD_TRIM, 0, 7, u64::MAX - 10, 100, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 7));
    // Unknown command and flags, DF without structured replies, block status without
    // a context, oversized read.
    c.request(42, 0, 8, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 8));
    c.request(CMD_READ, 0x100, 9, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 9));
    c.request(CMD_READ, CMD_FLAG_DF, 10, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 10));
    c.request(CMD_BLOCK_STATUS, 0, 11, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 11));
    c.request(CMD_READ, 0, 12, 0, u32::MAX, &[]).await;
    assert_eq!(c.simple_reply().await, (22, 12));
    // FAST_ZERO is supported by the memory device: the zeroing happens.
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE, 13, 4096, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 13));
    c.request(CMD_CACHE, 0, 14, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 14));
    c.request(CMD_TRIM, CMD_FLAG_FUA, 15, 8192, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 15));

    // The connection still works after all that.
    c.request(CMD_READ, 0, 16, 4096, 8192, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 16));
    c.io.read_exact(&mut back).await.unwrap();
    assert!(back.iter().all(|&b| b == 0));

    let stats = f.export.stats().snapshot();
    assert_eq!(stats.write.requests, 1);
    assert_eq!(stats.write.bytes, 8192);
    assert_eq!(stats.read.requests, 2);
    assert_eq!(stats.rejected, 9);
    assert_eq!(stats.connections_active, 1);
    c.request(CMD_DISC, 0, 99, 0, 0, &[]).await;
    c.expect_closed().await;
    c.task.await.unwrap();
    assert_eq!(f.export.stats().snapshot().connections_active, 0);
}

#[tokio::test]
async fn structured_reads_holes_errors_and_block_status() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.structured_go("disk").await;

    c.request(CMD_WRITE, 0, 1, 8192, 4096, &[0xab; 4096]).await;
    assert_eq!(c.simple_reply().await, (0, 1));

    c.request(CMD_READ, CMD_FLAG_DF, 2, 8192, 4096, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!((chunk.kind, chunk.flags, chunk.handle), (REPLY_TYPE_OFFSET_DATA, REPLY_FLAG_DONE, 2));
    assert_eq!(&chunk.data[0..8], &8192u64.to_be_bytes());
    assert!(chunk.data[8..].iter().all(|&b| b == 0xab));
    assert_eq!(chunk.data.len(), 8 + 4096);

    // An all-zero range comes back as a hole chunk.
    c.request(CMD_READ, 0, 3, 0, 8192, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!((chunk.kind, chunk.flags), (REPLY_TYPE_OFFSET_HOLE, REPLY_FLAG_DONE));
    assert_eq!(&chunk.data[0..8], &0u64.to_be_bytes());
    assert_eq!(&chunk.data[8..12], &8192u32.to_be_bytes());

    // Errors are error chunks with a message, READ included.
    c.request(CMD_READ, 0, 4, SIZE, 1, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!(error_of(&chunk), 22);
    assert_eq!(chunk.flags, REPLY_FLAG_DONE);
    let msg_len = u16::from_be_bytes([chunk.data[4], chunk.data[5]]) as usize;
    assert!(std::str::from_utf8(&chunk.data[6..6 + msg_len]).unwrap().contains("past the end"));

    // Device errors: EIO in an error chunk, and the connection goes on.
    f.device.set_fail_reads(true);
    c.request(CMD_READ, 0, 5, 0, 512, &[]).await;
    assert_eq!(error_of(&c.chunk().await), 5);
    f.device.set_fail_reads(false);

    // Block status: data then hole, merged, with REQ_ONE limiting to one extent.
    c.request(CMD_BLOCK_STATUS, 0, 6, 0, 65536, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!(chunk.kind, REPLY_TYPE_BLOCK_STATUS);
    let descriptors: Vec<(u32, u32)> = chunk.data[4..]
        .chunks(8)
        .map(|d| (u32::from_be_bytes(d[0..4].try_into().unwrap()), u32::from_be_bytes(d[4..8].try_into().unwrap())))
        .collect();
    assert_eq!(descriptors, vec![(8192, 3), (4096, 0), (65536 - 12288, 3)]);
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 7, 8192, 65536, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!(chunk.data.len(), 4 + 8);
    assert_eq!(&chunk.data[4..12], &[0, 0, 0x10, 0, 0, 0, 0, 0]);
    c.request(CMD_BLOCK_STATUS, 0, 8, SIZE - 512, 1024, &[]).await;
    assert_eq!(error_of(&c.chunk().await), 22);

    // A zero-length read is a lone NONE chunk.
    c.request(CMD_READ, 0, 9, 0, 0, &[]).await;
    let chunk = c.chunk().await;
    assert_eq!((chunk.kind, chunk.flags, chunk.data.len()), (REPLY_TYPE_NONE, REPLY_FLAG_DONE, 0));
}

#[tokio::test]
async fn simple_read_error_sends_no_data() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;
    f.device.set_fail_reads(true);
    c.request(CMD_READ, 0, 1, 0, 4096, &[]).await;
    assert_eq!(c.simple_reply().await, (5, 1));
    f.device.set_fail_reads(false);
    // The next reply follows directly: no stray data was sent.
    c.request(CMD_FLUSH, 0, 2, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 2));
}

#[tokio::test]
async fn read_only_frozen_and_closed_exports() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    let flags = c.simple_go("ro").await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & TFLAG_SEND_TRIM, 0);
    c.request(CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]).await;
    assert_eq!(c.simple_reply().await, (1, 1));
    c.request(CMD_TRIM, 0, 2, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (1, 2));
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 3));

    // Switching a writable export to read-only affects open connections.
    let mut w = Client::connect(&f.server);
    w.simple_go("disk").await;
    f.export.set_read_only(true);
    w.request(CMD_WRITE, 0, 1, 0, 512, &[1u8; 512]).await;
    assert_eq!(w.simple_reply().await, (1, 1));
    f.export.set_read_only(false);

    // Frozen: reads work, writes are held (not refused) until the export thaws.
    f.export.freeze().await;
    w.request(CMD_READ, 0, 2, 0, 512, &[]).await;
    assert_eq!(w.simple_reply().await, (0, 2));
    let mut buf = [0u8; 512];
    w.io.read_exact(&mut buf).await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    w.request(CMD_WRITE, 0, 3, 0, 512, &[1u8; 512]).await;
    let held = tokio::time::timeout(std::time::Duration::from_millis(200), w.simple_reply()).await;
    assert!(held.is_err(), "a write to a frozen export is held, not answered: {held:?}");
    f.export.thaw();
    assert_eq!(w.simple_reply().await, (0, 3));
    w.request(CMD_WRITE_ZEROES, 0, 4, 0, 512, &[]).await;
    assert_eq!(w.simple_reply().await, (0, 4));

    // Moved (a migration switched over): a held write is told the disk moved (ESHUTDOWN), so
    // are reads; FLUSH still succeeds (a hypervisor completing its migration flushes).
    f.export.freeze().await;
    w.request(CMD_WRITE, 0, 5, 0, 512, &[1u8; 512]).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    f.export.mark_moved();
    assert_eq!(w.simple_reply().await, (108, 5));
    w.request(CMD_READ, 0, 6, 0, 512, &[]).await;
    assert_eq!(w.simple_reply().await, (108, 6));
    w.request(CMD_FLUSH, 0, 7, 0, 0, &[]).await;
    assert_eq!(w.simple_reply().await, (0, 7));

    // Closed: ESHUTDOWN, and new clients no longer see it.
    f.export.close();
    w.request(CMD_READ, 0, 8, 0, 512, &[]).await;
    assert_eq!(w.simple_reply().await, (108, 8));
    let mut n = Client::connect(&f.server);
    n.handshake().await;
    assert_eq!(n.option_final(OPT_GO, &encode_info_request("disk", &[])).await, REP_ERR_UNKNOWN);
}

#[tokio::test]
async fn pipelined_requests_all_answered() {
    let f = fixture_with(ServerConfig { max_in_flight_per_connection: 4, ..ServerConfig::default() });
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;
    let (mut rd, mut wr) = tokio::io::split(c.io);
    // More requests than slots, written without waiting for replies.
    let writer = tokio::spawn(async move {
        for i in 0..200u64 {
            let h = RequestHeader { flags: 0, command: CMD_WRITE, handle: i, offset: i * 4096, length: 4096 };
            wr.write_all(&encode_request_header(&h)).await.unwrap();
            wr.write_all(&[i as u8; 4096]).await.unwrap();
        }
        wr
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let mut r = [0u8; 16];
        rd.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[4..8], &[0, 0, 0, 0]);
        assert!(seen.insert(u64::from_be_bytes(r[8..16].try_into().unwrap())));
    }
    assert_eq!(seen.len(), 200);
    let _wr = writer.await.unwrap();
    let mut buf = vec![0u8; 4096];
    f.device.read(199 * 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 199));
}

#[tokio::test]
async fn disc_finishes_in_flight_requests() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;
    for i in 0..16u64 {
        c.request(CMD_WRITE, 0, i, i * 65536, 65536, &vec![0x5a; 65536]).await;
    }
    c.request(CMD_DISC, 0, 100, 0, 0, &[]).await;
    for _ in 0..16 {
        assert_eq!(c.simple_reply().await.0, 0);
    }
    c.expect_closed().await;
    let mut buf = vec![0u8; 65536];
    f.device.read(15 * 65536, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x5a));
}

#[tokio::test]
async fn vanished_client_mid_write_is_cleaned_up() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;
    c.request(CMD_WRITE, 0, 1, 0, 1 << 20, &[7u8; 1000]).await;
    drop(c.io);
    tokio::time::timeout(Duration::from_secs(5), c.task).await.unwrap().unwrap();
    // Nothing of the partial write reached the device.
    let mut buf = vec![1u8; 1000];
    f.device.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(f.export.stats().snapshot().connections_active, 0);
}

#[tokio::test]
async fn bad_request_magic_closes() {
    let f = fixture();
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;
    c.io.write_all(&[0xffu8; 28]).await.unwrap();
    c.expect_closed().await;
}

#[tokio::test]
async fn shutdown_refuses_new_requests_then_closes() {
    let f = fixture_with(ServerConfig { shutdown_grace: Duration::from_millis(200), ..ServerConfig::default() });
    let mut c = Client::connect(&f.server);
    c.simple_go("disk").await;
    let mut n = Client::connect(&f.server);
    n.handshake().await;

    f.server.shutdown_handle().shutdown();
    c.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    assert_eq!(c.simple_reply().await, (108, 1));
    c.request(CMD_WRITE, 0, 2, 0, 512, &[0u8; 512]).await;
    assert_eq!(c.simple_reply().await, (108, 2));
    assert_eq!(n.option_final(OPT_LIST, &[]).await, REP_ERR_SHUTDOWN);
    c.expect_closed().await;
    n.expect_closed().await;
}

#[tokio::test]
async fn big_payloads_and_limits() {
    let f = fixture_with(ServerConfig { max_buffered_bytes_per_connection: 1, ..ServerConfig::default() });
    let registry = f.server.registry().clone();
    registry.insert(Arc::new(Export::new("big", Arc::new(MemDevice::new(64 << 20)))));
    let mut c = Client::connect(&f.server);
    c.simple_go("big").await;
    // 32 MiB write and read are served even with a tiny configured budget (it is raised).
    let data = vec![0x42u8; MAX_PAYLOAD_LEN as usize];
    c.request(CMD_WRITE, 0, 1, 0, MAX_PAYLOAD_LEN, &data).await;
    assert_eq!(c.simple_reply().await, (0, 1));
    c.request(CMD_READ, 0, 2, 0, MAX_PAYLOAD_LEN, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 2));
    let mut back = vec![0u8; MAX_PAYLOAD_LEN as usize];
    c.io.read_exact(&mut back).await.unwrap();
    assert!(back == data);
    // Over the limit: refused; a write's payload is drained so the stream stays in sync.
    let over = MAX_PAYLOAD_LEN + 1;
    c.request(CMD_WRITE, 0, 3, 0, over, &vec![0u8; over as usize]).await;
    assert_eq!(c.simple_reply().await, (22, 3));
    // Huge TRIM and WRITE_ZEROES are served.
    c.request(CMD_WRITE_ZEROES, 0, 4, 0, 64 << 20, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 4));
    c.request(CMD_TRIM, 0, 5, 0, 64 << 20, &[]).await;
    assert_eq!(c.simple_reply().await, (0, 5));
}

/// A client loses its connection while a write is stuck in the device, then reconnects:
/// the new connection enters transmission only after the stale write is done, so the stale
/// write cannot overwrite what the new connection writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_waits_for_writes_of_a_lost_connection() {
    let f = fixture();
    let device = Arc::new(GatedDevice::new(false));
    let export = Arc::new(Export::new("gated", device.clone() as Arc<dyn BlockDevice>));
    f.server.registry().insert(export.clone());

    let mut old = Client::connect(&f.server);
    old.simple_go("gated").await;
    old.request(CMD_WRITE, 0, 1, 0, 4096, &[0xaa; 4096]).await;
    while device.writes_entered.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(old.io); // the client vanishes, its write still stuck in the device
    for _ in 0..500 {
        if export.orphaned_writes() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(export.orphaned_writes(), 1);

    let mut new = Client::connect(&f.server);
    new.handshake().await;
    new.option(OPT_GO, &encode_info_request("gated", &[])).await;
    // No answer while the stale write runs.
    assert!(tokio::time::timeout(Duration::from_millis(300), new.reply()).await.is_err());
    device.release();
    let replies = new.replies().await;
    assert_eq!(replies.last().unwrap().kind, REP_ACK);
    assert_eq!(export.orphaned_writes(), 0);
    new.request(CMD_WRITE, 0, 2, 0, 4096, &[0xbb; 4096]).await;
    assert_eq!(new.simple_reply().await, (0, 2));
    let mut buf = vec![0u8; 4096];
    device.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xbb));
}

#[cfg(feature = "cas")]
mod grouped_writes;
mod write_behind;
