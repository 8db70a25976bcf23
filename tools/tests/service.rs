//! Running `nbd-server` as a service: the systemd units in contrib/systemd pass
//! `systemd-analyze verify` (this machine has no systemd as PID 1 to start them), and the
//! TOML file of `--config` configures a real server, with the command line winning over it.

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
