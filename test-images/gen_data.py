#!/usr/bin/env python3
"""Deterministic application-data generator for the nbd-cas test images.

Writes realistic-looking application data (PHP/Python code, HTML, Markdown,
CSV, SQL, JSON, gzip-rotated logs, PNG uploads, an SQLite database) into a
debootstrapped root directory.  Everything is derived from random.Random(seed)
so the same (kind, seed, scale) always produces the same bytes.

Two kinds of randomness are used on purpose:
  * the "software" (CMS code, vendor libraries, Flask app code, CSS/JS) comes
    from a FIXED seed, so two web servers running the same CMS share those
    files, as real servers running the same application do;
  * the "content" (articles, uploads, logs, database rows) comes from --seed,
    so servers with different seeds differ in their data.

Usage: gen_data.py KIND --root DIR --seed N --scale F --name HOSTNAME
KIND is one of: none, web, db, webdb, app.

On stdout it prints post-processing actions for build.sh, one per line:
  CHOWN user:group /abs/path/in/root   (recursive chown inside the chroot)
  CHOWNFILES user:group /abs/dir       (chown the files below dir, not dir)
  PGLOAD /abs/seed/dir/in/root         (load NN-DBNAME.sql files via postgres --single)
Only the Python standard library is used.
"""

import argparse
import datetime
import gzip
import hashlib
import json
import os
import random
import sqlite3
import struct
import sys
import zlib

GENERATOR_VERSION = 1

WORDS = """
the of and to in is that for it as was with be by on not he this are or his from
at which but have an they you were her she there been one all we their has would
when if so no will more can out who up about into them than only other new some
could these time two may then do first any my now such like our over man me even
most made after also did many before must through back years where much your way
well down should because each just those people how too little state good very
make world still own see men work long get here between both life being under
never day same another know while last might us great old year off come since
against go came right used take three states himself few house use during without
again place around however home small found thought went say part once general
high upon school every don does got united left number course war until always
away something fact though water less public put think almost hand enough far took
head yet government system better set told nothing night end why called didn eyes
find going look asked later knew point next program city business give group toward
young days let room president side social given present several order national
possible rather second face per among form important often things looked early
white case john become large big need four within felt along children saw best
church ever least power development light thought family interest want members
mind country area others done turned although open god service certain kind problem
began different door thus help means sense whole matter perhaps itself york times
law human line above name example action company hands local show whether five
history gave today either act feet across taken past quite anything seen having
death week experience body word half really field am car words already themselves
information tell together college shall money period held keep sure probably free
seems political real behind cannot miss question air office making brought whose
special major heard problems federal became study ago moment available known
result street economic boy position reason change south board individual job
society areas west close turn love community true court force full seemed am art
policy role market pressure effect data price growth council review network
storage server client request response cache index table column query migration
block volume disk image backup release version package module service account
customer order product invoice payment delivery warehouse report dashboard user
profile session token message event queue worker schedule task project team
""".split()

FIRST_NAMES = """James Mary Robert Patricia John Jennifer Michael Linda David Elizabeth
William Barbara Richard Susan Joseph Jessica Thomas Sarah Charles Karen Christopher
Lisa Daniel Nancy Matthew Betty Anthony Margaret Mark Sandra Donald Ashley Steven
Kimberly Paul Emily Andrew Donna Joshua Michelle Kenneth Carol Kevin Amanda Brian
Dorothy George Melissa Timothy Deborah Ronald Stephanie Edward Rebecca Jason Sharon
Jeffrey Laura Ryan Cynthia Jacob Kathleen Gary Amy Nicholas Angela Eric Shirley
Jonathan Anna Stephen Brenda Larry Pamela Justin Emma Scott Nicole Brandon Helen
Lukas Sofia Jonas Mia Elias Hanna Noah Lea Finn Lena Luca Marie Ben Clara Paul Ella
Mateo Lucia Hugo Martina Enzo Chloe Louis Camille Jules Manon Arthur Ines""".split()

LAST_NAMES = """Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez
Hernandez Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee
Perez Thompson White Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen
King Wright Scott Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera
Campbell Mitchell Carter Roberts Mueller Schmidt Schneider Fischer Weber Meyer
Wagner Becker Schulz Hoffmann Dubois Durand Lefebvre Moreau Laurent Simon Michel
Rossi Russo Ferrari Esposito Bianchi Romano Colombo Ricci Marino Greco""".split()

CITIES = [("Berlin", "DE"), ("Hamburg", "DE"), ("Munich", "DE"), ("Paris", "FR"),
          ("Lyon", "FR"), ("Marseille", "FR"), ("Milan", "IT"), ("Rome", "IT"),
          ("Madrid", "ES"), ("Barcelona", "ES"), ("Amsterdam", "NL"),
          ("Rotterdam", "NL"), ("Vienna", "AT"), ("Zurich", "CH"), ("Brussels", "BE"),
          ("London", "GB"), ("Manchester", "GB"), ("Dublin", "IE"), ("Lisbon", "PT"),
          ("Warsaw", "PL"), ("Prague", "CZ"), ("Copenhagen", "DK"), ("Stockholm", "SE"),
          ("Oslo", "NO"), ("Helsinki", "FI"), ("New York", "US"), ("Chicago", "US"),
          ("Austin", "US"), ("Seattle", "US"), ("Toronto", "CA")]

