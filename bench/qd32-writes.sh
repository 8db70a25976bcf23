#!/usr/bin/env bash
# 4 KiB random writes of unique data at QD32 on a populated store, one server at a time, for
# A/B runs that alternate configurations within minutes (issue 13's QD32 rows): 2 GiB of
# unique data written into one disk with 1 MiB writes, 30 s of QD1 random writes into another,
# `sync`, then 15 s at QD32 over the Unix socket (the jobs seeded apart). Prints IOPS, the
# server's CPU per write and its minor faults per write (from /proc), and the whole machine's
# busy CPU per write (fio, the kernel's writeback and everything else included).
#
#   bench/qd32-writes.sh                     ours (the release build)
#   PEER=qemu bench/qd32-writes.sh           qemu-nbd on raw files
#   SERVER=/path/nbd-server EXTRA="--no-slot-reuse" bench/qd32-writes.sh
#   PRELOAD=/usr/lib/x86_64-linux-gnu/libmimalloc.so.2 bench/qd32-writes.sh
#   PERF=1 (a perf profile of 10 s into $W/perf.data), PSTAT=1 (context switches),
#   THREADS=1 (the server's CPU per write split by thread name)
# The experiment without an index (bench/experiments/no-index.patch) runs with
# CAS_NOINDEX=$W/noindex.raw in the environment.
set -e
BIN=${BIN:-${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}/release}
W=${W:-/var/tmp/nbd-cas-qd32}; rm -rf "$W"; mkdir -p "$W"
SOCK=$W/s.sock
cpu() { awk '{print $14+$15, $10}' /proc/$1/stat; }
# Per thread name (digits dropped): CPU ticks, for THREADS=1's split of the server's CPU.
threads() { for t in /proc/$1/task/*; do echo "$(tr -d '0-9 ' < $t/comm) $(sed 's/.*) //' $t/stat | awk '{print $12+$13}')"; done 2>/dev/null; }
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
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
b0=$(busy)
[ -n "$THREADS" ] && threads $PID > $W/threads0
if [ -n "$PERF" ]; then perf record -F 499 --call-graph dwarf,16384 -p $PID -o $W/perf.data -- sleep 10 > /dev/null 2>&1 & PP=$!; fi
if [ -n "$PSTAT" ]; then perf stat -e context-switches,cpu-migrations -p $PID -o $W/pstat.txt -- sleep 10 > /dev/null 2>&1 & PS=$!; fi
fio --name=qd32 --ioengine=nbd --uri=$URI --rw=randwrite --bs=4k --iodepth=32 --time_based --runtime=${QD32T:-15} --randseed=32004 --output-format=json --output=$W/f.json > /dev/null
read c1 f1 < <(cpu $PID)
b1=$(busy)
[ -n "$THREADS" ] && threads $PID > $W/threads1
[ -n "$PERF" ] && wait $PP
if [ -n "$PSTAT" ]; then wait $PS; grep -E "context|migr" $W/pstat.txt; fi
python3 - $c0 $c1 $f0 $f1 $W/f.json $b0 $b1 <<'PY'
import json,sys,os
c0,c1,f0,f1=map(float,sys.argv[1:5]); t=open(sys.argv[5]).read(); j=json.loads(t[t.index('{'):])['jobs'][0]['write']
b0,b1=map(float,sys.argv[6:8])
n=j['total_ios']; tck=os.sysconf('SC_CLK_TCK')
print("iops %.0f  cpu %.1f us/write  minflt %.2f/write  machine %.1f us/write" % (j['iops'], (c1-c0)/tck*1e6/n, (f1-f0)/n, (b1-b0)/tck*1e6/n))
d=os.path.dirname(sys.argv[5])
if os.path.exists(d+'/threads1'):
    def load(f):
        out={}
        for line in open(f):
            name,_,ticks=line.rpartition(' ')
            out[name]=out.get(name,0)+int(ticks)
        return out
    a,b=load(d+'/threads0'),load(d+'/threads1')
    for name in sorted(b,key=lambda k:-(b[k]-a.get(k,0))):
        us=(b[name]-a.get(name,0))/tck*1e6/n
        if us>=0.05: print("  %-20s %5.1f us/write" % (name,us))
PY
kill $PID ${P1:-} 2>/dev/null; wait 2>/dev/null
# keep a profile if one was taken
[ -n "$PERF" ] || rm -rf "$W"
