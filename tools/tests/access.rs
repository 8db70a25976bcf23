//! Access control: a host certified for one tenant cannot list, open, read or write another
//! tenant's disk, over NBD (libnbd's nbdsh with the host's certificate) or through the TCP
//! control API (`cas` and `migrate` with the host's certificate); the TCP control API refuses
//! clients without a certificate from its CA.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::server::{as_client, certs, control_tls_args, Server, TestDir, CAS, MIGRATE};

/// A libnbd certificate directory (ca-cert.pem, client-cert.pem, client-key.pem) for `name`.
fn libnbd_dir(certs: &Path, name: &str) -> PathBuf {
    let dir = certs.join(format!("libnbd-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(certs.join("ca.pem"), dir.join("ca-cert.pem")).unwrap();
    std::fs::copy(certs.join(format!("{name}.pem")), dir.join("client-cert.pem")).unwrap();
    std::fs::copy(certs.join(format!("{name}.key")), dir.join("client-key.pem")).unwrap();
    dir
}

/// What one certified host sees over NBD: the export list, and for each name whether it
/// opens; an export that opens is written (a byte pattern of the host's choosing at offset
/// 0) and read back.
const PROBE: &str = r#"
import json, sys
import nbd
certs, port, pattern = sys.argv[1], sys.argv[2], int(sys.argv[3])
def handle():
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs)
    h.set_opt_mode(True)
    h.connect_tcp("localhost", port)
    return h
out = {"list": [], "open": {}}
h = handle()
h.opt_list(lambda name, description: out["list"].append(name))
for name in sys.argv[4:]:
    h.set_export_name(name)
    try:
        h.opt_info()
        info = "ok"
    except nbd.Error as e:
        info = "refused"
    g = handle()
    g.set_export_name(name)
    try:
        g.opt_go()
    except nbd.Error:
        out["open"][name] = {"info": info, "go": "refused"}
        continue
    g.pwrite(bytes([pattern]) * 4096, 0, nbd.CMD_FLAG_FUA)
    out["open"][name] = {"info": info, "go": "ok", "read": g.pread(4096, 0) == bytes([pattern]) * 4096}
    g.shutdown()
h.opt_abort()
print(json.dumps(out))
"#;

fn probe(port: u16, certs: &Path, pattern: u8, exports: &[&str]) -> Value {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-c", PROBE, certs.to_str().unwrap(), &port.to_string(), &pattern.to_string()]).args(exports);
    let out = cmd.output().expect("run nbdsh");
    assert!(out.status.success(), "nbdsh: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn control(cmd: &mut Command, certs: &Path, who: &str) -> Output {
    as_client(cmd, certs, who).output().expect("run the command")
}

fn listed(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = v.as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    names
}

#[test]
fn one_tenant_cannot_reach_another_tenants_disks() {
    let dir = TestDir::new();
    let certs = certs(dir.path(), "dc,host-a,host-b,ops");
    let pem = |n: &str| certs.join(n).display().to_string();
    let mut args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &pem("dc.pem"),
        "--tls-key",
        &pem("dc.key"),
        "--tls-client-ca",
        &pem("ca.pem"),
        "--tls-required",
        "--allow",
        "tenant-a-*=host-a",
        "--allow",
        "tenant-b-*=host-b",
        "--allow",
        "*=ops",
        "--control-listen",
        "127.0.0.1:0",
        "--disk",
        "tenant-a-vm:4M",
        "--disk",
        "tenant-b-vm:4M",
    ]
    .map(String::from)
    .to_vec();
    args.extend(control_tls_args(&certs, "dc"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(dir.path(), "dc", &args);
    let port = server.tcp_port();
    let both = ["tenant-a-vm", "tenant-b-vm"];

    // NBD: each host lists, opens, writes and reads its own tenant's disk only.
    let (a, b, ops) = (libnbd_dir(&certs, "host-a"), libnbd_dir(&certs, "host-b"), libnbd_dir(&certs, "ops"));
    let seen = probe(port, &a, 0xa1, &both);
    assert_eq!(seen["list"], json!(["tenant-a-vm"]), "{seen}");
    assert_eq!(seen["open"]["tenant-a-vm"], json!({"info": "ok", "go": "ok", "read": true}), "{seen}");
    assert_eq!(seen["open"]["tenant-b-vm"], json!({"info": "refused", "go": "refused"}), "{seen}");
    let seen = probe(port, &b, 0xb2, &both);
    assert_eq!(seen["list"], json!(["tenant-b-vm"]), "{seen}");
    assert_eq!(seen["open"]["tenant-a-vm"]["go"], "refused", "{seen}");
    assert_eq!(seen["open"]["tenant-b-vm"]["read"], true, "{seen}");
    // The administrator sees both, and each disk holds only its own tenant's write.
    let seen = probe(port, &ops, 0x0f, &[]);
    let mut all: Vec<String> = serde_json::from_value(seen["list"].clone()).unwrap();
    all.sort();
    assert_eq!(all, both);
    let read = |export: &str| {
        let script = format!(
            "h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates('{}')\nh.set_export_name('{export}')\nh.connect_tcp('localhost', '{port}')\nprint(h.pread(1, 0)[0])",
            ops.display()
        );
        let out = Command::new("/usr/bin/python3").args(["-m", "nbd", "-c", &script]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(read("tenant-a-vm"), (0xa1).to_string());
    assert_eq!(read("tenant-b-vm"), (0xb2).to_string());

    // The TCP control API: the same rules.
    let addr = server.control_tcp.first().expect("a TCP control address").clone();
    let ls = |who: &str| listed(&control(Command::new(CAS).args(["ls", "--server", &addr, "--json"]), &certs, who));
    assert_eq!(ls("host-a"), vec!["tenant-a-vm"]);
    assert_eq!(ls("host-b"), vec!["tenant-b-vm"]);
    assert_eq!(ls("ops"), both);
    let refused = |cmd: &mut Command, who: &str, says: &str| {
        let out = control(cmd, &certs, who);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{who}: {cmd:?}: {err}");
    };
    refused(Command::new(CAS).args(["rm", "tenant-b-vm", "--server", &addr]), "host-a", "no disk");
    refused(Command::new(CAS).args(["stats", "tenant-b-vm", "--server", &addr]), "host-a", "no disk");
    refused(Command::new(CAS).args(["snapshot", "tenant-b-vm", "tenant-a-copy", "--server", &addr]), "host-a", "no disk");
    refused(Command::new(CAS).args(["create", "tenant-b-new", "--size", "1M", "--server", &addr]), "host-a", "no disk");
    refused(Command::new(MIGRATE).args(["status", "--server", &addr]), "host-a", "administrator");
    refused(Command::new(CAS).args(["gc", "--server", &addr]), "host-b", "administrator");
    // What a tenant may do on its own disks works, without the store's totals.
    let out = control(Command::new(CAS).args(["stats", "tenant-a-vm", "--server", &addr, "--json"]), &certs, "host-a");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["store"], Value::Null, "the store's totals are for administrators");
    assert_eq!(stats["disks"][0]["shared_bytes"], Value::Null, "sharing would tell what other tenants store");
    assert_eq!(stats["disks"][0]["allocated_bytes"], 4096);
    let out = control(Command::new(CAS).args(["snapshot", "tenant-a-vm", "tenant-a-snap", "--server", &addr]), &certs, "host-a");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ls("host-a"), vec!["tenant-a-snap", "tenant-a-vm"]);
    assert_eq!(ls("ops"), vec!["tenant-a-snap", "tenant-a-vm", "tenant-b-vm"], "host-a's attempts changed nothing else");

    // Without a certificate, or with one from another CA, nothing gets through.
    let out = Command::new(CAS).args(["ls", "--server", &addr]).env_remove("NBD_CAS_CONTROL_CERT").output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NBD_CAS_CONTROL_CERT"));
    let rogue = common::server::certs(&dir.path().join("rogue"), "ops");
    let out = control(Command::new(CAS).args(["ls", "--server", &addr]), &rogue, "ops");
    assert!(!out.status.success(), "a certificate from another CA was accepted");
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    plain.write_all(b"{\"id\":1,\"method\":\"disk.list\"}\n").unwrap();
    let mut reply = Vec::new();
    let _ = plain.read_to_end(&mut reply);
    assert!(!String::from_utf8_lossy(&reply).contains("tenant"), "plain TCP got an answer: {reply:?}");
}

#[test]
fn rules_need_client_certificates_and_tcp_control_needs_tls() {
    let dir = TestDir::new();
    let store = dir.path().join("s");
    let out = Command::new(common::server::nbd_server_bin()).arg("--store").arg(&store).args(["--allow", "a-*=host-a"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--tls-client-ca"), "{out:?}");
    let out = Command::new(common::server::nbd_server_bin()).arg("--store").arg(&store).args(["--control-listen", "127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("mutual TLS"), "{out:?}");
}
