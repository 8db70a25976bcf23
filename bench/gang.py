"""The "gang" section: several VMs of one stack migrated together (`migrate --disk A --disk B
...`) over the emulated 100 Mbit/s WAN, against the floor of their union (each distinct
content the destination lacks once, zstd -3, plus 16 B per non-zero block of every disk) and
against the same disks migrated one by one.

bench.py runs `section_gang(ctx, bench_module)`; report.py renders `gang_md`.
"""

import json
import os
import time

MB = 1e6


def _floor(ctx, b, images, neighbours):
    cmd = ["/usr/bin/python3", os.path.join(b.HERE, "floor.py"), "--levels", "3"]
    for im in images:
        cmd += ["--migrated", ctx.image(im)]
    for n in neighbours:
        cmd += ["--neighbour", ctx.image(n)]
    r, _ = ctx.sh(cmd)
    return json.loads(r.stdout.decode())


def _gang_run(ctx, b, images, hood, neighbours):
    """One gang migration of `images` into a copy of the `neighbours` store; a result row."""
    ctx.wan_up()
    src_pristine = b.pristine_store(ctx, "src-gang-" + "-".join(images), images)
    dst_pristine = b.pristine_store(ctx, "dst-" + ("-".join(neighbours) if neighbours else "empty"), neighbours)
    src = b.copy_store(ctx, src_pristine, os.path.join(ctx.run, "gang-src"))
    dst = b.copy_store(ctx, dst_pristine, os.path.join(ctx.run, "gang-dst"))
    s_ctl, d_ctl, s_nbd, d_nbd, ssrv, dsrv = b.start_pair(ctx, src, dst, "gang-" + hood)
    row = {"images": images, "hood": hood, "neighbours": neighbours}
    try:
        b.wait_ready(ctx, dsrv, "destination nbd-server")
        b.wait_ready(ctx, ssrv, "source nbd-server")
        b0 = ctx.link_bytes()
        cpu0 = [b.cpu_seconds(p.pid) for p in (ssrv, dsrv)]
        cmd = [ctx.exe("migrate"), "--source", s_ctl, "--dest", d_ctl, "--json"]
        for im in images:
            cmd += ["--disk", im]
        r, dt = ctx.sh(cmd, timeout=7200)
        b1 = ctx.link_bytes()
        cpu1 = [b.cpu_seconds(p.pid) for p in (ssrv, dsrv)]
        # Both servers share this machine's cores: what each used says which one the time went to.
        row["cpu_seconds"] = {side: round(c1 - c0, 2) for side, c0, c1 in zip(("source", "destination"), cpu0, cpu1)
                              if c0 is not None and c1 is not None}
        rep = json.loads(r.stdout.decode())
        row.update({"link_bytes": b1 - b0, "seconds": round(dt, 3), "report": rep,
                    "downtime_ms": {d["disk"]: d.get("downtime_ms") for d in rep["disks"]}})
        if not ctx.args.no_verify:
            row["verified"] = all(ctx.sha_nbd("nbd+unix:///%s?socket=%s" % (im, d_nbd)) == ctx.image_sha(im)
                                  for im in images)
    finally:
        ctx.stop(ssrv)
        ctx.stop(dsrv)
    return row


