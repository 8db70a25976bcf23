//! Malformed and hostile input over a raw socket: each gets the right NBD error or a clean
//! close, the server keeps serving other clients, and its memory stays bounded.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{start_server, RawClient, ServerProcess};
use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::{encode_info_request, encode_option_header};

const SIZE: u64 = 8 << 20;

fn server() -> (tempfile::TempDir, ServerProcess) {
    start_server(&["disk:8M"], &[])
}

/// A well-behaved client still gets correct service.
fn assert_serving(server: &ServerProcess) {
    let (mut c, size) = RawClient::connect_tcp(&server.tcp, "disk");
    assert_eq!(size, SIZE);
    assert_eq!(c.write(4096, &[0x42; 4096], false), 0);
    assert_eq!(c.read(4096, 4096).unwrap(), vec![0x42; 4096]);
    c.disconnect();
}

#[test]
fn bad_handshakes_are_closed() {
    let (_dir, server) = server();

    // Unknown client flags.
    let mut c = RawClient::tcp(&server.tcp);
    c.greeting();
    c.io.write_all(&0x0000_0100u32.to_be_bytes()).unwrap();
    assert!(c.is_closed());

    // Garbage instead of an option (bad IHAVEOPT magic).
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.io.write_all(b"\x01\x02\x03\x04\x05\x06\x07\x08garbage!garbage!").unwrap();
    assert!(c.is_closed());

    // Not NBD at all.
    let mut c = RawClient::tcp(&server.tcp);
    c.greeting();
    c.io.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    assert!(c.is_closed());

    // EXPORT_NAME of an unknown export: the spec says hang up.
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.option(OPT_EXPORT_NAME, b"no-such-disk");
    assert!(c.is_closed());

    // Connect and vanish at every stage.
    drop(RawClient::tcp(&server.tcp));
    let mut c = RawClient::tcp(&server.tcp);
    c.greeting();
    drop(c);
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.io.write_all(&encode_option_header(OPT_GO, 1000)).unwrap();
    drop(c);

    assert_serving(&server);
}

#[test]
fn unknown_and_oversized_options_get_errors() {
    let (_dir, server) = server();
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    assert_eq!(c.option_final(0x7777, b"some data"), REP_ERR_UNSUP);
    assert_eq!(c.option_final(OPT_EXTENDED_HEADERS, &[]), REP_ERR_UNSUP);
    assert_eq!(c.option_final(OPT_PEEK_EXPORT, &[]), REP_ERR_UNSUP);
    assert_eq!(c.option_final(OPT_STARTTLS, &[]), REP_ERR_UNSUP); // no TLS configured
    assert_eq!(c.option_final(OPT_LIST, b"unexpected"), REP_ERR_INVALID);
    assert_eq!(c.option_final(OPT_GO, &[0, 0, 0, 200, b'x']), REP_ERR_INVALID);
    assert_eq!(c.option_final(OPT_INFO, &encode_info_request("missing", &[])), REP_ERR_UNKNOWN);
    // 1 MiB of option data: drained, refused, and negotiation goes on.
    assert_eq!(c.option_final(OPT_GO, &vec![0xee; 1 << 20]), REP_ERR_TOO_BIG);
    let (size, _) = c.go("disk");
    assert_eq!(size, SIZE);
    assert_eq!(c.read(0, 512).unwrap(), vec![0; 512]);
    c.disconnect();

    // An option claiming 4 GiB, then the client vanishes: nothing is allocated for it.
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.io.write_all(&encode_option_header(OPT_GO, u32::MAX)).unwrap();
    c.io.write_all(&[0u8; 4096]).unwrap();
    drop(c);
    // An export name over the limit: no way to report an error, so a close.
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.io.write_all(&encode_option_header(OPT_EXPORT_NAME, u32::MAX)).unwrap();
    assert!(c.is_closed());

    assert_serving(&server);
}

