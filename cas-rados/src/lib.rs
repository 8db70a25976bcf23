//! A [`BlockPool`] on Ceph RADOS: the blocks of a datacentre in one pool, shared by all its
//! storage servers.
//!
//! - A block is a RADOS object named by its fingerprint (32 hex digits) in the pool (and
//!   namespace) given; its bytes are the object's data.
//! - References use Ceph's `cas` object class, run inside the OSD: `chunk_create_or_get_ref`
//!   creates the object on a miss and adds a reference on a hit, comparing the bytes first
//!   (its verify flag: a fingerprint collision is refused on the OSD, atomically with the
//!   reference); `chunk_get_ref` references an existing block (migration's `map_existing`);
//!   `chunk_put_ref` drops a reference and deletes the object with the last one. The OSD
//!   serialises the operations of one object, so servers sharing the pool never race on a
//!   block's references. Each store (server) is one *source* of references, named after its
//!   holder name, and has at most one reference per block: its own count of map entries stays
//!   in its RocksDB (see `cas_store::pool`).
//! - Every batch (has_many, get_many, claims, releases, fsck's lookups) runs as asynchronous
//!   operations with many in flight (`RadosOptions::in_flight`), and every operation has a
//!   deadline (`op_timeout`): an unreachable cluster is an error after that time, never a hang.
//! - The store's hot-block cache sits in front of `get_many`.
//!
//! Block maps and disk metadata stay in each server's RocksDB: a disk is served by one server
//! at a time, its map is read and written on every I/O (a local lookup, not a network round
//! trip), and the map batch stays atomic with the server's own reference counts.

mod completion;
mod encoding;
mod ffi;
mod handles;
mod scan;

use completion::Completion;
use handles::Handles;
use scan::RadosScan;

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cas_store::pool::{BlockPool, Claim, Claimed, PoolScan, PoolSettings};
use cas_store::{Fingerprint, Result, StoreError};
use serde::{Deserialize, Serialize};

const CLASS: &CStr = c"cas";
const CREATE_OR_GET_REF: &CStr = c"chunk_create_or_get_ref";
const GET_REF: &CStr = c"chunk_get_ref";
const PUT_REF: &CStr = c"chunk_put_ref";
const REFERENCES_CHUNK: &CStr = c"references_chunk";
const REFS_XATTR: &CStr = c"chunk_refs";
/// The object recording the settings of the stores that use the pool.
const SETTINGS_OBJECT: &str = "nbd-cas.settings";

/// How to reach the pool.
#[derive(Debug, Clone)]
pub struct RadosOptions {
    /// A ceph.conf naming the monitors (`mon host`) and the keyring.
    pub conf: PathBuf,
    /// The RADOS pool (create it with `ceph osd pool create NAME`).
    pub pool: String,
    /// A RADOS namespace inside the pool ("" for the default): datacentres or tests sharing
    /// one pool without seeing each other's blocks.
    pub namespace: String,
    /// The Ceph user, e.g. "client.admin" or "client.nbd-cas" (it needs `osd 'allow rwx
    /// pool=POOL'`: x for the object class, and `mon 'allow r'`).
    pub user: String,
    /// Deadline of one RADOS operation; keep it well under the NBD clients' request timeout.
    pub op_timeout: Duration,
    /// Deadline of connecting to the monitors.
    pub connect_timeout: Duration,
    /// Asynchronous operations in flight per batch.
    pub in_flight: usize,
}

impl RadosOptions {
    pub fn new(conf: impl Into<PathBuf>, pool: impl Into<String>) -> RadosOptions {
        RadosOptions {
            conf: conf.into(),
            pool: pool.into(),
            namespace: String::new(),
            user: "client.admin".into(),
            op_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            in_flight: 64,
        }
    }

    /// Parses a `--blocks` value: "rados:POOL" or "rados:POOL/NAMESPACE".
    pub fn from_spec(spec: &str, conf: impl Into<PathBuf>) -> Result<RadosOptions> {
        let rest = spec.strip_prefix("rados:").ok_or_else(|| bad_spec(spec))?;
        let (pool, namespace) = rest.split_once('/').unwrap_or((rest, ""));
        if pool.is_empty() {
            return Err(bad_spec(spec));
        }
        let mut opts = RadosOptions::new(conf, pool);
        opts.namespace = namespace.to_string();
        Ok(opts)
    }
}

