//! Test data.

use std::path::Path;

/// Deterministic incompressible bytes (xorshift): nothing deduplicates or compresses.
pub fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A deterministic VM disk written to `path` (and returned): its first `os` blocks are the
/// ones any VM of that OS has, the rest its own (`own_seed`); every `zero_every`th block is
/// zero (0: none). Each block is half text-like (compressible), half noise.
pub fn vm_image(path: &Path, blocks: usize, os: usize, own_seed: u64, zero_every: usize) -> Vec<u8> {
    let mut data = vec![0u8; blocks * 4096];
    for b in 0..blocks {
        if zero_every > 0 && b % zero_every == 0 {
            continue;
        }
        let seed = if b < os { b as u64 + 1 } else { own_seed * 1_000_000 + b as u64 };
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for (i, chunk) in data[b * 4096..(b + 1) * 4096].chunks_mut(8).enumerate() {
            // Half text-like (compressible), half noise.
            if i < 256 {
                chunk.copy_from_slice(format!("{:08}", (seed + i as u64 / 16) % 100_000_000).as_bytes());
            } else {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    std::fs::write(path, &data).unwrap();
    data
}
