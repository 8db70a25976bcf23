//! `nbd-server`'s settings: the command line (argh) and the TOML file of `--config`, with
//! the command line winning over the file.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::Context;
use argh::FromArgs;
use serde::Deserialize;

/// Serve every disk of a CAS store as an NBD export.
///
/// Prints "listening on <uri>" for each listener, then "ready", on standard output.
/// Logs go to standard error (filter with RUST_LOG, e.g. RUST_LOG=nbd_server=debug).
/// Every option can also be set in a TOML file (--config), under its name without the
/// dashes in front: store = "/var/lib/nbd-cas", listen = ["0.0.0.0:10809"].
#[derive(FromArgs, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Args {
    /// a TOML file with any of these settings; options given on the command line win over
    /// it (lists replace its lists; a switch it sets stays on)
    #[argh(option)]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// store directory (created on first use); required, here or in --config
    #[argh(option)]
    pub store: Option<PathBuf>,

    /// TCP address to listen on, repeatable; port 0 picks a free port (default
    /// 127.0.0.1:10809 when no --unix is given)
    #[argh(option)]
    pub listen: Vec<String>,

    /// unix socket to listen on
    #[argh(option)]
    pub unix: Option<PathBuf>,

    /// NAME:SIZE: create this disk if it does not exist (SIZE in bytes, or with a K, M, G or
    /// T suffix; a multiple of 512); repeatable
    #[argh(option)]
    pub disk: Vec<DiskSpec>,

    /// export every disk read-only
    #[argh(switch)]
    pub read_only: bool,

    /// TLS certificate chain (PEM); enables NBD_OPT_STARTTLS
    #[argh(option)]
    pub tls_cert: Option<PathBuf>,

    /// TLS private key (PEM)
    #[argh(option)]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM): clients must present a certificate signed by one of them
    #[argh(option)]
    pub tls_client_ca: Option<PathBuf>,

    /// refuse clients that do not start TLS
    #[argh(switch)]
    pub tls_required: bool,

    /// block size of a new store (a power of two, 512 to 65536; default 4096)
    #[argh(option)]
    pub block_size: Option<u32>,

    /// where a new store keeps its blocks: "rocksdb" (default: in block containers in the
    /// store directory, RocksDB as their index) or
    /// "rados:POOL[/NAMESPACE]" (a Ceph pool the datacentre's servers share); fixed at creation
    #[argh(option)]
    pub blocks: Option<String>,

    /// the Ceph configuration for --blocks rados:... (default /etc/ceph/ceph.conf)
    #[argh(option)]
    pub ceph_conf: Option<PathBuf>,

    /// the Ceph user for --blocks rados:... (default client.admin)
    #[argh(option)]
    pub ceph_user: Option<String>,

    /// seconds between background compaction passes over the block containers (default 300;
    /// 0 turns them off; `cas gc` runs one at any time)
    #[argh(option)]
    pub compact_interval: Option<f64>,

    /// size of the block containers a new container takes (default 64M; the unit compaction
    /// rewrites)
    #[argh(option)]
    pub container_size: Option<String>,

    /// compaction rewrites containers whose live blocks fill less than this share (default 0.5)
    #[argh(option)]
    pub compact_below: Option<f64>,

    /// re-hash every block read from the containers and fail reads whose bytes do not match
    /// their fingerprint (costs a hash per block read)
    #[argh(switch)]
    pub verify_reads: bool,

    /// store the new blocks of small writes at the end of a container only (by default they
    /// take the slots of blocks that died, once their death is durable: a cached page
    /// overwritten; the price is that after a power loss a write never flushed may read as
    /// the bytes a dead block left rather than as zeros)
    #[argh(switch)]
    pub no_slot_reuse: bool,

    /// answer a WRITE without FUA only once the store committed it (by default it is
    /// answered once admitted, before the commit; later requests touching its range and every
    /// FLUSH wait for it, so clients see no difference but speed)
    #[argh(switch)]
    pub no_write_behind: bool,

    /// requests one connection serves at once, each on a thread of its own (default 16)
    #[argh(option)]
    pub max_in_flight: Option<usize>,
    /// established NBD connections at most (default 1024); a newcomer is refused when they
    /// are all taken, an established client is never dropped for it
    #[argh(option)]
    pub max_connections: Option<usize>,
    /// NBD connections still negotiating at most, a budget apart from established ones
    /// (default 256)
    #[argh(option)]
    pub max_negotiating: Option<usize>,
    /// NBD connections negotiating from one source address at most (default 64)
    #[argh(option)]
    pub max_negotiating_per_peer: Option<usize>,
    /// seconds a client has to negotiate while the negotiating budget is empty (default 30);
    /// the deadline shrinks as it fills, to 1 s when it is nearly full
    #[argh(option)]
    pub handshake_timeout: Option<u64>,

    /// export served to clients that ask for the empty name (default: the first --disk, or
    /// the only disk of the store)
    #[argh(option)]
    pub default_export: Option<String>,

    /// unix socket for the control API (JSON lines; see CONTROL.md)
    #[argh(option)]
    pub control: Option<PathBuf>,

    /// TCP address for the control API, repeatable; needs mutual TLS (--control-cert,
    /// --control-key, --control-ca)
    #[argh(option)]
    pub control_listen: Vec<String>,

    /// certificate chain of the TCP control API (PEM)
    #[argh(option)]
    pub control_cert: Option<PathBuf>,

    /// the key of --control-cert (PEM)
    #[argh(option)]
    pub control_key: Option<PathBuf>,

    /// CA of the control API's clients (PEM): operators and hosts present a certificate it
    /// signed (cas and migrate: NBD_CAS_CONTROL_CERT, _KEY and _CA)
    #[argh(option)]
    pub control_ca: Option<PathBuf>,

    /// PATTERN=ID[,ID...]: clients whose certificate names one of the IDs (a DNS or URI
    /// subject alternative name; * for any) may use the disks whose names match PATTERN (a
    /// glob), over NBD and the TCP control API; repeatable. With any rule, whatever no rule
    /// allows is refused, and PATTERN * makes administrators (store and migration methods).
    /// Needs --tls-client-ca and --tls-required.
    #[argh(option)]
    pub allow: Vec<String>,

    /// TCP address where other servers send migrations (port 0 picks a free port)
    #[argh(option)]
    pub migration_listen: Option<String>,

    /// this server's certificate for the migration link's mutual TLS (PEM)
    #[argh(option)]
    pub migration_cert: Option<PathBuf>,

    /// the key of --migration-cert (PEM)
    #[argh(option)]
    pub migration_key: Option<PathBuf>,

    /// the CA that signs every server's migration certificate (PEM)
    #[argh(option)]
    pub migration_ca: Option<PathBuf>,

    /// allow migrations over plaintext TCP (tenant data crosses the WAN unencrypted and
    /// unauthenticated: for tests and trusted links only)
    #[argh(switch)]
    pub migration_insecure: bool,

    /// TCP congestion control of migration links, both ends (default bbr: it keeps the WAN's
    /// queue short, so switch-overs and on-demand fetches do not wait behind bulk data;
    /// `system` keeps the kernel's default)
    #[argh(option)]
    pub migration_congestion: Option<String>,

    /// TCP address where Prometheus scrapes /metrics (plain HTTP: bind it to a management
    /// network or loopback)
    #[argh(option)]
    pub metrics_listen: Option<String>,

    /// seconds between two walks of the reference index for the store-space metrics
    /// (default 60; longer when a walk takes over 1 % of it)
    #[argh(option)]
    pub metrics_space_interval: Option<f64>,
}

