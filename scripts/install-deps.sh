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
  python3-prometheus-client  # a real OpenMetrics parser for the scrapes of /metrics in tests
  systemd          # systemd-analyze verify on contrib/systemd
  iproute2         # network namespaces for the emulated WAN
  librados-dev     # cas-rados links librados (Ceph 16)
  ceph-mon ceph-osd ceph-common  # scripts/ceph-cluster.sh: the throwaway one-node cluster
  cpio             # scripts/guest-kit.sh: the test guests' initramfs (its other inputs are
                   # downloaded .debs, never installed here)
)

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

SUDO=""
need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: $*" >&2; return 1; }
    SUDO=sudo
  fi
}
export DEBIAN_FRONTEND=noninteractive

missing=()
for p in "${packages[@]}"; do
  installed "$p" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  need_root "${missing[@]}" || exit 1
  echo "install-deps: installing ${missing[*]}" >&2
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# qemu-system-x86 for the VM tests (tools/tests/vm_*.rs), at exactly the version of the installed
# qemu-utils: a different version drags in another qemu-system-common/qemu-block-extra and can
# remove qemu-utils. On these machines qemu-utils comes preinstalled from bookworm-backports
# while no backports source is configured, so one is added with the mirror and key of the
# existing Debian source. A failure here is not fatal: the VM tests then skip and say why
# (or fail, when NBD_CAS_REQUIRE_QEMU=1).
qemu_warn() {
  echo "install-deps: WARNING: qemu-system-x86 not installed: $*; the VM tests will skip (or fail under NBD_CAS_REQUIRE_QEMU=1)" >&2
}

# Writes a deb822 source for SUITE with the URIs and Signed-By of the stanza that carries the
# release itself (Suites: CODENAME) in /etc/apt/sources.list.d/debian.sources.
add_suite_source() {
  local suite=$1 codename=$2 src=/etc/apt/sources.list.d/debian.sources
  local out=/etc/apt/sources.list.d/nbd-cas-${suite}.sources
  [ -r "$src" ] || { echo "no $src to copy the mirror and key from" >&2; return 1; }
  local stanza
  stanza=$(awk -v cn="$codename" 'BEGIN { RS = ""; FS = "\n" }
    { for (i = 1; i <= NF; i++) if ($i ~ /^Suites:/) { n = split($i, w, /[ \t]+/); for (j = 2; j <= n; j++) if (w[j] == cn) { print; exit } } }' "$src")
  local uris signed
  uris=$(printf '%s\n' "$stanza" | sed -n 's/^URIs:[[:space:]]*//p' | head -1)
  signed=$(printf '%s\n' "$stanza" | sed -n 's/^Signed-By:[[:space:]]*//p' | head -1)
  [ -n "$uris" ] || { echo "no stanza with Suites: $codename in $src" >&2; return 1; }
  {
    echo "# Added by scripts/install-deps.sh: qemu-system-x86 at the version of the installed qemu-utils"
    echo "Types: deb"
    echo "URIs: $uris"
    echo "Suites: $suite"
    echo "Components: main"
    [ -z "$signed" ] || echo "Signed-By: $signed"
  } | $SUDO tee "$out" >/dev/null
  echo "install-deps: added $out ($uris $suite)" >&2
}

install_qemu_system() {
  local want have codename suite="" plan
  want=$(version qemu-utils)
  [ -n "$want" ] || { qemu_warn "qemu-utils is not installed"; return 0; }
  have=$(version qemu-system-x86)
  if installed qemu-system-x86 && [ "$have" = "$want" ]; then
    return 0
  fi
  need_root qemu-system-x86 || { qemu_warn "not root"; return 0; }
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  # A backports build of qemu-utils (~bpoNN): take qemu-system-x86 from the same suite.
  case "$want" in
    *~bpo*) suite="${codename}-backports" ;;
  esac
  if ! apt-cache madison qemu-system-x86 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$want"; then
    if [ -n "$suite" ] && ! grep -rqsw -- "$suite" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      add_suite_source "$suite" "$codename" || { qemu_warn "could not add a $suite source"; return 0; }
    fi
    echo "install-deps: apt-get update for qemu-system-x86 $want" >&2
    $SUDO apt-get update -qq || { qemu_warn "apt-get update failed"; return 0; }
  fi
  local target=()
  [ -z "$suite" ] || target=(-t "$suite")
  # Simulate first: the install must remove nothing (qemu-utils above all).
  if ! plan=$($SUDO apt-get install -s -y --no-install-recommends "${target[@]}" "qemu-system-x86=$want" 2>&1); then
    qemu_warn "apt cannot install qemu-system-x86=$want: $(printf '%s\n' "$plan" | tail -3 | tr '\n' ' ')"
    return 0
  fi
  if printf '%s\n' "$plan" | grep -q '^Remv '; then
    qemu_warn "installing it would remove: $(printf '%s\n' "$plan" | sed -n 's/^Remv \([^ ]*\).*/\1/p' | tr '\n' ' ')"
    return 0
  fi
  echo "install-deps: installing qemu-system-x86=$want ${target[*]}" >&2
  $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "qemu-system-x86=$want" >/dev/null ||
    { qemu_warn "apt-get install failed"; return 0; }
  installed qemu-utils && [ "$(version qemu-utils)" = "$want" ] || { echo "install-deps: qemu-utils changed or was removed" >&2; exit 1; }
  qemu-system-x86_64 --version | head -1 >&2
}
install_qemu_system
