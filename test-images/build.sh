#!/usr/bin/env bash
# Build realistic raw VM disk images (bare ext4 filesystems) from Debian
# packages with debootstrap + mke2fs -d.  No loop devices, no mounts on the
# host: chroot steps run in private mount namespaces (unshare) so nothing can
# leak if the build is interrupted.  See README.md next to this file.
#
#   build.sh [--size-scale small|large] [--only NAME[,NAME...]] [--list]
#
# Cache: ${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}; an image is rebuilt only
# when its recipe hash changes.  Needs root to build (debootstrap, chroot).
set -euo pipefail

# Bump when the image build steps (cleanup, mke2fs options, ...) change: every
# image is rebuilt.  TREE_VERSION covers the cached debootstrap/apt trees.
SCRIPT_VERSION=1
TREE_VERSION=1

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GENERATOR="$HERE/gen_data.py"
CACHE=${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}
ARCH=amd64

# Packages of every image on top of debootstrap --variant=minbase: what a
# Debian cloud image has (init, the cloud kernel + initramfs, ssh, sudo, ...).
BASE_PACKAGES="systemd-sysv,linux-image-cloud-amd64,openssh-server,sudo,ca-certificates,iproute2,ifupdown,less,vim-tiny,logrotate,cron"

# Application stacks, installed with apt-get (with Recommends, as an admin
# would) on top of the base tree.
stack_packages() {
    case "$1" in
        minimal) echo "" ;;
        web)     echo "nginx php-fpm php-cli php-pgsql php-gd php-mbstring php-xml php-curl php-intl" ;;
        db)      echo "postgresql" ;;
        webdb)   echo "nginx php-fpm php-cli php-pgsql php-gd php-mbstring php-xml php-curl php-intl postgresql" ;;
        app)     echo "nginx python3 python3-flask python3-sqlalchemy python3-psycopg2 gunicorn" ;;
        *) echo "unknown stack $1" >&2; return 1 ;;
    esac
}

# name|suite|stack|data kind|seed|role|description
IMAGES="\
bookworm-minimal|bookworm|minimal|none|0|neighbour|fresh Debian 12 minimal install (cloud kernel, systemd, ssh), no application
bookworm-web|bookworm|web|web|1|migrated|Debian 12 web server: nginx + PHP-FPM serving a generated PHP CMS site (seed 1)
bookworm-web-b|bookworm|web|web|2|neighbour|same stack and CMS code as bookworm-web, other site content (seed 2)
bookworm-db|bookworm|db|db|1|migrated|Debian 12 PostgreSQL 15 server with a generated shop database (seed 1)
bookworm-db-b|bookworm|db|db|2|neighbour|same stack and schema as bookworm-db, other rows (seed 2)
bookworm-webdb|bookworm|webdb|webdb|3|migrated|Debian 12 nginx + PHP + PostgreSQL on one VM, own site and database (seed 3)
bookworm-webdb-later|bookworm|webdb|later|3|migrated|bookworm-webdb four days later: security and point-release upgrades, new and changed orders, rotated logs, new and edited posts (seed 3)
trixie-minimal|trixie|minimal|none|0|neighbour|fresh Debian 13 minimal install (cloud kernel, systemd, ssh), no application
trixie-app|trixie|app|app|1|migrated|Debian 13 application server: nginx + gunicorn + Flask app with SQLite data (seed 1)"

scale_size() {   # image file size in bytes
    case "$1" in small) echo $((1536 * 1024 * 1024)) ;; large) echo $((6 * 1024 * 1024 * 1024)) ;; esac
}
scale_data() {   # data-generator scale factor
    case "$1" in small) echo 1 ;; large) echo 12 ;; esac
}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'build.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
    cat <<EOF
usage: $0 [--size-scale small|large] [--only NAME[,NAME...]] [--list]

Builds raw ext4 disk images of Debian VMs into \$NBD_CAS_IMAGES/<scale>/
(default cache: /var/tmp/nbd-cas-images). Up-to-date images are not rebuilt.
  --size-scale S   small (default: 1.5 GiB images, tens of MiB of data) or
                   large (6 GiB images, hundreds of MiB of data)
  --only LIST      build only these images (comma separated)
  --list           list the images, their status and paths; build nothing
