"""Section "memory": the store under a large disk (issue 13's memory and compaction targets).

One nbd-server on a fresh store, two disks written at once through NBD with unique data
(fio, refilled buffers): *big* holds 80 % of the bytes, *keep* 20 %, so their blocks share
containers the way disks written side by side do. Then:

1. every byte of both disks is read back (fio, sequential, 1 MiB); the server's RSS is
   sampled all along (peak) and read after (VmRSS, VmHWM);
2. `cas stats` gives the index bytes per stored block (RocksDB's files / unique blocks);
3. 4 KiB random reads of *keep* (fio, QD8) for a while without compaction, then *big* is
   deleted and one compaction pass (`cas gc --server`, the control method store.gc) runs
   while the same fio job runs again: the space the pass gives back against what *big*
   held, and fio's rate during the pass against without it (fio's per-500 ms IOPS log,
   intervals inside the pass only).
"""

import json
import os
import shutil
import threading
import time

# bench.py imports this module inside its section function, after it is fully loaded
from bench import GiB, MiB, free_port, rss_kib, wait_ready, write_section

SIZES = {"full": 20 * GiB, "quick": 2 * GiB}


def _fio(ctx, uri, args, runtime=None, log_prefix=None):
    out = os.path.join(ctx.run, "memory-fio.json")
    cmd = ["fio", "--name=job", "--ioengine=nbd", "--uri=" + uri, "--output-format=json", "--output=" + out] + args
    if runtime:
        cmd += ["--time_based", "--runtime=%d" % runtime]
    if log_prefix:
        cmd += ["--write_iops_log=" + log_prefix, "--log_avg_msec=500"]
    r, dt = ctx.sh(cmd, timeout=(runtime or 3600) + 600)
    with open(out) as f:
        txt = f.read()
    return json.loads(txt[txt.index("{"):]), dt


def _two_writers(ctx, uris, sizes):
    """Writes both disks at once (one fio, one job per disk): their blocks interleave."""
    out = os.path.join(ctx.run, "memory-fio-write.json")
    cmd = ["fio", "--ioengine=nbd", "--rw=write", "--bs=1M", "--iodepth=4", "--refill_buffers",
           "--output-format=json", "--output=" + out]
    for name, uri in uris.items():
        cmd += ["--name=" + name, "--uri=" + uri, "--size=%d" % sizes[name]]
    _, dt = ctx.sh(cmd, timeout=7200)
    return dt


def _iops_during(log_path, t_from_ms, t_to_ms):
    """Mean IOPS of fio's averaged log entries whose interval lies inside [from, to]."""
    vals = []
    try:
        with open(log_path) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) < 2:
                    continue
                t, v = int(parts[0]), int(parts[1])
                if t - 500 >= t_from_ms and t <= t_to_ms:
                    vals.append(v)
    except OSError:
        return None, 0
    return (sum(vals) / len(vals) if vals else None), len(vals)


def run(ctx):
    mode = "quick" if ctx.args.quick else "full"
    total = int(os.environ.get("BENCH_MEMORY_BYTES") or SIZES[mode])
    unit = 4 * MiB
    sizes = {"big": total * 4 // 5 // unit * unit, "keep": total // 5 // unit * unit}
    total = sizes["big"] + sizes["keep"]
    runtime = 10 if ctx.args.quick else 30
    work = os.path.join(ctx.run, "memory")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    store = os.path.join(work, "store")
    ctl = os.path.join(work, "ctl.sock")
    port = free_port()
    p = ctx.start([ctx.exe("nbd-server"), "--store", store, "--listen", "127.0.0.1:%d" % port, "--control", ctl,
                   "--disk", "big:%d" % sizes["big"], "--disk", "keep:%d" % sizes["keep"], "--compact-interval", "0"],
                  stdout_pipe=True, log=os.path.join(ctx.out, "logs", "memory-server.log"))
    wait_ready(ctx, p, "nbd-server (memory)")
    uris = {n: "nbd://127.0.0.1:%d/%s" % (port, n) for n in sizes}

    peak = {"kib": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            v = rss_kib(p.pid)
            if v:
                peak["kib"] = max(peak["kib"], v)
            time.sleep(0.5)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def stats():
        r, _ = ctx.sh([ctx.exe("cas"), "stats", "--server", ctl, "--json"])
        return json.loads(r.stdout.decode())["store"]

    res = {"bytes_written": total, "disks": sizes}
    try:
        ctx.log("memory: writing %d MiB of unique data to two disks at once" % (total // MiB))
        res["write_seconds"] = _two_writers(ctx, uris, sizes)
        res["rss_after_write_bytes"] = (rss_kib(p.pid) or 0) * 1024
        read_s = 0.0
        for n in sizes:
            _, dt = _fio(ctx, uris[n], ["--rw=read", "--bs=1M", "--iodepth=4"])
            read_s += dt
        res["read_seconds"] = read_s
        res["rss_after_read_bytes"] = (rss_kib(p.pid) or 0) * 1024
        res["rss_peak_sampled_bytes"] = peak["kib"] * 1024
        res["rss_hwm_bytes"] = (rss_kib(p.pid, "VmHWM") or 0) * 1024
        st = stats()
        res["stats_before_delete"] = st

        rand = ["--rw=randread", "--bs=4k", "--iodepth=8"]
        quiet, _ = _fio(ctx, uris["keep"], rand, runtime=runtime, log_prefix=os.path.join(work, "quiet"))
        res["fio_quiet_iops"] = quiet["jobs"][0]["read"]["iops"]
        ctx.sh([ctx.exe("cas"), "rm", "big", "--server", ctl])
        before = stats()
        res["stats_after_delete"] = before

        # the pass starts 2 s into the fio job
        log_prefix = os.path.join(work, "busy")
        gc = {}

        def run_gc():
            time.sleep(2)
            t0 = time.monotonic()
            r, _ = ctx.sh([ctx.exe("cas"), "gc", "--server", ctl, "--json"], timeout=3600)
            gc["seconds"] = time.monotonic() - t0
            gc["from_ms"] = 2000
            gc["to_ms"] = 2000 + gc["seconds"] * 1000
            gc["report"] = json.loads(r.stdout.decode())
        t = threading.Thread(target=run_gc)
        t.start()
        busy, _ = _fio(ctx, uris["keep"], rand, runtime=max(runtime, 6), log_prefix=log_prefix)
        t.join()
        res["gc"] = gc
        res["fio_whole_run_iops"] = busy["jobs"][0]["read"]["iops"]
        # fio logs its rate every 500 ms (ms since the job started, as the pass's window is)
        during, n = _iops_during(log_prefix + "_iops.1.log", gc["from_ms"], gc["to_ms"])
        res["fio_during_gc_iops"] = during
        res["fio_during_gc_intervals"] = n
        after = stats()
        res["stats_after_gc"] = after
        deleted = sizes["big"]
        given_back = (before.get("container_bytes") or 0) - (after.get("container_bytes") or 0)
        res["deleted_bytes"] = deleted
        res["given_back_bytes"] = given_back
        res["given_back_share"] = given_back / deleted if deleted else None
        res["index_bytes_per_block"] = st.get("index_bytes_per_block")
    finally:
        stop.set()
        ctx.stop(p)
    ctx.log("memory: %s" % json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)}))
    write_section(ctx, "memory", res)
