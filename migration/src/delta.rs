//! A block as the difference from a similar block both sides hold: a zstd frame compressed
//! with the reference block as a raw-content dictionary, so every run the two share becomes
//! a match into the reference. Chosen over a dedicated delta coder because zstd is already
//! in both ends and, on the test images' changed database pages, logs and files, brought
//! 16.6 MB of separately compressed blocks down to 1.7 MB (README, issue 14).

/// A delta is sent only when it is at most this fraction of the block: a weaker one saves
/// less than the stream compresses the plain block by (about 3x on disk blocks).
const MAX_DELTA_SHARE: usize = 4;

/// Why a delta did not give its block back. The destination then asks for the block whole.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The destination no longer holds the reference it confirmed.
    #[error("the reference block is not here")]
    ReferenceMissing,
    /// A damaged delta, or one made against other bytes than the reference here.
    #[error("the delta does not decode: {0}")]
    Undecodable(#[from] std::io::Error),
    #[error("decoded to {got} bytes, not a block of {block_size}")]
    WrongLength { got: usize, block_size: usize },
    /// Decoded, but to other bytes than the block named (a reference that changed).
    #[error("the decoded block does not match its fingerprint")]
    FingerprintMismatch,
}

/// The delta of `block` against `reference`, or None when it would not pay.
pub fn encode(block: &[u8], reference: &[u8], level: i32) -> Option<Vec<u8>> {
    let mut c = zstd::bulk::Compressor::with_dictionary(level, reference).ok()?;
    // The record carries the fingerprint and the length: the frame needs neither a checksum
    // nor its size nor a dictionary id.
    c.include_checksum(false).ok()?;
    c.include_contentsize(false).ok()?;
    c.include_dictid(false).ok()?;
    let out = c.compress(block).ok()?;
    (out.len() <= block.len() / MAX_DELTA_SHARE).then_some(out)
}

/// Rebuilds a block from its delta. Decoding stops at `block_size` bytes, whatever the delta
/// says; the caller checks the result's fingerprint.
pub fn decode(delta: &[u8], reference: &[u8], block_size: usize) -> Result<Vec<u8>, DeltaError> {
    let mut d = zstd::bulk::Decompressor::with_dictionary(reference)?;
    let out = d.decompress(delta, block_size)?;
    if out.len() != block_size {
        return Err(DeltaError::WrongLength { got: out.len(), block_size });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 26) as u8 + b'a'
            })
            .collect()
    }

    #[test]
    fn a_block_a_few_bytes_away_round_trips_small() {
        let reference = page(1);
        let mut block = reference.clone();
        block[100..108].copy_from_slice(b"refunded");
        block[3000..3004].copy_from_slice(b"paid");
        let delta = encode(&block, &reference, 3).expect("a small delta");
        assert!(delta.len() < 64, "{} bytes", delta.len());
        assert_eq!(decode(&delta, &reference, 4096).unwrap(), block);
    }

    #[test]
    fn an_unrelated_reference_does_not_pay() {
        assert_eq!(encode(&page(1), &page(2), 3), None);
    }

    #[test]
    fn the_wrong_reference_or_damage_never_yields_the_block() {
        let reference = page(1);
        let mut block = reference.clone();
        block[10] ^= 1;
        let delta = encode(&block, &reference, 3).unwrap();
        // Against another reference it decodes to something else (the caller's fingerprint
        // check catches it) or fails; it never panics or grows past a block.
        if let Ok(other) = decode(&delta, &page(3), 4096) {
            assert_ne!(other, block);
        }
        for cut in 0..delta.len() {
            let _ = decode(&delta[..cut], &reference, 4096);
        }
        assert!(decode(&delta, &reference, 1024).is_err(), "longer than the block size");
    }
}