Images: $(echo "$IMAGES" | cut -d'|' -f1 | tr '\n' ' ')
EOF
}

SCALE=small ONLY="" LIST=0 ORIG_ARGS="$*"
while [ $# -gt 0 ]; do
    case "$1" in
        --size-scale) [ $# -ge 2 ] || die "--size-scale needs a value"; SCALE=$2; shift 2 ;;
        --size-scale=*) SCALE=${1#*=}; shift ;;
        --only) [ $# -ge 2 ] || die "--only needs a value"; ONLY=$2; shift 2 ;;
        --only=*) ONLY=${1#*=}; shift ;;
        --list) LIST=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
case "$SCALE" in small|large) ;; *) die "--size-scale must be small or large, not '$SCALE'" ;; esac
ALL_NAMES=$(echo "$IMAGES" | cut -d'|' -f1)
if [ -n "$ONLY" ]; then
    for n in ${ONLY//,/ }; do
        echo "$ALL_NAMES" | grep -qx -- "$n" || die "unknown image '$n' (known: $(echo $ALL_NAMES))"
    done
fi
selected() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

OUT="$CACHE/$SCALE"
SIZE=$(scale_size "$SCALE")
DATA_SCALE=$(scale_data "$SCALE")

sha() { sha256sum | cut -c1-64; }
file_sha() { sha256sum "$1" | cut -c1-64; }

PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3 || echo /usr/bin/python3)

# ------------------------------------------------------------------ recipes
base_key() {      # $1 suite
    printf 'tree_version=%s\nsuite=%s\narch=%s\nvariant=minbase\nbase_packages=%s\n' \
        "$TREE_VERSION" "$1" "$ARCH" "$BASE_PACKAGES" | sha | cut -c1-16
}
stack_key() {     # $1 suite $2 stack
    printf 'base=%s\nstack=%s\npackages=%s\n' "$(base_key "$1")" "$2" "$(stack_packages "$2")" | sha | cut -c1-16
}
recipe_text() {   # $1 name $2 suite $3 stack $4 kind $5 seed
    printf 'script_version=%s\nname=%s\nsuite=%s\narch=%s\nbase_packages=%s\nstack=%s\nstack_packages=%s\ntrees=%s/%s\ndata_kind=%s\nseed=%s\ndata_scale=%s\nsize=%s\ngenerator_sha256=%s\n' \
        "$SCRIPT_VERSION" "$1" "$2" "$ARCH" "$BASE_PACKAGES" "$3" "$(stack_packages "$3")" \
        "$(base_key "$2")" "$(stack_key "$2" "$3")" "$4" "$5" "$DATA_SCALE" "$SIZE" "$(file_sha "$GENERATOR")"
    if [ "$4" = later ]; then later_recipe "$1"; fi
}
recipe_hash() { recipe_text "$@" | sha; }

# An image of kind "later" is its parent (the name without "-later") after LATER_DAYS days of
# activity (activity.py, then apt-get upgrade from the suite's -updates and -security): the
# same VM some days on, made from the parent image's own files.
LATER_DAYS=4
ACTIVITY="$HERE/activity.py"
image_line() { echo "$IMAGES" | grep "^$1|"; }
parent_of() { echo "${1%-later}"; }
later_recipe() {  # $1 name -> the parent's recipe hash and the activity's inputs
    local name suite stack kind seed role desc
    IFS='|' read -r name suite stack kind seed role desc <<<"$(image_line "$(parent_of "$1")")"
    printf 'parent=%s\nparent_recipe=%s\nactivity_sha256=%s\ndays=%s\nupgrade=%s-updates,%s-security\n' \
        "$name" "$(recipe_hash "$name" "$suite" "$stack" "$kind" "$seed")" "$(file_sha "$ACTIVITY")" \
        "$LATER_DAYS" "$suite" "$suite"
}

