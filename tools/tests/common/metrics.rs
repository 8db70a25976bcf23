//! Scraping a server's `/metrics` and parsing it with a real OpenMetrics parser (the
//! Prometheus project's Python client, Debian's python3-prometheus-client): a scrape that
//! does not parse fails the test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// Parses OpenMetrics text strictly and prints every sample as JSON.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
json.dump(out, sys.stdout)
"#;

/// One parsed sample.
#[derive(Debug, Clone)]
pub struct Sample {
    pub family: String,
    pub kind: String,
    pub name: String,
    pub labels: Value,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Debug)]
pub struct Scrape(pub Vec<Sample>);

impl Scrape {
    /// The value of the sample `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0.iter().find(|s| s.name == name && labels.iter().all(|(k, v)| s.labels[*k] == *v)).map(|s| s.value)
    }

    /// Like [`Scrape::value`], failing the test when the sample is missing.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| panic!("no sample {name} {labels:?} in the scrape"))
    }
}

/// GET `url` (http://host:port/path): the status line's code and the body.
pub fn http_get(url: &str) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).expect("set_read_timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").expect("send the request");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a complete HTTP response");
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (code, body.to_string())
}

/// Scrapes `url` and parses the text strictly.
pub fn scrape(url: &str) -> Scrape {
    let (code, body) = http_get(url);
    assert_eq!(code, 200, "GET {url}: {body}");
    parse(&body)
}

pub fn parse(text: &str) -> Scrape {
    // Debian's interpreter, where python3-prometheus-client is installed (a python3 earlier in
    // PATH may be another one).
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed the parser");
    let out = child.wait_with_output().expect("the parser ran");
    assert!(out.status.success(), "the scrape is not valid OpenMetrics: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let samples: Vec<Value> = serde_json::from_slice(&out.stdout).expect("the parser prints JSON");
    Scrape(
        samples
            .into_iter()
            .map(|s| Sample {
                family: s["family"].as_str().unwrap_or_default().to_string(),
                kind: s["type"].as_str().unwrap_or_default().to_string(),
                name: s["name"].as_str().unwrap_or_default().to_string(),
                labels: s["labels"].clone(),
                value: s["value"].as_f64().unwrap_or(f64::NAN),
            })
            .collect(),
    )
}
