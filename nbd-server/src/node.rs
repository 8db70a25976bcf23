//! One storage server's shared state: its store, its exports and its migrations. The control
//! API and the migration listener work through it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use cas_store::{Store, StoreError};
use migration::ratelimit::SharedLink;
use migration::{
    DestHooks, Destination, MigratingDisk, MigrationRecord, MigrationReport, MigrationStatus, Phase, SourceHooks,
    Stage, StateStore,
};
use parking_lot::{Mutex, RwLock};

use crate::export::{CasDevice, Export, ExportRegistry, MigratingDevice};
use crate::link_socket::LinkSocket;
use crate::link_tls::LinkTls;

/// Addresses a server listens on, as the control API reports them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Addresses {
    /// NBD listeners as URIs (`nbd://127.0.0.1:10809`, `nbd+unix:///?socket=/path`).
    pub nbd: Vec<String>,
    /// Where other servers send migrations (host:port).
    pub migration: Option<String>,
    pub control: Vec<String>,
    /// The Prometheus endpoint (`http://host:port/metrics`).
    pub metrics: Option<String>,
}

#[derive(Debug)]
pub struct Node {
    pub store: Arc<Store>,
    pub exports: Arc<ExportRegistry>,
    /// Exports of this server are read-only (`--read-only`).
    pub read_only: bool,
    pub addresses: RwLock<Addresses>,
    migrations: Mutex<BTreeMap<String, Arc<MigrationStatus>>>,
    next_migration: AtomicU64,
    /// Mutual TLS on migration links; None only with `--migration-insecure`.
    pub link_tls: Option<LinkTls>,
    /// TCP settings of migration link sockets (congestion control, unsent bound).
    pub link_socket: LinkSocket,
    /// Records of migrations in progress (they survive a restart).
    pub state: Arc<dyn StateStore>,
    /// Incoming migrations, live and parked.
    pub destination: Arc<Destination>,
    /// Source-side migrations a restart interrupted, waiting for `migration.resume` (or
    /// `migration.cancel`).
    dormant: Mutex<BTreeMap<String, MigrationRecord>>,
    /// Disks this server must not export as ordinary disks: a migration froze or moved them
    /// (source side), or serves them post-copy (destination side).
    held: Mutex<HashSet<String>>,
    /// Distinguishes this run's migration ids from an earlier run's.
    run_tag: String,
    /// The bandwidth cap each gang of outgoing migrations shares, while any member lives.
    gang_caps: Mutex<HashMap<String, Weak<SharedLink>>>,
}

/// Finished migrations a server keeps listing (the most recent ones).
pub const FINISHED_KEPT: usize = 64;

/// How long a destination keeps a parked migration whose source has not come back (before
/// the switch-over; after it, it waits for the source as long as it takes).
pub const PARK_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

impl Node {
    /// A node over `store`, with migration records in `state`. Call
    /// [`Node::restore_migrations`] once the runtime runs, before serving.
    pub fn new(
        store: Arc<Store>,
        exports: Arc<ExportRegistry>,
        read_only: bool,
        link_tls: Option<LinkTls>,
        link_socket: LinkSocket,
        state: Arc<dyn StateStore>,
    ) -> Result<Arc<Node>, StoreError> {
        let records = state.load().map_err(|e| StoreError::Engine(format!("reading migration records: {e}")))?;
        let mut held = HashSet::new();
        let mut dormant = BTreeMap::new();
        for r in records {
            match (r.role.as_str(), r.stage) {
                ("source", stage) => {
                    if stage != Stage::PreCopy {
                        held.insert(r.disk.clone());
                    }
                    dormant.insert(r.id.clone(), r);
                }
                ("destination", Stage::Switched) => {
                    held.insert(r.disk.clone());
                }
                _ => {}
            }
        }
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Ok(Arc::new_cyclic(|weak: &Weak<Node>| Node {
            destination: Destination::new(
                store.clone(),
                Arc::new(NodeDestHooks(weak.clone())),
                state.clone(),
                PARK_TIMEOUT,
            ),
            store,
            exports,
            read_only,
            addresses: RwLock::new(Addresses::default()),
            migrations: Mutex::new(BTreeMap::new()),
            next_migration: AtomicU64::new(1),
            link_tls,
            link_socket,
            state,
            dormant: Mutex::new(dormant),
            held: Mutex::new(held),
            run_tag: format!("{:x}", (nanos as u64) & 0xffff_ffff),
            gang_caps: Mutex::default(),
        }))
    }

