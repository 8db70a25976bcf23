#!/usr/bin/env python3
"""A few days of a server's life, applied to the tree of an image built by gen_data.py.

build.sh makes an "older version" pair from it: the parent image is the VM as it was, the
image built from the parent's files after this script (and `apt-get upgrade`) is the same VM
some days later. That pair is where delta against similar blocks matters: the neighbourhood
holds the older version, the newer one is migrated.

What a day does, deterministically from --seed:
  * web: nginx's logs rotate as logrotate does (14 kept, all but the newest two gzip'ed) and
    a day of requests is logged; a few posts are written (Markdown + rendered page); a few
    old posts are edited (a sentence replaced, a paragraph added, page re-rendered); an
    upload or two; the sitemap lists the new posts;
  * db: new customers, orders with their items and events are inserted, orders move on in
    their life cycle (new -> paid -> shipped), stock changes, the oldest events expire, and
    the nightly VACUUM ANALYZE runs (SQL for `postgres --single`, one statement per line).

Usage: activity.py KIND --root DIR --seed N --scale F --days D
On stdout: post-processing actions for build.sh, as gen_data.py prints them.
"""

import argparse
import datetime
import glob
import os
import random
import re
import sys

import gen_data as g


# Copies of two small pieces of gen_data.py: changing that file would change the recipe of
# every image (its hash is part of each recipe) and rebuild them all.
def page_frame(site):
    """The header (with %s for the title) and footer of gen_data.gen_site_content's pages."""
    header = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
              "<link rel=\"stylesheet\" href=\"/assets/css/app.css\">\n<title>%s</title>\n</head>\n<body>\n"
              "<header class=\"site-header\"><a href=\"/\">" + site.replace("-", " ").title() + "</a></header>\n<main>\n")
    footer = "</main>\n<footer>&copy; 2024 %s</footer>\n<script src=\"/assets/js/app.js\"></script>\n</body>\n</html>\n" % site
    return header, footer


def db_sizes(scale):
    """gen_data.gen_db's row counts: customers, products, orders, events."""
    return (max(200, int(20000 * scale)), max(50, int(3000 * scale)),
            max(500, int(70000 * scale)), max(500, int(110000 * scale)))


def posts_of(docroot):
    return sorted(glob.glob(os.path.join(docroot, "content/posts/*/*/*.md")))


def page_of(docroot, md_path):
    rel = os.path.relpath(md_path, os.path.join(docroot, "content/posts"))[:-3]
    return os.path.join(docroot, "public/cache", rel, "index.html")


def edit_post(rng, text, docroot, md_path):
    """Replace one sentence of the post and add a paragraph, in the Markdown and the page."""
    html_path = page_of(docroot, md_path)
    md = open(md_path, encoding="utf-8").read()
    html = open(html_path, encoding="utf-8").read()
    sentences = re.findall(r"[A-Z][^.?!<>\n]{20,}[.?!]", md.split("---", 2)[-1])
    if sentences:
        old = rng.choice(sentences)
        new = text.sentence()
        md = md.replace(old, new, 1)
        html = html.replace(old, new, 1)
    para = text.paragraph()
    md = md.rstrip("\n") + "\n\n" + para + "\n"
    html = html.replace("\n</article>", "\n<p>%s</p>\n</article>" % para, 1)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(md)
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(html)


def new_post(w, rng, text, docroot, site, when):
    """A post as gen_data.gen_site_content writes them; returns its URL."""
    header, footer = page_frame(site)
    title, slug = text.title(), text.slug()
    md = "---\ntitle: \"%s\"\ndate: %s\nauthor: %s %s\ntags: [%s]\n---\n\n" % (
        title, when.isoformat(), rng.choice(g.FIRST_NAMES), rng.choice(g.LAST_NAMES),
        ", ".join(text.words(rng.randint(1, 4))))
    body = []
    for _ in range(rng.randint(2, 14)):
        p = text.paragraph()
        md += p + "\n\n"
        body.append("<p>%s</p>" % p)
    rel = "%04d/%02d/%s" % (when.year, when.month, slug)
    w.write("%s/content/posts/%s.md" % (docroot, rel), md)
    w.write("%s/public/cache/%s/index.html" % (docroot, rel),
            header % title + "<article>\n<h1>%s</h1>\n<time>%s</time>\n%s\n</article>\n" % (
                title, when.date(), "\n".join(body)) + footer)
    return "/" + rel + "/"


