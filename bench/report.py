#!/usr/bin/env python3
"""Merges bench sections into results.json, writes RESULTS.md and the plots, prints the tables.

    report.py --out DIR [--started T] [--cmdline C] [--mode quick|full] [--scale S]

Reads DIR/sections/*.json (written by bench.py); every ratio is computed from figures of the
same run (a section re-run alone with --only replaces that section's figures, and the report
says when each section ran).
"""

import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

MiB = 1 << 20
LINK_BPS = 100e6
SECTION_ORDER = ["similarity", "indexing", "migration", "downtime", "gang", "nbd", "store", "memory", "rados"]
PEER_TOOLS = ["full copy (nbdcopy)", "rsync", "casync (default 64 KiB chunks)", "casync (4 KiB chunks)"]


def mib(b):
    return "-" if b is None else "%.1f" % (b / MiB)


def fnum(v, fmt="%.2f"):
    return "-" if v is None else fmt % v


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def table(head, rows):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out) + "\n"


def machine():
    m = {"nproc": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    m["memory_gib"] = round(int(line.split()[1]) / (1 << 20), 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    m["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/loadavg") as f:
            m["loadavg_at_report"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        m["git_commit"] = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        m["git_dirty"] = bool(dirty)
    except OSError:
        pass
    return m


# ---------------------------------------------------------------------------------- sections
def pairs_of(ours):
    if isinstance(ours, dict):
        for k in ("pairs", "shares"):
            if k in ours:
                return ours[k]
    return ours or []


def stem(p):
    b = os.path.basename(str(p))
    return b[:-4] if b.endswith(".raw") else b


def sim_md(s, plots, verdict):
    names = s["images"]
    share = {}
    for p in pairs_of(s.get("ours")):
        share[(stem(p["a"]), stem(p["b"]), int(p["block_size"]))] = float(p["share"])
    sizes = sorted({k[2] for k in share}) or [512, 1024, 2048, 4096]
    md = ["## 1. Similarity (the paper's Table 3)\n",
          "Share of the ROW image's non-zero 4 KiB blocks whose content occurs in the COLUMN image "
          "(`cas similarity`, %.1f s for %d images)." % (s.get("ours_seconds", 0), len(names))]
    if "reference_max_abs_diff" in s:
        md.append(" Independent check (`test-images/similarity.py`, %.1f s): %d shares compared, "
                  "largest difference %.2g." % (s.get("reference_seconds", 0), s.get("reference_compared_pairs", 0),
                                                 s["reference_max_abs_diff"]))
    md.append("\n\n")
    head = ["image \\ found in"] + ["[%d]" % (i + 1) for i in range(len(names))]
    rows = []
    for i, b in enumerate(names):
        rows.append(["[%d] %s" % (i + 1, b)] + [
            "%.1f %%" % (100 * share[(a, b, 4096)]) if (a, b, 4096) in share else "-" for a in names])
    md.append(table(head, rows))
    md.append("\nBy block size (the paper's block-size figure): share of B's blocks found in A.\n\n")
    rows = []
    sel = [(a, b) for b in names for a in names if a != b]
    if len(sel) > 16:  # the full run: the migrated images against their neighbours
        mig = [n for n in names if not n.endswith("-b") and not n.endswith("-minimal")]
        sel = [(a, b) for b in mig for a in names if a != b and (a.endswith("-minimal") or a.endswith("-b"))]
    for a, b in sel:
        rows.append(["%s in %s" % (b, a)] + ["%.1f %%" % (100 * share[(a, b, bs)]) if (a, b, bs) in share else "-"
                                              for bs in sizes])
    md.append(table(["B in A"] + ["%d B" % bs for bs in sizes], rows))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for a, b in sel:
            ys = [100 * share.get((a, b, bs), float("nan")) for bs in sizes]
            ax.plot(sizes, ys, marker="o", label="%s in %s" % (b, a))
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(x) for x in sizes])
        ax.set_xlabel("block size (bytes)")
        ax.set_ylabel("share of B's non-zero blocks found in A (%)")
        ax.set_title("Similarity vs block size")
        ax.grid(True, alpha=.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(os.path.join(plots, "similarity_block_size.png"), dpi=110)
        plt.close(fig)
        md.append("\n![similarity vs block size](plots/similarity_block_size.png)\n")
    except ImportError:
        pass
    return "".join(md)


def stat_field(st, *keys):
    """Looks for a field in `cas stats --json` output, whatever its nesting."""
    if not isinstance(st, dict):
        return None
    for k in keys:
        if k in st and isinstance(st[k], (int, float)):
            return st[k]
    for v in st.values():
        if isinstance(v, dict):
            r = stat_field(v, *keys)
            if r is not None:
                return r
    return None


def idx_md(s, plots):
    steps = s["steps"]
    md = ["## 2. Indexing (the paper's indexing-time and index-size figures)\n\n",
          "Images imported one by one into one store (`cas import`, offline); after each, the store's size on "
          "disk (du), the import's peak RSS, and an `nbd-server` opened on the store: RSS when ready and after "
          "reading the new disk whole (nbdcopy to null:).\n\n"]
    rows = []
    cum_alloc = 0
    cum_t = 0
    for st in steps:
        cum_alloc += st["image_allocated_bytes"]
        cum_t += st["import_seconds"]
        dd = stat_field(st.get("stats"), "dedupe_ratio", "dedup_ratio")
        rows.append([st["step"], st["image"], mib(st["image_allocated_bytes"]), fnum(st["import_seconds"], "%.1f"),
                     fnum(st["image_allocated_bytes"] / MiB / st["import_seconds"] if st["import_seconds"] else None, "%.0f"),
                     mib(st["store_disk_bytes"]), mib(cum_alloc),
                     fnum(ratio(st["store_disk_bytes"], cum_alloc), "%.2f"), fnum(dd, "%.2f"),
                     mib(st.get("import_peak_rss_bytes")), mib(st.get("server_rss_ready_bytes")),
                     mib(st.get("server_rss_after_read_bytes"))])
    md.append(table(["#", "image added", "allocated MiB", "import s", "MiB/s", "store on disk MiB",
                     "sum of images MiB", "store / sum", "dedupe ratio (cas stats)", "import peak RSS MiB",
                     "server RSS ready MiB", "server RSS after read MiB"], rows))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        xs = [st["step"] for st in steps]
        fig, axs = plt.subplots(1, 3, figsize=(14, 4.2))
        axs[0].bar(xs, [st["import_seconds"] for st in steps], color="tab:blue")
        axs[0].set_title("import time per image added")
        axs[0].set_ylabel("seconds")
        cum = []
        c = 0
        for st in steps:
            c += st["image_allocated_bytes"]
            cum.append(c / MiB)
        axs[1].plot(xs, [st["store_disk_bytes"] / MiB for st in steps], marker="o", label="store on disk")
        axs[1].plot(xs, cum, marker="s", linestyle="--", label="sum of the images' allocated bytes")
        axs[1].set_title("store size")
        axs[1].set_ylabel("MiB")
        axs[1].legend(fontsize=8)
        axs[2].plot(xs, [(st.get("server_rss_ready_bytes") or 0) / MiB for st in steps], marker="o", label="server, ready")
        axs[2].plot(xs, [(st.get("server_rss_after_read_bytes") or 0) / MiB for st in steps], marker="s", label="server, after a full read")
        axs[2].plot(xs, [(st.get("import_peak_rss_bytes") or 0) / MiB for st in steps], marker="^", label="cas import, peak")
        axs[2].set_title("memory (RSS)")
        axs[2].set_ylabel("MiB")
        axs[2].legend(fontsize=8)
        for ax in axs:
            ax.set_xlabel("images added")
            ax.set_xticks(xs)
            ax.grid(True, alpha=.3)
        fig.tight_layout()
        fig.savefig(os.path.join(plots, "indexing.png"), dpi=110)
        plt.close(fig)
        md.append("\n![indexing](plots/indexing.png)\n")
        md.append("\nImages in order: " + ", ".join("%d. %s" % (st["step"], st["image"]) for st in steps) + ".\n")
    except ImportError:
        pass
    return "".join(md)


def floor_of(fl, level="-3"):
    if not fl:
        return None
    return fl.get("floor_bytes", {}).get(level)


def migration_rows(im, hood):
    """(tool label, link bytes, seconds, verified, extra) rows for one image and neighbourhood."""
    rows = []
    o = im.get("ours", {}).get(hood)
    if o and "link_bytes" in o:
        rep = o.get("report") or {}
        note = ""
        if rep.get("blocks_sent_as_delta"):
            note = "%d of %d blocks sent as deltas (%.2f MiB)" % (rep["blocks_sent_as_delta"], rep.get("blocks_sent", 0),
                                                                  rep.get("delta_bytes", 0) / MiB)
        rows.append(("ours (neighbours)", o["link_bytes"], o["seconds"], o.get("verified"), note))
    nd = im.get("ours_no_delta", {}).get(hood)
    if nd and "link_bytes" in nd:
        rows.append(("ours, every block whole (--no-delta)", nd["link_bytes"], nd["seconds"], nd.get("verified"), "stream alone"))
    e = im.get("ours", {}).get("empty")
    if e and "link_bytes" in e:
        rows.append(("ours (empty destination)", e["link_bytes"], e["seconds"], e.get("verified"), ""))
    fc = im.get("full_copy")
    if fc and "link_bytes" in fc:
        rows.append(("full copy (nbdcopy)", fc["link_bytes"], fc["seconds"], fc.get("verified"), ""))
    nb = im.get("hood_neighbours", {}).get(hood)
    rs = [r for r in im.get("rsync", []) if nb is None or r.get("basis") in nb]
    if rs:
        best = min(rs, key=lambda r: r["link_bytes"])
        rows.append(("rsync", best["link_bytes"], best["seconds"], best.get("verified"),
                     "basis %s (best of %d)" % (best["basis"], len(rs))))
    for c in im.get("casync", []):
        if c.get("hood") == hood and "link_bytes" in c:
            rows.append((c["tool"], c["link_bytes"], c["seconds"], c.get("verified"),
                         "make %.0f s + extract %.0f s" % (c["make_seconds"], c["extract_seconds"])))
    return rows


def mig_md(s, plots, verdict, targets):
    md = ["## 3. Migration over the emulated WAN (100 Mbit/s, tbf, both directions)\n\n",
          "Bytes over the link are the veth counters (both directions, every tool alike). The floor is the "
          "zstd-compressed size of the distinct non-zero 4 KiB blocks the destination lacks plus the fingerprint "
          "list (16 B per non-zero block), computed by bench/floor.py from the image files. "
          "'x floor' = bytes / floor (zstd -3); 'ours / tool' < 1 means we send less or finish sooner. "
          "Targets: bytes <= 1.05 x floor, time <= 1.1 x bytes/link rate + 2 s.\n\n"]
    hoods = s.get("hoods", {})
    plot_rows = []
    for image, im in s.get("images", {}).items():
        im["hood_neighbours"] = im.get("hoods", hoods)
        for hood, nb in list(im["hood_neighbours"].items()):
            rows = migration_rows(im, hood)
            if not rows:
                continue
            fl = im.get("floor", {}).get(hood)
            fle = im.get("floor", {}).get("empty")
            f3 = floor_of(fl)
            f19 = floor_of(fl, "-19 --long=27")
            ours = next((r for r in rows if r[0] == "ours (neighbours)"), None)
            o = im.get("ours", {}).get(hood)
            md.append("### %s, neighbourhood '%s' (destination holds %s)\n\n" % (image, hood, ", ".join(nb)))
            meas = im.get("measured")
            if meas:
                md.append("Measured %s at commit %s%s.\n\n" % (meas.get("at", "?"), meas.get("commit", "?"),
                                                               " (%s)" % meas["note"] if meas.get("note") else ""))
            if fl:
                md.append("Floor: %s MiB lacking (%d of %d non-zero blocks), zstd -3 %s MiB%s, fingerprint list "
                          "%s MiB; floor with an empty destination %s MiB.\n\n" % (
                              mib(fl["lacking_bytes"]), fl["lacking_blocks"], fl["nonzero_blocks"],
                              mib(fl["zstd_bytes"].get("-3")),
                              (", zstd -19 --long %s MiB" % mib(fl["zstd_bytes"]["-19 --long=27"]))
                              if "-19 --long=27" in fl["zstd_bytes"] else "",
                              mib(fl["fingerprint_list_bytes"]), mib(floor_of(fle))))
            trs = []
            for label, b, t, ver, extra in rows:
                fref = floor_of(fle) if label.startswith("ours (empty") else f3
                trs.append([label, mib(b), fnum(ratio(b, fref), "%.2f"), fnum(t, "%.1f"),
                            fnum(b * 8 / LINK_BPS, "%.1f"),
                            fnum(ratio(ours[1], b), "%.3f") if ours and label != ours[0] else "",
                            fnum(ratio(ours[2], t), "%.3f") if ours and label != ours[0] else "",
                            {True: "yes", False: "NO", None: "-"}[ver], extra])
                plot_rows.append((image, hood, label, b, t))
            trs.append(["floor (zstd -3 + fingerprints)", mib(f3), "1.00", "", fnum(f3 * 8 / LINK_BPS if f3 else None, "%.1f"),
                        "", "", "", ""])
            if f19:
                trs.append(["floor (zstd -19 --long + fingerprints)", mib(f19), fnum(ratio(f19, f3), "%.2f"), "",
                            fnum(f19 * 8 / LINK_BPS, "%.1f"), "", "", "", ""])
            md.append(table(["tool", "MiB over link", "x floor", "wall s", "bytes/rate s", "ours/tool bytes",
                             "ours/tool time", "content ok", "note"], trs))
            md.append("\n")
            if ours:
                b, t = ours[1], ours[2]
                app = ((o or {}).get("report") or {}).get("link", {}).get("total_bytes")
                ok_b = f3 is not None and b <= 1.05 * f3
                ok_t = t <= 1.1 * (b * 8 / LINK_BPS) + 2
                targets.append(("bytes on the wire <= 1.05 x floor: %s/%s" % (image, hood), "%.3f x" % ratio(b, f3) if f3 else "-", ok_b))
                if app and f3:
                    md.append("Ours by its own report: %s MiB of payload (fingerprints %s, data %s, control %s); the "
                              "wire adds TCP/IP/Ethernet framing, TLS records and ACKs (%.1f %%).\n\n" % (
                                  mib(app), mib(o["report"]["link"].get("fingerprint_bytes")),
                                  mib(o["report"]["link"].get("data_wire_bytes")), mib(o["report"]["link"].get("control_bytes")),
                                  100.0 * (b - app) / app))
                    targets.append(("payload bytes <= 1.05 x floor: %s/%s" % (image, hood), "%.3f x" % ratio(app, f3), app <= 1.05 * f3))
                targets.append(("time <= 1.1 x bytes/rate + 2 s: %s/%s" % (image, hood),
                                "%.2f s vs %.2f s" % (t, 1.1 * b * 8 / LINK_BPS + 2), ok_t))
                for label, pb, pt, _, _ in rows:
                    if label.startswith("ours"):
                        continue
                    verdict.append((label, "bytes over the link, %s/%s" % (image, hood), ratio(b, pb), False))
                    verdict.append((label, "migration time, %s/%s" % (image, hood), ratio(t, pt), False))
        if im.get("errors"):
            md.append("Errors for %s: %s\n\n" % (image, "; ".join("%s: %s" % (e["what"], e["error"][:300].replace("\n", " "))
                                                                 for e in im["errors"])))
    if s.get("versions"):
        md.append("Versions: %s. rsync negotiates its -z compression (zstd when both ends have it). Our migration "
                  "link runs %s.\n\n" % ("; ".join(v for v in s["versions"].values() if v),
                                          "mutual TLS, as in production" if s.get("migration_tls", True) else "plaintext"))
    if s.get("casync_missing"):
        md.append("casync: not measured (%s).\n\n" % s["casync_missing"])
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if plot_rows:
            groups = []
            for image, hood, *_ in plot_rows:
                if (image, hood) not in groups:
                    groups.append((image, hood))
            tools = []
            for _, _, label, _, _ in plot_rows:
                if label not in tools:
                    tools.append(label)
            for what, idx, fname, ylabel in (("bytes over the link", 3, "migration_bytes.png", "MiB"),
                                             ("migration wall time", 4, "migration_time.png", "seconds")):
                fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(groups)), 5))
                w = 0.8 / max(1, len(tools) + (1 if idx == 3 else 0))
                for ti, tool in enumerate(tools):
                    ys = []
                    for g in groups:
                        v = next((r[idx] for r in plot_rows if (r[0], r[1]) == g and r[2] == tool), None)
                        ys.append((v / MiB if idx == 3 else v) if v is not None else 0)
                    ax.bar([i + ti * w for i in range(len(groups))], ys, w, label=tool)
                if idx == 3:
                    ys = [(floor_of(s["images"][g[0]].get("floor", {}).get(g[1])) or 0) / MiB for g in groups]
                    ax.bar([i + len(tools) * w for i in range(len(groups))], ys, w, label="floor", color="black")
                ax.set_xticks([i + 0.4 - w / 2 for i in range(len(groups))])
                ax.set_xticklabels(["%s\n%s" % g for g in groups], fontsize=8)
                ax.set_ylabel(ylabel)
                ax.set_yscale("log")
                ax.set_title("%s per tool (100 Mbit/s)" % what)
                ax.legend(fontsize=7)
                ax.grid(True, axis="y", alpha=.3)
                fig.tight_layout()
                fig.savefig(os.path.join(plots, fname), dpi=110)
                plt.close(fig)
            md.append("![bytes over the link](plots/migration_bytes.png)\n\n![migration time](plots/migration_time.png)\n")
    except ImportError:
        pass
    return "".join(md)