fn bad_spec(spec: &str) -> StoreError {
    StoreError::InvalidArgument(format!("block pool {spec:?}: use \"rocksdb\", \"rados:POOL\" or \"rados:POOL/NAMESPACE\""))
}

/// The pool a `--blocks` value names, for `StoreOptions::pool`: None for "rocksdb" (the
/// store's own engine, the default), a connected RADOS pool for "rados:POOL[/NAMESPACE]"
/// (`ceph_conf` defaults to /etc/ceph/ceph.conf, `user` to client.admin).
pub fn pool_from_spec(spec: &str, ceph_conf: Option<&Path>, user: Option<&str>) -> Result<Option<Arc<dyn BlockPool>>> {
    match spec {
        "" | "rocksdb" | "local" => Ok(None),
        _ => {
            let conf = ceph_conf.map_or_else(|| PathBuf::from("/etc/ceph/ceph.conf"), Path::to_path_buf);
            let mut opts = RadosOptions::from_spec(spec, conf)?;
            if let Some(user) = user {
                opts.user = if user.contains('.') { user.to_string() } else { format!("client.{user}") };
            }
            Ok(Some(Arc::new(RadosPool::connect(&opts)?)))
        }
    }
}

fn errno_text(ret: i32) -> String {
    std::io::Error::from_raw_os_error(-ret).to_string()
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| StoreError::InvalidArgument(format!("{s:?} contains a NUL byte")))
}

fn oid(fp: &Fingerprint) -> CString {
    CString::new(fp.to_hex()).expect("hex has no NUL")
}

fn parse_oid(name: &[u8]) -> Option<Fingerprint> {
    if name.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in name.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(Fingerprint(out))
}

struct Inner {
    handles: Handles,
    opts: RadosOptions,
    pool_id: i64,
    fsid: String,
    /// Read size of a block (set by `attach`; 64 KiB, the largest block, before).
    block_size: AtomicU32,
}

/// The RADOS block pool. Cheap to clone (shares one connection).
#[derive(Clone)]
pub struct RadosPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RadosPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RadosPool").field("pool", &self.inner.opts.pool).field("namespace", &self.inner.opts.namespace).field("fsid", &self.inner.fsid).finish()
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct SettingsRecord {
    block_size: u32,
    algorithm: String,
}

