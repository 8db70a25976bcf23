#!/usr/bin/env bash
# What scraping /metrics costs the NBD data path (issue 16's target: under 1 %): fio 4 KiB
# random reads at QD32 over the Unix socket against one server, in runs that alternate
# without and with a scrape every second, reported as the ratio of the median rates.
# Usage: bench/metrics-cost.sh [pairs] [seconds per run]   (default 4 pairs of 10 s runs)
set -euo pipefail
pairs=${1:-4}
secs=${2:-10}
bin=${CARGO_TARGET_DIR:-/var/tmp/nbd-cas-target}/release
work=$(mktemp -d /var/tmp/nbd-cas-metrics.XXXXXX)
pid=
scraper=
cleanup() {
  [ -n "$scraper" ] && kill "$scraper" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
"$bin/nbd-server" --store st --unix nbd.sock --control ctl --disk vm:1G --metrics-listen 127.0.0.1:0 > out 2> log & pid=$!
for _ in $(seq 100); do grep -q '^ready' out 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^metrics on //p' out)
uri="nbd+unix:///vm?socket=$work/nbd.sock"
head -c 1G /dev/urandom > vm.raw
qemu-img convert -n -f raw -O raw vm.raw "$uri"
rm vm.raw
iops() {
  fio --name=r --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 --time_based --runtime="$secs" \
    --output-format=json --output=fio.json > /dev/null
  python3 -c "import json; print('%.0f' % json.load(open('fio.json'))['jobs'][0]['read']['iops'])"
}
scrape_loop() {
  python3 -c "
import time, urllib.request
while True:
    urllib.request.urlopen('$url').read()
    time.sleep(1)
" &
  scraper=$!
}
size=$(python3 -c "import urllib.request; print(len(urllib.request.urlopen('$url').read()))")
printf '%-6s %14s %14s\n' pair "IOPS, quiet" "IOPS, scraped"
off=()
on=()
for p in $(seq "$pairs"); do
  a=$(iops)
  scrape_loop
  b=$(iops)
  kill "$scraper"; wait "$scraper" 2>/dev/null || true; scraper=
  off+=("$a"); on+=("$b")
  printf '%-6s %14s %14s\n' "$p" "$a" "$b"
done
python3 - "${off[*]}" "${on[*]}" "$size" <<'PY'
import statistics, sys
off = [float(x) for x in sys.argv[1].split()]
on = [float(x) for x in sys.argv[2].split()]
m_off, m_on = statistics.median(off), statistics.median(on)
print(f"median IOPS quiet {m_off:.0f}, scraped every second {m_on:.0f}: ratio {m_on / m_off:.3f} "
      f"(scrape size {int(sys.argv[3])} bytes)")
PY
# The rates above move by several per cent between runs on a shared machine, so the cost is
# also measured directly: the server's CPU time (user + system, /proc) over 1000 scrapes in a
# row, as a share of one core at one scrape per second.
python3 - "$pid" "$url" <<'PY'
import os, sys, time, urllib.request
pid, url = sys.argv[1], sys.argv[2]
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
n = 1000
c0, t0 = cpu(), time.time()
for _ in range(n):
    urllib.request.urlopen(url).read()
c1, t1 = cpu(), time.time()
per = (c1 - c0) / n
print(f"server CPU per scrape {per * 1e6:.0f} us ({n} scrapes in {t1 - t0:.1f} s): "
      f"{per * 100:.3f} % of one core at one scrape per second")
PY