    /// The bandwidth cap of a new outgoing migration: its own, or its gang's (shared by every
    /// member, so `set-bandwidth` on any of them paces the whole gang).
    pub fn cap_for(&self, gang: Option<&str>) -> Arc<SharedLink> {
        let Some(gang) = gang else {
            return Arc::default();
        };
        let mut caps = self.gang_caps.lock();
        caps.retain(|_, cap| cap.strong_count() > 0);
        if let Some(cap) = caps.get(gang).and_then(Weak::upgrade) {
            return cap;
        }
        let cap: Arc<SharedLink> = Arc::default();
        caps.insert(gang.to_string(), Arc::downgrade(&cap));
        cap
    }

    /// After a restart: parks incoming migrations again (serving switched disks post-copy),
    /// removes partial disks nothing explains, and lists interrupted outgoing migrations.
    pub async fn restore_migrations(&self) -> Result<(), migration::MigrationError> {
        self.destination.restore().await?;
        for r in self.dormant.lock().values() {
            let gang = r.config.as_ref().and_then(|c| c.gang.clone());
            let status = MigrationStatus::with_cap(
                MigrationReport::new(&r.id, &r.disk, "source", &r.peer),
                self.cap_for(gang.as_deref()),
            );
            status.update(|rep| {
                rep.gang = gang.clone();
                rep.cancellable = r.stage == Stage::PreCopy;
                rep.phase = match r.stage {
                    Stage::PreCopy => Phase::PreCopy,
                    Stage::SwitchingOver => Phase::SwitchingOver,
                    Stage::Switched => Phase::PostCopy,
                };
            });
            // The cap as last recorded (set at the start or changed since).
            let _ = status.set_bandwidth(r.config.as_ref().and_then(|c| c.bandwidth_bps));
            status.interrupt("the server restarted; resume or cancel it");
            tracing::warn!(id = %r.id, disk = %r.disk, stage = ?r.stage, "an outgoing migration was interrupted by a restart: `migrate resume` or `migrate cancel` it");
            self.migrations.lock().insert(r.id.clone(), status);
        }
        Ok(())
    }

    /// Takes an interrupted outgoing migration's record to resume it.
    pub fn take_dormant(&self, id: &str) -> Option<MigrationRecord> {
        self.dormant.lock().remove(id)
    }

    /// Puts back a record `take_dormant` took.
    pub fn restore_dormant(&self, record: MigrationRecord) {
        self.dormant.lock().insert(record.id.clone(), record);
    }

    /// Whether a disk is held back from ordinary export by a migration.
    pub fn is_held(&self, disk: &str) -> bool {
        self.held.lock().contains(disk)
    }

    /// Whether a disk name is one this server exports (partial incoming disks are not).
    pub fn is_exportable(name: &str) -> bool {
        !name.ends_with(".incoming")
    }

    /// Exports a disk of the store under its own name.
    pub fn export_disk(&self, name: &str) -> Result<Arc<Export>, StoreError> {
        let device = CasDevice::open(self.store.clone(), name)?;
        let export = Arc::new(Export::new(name, Arc::new(device)).with_read_only(self.read_only));
        if let Some(old) = self.exports.insert(export.clone()) {
            old.close();
        }
        Ok(export)
    }

    /// Exports every disk of the store (but those a migration holds).
    pub fn export_all(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for disk in self.store.list_disks()? {
            if Self::is_exportable(&disk.name) && !self.is_held(&disk.name) {
                self.export_disk(&disk.name)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Stops exporting a disk: connections using it get ESHUTDOWN from now on.
    pub fn unexport(&self, name: &str) {
        if let Some(export) = self.exports.remove(name) {
            export.close();
        }
    }

    /// A migration id unique across this server's restarts (the destination keys parked
    /// migrations by it).
    pub fn new_migration_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}-{}", self.run_tag, self.next_migration.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers a migration; of the finished ones, the [`FINISHED_KEPT`] most recent stay
    /// listed (`migrate status`, metrics), so the list does not grow with every migration.
    pub fn register_migration(&self, id: &str, status: Arc<MigrationStatus>) {
        let mut migrations = self.migrations.lock();
        migrations.insert(id.to_string(), status);
        let mut finished: Vec<(std::time::Instant, String)> = migrations
            .iter()
            .filter(|(_, s)| s.report().is_finished())
            .map(|(id, s)| (s.started(), id.clone()))
            .collect();
        if finished.len() > FINISHED_KEPT {
            finished.sort();
            for (_, id) in &finished[..finished.len() - FINISHED_KEPT] {
                migrations.remove(id);
            }
        }
    }

    pub fn migration(&self, id: &str) -> Option<MigrationReport> {
        self.migrations.lock().get(id).map(|s| s.report())
    }

    pub fn migration_status(&self, id: &str) -> Option<Arc<MigrationStatus>> {
        self.migrations.lock().get(id).cloned()
    }

    pub fn migrations(&self) -> Vec<MigrationReport> {
        self.migrations.lock().values().map(|s| s.report()).collect()
    }
}

/// The source side's hooks: freeze and thaw the disk's export; close it once the destination
/// serves the disk.
#[derive(Debug)]
pub struct NodeSourceHooks(pub Arc<Node>);

impl SourceHooks for NodeSourceHooks {
    fn freeze<'a>(
        &'a self,
        disk: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), migration::HookError>> + Send + 'a>> {
        Box::pin(async move {
            if let Some(export) = self.0.exports.get(disk) {
                export.freeze().await;
            }
            Ok(())
        })
    }

