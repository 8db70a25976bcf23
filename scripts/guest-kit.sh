#!/usr/bin/env bash
# Builds the test guest: a Debian kernel and a busybox initramfs whose /init runs one job and
# reports it on the serial console (tools/tests/vm_*.rs boot it under QEMU with -accel tcg).
#
#   scripts/guest-kit.sh [OUTDIR]     prints the kit's directory (vmlinuz, initramfs.cpio.gz)
#
# OUTDIR defaults to ${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}/guest. The kit lands in
# OUTDIR/<hash of this script>: it is rebuilt only when this script changes (the /init below is
# part of it), and a run with an up-to-date kit only prints its path. Concurrent runs (tests
# in parallel) wait for each other on a lock.
#
# Inputs, all from Debian packages: linux-image-cloud-amd64's kernel and modules,
# busybox-static, nbd-client and the libnl it links (downloaded with `apt-get download` and
# unpacked with `dpkg-deb -x`, never installed), and the host's e2fsprogs (mke2fs, e2fsck)
# with their shared libraries. Needs network access to the Debian mirror on the first run,
# cpio and e2fsprogs (scripts/install-deps.sh).
#
# The guest's job comes from the kernel command line:
#   guest.mode=writer [guest.files=N]
#       /dev/vda (virtio-blk) holds an ext4 filesystem. Writes 64 KiB files, each with content
#       derived from its sequence number and fsync'ed before the next, cycling over N slots
#       (default 1024), until a line `stop` arrives on ttyS1; then remounts with cold caches,
#       verifies the newest generation of every slot, unmounts and powers off.
#   guest.mode=nbd-client guest.server=IP guest.port=N guest.export=NAME
#       The Xen path: user-mode network (10.0.2.15/24, gateway 10.0.2.2 = the host's
#       loopback), Debian's nbd-client attaches /dev/nbd0, then mkfs.ext4, mount, a file
#       written and read back with O_DIRECT, umount, e2fsck -fn, nbd-client -d.
# Marker lines on the console (ttyS0): GUEST READY, GUEST PROGRESS n, GUEST VERIFY OK n,
# GUEST VERIFY FAIL ..., GUEST DONE, GUEST OK ..., GUEST FAIL .... The guest powers off after
# DONE, OK or FAIL (boot with -no-reboot and panic=-1 so a crash ends QEMU too).
set -euo pipefail

script=$(readlink -f "$0")
out=${1:-${NBD_CAS_IMAGES:-/var/tmp/nbd-cas-images}/guest}
key=$(sha256sum "$script" | cut -c1-16)
kit=$out/$key

log() { echo "guest-kit: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if [ -s "$kit/vmlinuz" ] && [ -s "$kit/initramfs.cpio.gz" ]; then
  echo "$kit"
  exit 0
fi

for tool in apt-get dpkg-deb cpio gzip ldd /sbin/mke2fs /sbin/e2fsck; do
  command -v "$tool" >/dev/null || die "$tool not found (scripts/install-deps.sh installs cpio and e2fsprogs)"
done

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building the test guest in $kit (first run, or this script changed)"

# --- packages --------------------------------------------------------------------------------
# linux-image-cloud-amd64 is a metapackage; its Depends names the versioned kernel package.
mkdir -p "$work/debs" "$work/x"
download() {
  kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)
  [ -n "$kpkg" ] || { echo "apt-cache does not know linux-image-cloud-amd64" >"$work/download.log"; return 1; }
  (cd "$work/debs" && apt-get download "$kpkg" busybox-static nbd-client libnl-3-200 libnl-genl-3-200 >/dev/null 2>"$work/download.log")
}
if ! download; then
  # Stale package lists name versions the mirror no longer has: refresh them once (as root).
  [ "$(id -u)" -eq 0 ] && apt-get update -qq >/dev/null 2>&1 && download ||
    die "apt-get download failed: $(tail -3 "$work/download.log")"
fi
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/x"
done
x=$work/x
kver=$(basename "$(ls -d "$x"/lib/modules/*/ | head -1)")
[ -s "$x/boot/vmlinuz-$kver" ] || die "no vmlinuz-$kver in $kpkg"

# --- the initramfs tree ----------------------------------------------------------------------
r=$work/root
mkdir -p "$r"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,run,lib64,lib/modules/"$kver"}
cp "$x/bin/busybox" "$r/bin/busybox"
for applet in $("$r/bin/busybox" --list); do
  [ -e "$r/bin/$applet" ] || ln -s busybox "$r/bin/$applet"
done

# Modules: what the guest needs that this kernel builds as modules (ext4, jbd2, crc16 and
# crc32c are built in here; the loop below would pull them in otherwise). Dependencies come
# from modules.dep (busybox depmod: the .deb ships none), in load order.
mkdir -p "$work/m/lib"
cp -a "$x/lib/modules" "$work/m/lib/"
"$r/bin/busybox" depmod -b "$work/m" "$kver"
dep=$work/m/lib/modules/$kver/modules.dep
order=()
add_module() {
  local path=$1 d
  case " ${order[*]-} " in *" $path "*) return ;; esac
  for d in $(sed -n "s|^$path: *||p" "$dep"); do
    add_module "$d"
  done
  order+=("$path")
}
for m in virtio_pci virtio_blk virtio_net nbd ext4 jbd2 mbcache crc16 crc32c_generic; do
  if grep -qE "/$m\.ko$" "$x/lib/modules/$kver/modules.builtin"; then
    continue
  fi
  path=$(grep -oE "^[^:]*/$m\.ko" "$dep" | head -1) || true
  [ -n "$path" ] || die "module $m is neither built in nor in modules.dep of $kver"
  add_module "$path"
