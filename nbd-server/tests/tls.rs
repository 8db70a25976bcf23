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