/// `--disk NAME:SIZE` (in the file, a string of the same form).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DiskSpec {
    pub name: String,
    pub size: u64,
}

impl TryFrom<String> for DiskSpec {
    type Error = String;

    fn try_from(s: String) -> Result<DiskSpec, String> {
        s.parse()
    }
}

impl FromStr for DiskSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskSpec, String> {
        let (name, size) = s.rsplit_once(':').ok_or_else(|| format!("{s:?}: expected NAME:SIZE"))?;
        if name.is_empty() {
            return Err(format!("{s:?}: empty disk name"));
        }
        let size = parse_size(size)?;
        if size == 0 || size % 512 != 0 {
            return Err(format!("{s:?}: size must be a positive multiple of 512"));
        }
        Ok(DiskSpec { name: name.to_owned(), size })
    }
}

/// "4096", "64M", "10G", "1T", "512k" (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 10),
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        Some('T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1 << shift).ok_or_else(|| format!("{s:?} is too large"))
}

/// Each setting's rule for a command line laid over a file: an option given wins, a list
/// given replaces the file's, a switch is on if either sets it.
trait Overlay {
    fn overlay(&mut self, file: Self);
}

impl<T> Overlay for Option<T> {
    fn overlay(&mut self, file: Self) {
        if self.is_none() {
            *self = file;
        }
    }
}

impl<T> Overlay for Vec<T> {
    fn overlay(&mut self, file: Self) {
        if self.is_empty() {
            *self = file;
        }
    }
}

impl Overlay for bool {
    fn overlay(&mut self, file: Self) {
        *self |= file;
    }
}

