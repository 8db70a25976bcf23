//! Reaching the test cluster (scripts/ceph-cluster.sh). Tests skip, loudly, when no cluster
//! is reachable, unless NBD_CAS_REQUIRE_CEPH is set (./test.sh sets it), which makes that a
//! failure.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cas_rados::{RadosOptions, RadosPool};

pub fn required() -> bool {
    std::env::var("NBD_CAS_REQUIRE_CEPH").is_ok_and(|v| !v.is_empty() && v != "0")
}

pub fn conf() -> String {
    std::env::var("NBD_CAS_CEPH_CONF").unwrap_or_else(|_| "/var/tmp/nbd-cas-ceph/ceph.conf".into())
}

pub fn pool_name() -> String {
    std::env::var("NBD_CAS_CEPH_POOL").unwrap_or_else(|_| "nbd-cas".into())
}

/// A namespace no other test (of this or another process) uses.
pub fn namespace(test: &str) -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("t-{test}-{}-{nanos}-{}", std::process::id(), SERIAL.fetch_add(1, Ordering::Relaxed))
}

/// Options for the test cluster in a fresh namespace, or None (after a loud message) when no
/// cluster is reachable and none is required.
pub fn cluster(test: &str) -> Option<RadosOptions> {
    let mut opts = RadosOptions::new(conf(), pool_name());
    opts.namespace = namespace(test);
    opts.connect_timeout = Duration::from_secs(5);
    opts.op_timeout = Duration::from_secs(15);
    let why = if !std::path::Path::new(&opts.conf).exists() {
        format!("{} does not exist", opts.conf.display())
    } else {
        match RadosPool::connect(&opts) {
            Ok(_) => return Some(opts),
            Err(e) => e.to_string(),
        }
    };
    if required() {
        panic!("NBD_CAS_REQUIRE_CEPH is set but the Ceph test cluster is not reachable: {why}");
    }
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut warned = WARNED.lock().unwrap();
    if warned.iter().any(|t| t == test) {
        return None;
    }
    warned.push(test.to_string());
    // Straight to the standard error handle: libtest captures eprintln! of passing tests.
    use std::io::Write;
    let _ = write!(
        std::io::stderr(),
        "\n########## SKIPPED {test}: no Ceph cluster reachable ({why}).\n\
         ########## Start one with `scripts/ceph-cluster.sh start` (./test.sh does, and sets\n\
         ########## NBD_CAS_REQUIRE_CEPH=1 so that an unreachable cluster fails the test instead).\n\n"
    );
    None
}

pub fn connect(opts: &RadosOptions) -> RadosPool {
    RadosPool::connect(opts).expect("connect to the test cluster")
}

/// Pseudo-random bytes: distinct blocks for distinct seeds and offsets.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xA24B_AED4_963E_E407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
