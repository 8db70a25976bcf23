//! Dirty-block bitmaps: which blocks of a disk changed since a point in time.

/// One bit per block. Migration starts tracking before it reads a map snapshot, then takes
/// (reads and clears) the bitmap once per pre-copy round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    blocks: u64,
}

impl DirtyBitmap {
    pub fn new(blocks: u64) -> DirtyBitmap {
        let words = usize::try_from(blocks.div_ceil(64)).expect("bitmap fits in memory");
        DirtyBitmap { words: vec![0; words], blocks }
    }

    /// Number of blocks the bitmap covers.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn set(&mut self, block: u64) {
        if block >= self.blocks {
            self.grow(block + 1);
        }
        self.words[(block / 64) as usize] |= 1 << (block % 64);
    }

    pub fn get(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Covers at least `blocks` blocks (a disk grew while being tracked).
    pub fn grow(&mut self, blocks: u64) {
        if blocks > self.blocks {
            self.blocks = blocks;
            self.words.resize(blocks.div_ceil(64) as usize, 0);
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// The set blocks, in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some(i as u64 * 64 + u64::from(bit))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_iter_count() {
        let mut b = DirtyBitmap::new(130);
        for i in [0, 63, 64, 129] {
            b.set(i);
        }
        assert_eq!(b.iter().collect::<Vec<_>>(), vec![0, 63, 64, 129]);
        assert_eq!(b.count(), 4);
        assert!(b.get(63) && !b.get(62) && !b.get(1000));
        b.set(200);
        assert_eq!(b.blocks(), 201);
        assert_eq!(b.count(), 5);
        assert!(!DirtyBitmap::new(10).get(3));
        assert!(DirtyBitmap::new(10).is_empty());
    }
}
