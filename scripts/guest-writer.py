#!/usr/bin/python3
"""A guest that keeps writing to its disk while the disk migrates.

Writes random 4 KiB blocks (some compressible, some not) to the source export, mirrors every
acknowledged write into a local file, follows the disk to the destination export at the
switch-over (a frozen export holds writes; once the disk has moved, the source answers
ESHUTDOWN and the guest reconnects to the destination), writes a
few more there, flushes, and exits. At the end the destination must equal the mirror.

Runs with Debian's python3-libnbd: /usr/bin/python3 scripts/guest-writer.py ...
"""

import argparse
import errno
import json
import os
import random
import sys
import time

import nbd


def connect(uri, deadline):
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            if not h.is_read_only():
                return h
            h.shutdown()
        except nbd.Error:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("guest-writer: %s did not become available" % uri)
        time.sleep(0.01)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True, help="NBD URI of the disk at the source")
    ap.add_argument("--dest", required=True, help="NBD URI of the disk at the destination")
    ap.add_argument("--mirror", required=True, help="a copy of the disk's content before the writes")
    ap.add_argument("--after-switch", type=int, default=50, help="writes to make at the destination")
    ap.add_argument("--interval", type=float, default=0.002, help="seconds between writes")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--stats", help="write a JSON summary here")
    args = ap.parse_args()

    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.timeout
    mirror = open(args.mirror, "r+b")
    h = connect(args.source, deadline)
    size = h.get_size()
    blocks = size // 4096
    at_source = at_dest = refused = 0
    switched_at = None
    longest_pause = 0.0
    pending = None
    last_ok = time.monotonic()
    # The switch-over as the guest lived it, in ms after its last write at the source: the
    # first refusal (frozen), the source letting go, the destination connected, the first
    # write there acknowledged.
    switch_trace = {}
    last_at_source = None
    while True:
        if pending is None:
            off = rng.randrange(blocks) * 4096
            if rng.random() < 0.5:
                data = bytes([rng.randrange(256)]) * 2048 + rng.randbytes(2048)
            else:
                data = rng.randbytes(4096)
            pending = (off, data)
        off, data = pending
        try:
            h.pwrite(data, off)
        except nbd.Error as e:
            if switched_at is None and e.errno == errno.EPERM:
                # A server that refuses writes while frozen (older behaviour): the write was
                # not done; try again shortly.
                if refused == 0 and last_at_source is not None:
                    switch_trace["first_refused_ms"] = round((time.monotonic() - last_at_source) * 1000, 1)
                refused += 1
                time.sleep(0.001)
                continue
            if switched_at is None:
                # The source let go of the disk: follow it to the destination.
                if last_at_source is not None:
                    switch_trace["source_gone_ms"] = round((time.monotonic() - last_at_source) * 1000, 1)
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
                h = connect(args.dest, deadline)
                switched_at = time.monotonic()
                if last_at_source is not None:
                    switch_trace["dest_connected_ms"] = round((switched_at - last_at_source) * 1000, 1)
                continue
            raise
        now = time.monotonic()
        longest_pause = max(longest_pause, now - last_ok)
        last_ok = now
        mirror.seek(off)
        mirror.write(data)
        pending = None
        if switched_at is None:
            at_source += 1
            last_at_source = now
        else:
            if at_dest == 0 and last_at_source is not None:
                switch_trace["first_dest_write_ms"] = round((now - last_at_source) * 1000, 1)
            at_dest += 1
            if at_dest >= args.after_switch:
                break
        if time.monotonic() > deadline:
            raise SystemExit("guest-writer: no switch-over before the timeout")
        time.sleep(args.interval)
    h.flush()
    h.shutdown()
    mirror.close()
    summary = {"writes_at_source": at_source, "writes_at_destination": at_dest,
               "refused_while_frozen": refused, "longest_pause_ms": round(longest_pause * 1000, 1),
               "switch_trace": switch_trace}
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump(summary, f)
    print("guest-writer: %s" % json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
