//! Test data: blocks of 4 KiB that no other block equals.

pub const BS: usize = 4096;

/// `blocks` blocks, each unique (xorshift from the seed and the block's index) and
/// incompressible-looking.
pub fn unique(seed: u64, blocks: usize) -> Vec<u8> {
    let mut out = vec![0u8; blocks * BS];
    for (i, block) in out.chunks_mut(BS).enumerate() {
        let mut x = (seed << 32 | i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for word in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
    }
    out
}