image_status() {  # $1 name $2 hash -> up-to-date|stale|missing
    local raw="$OUT/$1.raw" meta="$OUT/$1.json"
    if [ ! -f "$raw" ]; then echo missing; return; fi
    if [ -f "$meta" ] && grep -q "\"recipe_hash\": \"$2\"" "$meta"; then echo up-to-date; else echo stale; fi
}

# ------------------------------------------------------------------ --list
if [ "$LIST" = 1 ]; then
    printf '%-21s %-10s %-11s %s\n' NAME ROLE STATUS PATH
    while IFS='|' read -r name suite stack kind seed role desc; do
        selected "$name" || continue
        h=$(recipe_hash "$name" "$suite" "$stack" "$kind" "$seed")
        printf '%-21s %-10s %-11s %s\n' "$name" "$role" "$(image_status "$name" "$h")" "$OUT/$name.raw"
        printf '    %s\n' "$desc"
    done <<<"$IMAGES"
    echo "manifest: $OUT/manifest.json (all scales: $CACHE/manifest.json)"
    exit 0
fi

# ------------------------------------------------------------------ what to build
TODO=()
while IFS='|' read -r name suite stack kind seed role desc; do
    selected "$name" || continue
    h=$(recipe_hash "$name" "$suite" "$stack" "$kind" "$seed")
    [ "$(image_status "$name" "$h")" = up-to-date ] || TODO+=("$name")
done <<<"$IMAGES"

if [ ${#TODO[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "building ${TODO[*]} needs root (debootstrap and chroot); run as root, e.g. sudo $0 $ORIG_ARGS"
    [ "$(dpkg --print-architecture 2>/dev/null || uname -m)" = amd64 ] || die "the images are amd64; build them on an amd64 host"

    # tools: install what is missing (we are root)
    missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v mke2fs >/dev/null || missing+=(e2fsprogs)
    [ -x /usr/bin/python3 ] || command -v python3 >/dev/null || missing+=(python3)
    command -v unshare >/dev/null && command -v flock >/dev/null || missing+=(util-linux)
    command -v gpgv >/dev/null || missing+=(gpgv)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing missing build tools: ${missing[*]}"
        apt-get update -q >&2 || die "apt-get update failed; install ${missing[*]} by hand"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 || die "cannot install ${missing[*]}"
    fi
    PYTHON=/usr/bin/python3
    [ -x "$PYTHON" ] || PYTHON=$(command -v python3)
    case "$(mke2fs -h 2>&1 || true)" in
        *"-d root-directory"*) ;;
        *) die "this mke2fs has no -d option (need e2fsprogs >= 1.43)" ;;
    esac
fi

mkdir -p "$OUT"

# ------------------------------------------------------------------ mirror
detect_mirror() {
    if [ -n "${NBD_CAS_MIRROR:-}" ]; then echo "$NBD_CAS_MIRROR"; return; fi
    "$PYTHON" - <<'EOF'
import glob, re
cands = []
def consider(uri, suites):
    if "security" in uri or not re.match(r"https?://", uri):
        return
    if any(s.split("-")[0] in ("bookworm", "trixie", "forky", "sid", "stable", "testing", "unstable", "bullseye")
           and "security" not in s for s in suites):
        cands.append(uri.rstrip("/"))
for f in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(f).read().splitlines()
    except OSError:
        continue
    for line in lines:
        line = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).split()
        if len(line) >= 3 and line[0] == "deb":
            consider(line[1], [line[2]])
for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    try:
        text = open(f).read()
    except OSError:
        continue
    for stanza in re.split(r"\n\s*\n", text):
        fields = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[0].isspace():
                continue
            k, v = line.split(":", 1)
            fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"])[0].lower() != "no":
            for uri in fields.get("uris", []):
                consider(uri, fields.get("suites", []))
print(cands[0] if cands else "http://deb.debian.org/debian")
EOF
}

