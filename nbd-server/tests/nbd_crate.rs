//! The `nbd` crate's synchronous client: NBD_OPT_EXPORT_NAME, simple replies and the
//! 124 zero bytes, the path the kernel client takes.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use common::{start_server, Rng};
use nbd::client::{handshake, NbdClient, NbdExt};

fn exercise<S: Read + Write>(mut stream: S, seed: u64) {
    let export = handshake(&mut stream, b"disk").expect("EXPORT_NAME handshake");
    assert_eq!(export.size, 8 << 20);
    assert!(!export.readonly);
    assert!(export.send_flush && export.send_trim);
    let mut client = NbdClient::new(stream, &export);

    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; 1 << 20];
    rng.fill(&mut data);
    client.seek(SeekFrom::Start(3 << 20)).unwrap();
    client.write_all(&data).unwrap();
    client.flush().unwrap();

    let mut back = vec![0u8; 1 << 20];
    client.seek(SeekFrom::Start(3 << 20)).unwrap();
    client.read_exact(&mut back).unwrap();
    assert!(back == data, "read back differs");

    // Trim reads back as zeroes in this store.
    client.seek(SeekFrom::Start(3 << 20)).unwrap();
    client.trim(65536).unwrap();
    client.seek(SeekFrom::Start(3 << 20)).unwrap();
    let mut zeroes = vec![1u8; 65536];
    client.read_exact(&mut zeroes).unwrap();
    assert!(zeroes.iter().all(|&b| b == 0));

    // Reading to the end stops at the export size.
    client.seek(SeekFrom::End(-4096)).unwrap();
    let mut tail = Vec::new();
    client.read_to_end(&mut tail).unwrap();
    assert_eq!(tail.len(), 4096);
}

#[test]
fn nbd_crate_client_over_tcp() {
    let (_dir, server) = start_server(&["disk:8M"], &[]);
    exercise(TcpStream::connect(&server.tcp).unwrap(), 1);
}

#[test]
fn nbd_crate_client_over_unix_socket() {
    let (_dir, server) = start_server(&["disk:8M"], &[]);
    exercise(UnixStream::connect(&server.unix).unwrap(), 2);
}

#[test]
fn nbd_crate_unknown_export_is_a_hard_disconnect() {
    let (_dir, server) = start_server(&["disk:8M"], &[]);
    let mut stream = TcpStream::connect(&server.tcp).unwrap();
    assert!(handshake(&mut stream, b"nope").is_err());
    // The server is fine.
    exercise(TcpStream::connect(&server.tcp).unwrap(), 3);
}
