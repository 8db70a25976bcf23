#!/usr/bin/env python3
"""The floor of a migration: what the destination lacks, compressed.

    floor.py --migrated IMG [--migrated IMG]... [--neighbour IMG]... [--block-size 4096] [--levels 3,19L]

The blocks the destination lacks are the aligned BLOCK-SIZE blocks of the migrated image
that are not all zeros and whose content occurs as no block of any neighbour image; each
distinct content counts once (in the order of first appearance). Their concatenation is
compressed with the zstd command-line tool at each level ("19L" = -19 --long=27) and the
compressed sizes are reported, with the fingerprint list a block-mapping protocol must send
(16 bytes per non-zero block of the migrated image). Several --migrated images (a gang) give
the floor of their union: each distinct lacking content once for all of them, and the
fingerprints of every image's non-zero blocks.

Independent of the project's Rust code: plain Python (hashlib blake2b, 16-byte digests) and
the zstd CLI. Holes are skipped with SEEK_DATA/SEEK_HOLE (they read as zeros). Prints JSON.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

CHUNK = 8 << 20


def data_regions(fd, size):
    regions, off = [], 0
    if not hasattr(os, "SEEK_DATA"):
        return [(0, size)]
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        regions.append((start, end))
        off = end
    return regions


def blocks(path, bs):
    """Yields (digest, bytes) of every non-zero aligned block of the file."""
    zero = bytes(bs)
    b2 = hashlib.blake2b
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        for start, end in data_regions(fd, size):
            start -= start % bs
            end = min(size, -(-end // bs) * bs)
            pos = start
            while pos < end:
                n = min(CHUNK, end - pos)
                buf = os.pread(fd, n, pos)
                if len(buf) < n:
                    buf += bytes(n - len(buf))
                if len(buf) % bs:
                    buf += bytes(bs - len(buf) % bs)
                mv = memoryview(buf)
                for o in range(0, len(buf), bs):
                    blk = mv[o:o + bs]
                    if blk == zero:
                        continue
                    yield b2(blk, digest_size=16).digest(), blk
                pos += n


class Sink:
    """Feeds bytes to one zstd process per level and counts its output."""

    def __init__(self, levels):
        self.procs = []
        for lv in levels:
            args = ["zstd", "-q", "-c", "-T2"]
            if lv.endswith("L"):
                args += ["-%s" % lv[:-1], "--long=27"]
            else:
                args += ["-%s" % lv]
            p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            box = [0]
            t = threading.Thread(target=self._count, args=(p.stdout, box), daemon=True)
            t.start()
            self.procs.append((lv, p, box, t))

    @staticmethod
    def _count(out, box):
        while True:
            b = out.read(1 << 20)
            if not b:
                return
            box[0] += len(b)

    def write(self, data):
        for _, p, _, _ in self.procs:
            p.stdin.write(data)

    def close(self):
        res = {}
        for lv, p, box, t in self.procs:
            p.stdin.close()
            p.wait()
            t.join()
            if p.returncode != 0:
                raise SystemExit("zstd -%s failed" % lv)
            res[lv] = box[0]
        return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--migrated", action="append", required=True)
    ap.add_argument("--neighbour", action="append", default=[])
    ap.add_argument("--block-size", type=int, default=4096)
    ap.add_argument("--levels", default="3,19L")
    ap.add_argument("--fingerprint-bytes", type=int, default=16)
    args = ap.parse_args()
    bs = args.block_size
    t0 = time.time()
    have = set()
    for n in args.neighbour:
        for d, _ in blocks(n, bs):
            have.add(d)
    levels = [x for x in args.levels.split(",") if x]
    sink = Sink(levels)
    seen = set()
    nonzero = lacking = dup = hits = 0
    buf = []
    buffered = 0
    for d, blk in (x for m in args.migrated for x in blocks(m, bs)):
        nonzero += 1
        if d in have:
            hits += 1
            continue
        if d in seen:
            dup += 1
            continue
        seen.add(d)
        lacking += 1
        buf.append(bytes(blk))
        buffered += bs
        if buffered >= CHUNK:
            sink.write(b"".join(buf))
            buf, buffered = [], 0
    if buf:
        sink.write(b"".join(buf))
    sizes = sink.close()
    fp = nonzero * args.fingerprint_bytes
    out = {
        "migrated": ",".join(os.path.basename(m) for m in args.migrated),
        "neighbours": [os.path.basename(n) for n in args.neighbour],
        "block_size": bs,
        "nonzero_blocks": nonzero,
        "neighbour_hit_blocks": hits,
        "duplicate_blocks": dup,
        "lacking_blocks": lacking,
        "lacking_bytes": lacking * bs,
        "fingerprint_list_bytes": fp,
        "zstd_bytes": {("-19 --long=27" if lv.endswith("L") else "-" + lv): v for lv, v in sizes.items()},
        "floor_bytes": {("-19 --long=27" if lv.endswith("L") else "-" + lv): v + fp for lv, v in sizes.items()},
        "seconds": round(time.time() - t0, 2),
    }
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
