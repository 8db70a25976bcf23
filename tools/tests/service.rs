//! Running `nbd-server` as a service: the systemd units in contrib/systemd pass
//! `systemd-analyze verify` (this machine has no systemd as PID 1 to start them), and the
//! TOML file of `--config` configures a real server, with the command line winning over it.

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

mod common;
use common::metrics::scrape;
use common::server::{nbd_server_bin, run, workspace, Server, TestDir};

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = TestDir::new();
    let bin = nbd_server_bin();
    for (unit, instance) in [("nbd-server.service", "nbd-server.service"), ("nbd-server@.service", "nbd-server@tenant-a.service")] {
        let text = std::fs::read_to_string(workspace().join("contrib/systemd").join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/nbd-server --config"), "{unit}");
        // The units name the installed binary; verify checks that it exists, so the copy
        // names this build's.
        let copy = dir.path().join(instance);
        std::fs::write(&copy, text.replace("/usr/local/bin/nbd-server", bin.to_str().unwrap())).unwrap();
        let out = Command::new("systemd-analyze").arg("verify").arg(&copy).output().expect("run systemd-analyze");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        // verify exits 0 on directives it ignores, so any remark is a failure too.
        assert!(out.status.success() && said.trim().is_empty(), "{unit}: {said}");
    }
    // The check has teeth: a bad value is reported.
    let bad = dir.path().join("bad.service");
    std::fs::write(&bad, "[Service]\nExecStart=/bin/true\nProtectSystem=bogus\n").unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&bad).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty(), "systemd-analyze said nothing about a bad value");
}

#[test]
fn a_config_file_configures_the_server_and_flags_win() {
    let dir = TestDir::new();
    let d = dir.path();
    // The example in contrib/ parses and runs (its paths overridden by the command line).
    let example = workspace().join("contrib/nbd-server.toml");
    let server = Server::start(d, "example", &["--config", example.to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]);
    assert!(server.tcp.iter().all(|a| a.starts_with("127.0.0.1:")), "--listen replaced the file's list: {:?}", server.tcp);
    scrape(server.metrics.as_deref().unwrap());
    drop(server);

    let config = d.join("dc.toml");
    std::fs::write(
        &config,
        r#"
disk = ["vm:8M", "other:1M"]
read-only = true
listen = ["127.0.0.1:1"]
metrics-listen = "127.0.0.1:0"
max-in-flight = 4
"#,
    )
    .unwrap();
    let server = Server::start(d, "dc", &["--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(server.metrics.is_some(), "metrics-listen from the file");
    let info = server.ok("server.info", json!({}));
    assert_eq!(info["exports"], json!(["other", "vm"]), "the disks of the file: {info}");
    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri("vm")));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["exports"][0]["export-size"], 8 << 20);
    assert_eq!(v["exports"][0]["is_read_only"], true, "read-only from the file");
    drop(server);

    // A mistake in the file stops the server with the file and the key named.
    std::fs::write(&config, "disk = [\"vm:8M\"]\nmax-in-fligth = 4\n").unwrap();
    let out = Command::new(nbd_server_bin())
        .args(["--config", config.to_str().unwrap(), "--store"])
        .arg(d.join("never"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a bad file must stop the server");
    assert!(err.contains("dc.toml") && err.contains("max-in-fligth"), "{err}");
    assert!(!d.join("never").exists(), "nothing was created");
}

/// SIGHUP reloads the migration link's certificates: after the destination moves to a new CA
/// it refuses the source still on the old one; once the source has reloaded too, the
/// migration goes through, byte-exact.
#[test]
fn sighup_reloads_the_migration_certificates() {
    let dir = TestDir::new();
    let d = dir.path();
    let old = common::server::certs(&d.join("old"), "dc1,dc2");
    let new = common::server::certs(&d.join("new"), "dc1,dc2");
    // Each server reads its files from a directory of its own, first the old CA's.
    let live = |name: &str| {
        let live = d.join(format!("live-{name}"));
        std::fs::create_dir_all(&live).unwrap();
        for f in [format!("{name}.pem"), format!("{name}.key"), "ca.pem".into()] {
            std::fs::copy(old.join(&f), live.join(&f)).unwrap();
        }
        live
    };
    let (live1, live2) = (live("dc1"), live("dc2"));
    let port = common::server::free_port();
    let dst_args: Vec<String> = [vec!["--migration-listen".to_string(), format!("127.0.0.1:{port}")], common::server::tls_args(&live2, "dc2")].concat();
    let dst = Server::start(d, "dst", &dst_args.iter().map(String::as_str).collect::<Vec<_>>());
    let src_args = common::server::tls_args(&live1, "dc1");
    let src = Server::start(d, "src", &src_args.iter().map(String::as_str).collect::<Vec<_>>());
    let image = d.join("vm.raw");
    let content = common::data::noise(4 << 20);
    std::fs::write(&image, &content).unwrap();
    common::server::load(&src, "vm", &image);
    let reload = |server: &Server, name: &str, live: &Path| {
        for f in [format!("{name}.pem"), format!("{name}.key"), "ca.pem".into()] {
            std::fs::copy(new.join(&f), live.join(&f)).unwrap();
        }
        run(Command::new("kill").args(["-HUP", &server.child.id().to_string()]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&server.log).unwrap_or_default().contains("migration link certificates reloaded") {
            assert!(std::time::Instant::now() < deadline, "{name} did not log the reload");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let migrate = || {
        Command::new(common::server::MIGRATE).args(["--source", src.ctl(), "--dest", dst.ctl(), "--disk", "vm", "--json", "--timeout", "120"]).output().unwrap()
    };
    reload(&dst, "dc2", &live2);
    let out = migrate();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("certificate"), "a source on the old CA got through, or failed otherwise: {err}");
    reload(&src, "dc1", &live1);
    let out = migrate();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let copy = d.join("copy.raw");
    run(Command::new("nbdcopy").arg(dst.uri("vm")).arg(&copy));
    assert!(std::fs::read(&copy).unwrap() == content, "byte-exact after the reload");
}
