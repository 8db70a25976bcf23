//! TLS (STARTTLS) with X.509 certificates: mutual authentication, FORCEDTLS mode, plain
//! clients refused, optional TLS. Certificates are made with the openssl command.

mod common;

use std::path::Path;
use std::process::Command;

use common::{require_python_libnbd, require_tool, run_ok, start_server, RawClient};
use nbd_server::proto::consts::*;
use nbd_server::proto::handshake::encode_info_request;

/// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, in the
/// file names GnuTLS (libnbd) expects: ca-cert.pem, client-cert.pem, client-key.pem.
fn make_pki(dir: &Path) {
    let openssl = require_tool("openssl");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run_ok(Command::new(&openssl).current_dir(dir).args(["req", "-x509"]).args(ec).args([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=nbd-test-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    for (who, eku) in [("server", "serverAuth"), ("client", "clientAuth")] {
        run_ok(Command::new(&openssl).current_dir(dir).arg("req").args(ec).args([
            "-keyout",
            &format!("{who}-key.pem"),
            "-out",
            &format!("{who}.csr"),
            "-subj",
            &format!("/CN={who}"),
        ]));
        let ext = format!(
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={eku}\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        );
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        run_ok(Command::new(&openssl).current_dir(dir).args([
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{who}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{who}.ext"),
        ]));
    }
}

/// Client certificate directories: with a client certificate, and with the CA only.
fn client_dirs(pki: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let full = pki.join("client-full");
    let ca_only = pki.join("client-ca-only");
    for d in [&full, &ca_only] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(pki.join("ca-cert.pem"), d.join("ca-cert.pem")).unwrap();
    }
    std::fs::copy(pki.join("client-cert.pem"), full.join("client-cert.pem")).unwrap();
    std::fs::copy(pki.join("client-key.pem"), full.join("client-key.pem")).unwrap();
    (full, ca_only)
}

fn tls_args(pki: &Path, client_ca: bool, required: bool) -> Vec<String> {
    let mut args = vec![
        "--tls-cert".to_owned(),
        pki.join("server-cert.pem").display().to_string(),
        "--tls-key".to_owned(),
        pki.join("server-key.pem").display().to_string(),
    ];
    if client_ca {
        args.extend(["--tls-client-ca".to_owned(), pki.join("ca-cert.pem").display().to_string()]);
    }
    if required {
        args.push("--tls-required".to_owned());
    }
    args
}

/// nbdsh over TLS: returns whether the script printed OK (false: it failed to connect).
fn nbdsh_tls(port: u16, certs: &Path, tls_mode: &str) -> Result<String, String> {
    let python = require_python_libnbd();
    let script = format!(
        r#"
h.set_tls(nbd.{tls_mode})
h.set_tls_certificates("{certs}")
h.set_export_name("disk")
h.connect_tcp("localhost", "{port}")
print("tls", h.get_tls_negotiated())
h.pwrite(b"\x42" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"\x42" * 4096
h.shutdown()
print("OK")
"#,
        certs = certs.display()
    );
    let out = Command::new(python).args(["-m", "nbd", "-c", &script]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() && stdout.contains("OK") {
        Ok(stdout)
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn mutual_tls_required() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let (full, ca_only) = client_dirs(pki.path());
    let args = tls_args(pki.path(), true, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_dir, server) = start_server(&["disk:4M"], &args);

    // A client with a certificate from the CA: TLS negotiated, I/O works.
    let out = nbdsh_tls(server.port(), &full, "TLS_REQUIRE").expect("TLS client with a certificate");
    assert!(out.contains("tls True"), "{out}");
    // Without a client certificate the TLS handshake is refused.
    assert!(nbdsh_tls(server.port(), &ca_only, "TLS_REQUIRE").is_err(), "client without a certificate was accepted");

    // Plain clients: every option but STARTTLS/ABORT gets ERR_TLS_REQD; EXPORT_NAME is a close.
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    assert_eq!(c.option_final(OPT_LIST, &[]), REP_ERR_TLS_REQD);
    assert_eq!(c.option_final(OPT_GO, &encode_info_request("disk", &[])), REP_ERR_TLS_REQD);
    assert_eq!(c.option_final(OPT_STRUCTURED_REPLY, &[]), REP_ERR_TLS_REQD);
    assert_eq!(c.option_final(0x4242, &[]), REP_ERR_TLS_REQD);
    assert_eq!(c.option_final(OPT_STARTTLS, b"data"), REP_ERR_INVALID);
    c.option(OPT_EXPORT_NAME, b"disk");
    assert!(c.is_closed());
    let nbdinfo = require_tool("nbdinfo");
    assert!(!Command::new(nbdinfo).arg(server.uri("disk")).output().unwrap().status.success());

    // Garbage instead of a TLS handshake after STARTTLS: a close, and the server goes on.
    let mut c = RawClient::tcp(&server.tcp);
    c.handshake();
    c.option(OPT_STARTTLS, &[]);
    assert_eq!(c.reply().kind, REP_ACK);
    std::io::Write::write_all(&mut c.io, b"this is not a TLS ClientHello at all, sorry").unwrap();
    // The server may send a TLS alert first; then it must close.
    let mut rest = Vec::new();
    if let Err(e) = std::io::Read::read_to_end(&mut c.io, &mut rest) {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "connection not closed"
        );
    }
    assert!(rest.len() < 1024, "unexpected data after a failed TLS handshake");
    nbdsh_tls(server.port(), &full, "TLS_REQUIRE").expect("still serving");
}

#[test]
fn optional_tls() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path());
    let (full, ca_only) = client_dirs(pki.path());
    let args = tls_args(pki.path(), false, false);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_dir, server) = start_server(&["disk:4M"], &args);

    // TLS without client certificates (none asked for), and plain, both work.
    let out = nbdsh_tls(server.port(), &ca_only, "TLS_REQUIRE").expect("TLS client");
    assert!(out.contains("tls True"), "{out}");
    let out = nbdsh_tls(server.port(), &full, "TLS_DISABLE").expect("plain client");
    assert!(out.contains("tls False"), "{out}");
    // qemu's client works through plain NBD too.
    let qemu_img = require_tool("qemu-img");
    run_ok(Command::new(qemu_img).args(["info", "-f", "raw", &server.uri("disk")]));
}

/// SIGHUP reloads the certificate files: a client connected before keeps its connection and
/// its I/O, new clients meet the new certificate (one trusting only the old CA is refused),
/// and a file that does not load leaves the certificate in force.
#[test]
fn sighup_reloads_certificates_without_dropping_connections() {
    let old = tempfile::tempdir().unwrap();
    let new = tempfile::tempdir().unwrap();
    make_pki(old.path());
    make_pki(new.path());
    let (old_client, _) = client_dirs(old.path());
    let (new_client, _) = client_dirs(new.path());
    // The server reads its files from `live`, which starts as a copy of the old PKI.
    let live = tempfile::tempdir().unwrap();
    for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"] {
        std::fs::copy(old.path().join(f), live.path().join(f)).unwrap();
    }
    let args = tls_args(live.path(), true, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_dir, server) = start_server(&["disk:4M"], &args);
    let python = require_python_libnbd();
    let script = format!(
        r#"
import os, shutil, signal, time
def client(certs):
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(certs)
    h.set_export_name("disk")
    h.connect_tcp("localhost", "{port}")
    return h
before = client("{old_client}")
before.pwrite(b"\x11" * 4096, 0, nbd.CMD_FLAG_FUA)
# Garbage in the key file: the reload fails and the old certificate stays.
open("{live}/server-key.pem", "w").write("not a key")
os.kill({pid}, signal.SIGHUP)
time.sleep(0.5)
client("{old_client}").shutdown()
for f in ["server-cert.pem", "server-key.pem", "ca-cert.pem"]:
    shutil.copy(os.path.join("{new}", f), os.path.join("{live}", f))
os.kill({pid}, signal.SIGHUP)
time.sleep(0.5)
assert before.pread(4096, 0) == b"\x11" * 4096, "the connection made before the reload goes on"
before.pwrite(b"\x22" * 4096, 4096, nbd.CMD_FLAG_FUA)
try:
    client("{old_client}")
    raise SystemExit("a client trusting only the old CA connected after the reload")
except nbd.Error:
    pass
after = client("{new_client}")
assert after.pread(8192, 0) == b"\x11" * 4096 + b"\x22" * 4096
after.shutdown()
before.shutdown()
print("OK")
"#,
        port = server.port(),
        pid = server.pid(),
        old_client = old_client.display(),
        new_client = new_client.display(),
        live = live.path().display(),
        new = new.path().display(),
    );
    let out = Command::new(python).args(["-m", "nbd", "-c", &script]).output().unwrap();
    let log = std::fs::read_to_string(&server.stderr_path).unwrap_or_default();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("OK"),
        "{}\n{}\nserver log:\n{log}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("not reloaded, the old ones stay"), "the failed reload is logged: {log}");
    assert!(log.contains("NBD TLS certificates reloaded"), "{log}");
}
