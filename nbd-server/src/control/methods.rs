//! The control API's methods: parameters and dispatch.

use std::sync::Arc;

use migration::SwitchAfter;
use serde::Deserialize;
use serde_json::{json, Value};

use super::migrations::{cancel_migration, connect, refused, resume_migration, start_migration, switch_migration};
use super::{on_store, params, ControlError, ControlResult};
use crate::access::{AccessRules, Client};
use crate::compaction::DEFAULT_COMPACT_BELOW;
use crate::export::Reach;
use crate::node::Node;

/// Who calls, and the rules that say what they may do. Disks a caller may not use are
/// answered as disks that do not exist (kind `not_found`), and left out of every list;
/// store-wide and migration methods need an administrator (kind `forbidden`).
#[derive(Debug, Clone)]
pub(super) struct Caller {
    pub(super) client: Client,
    pub(super) access: Arc<AccessRules>,
}

impl Caller {
    fn sees(&self, disk: &str) -> bool {
        self.access.may_use(&self.client, disk)
    }

    fn disk(&self, disk: &str) -> Result<(), ControlError> {
        // Disks of incoming migrations (`.incoming`) are an administrator's business.
        if self.sees(disk) && (Node::is_exportable(disk) || self.access.is_admin(&self.client)) {
            Ok(())
        } else {
            tracing::info!(client = %self.client.describe(), disk, "control: disk not allowed to this client");
            Err(ControlError::not_found(format_args!("disk {disk:?}")))
        }
    }

    fn admin(&self, method: &str) -> Result<(), ControlError> {
        if self.access.is_admin(&self.client) {
            Ok(())
        } else {
            tracing::info!(client = %self.client.describe(), method, "control: method needs an administrator");
            Err(ControlError { kind: "forbidden", message: format!("{method} needs an administrator's certificate") })
        }
    }
}

/// `migration.set_bandwidth`: the cap in bits per second (null or 0: none).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBandwidth {
    id: String,
    bandwidth_bps: Option<u64>,
}

