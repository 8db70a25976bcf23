#!/usr/bin/env python3
"""Reference computation of the block-similarity table between raw disk images.

For each ordered pair (A, B) of images and each block size S (default 512,
1024, 2048, 4096 bytes) it reports

    share(A, B, S) = (number of B's non-zero S-byte blocks whose content also
                      occurs as an S-byte block of A) / (number of B's non-zero
                      S-byte blocks)

Blocks are the aligned blocks at offsets 0, S, 2S, ... of the file (a last
partial block is padded with zeros); all-zero blocks are skipped on both
sides; B's blocks are counted by position (a content occurring twice in B
counts twice), its presence in A is a set lookup.  "share_distinct" is the same
ratio over B's distinct non-zero contents.  "any_other" is the share of B's
non-zero blocks found in at least one of the other images given.

Independent of the Rust implementation: plain Python, hashlib only
(blake2b, 16-byte digests).  Files are streamed (holes are skipped with
SEEK_DATA/SEEK_HOLE where the OS supports it, which is exact since holes read
as zeros); memory is one dict entry (~100 bytes) per distinct non-zero block
per image and block size.

    similarity.py [--table] [--json FILE] [--block-sizes 512,1024,2048,4096]
                  [--manifest manifest.json] [IMAGE ...]

Without --table the JSON goes to stdout; with --table a readable table goes to
stdout (and the JSON to --json FILE if given).
"""

import argparse
import hashlib
import json
import os
import sys
import time

CHUNK = 4 << 20  # bytes read at a time (multiple of every block size)


