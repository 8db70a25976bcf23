#!/usr/bin/python3
"""Moves a running VM live between two datacentres, disk and all (the demo's main act).

A QEMU guest (TCG; scripts/guest-kit.sh's kernel and initramfs, writer mode) runs at A with
its disk on server A's export. The disk migrates with `migrate --switch-after manual`; QEMU's
own migration runs to a QEMU started at B with `-incoming` on B's standby export, with the
capability pause-before-switchover; when QEMU reports `pre-switchover` (the VM is paused,
its drives drained and flushed), `migrate switch` moves the disk, then `migrate-continue`
lets QEMU finish. The guest keeps writing at B, then verifies everything it wrote.

The same sequence as tools/tests/vm_live.rs, for a person to watch. Standard library only.
"""

import argparse
import json
import os
import select
import socket
import subprocess
import sys
import time


def log(msg):
    print(msg, flush=True)


class Qmp:
    """QMP over a Unix socket: JSON lines, events kept until asked for."""

    def __init__(self, path, deadline=30):
        end = time.monotonic() + deadline
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.monotonic() > end:
                    raise SystemExit("live-vm: no QMP socket at %s" % path)
                time.sleep(0.05)
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self, timeout=None):
        """The next message, or None if none arrived within `timeout` seconds."""
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit("live-vm: QEMU closed its QMP socket")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def execute(self, cmd, **args):
        msg = {"execute": cmd}
        if args:
            msg["arguments"] = args
        self.sock.sendall((json.dumps(msg) + "\n").encode())
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
            elif "error" in r:
                raise SystemExit("live-vm: QMP %s failed: %s" % (cmd, r["error"]))
            elif "return" in r:
                return r["return"]

    def wait_migration(self, status, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for e in self.events:
                if e["event"] == "MIGRATION" and e["data"]["status"] in (status, "failed"):
                    self.events.remove(e)
                    if e["data"]["status"] == "failed":
                        raise SystemExit("live-vm: QEMU's migration failed")
                    return
            msg = self._read(timeout=1.0)
            if msg is not None and "event" in msg:
                self.events.append(msg)
        raise SystemExit("live-vm: QEMU's migration never reached %s" % status)


class Vm:
    def __init__(self, work, name, kit, socket_path, export, incoming=False):
        self.name = name
        self.serial = os.path.join(work, name + ".serial.log")
        self.qmp_path = os.path.join(work, name + ".qmp")
        self.ctl_path = os.path.join(work, name + ".ttyS1")
        cmd = ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-smp", "1", "-m", "256",
               "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
               "-kernel", os.path.join(kit, "vmlinuz"), "-initrd", os.path.join(kit, "initramfs.cpio.gz"),
               "-append", "console=ttyS0 loglevel=4 panic=-1 guest.mode=writer guest.files=256",
               "-chardev", "file,id=con,path=" + self.serial, "-serial", "chardev:con",
               "-chardev", "socket,id=ctl,path=%s,server=on,wait=off" % self.ctl_path, "-serial", "chardev:ctl",
               "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
               "-blockdev", "driver=nbd,node-name=disk0,server.type=unix,server.path=%s,export=%s" % (socket_path, export),
               "-device", "virtio-blk-pci,drive=disk0"]
        if incoming:
            cmd += ["-incoming", "defer"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(os.path.join(work, name + ".qemu.log"), "w"),
                                     stderr=subprocess.STDOUT)
        self.qmp = Qmp(self.qmp_path)
        self.ctl = None

    def lines(self):
        try:
            with open(self.serial, errors="replace") as f:
                return f.read().splitlines()
        except FileNotFoundError:
            return []

    def trouble(self):
        return [l for l in self.lines() if "GUEST FAIL" in l or "I/O error" in l or "EXT4-fs error" in l]

    def wait_line(self, marker, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for line in self.lines():
                if marker in line:
                    return line
            if self.trouble():
                raise SystemExit("live-vm: %s: %s" % (self.name, self.trouble()[0]))
            time.sleep(0.1)
        raise SystemExit("live-vm: %s: no %r after %d s" % (self.name, marker, timeout))

    def progress(self):
        n = [int(l.split()[2]) for l in self.lines() if l.startswith("GUEST PROGRESS ") and l.split()[2].isdigit()]
        return max(n) if n else 0

    def stop(self):
        self.ctl = socket.socket(socket.AF_UNIX)
        self.ctl.connect(self.ctl_path)
        self.ctl.sendall(b"stop\n")


def migrate_cmd(args, *rest):
    return [args.migrate] + list(rest)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit", required=True, help="the guest kit's directory (scripts/guest-kit.sh)")
    ap.add_argument("--migrate", required=True, help="the migrate binary")
    ap.add_argument("--src-sock", required=True)
    ap.add_argument("--dst-sock", required=True)
    ap.add_argument("--src-ctl", required=True)
    ap.add_argument("--dst-ctl", required=True)
    ap.add_argument("--disk", default="vm")
    ap.add_argument("--work", default=".")
    args = ap.parse_args()

    log("== VM at A: booting a Linux guest (QEMU, TCG) on A's export %r; it writes files with fsync" % args.disk)
    a = Vm(args.work, "vm-a", args.kit, args.src_sock, args.disk)
    a.wait_line("GUEST READY", 120)
    while a.progress() < 20:
        a.wait_line("GUEST PROGRESS", 120)
        time.sleep(0.2)
    log("guest at A: %s" % a.wait_line("GUEST PROGRESS", 10))

    log("== disk pre-copy while the VM runs: migrate --switch-after manual --delete-source")
    mig = subprocess.Popen(migrate_cmd(args, "--source", args.src_ctl, "--dest", args.dst_ctl, "--disk", args.disk,
                                       "--switch-after", "manual", "--delete-source", "--json"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mig_id = None
    end = time.monotonic() + 600
    while time.monotonic() < end:
        out = subprocess.run(migrate_cmd(args, "status", "--server", args.src_ctl, "--json"), capture_output=True, text=True, check=True)
        mine = [r for r in json.loads(out.stdout) if r["disk"] == args.disk and r["role"] == "source" and r["phase"] not in ("done", "failed", "cancelled")]
        if mine and mine[0].get("ready_to_switch"):
            mig_id = mine[0]["id"]
            break
        if mig.poll() is not None:
            raise SystemExit("live-vm: migrate ended early: %s" % mig.stderr.read())
        time.sleep(0.2)
    if mig_id is None:
        raise SystemExit("live-vm: the disk migration never became ready to switch")
    log("disk migration %s: pre-copy done, ready to switch (guest progress %d)" % (mig_id, a.progress()))

    log("== VM at B: QEMU -incoming, its disk on B's standby export %r" % args.disk)
    b = Vm(args.work, "vm-b", args.kit, args.dst_sock, args.disk, incoming=True)
    port_sock = socket.socket()
    port_sock.bind(("127.0.0.1", 0))
    port = port_sock.getsockname()[1]
    port_sock.close()
    b.qmp.execute("migrate-incoming", uri="tcp:127.0.0.1:%d" % port)

    log("== QEMU's live migration A -> B with pause-before-switchover")
    # `events`: QEMU reports MIGRATION status changes as events (pre-switchover among them).
    a.qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True},
                                                            {"capability": "pause-before-switchover", "state": True}])
    started = time.monotonic()
    a.qmp.execute("migrate", uri="tcp:127.0.0.1:%d" % port)
    a.qmp.wait_migration("pre-switchover", 300)
    paused = time.monotonic()
    log("QEMU at A paused the VM (pre-switchover) after %.2f s: switching the disk" % (paused - started))
    sw = subprocess.run(migrate_cmd(args, "switch", "--server", args.src_ctl, mig_id, "--json"), capture_output=True, text=True)
    if sw.returncode != 0:
        raise SystemExit("live-vm: migrate switch failed: %s" % sw.stderr)
    switch = json.loads(sw.stdout)
    a.qmp.execute("migrate-continue", state="pre-switchover")
    a.qmp.wait_migration("completed", 120)
    info = a.qmp.execute("query-migrate")
    a.qmp.execute("quit")
    a.proc.wait(timeout=30)
    log("VM moved: QEMU's downtime %s ms; the disk's downtime %.1f ms (migrate switch took %.1f ms, %d blocks listed inside the freeze)"
        % (info.get("downtime"), switch["downtime_ms"], switch["switch_call_ms"], switch.get("final_round_blocks") or 0))
    log("QEMU at A quit cleanly (exit %d): its last flush to A succeeded" % a.proc.returncode)

    # The guest's counter lives in its memory, which moved with it: B's console goes on from
    # where A's stopped.
    at_switch = a.progress()
    end = time.monotonic() + 120
    while b.progress() < at_switch + 20 and time.monotonic() < end:
        if b.trouble():
            raise SystemExit("live-vm: guest at B: %s" % b.trouble()[0])
        time.sleep(0.2)
    log("guest at B: %s" % [l for l in b.lines() if l.startswith("GUEST PROGRESS")][-1])
    b.stop()
    log("guest at B: %s" % b.wait_line("GUEST VERIFY", 300))
    b.wait_line("GUEST DONE", 120)
    b.proc.wait(timeout=60)
    out, err = mig.communicate(timeout=600)
    if mig.returncode != 0:
        raise SystemExit("live-vm: the disk migration failed: %s" % err)
    report = json.loads(out)
    troubles = a.trouble() + b.trouble()
    if troubles or "GUEST VERIFY OK" not in "\n".join(b.lines()):
        raise SystemExit("live-vm: the guest saw trouble: %s" % troubles)
    mib = lambda b: "%.1f MiB" % (b / 1048576)
    d, l = report["destination"], report["link"]
    log("disk migration: %.2f s in all, switched at %.2f s; rounds %s, %s blocks listed inside the freeze"
        % (report["total_seconds"], report["switch_seconds"], report["round_blocks"], report.get("final_round_blocks")))
    log("  over the link: %s in all = fingerprints %s + block data %s (zstd of %s raw) + control %s"
        % (mib(l["total_bytes"]), mib(l["fingerprint_bytes"]), mib(l["data_wire_bytes"]), mib(l["data_raw_bytes"]), mib(l["control_bytes"])))
    log("  blocks: %d listed, %d from B's neighbours, %d zero, %d duplicates, %d sent before the switch, %d on demand, %d in the background after it"
        % (d["blocks_listed"], d["neighbour_hits"], d["zero_blocks"], d["duplicates"], d["received_before_switch"], d["fetched_on_demand"], d["fetched_background"]))
    summary = {"vm_downtime_ms": info.get("downtime"), "disk_downtime_ms": round(switch["downtime_ms"], 1),
               "migrate_switch_ms": round(switch["switch_call_ms"], 1), "disk_link_bytes": report["link"]["total_bytes"],
               "blocks_from_neighbours": report["destination"]["neighbour_hits"],
               "writes_at_a": a.progress(), "writes_at_b_after_switch": b.progress() - at_switch}
    log("live VM migration: %s" % json.dumps(summary))
    with open(os.path.join(args.work, "live-vm.json"), "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main()
