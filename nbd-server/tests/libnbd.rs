//! libnbd's clients (nbdinfo, nbdcopy, nbdsh) against the real server.

mod common;

use std::process::Command;

use common::{assert_cmp, make_image, require_python_libnbd, require_tool, run_ok, start_server};

#[test]
fn nbdinfo_reports_the_export() {
    let nbdinfo = require_tool("nbdinfo");
    let (_dir, server) = start_server(&["alpha:4M", "beta:8M"], &["--default-export", "beta"]);
    for uri in [server.uri("alpha"), server.unix_uri("alpha")] {
        let out = run_ok(Command::new(&nbdinfo).args(["--json", &uri]));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["protocol"], "newstyle-fixed");
        assert_eq!(info["TLS"], false);
        let export = &info["exports"][0];
        assert_eq!(export["export-name"], "alpha");
        assert_eq!(export["export-size"], 4 << 20);
        assert_eq!(export["can_multi_conn"], true);
        assert_eq!(export["can_flush"], true);
        assert_eq!(export["can_fua"], true);
        assert_eq!(export["can_trim"], true);
        assert_eq!(export["can_zero"], true);
        assert_eq!(export["can_fast_zero"], true);
        assert_eq!(export["is_read_only"], false);
        assert_eq!(export["block_size_maximum"], 32 << 20);
        assert!(export["contexts"].as_array().unwrap().iter().any(|c| c == "base:allocation"), "{export}");
    }
    // --list sees both disks; the empty name is the default export.
    let out = run_ok(Command::new(&nbdinfo).args(["--list", "--json", &server.uri("")]));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> =
        info["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    let out = run_ok(Command::new(&nbdinfo).args(["--size", &server.uri("")]));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), (8u64 << 20).to_string());
    // --can multi-conn exits 0 when the flag is set.
    run_ok(Command::new(&nbdinfo).args(["--can", "multi-conn", &server.uri("alpha")]));
    // An unknown export is an error, and the server keeps serving.
    let out = Command::new(&nbdinfo).arg(server.uri("nope")).output().unwrap();
    assert!(!out.status.success());
    run_ok(Command::new(&nbdinfo).arg(server.uri("alpha")));
}

/// nbdcopy in (4 connections, multi-conn) and out, compared with cmp.
#[test]
fn nbdcopy_multi_conn_round_trip() {
    let nbdcopy = require_tool("nbdcopy");
    let (dir, server) = start_server(&["disk:24M"], &[]);
    for (i, uri) in [server.uri("disk"), server.unix_uri("disk")].into_iter().enumerate() {
        // A different image each round, so the second copy overwrites the first.
        let src = dir.path().join(format!("src{i}.raw"));
        make_image(&src, 24 << 20, 7 + i as u64);
        run_ok(Command::new(&nbdcopy).args(["--connections=4", "--requests=32", "--flush"]).arg(&src).arg(&uri));
        let out = dir.path().join(format!("out{i}.raw"));
        run_ok(Command::new(&nbdcopy).args(["--connections=4"]).arg(&uri).arg(&out));
        assert_cmp(&src, &out);
    }
}

