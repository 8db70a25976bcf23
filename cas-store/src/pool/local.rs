//! The local pool: blocks in the store's own engine.

use std::sync::Arc;

use super::{BlockPool, Claim, Claimed, PoolBlock, PoolScan};
use crate::engine::{Cf, KvEngine, WriteBatch};
use crate::keys::{parse_count, parse_fingerprint};
use crate::{Fingerprint, Result};

/// Blocks in the `blocks` column family of the store's engine; the store's `refs` entries are
/// the references (one holder: the store). Claims and releases join the store's write batch,
/// so a map change and everything it does to blocks commit atomically.
#[derive(Debug)]
pub struct LocalPool {
    engine: Arc<dyn KvEngine>,
}

impl LocalPool {
    pub fn new(engine: Arc<dyn KvEngine>) -> LocalPool {
        LocalPool { engine }
    }
}

impl BlockPool for LocalPool {
    fn kind(&self) -> &'static str {
        "rocksdb"
    }

    fn location(&self) -> String {
        "rocksdb".into()
    }

    fn is_external(&self) -> bool {
        false
    }

    fn acquire(&self, _holder: &str, claims: &[(Fingerprint, Claim<'_>)], batch: &mut WriteBatch) -> Result<Vec<Claimed>> {
        // The store claims only fingerprints its `refs` do not hold, and here a block is stored
        // exactly while it has a `refs` entry: every claim is of a block that is not stored.
        Ok(claims
            .iter()
            .map(|(fp, claim)| match claim {
                Claim::Data(bytes) => {
                    batch.put(Cf::Blocks, fp.0, bytes.to_vec());
                    Claimed::Yes
                }
                Claim::Existing => Claimed::Missing,
            })
            .collect())
    }

    fn release(&self, _holder: &str, fps: &[Fingerprint], batch: &mut WriteBatch) -> Result<()> {
        for fp in fps {
            batch.delete(Cf::Blocks, fp.0);
        }
        Ok(())
    }

    fn has_many(&self, fps: &[Fingerprint]) -> Result<Vec<bool>> {
        // The small `refs` entries answer without touching block bytes (blob files).
        let keys: Vec<&[u8]> = fps.iter().map(|fp| &fp.0[..]).collect();
        Ok(self.engine.multi_get(Cf::Refs, &keys)?.into_iter().map(|v| v.is_some()).collect())
    }

    fn get_many(&self, fps: &[Fingerprint]) -> Result<Vec<Option<Vec<u8>>>> {
        let keys: Vec<&[u8]> = fps.iter().map(|fp| &fp.0[..]).collect();
        self.engine.multi_get(Cf::Blocks, &keys)
    }

    fn holder_refs(&self, _holder: &str, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>> {
        let keys: Vec<&[u8]> = fps.iter().map(|fp| &fp.0[..]).collect();
        self.engine.multi_get(Cf::Refs, &keys)?.into_iter().map(|v| v.map(|v| parse_count(&v)).transpose()).collect()
    }

    fn scan(&self, _holder: &str) -> Result<PoolScan> {
        let iter = self.engine.scan(Cf::Refs, b"", None)?;
        Ok(Box::new(iter.map(|kv| {
            let (k, v) = kv?;
            let count = parse_count(&v)?;
            Ok(PoolBlock { fingerprint: parse_fingerprint(&k)?, holder_refs: count, total_refs: count })
        })))
    }
}
