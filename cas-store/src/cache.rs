//! The hot-block cache in front of the engine.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use crate::Fingerprint;

/// One shard of the cache: an LRU of blocks by fingerprint behind its own lock.
type Shard = Mutex<LruCache<Fingerprint, Arc<[u8]>>>;

const SHARDS: usize = 16;

/// An LRU of block contents by fingerprint, bounded in bytes. Blocks are immutable once
/// stored, so an entry can never be stale; it is removed when its block is deleted. Sharded
/// by fingerprint so concurrent readers rarely meet on one lock.
#[derive(Debug)]
pub struct BlockCache {
    shards: Option<Vec<Shard>>,
}

impl BlockCache {
    /// A cache holding at most `capacity_bytes` of `block_size`-byte blocks (0 disables it).
    pub fn new(capacity_bytes: usize, block_size: usize) -> BlockCache {
        let per_shard = capacity_bytes / block_size.max(1) / SHARDS;
        let shards = NonZeroUsize::new(per_shard).map(|n| (0..SHARDS).map(|_| Mutex::new(LruCache::new(n))).collect());
        BlockCache { shards }
    }

    fn shard(&self, fp: &Fingerprint) -> Option<&Shard> {
        self.shards.as_ref().map(|s| &s[fp.0[0] as usize % SHARDS])
    }

    pub fn get(&self, fp: &Fingerprint) -> Option<Arc<[u8]>> {
        self.shard(fp)?.lock().get(fp).cloned()
    }

    pub fn insert(&self, fp: Fingerprint, data: Arc<[u8]>) {
        if let Some(s) = self.shard(&fp) {
            s.lock().put(fp, data);
        }
    }

    pub fn remove(&self, fp: &Fingerprint) {
        if let Some(s) = self.shard(fp) {
            s.lock().pop(fp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_in_bytes() {
        let cache = BlockCache::new(16 * 4 * 4096, 4096); // four blocks per shard
        let fp = |i: u8| Fingerprint([i * SHARDS as u8; 16]); // all in shard 0
        for i in 0..8 {
            cache.insert(fp(i), Arc::from(vec![i; 4096]));
        }
        assert!(cache.get(&fp(0)).is_none());
        assert_eq!(cache.get(&fp(7)).unwrap()[0], 7);
        cache.remove(&fp(7));
        assert!(cache.get(&fp(7)).is_none());
        let off = BlockCache::new(0, 4096);
        off.insert(fp(1), Arc::from(vec![1; 4096]));
        assert!(off.get(&fp(1)).is_none());
    }
}