STREETS = """Main High Station Church Park Mill School Bridge Garden Market Lake River
Oak Elm Maple Cedar Pine Hill Forest Meadow Castle King Queen North South""".split()

USER_AGENTS = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "curl/7.88.1",
    "python-requests/2.31.0",
]

BASE_DATE = datetime.datetime(2024, 1, 1, 0, 0, 0)
SOFTWARE_SEED = "quill-cms-2.4.1"
APP_SOFTWARE_SEED = "ledgerline-app-1.8.0"


class Text:
    """Zipf-weighted English-ish text."""

    def __init__(self, rng):
        self.rng = rng
        weights = [1.0 / (i + 1) ** 0.9 for i in range(len(WORDS))]
        acc, cum = 0.0, []
        for w in weights:
            acc += w
            cum.append(acc)
        self.cum = cum

    def words(self, n):
        return self.rng.choices(WORDS, cum_weights=self.cum, k=n)

    def sentence(self, lo=6, hi=20):
        w = self.words(self.rng.randint(lo, hi))
        w[0] = w[0].capitalize()
        if len(w) > 8 and self.rng.random() < 0.3:
            w[len(w) // 2] += ","
        return " ".join(w) + self.rng.choice(".....?!")

    def paragraph(self, lo=3, hi=8):
        return " ".join(self.sentence() for _ in range(self.rng.randint(lo, hi)))

    def title(self, lo=3, hi=8):
        return " ".join(x.capitalize() for x in self.words(self.rng.randint(lo, hi)))

    def slug(self, lo=2, hi=5):
        return "-".join(self.words(self.rng.randint(lo, hi)))

    def ident(self, parts=2, camel=True):
        w = self.words(parts)
        if camel:
            return w[0] + "".join(x.capitalize() for x in w[1:])
        return "_".join(w)

    def cls(self, parts=2):
        return "".join(x.capitalize() for x in self.words(parts))


class Writer:
    def __init__(self, root):
        self.root = root
        self.bytes = 0
        self.files = 0

    def path(self, rel):
        return os.path.join(self.root, rel.lstrip("/"))

    def write(self, rel, data, mode=0o644):
        p = self.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        self.bytes += len(data)
        self.files += 1

    def symlink(self, target, rel):
        p = self.path(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        if os.path.lexists(p):
            os.unlink(p)
        os.symlink(target, p)

    def remove(self, rel):
        p = self.path(rel)
        if os.path.lexists(p):
            os.unlink(p)


# ---------------------------------------------------------------- binary-ish data

def png_bytes(rng, w, h):
    """A real PNG: smooth gradient bands plus low-amplitude noise, zlib-compressed."""
    rowlen = 3 * w
    kx, ky = rng.randint(1, 7), rng.randint(1, 5)
    c = [rng.randint(0, 255) for _ in range(3)]
    base = bytes(((x // 3) * kx // 4 + c[x % 3]) & 0xFF for x in range(2 * rowlen + 3))
    mask = int.from_bytes(bytes([rng.choice((0x01, 0x01, 0x03))]) * rowlen, "big")
    every = rng.choice((2, 3, 4))
    raw = bytearray()
    for y in range(h):
        off = 3 * ((y * ky // 2) % w)
        row = int.from_bytes(base[off:off + rowlen], "big")
        if y % every == 0:
            row ^= int.from_bytes(rng.randbytes(rowlen), "big") & mask
        raw.append(0)
        raw += row.to_bytes(rowlen, "big")

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"tEXt", b"Software\x00quill-imgproc 1.2")
            + chunk(b"IDAT", zlib.compress(bytes(raw), 6))
            + chunk(b"IEND", b""))


def gz(data):
    if isinstance(data, str):
        data = data.encode("utf-8")
    return gzip.compress(data, compresslevel=6, mtime=0)


def ts(rng, days=365):
    return BASE_DATE + datetime.timedelta(seconds=rng.randrange(days * 86400))


def ip(rng):
    return "%d.%d.%d.%d" % (rng.choice((31, 46, 62, 78, 81, 85, 91, 93, 185, 188, 212, 217)),
                            rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))


def access_log(rng, text, paths, n, day):
    lines = []
    t0 = BASE_DATE + datetime.timedelta(days=day)
    secs = sorted(rng.randrange(86400) for _ in range(n))
    for s in secs:
        t = t0 + datetime.timedelta(seconds=s)
        p = rng.choice(paths)
        status = rng.choices((200, 200, 200, 304, 301, 404, 500), k=1)[0]
        size = rng.randint(200, 90000) if status == 200 else rng.randint(0, 600)
        ref = "-" if rng.random() < 0.6 else "https://www.example.org/" + text.slug()
        lines.append('%s - - [%s +0000] "%s %s HTTP/1.1" %d %d "%s" "%s"\n' % (
            ip(rng), t.strftime("%d/%b/%Y:%H:%M:%S"), rng.choice(("GET",) * 9 + ("POST",)),
            p, status, size, ref, rng.choice(USER_AGENTS)))
    return "".join(lines)


# ---------------------------------------------------------------- the "CMS" software (fixed seed)

PHP_BODIES = [
    """        ${v} = trim((string) ${a});
        if (${v} === '') {
            return null;
        }
        return $this->{m}(${v}, $this->options['{k}'] ?? {n});
""",
    """        $result = [];
        foreach (${a} as $key => $value) {
            if (!is_string($key) || str_starts_with($key, '_')) {
                continue;
            }
            $result[$key] = is_array($value) ? $this->{m}($value) : $value;
        }
        return $result;
""",
    """        if (!isset($this->cache[${a}])) {
            $this->cache[${a}] = $this->repository->{m}(${a}, {n});
        }
        $this->logger->debug('{s}', ['key' => ${a}]);
        return $this->cache[${a}];
""",
    """        $stmt = $this->db->prepare('SELECT id, {k}, created_at FROM {t} WHERE {k} = :v ORDER BY id DESC LIMIT {n}');
        $stmt->execute(['v' => ${a}]);
        $rows = $stmt->fetchAll(\\PDO::FETCH_ASSOC);
        return array_map(fn (array $row) => $this->{m}($row), $rows);
""",
    """        try {
            ${v} = $this->client->request('GET', '/{k}/' . rawurlencode((string) ${a}));
        } catch (\\RuntimeException $e) {
            $this->logger->warning('{s}: ' . $e->getMessage());
            return false;
        }
        return ${v}->getStatusCode() === 200;
""",
    """        ${v} = sprintf('%s-%s', '{k}', substr(hash('sha256', (string) ${a}), 0, {n}));
        $this->events->dispatch(new Event('{s}', ['id' => ${v}]));
        return ${v};
""",
]


def php_class(rng, text, ns):
    name = text.cls(rng.randint(1, 3))
    uses = sorted({"%s\\%s" % (rng.choice(ns), text.cls(2)) for _ in range(rng.randint(1, 5))})
    out = ["<?php", "", "declare(strict_types=1);", "", "namespace %s;" % rng.choice(ns), ""]
    out += ["use %s;" % u for u in uses]
    out += ["", "/**", " * %s" % text.sentence(), " *", " * %s" % text.sentence(), " */",
            "final class %s" % name, "{"]
    out += ["    private array $cache = [];", "    private array $options;", ""]
    out += ["    public function __construct(array $options = [])", "    {",
            "        $this->options = $options + ['%s' => %d];" % (text.ident(1), rng.randint(1, 500)),
            "    }", ""]
    for _ in range(rng.randint(2, 12)):
        a, v, m = text.ident(1), text.ident(1), text.ident(2)
        body = rng.choice(PHP_BODIES)
        body = (body.replace("{a}", a).replace("{v}", v).replace("{m}", m)
                .replace("{k}", text.ident(1, camel=False)).replace("{t}", text.ident(2, camel=False))
                .replace("{n}", str(rng.randint(2, 64))).replace("{s}", text.sentence(3, 8)))
        out += ["    /**", "     * %s" % text.sentence(), "     */",
                "    public function %s(mixed $%s): mixed" % (text.ident(rng.randint(2, 3)), a),
                "    {", body.rstrip("\n"), "    }", ""]
    out[-1] = "}"
    return name, "\n".join(out) + "\n"


def gen_cms(w, docroot):
    """The PHP CMS code + vendor libraries + static assets: identical on every site."""
    rng = random.Random(SOFTWARE_SEED)
    text = Text(rng)
    ns = ["Quill\\" + x for x in ("Http", "Content", "Auth", "Storage", "Render", "Support", "Admin", "Search")]
    for n in ns:
        d = n.split("\\")[1]
        for _ in range(rng.randint(10, 22)):
            cname, src = php_class(rng, text, [n])
            w.write("%s/src/%s/%s.php" % (docroot, d, cname), src)
    vendors = ["monolog/monolog", "symfony/http-foundation", "symfony/routing", "twig/twig",
               "guzzlehttp/guzzle", "league/commonmark", "doctrine/dbal", "psr/log",
               "nesbot/carbon", "vlucas/phpdotenv", "ramsey/uuid", "symfony/console"]
    lock = {"packages": []}
    for v in vendors:
        vns = ["\\".join(x.capitalize() for x in v.replace("-", "/").split("/"))]
        for _ in range(rng.randint(15, 45)):
            cname, src = php_class(rng, text, vns)
            w.write("%s/vendor/%s/src/%s.php" % (docroot, v, cname), src)
        w.write("%s/vendor/%s/LICENSE" % (docroot, v),
                "MIT License\n\nCopyright (c) %s\n\n%s\n" % (text.title(2, 3), "\n\n".join(text.paragraph() for _ in range(4))))
        lock["packages"].append({"name": v, "version": "%d.%d.%d" % (rng.randint(1, 7), rng.randint(0, 20), rng.randint(0, 9)),
                                 "type": "library", "license": ["MIT"]})
    w.write(docroot + "/composer.lock", json.dumps(lock, indent=4) + "\n")
    w.write(docroot + "/vendor/autoload.php", "<?php\n\nrequire_once __DIR__ . '/composer/autoload_real.php';\n\nreturn ComposerAutoloaderInit::getLoader();\n")
    # static assets
    css = []
    for _ in range(900):
        sel = ".%s-%s" % (text.ident(1), text.ident(1))
        props = ["  %s: %s;" % (rng.choice(("margin", "padding", "color", "background", "border", "font-size", "line-height", "display")),
                                rng.choice(("0", "1rem", "#%06x" % rng.randrange(1 << 24), "flex", "block", "1px solid #ddd", "1.5")))
                 for _ in range(rng.randint(1, 6))]
        css.append("%s {\n%s\n}\n" % (sel, "\n".join(props)))
    w.write(docroot + "/public/assets/css/app.css", "\n".join(css))
    js = []
    for _ in range(700):
        f = text.ident(2)
        js.append("function %s(%s) {\n  const %s = document.querySelector('.%s');\n  if (!%s) { return null; }\n  return %s.dataset.%s || %d;\n}\n"
                  % (f, text.ident(1), "el", text.ident(1), "el", "el", text.ident(1), rng.randint(0, 999)))
    w.write(docroot + "/public/assets/js/app.js", "\n".join(js))
    for i in range(12):
        w.write("%s/public/assets/img/icon-%02d.png" % (docroot, i), png_bytes(rng, 64, 64))
    w.write(docroot + "/public/index.php",
            "<?php\n\ndeclare(strict_types=1);\n\nrequire __DIR__ . '/../vendor/autoload.php';\n\n"
            "$config = require __DIR__ . '/../config/config.php';\n$app = new Quill\\Http\\Kernel($config);\n"
            "$app->handle(Quill\\Http\\Request::fromGlobals())->send();\n")


def gen_site_content(w, rng, text, docroot, scale, site, db=None):
    """Articles (Markdown + rendered HTML cache), uploads, sitemap, site config, logs."""
    n_posts = max(20, int(2400 * scale))
    n_uploads = max(10, int(120 * scale))
    urls = []
    cfg = ["<?php", "", "return ["]
    cfg.append("    'site_name' => '%s'," % site.replace("-", " ").title())
    cfg.append("    'base_url' => 'https://%s.example.org'," % site)
    cfg.append("    'secret' => '%032x'," % rng.getrandbits(128))
    if db:
        cfg.append("    'database' => ['dsn' => 'pgsql:host=localhost;dbname=%s', 'user' => '%s', 'password' => '%024x']," % (db, db, rng.getrandbits(96)))
    else:
        cfg.append("    'database' => ['dsn' => 'sqlite:' . __DIR__ . '/../var/content.db'],")
    cfg.append("    'cache_dir' => __DIR__ . '/../public/cache',")
    cfg.append("];")
    w.write(docroot + "/config/config.php", "\n".join(cfg) + "\n")
    header = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
              "<link rel=\"stylesheet\" href=\"/assets/css/app.css\">\n<title>%s</title>\n</head>\n<body>\n"
              "<header class=\"site-header\"><a href=\"/\">" + site.replace("-", " ").title() + "</a></header>\n<main>\n")
    footer = "</main>\n<footer>&copy; 2024 %s</footer>\n<script src=\"/assets/js/app.js\"></script>\n</body>\n</html>\n" % site
    for i in range(n_posts):
        t = ts(rng)
        title = text.title()
        slug = text.slug()
        paras = [text.paragraph() for _ in range(rng.randint(2, 14))]
        md = "---\ntitle: \"%s\"\ndate: %s\nauthor: %s %s\ntags: [%s]\n---\n\n" % (
            title, t.isoformat(), rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), ", ".join(text.words(rng.randint(1, 4))))
        body = []
        for p in paras:
            if rng.random() < 0.15:
                md += "## %s\n\n" % text.title(2, 5)
                body.append("<h2>%s</h2>" % text.title(2, 5))
            md += p + "\n\n"
            body.append("<p>%s</p>" % p)
        rel = "%04d/%02d/%s" % (t.year, t.month, slug)
        w.write("%s/content/posts/%s.md" % (docroot, rel), md)
        w.write("%s/public/cache/%s/index.html" % (docroot, rel),
                header % title + "<article>\n<h1>%s</h1>\n<time>%s</time>\n%s\n</article>\n" % (title, t.date(), "\n".join(body)) + footer)
        urls.append("/" + rel + "/")
    for i in range(n_uploads):
        t = ts(rng)
        wd, ht = rng.choice(((320, 240), (640, 360), (800, 600), (200, 200), (1024, 576), (480, 320)))
        w.write("%s/public/uploads/%04d/%02d/%s.png" % (docroot, t.year, t.month, text.slug(1, 3)), png_bytes(rng, wd, ht))
    sm = ['<?xml version="1.0" encoding="UTF-8"?>', '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">']
    sm += ["  <url><loc>https://%s.example.org%s</loc></url>" % (site, u) for u in urls]
    sm.append("</urlset>")
    w.write(docroot + "/public/sitemap.xml", "\n".join(sm) + "\n")
    w.write(docroot + "/public/robots.txt", "User-agent: *\nDisallow: /admin/\nSitemap: https://%s.example.org/sitemap.xml\n" % site)
    # rotated access logs: today's plain, older ones gzip'ed like logrotate does
    paths = urls + ["/", "/feed.xml", "/assets/css/app.css", "/assets/js/app.js", "/wp-login.php", "/admin/"]
    per_day = max(200, int(6000 * scale))
    w.write("/var/log/nginx/%s.access.log" % site, access_log(rng, text, paths, per_day, 364))
    w.write("/var/log/nginx/%s.access.log.1" % site, access_log(rng, text, paths, per_day, 363))
    for k in range(2, 15):
        w.write("/var/log/nginx/%s.access.log.%d.gz" % (site, k), gz(access_log(rng, text, paths, per_day, 364 - k)))
    return urls


def nginx_php_site(w, site, docroot, php_sock):
    w.write("/etc/nginx/sites-available/" + site, """server {
    listen 80;
    listen [::]:80;
    server_name %(site)s.example.org;
    root %(docroot)s/public;
    index index.php index.html;
    access_log /var/log/nginx/%(site)s.access.log;
    error_log /var/log/nginx/%(site)s.error.log;

    location / {
        try_files /cache$uri/index.html $uri $uri/ /index.php?$query_string;
    }

    location ~ \\.php$ {
        include snippets/fastcgi-php.conf;
        fastcgi_pass unix:%(sock)s;
    }

    location ~* \\.(css|js|png|jpg|svg)$ {
        expires 30d;
    }
}
""" % {"site": site, "docroot": docroot, "sock": php_sock})
    w.symlink("/etc/nginx/sites-available/" + site, "/etc/nginx/sites-enabled/" + site)
    w.remove("/etc/nginx/sites-enabled/default")


def php_fpm_sock(root):
    php = os.path.join(root, "etc/php")
    vers = sorted(os.listdir(php)) if os.path.isdir(php) else []
    return "/run/php/php%s-fpm.sock" % (vers[-1] if vers else "8.2")


# ---------------------------------------------------------------- database

def gen_db(w, rng, text, scale, dbname, seeddir="/var/lib/postgresql/.seed"):
    n_cust = max(200, int(20000 * scale))
    n_prod = max(50, int(3000 * scale))
    n_orders = max(500, int(70000 * scale))
    n_events = max(500, int(110000 * scale))
    tables = {}

    def esc(s):
        return '"' + s.replace('"', '""') + '"' if ("," in s or '"' in s) else s


    rows = []
    for i in range(1, n_cust + 1):
        fn, ln = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        city, cc = rng.choice(CITIES)
        rows.append((str(i), fn, ln, "%s.%s%d@%s.example" % (fn.lower(), ln.lower(), rng.randrange(100), rng.choice(("mail", "post", "web", "inbox"))),
                     "%d %s Street" % (rng.randint(1, 250), rng.choice(STREETS)), city, cc, ts(rng, 700).isoformat(sep=" ")))
    tables["customers"] = ("id bigint PRIMARY KEY, first_name text NOT NULL, last_name text NOT NULL, email text NOT NULL, "
                           "street text, city text, country char(2), created_at timestamp NOT NULL", rows)
    rows = []
    prices = {}
    for i in range(1, n_prod + 1):
        price = round(rng.lognormvariate(3.0, 1.0), 2)
        prices[i] = price
        rows.append((str(i), "SKU-%06d" % rng.randrange(10 ** 6), text.title(2, 5), text.paragraph(1, 3), "%.2f" % price,
                     str(rng.randint(0, 900)), ts(rng, 700).isoformat(sep=" ")))
    tables["products"] = ("id bigint PRIMARY KEY, sku text NOT NULL, name text NOT NULL, description text, "
                          "price numeric(10,2) NOT NULL, stock integer NOT NULL, created_at timestamp NOT NULL", rows)
    orows, irows = [], []
    for i in range(1, n_orders + 1):
        total = 0.0
        for _ in range(rng.randint(1, 6)):
            p = rng.randint(1, n_prod)
            q = rng.randint(1, 4)
            total += q * prices[p]
            irows.append((str(i), str(p), str(q), "%.2f" % prices[p]))
        orows.append((str(i), str(rng.randint(1, n_cust)), ts(rng).isoformat(sep=" "),
                      rng.choice(("new", "paid", "paid", "shipped", "shipped", "shipped", "cancelled")), "%.2f" % total))
    tables["orders"] = ("id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES customers(id), created_at timestamp NOT NULL, "
                        "status text NOT NULL, total numeric(12,2) NOT NULL", orows)
    tables["order_items"] = ("order_id bigint NOT NULL REFERENCES orders(id), product_id bigint NOT NULL REFERENCES products(id), "
                             "quantity integer NOT NULL, unit_price numeric(10,2) NOT NULL", irows)
    rows = []
    kinds = ("page_view", "search", "add_to_cart", "checkout", "login", "logout", "review")
    for i in range(1, n_events + 1):
        k = rng.choice(kinds)
        payload = {"path": "/" + text.slug(), "session": "%016x" % rng.getrandbits(64)}
        if k == "search":
            payload["q"] = " ".join(text.words(rng.randint(1, 4)))
        if k == "review":
            payload["text"] = text.sentence()
            payload["stars"] = rng.randint(1, 5)
        rows.append((str(i), ts(rng).isoformat(sep=" "), str(rng.randint(1, n_cust)), k,
                     json.dumps(payload, separators=(",", ":"))))
    tables["events"] = ("id bigint PRIMARY KEY, ts timestamp NOT NULL, customer_id bigint NOT NULL, kind text NOT NULL, payload jsonb", rows)

    order = ["customers", "products", "orders", "order_items", "events"]
    # schema + load script for postgres --single (one statement per line)
    load = []
    for t in order:
        cols, data = tables[t]
        csv = "".join(",".join(esc(f) for f in r) + "\n" for r in data)
        w.write("%s/%s.csv" % (seeddir, t), csv)
        load.append("CREATE TABLE %s (%s);" % (t, cols))
        load.append("COPY %s FROM '%s/%s.csv' WITH (FORMAT csv);" % (t, seeddir, t))
        load.append("CHECKPOINT;")
    load += ["CREATE INDEX orders_customer_idx ON orders (customer_id);",
             "CREATE INDEX order_items_order_idx ON order_items (order_id);",
             "CREATE INDEX events_ts_idx ON events (ts);",
             "CREATE INDEX customers_email_idx ON customers (email);",
             "UPDATE products SET stock = stock - 1 WHERE id %% 7 = %d;" % rng.randrange(7),
             "DELETE FROM events WHERE id %% 97 = %d;" % rng.randrange(97),
             "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO %s;" % dbname,
             "VACUUM ANALYZE;", "CHECKPOINT;"]
    w.write(seeddir + "/00-postgres.sql",
            "CREATE ROLE %s LOGIN PASSWORD 'md5%032x';\nCREATE DATABASE %s OWNER %s;\n" % (dbname, rng.getrandbits(128), dbname, dbname))
    w.write("%s/10-%s.sql" % (seeddir, dbname), "\n".join(load) + "\n")
    # the nightly logical backup a DBA keeps next to the cluster (pg_dump style)
    dump = ["--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\nSET client_encoding = 'UTF8';\n\n"]
    for t in order:
        cols, data = tables[t]
        dump.append("CREATE TABLE public.%s (\n    %s\n);\n\n" % (t, ",\n    ".join(c.strip() for c in cols.split(", "))))
    for t in order:
        cols, data = tables[t]
        dump.append("COPY public.%s FROM stdin;\n" % t)
        dump.append("".join("\t".join(f.replace("\\", "\\\\") for f in r) + "\n" for r in data))
        dump.append("\\.\n\n")
    dumpgz = gz("".join(dump))
    w.write("/var/backups/postgresql/%s-2024-12-30.sql.gz" % dbname, dumpgz)
    w.write("/var/backups/postgresql/%s-2024-12-30.sql.gz.sha256" % dbname,
            "%s  %s-2024-12-30.sql.gz\n" % (hashlib.sha256(dumpgz).hexdigest(), dbname))
    return seeddir


# ---------------------------------------------------------------- Flask application server

def gen_app(w, rng, text, scale, app):
    srng = random.Random(APP_SOFTWARE_SEED)
    stext = Text(srng)
    base = "/srv/" + app
    for pkg in ("models", "views", "services", "api", "tasks", "utils"):
        w.write("%s/%s/%s/__init__.py" % (base, app, pkg), '"""%s"""\n' % stext.sentence())
        for _ in range(srng.randint(8, 18)):
            mod = stext.ident(2, camel=False)
            out = ['"""%s"""' % stext.sentence(), "", "import logging", "from datetime import datetime",
                   "from flask import Blueprint, jsonify, request, render_template", "",
                   "log = logging.getLogger(__name__)", "bp = Blueprint(%r, __name__)" % mod, ""]
            for _ in range(srng.randint(3, 10)):
                fn, a, b = stext.ident(2, camel=False), stext.ident(1, camel=False), stext.ident(1, camel=False)
                out += ["", "@bp.route('/%s/<int:%s_id>', methods=['GET', 'POST'])" % (stext.slug(1, 2), a),
                        "def %s(%s_id):" % (fn, a),
                        '    """%s"""' % stext.sentence(),
                        "    %s = request.args.get(%r, %d)" % (b, b, srng.randint(1, 100)),
                        "    if request.method == 'POST':",
                        "        payload = request.get_json(silent=True) or {}",
                        "        log.info('%s %%s', %s_id)" % (stext.sentence(2, 5), a),
                        "        return jsonify(ok=True, id=%s_id, %s=payload.get(%r))" % (a, b, b),
                        "    rows = [dict(id=i, name=%r %% i) for i in range(int(%s))]" % (stext.ident(1) + "-%d", b),
                        "    return render_template(%r, rows=rows, ts=datetime.utcnow())" % (mod + ".html"), ""]
            w.write("%s/%s/%s/%s.py" % (base, app, pkg, mod), "\n".join(out) + "\n")
            w.write("%s/templates/%s.html" % (base, mod),
                    "{%% extends 'base.html' %%}\n{%% block content %%}\n<h1>%s</h1>\n<table class=\"%s\">\n"
                    "{%% for r in rows %%}<tr><td>{{ r.id }}</td><td>{{ r.name }}</td></tr>{%% endfor %%}\n</table>\n"
                    "<p>%s</p>\n{%% endblock %%}\n" % (stext.title(), stext.ident(1), stext.paragraph()))
    w.write("%s/%s/__init__.py" % (base, app),
            "from flask import Flask\n\n\ndef create_app():\n    app = Flask(__name__)\n    app.config.from_envvar('APP_SETTINGS')\n    return app\n")
    w.write("%s/wsgi.py" % base, "from %s import create_app\n\napplication = create_app()\n" % app)
    w.write("%s/templates/base.html" % base, "<!DOCTYPE html>\n<html><head><title>%s</title></head><body>{%% block content %%}{%% endblock %%}</body></html>\n" % app)
    for i in range(20):
        w.write("%s/static/img/ui-%02d.png" % (base, i), png_bytes(srng, 96, 96))
    # per-deployment config and data (seeded)
    w.write("/etc/%s/settings.py" % app,
            "SECRET_KEY = '%064x'\nSQLALCHEMY_DATABASE_URI = 'sqlite:////var/lib/%s/%s.sqlite3'\nUPLOAD_DIR = '/var/lib/%s/uploads'\n"
            % (rng.getrandbits(256), app, app, app), 0o640)
    w.write("/etc/systemd/system/%s.service" % app, """[Unit]
Description=%(app)s gunicorn service
After=network.target

[Service]
User=www-data
Group=www-data
WorkingDirectory=/srv/%(app)s
Environment=APP_SETTINGS=/etc/%(app)s/settings.py
ExecStart=/usr/bin/gunicorn --workers 3 --bind unix:/run/%(app)s.sock wsgi:application
Restart=on-failure

[Install]
WantedBy=multi-user.target
""" % {"app": app})
    w.symlink("/etc/systemd/system/%s.service" % app, "/etc/systemd/system/multi-user.target.wants/%s.service" % app)
    w.write("/etc/nginx/sites-available/" + app, """server {
    listen 80;
    server_name %(app)s.example.org;
    location /static/ { alias /srv/%(app)s/static/; }
    location / {
        proxy_pass http://unix:/run/%(app)s.sock;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }
}
""" % {"app": app})
    w.symlink("/etc/nginx/sites-available/" + app, "/etc/nginx/sites-enabled/" + app)
    w.remove("/etc/nginx/sites-enabled/default")
    # SQLite database with real B-tree pages
    dbrel = "/var/lib/%s/%s.sqlite3" % (app, app)
    dbpath = w.path(dbrel)
    os.makedirs(os.path.dirname(dbpath), exist_ok=True)
    if os.path.exists(dbpath):
        os.unlink(dbpath)
    con = sqlite3.connect(dbpath)
    con.execute("PRAGMA page_size = 4096")
    con.execute("CREATE TABLE account (id INTEGER PRIMARY KEY, name TEXT, email TEXT, city TEXT, created TEXT)")
    con.execute("CREATE TABLE item (id INTEGER PRIMARY KEY, account_id INTEGER, title TEXT, body TEXT, qty INTEGER, price REAL, updated TEXT)")
    con.execute("CREATE TABLE audit (id INTEGER PRIMARY KEY, ts TEXT, account_id INTEGER, action TEXT, detail TEXT)")
    n_acc = max(100, int(8000 * scale))
    n_item = max(300, int(60000 * scale))
    n_audit = max(300, int(90000 * scale))
    con.executemany("INSERT INTO account VALUES (?,?,?,?,?)",
                    ((i, "%s %s" % (rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)), "user%d@%s.example" % (i, app),
                      rng.choice(CITIES)[0], ts(rng, 700).isoformat()) for i in range(1, n_acc + 1)))
    con.executemany("INSERT INTO item VALUES (?,?,?,?,?,?,?)",
                    ((i, rng.randint(1, n_acc), text.title(2, 6), text.paragraph(1, 3), rng.randint(0, 500),
                      round(rng.lognormvariate(2.5, 1.0), 2), ts(rng).isoformat()) for i in range(1, n_item + 1)))
    con.executemany("INSERT INTO audit VALUES (?,?,?,?,?)",
                    ((i, ts(rng).isoformat(), rng.randint(1, n_acc), rng.choice(("create", "update", "delete", "login", "export")),
                      json.dumps({"ip": ip(rng), "fields": text.words(rng.randint(1, 5))})) for i in range(1, n_audit + 1)))
    con.execute("CREATE INDEX item_account ON item(account_id)")
    con.execute("CREATE INDEX audit_ts ON audit(ts)")
    con.commit()
    con.close()
    w.bytes += os.path.getsize(dbpath)
    w.files += 1
    for i in range(max(10, int(120 * scale))):
        wd, ht = rng.choice(((320, 240), (640, 480), (800, 600), (256, 256)))
        w.write("/var/lib/%s/uploads/%s-%d.png" % (app, text.slug(1, 2), i), png_bytes(rng, wd, ht))
    # CSV exports and gunicorn logs
    for k in range(max(2, int(12 * scale))):
        lines = ["id,account,title,qty,price\n"] + ["%d,%d,%s,%d,%.2f\n" % (j, rng.randint(1, n_acc), text.title(2, 4), rng.randint(0, 50), rng.random() * 100)
                                                      for j in range(2000)]
        w.write("/var/lib/%s/exports/export-2024-%02d-%02d.csv" % (app, 1 + k % 12, 1 + k % 28), "".join(lines))
    paths = ["/%s/%d" % (text.slug(1, 2), rng.randint(1, 9999)) for _ in range(400)]
    per_day = max(200, int(5000 * scale))
    w.write("/var/log/%s/access.log" % app, access_log(rng, text, paths, per_day, 364))
    for k in range(1, 10):
        w.write("/var/log/%s/access.log.%d.gz" % (app, k), gz(access_log(rng, text, paths, per_day, 364 - k)))
    return ["CHOWN www-data:www-data /var/lib/%s" % app, "CHOWN www-data:www-data /var/log/%s" % app]


# ---------------------------------------------------------------- main

SITE_WORDS = """amber birch cedar delta ember fjord granite harbor island juniper kestrel lantern
maple north orchard pebble quarry river summit timber upland valley willow yarrow""".split()


def site_name(rng, text):
    return "%s-%s-%s" % (rng.choice(SITE_WORDS), rng.choice(SITE_WORDS),
                         rng.choice(("books", "news", "shop", "blog", "press", "journal")))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("none", "web", "db", "webdb", "app"))
    ap.add_argument("--root", required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--name", default="host")
    args = ap.parse_args()
    rng = random.Random("%s/%d" % (args.kind, args.seed))
    text = Text(rng)
    w = Writer(args.root)
    actions = []
    if args.kind in ("web", "webdb"):
        site = site_name(rng, text)
        docroot = "/var/www/" + site
        gen_cms(w, docroot)
        db = "shop" if args.kind == "webdb" else None
        s = args.scale * (0.6 if args.kind == "webdb" else 1.0)
        gen_site_content(w, rng, text, docroot, s, site, db)
        nginx_php_site(w, site, docroot, php_fpm_sock(args.root))
        actions += ["CHOWN www-data:www-data %s/public/uploads" % docroot,
                    "CHOWN www-data:www-data %s/public/cache" % docroot,
                    "CHOWNFILES www-data:adm /var/log/nginx"]
    if args.kind in ("db", "webdb"):
        s = args.scale * (0.6 if args.kind == "webdb" else 1.0)
        seeddir = gen_db(w, rng, text, s, "shop")
        actions.append("PGLOAD %s" % seeddir)
    if args.kind == "app":
        actions += gen_app(w, rng, text, args.scale, "ledgerline")
    w.write("/etc/hostname", args.name + "\n")
    w.write("/etc/hosts", "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n" % args.name)
    for a in actions:
        print(a)
    print("generated %d files, %.1f MiB" % (w.files, w.bytes / 2 ** 20), file=sys.stderr)


if __name__ == "__main__":
    main()
