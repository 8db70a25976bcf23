#!/usr/bin/env python3
"""The benchmark harness behind bench.sh (see bench/README.md).

Each section writes OUT/sections/<section>.json; report.py merges them into
OUT/results.json, OUT/RESULTS.md and OUT/plots/*.png. Sections can be re-run alone
(--only), the others' last results stay.

Every process this harness starts is recorded (RUN/pids) and ended on exit, failures
included; the emulated WAN (scripts/wan.sh) is torn down on exit; bench.sh's trap repeats
both as a safety net.
"""

import argparse
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
WAN = os.path.join(REPO, "scripts", "wan.sh")
SRC_ADDR, DST_ADDR = "10.200.0.1", "10.200.0.2"
LINK_RATE_BPS = 100e6  # the tbf rate, bits per second
MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------------------------- configs
NEIGHBOURS_PAPER = ["bookworm-minimal", "trixie-minimal"]
NEIGHBOURS_DC = ["bookworm-minimal", "trixie-minimal", "bookworm-web-b", "bookworm-db-b"]
MIGRATED = ["bookworm-web", "bookworm-db", "trixie-app", "bookworm-webdb"]
ALL_IMAGES = NEIGHBOURS_DC + MIGRATED
# The same VM four days on (test-images: activity, upgrades), migrated into a datacentre that
# holds its older version (bookworm-webdb) beside fresh installs: where delta against similar
# blocks can pay. Its own neighbourhood replaces the common ones.
LATER = "bookworm-webdb-later"
NEIGHBOURS_OLDER = ["bookworm-minimal", "trixie-minimal", "bookworm-webdb"]

CONFIGS = {
    "full": {
        "scale": "large",
        "similarity_images": ALL_IMAGES,
        "similarity_reference": True,
        "indexing_images": ALL_IMAGES,
        "migrated": MIGRATED + [LATER],
        "hoods": {"paper": NEIGHBOURS_PAPER, "datacentre": NEIGHBOURS_DC},
        "image_hoods": {LATER: {"older": NEIGHBOURS_OLDER}},
        "source_keeps": {LATER: ["bookworm-webdb"]},
        "no_delta_hoods": ["older"],
        "full_copy": True,
        "rsync": True,
        "casync_chunkings": ["default", "4k"],
        # 4 KiB casync fetches one HTTP request per chunk: tens of minutes per run on large
        # images, so only where it matters most (the realistic neighbourhood)
        "casync_4k_hoods": ["datacentre", "older"],
        "floor_levels": "3",
        # zstd -19 --long on a GiB of lacking blocks takes minutes: only for the datacentre
        "floor_levels_hoods": {"datacentre": "3,19L", "older": "3,19L"},
        "load_images": ["bookworm-db", "bookworm-webdb"],
        "load_hood": "datacentre",
        "nbd_image": "bookworm-db",
        "nbd_bytes": 2 * GiB,
        "fio_runtime": 30,
        "store_bench_args": [],
        # RADOS beside RocksDB: the neighbourhood imported into both (and migrated into), the
        # migrated image(s), the OSD's memstore bound. The memstore OSD holds every block in
        # its memory at about 25 KiB of RSS per 4 KiB block: the datacentre neighbourhood of
        # the large images (about 650 k distinct blocks) would need some 16 GB; the paper one
        # with bookworm-web's missing blocks ended at 8.5 GB (about 11 minutes for the section).
        "rados_hood": "paper",
        "rados_migrated": ["bookworm-web"],
        "rados_memstore_bytes": 12 * GiB,
        # four VMs of one stack, migrated together into the paper neighbourhood
        "gang_images": ["bookworm-web", "bookworm-web-b", "bookworm-webdb", "bookworm-db"],
        "gang_hood": "paper",
    },
    "quick": {
        "scale": "small",
        "similarity_images": ["bookworm-minimal", "bookworm-web", "bookworm-web-b"],
        "similarity_reference": True,
        "indexing_images": ["bookworm-minimal", "bookworm-web-b", "bookworm-web"],
        "migrated": ["bookworm-web", LATER],
        "hoods": {"paper": ["bookworm-minimal"], "datacentre": ["bookworm-minimal", "bookworm-web-b"]},
        "image_hoods": {LATER: {"older": ["bookworm-minimal", "bookworm-webdb"]}},
        "source_keeps": {LATER: ["bookworm-webdb"]},
        "no_delta_hoods": ["older"],
        "full_copy": False,
        "rsync": True,
        "casync_chunkings": ["default"],
        "casync_hoods": ["datacentre", "older"],
        "floor_levels": "3",
        "floor_levels_hoods": {"older": "3,19L"},
        "load_images": ["bookworm-web"],
        "load_hood": "datacentre",
        "nbd_image": "bookworm-web",
        "nbd_bytes": 256 * MiB,
        "fio_runtime": 4,
        "store_bench_args": ["--warm-up-time", "1", "--measurement-time", "2", "--sample-size", "10"],
        "rados_hood": "datacentre",  # about 150 k distinct blocks in RADOS: an OSD of about 3.7 GB
        "rados_migrated": ["bookworm-web"],
        "rados_memstore_bytes": 6 * GiB,
        "gang_images": ["bookworm-web", "bookworm-web-b", "bookworm-webdb", "bookworm-db-b"],
        "gang_hood": "paper",
    },
}
SECTIONS = ["similarity", "indexing", "migration", "downtime", "gang", "nbd", "store", "memory", "rados"]


