//! A bounded memory of the fingerprints that crossed lately.
//!
//! The source remembers what it sent so as not to send a block twice on one connection (a
//! FETCH may name a block a WANT already brought) and to count what a lost link made cross
//! again; the destination remembers what arrived, to tell an in-disk duplicate from a
//! neighbour's block in its report. Remembering every fingerprint would grow with the disk
//! (10 M blocks: hundreds of MiB), so each remembers the most recent `capacity` only: a block
//! forgotten and asked for again crosses again (the destination ignores what it no longer
//! wants), and the resent and duplicate counts of a very large migration may come out low
//! (a duplicate far from its first copy is then counted as a neighbour's block).

use std::num::NonZeroUsize;

use cas_store::Fingerprint;

/// Fingerprints remembered per set: about 18 MiB at about 72 bytes an entry.
pub(crate) const REMEMBERED: usize = 256 * 1024;

#[derive(Debug)]
pub(crate) struct RecentFingerprints(lru::LruCache<Fingerprint, ()>);

impl RecentFingerprints {
    pub(crate) fn new(capacity: usize) -> RecentFingerprints {
        RecentFingerprints(lru::LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("at least 1")))
    }

    /// Remembers `fp`; false if it was remembered already (crossed lately).
    pub(crate) fn insert(&mut self, fp: Fingerprint) -> bool {
        if self.0.get(&fp).is_some() {
            return false;
        }
        self.0.put(fp, ());
        true
    }

    /// Whether `fp` crossed lately (without refreshing it).
    pub(crate) fn contains(&self, fp: &Fingerprint) -> bool {
        self.0.contains(fp)
    }

    pub(crate) fn remove(&mut self, fp: &Fingerprint) {
        self.0.pop(fp);
    }
}

impl Default for RecentFingerprints {
    fn default() -> Self {
        RecentFingerprints::new(REMEMBERED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_the_most_recent_only() {
        let fp = |i: u8| Fingerprint([i; 16]);
        let mut r = RecentFingerprints::new(2);
        assert!(r.insert(fp(1)));
        assert!(!r.insert(fp(1)), "sent lately");
        assert!(r.insert(fp(2)));
        assert!(r.insert(fp(3)), "fills past the capacity");
        assert!(r.insert(fp(1)), "the oldest was forgotten");
        r.remove(&fp(1));
        assert!(!r.contains(&fp(1)));
        assert!(r.insert(fp(1)));
        assert!(r.contains(&fp(1)));
    }
}
