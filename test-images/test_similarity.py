#!/usr/bin/env python3
"""Self-tests of similarity.py and gen_data.py (no root, no images needed, a few seconds).

    python3 test-images/test_similarity.py        (or: pytest test-images/)
"""

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import similarity  # noqa: E402


def blocks(seed, n, size=4096):
    r = random.Random(seed)
    return [r.randbytes(size) for _ in range(n)]


class SimilarityTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.d = self.tmp.name

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, name, data, sparse_tail=0):
        p = os.path.join(self.d, name + ".raw")
        with open(p, "wb") as f:
            f.write(data)
            if sparse_tail:
                f.truncate(len(data) + sparse_tail)
        return p

    def test_pair_shares(self):
        b = blocks(1, 10)
        z = bytes(4096)
        a = self.write("A", b"".join(b[0:6]) + z)
        bb = self.write("B", b"".join([b[3], b[3], z, b[7], b[8], b[9], b[4]]))
        c = self.write("C", b[7] + b[8] + z, sparse_tail=64 << 20)  # a 64 MiB hole
        res = similarity.compute([a, bb, c], ["A", "B", "C"], [512, 1024, 2048, 4096],
                                 unions=[["A", "C"]])
        for s in ("512", "4096"):
            m = res["matrix"][s]
            self.assertAlmostEqual(m["B"]["A"], 3 / 6)   # 3,3,4 of 3,3,7,8,9,4
            self.assertAlmostEqual(m["A"]["B"], 2 / 6)
            self.assertAlmostEqual(m["B"]["C"], 2 / 6)
            self.assertAlmostEqual(m["B"]["B"], 1.0)
            self.assertAlmostEqual(res["any_other"][s]["B"], 5 / 6)
            self.assertAlmostEqual(res["unions"][0]["share"][s]["B"], 5 / 6)
        p = [x for x in res["pairs"] if x["a"] == "A" and x["b"] == "B" and x["block_size"] == 4096][0]
        self.assertEqual(p["shared_blocks"], 3)
        self.assertEqual(p["b_nonzero_blocks"], 6)
        self.assertAlmostEqual(p["share_distinct"], 2 / 5)
        self.assertEqual(res["images"]["C"]["nonzero_blocks"]["512"], 16)

    def test_sub_block_granularity(self):
        # B's 4 KiB block differs from A's only in its last 512 bytes: 7/8 of its
        # 512-byte blocks and 1/2 of its 2 KiB blocks are found, none at 4 KiB.
        a_blk = blocks(2, 1)[0]
        b_blk = a_blk[:3584] + blocks(3, 1, 512)[0]
        a = self.write("A", a_blk)
        b = self.write("B", b_blk)
        res = similarity.compute([a, b], ["A", "B"], [512, 2048, 4096])
        self.assertAlmostEqual(res["matrix"]["512"]["B"]["A"], 7 / 8)
        self.assertAlmostEqual(res["matrix"]["2048"]["B"]["A"], 1 / 2)
        self.assertAlmostEqual(res["matrix"]["4096"]["B"]["A"], 0.0)

    def test_zero_blocks_ignored_and_unaligned_tail(self):
        half_zero = bytes(512) + blocks(4, 1, 3584)[0]
        a = self.write("A", half_zero + b"tail")  # 4100 bytes: last block zero-padded
        res = similarity.compute([a], ["A"], [512, 4096])
        self.assertEqual(res["images"]["A"]["nonzero_blocks"]["512"], 7 + 1)
        self.assertEqual(res["images"]["A"]["nonzero_blocks"]["4096"], 2)

    def test_holes_skipped_equals_full_read(self):
        b = blocks(5, 4)
        p = os.path.join(self.d, "S.raw")
        with open(p, "wb") as f:
            for i, blk in enumerate(b):
                f.seek(i * (8 << 20) + 4096 * i)
                f.write(blk)
            f.truncate(40 << 20)
        with_holes = similarity.scan(p, [512, 4096])
        orig = similarity.data_regions
        try:
            similarity.data_regions = lambda fd, size, align: [(0, size)]
            full = similarity.scan(p, [512, 4096])
        finally:
            similarity.data_regions = orig
        self.assertEqual(with_holes, full)
        self.assertEqual(sum(full[4096].values()), 4)

    def test_cli_json_and_table(self):
        b = blocks(6, 3)
        a = self.write("A", b"".join(b))
        c = self.write("B", b[0])
        out = subprocess.run([sys.executable, os.path.join(HERE, "similarity.py"), "--quiet", a, c],
                             check=True, capture_output=True, text=True).stdout
        res = json.loads(out)
        self.assertAlmostEqual(res["matrix"]["4096"]["A"]["B"], 1 / 3)
        table = subprocess.run([sys.executable, os.path.join(HERE, "similarity.py"), "--quiet", "--table", a, c],
                               check=True, capture_output=True, text=True).stdout
        self.assertIn("Block size 4096", table)


def tree_digest(root):
    h = {}
    for dp, dn, fn in os.walk(root):
        for f in fn:
            p = os.path.join(dp, f)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                h[rel] = "-> " + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    h[rel] = hashlib.sha256(fh.read()).hexdigest()
    return h


class GeneratorTest(unittest.TestCase):
    def gen(self, kind, seed, root):
        os.makedirs(os.path.join(root, "etc/php/8.2"), exist_ok=True)
        r = subprocess.run([sys.executable, os.path.join(HERE, "gen_data.py"), kind, "--root", root,
                            "--seed", str(seed), "--scale", "0.02", "--name", "t"],
                           check=True, capture_output=True, text=True)
        return r.stdout.split("\n"), tree_digest(root)

    def test_deterministic_and_seeded(self):
        with tempfile.TemporaryDirectory() as d:
            for kind in ("web", "db", "app"):
                a1, t1 = self.gen(kind, 1, os.path.join(d, kind + "1"))
                _, t1b = self.gen(kind, 1, os.path.join(d, kind + "1b"))
                _, t2 = self.gen(kind, 2, os.path.join(d, kind + "2"))
                self.assertEqual(t1, t1b, kind + ": same seed must give the same files")
                self.assertNotEqual(t1, t2, kind + ": another seed must give other data")
                if kind == "db":
                    self.assertIn("PGLOAD /var/lib/postgresql/.seed", a1)
                if kind == "web":
                    # same CMS code on both sites, other content
                    code1 = {k.split("/", 3)[3]: v for k, v in t1.items() if "/vendor/" in k or "/src/" in k}
                    code2 = {k.split("/", 3)[3]: v for k, v in t2.items() if "/vendor/" in k or "/src/" in k}
                    self.assertTrue(code1)
                    self.assertEqual(code1, code2)


if __name__ == "__main__":
    unittest.main()