def section_gang(ctx, b):
    cfg = ctx.cfg
    images = cfg["gang_images"]
    hood = cfg.get("gang_hood", "paper")
    neighbours = cfg["hoods"][hood]
    res = {"link_rate_bps": b.LINK_RATE_BPS, "images": images, "hood": hood, "neighbours": neighbours,
           "measured": {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": b.git_commit()},
           "errors": []}

    def attempt(what, fn):
        try:
            return fn()
        except Exception as e:
            ctx.log("gang %s FAILED: %s" % (what, e))
            res["errors"].append({"what": what, "error": str(e)[-2000:]})
            return None

    old = {}
    if os.environ.get("BENCH_GANG_SINGLES", "1") == "0":
        # re-run the gang alone: the single migrations keep their last figures (and say when)
        try:
            with open(os.path.join(ctx.out, "sections", "gang.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
    res["floor_union"] = attempt("floor of the union", lambda: _floor(ctx, b, images, neighbours))
    res["floor_each"] = {im: attempt("floor " + im, lambda im=im: _floor(ctx, b, [im], neighbours)) for im in images}
    res["gang"] = attempt("gang", lambda: _gang_run(ctx, b, images, hood, neighbours))
    b.write_section(ctx, "gang", res)
    if old.get("singles") and old.get("images") == images:
        res["singles"] = old["singles"]
        res["singles_measured"] = old.get("singles_measured", old.get("measured"))
    else:
        res["singles"] = {im: attempt("single " + im, lambda im=im: b.ours_migration(ctx, im, hood, neighbours))
                          for im in images}
        res["singles_measured"] = res["measured"]
    b.write_section(ctx, "gang", res)
    ctx.wan_down()


def _floor3(fl):
    return (fl or {}).get("floor_bytes", {}).get("-3")


def gang_md(s, plots, targets, table):
    """The section's markdown; `table(head, rows)` is report.py's table renderer."""
    g = s.get("gang") or {}
    if not g:
        return "## Gang migration\n\nNo gang run: %s\n" % s.get("errors")
    images = s["images"]
    union = _floor3(s.get("floor_union"))
    singles = s.get("singles") or {}
    single_bytes = sum((singles.get(im) or {}).get("link_bytes") or 0 for im in images)
    single_secs = sum((singles.get(im) or {}).get("seconds") or 0 for im in images)
    sum_floors = sum(_floor3(s["floor_each"].get(im)) or 0 for im in images)
    lb, secs = g.get("link_bytes"), g.get("seconds")
    rate = s.get("link_rate_bps", 100e6) / 8
    md = ["## Gang migration (%d VMs of one stack into the %s neighbourhood, %s)\n\n" % (
        len(images), s["hood"], ", ".join(images)),
        "One `migrate --disk ... --disk ...` over the 100 Mbit/s link (mutual TLS), bytes counted on the veth in both "
        "directions, against the floor of the union (each distinct content the destination lacks once, zstd -3, plus "
        "16 B per non-zero block of every disk) and the same disks migrated one by one (section 3's set-up, each from a "
        "source that holds that disk only).\n\n"]
    rows = [["gang", "%.1f" % (lb / MB), "%.1f" % (union / MB) if union else "-",
             "%.3f" % (lb / union) if union else "-", "%.1f" % secs,
             "%.1f" % (1.1 * lb / rate + 2), "yes" if g.get("verified") else str(g.get("verified"))]]
    if single_bytes:
        rows.append(["one by one (sum)", "%.1f" % (single_bytes / MB), "%.1f" % (sum_floors / MB),
                     "%.3f" % (single_bytes / union) if union else "-", "%.1f" % single_secs, "-",
                     "yes" if all((singles.get(im) or {}).get("verified") for im in images) else "no"])
    md.append(table(["run", "link MB", "floor MB", "link / union floor", "seconds", "time bound s (1.1 x bytes/rate + 2)",
                       "byte-exact"], rows))
    if single_bytes:
        md.append("\nThe gang sent %.3f of what the disks sent one by one.\n" % (lb / single_bytes))
    rep = g.get("report") or {}
    drows = []
    for d in rep.get("disks", []):
        dest = d.get("destination") or {}
        drows.append([d["disk"], d["phase"], "%.1f" % (d.get("downtime_ms") or 0),
                      "%.1f" % ((d.get("link") or {}).get("total_bytes", 0) / MB), d.get("blocks_sent"),
                      dest.get("gang_shared"), dest.get("neighbour_hits"), dest.get("duplicates")])
    if drows:
        md.append("\nPer disk:\n\n")
        md.append(table(["disk", "phase", "downtime ms", "link MB", "blocks sent", "from the gang", "from neighbours",
                           "duplicates"], drows))
    if union:
        targets.append(("gang bytes <= 1.05x the floor of the union", "%.3f" % (lb / union), lb <= 1.05 * union))
        targets.append(("gang time <= 1.1 x bytes/rate + 2 s", "%.1f s against %.1f s" % (secs, 1.1 * lb / rate + 2),
                        secs <= 1.1 * lb / rate + 2))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        bars = [("floor of the union", union or 0), ("gang", lb or 0), ("sum of single floors", sum_floors),
                ("one by one", single_bytes)]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.bar(range(len(bars)), [v / MB for _, v in bars], color=["tab:gray", "tab:green", "tab:gray", "tab:orange"])
        ax.set_xticks(range(len(bars)))
        ax.set_xticklabels([n for n, _ in bars], fontsize=8)
        ax.set_ylabel("MB over the WAN")
        ax.set_title("Gang of %d VMs: bytes over the link" % len(images))
        fig.tight_layout()
        fig.savefig(os.path.join(plots, "gang.png"), dpi=110)
        plt.close(fig)
        md.append("\n![gang](plots/gang.png)\n")
    except ImportError:
        pass
    return "".join(md)

