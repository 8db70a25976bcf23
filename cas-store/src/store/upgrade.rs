//! Converting a store of format 1 (block bytes as values in RocksDB's `blocks` column family)
//! to format 3 (block bytes in containers, RocksDB as their index).
//!
//! The conversion moves blocks in batches: it appends a batch's bytes to a container, syncs
//! it, then in one engine batch gives each block's `refs` entry its location and deletes the
//! block from `blocks`. A crash leaves each block either converted (an entry with a location,
//! no value in `blocks`) or not (the reverse), and at worst unreferenced bytes in a container
//! that compaction reclaims; running the command again finishes the job. Map entries keep the
//! short form (no location hint): reads resolve them through `refs`, and rewrites add hints.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{read_config, write_config, EngineContainerIds, CONTAINERS_DIR, FORMAT_VERSION_CONTAINERS, FORMAT_VERSION_ENGINE_BLOCKS};
use crate::container::{Containers, FsContainerDir};
use crate::engine::{Cf, KvEngine, RocksEngine, WriteBatch};
use crate::keys::*;
use crate::{Result, StoreError, StoreOptions};

/// Blocks moved per batch.
const UPGRADE_BATCH: usize = 1024;

/// What [`super::Store::upgrade`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The format found and the format now.
    pub from_format: u32,
    pub to_format: u32,
    /// Blocks moved from RocksDB to containers.
    pub blocks_moved: u64,
}

impl super::Store {
    /// Converts the store in `path` to the current format, in place. A store in the current
    /// format is left alone. Not while a server has the store open (RocksDB's lock refuses).
    pub fn upgrade(path: impl AsRef<Path>, opts: &StoreOptions) -> Result<UpgradeReport> {
        let path = path.as_ref();
        let engine = RocksEngine::open(path, &opts.rocks)?;
        let Some(mut config) = read_config(&engine)? else {
            return Err(StoreError::InvalidArgument(format!("{} holds no store", path.display())));
        };
        let mut report = UpgradeReport { from_format: config.format_version, to_format: config.format_version, blocks_moved: 0 };
        if config.format_version != FORMAT_VERSION_ENGINE_BLOCKS || config.blocks.is_some() {
            return Ok(report);
        }
        let recorded = engine.get(Cf::Meta, NEXT_CONTAINER_ID_KEY)?.and_then(|v| v.as_slice().try_into().ok().map(u32::from_le_bytes)).unwrap_or(0);
        let dir = FsContainerDir::open(&path.join(CONTAINERS_DIR))?;
        let containers = Containers::open(Arc::new(dir), config.block_size, opts.container_bytes, recorded)?;
        loop {
            // Converted blocks are deleted from `blocks`, so each pass starts at the front.
            let batch: Vec<(Box<[u8]>, Box<[u8]>)> = engine.scan(Cf::Blocks, b"", None)?.take(UPGRADE_BATCH).collect::<Result<_>>()?;
            if batch.is_empty() {
                break;
            }
            report.blocks_moved += convert_batch(&engine, &containers, config.block_size, &batch)?;
        }
        containers.sync()?;
        engine.sync()?;
        config.format_version = FORMAT_VERSION_CONTAINERS;
        write_config(&engine, &config)?;
        report.to_format = FORMAT_VERSION_CONTAINERS;
        tracing::info!(?report, store = %path.display(), "store converted to block containers");
        Ok(report)
    }
}

fn convert_batch(engine: &dyn KvEngine, containers: &Containers, block_size: u32, batch: &[(Box<[u8]>, Box<[u8]>)]) -> Result<u64> {
    let mut fps = Vec::with_capacity(batch.len());
    for (k, v) in batch {
        if v.len() != block_size as usize {
            return Err(StoreError::Corrupt(format!("block {} has {} bytes, not {block_size}", parse_fingerprint(k)?, v.len())));
        }
        fps.push(parse_fingerprint(k)?);
    }
    let keys: Vec<&[u8]> = fps.iter().map(|fp| &fp.0[..]).collect();
    let refs = engine.multi_get(Cf::Refs, &keys)?;
    let bytes: Vec<&[u8]> = batch.iter().map(|(_, v)| &v[..]).collect();
    let locations = containers.append(&bytes, &EngineContainerIds(engine))?;
    containers.sync()?;
    let mut wb = WriteBatch::new();
    let mut moved = 0;
    for ((fp, count), loc) in fps.iter().zip(refs).zip(locations) {
        wb.delete(Cf::Blocks, fp.0);
        match count {
            // A block nothing references (damage fsck reported): dropped.
            None => tracing::warn!(fingerprint = %fp, "dropping a stored block with no reference count"),
            Some(count) => {
                wb.put(Cf::Refs, fp.0, encode_ref(RefEntry { count: parse_count(&count)?, location: Some(loc) }));
                moved += 1;
            }
        }
    }
    engine.write(wb)?;
    Ok(moved)
}