#[test]
fn bad_requests_get_the_right_errors() {
    let (_dir, server) = server();
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");

    assert_eq!(c.command(0x55, 0, 0, 0), 22, "unknown command");
    assert_eq!(c.command(CMD_READ, 1 << 12, 0, 512), 22, "unknown flag");
    assert_eq!(c.command(CMD_FLUSH, CMD_FLAG_REQ_ONE, 0, 0), 22, "flag of another command");
    assert_eq!(c.command(CMD_BLOCK_STATUS, 0, 0, 512), 22, "block status without a context");
    assert_eq!(c.read(SIZE - 512, 1024), Err(22), "read past the end");
    assert_eq!(c.read(u64::MAX - 100, 512), Err(22), "read with offset overflow");
    assert_eq!(c.write(SIZE - 512, &[1; 1024], false), 28, "write past the end");
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, SIZE, 512), 28, "zero past the end");
    assert_eq!(c.command(CMD_TRIM, 0, SIZE - 4096, 8192), 22, "trim past the end");
    assert_eq!(c.command(CMD_CACHE, 0, SIZE, 1), 22, "cache past the end");
    assert_eq!(c.read(0, u32::MAX), Err(22), "4 GiB read");
    assert_eq!(c.read(0, (32 << 20) + 1), Err(22), "read over 32 MiB");

    // A write over the size limit: refused, its payload drained, the stream stays in sync.
    let big = (32 << 20) + 4096;
    c.request(CMD_WRITE, 0, 9, 0, big);
    c.io.write_all(&vec![0xab; big as usize]).unwrap();
    assert_eq!(c.simple_reply(), (22, 9));

    // Large TRIM and WRITE_ZEROES are served (no payload: no reason to refuse).
    assert_eq!(c.command(CMD_WRITE_ZEROES, 0, 0, SIZE as u32), 0);
    assert_eq!(c.command(CMD_TRIM, CMD_FLAG_FUA, 0, SIZE as u32), 0);
    // Zero-length requests are harmless.
    assert_eq!(c.read(SIZE, 0), Ok(vec![]));
    assert_eq!(c.write(0, &[], false), 0);

    // After all of that the connection works.
    assert_eq!(c.write(0, &[7; 4096], true), 0);
    assert_eq!(c.read(0, 4096).unwrap(), vec![7; 4096]);
    c.disconnect();

    // Garbage after a request: bad request magic ends the connection.
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    c.io.write_all(&[0x99; 28]).unwrap();
    assert!(c.is_closed());

    assert_serving(&server);
}

#[test]
fn clients_vanishing_mid_request() {
    let (_dir, server) = server();
    // Mid-header.
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    c.io.write_all(&[0x25, 0x60, 0x95]).unwrap();
    drop(c);
    // Mid-payload of a 1 MiB write: nothing of it may land on the disk.
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    c.request(CMD_WRITE, 0, 1, 0, 1 << 20);
    c.io.write_all(&[0xee; 100_000]).unwrap();
    drop(c);
    // A 4 GiB write header and a few bytes.
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX);
    c.io.write_all(&[0xee; 1000]).unwrap();
    drop(c);
    // With reads in flight whose replies are never read.
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    for i in 0..64 {
        c.request(CMD_READ, 0, i, 0, 1 << 20);
    }
    drop(c);

    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    assert_eq!(c.read(0, 100_000).unwrap(), vec![0; 100_000], "partial write reached the disk");
    c.disconnect();
    assert_serving(&server);
}

/// Many clients announcing 32 MiB writes and stalling: memory stays bounded (payload
/// memory is only touched as data arrives) and other clients are served meanwhile.
#[test]
fn memory_stays_bounded_under_stalled_clients() {
    let (_dir, server) = server();
    std::thread::sleep(Duration::from_millis(200));
    let before = server.rss_kib();
    let mut stalled = Vec::new();
    for _ in 0..16 {
        let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
        c.request(CMD_WRITE, 0, 1, 0, 32 << 20);
        c.io.write_all(&[0x11; 65536]).unwrap();
        stalled.push(c);
    }
    // Idle, never-negotiating connections too.
    let idle: Vec<_> = (0..50).map(|_| RawClient::tcp(&server.tcp)).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_serving(&server);
    let during = server.rss_kib();
    assert!(during < before + 96 * 1024, "RSS grew from {before} KiB to {during} KiB");
    drop(stalled);
    drop(idle);
    assert_serving(&server);
}

/// Many connections at once, each doing verified I/O on its own range.
#[test]
fn many_concurrent_clients() {
    let (_dir, server) = server();
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let addr = server.tcp.clone();
            std::thread::spawn(move || {
                let (mut c, _) = RawClient::connect_tcp(&addr, "disk");
                let base = t * (SIZE / 16);
                for i in 0..32u64 {
                    let data = vec![(t * 32 + i) as u8; 8192];
                    assert_eq!(c.write(base + i * 8192, &data, i % 8 == 0), 0);
                }
                assert_eq!(c.flush(), 0);
                for i in 0..32u64 {
                    assert_eq!(c.read(base + i * 8192, 8192).unwrap(), vec![(t * 32 + i) as u8; 8192]);
                }
                c.disconnect();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}
