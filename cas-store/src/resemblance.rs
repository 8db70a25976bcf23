//! Resemblance sketches: find a stored block that is *similar* to a given one.
//!
//! A block the destination lacks is often a few bytes away from one it holds (a database
//! page with a changed row, a log that grew, a file one patch level apart). Those pairs
//! are found with super-features (Broder; Shilane et al., FAST'12), computed as Odess does
//! (Zhang et al., HotStorage'21): a gear rolling hash over the block picks sample positions
//! by content (about one byte in 64), each of [`FEATURES`] linear transforms of the hash
//! keeps its maximum over the samples, and groups of [`FEATURES_PER_SUPER`] features are
//! hashed into one super-feature. Two blocks that share a super-feature share, with high
//! probability, most of their content; a change of a few bytes moves only the samples
//! within a gear window (64 bytes) of it, so most features, and usually at least one of
//! the [`SUPER_FEATURES`] super-features, stay.
//!
//! Pure functions, no I/O: the store persists sketches and the migration looks them up.

use twox_hash::XxHash3_128;

/// Linear transforms whose maxima are the features.
pub const FEATURES: usize = 12;
/// Features hashed into one super-feature.
pub const FEATURES_PER_SUPER: usize = 4;
/// Super-features per block: a block is a candidate reference when one of them matches.
pub const SUPER_FEATURES: usize = FEATURES / FEATURES_PER_SUPER;

/// A sample position is one where the gear hash's top bits are zero: one in 64 on
/// random data, 64 samples per 4 KiB block.
const SAMPLE_MASK: u64 = 0xFC00_0000_0000_0000;

/// The super-features of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sketch(pub [u64; SUPER_FEATURES]);

impl Sketch {
    /// How many super-features two sketches share (same position).
    pub fn matches(&self, other: &Sketch) -> usize {
        self.0.iter().zip(other.0.iter()).filter(|(a, b)| a == b).count()
    }
}

const fn splitmix64(state: u64) -> (u64, u64) {
    let state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (state, z ^ (z >> 31))
}

/// The gear table and the transforms are fixed: both ends of a migration, and every
/// version of a store, must compute the same sketch for the same block.
const fn tables() -> ([u64; 256], [(u64, u64); FEATURES]) {
    let mut gear = [0u64; 256];
    let mut transforms = [(0u64, 0u64); FEATURES];
    let mut state = 0x6E62_642D_6361_7321; // "nbd-cas!"
    let mut i = 0;
    while i < 256 {
        let (s, v) = splitmix64(state);
        state = s;
        gear[i] = v;
        i += 1;
    }
    let mut f = 0;
    while f < FEATURES {
        let (s, m) = splitmix64(state);
        let (s, a) = splitmix64(s);
        state = s;
        transforms[f] = (m | 1, a);
        f += 1;
    }
    (gear, transforms)
}

const TABLES: ([u64; 256], [(u64, u64); FEATURES]) = tables();

/// The sketch of a block, or `None` when the block has too little variety to sample (a
/// run of one byte value, most zero-filled blocks): such blocks are found by
/// deduplication, not by resemblance.
pub fn sketch(block: &[u8]) -> Option<Sketch> {
    let (gear, transforms) = &TABLES;
    let mut features = [0u64; FEATURES];
    let mut hash = 0u64;
    let mut samples = 0usize;
    // A run of one byte value settles the hash on one value: sampled everywhere or nowhere,
    // and either way it says nothing about resemblance.
    let mut first_sample = None;
    let mut varied = false;
    // Sample positions only once the hash covers a full window of 64 bytes.
    let (head, tail) = block.split_at(block.len().min(63));
    for &byte in head {
        hash = (hash << 1).wrapping_add(gear[byte as usize]);
    }
    for &byte in tail {
        hash = (hash << 1).wrapping_add(gear[byte as usize]);
        if hash & SAMPLE_MASK == 0 {
            samples += 1;
            match first_sample {
                None => first_sample = Some(hash),
                Some(first) => varied |= first != hash,
            }
            for (feature, &(m, a)) in features.iter_mut().zip(transforms.iter()) {
                let value = hash.wrapping_mul(m).wrapping_add(a);
                if value > *feature {
                    *feature = value;
                }
            }
        }
    }
    if samples < 2 || !varied {
        return None;
    }
    let mut supers = [0u64; SUPER_FEATURES];
    for (super_feature, group) in supers.iter_mut().zip(features.chunks_exact(FEATURES_PER_SUPER)) {
        let mut bytes = [0u8; 8 * FEATURES_PER_SUPER];
        for (chunk, feature) in bytes.chunks_exact_mut(8).zip(group) {
            chunk.copy_from_slice(&feature.to_le_bytes());
        }
        *super_feature = XxHash3_128::oneshot(&bytes) as u64;
    }
    Some(Sketch(supers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_block(seed: u64) -> Vec<u8> {
        // words from a small vocabulary, like the text-like content of real disks
        let words = [
            "the ",
            "order ",
            "status ",
            "paid ",
            "shipped ",
            "customer ",
            "street ",
            "berlin ",
            "price ",
            "stock ",
            "event ",
            "session ",
            "review ",
            "page ",
            "view ",
            "cart ",
        ];
        let mut state = seed;
        let mut out = Vec::with_capacity(4096);
        while out.len() < 4096 {
            let (s, v) = splitmix64(state);
            state = s;
            out.extend_from_slice(words[(v % 16) as usize].as_bytes());
            out.extend_from_slice(format!("{} ", v % 1000).as_bytes());
        }
        out.truncate(4096);
        out
    }

    #[test]
    fn the_same_block_has_the_same_sketch() {
        let block = text_block(1);
        assert_eq!(sketch(&block), sketch(&block.clone()));
    }

    #[test]
    fn a_few_changed_bytes_keep_a_super_feature() {
        let mut similar = 0;
        for seed in 0..100 {
            let block = text_block(seed);
            let mut changed = block.clone();
            // a row updated in place: eight bytes at one spot
            let at = (seed as usize * 37) % 4000;
            changed[at..at + 8].copy_from_slice(b"refunded");
            let (a, b) = (sketch(&block).unwrap(), sketch(&changed).unwrap());
            if a.matches(&b) > 0 {
                similar += 1;
            }
        }
        assert!(similar >= 95, "only {similar} of 100 slightly changed blocks keep a super-feature");
    }

    #[test]
    fn unrelated_blocks_share_no_super_feature() {
        let sketches: Vec<Sketch> = (1000..1200).map(|s| sketch(&text_block(s)).unwrap()).collect();
        for (i, a) in sketches.iter().enumerate() {
            for b in &sketches[i + 1..] {
                assert_eq!(a.matches(b), 0);
            }
        }
    }

    #[test]
    fn a_run_of_one_byte_has_no_sketch() {
        for value in 0..=255u8 {
            assert_eq!(sketch(&[value; 4096]), None, "a block of {value:#x}");
        }
    }
}