/// `disk.snapshot` and `disk.clone`: copy disk `source` as `name`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Copy {
    source: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameSize {
    name: String,
    size: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OptName {
    name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Gc {
    #[serde(default)]
    below: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Fsck {
    #[serde(default)]
    verify: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StartMigration {
    pub(super) disk: String,
    /// The destination server's migration address (host:port).
    pub(super) destination: String,
    pub(super) switch_after: Option<SwitchAfter>,
    pub(super) zstd_level: Option<i32>,
    pub(super) max_rounds: Option<u32>,
    pub(super) converge_blocks: Option<u64>,
    #[serde(default)]
    pub(super) delete_source: bool,
    pub(super) bandwidth_bps: Option<u64>,
    /// Seconds the source keeps reconnecting after a lost link before the migration is
    /// interrupted (default 600).
    pub(super) reconnect_window_secs: Option<u64>,
    /// Compress block data as one zstd stream per connection (default true).
    pub(super) data_stream: Option<bool>,
    /// Send blocks similar to ones the destination holds as deltas (default true).
    pub(super) delta: Option<bool>,
    /// A gang this migration joins (disks moved together): content several members lack
    /// crosses once, and the members share one bandwidth cap.
    pub(super) gang: Option<String>,
}

/// Disks a gang plan may name at most.
const MAX_GANG: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    /// One disk, or several (`disks`): a gang planned as one migration.
    #[serde(default)]
    disk: Option<String>,
    #[serde(default)]
    disks: Vec<String>,
    destination: String,
    link_rate_bps: Option<u64>,
    zstd_level: Option<i32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Id {
    id: String,
}

pub(super) async fn dispatch(node: &Arc<Node>, caller: &Caller, method: &str, p: Value) -> ControlResult {
    if method.starts_with("migration.") || method == "store.gc" || method == "store.fsck" || method == "store.stats" {
        caller.admin(method)?;
    }
    match method {
        "server.info" => {
            let store = &node.store;
            Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "block_size": store.block_size(),
                "algorithm": store.algorithm(),
                "addresses": *node.addresses.read(),
                "exports": node.exports.list().iter().map(|e| e.name().to_string()).filter(|n| caller.sees(n)).collect::<Vec<_>>(),
            }))
        }
        "disk.list" => {
            let disks = on_store(node, |s| s.list_disks()).await?;
            Ok(json!(disks
                .into_iter()
                .filter(|d| Node::is_exportable(&d.name) && caller.sees(&d.name))
                // The origin only if the caller may see it too (a clone made across tenants).
                .map(|d| (d.origin.clone().filter(|o| caller.sees(o)), d))
                .map(|(origin, d)| json!({"name": d.name, "size": d.size, "read_only": d.read_only, "origin": origin, "exported": node.exports.get(&d.name).is_some()}))
                .collect::<Vec<_>>()))
        }
        "disk.create" => {
            let NameSize { name, size } = params(p)?;
            caller.disk(&name)?;
            if !Node::is_exportable(&name) {
                return Err(ControlError::invalid("names ending in .incoming are reserved for migrations"));
            }
            let info = on_store(node, move |s| s.create_disk(&name, size)).await?;
            node.export_disk(&info.name)?;
            Ok(json!(info))
        }
        "disk.snapshot" | "disk.clone" => {
            let Copy { source, name } = params(p)?;
            caller.disk(&source)?;
            caller.disk(&name)?;
            if !Node::is_exportable(&name) || !Node::is_exportable(&source) {
                return Err(ControlError::invalid("names ending in .incoming are reserved for migrations"));
            }
            let read_only = method == "disk.snapshot";
            // Writes answered before they reached the store belong in the copy.
            let exported = node.exports.get(&source);
            let info = on_store(node, move |s| {
                if let Some(export) = exported {
                    export.writes_behind().settle(Reach::Everything);
                }
                if read_only {
                    s.snapshot_disk(&source, &name)
                } else {
                    s.clone_disk(&source, &name)
                }
            })
            .await?;
            node.export_disk(&info.name)?;
            Ok(json!(info))
        }
        "disk.delete" => {
            let Name { name } = params(p)?;
            caller.disk(&name)?;
            if node.migrations().iter().any(|m| m.disk == name && !m.is_finished()) {
                return Err(ControlError { kind: "busy", message: format!("disk {name:?} is migrating") });
            }
            node.store.disk(&name)?;
            node.unexport(&name);
            on_store(node, move |s| s.delete_disk(&name)).await?;
            Ok(json!({}))
        }
        "disk.resize" => {
            let NameSize { name, size } = params(p)?;
            caller.disk(&name)?;
            let exported = node.exports.get(&name);
            let info = on_store(node, move |s| {
                // A shrink must not cut off a write the client was told is done.
                if let Some(export) = exported {
                    export.writes_behind().settle(Reach::Everything);
                }
                s.resize_disk(&name, size)
            })
            .await?;
            Ok(json!(info))
        }
        "disk.stats" | "store.stats" => {
            let OptName { name } = params(p)?;
            if let Some(n) = &name {
                caller.disk(n)?;
            }
            // The store's totals cover every tenant: for administrators only.
            let admin = caller.access.is_admin(&caller.client);
            let caller = caller.clone();
            on_store(node, move |s| {
                let names: Vec<String> = match name {
                    Some(n) => vec![n],
                    None => s
                        .list_disks()?
                        .into_iter()
                        .map(|d| d.name)
                        .filter(|n| Node::is_exportable(n) && caller.sees(n))
                        .collect(),
                };
                let disks = names.iter().map(|n| s.disk_stats(n)).collect::<Result<Vec<_>, _>>()?;
                let store = if admin { Some(s.stats()?) } else { None };
                let mut disks = json!(disks);
                if !admin {
                    // Sharing counts every tenant's blocks: writing a guessed block and reading
                    // them again would tell whether another tenant holds that content.
                    for d in disks.as_array_mut().into_iter().flatten() {
                        d["shared_bytes"] = Value::Null;
                        d["exclusive_bytes"] = Value::Null;
                    }
                }
                Ok(json!({"store": store, "disks": disks}))
            })
            .await
        }
        "store.gc" => {
            let Gc { below } = params(p)?;
            let below = below.unwrap_or(DEFAULT_COMPACT_BELOW);
            if !(0.0..=1.0).contains(&below) {
                return Err(ControlError::invalid(format!("below {below} is not a share from 0 to 1")));
            }
            let report = on_store(node, move |s| s.compact(below)).await?;
            Ok(json!(report))
        }
        "store.fsck" => {
            let Fsck { verify } = params(p)?;
            let report = on_store(node, move |s| s.fsck(verify)).await?;
            Ok(json!(report))
        }
        "export.stats" => {
            let OptName { name } = params(p)?;
            let exports = match name {
                Some(n) => vec![node
                    .exports
                    .get(&n)
                    .filter(|e| caller.sees(e.name()))
                    .ok_or_else(|| ControlError::not_found(format_args!("export {n:?}")))?],
                None => node.exports.list().into_iter().filter(|e| caller.sees(e.name())).collect(),
            };
            Ok(json!(exports
                .iter()
                .map(|e| json!({"name": e.name(), "stats": e.stats().snapshot()}))
                .collect::<Vec<_>>()))
        }
        "migration.start" => {
            let req: StartMigration = params(p)?;
            let id = start_migration(node, req).await?;
            Ok(json!({"id": id}))
        }
        "migration.status" => {
            let Id { id } = params(p)?;
            node.migration(&id)
                .map(|r| json!(r))
                .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })
        }
        "migration.list" => Ok(json!(node.migrations())),
        "migration.cancel" => {
            let Id { id } = params(p)?;
            cancel_migration(node, &id).await?;
            Ok(json!({}))
        }
        "migration.switch" => {
            let Id { id } = params(p)?;
            let report = switch_migration(node, &id).await?;
            Ok(json!(report))
        }
        "migration.set_bandwidth" => {
            let SetBandwidth { id, bandwidth_bps } = params(p)?;
            let status = node
                .migration_status(&id)
                .ok_or_else(|| ControlError { kind: "not_found", message: format!("no migration {id:?}") })?;
            status.set_bandwidth(bandwidth_bps.filter(|&r| r > 0)).map_err(refused)?;
            // In the record too: a restart of this server keeps the cap.
            status.persist_cap(node.state.clone()).await.map_err(|e| ControlError {
                kind: "failed",
                message: format!("the cap is in force, but recording it for a restart failed: {e}"),
            })?;
            Ok(json!(status.report()))
        }
        "migration.resume" => {
            let Id { id } = params(p)?;
            resume_migration(node, &id)?;
            Ok(json!({}))
        }
        "migration.plan" => {
            let req: Plan = params(p)?;
            let disks: Vec<String> = req.disk.into_iter().chain(req.disks).collect();
            if disks.is_empty() || disks.len() > MAX_GANG {
                return Err(ControlError {
                    kind: "invalid",
                    message: format!("give one disk or a gang of up to {MAX_GANG} (disk or disks)"),
                });
            }
            if disks.iter().collect::<std::collections::HashSet<_>>().len() != disks.len() {
                return Err(ControlError { kind: "invalid", message: "a disk is named twice".into() });
            }
            for d in &disks {
                node.store.disk(d)?;
            }
            let stream = connect(node, &req.destination).await?;
            let report = migration::run_plan(
                node.store.clone(),
                &disks,
                &req.destination,
                stream,
                req.link_rate_bps,
                req.zstd_level.unwrap_or(3),
            )
            .await
            .map_err(|e| ControlError { kind: "failed", message: e.to_string() })?;
            Ok(json!(report))
        }
        other => Err(ControlError { kind: "unknown_method", message: format!("unknown method {other:?}") }),
    }
}
