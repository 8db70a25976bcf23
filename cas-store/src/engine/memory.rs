//! An in-memory engine for tests: one ordered map per column family.

use std::collections::BTreeMap;
use std::ops::Bound;

use parking_lot::RwLock;

use super::{BatchOp, Cf, KvEngine, KvPair, ScanIter, WriteBatch};
use crate::Result;

type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// Keeps everything in memory; nothing survives a drop. Scans copy the range they cover, which
/// gives them the same point-in-time view as a RocksDB iterator.
#[derive(Debug, Default)]
pub struct MemEngine {
    tables: RwLock<[Table; Cf::ALL.len()]>,
}

impl MemEngine {
    pub fn new() -> MemEngine {
        MemEngine::default()
    }
}

impl KvEngine for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tables.read()[cf.index()].get(key).cloned())
    }

    fn multi_get(&self, cf: Cf, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>> {
        let tables = self.tables.read();
        Ok(keys.iter().map(|k| tables[cf.index()].get(*k).cloned()).collect())
    }

    fn write(&self, batch: WriteBatch) -> Result<()> {
        let mut tables = self.tables.write();
        for op in batch.ops {
            match op {
                BatchOp::Put(cf, k, v) => {
                    tables[cf.index()].insert(k, v);
                }
                BatchOp::Delete(cf, k) => {
                    tables[cf.index()].remove(&k);
                }
                BatchOp::DeleteRange(cf, start, end) => {
                    let table = &mut tables[cf.index()];
                    let doomed: Vec<Vec<u8>> = table.range(start..end).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        table.remove(&k);
                    }
                }
                BatchOp::AddToCount(cf, k, addend) => {
                    let table = &mut tables[cf.index()];
                    let merged = super::add_to_counter(table.get(&k).map(Vec::as_slice), std::iter::once(&addend[..]))
                        .ok_or_else(|| crate::StoreError::Corrupt(format!("counter merge on a value of {} bytes", table.get(&k).map_or(0, Vec::len))))?;
                    table.insert(k, merged);
                }
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>) -> Result<ScanIter> {
        let tables = self.tables.read();
        let upper = match end {
            Some(e) => Bound::Excluded(e.to_vec()),
            None => Bound::Unbounded,
        };
        let items: Vec<Result<KvPair>> = tables[cf.index()]
            .range((Bound::Included(start.to_vec()), upper))
            .map(|(k, v)| Ok((k.clone().into_boxed_slice(), v.clone().into_boxed_slice())))
            .collect();
        Ok(Box::new(items.into_iter()))
    }
}