    fn thaw(&self, disk: &str) {
        if let Some(export) = self.0.exports.get(disk) {
            export.thaw();
        }
    }

    fn switched(&self, disk: &str) {
        // The destination is authoritative now: no new client may open the disk here (reads
        // would be stale). Connected clients stay: their FLUSH still succeeds and everything
        // else is told the disk moved, so a hypervisor completing its own migration can
        // flush its drives and quit cleanly.
        self.0.held.lock().insert(disk.to_string());
        if let Some(export) = self.0.exports.remove(disk) {
            export.mark_moved();
        }
    }
}

/// The destination side's hooks: serve an arriving disk under its real name from the moment
/// the migration arrives (standby, then post-copy: [`MigratingDevice`]), and through the
/// store directly once every block is local.
/// (Weak: the node owns the destination that holds these hooks.)
#[derive(Debug)]
pub struct NodeDestHooks(pub Weak<Node>);

impl DestHooks for NodeDestHooks {
    fn attach(&self, name: &str, disk: Arc<MigratingDisk>) -> Result<(), migration::HookError> {
        let node = self.0.upgrade().ok_or("the server is stopping")?;
        let standby = disk.is_standby();
        let device = MigratingDevice::new(name, disk);
        let export = Arc::new(Export::new(name, Arc::new(device)).with_read_only(node.read_only));
        node.held.lock().insert(name.to_string());
        if let Some(old) = node.exports.insert(export) {
            old.close();
        }
        if standby {
            tracing::info!(disk = name, "standby export: the destination host may attach it; reads come from the source, writes wait for the switch-over");
        }
        Ok(())
    }

    fn abandoned(&self, name: &str) {
        let Some(node) = self.0.upgrade() else { return };
        node.held.lock().remove(name);
        node.unexport(name);
        tracing::info!(disk = name, "the migration ended before the switch-over: standby export removed");
    }

    fn registered(&self, id: &str, status: Arc<MigrationStatus>) {
        if let Some(node) = self.0.upgrade() {
            node.register_migration(id, status);
        }
    }

    fn complete(&self, name: &str) {
        let Some(node) = self.0.upgrade() else { return };
        node.held.lock().remove(name);
        if let Some(export) = node.exports.get(name) {
            match CasDevice::open(node.store.clone(), name) {
                Ok(device) => {
                    export.replace_device(Arc::new(device));
                }
                Err(e) => tracing::error!(disk = name, error = %e, "cannot reopen the migrated disk"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_most_recent_finished_migrations_stay_listed() {
        let store = Arc::new(Store::open_in_memory(cas_store::StoreOptions::default()).unwrap());
        let node = Node::new(
            store,
            Arc::new(ExportRegistry::new()),
            false,
            None,
            LinkSocket::default(),
            Arc::new(migration::MemStateStore::default()),
        )
        .unwrap();
        let running = MigrationStatus::new(MigrationReport::new("running", "vm", "source", "peer"));
        node.register_migration("running", running);
        for i in 0..FINISHED_KEPT + 10 {
            let id = format!("done-{i}");
            let status = MigrationStatus::new(MigrationReport::new(&id, "vm", "source", "peer"));
            status.finish(Phase::Done, None);
            node.register_migration(&id, status);
        }
        let listed = node.migrations();
        assert_eq!(listed.len(), FINISHED_KEPT + 1);
        assert!(listed.iter().any(|m| m.id == "running"), "a migration in progress is never dropped");
        assert!(!listed.iter().any(|m| m.id == "done-0"), "the oldest finished ones go");
        assert!(listed.iter().any(|m| m.id == format!("done-{}", FINISHED_KEPT + 9)));
    }
}
