//! One storage server's shared state: its store, its exports and its migrations. The control
//! API and the migration listener work through it.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use cas_store::{Store, StoreError};
use migration::{DestHooks, MigrationReport, MigrationStatus, PostCopyDisk, SourceHooks};
use parking_lot::{Mutex, RwLock};

use crate::export::{CasDevice, Export, ExportRegistry, PostCopyDevice};
use crate::link_tls::LinkTls;

/// Addresses a server listens on, as the control API reports them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Addresses {
    /// NBD listeners as URIs (`nbd://127.0.0.1:10809`, `nbd+unix:///?socket=/path`).
    pub nbd: Vec<String>,
    /// Where other servers send migrations (host:port).
    pub migration: Option<String>,
    pub control: Vec<String>,
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
}

impl Node {
    /// A node over `store`. Disks left half-arrived by a migration that died with an earlier
    /// run of the server are removed (their source is still authoritative).
    pub fn new(store: Arc<Store>, exports: Arc<ExportRegistry>, read_only: bool, link_tls: Option<LinkTls>) -> Result<Arc<Node>, StoreError> {
        for disk in store.list_disks()? {
            if disk.name.ends_with(".incoming") {
                tracing::warn!(disk = %disk.name, "removing a partial disk from an interrupted incoming migration");
                store.delete_disk(&disk.name)?;
            }
        }
        Ok(Arc::new(Node {
            store,
            exports,
            read_only,
            addresses: RwLock::new(Addresses::default()),
            migrations: Mutex::new(BTreeMap::new()),
            next_migration: AtomicU64::new(1),
            link_tls,
        }))
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

    /// Exports every disk of the store.
    pub fn export_all(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for disk in self.store.list_disks()? {
            if Self::is_exportable(&disk.name) {
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

    pub fn new_migration_id(&self, prefix: &str) -> String {
        format!("{prefix}-{}", self.next_migration.fetch_add(1, Ordering::Relaxed))
    }

    pub fn register_migration(&self, id: &str, status: Arc<MigrationStatus>) {
        self.migrations.lock().insert(id.to_string(), status);
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
    fn freeze<'a>(&'a self, disk: &'a str) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
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
        // The destination is authoritative now: reads here would return stale data.
        self.0.unexport(disk);
    }
}

/// The destination side's hooks: serve the disk through its post-copy device at the
/// switch-over, and through the store directly once every block is local.
#[derive(Debug)]
pub struct NodeDestHooks(pub Arc<Node>);

impl DestHooks for NodeDestHooks {
    fn switch_over(&self, name: &str, disk: Arc<PostCopyDisk>) -> Result<(), String> {
        let device = PostCopyDevice::new(name, disk);
        let export = Arc::new(Export::new(name, Arc::new(device)).with_read_only(self.0.read_only));
        if let Some(old) = self.0.exports.insert(export) {
            old.close();
        }
        Ok(())
    }

    fn complete(&self, name: &str) {
        if let Some(export) = self.0.exports.get(name) {
            match CasDevice::open(self.0.store.clone(), name) {
                Ok(device) => {
                    export.replace_device(Arc::new(device));
                }
                Err(e) => tracing::error!(disk = name, error = %e, "cannot reopen the migrated disk"),
            }
        }
    }
}
