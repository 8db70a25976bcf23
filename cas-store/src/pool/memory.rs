//! An external pool in memory, with the reference semantics of Ceph's `cas` object class:
//! tests of stores that share a pool, without a cluster.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{BlockPool, Claim, Claimed, PoolBlock, PoolScan, PoolSettings};
use crate::{Fingerprint, Result, StoreError};

/// Per block: its bytes and the holders of its references (a multiset).
type Blocks = BTreeMap<Fingerprint, (Arc<[u8]>, Vec<String>)>;

#[derive(Debug, Default)]
struct Faults {
    /// Release calls that fail before the pool sees them.
    fail_releases: u64,
    /// Acquire calls that the pool applies but whose reply is lost (the caller sees an error).
    lose_acquire_replies: u64,
}

/// Blocks and, per block, the multiset of holders that reference it (as `cas`'s
/// `chunk_create_or_get_ref` / `chunk_put_ref` keep it): a block is deleted when its last
/// reference is put. Share one `Arc<MemPool>` between stores to model storage servers that
/// share a RADOS pool.
#[derive(Debug, Default)]
pub struct MemPool {
    blocks: Mutex<Blocks>,
    settings: Mutex<Option<PoolSettings>>,
    faults: Mutex<Faults>,
}

impl MemPool {
    pub fn new() -> MemPool {
        MemPool::default()
    }

    /// Makes the next `n` release calls fail without releasing anything (a crash or a lost
    /// connection between the store's commit and its release).
    pub fn fail_next_releases(&self, n: u64) {
        self.faults.lock().fail_releases = n;
    }

    /// Makes the next `n` acquire calls take their references but report an error (a reply
    /// lost to a timeout).
    pub fn lose_next_acquire_replies(&self, n: u64) {
        self.faults.lock().lose_acquire_replies = n;
    }

    /// Number of blocks stored.
    pub fn len(&self) -> usize {
        self.blocks.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn injected(what: &str) -> StoreError {
    StoreError::Engine(format!("memory pool: injected failure of {what}"))
}

impl BlockPool for MemPool {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn location(&self) -> String {
        "memory".into()
    }

    fn attach(&self, settings: &PoolSettings) -> Result<()> {
        let mut recorded = self.settings.lock();
        match &*recorded {
            None => *recorded = Some(settings.clone()),
            Some(s) if s == settings => {}
            Some(s) => return Err(StoreError::ConfigMismatch { setting: "pool settings", stored: format!("{s:?}"), requested: format!("{settings:?}") }),
        }
        Ok(())
    }

    fn acquire(&self, holder: &str, claims: &[(Fingerprint, Claim<'_>)]) -> Result<Vec<Claimed>> {
        let mut blocks = self.blocks.lock();
        let mut out = Vec::with_capacity(claims.len());
        for (fp, claim) in claims {
            let result = match (blocks.get_mut(fp), claim) {
                (None, Claim::Existing) => Claimed::Missing,
                (None, Claim::Data(bytes)) => {
                    blocks.insert(*fp, (Arc::from(*bytes), vec![holder.to_string()]));
                    Claimed::Yes
                }
                (Some((stored, _)), Claim::Data(bytes)) if &stored[..] != *bytes => Claimed::Collision,
                (Some((_, holders)), _) => {
                    holders.push(holder.to_string());
                    Claimed::Yes
                }
            };
            out.push(result);
        }
        let mut faults = self.faults.lock();
        if faults.lose_acquire_replies > 0 {
            faults.lose_acquire_replies -= 1;
            return Err(injected("an acquire reply"));
        }
        Ok(out)
    }

    fn release(&self, holder: &str, fps: &[Fingerprint]) -> Result<()> {
        {
            let mut faults = self.faults.lock();
            if faults.fail_releases > 0 {
                faults.fail_releases -= 1;
                return Err(injected("a release"));
            }
        }
        let mut blocks = self.blocks.lock();
        for fp in fps {
            if let Some((_, holders)) = blocks.get_mut(fp) {
                if let Some(i) = holders.iter().position(|h| h == holder) {
                    holders.swap_remove(i);
                }
                if holders.is_empty() {
                    blocks.remove(fp);
                }
            }
        }
        Ok(())
    }

    fn has_many(&self, fps: &[Fingerprint]) -> Result<Vec<bool>> {
        let blocks = self.blocks.lock();
        Ok(fps.iter().map(|fp| blocks.contains_key(fp)).collect())
    }

    fn get_many(&self, fps: &[Fingerprint]) -> Result<Vec<Option<Vec<u8>>>> {
        let blocks = self.blocks.lock();
        Ok(fps.iter().map(|fp| blocks.get(fp).map(|(b, _)| b.to_vec())).collect())
    }

    fn holder_refs(&self, holder: &str, fps: &[Fingerprint]) -> Result<Vec<Option<u64>>> {
        let blocks = self.blocks.lock();
        Ok(fps.iter().map(|fp| blocks.get(fp).map(|(_, hs)| hs.iter().filter(|h| *h == holder).count() as u64)).collect())
    }

    fn scan(&self, holder: &str) -> Result<PoolScan> {
        let blocks = self.blocks.lock();
        let items: Vec<Result<PoolBlock>> = blocks
            .iter()
            .map(|(fp, (_, hs))| {
                Ok(PoolBlock { fingerprint: *fp, holder_refs: hs.iter().filter(|h| *h == holder).count() as u64, total_refs: hs.len() as u64 })
            })
            .collect();
        Ok(Box::new(items.into_iter()))
    }
}