def downtime_md(sections, plots, targets):
    rows = []
    for r in (sections.get("downtime") or {}).get("rows", []):
        rows.append(dict(r, _from="downtime"))
    mig = sections.get("migration") or {}
    for image, im in mig.get("images", {}).items():
        for hood, o in (im.get("ours") or {}).items():
            if o and "downtime_ms" in o:
                rows.append(dict(o, _from="migration"))
    if not rows:
        return ""
    md = ["## 4. Downtime (switch-over pause reported by `migrate`)\n\n",
          "Targets: <= 50 ms idle, <= 200 ms under 4 KiB random writes (fio on the migrating disk at the source). "
          "Under load a guest (scripts/guest-writer.py, a 4 KiB write every 2 ms) also writes and follows its disk to the "
          "destination. 'guest's switch pause' is the gap a client sees across the switch-over: from its last write "
          "acknowledged at the source to its first at the destination (it includes noticing the switch and "
          "reconnecting). 'longest pause' is its longest gap between two acknowledged writes anywhere in the run "
          "(under load, a write can also stall at the source while the migration competes with fio for 2 cores).\n\n"]
    trs = []
    for r in rows:
        if "error" in r:
            trs.append([r.get("image"), r.get("hood", "-"), "yes" if r.get("load") else "no", "error", "", "", "", "", r["_from"],
                        r["error"][:200]])
            continue
        d = r.get("downtime_ms")
        lim = 200 if r.get("load") else 50
        lf = r.get("load_fio") or {}
        note = ""
        if r.get("load"):
            note = "fio %s IOPS target, %.0f achieved, errors %s" % (lf.get("rate_iops") or "unthrottled",
                                                                     lf.get("achieved_iops") or 0, lf.get("total_err"))
        gw = r.get("guest_writer") or {}
        trs.append([r["image"], r.get("hood"), "yes" if r.get("load") else "no", fnum(d, "%.1f"),
                    fnum((gw.get("switch_trace") or {}).get("first_dest_write_ms"), "%.0f"),
                    fnum(gw.get("longest_pause_ms"), "%.0f"),
                    fnum((r.get("report") or {}).get("switch_seconds"), "%.1f"),
                    "yes" if d is not None and d <= lim else "NO", r["_from"], note])
        if d is not None:
            targets.append(("downtime <= %d ms (%s, %s, %s)" % (lim, r["image"], r.get("hood"), "load" if r.get("load") else "idle"),
                            "%.1f ms" % d, d <= lim))
    md.append(table(["image", "neighbourhood", "under load", "downtime ms", "guest's switch pause ms", "guest's longest pause ms", "switch at s",
                     "target met", "section", "note"], trs))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        pts = [r for r in rows if r.get("downtime_ms") is not None]
        if pts:
            fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(pts)), 4.5))
            ax.bar(range(len(pts)), [r["downtime_ms"] for r in pts],
                   color=["tab:red" if r.get("load") else "tab:blue" for r in pts])
            ax.set_xticks(range(len(pts)))
            ax.set_xticklabels(["%s\n%s%s" % (r["image"], r.get("hood"), "\n+fio" if r.get("load") else "") for r in pts], fontsize=7)
            ax.axhline(50, color="tab:blue", linestyle="--", label="idle target 50 ms")
            ax.axhline(200, color="tab:red", linestyle="--", label="under-load target 200 ms")
            ax.set_ylabel("downtime (ms)")
            ax.set_title("Switch-over downtime (blue idle, red under fio random writes)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(plots, "downtime.png"), dpi=110)
            plt.close(fig)
            md.append("\n![downtime](plots/downtime.png)\n")
    except ImportError:
        pass
    return "".join(md)


NBD_METRICS = [("seq_read_MBps", "sequential read MB/s (nbdcopy to null:, warm)"),
               ("seq_write_MBps", "sequential write MB/s (qemu-img convert -n)"),
               ("randread_qd1_iops", "4 KiB random read IOPS, QD1 (fio nbd)"),
               ("randread_qd32_iops", "4 KiB random read IOPS, QD32"),
               ("randwrite_qd1_iops", "4 KiB random write IOPS, QD1"),
               ("randwrite_qd32_iops", "4 KiB random write IOPS, QD32")]


def nbd_md(s, plots, verdict):
    res = s["results"]
    sets = s.get("data_sets") or [None]
    md = ["## 5. NBD data path (same content, loopback TCP and Unix socket)\n\n",
          "Content: %s MiB of %s's non-zero blocks (*unique*) and a data set of the same size made of its first "
          "eighth repeated (*dup*); fio runs %d s per test, writing refilled random buffers (unique) or 80%% "
          "repeated ones (dup), each write job with a seed of its own (with one seed for all, the QD32 job would "
          "write again what the QD1 job had just written). The three servers run side by side and take turns row by row (the first of each row rotating; "
          "before each turn, the servers' CPU use falls under 5 %% of a core, and before each write turn `sync`), so that a row's ratios compare figures "
          "taken within a minute or two of each other on this shared host. Sequential reads: the median of five passes after one that warms the page cache, "
          "the servers alternating pass by pass. "
          "Sequential writes: the median of three copies of each set into an empty export, the servers alternating copy by copy (emptied before each: "
          "ours by a whole-disk TRIM and a compaction pass that deletes the containers left holding only garbage, "
          "the peers' raw files deallocated; then `sync`, so no pass inherits another's dirty pages), each copy with 16 bytes of every block "
          "changed in another way, so that every copy writes blocks no server holds yet (ours included). Ours serves them from a store; qemu-nbd (--cache=writeback --aio=threads) and "
          "nbdkit's file plugin serve raw files. Ratios > 1 mean ours is faster.\n\n"
          % (mib(s["content_bytes"]), s["content_image"], s["fio_runtime_s"])]
    transports = [("", "TCP"), ("-unix", "Unix socket")] if "ours-unix" in res else [("", "TCP")]
    rows = []
    plot = {}
    for suffix, tname in transports:
        peers = [p for p in ("qemu-nbd", "nbdkit-file") if p + suffix in res]
        for dset in sets:
            for k, label in NBD_METRICS:
                key = "%s_%s" % (dset, k) if dset else k
                o = res.get("ours" + suffix, {}).get(key)
                row = ["%s, %s, %s" % (label, dset or "content", tname), fnum(o, "%.0f")]
                row += [fnum(res[p + suffix].get(key), "%.0f") for p in ("qemu-nbd", "nbdkit-file") if p in peers]
                for p in peers:
                    r = ratio(o, res[p + suffix].get(key))
                    row.append(fnum(r, "%.2f"))
                    verdict.append((p, "NBD %s (%s, %s)" % (label.split(" (")[0], dset or "content", tname), r, True))
                    plot.setdefault(p, []).append(r or 0)
                rows.append(row)
    md.append(table(["metric", "ours", "qemu-nbd", "nbdkit-file", "ours/qemu-nbd", "ours/nbdkit-file"], rows))
    if s.get("imports"):
        md.append("\nImport into the store (`cas import`): %s.\n" % "; ".join(
            "%s %.0f MB/s" % (k, s["content_bytes"] / v["seconds"] / 1e6) for k, v in s["imports"].items() if v.get("seconds")))
    if s.get("versions"):
        md.append("\nVersions: %s.\n" % "; ".join(s["versions"].values()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(12, 4.5))
        w = 0.8 / max(1, len(plot))
        for si, (p, ys) in enumerate(plot.items()):
            ax.bar([i + si * w for i in range(len(ys))], ys, w, label="ours / " + p)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([str(i + 1) for i in range(len(rows))], fontsize=7)
        ax.set_xlabel("row of the table above")
        ax.axhline(1, color="grey", linestyle="--")
        ax.set_ylabel("ours / peer")
        ax.set_title("NBD data path, ours relative to each peer (higher is better)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(plots, "nbd.png"), dpi=110)
        plt.close(fig)
        md.append("\n![nbd data path](plots/nbd.png)\n")
    except ImportError:
        pass
    return "".join(md)


def store_md(s):
    md = ["## 6. Store micro-benchmark (`%s`)\n\n" % s.get("command", "cargo bench -p cas-store --bench store")]
    rows = []
    for name, v in s.get("benchmarks", {}).items():
        if "bytes_per_second" in v:
            fig = "%.0f MB/s" % (v["bytes_per_second"] / 1e6)
        elif "per_second" in v:
            fig = "%.3g lookups/s" % v["per_second"] if "lookup" in name or "has_many" in name else "%.3g /s" % v["per_second"]
        else:
            fig = "-"
        rows.append([name, fig, fnum(v.get("time_s", 0) * 1e6, "%.1f")])
    md.append(table(["benchmark", "throughput", "time per iteration (us)"], rows))
    return "".join(md)


def memory_md(s, targets):
    """Section "memory" (bench/memory.py): RSS over a large disk, index size, compaction."""
    total = s["bytes_written"]
    md = ["## 6b. Memory and compaction over a large store (`bench/memory.py`)\n\n",
          "One nbd-server on a fresh store; two disks written at once through NBD with unique data (fio, "
          "refilled buffers, 1 MiB sequential writes): *big* %s MiB, *keep* %s MiB; then both read back in full "
          "(1 MiB sequential reads). Then 4 KiB random reads of *keep* (fio, QD8) without compaction, *big* "
          "deleted, and one compaction pass (`cas gc --server`) while the same fio job runs.\n\n"
          % (mib(s["disks"]["big"]), mib(s["disks"]["keep"]))]
    rss = s.get("rss_hwm_bytes") or 0
    rows = [["unique data written", "%s MiB in %.0f s (%.0f MB/s)" % (mib(total), s["write_seconds"], total / s["write_seconds"] / 1e6)],
            ["read back", "%.0f s (%.0f MB/s)" % (s["read_seconds"], total / s["read_seconds"] / 1e6)],
            ["server RSS after the writes / after the reads", "%s / %s MiB" % (mib(s["rss_after_write_bytes"]), mib(s["rss_after_read_bytes"]))],
            ["server peak RSS (VmHWM)", "%s MiB" % mib(rss)],
            ["index bytes per stored block (RocksDB files and memtables / unique blocks)", fnum(s.get("index_bytes_per_block"), "%.1f")]]
    gc = s.get("gc", {})
    rep = gc.get("report", {})
    share = s.get("given_back_share")
    rows += [["deleted with *big*", "%s MiB" % mib(s["deleted_bytes"])],
             ["compaction pass", "%.1f s: %s containers rewritten, %s deleted, %s blocks moved" % (
                 gc.get("seconds", 0), rep.get("containers_rewritten"), rep.get("containers_deleted"), rep.get("blocks_moved"))],
             ["space given back / deleted", "%s MiB / %s MiB = %s" % (mib(s["given_back_bytes"]), mib(s["deleted_bytes"]), fnum(share, "%.2f"))],
             ["fio 4 KiB random-read IOPS of *keep*: quiet / during the pass",
              "%.0f / %s (%s log intervals of 500 ms inside the pass)" % (
                  s["fio_quiet_iops"], fnum(s.get("fio_during_gc_iops"), "%.0f"), s.get("fio_during_gc_intervals"))]]
    md.append(table(["figure", "value"], rows))
    if s.get("scale") == "full" or total >= 20 * 1024 ** 3:
        targets.append(("server RSS under 512 MiB after importing %s MiB and reading it back" % mib(total), "%s MiB" % mib(rss), rss < 512 * 1024 ** 2))
    targets.append(("one compaction pass gives back >= 75% of what the deleted disk held", fnum(share, "%.2f"), bool(share and share >= 0.75)))
    return "".join(md)


def rados_md(s, plots):
    md = ["## 7. RADOS beside RocksDB (`nbd-server --blocks rados:POOL` and the default `--blocks rocksdb`, same run)\n\n"]
    if s.get("skipped"):
        md.append("Not measured: %s.\n" % s["skipped"])
        return "".join(md)
    ceph = s.get("ceph", {})
    dense = s.get("dense", {})
    dense_b = dense.get("bytes") or 0
    md.append(
        "Two stores, one keeping its blocks in RocksDB, one in a RADOS pool (pool `%s`, namespace `%s`, fresh for "
        "the run) of a one-node Ceph cluster on memstore (`scripts/ceph-cluster.sh`, started for this section inside "
        "the WAN's destination namespace, where the servers that use it run, and stopped after it; %s). The same "
        "steps on each, one backend after the other:\n\n"
        "1. import through a running server (`cas import --server`: qemu-img writes through the NBD export): the "
        "neighbourhood '%s' (%s), then a dense disk of %s MiB (%s's non-zero blocks packed, so every block is "
        "already stored);\n"
        "2. 4 KiB random reads of the dense disk, fio `--ioengine=nbd` on loopback TCP, %d s per run: *cold* is the "
        "first run on a freshly started server (its 64 MiB hot-block cache and RocksDB's block cache empty; the page "
        "cache and the OSD's memstore hold the blocks in RAM either way), *warm* the same run again on that server "
        "(the cache can hold %s of the disk);\n"
        "3. the dense disk deleted, then the same migration over the emulated WAN (100 Mbit/s, %s) from a RocksDB "
        "source into each store, its content checked (sha256).\n\n"
        "'RADOS / RocksDB': below 1 means RADOS is slower for rates (MiB/s, IOPS); above 1 means it takes longer "
        "or sends more for times and bytes.\n\n" % (
            ceph.get("pool", "?"), ceph.get("namespace", "?"),
            "; ".join(v for v in (s.get("versions") or {}).values() if v) or "Ceph",
            s.get("hood"), ", ".join(s.get("neighbours", [])), mib(dense_b), dense.get("from", "?"),
            s.get("fio_runtime_s", 0), "%.0f %%" % min(100, 100.0 * 64 * MiB / dense_b) if dense_b else "-",
            "mutual TLS" if s.get("migration_tls", True) else "plaintext"))
    be = s.get("backends", {})
    ro, ra = be.get("rocksdb", {}), be.get("rados", {})
    rows, plot = [], []

    def add(label, a, b, fmt="%.1f", plot_it=True):
        r = ratio(b, a)
        rows.append([label, fnum(a, fmt), fnum(b, fmt), fnum(r, "%.2f")])
        if plot_it and r:
            plot.append((label, r))

    def rate(x, key):
        v, t = x.get(key), x.get("seconds")
        return v / MiB / t if v is not None and t else None

    imp_a = {x["image"]: x for x in ro.get("imports", [])}
    imp_b = {x["image"]: x for x in ra.get("imports", [])}
    names = list(imp_a) + [n for n in imp_b if n not in imp_a]
    for n in names:
        a, b = imp_a.get(n, {}), imp_b.get(n, {})
        any_ = a or b
        if n == "dense":
            add("import dense disk (%s MiB, all stored already), MiB/s" % mib(any_.get("nonzero_bytes")),
                rate(a, "nonzero_bytes"), rate(b, "nonzero_bytes"))
            continue
        add("import %s, MiB/s of image size (%s MiB)" % (n, mib(any_.get("image_bytes"))),
            rate(a, "image_bytes"), rate(b, "image_bytes"))
        add("import %s, MiB/s of non-zero data (%s MiB, %s MiB new)" % (n, mib(any_.get("nonzero_bytes")),
                                                                       mib(any_.get("new_stored_bytes"))),
            rate(a, "nonzero_bytes"), rate(b, "nonzero_bytes"))
    tot = {}
    for k, imp in (("a", imp_a), ("b", imp_b)):
        xs = [x for n, x in imp.items() if n != "dense"]
        sec = sum(x["seconds"] for x in xs)
        tot[k] = (sum(x.get("nonzero_bytes") or 0 for x in xs) / MiB / sec if xs and sec else None, sec if xs else None)
    if len(names) > 2:
        add("import, the whole neighbourhood, MiB/s of non-zero data", tot["a"][0], tot["b"][0])
    add("import, the whole neighbourhood, seconds", tot["a"][1], tot["b"][1], plot_it=False)
    for qd in (1, 32):
        for temp in ("cold", "warm"):
            g = lambda x: ((x.get("randread") or {}).get("qd%d" % qd) or {}).get(temp, {}).get("iops")
            add("4 KiB random read IOPS, QD%d, %s" % (qd, temp), g(ro), g(ra), "%.0f")
    migs = list(ro.get("migrations", {})) + [m for m in ra.get("migrations", {}) if m not in ro.get("migrations", {})]
    for m in migs:
        a, b = ro.get("migrations", {}).get(m, {}), ra.get("migrations", {}).get(m, {})
        add("migration %s: MiB over the link" % m, a.get("link_bytes") and a["link_bytes"] / MiB,
            b.get("link_bytes") and b["link_bytes"] / MiB)
        add("migration %s: wall time, s" % m, a.get("seconds"), b.get("seconds"))
        add("migration %s: downtime, ms" % m, a.get("downtime_ms"), b.get("downtime_ms"), plot_it=False)
        dst = lambda x, k: ((x.get("report") or {}).get("destination") or {}).get(k)
        add("migration %s: blocks mapped from neighbours" % m, dst(a, "neighbour_hits"), dst(b, "neighbour_hits"), "%.0f",
            plot_it=False)
        add("migration %s: blocks sent" % m, dst(a, "received_before_switch"), dst(b, "received_before_switch"), "%.0f",
            plot_it=False)
        ok = {True: "yes", False: "NO", None: "-"}
        rows.append(["migration %s: content ok (sha256)" % m, ok[a.get("verified")], ok[b.get("verified")], ""])
    md.append(table(["figure", "RocksDB", "RADOS", "RADOS / RocksDB"], rows))
    if s.get("interrupted"):
        md.append("\nThe run was interrupted (%s): figures missing above were not measured.\n" % s["interrupted"])
    if s.get("errors"):
        md.append("\nErrors: %s\n" % "; ".join("%s: %s" % (e["what"], e["error"][:300].replace("\n", " "))
                                             for e in s["errors"]))
    if s.get("seconds") is not None:
        md.append("\nThe section took %.0f s (the cluster started in %s s; the OSD's RSS at the end: %s MiB; load "
                  "average at the end: %s).\n" % (s["seconds"], ceph.get("start_seconds", "?"),
                                                  mib(ceph.get("osd_rss_bytes")), " ".join(s.get("loadavg", [])) or "?"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        if plot:
            fig, ax = plt.subplots(figsize=(10, 0.35 * len(plot) + 1.8))
            ys = list(range(len(plot)))[::-1]
            rates = ["MiB/s" in l or "IOPS" in l for l, _ in plot]
            # bars from 1 (no difference) to the ratio, on a log scale
            ax.barh(ys, [r - 1 for _, r in plot], left=1, color=["tab:blue" if x else "tab:orange" for x in rates])
            ax.set_yticks(ys)
            ax.set_yticklabels([l for l, _ in plot], fontsize=7)
            ax.axvline(1, color="grey", linestyle="--")
            ax.set_xscale("log")
            lo = min(min(r for _, r in plot), 1) / 1.3
            hi = max(max(r for _, r in plot), 1) * 1.3
            ax.set_xlim(lo, hi)
            ticks = [t for t in (0.1, 0.25, 0.5, 1, 2, 4, 10, 20) if lo <= t <= hi]
            ax.set_xticks(ticks)
            ax.set_xticklabels(["%g" % t for t in ticks])
            ax.minorticks_off()
            ax.set_xlabel("RADOS / RocksDB")
            from matplotlib.patches import Patch
            ax.legend(handles=[Patch(color="tab:blue", label="rate (higher is better)"),
                               Patch(color="tab:orange", label="time or bytes (lower is better)")], fontsize=7, loc="upper right")
            ax.set_title("RADOS beside RocksDB, same run")
            ax.grid(True, axis="x", alpha=.3)
            fig.tight_layout()
            fig.savefig(os.path.join(plots, "rados.png"), dpi=110)
            plt.close(fig)
            md.append("\n![rados beside rocksdb](plots/rados.png)\n")
    except ImportError:
        pass
    return "".join(md)


def verdict_md(verdict, targets):
    md = ["## Where we stand\n\n"]
    if targets:
        md.append(table(["target", "measured", "met"], [[t, m, "yes" if ok else "NO"] for t, m, ok in targets]))
        md.append("\n")
    by_peer = {}
    for peer, what, r, higher_better in verdict:
        if r is None:
            continue
        by_peer.setdefault(peer, []).append((what, r, (r > 1) if higher_better else (r < 1)))
    for peer, items in by_peer.items():
        win = [w for w in items if w[2]]
        lose = [w for w in items if not w[2]]
        md.append("- **vs %s**: " % peer)
        parts = []
        if win:
            parts.append("ahead on " + ", ".join("%s (%.2f)" % (w, r) for w, r, _ in win))
        if lose:
            parts.append("not yet on " + ", ".join("%s (%.2f)" % (w, r) for w, r, _ in lose))
        md.append("; ".join(parts) + ".\n")
    md.append("\n(Figures in brackets are ours/theirs: bytes or seconds for migrations (below 1 is better for us), "
              "throughput or IOPS for the NBD rows (above 1 is better for us).)\n")
    return "".join(md)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--started")
    ap.add_argument("--cmdline", default="")
    ap.add_argument("--mode", default="full")
    ap.add_argument("--scale", default="")
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    sections = {}
    for f in sorted(glob.glob(os.path.join(args.out, "sections", "*.json"))):
        with open(f) as fh:
            sections[os.path.basename(f)[:-5]] = json.load(fh)
    plots = os.path.join(args.out, "plots")
    os.makedirs(plots, exist_ok=True)
    mach = machine()
    verdict, targets = [], []
    now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    md = ["# Benchmark results (%s run)\n\n" % args.mode,
          "Generated by `bench.sh` (bench/report.py) on %s. Last command: `%s`. " % (now, args.cmdline or "bench.sh"),
          "Machine: %s cores (%s), %s GiB memory, Linux %s; load average when the report was written: %s. "
          "Commit %s%s.\n\n" % (mach.get("nproc"), mach.get("cpu", "?"), mach.get("memory_gib"), mach.get("kernel"),
                                " ".join(mach.get("loadavg_at_report", [])), mach.get("git_commit", "?"),
                                " (with uncommitted changes)" if mach.get("git_dirty") else ""),
          "Sections and when they ran: %s.\n\n" % ", ".join(
              "%s (%s, %s images, %s)" % (k, v.get("mode"), v.get("scale"), v.get("finished_at"))
              for k, v in sorted(sections.items(), key=lambda kv: SECTION_ORDER.index(kv[0]) if kv[0] in SECTION_ORDER else 99))]
    body = []
    for name in SECTION_ORDER:
        s = sections.get(name)
        if not s:
            continue
        if "error" in s and len(s) <= 6:
            body.append("## %s\n\nFAILED: %s\n" % (name, s["error"][-1500:]))
            continue
        try:
            if name == "similarity":
                body.append(sim_md(s, plots, verdict))
            elif name == "indexing":
                body.append(idx_md(s, plots))
            elif name == "migration":
                body.append(mig_md(s, plots, verdict, targets))
            elif name == "downtime":
                pass
            elif name == "gang":
                import gang
                body.append(gang.gang_md(s, plots, targets, table))
            elif name == "nbd":
                body.append(nbd_md(s, plots, verdict))
            elif name == "store":
                body.append(store_md(s))
            elif name == "memory":
                body.append(memory_md(s, targets))
            elif name == "rados":
                body.append(rados_md(s, plots))
        except Exception as e:  # a malformed section must not hide the others
            body.append("## %s\n\n(report error: %r)\n" % (name, e))
    dt = downtime_md(sections, plots, targets)
    if dt:
        # keep the section order: downtime after migration
        idx = next((i for i, b in enumerate(body) if b.startswith("## 5.") or b.startswith("## 6.")), len(body))
        body.insert(idx, dt)
    text = "".join(md) + "\n".join(body) + "\n" + verdict_md(verdict, targets)
    with open(os.path.join(args.out, "RESULTS.md"), "w") as f:
        f.write(text)
    combined = {"generated_at": now, "command": args.cmdline, "mode": args.mode, "scale": args.scale,
                "machine": mach, "sections": sections,
                "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(combined, f, indent=1)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