done
: >"$r/etc/modules"
for path in "${order[@]}"; do
  cp "$x/lib/modules/$kver/$path" "$r/lib/modules/$kver/"
  basename "$path" >>"$r/etc/modules"
done

# Binaries with their libraries (ldd; nbd-client's libnl from the downloaded packages).
cp "$x/sbin/nbd-client" "$r/sbin/"
cp /sbin/mke2fs /sbin/e2fsck "$r/sbin/"
ln -s mke2fs "$r/sbin/mkfs.ext4"
cp /etc/mke2fs.conf "$r/etc/" 2>/dev/null || true
libpath="$x/lib/x86_64-linux-gnu:$x/usr/lib/x86_64-linux-gnu"
for bin in "$r/sbin/nbd-client" "$r/sbin/mke2fs" "$r/sbin/e2fsck"; do
  libs=$(LD_LIBRARY_PATH=$libpath ldd "$bin") || die "ldd $bin failed"
  if grep -q "not found" <<<"$libs"; then
    die "$(basename "$bin") needs libraries that are neither on this host nor in the downloaded packages: $(grep "not found" <<<"$libs" | tr -s ' \t\n' ' ')"
  fi
  for lib in $(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$libs"); do
    case "$lib" in
      "$x"/*) dest=/lib/x86_64-linux-gnu/$(basename "$lib") ;;
      */ld-linux-x86-64.so.2) dest=/lib64/ld-linux-x86-64.so.2 ;;
      *) dest=/lib/x86_64-linux-gnu/$(basename "$lib") ;;
    esac
    mkdir -p "$r$(dirname "$dest")"
    [ -e "$r$dest" ] || cp -L "$lib" "$r$dest"
  done
done
ln -s /proc/mounts "$r/etc/mtab" # e2fsck checks whether the device is mounted
# The binaries must find their libraries inside the initramfs (no ld.so.cache there).
if [ "$(id -u)" -eq 0 ]; then
  for bin in "nbd-client --help" "mke2fs -V" "e2fsck -V"; do
    chroot "$r" /sbin/$bin >/dev/null 2>&1 || [ $? -ne 127 ] || die "/sbin/$bin does not run inside the initramfs"
  done
fi

cat >"$r/init" <<'INIT'
#!/bin/sh
# The test guest's init (scripts/guest-kit.sh). Markers go to the console, ttyS0.
export PATH=/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
# The kernel found no /dev/console in the initramfs before devtmpfs was mounted.
exec </dev/console >/dev/console 2>&1

say() { echo "$*"; }
off() { sync; sleep 1; poweroff -f; sleep 10; }
fail() {
  say "GUEST FAIL $*"
  dmesg | tail -n 15 | sed 's/^/guest dmesg: /'
  off
}
# Kernel messages that mean the disk failed us, whatever the command in progress said.
io_errors() { dmesg | grep -E 'I/O error|EXT4-fs error|EXT4-fs warning|Buffer I/O|blk_update_request|critical medium|Remounting filesystem read-only|nbd[0-9]*: (Receive|Send|Connection|Dead|Other side)' | head -n 3; }
check_dmesg() {
  errs=$(io_errors)
  [ -z "$errs" ] || fail "kernel: $errs"
}

arg() { # value of guest.$1 on the kernel command line, or $2
  v=$(tr ' ' '\n' </proc/cmdline | sed -n "s/^guest\.$1=//p" | tail -n 1)
  echo "${v:-$2}"
}

while read -r m; do
  insmod "/lib/modules/$(uname -r)/$m" || fail "insmod $m"
done </etc/modules
mode=$(arg mode none)
say "GUEST READY mode=$mode kernel=$(uname -r)"

wait_dev() { # wait_dev DEV SECONDS
  i=0
  while [ ! -b "$1" ]; do
    i=$((i + 1))
    [ "$i" -le $(($2 * 10)) ] || fail "no $1"
    usleep 100000
  done
}

# Content of generation $1 of a writer file: 64 KiB that only that generation has.
gen() { yes "guest-writer generation $1 0123456789abcdefghijklmnopqrstuvwxyz" | head -c 65536; }

