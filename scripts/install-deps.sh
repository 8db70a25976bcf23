#!/usr/bin/env bash
# Installs the system packages the project builds and tests with (Debian/Ubuntu, as root or
# with sudo). Idempotent and quick when everything is present.
set -euo pipefail

packages=(
  libclang-dev     # bindgen, for RocksDB's C API bindings
  librocksdb-dev   # RocksDB 7.8, linked instead of compiling the bundled C++ (see README)
  pkg-config
  qemu-utils       # qemu-img, qemu-io, qemu-nbd: real NBD clients and the peer server
  libnbd-bin       # nbdinfo, nbdcopy
  python3-libnbd   # nbdsh
  fio              # has ioengine=nbd
  nbdkit           # proxy and fault injection in front of a server
  debootstrap      # test-images/
  e2fsprogs        # mke2fs -d, test-images/
  rsync zstd       # peers and compression reference in the benchmark
  iproute2         # network namespaces for the emulated WAN
  librados-dev     # cas-rados links librados (Ceph 16)
  ceph-mon ceph-osd ceph-common  # scripts/ceph-cluster.sh: the throwaway one-node cluster
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=sudo
fi
echo "install-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