def data_regions(fd, size, align):
    """(start, end) ranges covering all data of the file; holes are skipped."""
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    regions = []
    off = 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:  # ENXIO: no more data
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            start -= start % align
            end = min(size, -(-end // align) * align)
            if regions and start <= regions[-1][1]:
                regions[-1] = (regions[-1][0], max(regions[-1][1], end))
            else:
                regions.append((start, end))
            off = end
    except OSError:
        return [(0, size)]
    return regions


def scan(path, block_sizes):
    """{block_size: {digest: count}} over the non-zero blocks of the file."""
    big = max(block_sizes)
    for s in block_sizes:
        if big % s:
            raise SystemExit("block sizes must divide the largest one (%d)" % big)
    small_first = sorted(block_sizes)
    counts = {s: {} for s in block_sizes}
    zero = {s: bytes(s) for s in block_sizes}
    zbig = zero[big]
    subs = [s for s in small_first if s != big]
    b2 = hashlib.blake2b
    size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        for start, end in data_regions(fd, size, big):
            f.seek(start)
            pos = start
            while pos < end:
                want = min(CHUNK, end - pos)
                buf = f.read(want)
                if not buf:
                    break
                pos += len(buf)
                if len(buf) % big:
                    buf += bytes(big - len(buf) % big)
                for o in range(0, len(buf), big):
                    blk = buf[o:o + big]
                    if blk == zbig:
                        continue
                    d = b2(blk, digest_size=16).digest()
                    c = counts[big]
                    c[d] = c.get(d, 0) + 1
                    for s in subs:
                        z, c = zero[s], counts[s]
                        for so in range(0, big, s):
                            sb = blk[so:so + s]
                            if sb == z:
                                continue
                            d = b2(sb, digest_size=16).digest()
                            c[d] = c.get(d, 0) + 1
    return counts


def compute(paths, names, block_sizes, log=None, unions=()):
    per = {}
    info = {}
    for name, path in zip(names, paths):
        t0 = time.time()
        per[name] = scan(path, block_sizes)
        info[name] = {
            "path": os.path.abspath(path),
            "size_bytes": os.path.getsize(path),
            "nonzero_blocks": {str(s): sum(per[name][s].values()) for s in block_sizes},
            "distinct_blocks": {str(s): len(per[name][s]) for s in block_sizes},
        }
        if log:
            log("scanned %s in %.1f s" % (name, time.time() - t0))
    pairs = []
    matrix = {}
    any_other = {}
    bit = {n: 1 << i for i, n in enumerate(names)}
    union_res = [{"sources": list(u), "share": {}} for u in unions]
    for s in block_sizes:
        # for each distinct content: bitmask of the images that hold it
        occ = {}
        for n in names:
            b = bit[n]
            get = occ.get
            for d in per[n][s]:
                occ[d] = get(d, 0) | b
        ms = matrix[str(s)] = {}
        ao = any_other[str(s)] = {}
        for b in names:
            cb = per[b][s]
            total = 0
            by_mask = {}      # mask -> (blocks of B, distinct contents of B)
            for d, v in cb.items():
                m = occ[d]
                t = by_mask.get(m)
                by_mask[m] = (v, 1) if t is None else (t[0] + v, t[1] + 1)
                total += v
            shared = {a: 0 for a in names}
            distinct = {a: 0 for a in names}
            shared_any = 0
            for m, (v, k) in by_mask.items():
                if m & ~bit[b]:
                    shared_any += v
                for ur in union_res:
                    umask = sum(bit[a] for a in ur["sources"])
                    if m & umask:
                        ur["share"].setdefault(str(s), {}).setdefault(b, 0)
                        ur["share"][str(s)][b] += v
                for a in names:
                    if m & bit[a]:
                        shared[a] += v
                        distinct[a] += k
            ao[b] = shared_any / total if total else 0.0
            for ur in union_res:
                d = ur["share"].setdefault(str(s), {})
                d[b] = d.get(b, 0) / total if total else 0.0
            row = ms[b] = {}
            for a in names:
                share = shared[a] / total if total else 0.0
                row[a] = share
                pairs.append({
                    "a": a, "b": b, "block_size": s,
                    "share": share,
                    "share_distinct": distinct[a] / len(cb) if cb else 0.0,
                    "shared_blocks": shared[a],
                    "b_nonzero_blocks": total,
                })
        del occ
    return {
        "definition": "share = fraction of B's non-zero blocks (aligned, by position) whose content occurs "
                      "as a block of A at the same block size; all-zero blocks ignored",
        "block_sizes": block_sizes,
        "images": info,
        "pairs": pairs,
        "matrix": matrix,
        "matrix_layout": "matrix[block_size][B][A] = share of B's blocks found in A",
        "any_other": any_other,
        "unions": union_res,
    }


def table(res):
    names = list(res["images"])
    idx = {n: i + 1 for i, n in enumerate(names)}
    w = max(len(n) for n in names) + 5
    out = []
    out.append("Images:")
    for n in names:
        im = res["images"][n]
        nz = im["nonzero_blocks"][str(max(res["block_sizes"]))]
        out.append("  [%d] %-*s %8.1f MiB non-zero at %d B blocks" % (
            idx[n], w - 5, n, nz * max(res["block_sizes"]) / 2 ** 20, max(res["block_sizes"])))
    for s in res["block_sizes"]:
        out.append("")
        out.append("Block size %d: %% of ROW image's non-zero blocks whose content occurs in COLUMN image" % s)
        head = " " * w + "".join("%7s" % ("[%d]" % idx[a]) for a in names) + "  any other"
        out.append(head)
        m = res["matrix"][str(s)]
        for b in names:
            label = "[%d] %s" % (idx[b], b)
            out.append("%-*s" % (w, label) + "".join("%7.1f" % (100 * m[b][a]) for a in names)
                       + "%11.1f" % (100 * res["any_other"][str(s)][b]))
    for ur in res.get("unions", []):
        out.append("")
        out.append("Union of %s: %% of each image's non-zero blocks found in at least one of them" % ", ".join(ur["sources"]))
        out.append(" " * w + "".join("%8d" % s for s in res["block_sizes"]))
        for b in names:
            out.append("%-*s" % (w, "[%d] %s" % (idx[b], b))
                       + "".join("%8.1f" % (100 * ur["share"][str(s)][b]) for s in res["block_sizes"]))
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="raw image files (name = file name without .raw)")
    ap.add_argument("--manifest", help="take the images from a build.sh manifest.json (a scale's or the top one)")
    ap.add_argument("--block-sizes", default="512,1024,2048,4096")
    ap.add_argument("--table", action="store_true", help="print a readable table instead of JSON")
    ap.add_argument("--json", metavar="FILE", help="also write the JSON result to FILE")
    ap.add_argument("--quiet", action="store_true", help="no progress on stderr")
    ap.add_argument("--union", action="append", default=[], metavar="A,B,...",
                    help="also report the share of each image's blocks found in the union of these images "
                         "(names as in the output; repeatable)")
    args = ap.parse_args()
    paths = list(args.images)
    if args.manifest:
        with open(args.manifest) as f:
            m = json.load(f)
        if "scales" in m:
            imgs = {}
            for sc in m["scales"].values():
                imgs.update({"%s/%s" % (sc["scale"], k): v for k, v in sc["images"].items()})
        else:
            imgs = m["images"]
        paths += [v["path"] for v in imgs.values()]
    if not paths:
        ap.error("no images given")
    names = []
    for p in paths:
        n = os.path.basename(p)
        if n.endswith(".raw"):
            n = n[:-4]
        if n in names:
            n = p
        names.append(n)
    block_sizes = sorted({int(x) for x in args.block_sizes.split(",")})
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    unions = [u.split(",") for u in args.union]
    for u in unions:
        for n in u:
            if n not in names:
                ap.error("--union: unknown image %r (known: %s)" % (n, ", ".join(names)))
    res = compute(paths, names, block_sizes, log, unions)
    js = json.dumps(res, indent=1, sort_keys=False) + "\n"
    if args.json:
        with open(args.json, "w") as f:
            f.write(js)
    if args.table:
        sys.stdout.write(table(res))
    else:
        sys.stdout.write(js)


if __name__ == "__main__":
    main()