def rotate_logs(w, logdir, site):
    """logrotate daily, rotate 14, compress, delaycompress."""
    base = os.path.join(logdir, "%s.access.log" % site)
    if os.path.exists("%s.14.gz" % base):
        os.unlink("%s.14.gz" % base)
    for k in range(13, 1, -1):
        if os.path.exists("%s.%d.gz" % (base, k)):
            os.rename("%s.%d.gz" % (base, k), "%s.%d.gz" % (base, k + 1))
    if os.path.exists(base + ".1"):
        with open(base + ".1", "rb") as f:
            data = f.read()
        with open(base + ".2.gz", "wb") as f:
            f.write(g.gz(data))
        os.unlink(base + ".1")
    if os.path.exists(base):
        os.rename(base, base + ".1")


def web_day(w, rng, text, scale, docroot, day):
    site = os.path.basename(docroot)
    n_posts = len(posts_of(docroot))
    when0 = g.BASE_DATE + datetime.timedelta(days=day)
    urls = []
    for _ in range(max(2, n_posts // 365)):
        urls.append(new_post(w, rng, text, docroot, site, when0 + datetime.timedelta(seconds=rng.randrange(86400))))
    posts = posts_of(docroot)
    for md_path in rng.sample(posts, max(3, len(posts) // 200)):
        edit_post(rng, text, docroot, md_path)
    for _ in range(rng.randint(1, 2)):
        wd, ht = rng.choice(((320, 240), (640, 360), (800, 600), (1024, 576)))
        w.write("%s/public/uploads/%04d/%02d/%s.png" % (docroot, when0.year, when0.month, text.slug(1, 3)),
                g.png_bytes(rng, wd, ht))
    sitemap = os.path.join(docroot, "public/sitemap.xml")
    xml = open(sitemap, encoding="utf-8").read()
    listed = re.findall(r"<loc>https://[^/]+(/[^<]*)</loc>", xml)
    xml = xml.replace("</urlset>", "".join(
        "  <url><loc>https://%s.example.org%s</loc></url>\n" % (site, u) for u in urls) + "</urlset>")
    with open(sitemap, "w", encoding="utf-8") as f:
        f.write(xml)
    logdir = w.path("/var/log/nginx")
    rotate_logs(w, logdir, site)
    paths = listed + urls + ["/", "/feed.xml", "/assets/css/app.css", "/assets/js/app.js", "/wp-login.php", "/admin/"]
    w.write("/var/log/nginx/%s.access.log" % site, g.access_log(rng, text, paths, max(200, int(6000 * scale)), day))


def sql_values(rows):
    def lit(v):
        if isinstance(v, (int, float)):
            return str(v)
        return "'" + str(v).replace("'", "''") + "'"
    return ", ".join("(" + ", ".join(lit(v) for v in r) + ")" for r in rows)


def db_day(rng, text, sizes, state, day):
    """One day of the shop's database as SQL statements (one per line)."""
    n_cust0, n_prod, n_orders0, n_events0 = sizes
    when0 = g.BASE_DATE + datetime.timedelta(days=day)
    at = lambda: (when0 + datetime.timedelta(seconds=rng.randrange(86400))).isoformat(sep=" ")
    out = []
    cust = []
    for _ in range(max(2, n_cust0 // 700)):
        state["cust"] += 1
        fn, ln = rng.choice(g.FIRST_NAMES), rng.choice(g.LAST_NAMES)
        city, cc = rng.choice(g.CITIES)
        cust.append((state["cust"], fn, ln, "%s.%s%d@%s.example" % (fn.lower(), ln.lower(), rng.randrange(100), "mail"),
                     "%d %s Street" % (rng.randint(1, 250), rng.choice(g.STREETS)), city, cc, at()))
    out.append("INSERT INTO customers VALUES %s;" % sql_values(cust))
    orders, items = [], []
    for _ in range(max(5, n_orders0 // 365)):
        state["order"] += 1
        total = 0.0
        for _ in range(rng.randint(1, 6)):
            p, q = rng.randint(1, n_prod), rng.randint(1, 4)
            price = round(rng.lognormvariate(3.0, 1.0), 2)
            total += q * price
            items.append((state["order"], p, q, "%.2f" % price))
        orders.append((state["order"], rng.randint(1, state["cust"]), at(), "new", "%.2f" % total))
    out.append("INSERT INTO orders VALUES %s;" % sql_values(orders))
    out.append("INSERT INTO order_items VALUES %s;" % sql_values(items))
    events = []
    kinds = ("page_view", "search", "add_to_cart", "checkout", "login", "logout", "review")
    for _ in range(max(5, n_events0 // 365)):
        state["event"] += 1
        k = rng.choice(kinds)
        payload = '{"path":"/%s","session":"%016x"}' % (text.slug(), rng.getrandbits(64))
        events.append((state["event"], at(), rng.randint(1, state["cust"]), k, payload))
    out.append("INSERT INTO events VALUES %s;" % sql_values(events))
    out.append("UPDATE orders SET status = 'shipped' WHERE status = 'paid' AND id %% 9 = %d;" % rng.randrange(9))
    out.append("UPDATE orders SET status = 'paid' WHERE status = 'new' AND id %% 3 <> %d;" % rng.randrange(3))
    out.append("UPDATE products SET stock = stock + %d WHERE id %% 11 = %d;" % (rng.randint(5, 40), rng.randrange(11)))
    out.append("UPDATE products SET stock = greatest(stock - 1, 0) WHERE id %% 5 = %d;" % rng.randrange(5))
    out.append("DELETE FROM events WHERE ts < '%s';" % (g.BASE_DATE + datetime.timedelta(days=day - 364)).isoformat(sep=" "))
    out.append("VACUUM ANALYZE;")
    out.append("CHECKPOINT;")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("web", "db", "webdb"))
    ap.add_argument("--root", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--days", type=int, default=4)
    args = ap.parse_args()
    rng = random.Random("activity/%s/%d" % (args.kind, args.seed))
    text = g.Text(rng)
    w = g.Writer(args.root)
    actions = []
    s = args.scale * (0.6 if args.kind == "webdb" else 1.0)
    docroots = [d for d in sorted(glob.glob(os.path.join(args.root, "var/www/*"))) if posts_of(d)]
    sizes = db_sizes(s)
    state = {"cust": sizes[0], "order": sizes[2], "event": sizes[3]}
    sql = []
    for d in range(args.days):
        day = 365 + d   # the parent's logs end on day 364
        if args.kind in ("web", "webdb"):
            for docroot in docroots:
                web_day(w, rng, text, s, docroot, day)
        if args.kind in ("db", "webdb"):
            sql += db_day(rng, text, sizes, state, day)
    for docroot in docroots:
        rel = "/" + os.path.relpath(docroot, args.root)
        actions += ["CHOWN www-data:www-data %s/public/uploads" % rel,
                    "CHOWN www-data:www-data %s/public/cache" % rel,
                    "CHOWNFILES www-data:adm /var/log/nginx"]
    if sql:
        seeddir = "/var/lib/postgresql/.activity"
        w.write(seeddir + "/20-shop.sql", "\n".join(sql) + "\n")
        actions.append("PGLOAD %s" % seeddir)
    for a in actions:
        print(a)
    print("activity: %d days, %d files written, %.1f MiB, %d SQL statements"
          % (args.days, w.files, w.bytes / 2 ** 20, len(sql)), file=sys.stderr)


if __name__ == "__main__":
    main()
