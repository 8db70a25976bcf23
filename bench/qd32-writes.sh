#!/usr/bin/env bash
# 4 KiB random writes of unique data at QD32 on a populated store, one server at a time, for
# A/B runs that alternate configurations within minutes (issue 13's QD32 rows): 2 GiB of
# unique data written into one disk with 1 MiB writes, 30 s of QD1 random writes into another,
# `sync`, then 15 s at QD32 over the Unix socket (the jobs seeded apart). Prints IOPS, the
# server's CPU per write and its minor faults per write (from /proc).
#
#   bench/qd32-writes.sh                     ours (the release build)
#   PEER=qemu bench/qd32-writes.sh           qemu-nbd on raw files
#   SERVER=/path/nbd-server EXTRA="--no-slot-reuse" bench/qd32-writes.sh
#   PRELOAD=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2 bench/qd32-writes.sh
#   PERF=1 (a perf profile of 10 s into $W/perf.data), PSTAT=1 (context switches)
# The experiment without an index (bench/experiments/no-index.patch) runs with
# CAS_NOINDEX=$W/noindex.raw in the environment.
set -e
BIN=${BIN:-${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}/release}
W=${W:-/var/tmp/nbd-cas-qd32}; rm -rf "$W"; mkdir -p "$W"
SOCK=$W/s.sock
cpu() { awk '{print $14+$15, $10}' /proc/$1/stat; }
if [ "$PEER" = qemu ]; then
  truncate -s 2G $W/a.raw; truncate -s 1600M $W/w.raw
  qemu-nbd -f raw -k $W/a.sock -x a --cache=writeback -t $W/a.raw & P1=$!
  qemu-nbd -f raw -k $SOCK -x w --cache=writeback -t $W/w.raw & PID=$!
  sleep 1; AURI="nbd+unix:///a?socket=$W/a.sock"
else
  env ${PRELOAD:+LD_PRELOAD=$PRELOAD} ${SERVER:-$BIN/nbd-server} --store $W/store --unix $SOCK --disk a:2G --disk w:1600M --compact-interval 0 $EXTRA > $W/out 2> $W/err & PID=$!
  for i in $(seq 50); do grep -q ready $W/out 2>/dev/null && break; sleep 0.2; done
  AURI="nbd+unix:///a?socket=$SOCK"
fi
URI="nbd+unix:///w?socket=$SOCK"
fio --name=fill --ioengine=nbd --uri=$AURI --rw=write --bs=1M --iodepth=4 --size=2G --refill_buffers --randseed=7 > /dev/null
fio --name=qd1 --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=1 --time_based --runtime=${QD1T:-30} --randseed=1001 > /dev/null
sync
read c0 f0 < <(cpu $PID)
if [ -n "$PERF" ]; then perf record -F 499 --call-graph dwarf,16384 -p $PID -o $W/perf.data -- sleep 10 > /dev/null 2>&1 & PP=$!; fi
if [ -n "$PSTAT" ]; then perf stat -e context-switches,cpu-migrations -p $PID -o $W/pstat.txt -- sleep 10 > /dev/null 2>&1 & PS=$!; fi
fio --name=qd32 --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=${QD32T:-15} --randseed=32004 --output-format=json --output=$W/f.json > /dev/null
read c1 f1 < <(cpu $PID)
[ -n "$PERF" ] && wait $PP
if [ -n "$PSTAT" ]; then wait $PS; grep -E "context|migr" $W/pstat.txt; fi
python3 - $c0 $c1 $f0 $f1 $W/f.json <<'PY'
import json,sys,os
c0,c1,f0,f1=map(float,sys.argv[1:5]); t=open(sys.argv[5]).read(); j=json.loads(t[t.index('{'):])['jobs'][0]['write']
n=j['total_ios']; tck=os.sysconf('SC_CLK_TCK')
print("iops %.0f  cpu %.1f us/write  minflt %.2f/write" % (j['iops'], (c1-c0)/tck*1e6/n, (f1-f0)/n))
PY
kill $PID ${P1:-} 2>/dev/null; wait 2>/dev/null
# keep a profile if one was taken
[ -n "$PERF" ] || rm -rf "$W"