# ------------------------------------------------------------------ helpers
# Run a command chrooted into $1 inside a private mount namespace with /proc
# and /sys mounted; the mounts vanish with the namespace, whatever happens.
chroot_ns() {
    local root=$1; shift
    unshare --mount --propagation private -- /bin/bash -c '
        set -e
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount -t sysfs sysfs "$root/sys"
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
            LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true "$@"
    ' chroot_ns "$root" "$@"
}

no_daemons() {    # keep maintainer scripts from starting services in the chroot
    mkdir -p "$1/usr/sbin"
    printf '#!/bin/sh\nexit 101\n' >"$1/usr/sbin/policy-rc.d"
    chmod 755 "$1/usr/sbin/policy-rc.d"
}

run_logged() {    # $1 logfile, rest: command; show the log tail on failure
    local logf=$1; shift
    if ! "$@" >"$logf" 2>&1; then
        tail -n 40 "$logf" >&2
        die "command failed: $* (full log: $logf)"
    fi
}

WORK="$CACHE/work"
cleanup_work() { [ "${NBD_CAS_KEEP_WORK:-0}" = 1 ] || rm -rf --one-file-system "$WORK"; }

# debootstrap --variant=minbase + BASE_PACKAGES -> $CACHE/trees/base-SUITE-KEY
ensure_base() {   # $1 suite -> prints tree dir
    local suite=$1 key dir tmp script=""
    key=$(base_key "$suite")
    dir="$CACHE/trees/base-$suite-$key"
    if [ ! -d "$dir" ]; then
        local t0=$SECONDS
        tmp="$WORK/base-$suite"
        rm -rf "$tmp"
        log "debootstrap $suite (minbase + $BASE_PACKAGES) from $MIRROR"
        [ -e "/usr/share/debootstrap/scripts/$suite" ] || script=/usr/share/debootstrap/scripts/sid
        mkdir -p "$CACHE/debs" "$CACHE/trees"
        run_logged "$CACHE/logs/debootstrap-$suite.log" \
            debootstrap --arch="$ARCH" --variant=minbase --foreign --components=main \
            --cache-dir="$CACHE/debs" --include="$BASE_PACKAGES" \
            "$suite" "$tmp" "$MIRROR" $script
        no_daemons "$tmp"
        run_logged "$CACHE/logs/debootstrap-$suite-stage2.log" \
            unshare --mount --propagation private -- chroot "$tmp" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 /debootstrap/debootstrap --second-stage
        rm -f "$tmp"/var/cache/apt/archives/*.deb     # they are in $CACHE/debs
        mv "$tmp" "$dir"
        log "base tree $suite ready in $((SECONDS - t0)) s"
    fi
    echo "$dir"
}

# apt-get update, then apt-get CMD in the tree's chroot (no daemons started); downloaded
# .debs are shared through the package cache (hard links) and leave the tree
apt_in_tree() {   # $1 root $2 log name $3 apt-get command and arguments
    local root=$1 f
    cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    no_daemons "$root"
    for f in "$CACHE"/debs/*.deb; do
        [ -e "$f" ] && { ln -f "$f" "$root/var/cache/apt/archives/" 2>/dev/null || cp "$f" "$root/var/cache/apt/archives/"; }
    done
    run_logged "$CACHE/logs/$2.log" chroot_ns "$root" /bin/sh -c \
        "apt-get update -q && apt-get $3 -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold"
    for f in "$root"/var/cache/apt/archives/*.deb; do
        [ -e "$f" ] && [ ! -e "$CACHE/debs/${f##*/}" ] && { ln "$f" "$CACHE/debs/" 2>/dev/null || cp "$f" "$CACHE/debs/"; }
    done
    rm -f "$root"/var/cache/apt/archives/*.deb
}

# base tree + apt-get install STACK -> $CACHE/trees/SUITE-STACK-KEY
ensure_stack() {  # $1 suite $2 stack -> prints tree dir
    local suite=$1 stack=$2 base key dir tmp pkgs f
    base=$(ensure_base "$suite")
    pkgs=$(stack_packages "$stack")
    [ -n "$pkgs" ] || { echo "$base"; return; }
    key=$(stack_key "$suite" "$stack")
    dir="$CACHE/trees/$suite-$stack-$key"
    if [ ! -d "$dir" ]; then
        local t0=$SECONDS
        tmp="$WORK/stack-$suite-$stack"
        rm -rf "$tmp"
        log "installing the $stack stack on $suite: $pkgs"
        cp -a "$base" "$tmp"
        apt_in_tree "$tmp" "stack-$suite-$stack" "install $pkgs"
        mv "$tmp" "$dir"
        log "stack tree $suite-$stack ready in $((SECONDS - t0)) s"
    fi
    echo "$dir"
}

# leave the tree as clean as a distribution cloud image
clean_tree() {    # $1 root
    local r=$1
    rm -f "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin
    rm -rf "$r"/var/cache/apt/archives/partial/*
    rm -rf "$r"/var/lib/apt/lists/*
    mkdir -p "$r/var/lib/apt/lists/partial"
    find "$r/var/log" -type f -delete                     # keep the directories daemons expect
    find "$r/tmp" "$r/var/tmp" "$r/run" "$r/dev" -mindepth 1 -delete
    : >"$r/etc/machine-id"
    rm -f "$r/var/lib/dbus/machine-id" "$r"/etc/ssh/ssh_host_*
    rm -f "$r/usr/sbin/policy-rc.d" "$r/var/cache/ldconfig/aux-cache"
    rm -f "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
    rm -f "$r/var/lib/systemd/random-seed" "$r/root/.bash_history"
    rm -rf "$r/root/.cache"
    : >"$r/etc/resolv.conf"
}

uuid_from() {     # deterministic RFC 4122-shaped UUID from a string
    local h; h=$(printf '%s' "$1" | sha)
    printf '%s-%s-4%s-%x%s-%s\n' "${h:0:8}" "${h:8:4}" "${h:13:3}" $(( (0x${h:16:1} & 3) | 8 )) "${h:17:3}" "${h:20:12}"
}

pg_load() {       # $1 root $2 seed dir inside the root $3 image name
    local r=$1 seeddir=$2 name=$3 pgver f db plog
    pgver=$(ls "$r/usr/lib/postgresql" | sort -V | tail -n 1)
    [ -n "$pgver" ] || die "PGLOAD but no PostgreSQL in the tree"
    chroot_ns "$r" chown -R postgres:postgres "$seeddir"
    for f in "$r$seeddir"/[0-9][0-9]-*.sql; do
        db=${f##*/}; db=${db#??-}; db=${db%.sql}
        plog="$CACHE/logs/pgload-$name-${f##*/}.log"
        log "  loading ${f##*/} into PostgreSQL $pgver database '$db' (postgres --single)"
        chroot_ns "$r" /usr/sbin/runuser -u postgres -- \
            "/usr/lib/postgresql/$pgver/bin/postgres" --single \
            -D "/var/lib/postgresql/$pgver/main" -c "config_file=/etc/postgresql/$pgver/main/postgresql.conf" \
            -c dynamic_shared_memory_type=mmap "$db" <"$f" >"$plog" 2>&1 \
            || { tail -n 30 "$plog" >&2; die "postgres --single failed (log: $plog)"; }
        if grep -E '(ERROR|FATAL|PANIC):' "$plog" >&2; then
            die "SQL errors while loading $f (log: $plog)"
        fi
    done
    rm -rf "${r:?}$seeddir"
}