impl Args {
    /// The command line, laid over the file it names with --config, if any.
    pub fn from_env_and_config() -> anyhow::Result<Args> {
        let flags: Args = argh::from_env();
        let Some(path) = flags.config.clone() else { return Ok(flags) };
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading --config {}", path.display()))?;
        let file = Args::from_toml(&text).with_context(|| format!("--config {}", path.display()))?;
        Ok(flags.over(file))
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Args> {
        Ok(toml::from_str(text)?)
    }

    /// These settings (the command line) laid over `file`'s. The destructuring names every
    /// field, so a new setting that is not merged here does not compile.
    pub fn over(mut self, file: Args) -> Args {
        let Args {
            config: _,
            store,
            listen,
            unix,
            disk,
            read_only,
            tls_cert,
            tls_key,
            tls_client_ca,
            tls_required,
            block_size,
            blocks,
            ceph_conf,
            ceph_user,
            compact_interval,
            container_size,
            compact_below,
            verify_reads,
            no_slot_reuse,
            no_write_behind,
            max_in_flight,
            max_connections,
            max_negotiating,
            max_negotiating_per_peer,
            handshake_timeout,
            default_export,
            control,
            control_listen,
            control_cert,
            control_key,
            control_ca,
            allow,
            migration_listen,
            migration_cert,
            migration_key,
            migration_ca,
            migration_insecure,
            migration_congestion,
            metrics_listen,
            metrics_space_interval,
        } = file;
        self.store.overlay(store);
        self.listen.overlay(listen);
        self.unix.overlay(unix);
        self.disk.overlay(disk);
        self.read_only.overlay(read_only);
        self.tls_cert.overlay(tls_cert);
        self.tls_key.overlay(tls_key);
        self.tls_client_ca.overlay(tls_client_ca);
        self.tls_required.overlay(tls_required);
        self.block_size.overlay(block_size);
        self.blocks.overlay(blocks);
        self.ceph_conf.overlay(ceph_conf);
        self.ceph_user.overlay(ceph_user);
        self.compact_interval.overlay(compact_interval);
        self.container_size.overlay(container_size);
        self.compact_below.overlay(compact_below);
        self.verify_reads.overlay(verify_reads);
        self.no_slot_reuse.overlay(no_slot_reuse);
        self.no_write_behind.overlay(no_write_behind);
        self.max_in_flight.overlay(max_in_flight);
        self.max_connections.overlay(max_connections);
        self.max_negotiating.overlay(max_negotiating);
        self.max_negotiating_per_peer.overlay(max_negotiating_per_peer);
        self.handshake_timeout.overlay(handshake_timeout);
        self.default_export.overlay(default_export);
        self.control.overlay(control);
        self.control_listen.overlay(control_listen);
        self.control_cert.overlay(control_cert);
        self.control_key.overlay(control_key);
        self.control_ca.overlay(control_ca);
        self.allow.overlay(allow);
        self.migration_listen.overlay(migration_listen);
        self.migration_cert.overlay(migration_cert);
        self.migration_key.overlay(migration_key);
        self.migration_ca.overlay(migration_ca);
        self.migration_insecure.overlay(migration_insecure);
        self.migration_congestion.overlay(migration_congestion);
        self.metrics_listen.overlay(metrics_listen);
        self.metrics_space_interval.overlay(metrics_space_interval);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let file = Args::from_toml(
            r#"
store = "/var/lib/nbd-cas/a"
listen = ["0.0.0.0:10809", "[::]:10809"]
disk = ["vm-1:10G"]
read-only = true
compact-interval = 60
compact-below = 0.25
max-in-flight = 8
metrics-listen = "127.0.0.1:9109"
"#,
        )
        .unwrap();
        assert_eq!(file.disk, vec![DiskSpec { name: "vm-1".into(), size: 10 << 30 }]);
        assert_eq!(file.compact_interval, Some(60.0), "an integer where seconds go");
        let flags = Args { listen: vec!["127.0.0.1:0".into()], max_in_flight: Some(32), ..Args::default() };
        let args = flags.over(file);
        assert_eq!(args.store.as_deref(), Some(std::path::Path::new("/var/lib/nbd-cas/a")));
        assert_eq!(args.listen, vec!["127.0.0.1:0".to_string()], "a list given replaces the file's");
        assert_eq!(args.max_in_flight, Some(32));
        assert_eq!(args.compact_below, Some(0.25));
        assert!(args.read_only);
        assert_eq!(args.metrics_listen.as_deref(), Some("127.0.0.1:9109"));
    }

    #[test]
    fn a_bad_file_is_refused_with_the_reason() {
        let e = Args::from_toml("stor = \"/x\"").unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("stor"), "{e}");
        let e = Args::from_toml("disk = [\"vm\"]").unwrap_err().to_string();
        assert!(e.contains("NAME:SIZE"), "{e}");
        let e = Args::from_toml("max-in-flight = \"many\"").unwrap_err().to_string();
        assert!(e.contains("max-in-flight") || e.contains("invalid type"), "{e}");
        assert!(Args::from_toml("config = \"/etc/other.toml\"").is_err(), "no nesting");
    }

    #[test]
    fn disk_specs() {
        let d: DiskSpec = "vm-1:10G".parse().unwrap();
        assert_eq!((d.name.as_str(), d.size), ("vm-1", 10 << 30));
        assert!("novalue".parse::<DiskSpec>().is_err());
        assert!(":1M".parse::<DiskSpec>().is_err());
        assert!("d:1000".parse::<DiskSpec>().is_err());
        assert!("d:0".parse::<DiskSpec>().is_err());
    }
}