writer() {
  files=$(arg files 1024)
  wait_dev /dev/vda 30
  mount -t ext4 /dev/vda /mnt || fail "mount /dev/vda"
  mkdir -p /mnt/w || fail "mkdir"
  # Stop command: a line on ttyS1 (a unix socket on the host), read in the background.
  stty -F /dev/ttyS1 clocal -echo icanon 2>/dev/null
  (while read -r line; do [ "$line" = stop ] && { : >/tmp/stop; break; }; done </dev/ttyS1) &
  # Watch the kernel log while writing: an I/O error fails the run at once.
  (while [ ! -e /tmp/stop ]; do check_dmesg; sleep 1; done) &
  n=0
  while [ ! -e /tmp/stop ]; do
    n=$((n + 1))
    slot=$(((n - 1) % files))
    # conv=fsync: each file is durable (data and, ext4 journalling the new entry in the same
    # transaction, its name) before the next one starts.
    gen "$n" | dd of="/mnt/w/$slot" bs=65536 iflag=fullblock conv=fsync status=none || fail "write $n (slot $slot)"
    [ $((n % 10)) -ne 0 ] || say "GUEST PROGRESS $n"
  done
  say "GUEST STOPPING after $n writes"
  check_dmesg
  # Verify what is on the disk, not what the page cache (migrated with the RAM) holds.
  sync
  umount /mnt || fail "umount before verify"
  echo 3 >/proc/sys/vm/drop_caches
  mount -t ext4 /dev/vda /mnt || fail "remount /dev/vda"
  bad=0
  checked=0
  s=0
  while [ "$s" -lt "$files" ] && [ "$s" -lt "$n" ]; do
    k=$((s + 1 + files * ((n - 1 - s) / files))) # newest generation written to slot s
    want=$(gen "$k" | md5sum | cut -d' ' -f1)
    have=$(md5sum <"/mnt/w/$s" | cut -d' ' -f1) || fail "read slot $s"
    if [ "$want" != "$have" ]; then
      bad=$((bad + 1))
      [ "$bad" -gt 5 ] || say "GUEST VERIFY FAIL slot $s generation $k: md5 $have, expected $want"
    fi
    checked=$((checked + 1))
    s=$((s + 1))
  done
  check_dmesg
  [ "$bad" -eq 0 ] || fail "verify: $bad of $checked files differ"
  say "GUEST VERIFY OK $checked files, $n writes"
  umount /mnt || fail "umount"
  sync
  check_dmesg
  say "GUEST DONE"
  off
}

nbd_client() {
  server=$(arg server 10.0.2.2)
  port=$(arg port 10809)
  export=$(arg export "")
  [ -n "$export" ] || fail "guest.export missing"
  ip link set lo up
  ip link set eth0 up || fail "no eth0"
  ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr"
  ip route add default via 10.0.2.2 || fail "ip route"
  wait_dev /dev/nbd0 10
  t0=$(cut -d' ' -f1 /proc/uptime)
  # As a Xen host attaches a VBD (xapi: nbd-client ... -timeout 60 -name EXPORT).
  nbd-client "$server" "$port" /dev/nbd0 -N "$export" -t 60 || fail "nbd-client connect"
  say "GUEST PROGRESS attached /dev/nbd0 ($(cat /sys/block/nbd0/size) sectors)"
  mkfs.ext4 -F -q /dev/nbd0 || fail "mkfs.ext4"
  mount -t ext4 /dev/nbd0 /mnt || fail "mount /dev/nbd0"
  dd if=/dev/urandom of=/tmp/src bs=1048576 count=8 iflag=fullblock status=none || fail "urandom"
  sum=$(md5sum </tmp/src | cut -d' ' -f1)
  dd if=/tmp/src of=/mnt/data bs=1048576 oflag=direct status=none || fail "O_DIRECT write"
  dd if=/mnt/data of=/tmp/back bs=1048576 iflag=direct status=none || fail "O_DIRECT read"
  back=$(md5sum </tmp/back | cut -d' ' -f1)
  [ "$sum" = "$back" ] || fail "O_DIRECT read back md5 $back, wrote $sum"
  sync
  umount /mnt || fail "umount"
  e2fsck -fn /dev/nbd0 >/tmp/fsck.log 2>&1 || { sed 's/^/guest e2fsck: /' /tmp/fsck.log; fail "e2fsck -fn /dev/nbd0"; }
  check_dmesg
  nbd-client -d /dev/nbd0 || fail "nbd-client -d"
  t1=$(cut -d' ' -f1 /proc/uptime)
  say "GUEST OK file=/data md5=$sum bytes=8388608 seconds=$(echo "$t0 $t1" | awk '{ printf "%.1f", $2 - $1 }')"
  off
}

case "$mode" in
  writer) writer ;;
  nbd-client) nbd_client ;;
  *) fail "unknown guest.mode=$mode" ;;
esac
INIT
chmod 755 "$r/init"

# --- output ----------------------------------------------------------------------------------
mkdir -p "$work/kit"
cp "$x/boot/vmlinuz-$kver" "$work/kit/vmlinuz"
(cd "$r" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) | gzip -6 >"$work/kit/initramfs.cpio.gz"
echo "$kpkg ($kver), $(cd "$work/debs" && ls | tr '\n' ' ')" >"$work/kit/PACKAGES"
rm -rf "$kit"
mv "$work/kit" "$kit"
# Kits of older versions of this script.
for old in "$out"/*/; do
  [ "${old%/}" = "$kit" ] || rm -rf "$old"
done
log "done: $(du -sh "$kit" | cut -f1) ($kpkg)"
echo "$kit"