run_actions() {    # $1 root $2 image name $3 actions file (gen_data.py's or activity.py's)
    local root=$1 name=$2 action arg
    while read -r action arg; do
        case "$action" in
            CHOWN) chroot_ns "$root" chown -R ${arg} ;;
            CHOWNFILES) set -- ${arg}; chroot_ns "$root" find "$2" -type f -exec chown "$1" {} + ;;
            PGLOAD) pg_load "$root" "$arg" "$name" ;;
            "") ;;
            *) die "unknown generator action: $action" ;;
        esac
    done <"$3"
}

# the chroot steps may have left logs/pids; clean again ($2: more logs to keep)
clean_after_chroot() {  # $1 root [$2 find expression of kept logs]
    local r=$1
    find "$r/var/log" -type f ! -path "*/nginx/*" ! -path "*/ledgerline/*" ${2:-} -delete
    find "$r/tmp" "$r/var/tmp" "$r/run" "$r/dev" -mindepth 1 -delete
    rm -f "$r/usr/sbin/policy-rc.d"
}

make_root() {     # name suite stack kind seed uuid -> the image's file tree in $WORK/img-NAME
    local name=$1 suite=$2 stack=$3 kind=$4 seed=$5 uuid=$6 tree root
    tree=$(ensure_stack "$suite" "$stack")
    log "image $name: copying tree, generating data ($kind, seed $seed, scale $DATA_SCALE)"
    root="$WORK/img-$name"
    rm -rf "$root"
    cp -a "$tree" "$root"
    clean_tree "$root"
    printf '# /etc/fstab: static file system information.\nUUID=%s\t/\text4\trw,discard,errors=remount-ro\t0\t1\n' "$uuid" >"$root/etc/fstab"
    "$PYTHON" "$GENERATOR" "$kind" --root "$root" --seed "$seed" --scale "$DATA_SCALE" --name "$name" \
        >"$WORK/actions-$name" 2>"$CACHE/logs/gen-$name.log" \
        || { cat "$CACHE/logs/gen-$name.log" >&2; die "data generator failed for $name"; }
    run_actions "$root" "$name" "$WORK/actions-$name"
    clean_after_chroot "$root"
}

