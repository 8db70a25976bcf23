#!/usr/bin/env bash
# A throwaway one-node Ceph cluster on 127.0.0.1 for the RADOS block pool's tests and the
# benchmark: one monitor and one OSD on memstore (blocks live in the OSD's memory), pool size 1.
# No systemd, no block device, no manager daemon (nothing here needs one).
#
#   scripts/ceph-cluster.sh start  [DIR]   start it (idempotent: a running cluster is kept)
#   scripts/ceph-cluster.sh stop   [DIR]   stop its daemons and delete DIR: nothing is left running
#   scripts/ceph-cluster.sh status [DIR]   exit 0 if it is up and serves I/O
#   scripts/ceph-cluster.sh env    [DIR]   print the variables the tests read (eval "$(... env)")
#
# DIR defaults to $NBD_CAS_CEPH_DIR or /var/tmp/nbd-cas-ceph. The configuration file is
# DIR/ceph.conf (client.admin's key in DIR/keyring); the pool is $NBD_CAS_CEPH_POOL or nbd-cas.
# Ceph's ports are fixed (3300, 6789 for the monitor, 6800+ for the OSD): one such cluster per
# machine, which every checkout's tests share (each test works in its own RADOS namespace).
# Needs ceph-mon, ceph-osd and ceph-common (scripts/install-deps.sh installs them).
set -euo pipefail

cmd=${1:-}
DIR=${2:-${NBD_CAS_CEPH_DIR:-/var/tmp/nbd-cas-ceph}}
POOL=${NBD_CAS_CEPH_POOL:-nbd-cas}
CONF=$DIR/ceph.conf
# memstore keeps objects in RAM; this bounds what the OSD accepts (the benchmark's imports
# and the tests fit well inside).
MEMSTORE_BYTES=${NBD_CAS_CEPH_MEMSTORE_BYTES:-$((6 << 30))}

log() { echo "ceph-cluster: $*" >&2; }

pids() {
  local f
  for f in "$DIR"/run/*.pid; do
    [ -e "$f" ] || continue
    local p
    p=$(cat "$f" 2>/dev/null || true)
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null && echo "$p"
  done
  return 0
}

# The cluster serves I/O: a write and a read of a probe object in the pool, bounded in time.
probe() {
  [ -f "$CONF" ] || return 1
  local tmp rc=0
  tmp=$(mktemp)
  echo probe >"$tmp"
  timeout 10 rados -c "$CONF" --client_mount_timeout 5 --rados_osd_op_timeout 5 -p "$POOL" put cluster-probe "$tmp" >/dev/null 2>&1 || rc=1
  [ $rc -eq 0 ] && { timeout 10 rados -c "$CONF" --client_mount_timeout 5 --rados_osd_op_timeout 5 -p "$POOL" stat cluster-probe >/dev/null 2>&1 || rc=1; }
  rm -f "$tmp"
  return $rc
}

stop() {
  local p ps
  ps=$(pids)
  if [ -n "$ps" ]; then
    log "stopping daemons (pids $(echo $ps))"
    for p in $ps; do kill "$p" 2>/dev/null || true; done
    for _ in $(seq 1 100); do
      ps=$(pids)
      [ -z "$ps" ] && break
      sleep 0.1
    done
    for p in $ps; do
      log "daemon $p did not exit after 10 s: killing it"
      kill -9 "$p" 2>/dev/null || true
    done
    for _ in $(seq 1 50); do [ -z "$(pids)" ] && break; sleep 0.1; done
  fi
  if [ -n "$(pids)" ]; then
    log "daemons still running: $(pids)"
    return 1
  fi
  # The data lived in the OSD's memory; what is left on disk is configuration and logs.
  [ "$DIR" != / ] && rm -rf "$DIR"
  return 0
}

start() {
  trap 'log "failed at line $LINENO: $BASH_COMMAND (logs in $DIR/log)"' ERR
  if [ -n "$(pids)" ] && probe; then
    log "already running ($CONF, pool $POOL)"
    return 0
  fi
  stop >/dev/null 2>&1 || true
  for port in 3300 6789; do
    if ss -Htln "sport = :$port" 2>/dev/null | grep -q .; then
      log "port $port is taken by another process: another Ceph cluster on this machine? (ss -tlnp)"
      return 1
    fi
  done
  for tool in ceph-mon ceph-osd ceph ceph-authtool monmaptool rados; do
    command -v "$tool" >/dev/null || { log "$tool not found: run scripts/install-deps.sh"; return 1; }
  done
  local t0=$SECONDS
  mkdir -p "$DIR"/{run,log,mon.a,osd.0}
  local fsid osd_uuid
  fsid=$(cat /proc/sys/kernel/random/uuid)
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  cat >"$CONF" <<EOF
[global]
fsid = $fsid
mon initial members = a
mon host = [v2:127.0.0.1:3300,v1:127.0.0.1:6789]
public network = 127.0.0.0/8
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $DIR/keyring
run dir = $DIR/run
pid file = $DIR/run/\$name.pid
admin socket = $DIR/run/\$name.asok
log file = $DIR/log/\$name.log
mon data = $DIR/mon.\$id
osd data = $DIR/osd.\$id
osd objectstore = memstore
memstore device bytes = $MEMSTORE_BYTES
# Pages sized like the blocks (the default is 64 KiB).
memstore page size = 4096
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
paxos propose interval = 0.1
# Object classes: cas (chunk references) is what the block pool calls.
osd class load list = *
osd class default list = *
mon osd down out interval = 0
debug ms = 0/0

[osd]
keyring = $DIR/osd.\$id/keyring
EOF
  ceph-authtool --create-keyring "$DIR/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool "$DIR/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  monmaptool --create --fsid "$fsid" --addv a '[v2:127.0.0.1:3300,v1:127.0.0.1:6789]' "$DIR/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/keyring"
  ceph-mon -c "$CONF" -i a 2>>"$DIR/log/mon-start.log"
  local C=(ceph -c "$CONF" --connect-timeout 15)
  "${C[@]}" osd new "$osd_uuid" >/dev/null
  ceph-osd -c "$CONF" -i 0 --mkfs --mkkey --no-mon-config --osd-uuid "$osd_uuid" >"$DIR/log/mkfs.log" 2>&1
  "${C[@]}" auth add osd.0 osd 'allow *' mon 'allow profile osd' mgr 'allow profile osd' \
    -i "$DIR/osd.0/keyring" >/dev/null 2>&1
  ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd-start.log"
  "${C[@]}" osd pool create "$POOL" 32 32 >/dev/null 2>&1
  "${C[@]}" osd pool set "$POOL" size 1 --yes-i-really-mean-it >/dev/null 2>&1 || true
  "${C[@]}" osd pool application enable "$POOL" nbd-cas >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    if probe; then
      log "up in $((SECONDS - t0)) s: conf $CONF, pool $POOL"
      return 0
    fi
    sleep 0.5
  done
  log "the cluster did not serve I/O within 30 s; logs in $DIR/log"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  [ -n "${NBD_CAS_CEPH_KEEP_ON_FAILURE:-}" ] || stop || true
  return 1
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  status)
    if [ -n "$(pids)" ] && probe; then
      echo "running: conf $CONF, pool $POOL, pids $(echo $(pids))"
    else
      echo "not running"
      exit 1
    fi
    ;;
  env)
    echo "export NBD_CAS_CEPH_CONF=$CONF"
    echo "export NBD_CAS_CEPH_POOL=$POOL"
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
