//! Process lifecycle: SIGTERM/SIGINT drain in-flight work, answer new requests with
//! ESHUTDOWN, and exit cleanly; startup options.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use common::{start_server, RawClient, ServerOptions, ServerProcess, BIN};
use nbd_server::proto::consts::*;

#[test]
fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let (dir, mut server) = start_server(&["disk:16M"], &[]);
    let (mut busy, _) = RawClient::connect_tcp(&server.tcp, "disk");
    let mut negotiating = RawClient::tcp(&server.tcp);
    negotiating.handshake();

    // Pipeline 64 writes, then SIGTERM while they are in flight.
    let n = 64u64;
    let mut batch = Vec::new();
    for i in 0..n {
        let h = nbd_server::proto::RequestHeader {
            flags: 0,
            command: CMD_WRITE,
            handle: i,
            offset: i * 65536,
            length: 65536,
        };
        batch.extend_from_slice(&nbd_server::proto::transmission::encode_request_header(&h));
        batch.extend(std::iter::repeat_n(i as u8 + 1, 65536));
    }
    busy.io.write_all(&batch).unwrap();
    server.signal(libc::SIGTERM);

    // Every request is answered: done (0) or refused because of the shutdown (ESHUTDOWN).
    let mut done = Vec::new();
    for _ in 0..n {
        let (err, handle) = busy.simple_reply();
        assert!(err == 0 || err == 108, "unexpected error {err}");
        if err == 0 {
            done.push(handle);
        }
    }
    // New requests after the shutdown began get ESHUTDOWN; options get ERR_SHUTDOWN. The
    // writes may all finish before the server has even seen the signal: wait for it to say
    // so, then for the trigger that follows the log line.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !server.stderr().contains("shutting down") {
        assert!(std::time::Instant::now() < deadline, "no shutdown logged after SIGTERM\n{}", server.stderr());
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = loop {
        match busy.read(0, 512) {
            Ok(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            other => break other,
        }
    };
    assert_eq!(refused, Err(108));
    assert_eq!(negotiating.option_final(OPT_LIST, &[]), REP_ERR_SHUTDOWN);
    busy.disconnect();

    let status = server.wait_timeout(Duration::from_secs(10)).expect("server did not exit after SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", server.stderr());
    assert!(!server.unix.exists(), "unix socket file left behind");
    assert!(std::net::TcpStream::connect(&server.tcp).is_err(), "still accepting after exit");
    assert!(server.stderr().contains("export counters"), "stats logged at exit");

    // Acknowledged writes are on the store; refused ones never touched it.
    let store = dir.path().join("store");
    let server = ServerProcess::start(ServerOptions { store: &store, disks: &[], extra: &[] });
    let (mut c, _) = RawClient::connect_tcp(&server.tcp, "disk");
    for i in 0..n {
        let expected = if done.contains(&i) { i as u8 + 1 } else { 0 };
        assert_eq!(c.read(i * 65536, 65536).unwrap(), vec![expected; 65536], "block {i}");
    }
}

#[test]
fn sigint_with_idle_clients_exits_promptly() {
    let (_dir, mut server) = start_server(&["disk:1M"], &[]);
    // A transmission-phase client that never sends anything, and one stuck in negotiation.
    let (mut idle, _) = RawClient::connect_tcp(&server.tcp, "disk");
    let mut raw = std::net::TcpStream::connect(&server.tcp).unwrap();
    let mut greeting = [0u8; 18];
    raw.read_exact(&mut greeting).unwrap();
    server.signal(libc::SIGINT);
    let status = server.wait_timeout(Duration::from_secs(10)).expect("server did not exit after SIGINT");
    assert!(status.success());
    assert!(idle.is_closed());
}

#[test]
fn bad_command_lines_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let store = store.to_str().unwrap();
    for args in [
        vec!["--store", store, "--disk", "d:1000"],
        vec!["--store", store, "--disk", "nosize"],
        vec!["--store", store, "--tls-cert", "/nonexistent.pem"],
        vec!["--store", store, "--tls-required"],
        vec!["--store", store, "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.pem"],
        vec!["--store", store, "--listen", "not-an-address", "--disk", "d:1M"],
        vec!["--store", store, "--disk", "d:1M", "--default-export", "missing", "--listen", "127.0.0.1:0"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--store",
        "--listen",
        "--unix",
        "--disk",
        "--read-only",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--tls-required",
        "--block-size",
        "--max-in-flight",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}

#[test]
fn disks_persist_and_are_all_exported() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    {
        let server = ServerProcess::start(ServerOptions {
            store: &store,
            disks: &["a:1M", "b:2M"],
            extra: &["--block-size", "8192"],
        });
        let (mut c, size) = RawClient::connect_tcp(&server.tcp, "b");
        assert_eq!(size, 2 << 20);
        assert_eq!(c.write(0, b"persisted", true), 0);
        c.disconnect();
    }
    // Restart without --disk: both disks are still exported, data intact; a different
    // --disk size for an existing disk keeps the disk as it is.
    let server = ServerProcess::start(ServerOptions { store: &store, disks: &["b:4M"], extra: &[] });
    let (mut c, size) = RawClient::connect_tcp(&server.tcp, "b");
    assert_eq!(size, 2 << 20);
    assert_eq!(&c.read(0, 9).unwrap(), b"persisted");
    c.disconnect();
    let (_c, size) = RawClient::connect_tcp(&server.tcp, "a");
    assert_eq!(size, 1 << 20);
    // Preferred block size follows the store's block size.
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.option(OPT_INFO, &nbd_server::proto::handshake::encode_info_request("a", &[INFO_BLOCK_SIZE]));
    let mut preferred = None;
    loop {
        let r = c.reply();
        if r.kind == REP_INFO && r.data[0..2] == INFO_BLOCK_SIZE.to_be_bytes() {
            preferred = Some(u32::from_be_bytes(r.data[6..10].try_into().unwrap()));
        }
        if r.kind == REP_ACK {
            break;
        }
    }
    assert_eq!(preferred, Some(8192));
    // A second server on the same store is refused (the store is locked), cleanly.
    let out = Command::new(BIN).arg("--store").arg(&store).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
}
