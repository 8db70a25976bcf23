//! 128-bit block fingerprints.
//!
//! The algorithm is fixed per store and recorded in it. BLAKE3 (truncated to 128 bits) is the
//! default: neighbour blocks belong to other tenants, and a fingerprint a tenant could collide
//! on purpose would let one tenant's data appear in another's disk. XXH3-128 is faster and fine
//! for a trusted single-tenant store; the store compares bytes before sharing a block anyway.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A block's content address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 16]);

impl Fingerprint {
    pub const LEN: usize = 16;

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// Parses a fingerprint from exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Fingerprint> {
        bytes.try_into().ok().map(Fingerprint)
    }

    /// Hex form, as shown to operators and written in logs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Hashes fingerprints for in-memory tables: they are already uniform (the output of a hash
/// over the block), so a seeded multiply of their two halves spreads them, where SipHash
/// (std's default) cost 3-4 % of the server's CPU on writes of new blocks. Seeded per table,
/// so that blocks crafted for a fast, non-cryptographic algorithm (XXH3) cannot aim at one
/// bucket of every server.
#[derive(Clone, Copy, Debug)]
pub struct FingerprintHasher {
    seed: u64,
}

impl Default for FingerprintHasher {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // std's per-table random keys, taken once per table.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        FingerprintHasher { seed: h.finish() | 1 }
    }
}

impl std::hash::BuildHasher for FingerprintHasher {
    type Hasher = FingerprintHash;
    fn build_hasher(&self) -> FingerprintHash {
        FingerprintHash { seed: self.seed, state: 0 }
    }
}

/// See [`FingerprintHasher`].
#[derive(Debug)]
pub struct FingerprintHash {
    seed: u64,
    state: u64,
}

impl std::hash::Hasher for FingerprintHash {
    fn write(&mut self, bytes: &[u8]) {
        // A fingerprint hashes as its 16 bytes (the array's `Hash`); anything else still
        // hashes, 8 bytes at a time.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.state = (self.state.rotate_left(29) ^ u64::from_le_bytes(word) ^ self.seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_usize(&mut self, _len: usize) {
        // The array's length prefix: the same for every fingerprint.
    }
    fn finish(&self) -> u64 {
        self.state ^ (self.state >> 32)
    }
}

/// A hash map keyed by fingerprint, with [`FingerprintHasher`].
pub type FingerprintMap<V> = std::collections::HashMap<Fingerprint, V, FingerprintHasher>;

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// How a store computes fingerprints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum FingerprintAlgorithm {
    /// BLAKE3 truncated to 128 bits: resists deliberate collisions.
    #[default]
    #[serde(rename = "blake3-128")]
    Blake3,
    /// XXH3-128: not collision resistant; for trusted single-tenant stores.
    #[serde(rename = "xxh3-128")]
    Xxh3,
    /// Hashes only the first 16 bytes of a block, so tests can make two different blocks
    /// collide. Exists only with the `test-util` feature; a store created with it cannot be
    /// opened by a build without that feature.
    #[cfg(feature = "test-util")]
    #[serde(rename = "test-weak")]
    TestWeak,
}

impl FingerprintAlgorithm {
    pub fn fingerprint(self, data: &[u8]) -> Fingerprint {
        match self {
            FingerprintAlgorithm::Blake3 => {
                let hash = blake3::hash(data);
                let mut out = [0u8; 16];
                out.copy_from_slice(&hash.as_bytes()[..16]);
                Fingerprint(out)
            }
            FingerprintAlgorithm::Xxh3 => Fingerprint(twox_hash::XxHash3_128::oneshot(data).to_le_bytes()),
            #[cfg(feature = "test-util")]
            FingerprintAlgorithm::TestWeak => {
                let n = data.len().min(16);
                let mut out = [0u8; 16];
                out[..n].copy_from_slice(&data[..n]);
                Fingerprint(out)
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FingerprintAlgorithm::Blake3 => "blake3-128",
            FingerprintAlgorithm::Xxh3 => "xxh3-128",
            #[cfg(feature = "test-util")]
            FingerprintAlgorithm::TestWeak => "test-weak",
        }
    }
}

impl fmt::Display for FingerprintAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FingerprintAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blake3" | "blake3-128" => Ok(FingerprintAlgorithm::Blake3),
            "xxh3" | "xxh3-128" => Ok(FingerprintAlgorithm::Xxh3),
            #[cfg(feature = "test-util")]
            "test-weak" => Ok(FingerprintAlgorithm::TestWeak),
            other => Err(format!("unknown fingerprint algorithm {other:?} (blake3-128 or xxh3-128)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_differ_and_are_stable() {
        let block = vec![7u8; 4096];
        let b = FingerprintAlgorithm::Blake3.fingerprint(&block);
        let x = FingerprintAlgorithm::Xxh3.fingerprint(&block);
        assert_ne!(b, x);
        assert_eq!(b, FingerprintAlgorithm::Blake3.fingerprint(&block));
        // BLAKE3's published value for the empty input starts with af1349b9f5f9a1a6.
        assert_eq!(&FingerprintAlgorithm::Blake3.fingerprint(b"").to_hex()[..16], "af1349b9f5f9a1a6");
    }

    #[test]
    fn names_round_trip() {
        for a in [FingerprintAlgorithm::Blake3, FingerprintAlgorithm::Xxh3] {
            assert_eq!(a.name().parse::<FingerprintAlgorithm>().unwrap(), a);
            let json = serde_json::to_string(&a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.name()));
        }
        assert!("md5".parse::<FingerprintAlgorithm>().is_err());
    }
}
