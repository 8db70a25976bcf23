//! qemu's NBD client (qemu-img, qemu-io) against the real server, on TCP and a Unix socket.

mod common;

use std::process::Command;

use common::{assert_cmp, make_image, require_tool, run_ok, start_server};

const IMAGE: usize = 12 << 20;

/// `qemu-img convert` a raw image into the export and back out, then `cmp`.
fn convert_round_trip(unix: bool) {
    let qemu_img = require_tool("qemu-img");
    let (dir, server) = start_server(&["disk:16M"], &[]);
    let uri = if unix { server.unix_uri("disk") } else { server.uri("disk") };
    let src = dir.path().join("src.raw");
    make_image(&src, IMAGE, 1 + unix as u64);

    // In: -n (the export exists), the way operators import disks; qemu sends WRITE_ZEROES
    // for holes.
    run_ok(
        Command::new(&qemu_img).args(["convert", "-n", "-W", "-m", "8", "-f", "raw", "-O", "raw"]).arg(&src).arg(&uri),
    );

    // Out: the whole export; the first IMAGE bytes are the image, the rest zeroes.
    let out = dir.path().join("out.raw");
    run_ok(Command::new(&qemu_img).args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&out));
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 16 << 20);
    let mut expected = std::fs::read(&src).unwrap();
    expected.resize(16 << 20, 0);
    let expected_path = dir.path().join("expected.raw");
    std::fs::write(&expected_path, &expected).unwrap();
    assert_cmp(&out, &expected_path);
}

#[test]
fn qemu_img_convert_round_trip_tcp() {
    convert_round_trip(false);
}

#[test]
fn qemu_img_convert_round_trip_unix() {
    convert_round_trip(true);
}

/// The qemu-io script from NBD-NOTES.md, plus read-backs that verify each step.
#[test]
fn qemu_io_script() {
    let qemu_io = require_tool("qemu-io");
    let (_dir, server) = start_server(&["disk:8M"], &[]);
    for uri in [server.uri("disk"), server.unix_uri("disk")] {
        let out = run_ok(
            Command::new(&qemu_io).args(["-f", "raw", &uri]).args(
                [
                    "write -P 0xab 0 1M",
                    "read -P 0xab 0 1M",
                    "write -z 1M 1M",
                    "read -P 0 1M 1M",
                    "write -f -P 0xcd 2M 64k",
                    "read -P 0xcd 2M 64k",
                    "discard 4M 1M",
                    "read -P 0 4M 1M",
                    "flush",
                    "write -P 0x11 4095 3",
                    "read -P 0x11 4095 3",
                    "read -P 0xab 0 4095",
                    "aio_write -P 0x22 6M 64k",
                    "aio_write -P 0x33 7M 64k",
                    "aio_flush",
                    "read -P 0x22 6M 64k",
                    "read -P 0x33 7M 64k",
                ]
                .iter()
                .flat_map(|c| ["-c", c]),
            ),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        for bad in ["failed", "error", "Error", "mismatch"] {
            assert!(!stdout.contains(bad) && !stderr.contains(bad), "qemu-io reported {bad:?}:\n{stdout}\n{stderr}");
        }
        assert_eq!(stdout.matches("read ").count(), 8, "every read ran:\n{stdout}");
    }
}

/// Block status: `qemu-img map` shows zeroed and trimmed ranges as holes, data as data.
#[test]
fn qemu_img_map_shows_holes() {
    let qemu_io = require_tool("qemu-io");
    let qemu_img = require_tool("qemu-img");
    let (_dir, server) = start_server(&["disk:8M"], &[]);
    let uri = server.uri("disk");
    run_ok(Command::new(&qemu_io).args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0x5a 0 6M",
        "-c",
        "write -z 1M 1M",
        "-c",
        "discard 3M 1M",
        "-c",
        "write -z 5M 4k",
    ]));
    let out = run_ok(Command::new(&qemu_img).args(["map", "--output=json", "-f", "raw", &uri]));
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("qemu-img map JSON");

    // (start, length, data) runs, merged, must cover the disk exactly.
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    for e in &map {
        let (start, length) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        let data = e["data"].as_bool().unwrap();
        if !data {
            assert!(e["zero"].as_bool().unwrap(), "holes read as zero: {e}");
        }
        match runs.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == start => last.1 += length,
            _ => runs.push((start, length, data)),
        }
    }
    let mib = 1u64 << 20;
    assert_eq!(
        runs,
        vec![
            (0, mib, true),
            (mib, mib, false), // write -z
            (2 * mib, mib, true),
            (3 * mib, mib, false), // discard
            (4 * mib, mib, true),
            (5 * mib, 4096, false), // write -z of one block
            (5 * mib + 4096, mib - 4096, true),
            (6 * mib, 2 * mib, false), // never written
        ],
        "map: {map:?}"
    );
}