/// Runs an nbdsh (`python3 -m nbd`) script; `h` is the handle nbdsh provides.
fn nbdsh(script: &str) -> String {
    let python = require_python_libnbd();
    let out = run_ok(Command::new(python).args(["-m", "nbd", "-c", script]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdsh_negotiation() {
    let (_dir, server) = start_server(&["disk:4M", "other:1M"], &[]);
    let script = format!(
        r#"
h.set_opt_mode(True)
h.connect_tcp("127.0.0.1", "{port}")
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert names == ["disk", "other"], names

h.set_export_name("other")
h.set_request_block_size(True)
h.opt_info()
assert h.get_size() == 1 << 20
assert h.get_block_size(nbd.SIZE_MINIMUM) == 1
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_zero() and h.can_fast_zero()
assert not h.is_read_only()

h.set_export_name("nosuch")
try:
    h.opt_info()
    raise SystemExit("INFO of an unknown export succeeded")
except nbd.Error as e:
    assert e.errno == "ENOENT", e.errno

# libnbd 1.14 negotiates structured replies as soon as it connects.
assert h.get_structured_replies_negotiated()
h.set_export_name("disk")
ctx = []
h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
assert ctx == ["base:allocation"], ctx
ctx = []
h.add_meta_context("base:")
h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
assert ctx == ["base:allocation"], ctx
h.clear_meta_contexts()
h.add_meta_context("qemu:no-such-context")
h.add_meta_context("base:allocation")

# GO sends SET_META_CONTEXT with both queries; only base:allocation is selected.
h.opt_go()
assert h.can_meta_context("base:allocation")
assert not h.can_meta_context("qemu:no-such-context")
assert h.can_df()
h.pwrite(b"\x5a" * 65536, 65536)
h.zero(65536, 65536)  # count, offset: zeroes what was just written
h.pwrite(b"\x5b" * 4096, 3 << 20, nbd.CMD_FLAG_FUA)
h.flush()
extents = []
def cb(metacontext, offset, entries, err):
    assert metacontext == "base:allocation"
    extents.extend(zip(entries[0::2], entries[1::2]))
    return 0
h.block_status(4 << 20, 0, cb)
assert extents == [(3 << 20, 3), (4096, 0), ((1 << 20) - 4096, 3)], extents
assert h.pread(4096, 3 << 20) == b"\x5b" * 4096
assert h.pread(4, (3 << 20) - 2) == b"\0\0\x5b\x5b"
h.shutdown()
print("OK")
"#,
        port = server.port()
    );
    assert!(nbdsh(&script).contains("OK"));
}

/// Deliberately bad requests (libnbd's strict mode off): each gets the right error, and the
/// connection stays usable.
#[test]
fn nbdsh_bad_requests_non_strict() {
    let (_dir, server) = start_server(&["disk:4M"], &[]);
    for (connect, target) in [
        ("connect_tcp", format!("\"127.0.0.1\", \"{}\"", server.port())),
        ("connect_unix", format!("\"{}\"", server.unix.display())),
    ] {
        let script = format!(
            r#"
h.set_export_name("disk")
h.add_meta_context("base:allocation")
h.{connect}({target})
h.set_strict_mode(0)
size = h.get_size()
def expect(errname, fn):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == errname, (errname, e.errno, e.string)
        return
    raise SystemExit("expected " + errname)
expect("EINVAL", lambda: h.pread(1024, size - 512))
expect("ENOSPC", lambda: h.pwrite(b"x" * 1024, size - 512))
expect("EINVAL", lambda: h.trim(1024, size - 512))
expect("ENOSPC", lambda: h.zero(1024, size - 512))
expect("EINVAL", lambda: h.cache(1024, size - 512))
expect("EINVAL", lambda: h.block_status(1024, size - 512, lambda *a: 0))
expect("EINVAL", lambda: h.pread(512, 0, flags=1 << 9))
expect("EINVAL", lambda: h.pwrite(b"x" * 512, 0, flags=nbd.CMD_FLAG_NO_HOLE))
expect("EINVAL", lambda: h.pread((32 << 20) + 1, 0))
expect("EINVAL", lambda: h.pread(1, 1 << 62))
# Still healthy after all that.
h.pwrite(b"\x77" * 512, 512)
assert h.pread(512, 512) == b"\x77" * 512
h.shutdown()
print("OK")
"#
        );
        assert!(nbdsh(&script).contains("OK"));
    }
}

/// A read-only server refuses writes with EPERM and advertises READ_ONLY.
#[test]
fn nbdsh_read_only_export() {
    let (_dir, server) = start_server(&["disk:1M"], &["--read-only"]);
    let script = format!(
        r#"
h.connect_uri("{uri}")
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    raise SystemExit("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errno == "EPERM", e.errno
assert h.pread(512, 0) == bytearray(512)
h.flush()
print("OK")
"#,
        uri = server.uri("disk")
    );
    assert!(nbdsh(&script).contains("OK"));
}
