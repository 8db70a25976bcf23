//! Ceph's wire encodings for the `cas` object class: the inputs of its methods and the
//! `chunk_refs` attribute in which it keeps a chunk's references.
//!
//! Ceph encodes little-endian; a versioned structure starts with `ENCODE_START(v, compat)`: a
//! version byte, a compat byte and a u32 length of what follows. Strings and byte lists are a
//! u32 length and the bytes.

/// `cls_cas_chunk_create_or_get_ref_op::FLAG_VERIFY`: on a hit, compare the stored bytes.
pub const FLAG_VERIFY: u64 = 1;

fn versioned(version: u8, compat: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 6);
    out.push(version);
    out.push(compat);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// CEPH_NOSNAP: the head object.
const NOSNAP: u64 = 0xffff_ffff_ffff_fffe;

/// An `hobject_t` (encoding version 4, compat 3): the *source* of a reference, which the `cas`
/// class keeps in a multiset per chunk. A store's references all carry the same source.
pub fn hobject(name: &str, pool: i64, hash: u32, namespace: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + name.len() + namespace.len());
    put_bytes(&mut body, b""); // key
    put_bytes(&mut body, name.as_bytes()); // oid
    body.extend_from_slice(&NOSNAP.to_le_bytes());
    body.extend_from_slice(&hash.to_le_bytes());
    body.push(0); // max
    put_bytes(&mut body, namespace.as_bytes());
    body.extend_from_slice(&pool.to_le_bytes());
    versioned(4, 3, &body)
}

/// Input of `cas.chunk_create_or_get_ref`: the source, flags, the chunk's bytes.
pub fn create_or_get_ref(source: &[u8], flags: u64, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(source.len() + 12 + data.len());
    body.extend_from_slice(source);
    body.extend_from_slice(&flags.to_le_bytes());
    put_bytes(&mut body, data);
    versioned(1, 1, &body)
}

/// Input of `cas.chunk_get_ref` and `cas.chunk_put_ref`: the source.
pub fn ref_op(source: &[u8]) -> Vec<u8> {
    versioned(1, 1, source)
}

/// Input of `cas.references_chunk` (a string), used to check that the class is loadable.
pub fn string_arg(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, s.as_bytes());
    out
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("chunk_refs: truncated")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    /// ENCODE_START's header: returns (version, end of the structure).
    fn start(&mut self) -> Result<(u8, usize), String> {
        let v = self.u8()?;
        let _compat = self.u8()?;
        let len = self.u32()? as usize;
        let end = self.pos.checked_add(len).filter(|&e| e <= self.buf.len()).ok_or("chunk_refs: bad length")?;
        Ok((v, end))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// `chunk_refs_t::TYPE_BY_OBJECT`, the only encoding Ceph 16 writes (it keeps every source).
const TYPE_BY_OBJECT: u8 = 1;

/// Counts the references in a chunk's `chunk_refs` attribute: (those whose source object is
/// named `source_name`, all of them).
pub fn count_refs(xattr: &[u8], source_name: &str) -> Result<(u64, u64), String> {
    let mut r = Reader { buf: xattr, pos: 0 };
    let (_, _end) = r.start()?;
    let kind = r.u8()?;
    if kind != TYPE_BY_OBJECT {
        return Err(format!("chunk_refs: encoding type {kind} is not by_object (a newer Ceph?)"));
    }
    let (_, _) = r.start()?;
    let n = r.u32()?;
    let mut mine = 0u64;
    for _ in 0..n {
        let (_, end) = r.start()?;
        let _key = r.bytes()?;
        let oid = r.bytes()?;
        if oid == source_name.as_bytes() {
            mine += 1;
        }
        r.pos = end;
    }
    Ok((mine, u64::from(n)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn hobject_matches_what_the_osd_stored() {
        // An entry of a `chunk_refs` attribute written by a Ceph 16.2.15 OSD for the source
        // ("holder.A", pool 1, hash 0x1234) that python-rados sent.
        let stored = hex("0403290000000000000008000000686f6c6465722e41feffffffffffffff3412000000000000000100000000000000");
        assert_eq!(hobject("holder.A", 1, 0x1234, ""), stored);
    }

    #[test]
    fn counts_references_per_source() {
        // Three references: holder.B once, holder.A twice (a multiset), as a 16.2.15 OSD wrote.
        let xattr = hex(concat!(
            "01019800000001010191000000030000000403290000000000000008000000686f6c6465722e42feffffffffffffff",
            "78560000000000000001000000000000000403290000000000000008000000686f6c6465722e41feffffffffffffff",
            "34120000000000000001000000000000000403290000000000000008000000686f6c6465722e41feffffffffffffff",
            "3412000000000000000100000000000000"
        ));
        assert_eq!(count_refs(&xattr, "holder.A").unwrap(), (2, 3));
        assert_eq!(count_refs(&xattr, "holder.B").unwrap(), (1, 3));
        assert_eq!(count_refs(&xattr, "holder.C").unwrap(), (0, 3));
        assert!(count_refs(&xattr[..40], "holder.A").is_err());
    }

    #[test]
    fn op_inputs() {
        let src = hobject("h", 2, 7, "ns");
        let op = create_or_get_ref(&src, FLAG_VERIFY, b"abc");
        assert_eq!(&op[..2], &[1, 1]);
        assert_eq!(u32::from_le_bytes(op[2..6].try_into().unwrap()) as usize, op.len() - 6);
        assert_eq!(&op[6..6 + src.len()], &src[..]);
        assert_eq!(&op[op.len() - 7..], &[3, 0, 0, 0, b'a', b'b', b'c']);
        assert_eq!(ref_op(&src)[6..], src[..]);
    }
}
