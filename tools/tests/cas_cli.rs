//! The `cas` command, run as an operator would, on synthetic images.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn cas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cas")).args(args).output().expect("run cas")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "cas failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr {err:?} should mention {needle:?}");
}

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Three images that share content at different granularities: `b` shares whole 4 KiB
/// blocks with `a`; `c` shares 512-byte pieces of `a` placed at other 512-byte offsets, so
/// its similarity to `a` is high at 512 bytes and low at 4 KiB.
fn make_images(dir: &Path) -> Vec<PathBuf> {
    let a = noise(1, 4 << 20);
    let mut b = a.clone();
    b[(1 << 20)..(2 << 20)].copy_from_slice(&noise(2, 1 << 20));
    b.extend(vec![0u8; 1 << 20]); // a zero tail
    let mut c = noise(3, 2 << 20);
    for i in 0..1024usize {
        let src = (i * 7 % 8192) * 512;
        let dst = (i * 2 + 1) * 512;
        c[dst..dst + 512].copy_from_slice(&a[src..src + 512]);
    }
    [("a.raw", a), ("b.raw", b), ("c.raw", c)]
        .into_iter()
        .map(|(n, d)| {
            let p = dir.join(n);
            std::fs::write(&p, d).unwrap();
            p
        })
        .collect()
}

#[test]
fn similarity_matches_an_independent_computation() {
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path());
    let paths: Vec<&str> = images.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["similarity", "--json"];
    args.extend(&paths);
    let ours: serde_json::Value = serde_json::from_str(&ok(&cas(&args))).unwrap();
    // The runner's package directory before the compiled-in one (see common::tools_dir).
    let tools = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let script = tools.join("../test-images/similarity.py");
    let out = Command::new("python3").arg(&script).arg("--quiet").args(&paths).output().expect("python3");
    assert!(out.status.success(), "similarity.py: {}", String::from_utf8_lossy(&out.stderr));
    let theirs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut compared = 0;
    for cell in ours["pairs"].as_array().unwrap() {
        let (a, b, bs) = (cell["a"].as_str().unwrap(), cell["b"].as_str().unwrap(), cell["block_size"].as_u64().unwrap());
        let other = theirs["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["a"] == a && p["b"] == b && p["block_size"].as_u64() == Some(bs))
            .unwrap_or_else(|| panic!("reference has no cell {a} {b} {bs}"));
        let (x, y) = (cell["share"].as_f64().unwrap(), other["share"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-12, "{a}->{b} at {bs}: ours {x}, reference {y}");
        assert_eq!(cell["b_nonzero_blocks"], other["b_nonzero_blocks"]);
        compared += 1;
    }
    assert_eq!(compared, 3 * 2 * 4);
    // The images were built so that block size matters.
    let share = |a: &str, b: &str, bs: u64| {
        ours["pairs"].as_array().unwrap().iter().find(|p| p["a"] == a && p["b"] == b && p["block_size"] == bs).unwrap()["share"].as_f64().unwrap()
    };
    assert!((share("a", "b", 4096) - 0.75).abs() < 1e-9, "b is 3/4 a");
    assert!((share("a", "c", 512) - 0.25).abs() < 0.01 && share("a", "c", 4096) < 0.01, "a quarter of c is 512-byte pieces of a");
    // A readable table too.
    let mut args = vec!["similarity"];
    args.extend(&paths);
    let table = ok(&cas(&args));
    assert!(table.contains("block size 512") && table.contains("75.0%"), "{table}");
}

#[test]
fn import_export_round_trip_raw_and_qcow2() {
    let dir = tempfile::tempdir().unwrap();
    let images = make_images(dir.path());
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    let qcow = dir.path().join("b.qcow2");
    let st = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&images[1]).arg(&qcow).status().expect("qemu-img (qemu-utils)");
    assert!(st.success());
    ok(&cas(&["import", "a", images[0].to_str().unwrap(), "--store", s]));
    let out = ok(&cas(&["import", "b", qcow.to_str().unwrap(), "--store", s, "--json"]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "qcow2");
    assert_eq!(v["shared_bytes"], 3 << 20, "three MiB of b are a's blocks");
    let exported = dir.path().join("b.out");
    ok(&cas(&["export", "b", exported.to_str().unwrap(), "--store", s]));
    assert_eq!(std::fs::read(&exported).unwrap(), std::fs::read(&images[1]).unwrap(), "byte-exact");
    let ls: serde_json::Value = serde_json::from_str(&ok(&cas(&["ls", "--store", s, "--json"]))).unwrap();
    assert_eq!(ls.as_array().unwrap().len(), 2);
    let stats: serde_json::Value = serde_json::from_str(&ok(&cas(&["stats", "--store", s, "--json"]))).unwrap();
    assert_eq!(stats["store"]["stored_blocks"], (4 + 1) * 256, "a's 4 MiB plus b's 1 MiB of its own");
    assert!(ok(&cas(&["fsck", "--verify", "--store", s])).contains("clean"));
    ok(&cas(&["rm", "a", "--store", s]));
    ok(&cas(&["export", "b", exported.to_str().unwrap(), "--store", s]));
    assert_eq!(std::fs::read(&exported).unwrap(), std::fs::read(&images[1]).unwrap(), "b intact after deleting a");
    let created: serde_json::Value = serde_json::from_str(&ok(&cas(&["create", "empty", "--size", "1M", "--store", s, "--json"]))).unwrap();
    assert_eq!(created["size"], 1 << 20);
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let s = store.to_str().unwrap();
    fails_with(&cas(&["import", "x", "/nonexistent.raw", "--store", s]), "nonexistent");
    fails_with(&cas(&["ls", "--store", s]), "no store at");
    fails_with(&cas(&["create", "d", "--size", "12Q", "--store", s]), "unknown unit");
    fails_with(&cas(&["create", "d", "--size", "1000", "--store", s]), "multiple of 512");
    ok(&cas(&["create", "d", "--size", "1M", "--store", s]));
    fails_with(&cas(&["create", "d", "--size", "1M", "--store", s]), "already exists");
    fails_with(&cas(&["rm", "nope", "--store", s]), "not found");
    fails_with(&cas(&["export", "nope", "/tmp/x", "--store", s]), "not found");
    let big = dir.path().join("big.raw");
    std::fs::File::create(&big).unwrap().set_len(2 << 20).unwrap();
    fails_with(&cas(&["import", "d", big.to_str().unwrap(), "--store", s]), "larger than the disk");
    fails_with(&cas(&["similarity", big.to_str().unwrap()]), "two or more");
    fails_with(&cas(&["create", "x", "--size", "1M", "--store", s, "--block-size", "8192"]), "block size");
    let out = cas(&["frobnicate"]);
    assert!(!out.status.success());
}