impl RadosPool {
    /// Connects to the cluster of `opts.conf` and opens the pool. Fails (after at most
    /// `connect_timeout`) if the monitors cannot be reached, the key is refused, or the pool
    /// does not exist.
    pub fn connect(opts: &RadosOptions) -> Result<RadosPool> {
        let fail = |what: &str, r: i32| {
            StoreError::Engine(format!("RADOS: {what} ({}; conf {}, pool {}, user {}): {}", r, opts.conf.display(), opts.pool, opts.user, errno_text(r)))
        };
        if !opts.conf.exists() {
            return Err(StoreError::InvalidArgument(format!("Ceph configuration {} not found", opts.conf.display())));
        }
        let user = cstring(&opts.user)?;
        let mut cluster = std::ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated strings.
        let r = unsafe { ffi::rados_create2(&mut cluster, c"ceph".as_ptr(), user.as_ptr(), 0) };
        if r < 0 {
            return Err(fail("creating the cluster handle", r));
        }
        let mut handles = Handles { cluster, io: std::ptr::null_mut() };
        let conf = cstring(&opts.conf.to_string_lossy())?;
        // SAFETY: `cluster` is a fresh handle; strings are NUL-terminated.
        let r = unsafe { ffi::rados_conf_read_file(cluster, conf.as_ptr()) };
        if r < 0 {
            return Err(fail("reading the configuration", r));
        }
        // CEPH_ARGS may add options, as for the ceph tools.
        // SAFETY: as above.
        unsafe { ffi::rados_conf_parse_env(cluster, std::ptr::null()) };
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        for (key, value) in [
            ("rados_osd_op_timeout", secs(opts.op_timeout)),
            ("rados_mon_op_timeout", secs(opts.op_timeout)),
            ("client_mount_timeout", secs(opts.connect_timeout)),
        ] {
            let (k, v) = (cstring(key)?, cstring(&value)?);
            // SAFETY: as above.
            let r = unsafe { ffi::rados_conf_set(cluster, k.as_ptr(), v.as_ptr()) };
            if r < 0 {
                return Err(fail(&format!("setting {key}"), r));
            }
        }
        // SAFETY: a configured handle; bounded by client_mount_timeout.
        let r = unsafe { ffi::rados_connect(cluster) };
        if r < 0 {
            return Err(fail("connecting to the monitors", r));
        }
        let mut fsid = [0u8; 64];
        // SAFETY: the buffer is 64 bytes, enough for a UUID and its NUL.
        let n = unsafe { ffi::rados_cluster_fsid(cluster, fsid.as_mut_ptr().cast(), fsid.len()) };
        let fsid = if n > 0 { String::from_utf8_lossy(&fsid[..n as usize]).trim_end_matches('\0').to_string() } else { String::new() };
        let pool = cstring(&opts.pool)?;
        // SAFETY: a connected handle; valid out-pointer.
        let r = unsafe { ffi::rados_ioctx_create(cluster, pool.as_ptr(), &mut handles.io) };
        if r == -libc::ENOENT {
            return Err(StoreError::InvalidArgument(format!("RADOS pool {:?} does not exist (create it: ceph osd pool create {})", opts.pool, opts.pool)));
        }
        if r < 0 {
            return Err(fail("opening the pool", r));
        }
        let ns = cstring(&opts.namespace)?;
        // SAFETY: a fresh I/O context, not shared yet.
        let pool_id = unsafe {
            ffi::rados_ioctx_set_namespace(handles.io, ns.as_ptr());
            ffi::rados_ioctx_get_id(handles.io)
        };
        tracing::info!(pool = %opts.pool, namespace = %opts.namespace, %fsid, "connected to the RADOS block pool");
        Ok(RadosPool { inner: Arc::new(Inner { handles, opts: opts.clone(), pool_id, fsid, block_size: AtomicU32::new(65536) }) })
    }

    /// The cluster's fsid.
    pub fn fsid(&self) -> &str {
        &self.inner.fsid
    }

    pub fn options(&self) -> &RadosOptions {
        &self.inner.opts
    }
}

impl Inner {
    fn io(&self) -> ffi::rados_ioctx_t {
        self.handles.io
    }

    /// The name of `holder`'s source object in the `cas` references.
    fn source_name(holder: &str) -> String {
        format!("nbd-cas.holder.{holder}")
    }

    fn source(&self, holder: &str) -> Vec<u8> {
        let hash = blake3::hash(holder.as_bytes());
        let hash = u32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes"));
        encoding::hobject(&Self::source_name(holder), self.pool_id, hash, &self.opts.namespace)
    }

    fn error(&self, what: &str, fp: Option<&Fingerprint>, r: i32) -> StoreError {
        let object = fp.map(|f| format!(" {f}")).unwrap_or_default();
        let hint = if r == -libc::ETIMEDOUT {
            format!(" after {} s: is the cluster reachable and healthy?", self.opts.op_timeout.as_secs())
        } else if r == -libc::EOPNOTSUPP {
            ": the OSDs cannot run the cas object class (osd class load list / osd class default list)".to_string()
        } else if r == -libc::EPERM || r == -libc::EACCES {
            format!(": user {} needs osd 'allow rwx pool={}'", self.opts.user, self.opts.pool)
        } else {
            String::new()
        };
        StoreError::Engine(format!("RADOS {what}{object} in pool {}: {}{hint}", self.opts.pool, errno_text(r)))
    }

    /// Runs `n` asynchronous operations with at most `in_flight` outstanding. `submit(i, c)`
    /// starts operation `i` on completion `c` and returns librados's result with the buffers
    /// the operation uses, kept until it completes. Returns each operation's result (the
    /// submit error if it was not submitted) with its buffers, in order.
    fn run<P>(&self, n: usize, mut submit: impl FnMut(usize, ffi::rados_completion_t) -> (i32, P)) -> Result<Vec<(i32, P)>> {
        let mut out: Vec<Option<(i32, P)>> = (0..n).map(|_| None).collect();
        let mut queue: VecDeque<(usize, Completion, P)> = VecDeque::with_capacity(self.opts.in_flight.min(n));
        let mut next = 0;
        loop {
            while next < n && queue.len() < self.opts.in_flight.max(1) {
                let mut c = Completion::new()?;
                let (r, payload) = submit(next, c.c);
                if r < 0 {
                    out[next] = Some((r, payload));
                } else {
                    c.submitted = true;
                    queue.push_back((next, c, payload));
                }
                next += 1;
            }
            let Some((i, mut c, payload)) = queue.pop_front() else { break };
            let r = c.wait();
            drop(c);
            out[i] = Some((r, payload));
        }
        Ok(out.into_iter().map(|o| o.expect("every operation ran")).collect())
    }