# ---------------------------------------------------------------------------------- plumbing
class Ctx:
    def __init__(self, args):
        self.args = args
        self.cfg = dict(CONFIGS["quick" if args.quick else "full"])
        if args.scale:
            self.cfg["scale"] = args.scale
        self.bin = args.bin
        self.out = args.out
        self.run = args.run_dir
        self.images_dir = os.path.join(args.images, self.cfg["scale"])
        self.procs = []
        self.wan_name = None
        self.log_path = os.path.join(self.out, "logs", "bench.log")
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        os.makedirs(self.run, exist_ok=True)
        self.logf = open(self.log_path, "a")
        self.sha_cache = {}

    def log(self, msg):
        line = "[%s] %s" % (time.strftime("%H:%M:%S"), msg)
        print(line, file=sys.stderr, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def image(self, name):
        p = os.path.join(self.images_dir, name + ".raw")
        if not os.path.exists(p):
            raise RuntimeError("image %s missing (test-images/build.sh --size-scale %s --only %s)"
                               % (p, self.cfg["scale"], name))
        return p

    def exe(self, name):
        return os.path.join(self.bin, name)

    # -- processes
    def _record(self, p):
        self.procs.append(p)
        with open(os.path.join(self.run, "pids"), "a") as f:
            f.write("%d\n" % p.pid)

    def start(self, cmd, ns=None, log=None, stdout_pipe=False, env=None):
        """Starts a long-running process (own process group), recorded for clean-up."""
        full = self.ns_prefix(ns) + cmd
        self.log("start: %s" % " ".join(full))
        logf = open(log or os.path.join(self.out, "logs", "proc-%s.log" % os.path.basename(cmd[0])), "ab")
        p = subprocess.Popen(full, stdout=subprocess.PIPE if stdout_pipe else logf, stderr=logf,
                             stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        p.logfile = logf
        self._record(p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=15):
        if p is None:
            return None
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        if p in self.procs:
            self.procs.remove(p)
        return p.returncode

    def stop_all(self):
        for p in list(self.procs):
            try:
                self.stop(p, timeout=5)
            except Exception:
                pass

    def ns_prefix(self, ns):
        if ns is None:
            return []
        return ["ip", "netns", "exec", "nbdcas-%s-%s" % (self.wan_name, ns)]

    def sh(self, cmd, ns=None, timeout=None, check=True, capture=True, input=None, env=None):
        """Runs a command to completion; returns (CompletedProcess, seconds)."""
        full = self.ns_prefix(ns) + cmd
        self.log("run: %s" % " ".join(full))
        t0 = time.monotonic()
        r = subprocess.run(full, stdout=subprocess.PIPE if capture else self.logf,
                           stderr=subprocess.PIPE if capture else self.logf,
                           timeout=timeout, input=input, env=env, start_new_session=True)
        dt = time.monotonic() - t0
        if check and r.returncode != 0:
            err = (r.stderr or b"").decode(errors="replace")[-3000:] if capture else "(see log)"
            raise RuntimeError("%s exited %d: %s" % (" ".join(full), r.returncode, err))
        return r, dt

    # -- the emulated WAN
    def wan_up(self):
        if self.wan_name:
            return
        name = "b%d" % (os.getpid() % 10000000)
        self.sh([WAN, "up", name, "--rate", "100mbit"])
        self.wan_name = name
        with open(os.path.join(self.run, "wan"), "w") as f:
            f.write(name + "\n")

    def wan_down(self):
        if self.wan_name:
            subprocess.run([WAN, "down", self.wan_name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.wan_name = None

    def link_bytes(self):
        r, _ = self.sh([WAN, "counters", self.wan_name])
        rx, tx = r.stdout.decode().split()
        return int(rx) + int(tx)

    # -- helpers
    def image_sha(self, name):
        if name in self.sha_cache:
            return self.sha_cache[name]
        meta = os.path.join(self.images_dir, name + ".json")
        path = self.image(name)
        digest = None
        try:
            with open(meta) as f:
                m = json.load(f)
            if m.get("size_bytes") == os.path.getsize(path) and os.path.getmtime(meta) >= os.path.getmtime(path):
                digest = m.get("sha256")
        except (OSError, ValueError):
            pass
        if not digest:
            digest = sha_file(path)
        self.sha_cache[name] = digest
        return digest

    def sha_nbd(self, uri, ns=None):
        """sha256 of an NBD export, read with nbdcopy."""
        full = self.ns_prefix(ns) + ["nbdcopy", uri, "-"]
        p = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=self.logf, start_new_session=True)
        self._record(p)
        h = hashlib.sha256()
        while True:
            b = p.stdout.read(4 * MiB)
            if not b:
                break
            h.update(b)
        p.wait()
        self.procs.remove(p)
        if p.returncode != 0:
            raise RuntimeError("nbdcopy %s failed" % uri)
        return h.hexdigest()


def sha_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def du_bytes(path):
    r = subprocess.run(["du", "-s", "--block-size=1", path], stdout=subprocess.PIPE, check=True)
    return int(r.stdout.split()[0])


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid, field="VmRSS"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU seconds a process has used so far (None if it is gone)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def wait_ready(ctx, p, what, timeout=120):
    """Reads an nbd-server's stdout until "ready"; returns the lines."""
    lines, done = [], threading.Event()

    def reader():
        for raw in p.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            p.logfile.write(raw)
            p.logfile.flush()
            if line.strip() == "ready":
                done.set()
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout) or "ready" not in [x.strip() for x in lines]:
        raise RuntimeError("%s did not become ready (exit %s); log %s" % (what, p.poll(), p.logfile.name))
    return lines


def server_pid(ctx, p):
    """The nbd-server process itself (under `ip netns exec` it is the same pid)."""
    return p.pid


def write_section(ctx, name, data):
    d = os.path.join(ctx.out, "sections")
    os.makedirs(d, exist_ok=True)
    data = dict(data)
    data["section"] = name
    data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    data["mode"] = "quick" if ctx.args.quick else "full"
    data["scale"] = ctx.cfg["scale"]
    try:
        with open("/proc/loadavg") as f:
            data["loadavg"] = f.read().split()[:3]
    except OSError:
        pass
    tmp = os.path.join(d, name + ".json.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, os.path.join(d, name + ".json"))


# ---------------------------------------------------------------------------------- stores
def cas_import(ctx, store, name, image):
    """Offline import; returns a dict with seconds and peak RSS of the import process."""
    r, dt = ctx.sh(["/usr/bin/time", "-f", "MAXRSS_KIB=%M", ctx.exe("cas"), "import", name, image,
                    "--store", store, "--json"])
    m = re.search(rb"MAXRSS_KIB=(\d+)", r.stderr)
    out = {"seconds": round(dt, 3), "import_peak_rss_bytes": int(m.group(1)) * 1024 if m else None}
    try:
        out["report"] = json.loads(r.stdout.decode())
    except ValueError:
        pass
    return out


def cas_stats(ctx, store):
    r, _ = ctx.sh([ctx.exe("cas"), "stats", "--store", store, "--json"])
    try:
        return json.loads(r.stdout.decode())
    except ValueError:
        return None


def pristine_store(ctx, key, images):
    """A store holding `images` (disk name = image name), made once per run and copied."""
    d = os.path.join(ctx.run, "stores", key)
    if not os.path.exists(os.path.join(d, ".complete")):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for n in images:
            cas_import(ctx, d, n, ctx.image(n))
        open(os.path.join(d, ".complete"), "w").close()
    return d


def copy_store(ctx, src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    ctx.sh(["cp", "-a", "--reflink=auto", src, dst])
    # The copy (and the pristine store before it) is written back now, not by the kernel's
    # flusher 30 s later in the middle of the run that follows, where its writes stretched
    # the switch-overs' fsyncs.
    ctx.sh(["sync"])
    return dst


# ---------------------------------------------------------------------------------- 1 similarity
def section_similarity(ctx):
    names = ctx.cfg["similarity_images"]
    paths = [ctx.image(n) for n in names]
    r, dt = ctx.sh([ctx.exe("cas"), "similarity"] + paths + ["--json"])
    ours = json.loads(r.stdout.decode())
    res = {"images": names, "ours": ours, "ours_seconds": round(dt, 2)}
    if ctx.cfg["similarity_reference"]:
        r, dt2 = ctx.sh(["/usr/bin/python3", os.path.join(REPO, "test-images", "similarity.py"), "--quiet"] + paths)
        ref = json.loads(r.stdout.decode())
        res["reference_seconds"] = round(dt2, 2)
        res["reference_matrix"] = ref["matrix"]
        res["reference_any_other"] = ref.get("any_other")
        # agreement: every (a, b, block size) share
        mine = {}
        for p in pairs_of(ours):
            mine[(stem(p["a"]), stem(p["b"]), int(p["block_size"]))] = float(p["share"])
        worst = 0.0
        compared = 0
        for bs, rows in ref["matrix"].items():
            for b, row in rows.items():
                for a, share in row.items():
                    k = (a, b, int(bs))
                    if k in mine:
                        compared += 1
                        worst = max(worst, abs(mine[k] - share))
        res["reference_compared_pairs"] = compared
        res["reference_max_abs_diff"] = worst
    write_section(ctx, "similarity", res)


def stem(p):
    b = os.path.basename(str(p))
    return b[:-4] if b.endswith(".raw") else b


def pairs_of(ours):
    if isinstance(ours, dict):
        for k in ("pairs", "shares"):
            if k in ours:
                return ours[k]
    return ours


# ---------------------------------------------------------------------------------- 2 indexing
def section_indexing(ctx):
    names = ctx.cfg["indexing_images"]
    store = os.path.join(ctx.run, "indexing-store")
    shutil.rmtree(store, ignore_errors=True)
    steps = []
    for i, n in enumerate(names):
        img = ctx.image(n)
        imp = cas_import(ctx, store, n, img)
        st = cas_stats(ctx, store)
        step = {
            "step": i + 1, "image": n,
            "image_allocated_bytes": os.stat(img).st_blocks * 512,
            "import_seconds": imp["seconds"],
            "import_peak_rss_bytes": imp["import_peak_rss_bytes"],
            "store_disk_bytes": du_bytes(store),
            "stats": st,
        }
        # server memory with the store as it now is: at ready, and after reading the new disk
        sock = os.path.join(ctx.run, "idx.sock")
        p = ctx.start([ctx.exe("nbd-server"), "--store", store, "--unix", sock, "--read-only"],
                      stdout_pipe=True, log=os.path.join(ctx.out, "logs", "indexing-server.log"))
        try:
            wait_ready(ctx, p, "nbd-server (indexing)")
            time.sleep(0.5)
            step["server_rss_ready_bytes"] = (rss_kib(p.pid) or 0) * 1024
            _, rd = ctx.sh(["nbdcopy", "nbd+unix:///%s?socket=%s" % (n, sock), "null:"])
            step["server_read_seconds"] = round(rd, 3)
            step["server_rss_after_read_bytes"] = (rss_kib(p.pid) or 0) * 1024
            step["server_rss_peak_bytes"] = (rss_kib(p.pid, "VmHWM") or 0) * 1024
        finally:
            ctx.stop(p)
        steps.append(step)
        ctx.log("indexing: +%s in %.1f s, store %.1f MiB" % (n, imp["seconds"], step["store_disk_bytes"] / MiB))
    write_section(ctx, "indexing", {"steps": steps})
    shutil.rmtree(store, ignore_errors=True)


# ---------------------------------------------------------------------------------- 3 migration
def floor(ctx, image, neighbours, hood=None):
    levels = ctx.cfg.get("floor_levels_hoods", {}).get(hood, ctx.cfg["floor_levels"])
    if os.environ.get("BENCH_FLOOR_LONG", "1") == "0":
        levels = ",".join(x for x in levels.split(",") if not x.endswith("L")) or "3"
    r, dt = ctx.sh(["/usr/bin/python3", os.path.join(HERE, "floor.py"), "--migrated", ctx.image(image),
                    "--levels", levels] + sum([["--neighbour", ctx.image(n)] for n in neighbours], []))
    return json.loads(r.stdout.decode())


def start_pair(ctx, src, dst, tag, dst_args=()):
    """Starts a source server on store `src` (namespace src) and a destination on `dst`
    (namespace dst, migration listener on the WAN); returns their control and NBD sockets and
    processes (source first). Logs go to OUT/logs/TAG-{src,dst}.log."""
    s_ctl, d_ctl = os.path.join(ctx.run, "src.ctl"), os.path.join(ctx.run, "dst.ctl")
    s_nbd, d_nbd = os.path.join(ctx.run, "src.nbd"), os.path.join(ctx.run, "dst.nbd")
    for f in (s_ctl, d_ctl, s_nbd, d_nbd):
        if os.path.exists(f):
            os.unlink(f)
    logdir = os.path.join(ctx.out, "logs")
    tls = migration_tls(ctx)
    dsrv = ctx.start([ctx.exe("nbd-server"), "--store", dst, "--unix", d_nbd, "--control", d_ctl,
                      "--migration-listen", "%s:7700" % DST_ADDR] + tls("dst") + list(dst_args), ns="dst", stdout_pipe=True,
                     log=os.path.join(logdir, "%s-dst.log" % tag))
    ssrv = ctx.start([ctx.exe("nbd-server"), "--store", src, "--unix", s_nbd, "--control", s_ctl] + tls("src"),
                     ns="src", stdout_pipe=True, log=os.path.join(logdir, "%s-src.log" % tag))
    return s_ctl, d_ctl, s_nbd, d_nbd, ssrv, dsrv


def ours_migration(ctx, image, hood_name, neighbours, load=False, dst_store=None, dst_args=(), label=None, migrate_args=()):
    """Our migration over the emulated WAN; returns a result row.

    By default the destination is a copy of a store holding `neighbours` (made offline once
    per run). `dst_store` instead names a store the caller prepared (used in place, e.g. one
    whose blocks live in RADOS, which cannot be copied), `dst_args` are added to the
    destination server's command line (e.g. --blocks/--ceph-conf) and `label` to its log
    names and the row."""
    ctx.wan_up()
    # The source may keep other disks too (the older version of a VM, as the snapshot its
    # copy at the destination was made from): they go in first, the migrated disk last.
    keeps = ctx.cfg.get("source_keeps", {}).get(image, [])
    src_pristine = pristine_store(ctx, "-".join(["src"] + keeps + [image]), keeps + [image])
    if dst_store is None:
        key = "dst-" + ("-".join(neighbours) if neighbours else "empty")
        dst_pristine = pristine_store(ctx, key, neighbours)
    tag = "%s-%s%s%s" % (image, hood_name, "-load" if load else "", "-" + label if label else "")
    src = copy_store(ctx, src_pristine, os.path.join(ctx.run, "mig-src"))
    dst = dst_store if dst_store is not None else copy_store(ctx, dst_pristine, os.path.join(ctx.run, "mig-dst"))
    s_ctl, d_ctl, s_nbd, d_nbd, ssrv, dsrv = start_pair(ctx, src, dst, "mig-" + tag, dst_args)
    logdir = os.path.join(ctx.out, "logs")
    fio = guest = None
    row = {"tool": "ours", "image": image, "hood": hood_name, "neighbours": neighbours, "load": load}
    if label:
        row["label"] = label
    try:
        wait_ready(ctx, dsrv, "destination nbd-server")
        wait_ready(ctx, ssrv, "source nbd-server")
        if load:
            fio_out = os.path.join(ctx.run, "fio-load.json")
            iops = int(os.environ.get("BENCH_LOAD_IOPS", "500"))
            cmd = ["fio", "--name=load", "--ioengine=nbd", "--uri=nbd+unix:///%s?socket=%s" % (image, s_nbd),
                   "--rw=randwrite", "--bs=4k", "--iodepth=1", "--time_based", "--runtime=3600",
                   "--output-format=json", "--output=" + fio_out, "--continue_on_error=all"]
            if iops > 0:
                cmd.append("--rate_iops=%d" % iops)
            fio = ctx.start(cmd, log=os.path.join(logdir, "mig-%s-fio.log" % tag))
            row["load_fio"] = {"rate_iops": iops, "iodepth": 1, "bs": 4096, "rw": "randwrite"}
            # a guest that follows its disk to the destination: the pause a client sees
            mirror = os.path.join(ctx.run, "guest-mirror.raw")
            ctx.sh(["cp", "--sparse=always", ctx.image(image), mirror])
            gw_stats = os.path.join(ctx.run, "guest-writer.json")
            if os.path.exists(gw_stats):
                os.unlink(gw_stats)
            guest = ctx.start(["/usr/bin/python3", os.path.join(REPO, "scripts", "guest-writer.py"),
                               "--source", "nbd+unix:///%s?socket=%s" % (image, s_nbd),
                               "--dest", "nbd+unix:///%s?socket=%s" % (image, d_nbd), "--mirror", mirror,
                               "--after-switch", "50", "--interval", "0.002", "--timeout", "7200",
                               "--stats", gw_stats], log=os.path.join(logdir, "mig-%s-guest.log" % tag))
            time.sleep(3)
        b0 = ctx.link_bytes()
        r, dt = ctx.sh([ctx.exe("migrate"), "--source", s_ctl, "--dest", d_ctl, "--disk", image, "--json"]
                       + list(migrate_args), timeout=7200)
        b1 = ctx.link_bytes()
        rep = json.loads(r.stdout.decode())
        row.update({
            "link_bytes": b1 - b0, "seconds": round(dt, 3), "report": rep,
            "downtime_ms": rep.get("downtime_ms"),
        })
        if fio is not None:
            ctx.stop(fio, sig=signal.SIGINT, timeout=30)
            fio = None
            try:
                with open(os.path.join(ctx.run, "fio-load.json")) as f:
                    txt = f.read()
                j = json.loads(txt[txt.index("{"):])["jobs"][0]
                row["load_fio"].update({"achieved_iops": j["write"]["iops"], "errors": j.get("error"),
                                        "total_err": j.get("total_err"),
                                        "clat_max_ms": j["write"].get("clat_ns", {}).get("max", 0) / 1e6})
            except (OSError, ValueError, KeyError, IndexError) as e:
                row["load_fio"]["parse_error"] = str(e)
        if guest is not None:
            try:
                guest.wait(120)
                with open(gw_stats) as f:
                    row["guest_writer"] = json.load(f)
            except (subprocess.TimeoutExpired, OSError, ValueError) as e:
                row["guest_writer"] = {"error": str(e)}
            ctx.stop(guest)
            guest = None
        if not load and not ctx.args.no_verify:
            got = ctx.sha_nbd("nbd+unix:///%s?socket=%s" % (image, d_nbd))
            row["verified"] = got == ctx.image_sha(image)
    finally:
        if fio is not None:
            ctx.stop(fio, sig=signal.SIGINT, timeout=30)
        if guest is not None:
            ctx.stop(guest)
        ctx.stop(ssrv)
        ctx.stop(dsrv)
    return row


def migration_tls(ctx):
    """The migration link's mutual TLS (the production set-up), or plaintext with BENCH_MIGRATION_TLS=0."""
    if os.environ.get("BENCH_MIGRATION_TLS", "1") == "0":
        return lambda side: ["--migration-insecure"]
    d = os.path.join(ctx.run, "certs")
    if not os.path.exists(os.path.join(d, "dst.pem")):
        ctx.sh([os.path.join(REPO, "scripts", "make-certs.sh"), d, "src,dst", SRC_ADDR, DST_ADDR])
    return lambda side: ["--migration-cert", os.path.join(d, side + ".pem"), "--migration-key",
                         os.path.join(d, side + ".key"), "--migration-ca", os.path.join(d, "ca.pem")]


def full_copy(ctx, image):
    ctx.wan_up()
    port = 10809
    srv = ctx.start(["qemu-nbd", "-f", "raw", "-r", "-x", image, "-b", SRC_ADDR, "-p", str(port), "-t",
                     "--shared=8", ctx.image(image)], ns="src", log=os.path.join(ctx.out, "logs", "fullcopy-qemu-nbd.log"))
    out = os.path.join(ctx.run, "fullcopy.raw")
    row = {"tool": "full copy (nbdcopy)", "image": image}
    try:
        wait_port(ctx, "src", SRC_ADDR, port)
        if os.path.exists(out):
            os.unlink(out)
        open(out, "w").close()
        os.truncate(out, os.path.getsize(ctx.image(image)))
        b0 = ctx.link_bytes()
        _, dt = ctx.sh(["nbdcopy", "nbd://%s:%d/%s" % (SRC_ADDR, port, image), out], ns="dst", timeout=7200)
        b1 = ctx.link_bytes()
        row.update({"link_bytes": b1 - b0, "seconds": round(dt, 3)})
        if not ctx.args.no_verify:
            row["verified"] = sha_file(out) == ctx.image_sha(image)
    finally:
        ctx.stop(srv)
        if os.path.exists(out):
            os.unlink(out)
    return row


def wait_port(ctx, ns, addr, port, timeout=30):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = subprocess.run(ctx.ns_prefix(ns) + ["/usr/bin/python3", "-c",
                           "import socket,sys; s=socket.socket(); s.settimeout(1); s.connect((sys.argv[1], int(sys.argv[2])))",
                           addr, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if r.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("nothing listens on %s:%d in %s" % (addr, port, ns))


def rsync_runs(ctx, image, neighbours):
    """rsync --no-whole-file -z -B4096 from the source, each neighbour as the basis."""
    ctx.wan_up()
    port = 8730
    conf = os.path.join(ctx.run, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write("use chroot = no\nread only = yes\n[img]\npath = %s\n" % ctx.images_dir)
    srv = ctx.start(["rsync", "--daemon", "--no-detach", "--config=" + conf, "--port=%d" % port,
                     "--address=" + SRC_ADDR], ns="src", log=os.path.join(ctx.out, "logs", "rsyncd.log"))
    rows = []
    try:
        wait_port(ctx, "src", SRC_ADDR, port)
        ddir = os.path.join(ctx.run, "rsync-dst")
        os.makedirs(ddir, exist_ok=True)
        target = os.path.join(ddir, image + ".raw")
        for n in neighbours:
            if os.path.exists(target):
                os.unlink(target)
            _, prep = ctx.sh(["cp", "--sparse=always", "--reflink=auto", ctx.image(n), target])
            b0 = ctx.link_bytes()
            r, dt = ctx.sh(["rsync", "--no-whole-file", "-z", "-B4096", "-I", "--sparse", "--stats",
                            "rsync://%s:%d/img/%s.raw" % (SRC_ADDR, port, image), target], ns="dst", timeout=7200)
            b1 = ctx.link_bytes()
            row = {"tool": "rsync", "image": image, "basis": n, "link_bytes": b1 - b0, "seconds": round(dt, 3),
                   "prep_seconds": round(prep, 3), "stats": r.stdout.decode(errors="replace")[-1500:]}
            if not ctx.args.no_verify:
                row["verified"] = sha_file(target) == ctx.image_sha(image)
            rows.append(row)
            ctx.log("rsync %s basis %s: %.1f MiB in %.1f s" % (image, n, row["link_bytes"] / MiB, dt))
        if os.path.exists(target):
            os.unlink(target)
    finally:
        ctx.stop(srv)
    return rows




def casync_run(ctx, image, hood_name, neighbours, chunking):
    """casync make at the source, extract over HTTP at the destination, every neighbour a seed."""
    ctx.wan_up()
    port = 8780
    root = os.path.join(ctx.run, "casync-src")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    chunk_opt = ["--chunk-size=4096"] if chunking == "4k" else []
    idx = os.path.join(root, "image.caibx")
    _, make_s = ctx.sh(["casync"] + chunk_opt + ["--store=" + os.path.join(root, "store"), "make", idx,
                                                 ctx.image(image)], ns="src", timeout=7200)
    http = ctx.start(["/usr/bin/python3", os.path.join(HERE, "http_server.py"), SRC_ADDR, str(port), root], ns="src",
                     log=os.path.join(ctx.out, "logs", "casync-http.log"))
    out = os.path.join(ctx.run, "casync-out.raw")
    row = {"tool": "casync (%s chunks)" % ("4 KiB" if chunking == "4k" else "default 64 KiB"),
           "image": image, "hood": hood_name, "neighbours": neighbours, "chunking": chunking,
           "make_seconds": round(make_s, 3), "store_bytes": du_bytes(os.path.join(root, "store"))}
    try:
        wait_port(ctx, "src", SRC_ADDR, port)
        if os.path.exists(out):
            os.unlink(out)
        url = "http://%s:%d" % (SRC_ADDR, port)
        b0 = ctx.link_bytes()
        _, dt = ctx.sh(["casync", "--store=" + url + "/store"] + ["--seed=" + ctx.image(n) for n in neighbours]
                       + ["extract", url + "/image.caibx", out], ns="dst", timeout=7200)
        b1 = ctx.link_bytes()
        row.update({"link_bytes": b1 - b0, "extract_seconds": round(dt, 3), "seconds": round(dt + make_s, 3)})
        if not ctx.args.no_verify:
            row["verified"] = sha_file(out) == ctx.image_sha(image)
    finally:
        ctx.stop(http)
        shutil.rmtree(root, ignore_errors=True)
        if os.path.exists(out):
            os.unlink(out)
    return row


def tool_versions(cmds):
    out = {}
    for cmd in cmds:
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10)
            out[cmd[0]] = (r.stdout.splitlines() or [""])[0].strip()
        except (OSError, subprocess.SubprocessError):
            out[cmd[0]] = None
    return out


def git_commit():
    """HEAD's short hash, with '+' when the work tree has uncommitted changes to tracked files."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!bench"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        return head + ("+" if dirty else "") if head else None
    except OSError:
        return None


def hoods_of(cfg, image):
    """The neighbourhoods an image is migrated into: its own if it has some, else the common ones."""
    return cfg.get("image_hoods", {}).get(image, cfg["hoods"])


def section_migration(ctx):
    cfg = ctx.cfg
    path = os.path.join(ctx.out, "sections", "migration.json")
    res = {"link_rate_bps": LINK_RATE_BPS, "hoods": cfg["hoods"], "images": {}, "versions": tool_versions(
        [["rsync", "--version"], ["casync", "--version"], ["nbdcopy", "--version"], ["qemu-nbd", "--version"],
         ["zstd", "--version"]]),
        "migration_tls": os.environ.get("BENCH_MIGRATION_TLS", "1") != "0"}
    migrated = cfg["migrated"]
    if os.environ.get("BENCH_MIGRATED"):
        # re-run some images only: the other images keep their last results (all of an
        # image's rows are always measured together)
        migrated = [x for x in os.environ["BENCH_MIGRATED"].split(",") if x]
        try:
            with open(path) as f:
                old = json.load(f)
            if old.get("mode") == ("quick" if ctx.args.quick else "full") and old.get("scale") == cfg["scale"]:
                res["images"] = {k: v for k, v in old.get("images", {}).items() if k not in migrated}
        except (OSError, ValueError):
            pass
    for image in migrated:
        hoods = hoods_of(cfg, image)
        im = {"floor": {}, "ours": {}, "rsync": [], "casync": [], "full_copy": None, "errors": [], "hoods": hoods,
              # images re-run alone (BENCH_MIGRATED) keep the others' rows: each says when
              # and from which commit it was measured
              "measured": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()}}
        res["images"][image] = im

        def attempt(what, fn):
            try:
                return fn()
            except Exception as e:
                ctx.log("migration %s %s FAILED: %s" % (image, what, e))
                traceback.print_exc(file=ctx.logf)
                im["errors"].append({"what": what, "error": str(e)[-2000:]})
                return None

        # floors
        im["floor"]["empty"] = attempt("floor empty", lambda: floor(ctx, image, []))
        for h, nb in hoods.items():
            im["floor"][h] = attempt("floor " + h, lambda h=h, nb=nb: floor(ctx, image, nb, h))
        # ours
        im["ours"]["empty"] = attempt("ours empty", lambda: ours_migration(ctx, image, "empty", []))
        for h, nb in hoods.items():
            im["ours"][h] = attempt("ours " + h, lambda h=h, nb=nb: ours_migration(ctx, image, h, nb))
            if h in cfg.get("no_delta_hoods", []):
                # what deltas give: the same migration with every block sent whole
                im["ours_no_delta"] = im.get("ours_no_delta", {})
                im["ours_no_delta"][h] = attempt("ours %s --no-delta" % h, lambda h=h, nb=nb: ours_migration(
                    ctx, image, h, nb, label="no-delta", migrate_args=["--no-delta"]))
        write_section(ctx, "migration", res)
        # peers
        if cfg["full_copy"]:
            im["full_copy"] = attempt("full copy", lambda: full_copy(ctx, image))
        if cfg["rsync"]:
            every = []
            for nb in hoods.values():
                every += [n for n in nb if n not in every]
            im["rsync"] = attempt("rsync", lambda: rsync_runs(ctx, image, every)) or []
        if shutil.which("casync"):
            for h, nb in hoods.items():
                if h not in cfg.get("casync_hoods", hoods.keys()):
                    continue
                for ch in cfg["casync_chunkings"]:
                    if ch == "4k" and (h not in cfg.get("casync_4k_hoods", [h])
                                       or os.environ.get("BENCH_CASYNC_4K", "1") == "0"):
                        continue
                    row = attempt("casync %s %s" % (h, ch), lambda h=h, nb=nb, ch=ch: casync_run(ctx, image, h, nb, ch))
                    if row:
                        im["casync"].append(row)
        else:
            res["casync_missing"] = "casync is not installed (apt-get install casync)"
        write_section(ctx, "migration", res)
    ctx.wan_down()


def section_gang(ctx):
    import gang
    gang.section_gang(ctx, sys.modules[__name__])


# ---------------------------------------------------------------------------------- 4 downtime
def section_downtime(ctx):
    cfg = ctx.cfg
    rows = []
    hood = cfg["load_hood"]
    for image in cfg["load_images"]:
        for load in (False, True):
            try:
                rows.append(ours_migration(ctx, image, hood, cfg["hoods"][hood], load=load))
            except Exception as e:
                ctx.log("downtime %s load=%s FAILED: %s" % (image, load, e))
                rows.append({"image": image, "load": load, "error": str(e)[-2000:]})
            write_section(ctx, "downtime", {"rows": rows})
    ctx.wan_down()
    write_section(ctx, "downtime", {"rows": rows})


# ---------------------------------------------------------------------------------- 5 NBD data path
def densify(src, dst, limit):
    """Writes the non-zero 4 KiB blocks of src, in order, to dst (at most `limit` bytes)."""
    zero = bytes(4096)
    n = 0
    with open(src, "rb") as f, open(dst, "wb") as o:
        while n < limit:
            b = f.read(4 * MiB)
            if not b:
                break
            keep = [b[i:i + 4096] for i in range(0, len(b), 4096) if b[i:i + 4096] != zero]
            data = b"".join(keep)[:limit - n]
            o.write(data)
            n += len(data)
    n -= n % MiB
    os.truncate(dst, n)
    return n


def fio_nbd(ctx, uri, rw, qd, runtime, ns=None, extra=()):
    out = os.path.join(ctx.run, "fio.json")
    ctx.sh(["fio", "--name=job", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=4k",
            "--iodepth=%d" % qd, "--time_based", "--runtime=%d" % runtime, "--ramp_time=1",
            "--output-format=json", "--output=" + out] + list(extra), ns=ns, timeout=runtime + 120)
    with open(out) as f:
        txt = f.read()
    j = json.loads(txt[txt.index("{"):])["jobs"][0]
    side = j["read" if "read" in rw else "write"]
    return {"iops": side["iops"], "lat_mean_us": side.get("lat_ns", {}).get("mean", 0) / 1000.0,
            "error": j.get("error")}


def duplicated(src, dst, copies=8):
    """A highly duplicated data set as large as src: its first 1/copies, repeated."""
    size = os.path.getsize(src)
    part = size // copies // (4 * MiB) * (4 * MiB) or size
    with open(src, "rb") as f:
        head = f.read(part)
    with open(dst, "wb") as o:
        n = 0
        while n < size:
            b = head[:size - n]
            o.write(b)
            n += len(b)
    return size


def varied(src, dst, flip_byte=0x5A):
    """src with the first 16 bytes of every 4 KiB block flipped: blocks the store does not hold
    yet (so a write test writes data, not references), equal where src's blocks are equal.
    Each flip byte gives another set of new blocks."""
    flip = int.from_bytes(bytes([flip_byte] * 16), "little")
    with open(src, "rb") as f, open(dst, "wb") as o:
        while True:
            b = bytearray(f.read(4 * MiB))
            if not b:
                break
            for i in range(0, len(b), 4096):
                b[i:i + 16] = (int.from_bytes(b[i:i + 16], "little") ^ flip).to_bytes(16, "little")
            o.write(b)


# The data sets of the NBD section: fio writes unique blocks (refilled buffers) to the first,
# and mostly repeated ones (fio's dedupe_percentage) to the second.
NBD_SETS = {"unique": ["--refill_buffers"], "dup": ["--refill_buffers", "--dedupe_percentage=80"]}
# One sequential-write variant per repetition (the median is reported).
SEQ_WRITE_FLIPS = (0x5A, 0xA5, 0x3C)
# Warm sequential-read passes per server (the median is reported).
SEQ_READ_PASSES = 5


def section_nbd(ctx):
    cfg = ctx.cfg
    work = os.path.join(ctx.run, "nbd")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    # BENCH_NBD_IMAGE: another image's blocks as the content (one the machine has built);
    # BENCH_NBD_BYTES and BENCH_FIO_RUNTIME: a shorter or longer run
    image = os.environ.get("BENCH_NBD_IMAGE") or cfg["nbd_image"]
    nbd_bytes = int(os.environ.get("BENCH_NBD_BYTES") or cfg["nbd_bytes"])
    runtime = int(os.environ.get("BENCH_FIO_RUNTIME") or cfg["fio_runtime"])
    contents = {"unique": os.path.join(work, "unique")}
    size = densify(ctx.image(image), contents["unique"], nbd_bytes)
    contents["dup"] = os.path.join(work, "dup")
    duplicated(contents["unique"], contents["dup"])
    # what the sequential-write tests write: new to every server's disks, the store's included;
    # one variant per repetition, so each repetition writes blocks nobody holds yet
    to_write = {}
    for dset, path in contents.items():
        to_write[dset] = []
        for i, flip in enumerate(SEQ_WRITE_FLIPS):
            to_write[dset].append("%s.w%d" % (path, i))
            varied(path, to_write[dset][-1], flip)
    ctx.log("nbd: %d MiB of %s's non-zero blocks as content; a duplicated set of the same size" % (size // MiB, image))
    results = {}
    store = os.path.join(work, "store")
    imports = {}
    for name, path in contents.items():
        imports[name] = cas_import(ctx, store, name, path)

    def quiet(procs, limit=0.05, longest=20.0):
        """Waits (at most `longest` s) until the servers together use under `limit` of a core:
        one server's background work after its turn (compaction, write-back of what it wrote)
        must not run in another server's turn."""
        pids = [p.pid for p in procs]
        end = time.time() + longest
        while time.time() < end:
            before = sum(cpu_seconds(pid) or 0 for pid in pids)
            time.sleep(0.5)
            if sum(cpu_seconds(pid) or 0 for pid in pids) - before < limit * 0.5:
                return

    def measure(servers):
        """Every row for every server, the servers taking turns row by row (the first of each
        row rotating): a row's figures are minutes apart no more, so a change of the shared
        host's speed between servers no longer decides a ratio. Each server is `(name, start,
        uri_of, empty_export)`; `empty_export(export)` makes a write export empty again."""
        procs = []
        rs = {name: {} for name, _, _, _ in servers}
        rotation = [0]

        def in_turn():
            k = rotation[0] % len(servers)
            rotation[0] += 1
            return servers[k:] + servers[:k]

        def empty(empty_export, export):
            empty_export(export)
            # Each write pass starts with no dirty page cache left by an earlier one: the
            # peers' truncated files drop theirs, ours' deleted containers too, but what is
            # still live would otherwise be written back during the next pass.
            ctx.sh(["sync"])

        try:
            for _, start, _, _ in servers:
                procs += start()
            for dset, fio_extra in NBD_SETS.items():
                # sequential read: a first pass warms the page cache (reported too), then the
                # median of five, the servers taking turns (single passes of a second on these
                # shared cores vary by a third)
                for name, _, uri_of, _ in in_turn():
                    quiet(procs)
                    rs[name]["%s_seq_read_MBps_first" % dset] = size / ctx.sh(["nbdcopy", uri_of(dset), "null:"])[1] / 1e6
                passes = {name: [] for name, _, _, _ in servers}
                for _ in range(SEQ_READ_PASSES):
                    for name, _, uri_of, _ in in_turn():
                        passes[name].append(ctx.sh(["nbdcopy", uri_of(dset), "null:"])[1])
                for name, times in passes.items():
                    rs[name]["%s_seq_read_MBps" % dset] = size / statistics.median(times) / 1e6
                    rs[name]["%s_seq_read_MBps_passes" % dset] = [round(size / t / 1e6, 1) for t in times]
                for qd in (1, 32):
                    for name, _, uri_of, _ in in_turn():
                        quiet(procs)
                        f = fio_nbd(ctx, uri_of(dset), "randread", qd, runtime)
                        rs[name]["%s_randread_qd%d_iops" % (dset, qd)] = f["iops"]
                        rs[name]["%s_randread_qd%d_lat_us" % (dset, qd)] = f["lat_mean_us"]
                # sequential write: the median of the variants, each into an empty export
                passes = {name: [] for name, _, _, _ in servers}
                for w in to_write[dset]:
                    for name, _, uri_of, empty_export in in_turn():
                        empty(empty_export, "wr-" + dset)
                        quiet(procs)
                        passes[name].append(ctx.sh(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", w, uri_of("wr-" + dset)])[1])
                for name, times in passes.items():
                    rs[name]["%s_seq_write_MBps" % dset] = size / statistics.median(times) / 1e6
                    rs[name]["%s_seq_write_MBps_passes" % dset] = [round(size / t / 1e6, 1) for t in times]
                # the random writes start from an empty export too; each server's QD32 job runs
                # on what its QD1 job left
                for _, _, _, empty_export in servers:
                    empty(empty_export, "wr-" + dset)
                for qd in (1, 32):
                    # A seed per job: fio seeds its buffer contents the same way in every job, so
                    # the QD32 job would otherwise write again the contents the QD1 job has just
                    # stored (shifted by the queue depth), not the new blocks the row is about.
                    seed = "--randseed=%d" % (1000 * qd + len(dset))
                    for name, _, uri_of, _ in in_turn():
                        # another server's writes are not written back during this one's turn
                        ctx.sh(["sync"])
                        quiet(procs)
                        f = fio_nbd(ctx, uri_of("wr-" + dset), "randwrite", qd, runtime, extra=list(fio_extra) + [seed])
                        rs[name]["%s_randwrite_qd%d_iops" % (dset, qd)] = f["iops"]
                        rs[name]["%s_randwrite_qd%d_lat_us" % (dset, qd)] = f["lat_mean_us"]
        finally:
            for p in procs:
                ctx.stop(p)
        for name, r in rs.items():
            results[name] = r
            ctx.log("nbd %s: %s" % (name, json.dumps({k: round(v, 1) for k, v in r.items() if not isinstance(v, list)})))

    sock_dir = os.path.join(work, "sockets")
    os.makedirs(sock_dir)
    exports = ["unique", "dup", "wr-unique", "wr-dup"]

    # ours: the contents imported as disks "unique" and "dup", empty disks for the writes
    port = free_port()
    ours_sock = os.path.join(sock_dir, "ours.sock")
    ours_control = os.path.join(sock_dir, "ours.control")

    def start_ours():
        # the write tests' disks start empty on every run
        for e in exports[2:]:
            subprocess.run([ctx.exe("cas"), "rm", e, "--store", store], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        p = ctx.start([ctx.exe("nbd-server"), "--store", store, "--listen", "127.0.0.1:%d" % port, "--unix", ours_sock,
                       "--control", ours_control, "--disk", "wr-unique:%d" % size, "--disk", "wr-dup:%d" % size,
                       "--compact-interval", "0"],
                      stdout_pipe=True, log=os.path.join(ctx.out, "logs", "nbd-ours.log"))
        wait_ready(ctx, p, "nbd-server")
        return [p]

    # the peers serve copies of the contents and empty sparse files for the writes
    files = os.path.join(work, "files")
    os.makedirs(files)

    def fresh_files():
        for e in exports:
            f = os.path.join(files, e)
            if os.path.exists(f):
                os.unlink(f)
        for dset, path in contents.items():
            shutil.copyfile(path, os.path.join(files, dset))
            w = os.path.join(files, "wr-" + dset)
            open(w, "w").close()
            os.truncate(w, size)

    # qemu-nbd: one process per export
    qports = {}
    for e in exports:
        qports[e] = free_port()
        while list(qports.values()).count(qports[e]) > 1:
            qports[e] = free_port()

    def start_qemu(unix):
        ps = []
        for e, pt in qports.items():
            where = ["-k", os.path.join(sock_dir, "qemu-%s.sock" % e)] if unix else ["-b", "127.0.0.1", "-p", str(pt)]
            ps.append(ctx.start(["qemu-nbd", "-f", "raw", "-x", e] + where + ["-t", "--shared=16", "--cache=writeback",
                                 "--aio=threads", os.path.join(files, e)], log=os.path.join(ctx.out, "logs", "nbd-qemu.log")))
        for e, pt in qports.items():
            if unix:
                wait_file(os.path.join(sock_dir, "qemu-%s.sock" % e))
            else:
                wait_port(ctx, None, "127.0.0.1", pt)
        return ps

    # nbdkit's file plugin in dir= mode: one export per file
    kport = free_port()
    kit_sock = os.path.join(sock_dir, "nbdkit.sock")

    def start_nbdkit(unix):
        where = ["-U", kit_sock] if unix else ["-i", "127.0.0.1", "-p", str(kport)]
        p = ctx.start(["nbdkit", "-f"] + where + ["file", "dir=" + files], log=os.path.join(ctx.out, "logs", "nbd-nbdkit.log"))
        if unix:
            wait_file(kit_sock)
        else:
            wait_port(ctx, None, "127.0.0.1", kport)
        return [p]

    def trim_all(uri_of):
        # ours: a whole-disk TRIM empties the disk's map (its blocks become garbage), then a
        # compaction pass deletes the containers that hold only garbage, as the peers'
        # truncation deallocates their files (with compaction left to its timer, the garbage
        # of one pass would be written back to disk during the next)
        # (nbdsh runs `python3`: the system one, which has libnbd's module)
        env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))

        def empty(e):
            ctx.sh(["nbdsh", "-u", uri_of(e), "-c", "h.trim(h.get_size(), 0)"], env=env)
            ctx.sh([ctx.exe("cas"), "gc", "--server", ours_control])
        return empty

    def empty_file(e):
        # the peers' raw files: deallocated, as a fresh sparse file is
        f = os.path.join(files, e)
        os.truncate(f, 0)
        os.truncate(f, size)

    def unix_uri(sock):
        return lambda e: "nbd+unix:///%s?socket=%s" % (e, sock)

    ours_tcp = lambda e: "nbd://127.0.0.1:%d/%s" % (port, e)  # noqa: E731
    # The peers serve the same files one after the other (each write row empties its file
    # before the server whose turn it is writes), so the files are made once per transport.
    fresh_files()
    measure([("ours", start_ours, ours_tcp, trim_all(ours_tcp)),
             ("qemu-nbd", lambda: start_qemu(False), lambda e: "nbd://127.0.0.1:%d/%s" % (qports[e], e), empty_file),
             ("nbdkit-file", lambda: start_nbdkit(False), lambda e: "nbd://127.0.0.1:%d/%s" % (kport, e), empty_file)])
    # The same over Unix sockets; ours runs again on its store (the writes' disks recreated).
    fresh_files()
    measure([("ours-unix", start_ours, unix_uri(ours_sock), trim_all(unix_uri(ours_sock))),
             ("qemu-nbd-unix", lambda: start_qemu(True), lambda e: "nbd+unix:///%s?socket=%s" % (e, os.path.join(sock_dir, "qemu-%s.sock" % e)),
              empty_file),
             ("nbdkit-file-unix", lambda: start_nbdkit(True), unix_uri(kit_sock), empty_file)])

    versions = {}
    for cmd in (["qemu-nbd", "--version"], ["nbdkit", "--version"], ["nbdcopy", "--version"], ["fio", "--version"]):
        try:
            versions[cmd[0]] = subprocess.run(cmd, stdout=subprocess.PIPE, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            pass
    write_section(ctx, "nbd", {"content_image": image, "content_bytes": size, "data_sets": list(NBD_SETS),
                               "imports": imports, "fio_runtime_s": runtime, "results": results, "versions": versions})
    shutil.rmtree(work, ignore_errors=True)


def wait_file(path, timeout=30):
    t0 = time.monotonic()
    while not os.path.exists(path):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError("%s did not appear" % path)
        time.sleep(0.05)


# ---------------------------------------------------------------------------------- 6 store bench
def section_store(ctx):
    cmd = ["cargo", "bench", "-p", "cas-store", "--bench", "store"]
    if ctx.cfg["store_bench_args"]:
        cmd += ["--"] + ctx.cfg["store_bench_args"]
    r = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(os.path.join(ctx.out, "logs", "store-bench.log"), "w") as f:
        f.write(r.stdout)
    if r.returncode != 0:
        raise RuntimeError("cargo bench failed (log: %s)" % f.name)
    write_section(ctx, "store", {"benchmarks": parse_criterion(r.stdout), "command": " ".join(cmd)})


UNITS = {"B/s": 1, "KiB/s": 1024, "MiB/s": MiB, "GiB/s": GiB, "elem/s": 1, "Kelem/s": 1e3,
         "Melem/s": 1e6, "Gelem/s": 1e9, "KB/s": 1e3, "MB/s": 1e6, "GB/s": 1e9}
TUNITS = {"ps": 1e-12, "ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1}


def parse_criterion(text):
    out = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+time:\s+\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
        if m:
            name = m.group(1)
            out[name] = {"time_s": float(m.group(4)) * TUNITS.get(m.group(5), 1)}
            continue
        m = re.match(r"^(\S+)\s*$", line)
        if m and not line.startswith(" ") and "/" in line:
            name = m.group(1)
            out.setdefault(name, {})
            continue
        m = re.match(r"^\s+time:\s+\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
        if m and name:
            out.setdefault(name, {})["time_s"] = float(m.group(3)) * TUNITS.get(m.group(4), 1)
            continue
        m = re.match(r"^\s+thrpt:\s+\[(\S+) (\S+) (\S+) (\S+) (\S+) (\S+)\]", line)
        if m and name:
            unit = m.group(4)
            v = float(m.group(3)) * UNITS.get(unit, 1)
            out.setdefault(name, {})["per_second" if "elem" in unit else "bytes_per_second"] = v
    return {k: v for k, v in out.items() if v}


def section_memory(ctx):
    import memory  # bench/memory.py; imported here, when this module is fully loaded
    memory.run(ctx)


# ---------------------------------------------------------------------------------- 7 RADOS beside RocksDB
CEPH_CLUSTER = os.path.join(REPO, "scripts", "ceph-cluster.sh")
CEPH_TOOLS = ["ceph-mon", "ceph-osd", "ceph", "ceph-authtool", "monmaptool", "rados"]
CEPH_POOL = "nbd-cas"


def ceph_start(ctx):
    """Starts scripts/ceph-cluster.sh's one-node cluster in the WAN's destination namespace.

    Ceph listens on 127.0.0.1 with fixed ports; a destination server inside the namespace
    cannot reach the host's loopback, so the cluster lives where the servers that use it
    live. Ports are per namespace, so a cluster on the host (./test.sh's) is neither used
    nor disturbed, and this one, in the run directory, is always this run's to stop."""
    d = os.path.join(ctx.run, "ceph")
    with open(os.path.join(ctx.run, "ceph-dir"), "w") as f:  # for bench.sh's trap
        f.write(d + "\n")
    env = dict(os.environ, NBD_CAS_CEPH_POOL=CEPH_POOL,
               NBD_CAS_CEPH_MEMSTORE_BYTES=str(ctx.cfg["rados_memstore_bytes"]))
    env.pop("NBD_CAS_CEPH_DIR", None)
    t0 = time.monotonic()
    ctx.sh([CEPH_CLUSTER, "start", d], ns="dst", env=env, capture=False, timeout=300)
    ctx.log("ceph: up in %.1f s (%s, in namespace %s)" % (time.monotonic() - t0, d, ctx.ns_prefix("dst")[-1]))
    return d


def ceph_stop(ctx, d):
    """Stops the cluster (its daemons by their pid files) and deletes its directory; the
    Ceph logs are kept under OUT/logs/ceph/."""
    try:
        with open(os.path.join(d, "run", "osd.0.pid")) as f:
            rss = rss_kib(int(f.read().strip()))
        if rss:
            ctx.ceph_osd_rss_bytes = rss * 1024
    except (OSError, ValueError):
        pass
    keep = os.path.join(ctx.out, "logs", "ceph")
    shutil.rmtree(keep, ignore_errors=True)
    try:
        shutil.copytree(os.path.join(d, "log"), keep)
    except OSError:
        pass
    r, _ = ctx.sh([CEPH_CLUSTER, "stop", d], capture=False, check=False, timeout=120)
    left = [f for f in glob.glob(os.path.join(d, "run", "*.pid"))]
    if r.returncode != 0 or left:
        ctx.log("ceph: stop failed (exit %d); the WAN's teardown ends what is left in its namespace" % r.returncode)
    else:
        os.unlink(os.path.join(ctx.run, "ceph-dir"))


def backend_server(ctx, store, blocks_args, name):
    """An nbd-server in the destination namespace (where the cluster is) on `store`: NBD on a
    Unix socket (cas import, cas rm) and on 127.0.0.1 there (fio); returns (proc, control, port)."""
    sock = os.path.join(ctx.run, "%s.nbd" % name)
    ctl = os.path.join(ctx.run, "%s.ctl" % name)
    for f in (sock, ctl):
        if os.path.exists(f):
            os.unlink(f)
    p = ctx.start([ctx.exe("nbd-server"), "--store", store, "--unix", sock, "--control", ctl,
                   "--listen", "127.0.0.1:0"] + blocks_args, ns="dst", stdout_pipe=True,
                  log=os.path.join(ctx.out, "logs", "%s.log" % name))
    try:
        lines = wait_ready(ctx, p, "nbd-server (%s)" % name)
    except Exception:
        ctx.stop(p)
        raise
    port = next((int(m.group(1)) for m in (re.search(r"listening on nbd://127\.0\.0\.1:(\d+)", x) for x in lines) if m),
                None)
    if port is None:
        ctx.stop(p)
        raise RuntimeError("nbd-server (%s) printed no TCP address: %s" % (name, lines))
    return p, ctl, port


def server_stored_bytes(ctx, ctl):
    r, _ = ctx.sh([ctx.exe("cas"), "stats", "--server", ctl, "--json"])
    return json.loads(r.stdout.decode())["store"]["stored_bytes"]


def section_rados(ctx):
    """Blocks in RADOS beside blocks in RocksDB, in one run: import through a running server,
    4 KiB random reads through NBD, and a migration over the WAN into each."""
    cfg = ctx.cfg
    t_section = time.monotonic()
    hood = cfg["rados_hood"]
    neighbours = cfg["hoods"][hood]
    migrated = cfg["rados_migrated"]
    runtime = cfg["fio_runtime"]
    dense_from = neighbours[-1]
    res = {"hood": hood, "neighbours": neighbours, "migrated": migrated, "fio_runtime_s": runtime,
           "backends": {}, "errors": [], "migration_tls": os.environ.get("BENCH_MIGRATION_TLS", "1") != "0"}
    missing = [t for t in CEPH_TOOLS if not shutil.which(t)]
    if missing:
        res["skipped"] = ("Ceph is not installed (%s missing): scripts/install-deps.sh installs ceph-mon, "
                          "ceph-osd and ceph-common" % ", ".join(missing))
        ctx.log("rados: skipped: " + res["skipped"])
        write_section(ctx, "rados", res)
        return
    r, _ = ctx.sh([ctx.exe("nbd-server"), "--help"], check=False)
    if b"--blocks" not in r.stdout + r.stderr:
        res["skipped"] = "this nbd-server has no --blocks option"
        write_section(ctx, "rados", res)
        return
    res["versions"] = tool_versions([["ceph", "--version"], ["fio", "--version"]])
    namespace = "bench-%d-%d" % (int(time.time()), os.getpid())
    res["ceph"] = {"cluster": "scripts/ceph-cluster.sh: one monitor, one OSD on memstore, pool size 1, "
                              "in the destination's network namespace",
                   "pool": CEPH_POOL, "namespace": namespace, "memstore_bytes": cfg["rados_memstore_bytes"]}
    work = os.path.join(ctx.run, "rados")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)

    def attempt(what, fn):
        try:
            return fn()
        except Exception as e:
            ctx.log("rados %s FAILED: %s" % (what, e))
            traceback.print_exc(file=ctx.logf)
            res["errors"].append({"what": what, "error": str(e)[-2000:]})
            return None

    ceph_dir = None
    ctx.wan_up()
    try:
        t0 = time.monotonic()
        ceph_dir = ceph_start(ctx)
        res["ceph"]["start_seconds"] = round(time.monotonic() - t0, 1)
        conf = os.path.join(ceph_dir, "ceph.conf")
        backends = {"rocksdb": ["--blocks", "rocksdb"],
                    "rados": ["--blocks", "rados:%s/%s" % (CEPH_POOL, namespace), "--ceph-conf", conf]}
        stores = {b: os.path.join(work, "store-" + b) for b in backends}
        # The random reads need data at every offset: the non-zero blocks of the last
        # neighbour, densely packed (as in the nbd section). Every one of its blocks is already
        # stored (the neighbour is imported first), and the disk is deleted before the
        # migration, so the destinations hold exactly the neighbourhood.
        dense = os.path.join(work, "dense.raw")
        dense_bytes = densify(ctx.image(dense_from), dense, cfg["nbd_bytes"])
        res["dense"] = {"from": dense_from, "bytes": dense_bytes}
        for b in backends:
            res["backends"][b] = {"blocks": backends[b][1], "imports": [], "randread": {}, "migrations": {}}
        write_section(ctx, "rados", res)

        # 1. import through a running server, the same images into each
        def imports(b):
            out = res["backends"][b]["imports"]
            p, ctl, _ = backend_server(ctx, stores[b], backends[b], "rados-%s-import" % b)
            try:
                for n in neighbours + ["dense"]:
                    path = dense if n == "dense" else ctx.image(n)
                    before = server_stored_bytes(ctx, ctl)
                    r, dt = ctx.sh([ctx.exe("cas"), "import", "--server", ctl, "--json", n, path], timeout=7200)
                    rep = json.loads(r.stdout.decode())
                    after = server_stored_bytes(ctx, ctl)
                    row = {"image": n, "seconds": round(dt, 3), "image_bytes": rep.get("bytes"),
                           "nonzero_bytes": rep.get("allocated_bytes"), "new_stored_bytes": after - before}
                    out.append(row)
                    ctx.log("rados: import %s into %s: %.1f s, %.1f MiB/s of non-zero data" % (
                        n, b, dt, (row["nonzero_bytes"] or 0) / MiB / dt if dt else 0))
            finally:
                ctx.stop(p)
        for b in backends:
            attempt("import %s" % b, lambda b=b: imports(b))
            write_section(ctx, "rados", res)

        # 2. 4 KiB random reads of the dense disk through NBD (TCP on the namespace's loopback);
        # a fresh server per queue depth: its hot-block cache starts empty (cold), then the
        # same run again (warm)
        def reads(b, qd):
            p, ctl, port = backend_server(ctx, stores[b], backends[b], "rados-%s-fio" % b)
            try:
                uri = "nbd://127.0.0.1:%d/dense" % port
                cold = fio_nbd(ctx, uri, "randread", qd, runtime, ns="dst")
                warm = fio_nbd(ctx, uri, "randread", qd, runtime, ns="dst")
                res["backends"][b]["randread"]["qd%d" % qd] = {"cold": cold, "warm": warm}
                ctx.log("rados: randread QD%d on %s: cold %.0f IOPS, warm %.0f IOPS" % (qd, b, cold["iops"], warm["iops"]))
            finally:
                ctx.stop(p)
        for qd in (1, 32):
            for b in backends:
                if any(e["what"] == "import %s" % b for e in res["errors"]):
                    continue
                attempt("randread QD%d %s" % (qd, b), lambda b=b, qd=qd: reads(b, qd))
            write_section(ctx, "rados", res)

        def drop_disk(b, disk):
            p, ctl, _ = backend_server(ctx, stores[b], backends[b], "rados-%s-admin" % b)
            try:
                r, dt = ctx.sh([ctx.exe("cas"), "rm", "--server", ctl, disk], timeout=3600)
                ctx.log("rados: deleted %s on %s in %.1f s" % (disk, b, dt))
                return round(dt, 3)
            finally:
                ctx.stop(p)
        for b in backends:
            if not any(e["what"] == "import %s" % b for e in res["errors"]):
                res["backends"][b]["dense_delete_seconds"] = attempt("delete dense %s" % b, lambda b=b: drop_disk(b, "dense"))

        # 3. the same migration over the WAN into each destination (the neighbourhood imported
        # above); the source is the usual RocksDB store
        for i, image in enumerate(migrated):
            for b in backends:
                if any(e["what"] in ("import %s" % b, "delete dense %s" % b) for e in res["errors"]):
                    continue
                row = attempt("migration %s %s" % (image, b), lambda b=b: ours_migration(
                    ctx, image, hood, neighbours, dst_store=stores[b], dst_args=backends[b], label="rados-" + b))
                if row:
                    res["backends"][b]["migrations"][image] = row
                    ctx.log("rados: migration %s into %s: %.1f MiB over the link, %.1f s, downtime %s ms" % (
                        image, b, row["link_bytes"] / MiB, row["seconds"], row.get("downtime_ms")))
                if i + 1 < len(migrated):  # the next image meets the neighbourhood alone again
                    attempt("delete %s %s" % (image, b), lambda b=b: drop_disk(b, image))
                write_section(ctx, "rados", res)
    except BaseException as e:
        res["interrupted"] = "%s: %s" % (type(e).__name__, str(e)[-1000:])
        raise
    finally:
        ctx.stop_all()
        if ceph_dir:
            ceph_stop(ctx, ceph_dir)
            res["ceph"]["osd_rss_bytes"] = getattr(ctx, "ceph_osd_rss_bytes", None)
        ctx.wan_down()
        shutil.rmtree(work, ignore_errors=True)
        res["seconds"] = round(time.monotonic() - t_section, 1)
        write_section(ctx, "rados", res)
    if res["errors"]:
        raise PartlyFailed("rados: %d part(s) failed: %s" % (
            len(res["errors"]), "; ".join("%s: %s" % (e["what"], e["error"][:200]) for e in res["errors"])))


# ---------------------------------------------------------------------------------- main
class PartlyFailed(RuntimeError):
    """A section that failed in part and has written its section file (errors included)."""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--scale")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()
    ctx = Ctx(args)
    only = [s for s in args.only.split(",") if s]
    for s in only:
        if s not in SECTIONS:
            raise SystemExit("unknown section %s (known: %s)" % (s, ",".join(SECTIONS)))

    def on_signal(sig, frame):
        raise KeyboardInterrupt("signal %d" % sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    failed = []
    try:
        for s in SECTIONS:
            if s not in only:
                continue
            ctx.log("=== section %s (%s, %s images)" % (s, "quick" if args.quick else "full", ctx.cfg["scale"]))
            t0 = time.monotonic()
            try:
                globals()["section_" + s](ctx)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                ctx.log("section %s FAILED: %s" % (s, e))
                traceback.print_exc(file=ctx.logf)
                failed.append(s)
                if not isinstance(e, PartlyFailed):
                    write_section(ctx, s, {"error": str(e)[-3000:]})
            finally:
                ctx.stop_all()
            ctx.log("=== section %s done in %.0f s" % (s, time.monotonic() - t0))
    finally:
        ctx.stop_all()
        ctx.wan_down()
    if failed:
        ctx.log("failed sections: %s" % ", ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