# The parent image's files (debugfs rdump: no mount), then days of activity and upgrades.
make_later_root() {  # name suite stack seed -> $WORK/img-NAME
    local name=$1 suite=$2 stack=$3 seed=$4 parent pkind root tree f mode path
    parent=$(parent_of "$name")
    IFS='|' read -r _ _ _ pkind _ _ _ <<<"$(image_line "$parent")"
    root="$WORK/img-$name"
    rm -rf "$root"
    mkdir -p "$root"
    log "image $name: the files of $parent (debugfs rdump), then $LATER_DAYS days of activity"
    run_logged "$CACHE/logs/rdump-$name.log" debugfs -R "rdump / $root" "$OUT/$parent.raw"
    # rdump sets the mode before the owner, and chown drops set-uid/set-gid bits: restore
    # them from the tree the parent was made from
    tree=$(ensure_stack "$suite" "$stack")
    (cd "$tree" && find . -type f -perm /6000 -printf '%m %p\n') | while read -r mode path; do
        [ -f "$root/$path" ] && chmod "$mode" "$root/$path"
    done
    "$PYTHON" "$ACTIVITY" "$pkind" --root "$root" --seed "$seed" --scale "$DATA_SCALE" --days "$LATER_DAYS" \
        >"$WORK/actions-$name" 2>"$CACHE/logs/activity-$name.log" \
        || { cat "$CACHE/logs/activity-$name.log" >&2; die "activity.py failed for $name"; }
    # the parent's /dev was emptied; apt and maintainer scripts need these
    mknod -m 666 "$root/dev/null" c 1 3; mknod -m 666 "$root/dev/zero" c 1 5
    mknod -m 666 "$root/dev/random" c 1 8; mknod -m 666 "$root/dev/urandom" c 1 9
    run_actions "$root" "$name" "$WORK/actions-$name"
    # what an admin does on such a VM in those days: upgrades from -updates and -security
    # (upgrade, not dist-upgrade: a kernel with a new ABI is a new package and waits)
    local sec=${NBD_CAS_SECURITY_MIRROR:-${MIRROR%/debian}/debian-security}
    printf 'deb %s %s-updates main\ndeb %s %s-security main\n' "$MIRROR" "$suite" "$sec" "$suite" \
        >"$root/etc/apt/sources.list.d/updates.list"
    apt_in_tree "$root" "upgrade-$name" upgrade
    UPGRADED=$(grep -c ' upgrade ' "$root/var/log/dpkg.log" 2>/dev/null || true)
    log "image $name: $UPGRADED package(s) upgraded: $(awk '$3 == "upgrade" {print $4}' "$root/var/log/dpkg.log" 2>/dev/null | cut -d: -f1 | tr '\n' ' ')"
    rm -f "$root"/var/cache/apt/*.bin
    rm -rf "$root"/var/cache/apt/archives/partial/* "$root"/var/lib/apt/lists/*
    mkdir -p "$root/var/lib/apt/lists/partial"
    : >"$root/etc/resolv.conf"
    # dpkg's and apt's logs of those upgrades stay, as on the VM
    clean_after_chroot "$root" '! -name dpkg.log ! -path */apt/*'
}

build_image() {   # name suite stack kind seed role desc
    local name=$1 suite=$2 stack=$3 kind=$4 seed=$5 role=$6 desc=$7
    local t0=$SECONDS h root uuid tmpimg t1
    h=$(recipe_hash "$name" "$suite" "$stack" "$kind" "$seed")
    UPGRADED=""
    if [ "$kind" = later ]; then
        local parent ph; parent=$(parent_of "$name")
        ph=$(later_recipe "$name" | sed -n 's/^parent_recipe=//p')
        [ "$(image_status "$parent" "$ph")" = up-to-date ] || die "$name is made from $parent, which is not built or stale: build $parent first (--only $parent,$name)"
        # the same VM: the parent's file system UUID
        uuid=$(uuid_from "$parent/$ph")
        t1=$SECONDS
        make_later_root "$name" "$suite" "$stack" "$seed"
    else
        uuid=$(uuid_from "$name/$h")
        ensure_stack "$suite" "$stack" >/dev/null
        t1=$SECONDS
        make_root "$name" "$suite" "$stack" "$kind" "$seed" "$uuid"
    fi
    root="$WORK/img-$name"

    log "image $name: mke2fs -t ext4 -d ($(du -sh "$root" | cut -f1) of files) into $SIZE bytes"
    tmpimg="$OUT/.$name.raw.tmp.$$"
    rm -f "$tmpimg"
    truncate -s "$SIZE" "$tmpimg"
    run_logged "$CACHE/logs/mke2fs-$name.log" \
        mke2fs -F -t ext4 -b 4096 -I 256 -L rootfs -U "$uuid" \
        -E "root_owner=0:0,hash_seed=$uuid,lazy_itable_init=1,lazy_journal_init=1" \
        -d "$root" "$tmpimg"
    run_logged "$CACHE/logs/e2fsck-$name.log" e2fsck -fn "$tmpimg"
    local digest apparent allocated
    digest=$(file_sha "$tmpimg")
    apparent=$(stat -c %s "$tmpimg")
    allocated=$(( $(stat -c %b "$tmpimg") * $(stat -c %B "$tmpimg") ))
    rm -rf "$root"
    mv -f "$tmpimg" "$OUT/$name.raw"
    RECIPE="$(recipe_text "$name" "$suite" "$stack" "$kind" "$seed")" \
    NAME=$name SUITE=$suite STACK=$stack KIND=$kind SEED=$seed ROLE=$role DESC=$desc \
    HASH=$h DIGEST=$digest APPARENT=$apparent ALLOCATED=$allocated UUID=$uuid \
    SECS=$((SECONDS - t0)) DATA_SECS=$((SECONDS - t1)) SCALE=$SCALE UPGRADED="$UPGRADED" PKGS="$(stack_packages "$stack")" \
    BASE_PACKAGES=$BASE_PACKAGES MIRROR=$MIRROR OUTF="$OUT/.$name.json.tmp" RAW="$OUT/$name.raw" \
    "$PYTHON" - <<'EOF'
import json, os, time
e = os.environ
meta = {
    "name": e["NAME"], "path": e["RAW"], "scale": e["SCALE"], "role": e["ROLE"],
    "description": e["DESC"],
    "size_bytes": int(e["APPARENT"]), "allocated_bytes": int(e["ALLOCATED"]),
    "sha256": e["DIGEST"], "recipe_hash": e["HASH"],
    "recipe": {
        "suite": e["SUITE"], "variant": "minbase",
        "base_packages": e["BASE_PACKAGES"].split(","),
        "stack": e["STACK"], "stack_packages": e["PKGS"].split(),
        "data": {"kind": e["KIND"], "seed": int(e["SEED"])},
        "text": e["RECIPE"],
    },
    "filesystem": {"type": "ext4", "uuid": e["UUID"], "block_size": 4096, "partition_table": None},
    "mirror": e["MIRROR"],
    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "build_seconds": int(e["SECS"]), "image_seconds": int(e["DATA_SECS"]),
}
if e["UPGRADED"]:
    meta["packages_upgraded"] = int(e["UPGRADED"])
with open(e["OUTF"], "w") as f:
    json.dump(meta, f, indent=2)
    f.write("\n")
EOF
    mv -f "$OUT/.$name.json.tmp" "$OUT/$name.json"
    log "image $name done in $((SECONDS - t0)) s ($((SECONDS - t1)) s after the trees): $OUT/$name.raw"
}

write_manifests() {
    CACHE="$CACHE" SCRIPT_VERSION=$SCRIPT_VERSION NAMES="$ALL_NAMES" "$PYTHON" - <<'EOF'
import glob, json, os
cache = os.environ["CACHE"]
names = os.environ["NAMES"].split()
allscales = {}
for scale in ("small", "large"):
    d = os.path.join(cache, scale)
    images = {}
    for n in names:
        raw, meta = os.path.join(d, n + ".raw"), os.path.join(d, n + ".json")
        if os.path.isfile(raw) and os.path.isfile(meta):
            with open(meta) as f:
                images[n] = json.load(f)
    if not os.path.isdir(d):
        continue
    m = {"format": 1, "script_version": int(os.environ["SCRIPT_VERSION"]), "scale": scale, "dir": d, "images": images}
    tmp = os.path.join(d, ".manifest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(m, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(d, "manifest.json"))
    allscales[scale] = m
tmp = os.path.join(cache, ".manifest.json.tmp")
with open(tmp, "w") as f:
    json.dump({"format": 1, "cache_dir": cache, "scales": allscales}, f, indent=2)
    f.write("\n")
os.replace(tmp, os.path.join(cache, "manifest.json"))
EOF
}

# ------------------------------------------------------------------ main
if [ ${#TODO[@]} -gt 0 ]; then
    mkdir -p "$CACHE/logs"
    exec 9>"$CACHE/.lock"
    if ! flock -n 9; then
        log "another build.sh holds $CACHE/.lock; waiting"
        flock 9
    fi
    # an interrupted run may have left a work directory: start afresh
    rm -rf --one-file-system "$WORK"
    mkdir -p "$WORK"
    rm -f "$OUT"/.*.tmp.* "$OUT"/.*.json.tmp
    trap cleanup_work EXIT
    trap 'exit 130' INT TERM
    MIRROR=$(detect_mirror)
    log "mirror: $MIRROR; cache: $CACHE; scale: $SCALE ($SIZE-byte images, data scale $DATA_SCALE)"
    log "to build: ${TODO[*]}"
    T_ALL=$SECONDS
    while IFS='|' read -r name suite stack kind seed role desc; do
        selected "$name" || continue
        h=$(recipe_hash "$name" "$suite" "$stack" "$kind" "$seed")
        # re-check: another build may have made it while we waited for the lock
        [ "$(image_status "$name" "$h")" = up-to-date ] && continue
        build_image "$name" "$suite" "$stack" "$kind" "$seed" "$role" "$desc"
    done <<<"$IMAGES"
    log "built ${#TODO[@]} image(s) in $((SECONDS - T_ALL)) s"
fi
if [ -w "$CACHE" ]; then write_manifests; fi

echo "images ($SCALE) in $OUT:"
while IFS='|' read -r name suite stack kind seed role desc; do
    selected "$name" || continue
    echo "  $OUT/$name.raw"
done <<<"$IMAGES"
echo "manifest: $OUT/manifest.json (all scales: $CACHE/manifest.json)"