    fn exec_many(&self, fps: &[Fingerprint], method: &CStr, inputs: Vec<Vec<u8>>) -> Result<Vec<i32>> {
        let io = self.io();
        let mut inputs = inputs.into_iter();
        Ok(self
            .run(fps.len(), |i, c| {
                let input = inputs.next().expect("one input per operation");
                let name = oid(&fps[i]);
                let mut out = [0u8; 8];
                // SAFETY: the strings and `input` are copied by librados at submission; `out`
                // has out_len 0 so nothing is written to it.
                let r = unsafe {
                    ffi::rados_aio_exec(io, name.as_ptr(), c, CLASS.as_ptr(), method.as_ptr(), input.as_ptr().cast(), input.len(), out.as_mut_ptr().cast(), 0)
                };
                (r, ())
            })?
            .into_iter()
            .map(|(r, _)| r)
            .collect())
    }

    fn put_refs(&self, holder: &str, fps: &[Fingerprint]) -> Result<()> {
        let src = self.source(holder);
        let inputs = fps.iter().map(|_| encoding::ref_op(&src)).collect();
        let rets = self.exec_many(fps, PUT_REF, inputs)?;
        let mut first_error = None;
        for (fp, r) in fps.iter().zip(rets) {
            match r {
                0 => {}
                // Already gone, or this holder had no reference: nothing to give back.
                r if r == -libc::ENOENT || r == -libc::ENOLINK => {
                    tracing::debug!(fingerprint = %fp, "release of a reference the pool did not have")
                }
                r => {
                    if first_error.is_none() {
                        first_error = Some(self.error("releasing a reference on", Some(fp), r));
                    }
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// (holder's references, all references) per block; None: not stored.
    fn refs(&self, holder: &str, fps: &[Fingerprint]) -> Result<Vec<Option<(u64, u64)>>> {
        let io = self.io();
        let name = Self::source_name(holder);
        let read = |fps: &[Fingerprint], size: usize| {
            self.run(fps.len(), |i, c| {
                let o = oid(&fps[i]);
                let mut buf = vec![0u8; size];
                // SAFETY: `buf` lives in the payload until the operation completes.
                let r = unsafe { ffi::rados_aio_getxattr(io, o.as_ptr(), c, REFS_XATTR.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
                (r, buf)
            })
        };
        let mut results = read(fps, 4096)?;
        // Attributes larger than the first read (many holders) are read again in full.
        let big: Vec<usize> = results.iter().enumerate().filter(|(_, (r, _))| *r == -libc::ERANGE).map(|(i, _)| i).collect();
        if !big.is_empty() {
            let again: Vec<Fingerprint> = big.iter().map(|&i| fps[i]).collect();
            for (i, res) in big.into_iter().zip(read(&again, 1 << 20)?) {
                results[i] = res;
            }
        }
        fps.iter()
            .zip(results)
            .map(|(fp, (r, buf))| match r {
                r if r == -libc::ENOENT => Ok(None),
                r if r == -libc::ENODATA => Ok(Some((0, 0))),
                r if r < 0 => Err(self.error("reading the references of", Some(fp), r)),
                n => encoding::count_refs(&buf[..n as usize], &name)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt(format!("block {fp} in pool {}: {e}", self.opts.pool))),
            })
            .collect()
    }
}

impl BlockPool for RadosPool {
    fn kind(&self) -> &'static str {
        "rados"
    }

    fn location(&self) -> String {
        let o = &self.inner.opts;
        if o.namespace.is_empty() {
            format!("rados:{}", o.pool)
        } else {
            format!("rados:{}/{}", o.pool, o.namespace)
        }
    }

    fn attach(&self, settings: &PoolSettings) -> Result<()> {
        let inner = &self.inner;
        let record = SettingsRecord { block_size: settings.block_size, algorithm: settings.algorithm.to_string() };
        let json = serde_json::to_vec(&record).expect("serialisable");
        let name = cstring(SETTINGS_OBJECT)?;
        // SAFETY: a fresh write op, released below; buffers live across the synchronous call.
        let r = unsafe {
            let op = ffi::rados_create_write_op();
            ffi::rados_write_op_create(op, ffi::LIBRADOS_CREATE_EXCLUSIVE, std::ptr::null());
            ffi::rados_write_op_write_full(op, json.as_ptr().cast(), json.len());
            let r = ffi::rados_write_op_operate(op, inner.io(), name.as_ptr(), std::ptr::null_mut(), 0);
            ffi::rados_release_write_op(op);
            r
        };
        if r == -libc::EEXIST {
            let mut buf = vec![0u8; 4096];
            // SAFETY: `buf` outlives the synchronous read.
            let n = unsafe { ffi::rados_read(inner.io(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(inner.error("reading the pool settings", None, n));
            }
            let stored: SettingsRecord =
                serde_json::from_slice(&buf[..n as usize]).map_err(|e| StoreError::Corrupt(format!("pool settings object {SETTINGS_OBJECT}: {e}")))?;
            if stored != record {
                return Err(StoreError::ConfigMismatch {
                    setting: "pool settings (block size, algorithm) of",
                    stored: format!("{} with {} bytes and {}", self.location(), stored.block_size, stored.algorithm),
                    requested: format!("{} bytes and {}", record.block_size, record.algorithm),
                });
            }
        } else if r < 0 {
            return Err(inner.error("recording the pool settings", None, r));
        }
        // The cas class must be loadable: a read-only method of it on the settings object
        // answers ENOLINK (no such chunk), not EOPNOTSUPP.
        let probe = encoding::string_arg("probe");
        let io = inner.io();
        let rets = inner.run(1, |_, c| {
            let mut out = [0u8; 8];
            // SAFETY: as in exec_many.
            let r = unsafe {
                ffi::rados_aio_exec(
                    io,
                    name.as_ptr(),
                    c,
                    CLASS.as_ptr(),
                    REFERENCES_CHUNK.as_ptr(),
                    probe.as_ptr().cast(),
                    probe.len(),
                    out.as_mut_ptr().cast(),
                    0,
                )
            };
            (r, ())
        })?;
        match rets[0].0 {
            r if r == 0 || r == -libc::ENOLINK || r == -libc::ENOENT => {}
            r => return Err(inner.error("calling the cas object class on", None, r)),
        }
        inner.block_size.store(settings.block_size, Ordering::Relaxed);
        Ok(())
    }

    fn acquire(&self, holder: &str, claims: &[(Fingerprint, Claim<'_>)]) -> Result<Vec<Claimed>> {
        let inner = &self.inner;
        let src = inner.source(holder);
        let io = inner.io();
        let rets = inner.run(claims.len(), |i, c| {
            let (fp, claim) = &claims[i];
            let (method, input) = match claim {
                Claim::Data(bytes) => (CREATE_OR_GET_REF, encoding::create_or_get_ref(&src, encoding::FLAG_VERIFY, bytes)),
                Claim::Existing => (GET_REF, encoding::ref_op(&src)),
            };
            let name = oid(fp);
            let mut out = [0u8; 8];
            // SAFETY: as in exec_many.
            let r = unsafe {
                ffi::rados_aio_exec(io, name.as_ptr(), c, CLASS.as_ptr(), method.as_ptr(), input.as_ptr().cast(), input.len(), out.as_mut_ptr().cast(), 0)
            };
            (r, ())
        })?;
        let mut out = Vec::with_capacity(claims.len());
        let mut first_error = None;
        for ((fp, claim), (r, _)) in claims.iter().zip(rets) {
            let outcome = match (r, claim) {
                (0, _) => Claimed::Yes,
                (r, Claim::Data(_)) if r == -libc::ENOMSG => Claimed::Collision,
                (r, Claim::Existing) if r == -libc::ENOENT => Claimed::Missing,
                (r, _) => {
                    if first_error.is_none() {
                        first_error = Some(inner.error("taking a reference on", Some(fp), r));
                    }
                    Claimed::Missing
                }
            };
            out.push(outcome);
        }
        if let Some(e) = first_error {
            let taken: Vec<Fingerprint> = claims.iter().zip(&out).filter(|(_, o)| **o == Claimed::Yes).map(|((fp, _), _)| *fp).collect();
            if let Err(e2) = inner.put_refs(holder, &taken) {
                tracing::warn!(error = %e2, "could not give back references after a failed claim");
            }
            return Err(e);
        }
        Ok(out)
    }

    fn release(&self, holder: &str, fps: &[Fingerprint]) -> Result<()> {
        self.inner.put_refs(holder, fps)
    }

    fn has_many(&self, fps: &[Fingerprint]) -> Result<Vec<bool>> {
        let inner = &self.inner;
        let io = inner.io();
        let rets = inner.run(fps.len(), |i, c| {
            let name = oid(&fps[i]);
            let mut size = Box::new(0u64);
            let mut mtime = Box::new(0 as libc::time_t);
            // SAFETY: `size` and `mtime` are heap cells kept in the payload until completion.
            let r = unsafe { ffi::rados_aio_stat(io, name.as_ptr(), c, &mut *size, &mut *mtime) };
            (r, (size, mtime))
        })?;
        fps.iter()
            .zip(rets)
            .map(|(fp, (r, _))| match r {
                0 => Ok(true),
                r if r == -libc::ENOENT => Ok(false),
                r => Err(inner.error("looking up", Some(fp), r)),
            })
            .collect()
    }

    fn get_many(&self, fps: &[Fingerprint]) -> Result<Vec<Option<Vec<u8>>>> {
        let inner = &self.inner;
        let io = inner.io();
        // One byte more than a block: a longer object reads as one (and fails the size check).
        let len = inner.block_size.load(Ordering::Relaxed) as usize + 1;
        let rets = inner.run(fps.len(), |i, c| {
            let name = oid(&fps[i]);
            let mut buf = vec![0u8; len];
            // SAFETY: `buf` lives in the payload until the operation completes.
            let r = unsafe { ffi::rados_aio_read(io, name.as_ptr(), c, buf.as_mut_ptr().cast(), buf.len(), 0) };
            (r, buf)
        })?;
        fps.iter()
            .zip(rets)
            .map(|(fp, (r, mut buf))| match r {
                r if r == -libc::ENOENT => Ok(None),
                r if r < 0 => Err(inner.error("reading", Some(fp), r)),
                n => {
                    buf.truncate(n as usize);
                    Ok(Some(buf))
                }
            })
            .collect()
    }

    fn holder_refs(&self, holder: &str, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>> {
        Ok(self.inner.refs(holder, fps)?.into_iter().map(|r| r.map(|(mine, _)| mine)).collect())
    }

    fn scan(&self, holder: &str) -> Result<PoolScan> {
        let mut ctx = std::ptr::null_mut();
        // SAFETY: valid out-pointer; the context is closed by `RadosScan`'s drop.
        let r = unsafe { ffi::rados_nobjects_list_open(self.inner.io(), &mut ctx) };
        if r < 0 {
            return Err(self.inner.error("listing the pool", None, r));
        }
        Ok(Box::new(RadosScan::new(self.inner.clone(), ctx, holder)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let o = RadosOptions::from_spec("rados:dc1", "/etc/ceph/ceph.conf").unwrap();
        assert_eq!((o.pool.as_str(), o.namespace.as_str()), ("dc1", ""));
        let o = RadosOptions::from_spec("rados:dc1/tenants", "c").unwrap();
        assert_eq!((o.pool.as_str(), o.namespace.as_str()), ("dc1", "tenants"));
        assert!(RadosOptions::from_spec("rados:", "c").is_err());
        assert!(RadosOptions::from_spec("s3:x", "c").is_err());
        assert!(pool_from_spec("rocksdb", None, None).unwrap().is_none());
    }

    #[test]
    fn object_names_round_trip() {
        let fp = Fingerprint([0xab; 16]);
        assert_eq!(parse_oid(oid(&fp).as_bytes()), Some(fp));
        assert_eq!(parse_oid(b"nbd-cas.settings"), None);
    }
}
