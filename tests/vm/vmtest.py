#!/usr/bin/env python3
"""QEMU end-to-end test of sysgenid: the driver behind tests/vm/run.sh.

Builds an initramfs (busybox-static + sysgenidd + sysgenidctl + their shared
libraries + an /init), boots it under QEMU with a vmgenid device, snapshots
the running guest with QMP `migrate` to a file and restores it under new
GUIDs with `-incoming`. Linux's vmgenid driver then logs
`random: crng reseeded due to virtual machine fork`, the daemon (source
vmfork) bumps the generation, and the guest's watcher prints it on the serial
console, which the host parses.

Standard library only. Run through run.sh, which installs QEMU/busybox and
fetches the kernel, and sets SYSGENID_VM_KERNEL / SYSGENID_VM_BUSYBOX; for
the newest-kernel lane also SYSGENID_VM_QEMU (a chroot's newer QEMU),
SYSGENID_VM_VMCLOCK=1 (a `vmclock` device, scenario v) and
SYSGENID_VM_MODULES (kernel modules the guest loads, e.g. ptp_vmclock).

Importable: the helpers (Cpio, QMP, VM, Harness, ...) do nothing at import.
"""

import gzip
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import uuid

# =========================================================================
# GUEST-SIDE INTERFACE ASSUMED FROM sysgenidd / sysgenidctl
# Everything the harness assumes about the binaries is in this block; adjust
# it here if the CLI changes. The binaries are installed in the guest as
# /usr/bin/sysgenidd and /usr/bin/sysgenidctl.
#
# * The daemon runs in the background with these arguments and, once ready,
#   serves clients on SOCKET (the harness waits until SOCKET exists AND
#   `GET_CMD` succeeds). It starts at generation 0 on a fresh runtime dir and
#   bumps once per `random: crng reseeded due to virtual machine fork` line
#   in the kernel log.
# With a vmclock device the daemon runs `--source auto`, so the vmclock
# source is opened (or reported inactive, with the reason) next to vmfork.
VMCLOCK = os.environ.get("SYSGENID_VM_VMCLOCK") == "1"
DAEMON_SOURCES = os.environ.get("SYSGENID_VM_SOURCES", "auto" if VMCLOCK else "vmfork")
# Otherwise the daemon's defaults: runtime dir /run/sysgenid, the device
# at /dev/sysgenid if FUSE can be mounted (else off), no hooks, no groups;
# the initramfs has no /etc/group or /etc/passwd (issue 21: the daemon must
# start in such a minimal system).
DAEMON_CMD = f"sysgenidd --source {DAEMON_SOURCES}"
SOCKET = "/run/sysgenid/sysgenid.sock"
# * The client finds the daemon's socket by default (no flag needed).
CTL = "sysgenidctl"
# * `get` prints the current generation as a decimal number on stdout.
GET_CMD = CTL + " get"
# * `status --json` prints a JSON object with at least
#   "generation": <number> and "epoch": "<32 hex digits>" (whitespace and
#   newlines anywhere are fine; extra fields are ignored).
STATUS_JSON_CMD = CTL + " status --json"
# * `watch --exec PROG` runs forever; on every change of the generation it
#   runs PROG (a path, no arguments) with the environment variable GEN_ENV
#   set to the new generation, then acknowledges. It does not run PROG for
#   the generation current when it starts.
WATCH_CMD = CTL + " watch --exec /sgtest-report"
GEN_ENV = "SYSGENID_GENERATION"
# * Scenario (n), clones without vmgenid: `bump` makes a new generation
#   (privileged, as root in the guest) after renewing the kernel RNG;
#   SYSGENID_VM_RESEED (auto, never) is passed as `--reseed` (never: to
#   show the scenario fails without the reseed).
BUMP_CMD = CTL + " bump"
RESEED = os.environ.get("SYSGENID_VM_RESEED", "")
CLONE_DAEMON_CMD = (f"sysgenidd --runtime-dir /run/sysgenid --source {DAEMON_SOURCES}"
                    + (f" --reseed {RESEED}" if RESEED else ""))
# * `sysgenid-rng reseed` forces a kernel CRNG reseed; `sysgenid-rng get 16`
#   prints 16 bytes of getrandom in hex (crates/sysgenid-tests).
RNG_TOOL = "sysgenid-rng"
# =========================================================================

# Lines the guest prints on the serial console (host parses these):
#   SGTEST BOOT ...                                   init started
#   SGTEST READY gen=<n> epoch=<hex>                  daemon + watcher up
#   SGTEST GEN <n> EPOCH <hex> STATUSGEN <n>          a change, from the watcher
#   SGTEST ALIVE gen=<n> kforks=<k> up=<s>            heartbeat every 2 s; k is
#                                                     the number of kernel fork
#                                                     lines in dmesg
#   SGTEST STATUSJSON <json>                          `status --json` on one line,
#                                                     before READY, after each GEN,
#                                                     and (vmclock lane) with
#                                                     each heartbeat
#   SGTEST MODULE <name> rc=<rc>                      a kernel module was loaded
#   SGTEST VMCLOCK dev=present|absent                 /dev/vmclock0 (vmclock lane)
#   SGTEST WATCH-EXIT rc=<rc>                         the watcher exited
#   SGTEST FAIL <why>                                 init gave up
#   SGTEST REPLY <n> <command> rc=<rc> <output>       clone mode: the answer to
#                                                     command number n sent on
#                                                     the command port (ttyS1)

KERNEL_FORK_LINE = "random: crng reseeded due to virtual machine fork"
KERNEL_APPEND = "console=ttyS0 panic=-1 quiet"


def env_float(name, default):
    return float(os.environ.get(name, default))


BOOT_TIMEOUT = env_float("SYSGENID_VM_BOOT_TIMEOUT", 120)
GEN_TIMEOUT = env_float("SYSGENID_VM_GEN_TIMEOUT", 30)
QUIET_WINDOW = env_float("SYSGENID_VM_QUIET_WINDOW", 8)
QMP_TIMEOUT = 30
MIGRATE_TIMEOUT = 60
ACCEL = os.environ.get("SYSGENID_VM_ACCEL", "tcg")
MEM_MB = os.environ.get("SYSGENID_VM_MEM", "512")
# The QEMU command (a prefix: run.sh points it at tests/vm/qemu-chroot.sh
# for the development suite's QEMU).
QEMU_CMD = shlex.split(os.environ.get("SYSGENID_VM_QEMU", "qemu-system-x86_64"))
MODULES = [m for m in os.environ.get("SYSGENID_VM_MODULES", "").split(":") if m]
LANE = os.environ.get("SYSGENID_VM_LANE", "")


class TestFailure(Exception):
    pass


def log(msg):
    print(f"[vm] {msg}", flush=True)


# ------------------------------------------------------------- initramfs

class Cpio:
    """Writer for the `newc` cpio format the kernel unpacks as initramfs."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.names = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        name = name.lstrip("/")
        if name in self.names:
            return
        self.names.add(name)
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0,
                  rdev[0], rdev[1], len(nb), 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(nb)
        self.buf.write(b"\0" * (-(110 + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dirs_for(self, path):
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.dir("/".join(parts[:i]))

    def dir(self, name, perm=0o755):
        self._entry(name, stat.S_IFDIR | perm)

    def file(self, name, data, perm=0o755):
        self.dirs_for(name)
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name, target):
        self.dirs_for(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, perm=0o600):
        self.dirs_for(name)
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def shared_libs(binary):
    """The shared libraries (incl. the dynamic loader) `ldd` lists."""
    with open(binary, "rb") as f:
        if f.read(4) != b"\x7fELF":
            return []  # a script: its interpreter comes from busybox
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if out.returncode != 0:
        raise TestFailure(f"ldd {binary} failed:\n{text}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            rest = rest.strip()
            if rest.startswith("not found"):
                raise TestFailure(f"{binary}: shared library {name.strip()} not found")
            path = rest.split(" (")[0].strip()
            if path.startswith("/"):
                libs.append(path)
        elif line.startswith("/"):
            libs.append(line.split(" (")[0].strip())
    if not any("ld-linux" in p for p in libs) and os.path.exists("/lib64/ld-linux-x86-64.so.2"):
        libs.append("/lib64/ld-linux-x86-64.so.2")
    return libs


def q(s):
    return shlex.quote(s)


def init_prologue(generator):
    """The start every guest PID 1 script shares: the shebang, the kernel
    file systems, the console, the `say`/`fail` helpers, RUST_LOG from
    SYSGENID_VM_RUST_LOG, and the BOOT line."""
    rust_log = os.environ.get("SYSGENID_VM_RUST_LOG", "")
    return f"""#!/bin/sh
# Generated by {generator}: the guest's PID 1.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1
say() {{ echo "SGTEST $*"; }}
fail() {{ say "FAIL $*"; sleep 1; poweroff -f; }}
{"export RUST_LOG=" + q(rust_log) if rust_log else ""}
say "BOOT kernel=$(uname -r) uptime=$(cut -d' ' -f1 /proc/uptime)"
"""


def guest_init():
    vmclock_check = ('say "VMCLOCK dev=$([ -e /dev/vmclock0 ] && echo present || echo absent)"'
                     if VMCLOCK else "")
    # The vmclock lane also needs the sources' later state (a vmclock event
    # may come after the watcher's report).
    heartbeat_status = (f"say \"STATUSJSON $(timeout 5 {STATUS_JSON_CMD} 2>&1 | tr -d '\\n')\""
                        if VMCLOCK else ":")
    runtime_dir = os.path.dirname(SOCKET)
    return init_prologue("tests/vm/vmtest.py") + f"""case " $(cat /proc/cmdline) " in *" sgtest.mode=clone "*) . /sgtest-clone ;; esac
[ -e /sys/bus/acpi/devices/QEMUVGID:00 ] || say "WARN no QEMUVGID ACPI device"

for m in /lib/sgtest-modules/*.ko; do
    [ -e "$m" ] || continue
    insmod "$m"; say "MODULE $(basename "$m" .ko) rc=$?"
done
{vmclock_check}

mkdir -p {q(runtime_dir)}
{DAEMON_CMD} &
DPID=$!
i=0
until [ -e {q(SOCKET)} ] && {GET_CMD} >/dev/null 2>&1; do
    if [ -n "$DPID" ] && ! kill -0 $DPID 2>/dev/null; then
        wait $DPID; rc=$?
        # rc 0: it forked into the background; keep waiting for the socket
        [ $rc = 0 ] || fail "daemon exited with rc $rc before serving {SOCKET}"
        DPID=
    fi
    i=$((i + 1)); [ $i -le 600 ] || fail "daemon did not serve {SOCKET} within 60 s"
    sleep 0.1
done

( while :; do {WATCH_CMD}; say "WATCH-EXIT rc=$?"; sleep 1; done ) &
( while :; do
      sleep 2
      say "ALIVE gen=$(timeout 5 {GET_CMD} 2>&1 | head -n1) kforks=$(dmesg | grep -c {q(KERNEL_FORK_LINE)}) up=$(cut -d' ' -f1 /proc/uptime)"
      {heartbeat_status}
  done ) &

# Give the watcher time to register before the host may snapshot.
sleep 1
[ -z "$DPID" ] || kill -0 $DPID 2>/dev/null || fail "daemon died"
# Before READY: the host snapshots as soon as it sees READY.
say "STATUSJSON $({STATUS_JSON_CMD} 2>&1 | tr -d '\\n')"
say "READY gen=$({GET_CMD} 2>&1 | head -n1) epoch=$(/sgtest-epoch)"
while :; do sleep 3600; done
"""


def guest_clone():
    """Clone mode (scenario n; sourced by /init): the daemon and nothing
    else, so that every getrandom consumer in the guest is a command the
    host sent, in the same order in every clone. Commands arrive on ttyS1
    as `<n> <command>` lines; each answer is one REPLY line on the console.
    Add a command here for another pair of clones."""
    runtime_dir = os.path.dirname(SOCKET)
    return f"""# Sourced by /init in clone mode (sgtest.mode=clone): never returns.
mkdir -p {q(runtime_dir)}
{CLONE_DAEMON_CMD} &
i=0
until [ -e {q(SOCKET)} ] && {GET_CMD} >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -le 600 ] || fail "daemon did not serve {SOCKET} within 60 s"
    sleep 0.1
done
# Open once, before READY, and keep open: a port no one holds open drops
# what arrives, and the host writes as soon as it sees READY.
exec 3</dev/ttyS1
stty -echo <&3 2>/dev/null
say "READY gen=$({GET_CMD} 2>&1 | head -n1) epoch=$(/sgtest-epoch)"
while read -r n cmd <&3; do
    case $cmd in
        rng) out=$({RNG_TOOL} get 16 2>&1) ;;
        reseed) out=$({RNG_TOOL} reseed 2>&1) ;;
        bump) out=$({BUMP_CMD} 2>&1 </dev/null) ;;
        status) out=$({STATUS_JSON_CMD} 2>&1 </dev/null | tr -d '\n') ;;
        *) out="unknown command"; false ;;
    esac
    say "REPLY $n $cmd rc=$? $out"
done
fail "the command port closed"
"""


def guest_report():
    return f"""#!/bin/sh
# Run by `{WATCH_CMD}` on each change.
echo "SGTEST GEN ${{{GEN_ENV}:-unset}} EPOCH $(/sgtest-epoch) STATUSGEN $(/sgtest-epoch generation)" >/dev/console
echo "SGTEST STATUSJSON $({STATUS_JSON_CMD} 2>&1 | tr -d '\\n')" >/dev/console
"""


def guest_epoch():
    # Field extraction from `status --json` with sed (busybox has no jq).
    return f"""#!/bin/sh
# Prints the "epoch" (or, with an argument, the "generation") field of
# `{STATUS_JSON_CMD}`.
json=$({STATUS_JSON_CMD} 2>/dev/null | tr -d '\\n')
if [ "$1" = generation ]; then
    v=$(echo "$json" | sed -n 's/.*"generation"[[:space:]]*:[[:space:]]*\\([0-9][0-9]*\\).*/\\1/p')
else
    v=$(echo "$json" | sed -n 's/.*"epoch"[[:space:]]*:[[:space:]]*"\\([0-9a-fA-F]*\\)".*/\\1/p')
fi
echo "${{v:-none}}"
"""


def stripped(binary):
    """The binary's bytes without debug sections, when `strip` is there: a
    debug build is ~90% DWARF, and a smaller initramfs is compressed and
    unpacked (under TCG) much faster."""
    with open(binary, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or not shutil.which("strip"):
        return data
    with tempfile.NamedTemporaryFile() as tmp:
        r = subprocess.run(["strip", "--strip-debug", "-o", tmp.name, binary],
                           capture_output=True)
        if r.returncode != 0:
            return data
        with open(tmp.name, "rb") as f:
            return f.read()


def build_initramfs(path, busybox, binaries):
    c = Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64",
              "etc", "proc", "sys", "dev", "run", "tmp", "root", "var",
              "var/lib", "var/tmp"):
        c.dir(d)
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/null", 1, 3, 0o666)
    with open(busybox, "rb") as f:
        c.file("bin/busybox", f.read())
    listing = subprocess.run([busybox, "--list-full"], capture_output=True,
                             text=True, check=True).stdout.split()
    for applet in listing:
        if applet != "bin/busybox":
            c.symlink(applet, "/bin/busybox")
    libs = set()
    for name, src in binaries.items():
        c.file(f"usr/bin/{name}", stripped(src))
        libs.update(shared_libs(src))
    for lib in sorted(libs):
        with open(os.path.realpath(lib), "rb") as f:
            c.file(lib, f.read())
    for mod in MODULES:
        with open(mod, "rb") as f:
            c.file(f"lib/sgtest-modules/{os.path.basename(mod)}", f.read(), 0o644)
    c.file("init", guest_init().encode())
    c.file("sgtest-clone", guest_clone().encode(), 0o644)
    c.file("sgtest-report", guest_report().encode())
    c.file("sgtest-epoch", guest_epoch().encode())
    # No /etc/passwd or /etc/group: a minimal system, as issue 21 asks.
    data = gzip.compress(c.finish(), compresslevel=6, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return sorted(libs), len(data)


# ------------------------------------------------------------------- QMP

class QMP:
    def __init__(self, path, timeout=QMP_TIMEOUT, proc=None):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if proc is not None and proc.poll() is not None:
                    raise TestFailure(f"QEMU exited (rc {proc.returncode}) before QMP came up")
                if time.monotonic() > deadline:
                    raise TestFailure(f"QMP socket {path} did not come up in {timeout}s")
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.f = self.sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise TestFailure(f"unexpected QMP greeting {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise TestFailure("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        resp = self._read()
        if "error" in resp:
            raise TestFailure(f"QMP {name} failed: {resp['error']}")
        return resp.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ------------------------------------------------------------------- VMs

LINE_RE = re.compile(
    r"SGTEST (BOOT|READY|GEN|ALIVE|WATCH-EXIT|FAIL|WARN|STATUSJSON|MODULE|VMCLOCK|REPLY)\b ?(.*)")
GEN_RE = re.compile(r"^(\S+) EPOCH (\S+)(?: STATUSGEN (\S+))?")
HEX32 = re.compile(r"^[0-9a-fA-F]{32}$")

ALL_VMS = []


class VM:
    """A QEMU guest. `guid=None` is clone mode (scenario n): no vmgenid or
    vmclock device, the guest runs /sgtest-clone, and `command` drives it
    over a second serial port."""

    def __init__(self, h, name, guid, incoming=None):
        self.h, self.name, self.guid, self.incoming = h, name, guid, incoming
        self.serial = os.path.join(h.workdir, f"{name}.serial.log")
        self.stderr_path = os.path.join(h.workdir, f"{name}.qemu.log")
        self.qmp_path = os.path.join(h.workdir, f"{name}.qmp")
        self.cmd_path = os.path.join(h.workdir, f"{name}.cmd")
        self.cmd_sock = None
        self.cmd_seq = 0
        self.proc = None
        self.qmp = None

    def cmdline(self):
        clone_mode = self.guid is None
        cmd = QEMU_CMD + ["-accel", ACCEL, "-machine", "q35",
               "-cpu", "max", "-m", MEM_MB, "-nic", "none", "-display", "none",
               "-no-reboot",
               "-serial", f"file:{self.serial}",
               "-kernel", self.h.kernel, "-initrd", self.h.initrd,
               # no_timer_check: under TCG on a loaded host the kernel's
               # IO-APIC timer check can fail and panic at boot.
               "-append", KERNEL_APPEND + (" sgtest.mode=clone no_timer_check" if clone_mode else ""),
               "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if clone_mode:
            cmd += ["-chardev", f"socket,id=sgcmd,path={self.cmd_path},server=on,wait=off",
                    "-serial", "chardev:sgcmd"]
        else:
            cmd += ["-device", f"vmgenid,id=vmgen0,guid={self.guid}"]
        if VMCLOCK and not clone_mode:
            cmd += ["-device", "vmclock"]
        if self.incoming:
            cmd += ["-incoming", f"exec:cat {q(self.incoming)}"]
        return cmd

    def start(self):
        self.t_start = time.monotonic()
        self.stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.cmdline(), stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=subprocess.STDOUT)
        ALL_VMS.append(self)
        self.qmp = QMP(self.qmp_path, proc=self.proc)
        return self

    def resume_after_incoming(self):
        """Wait for the incoming state to load; resume the guest if paused."""
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            self.check_alive()
            status = self.qmp.cmd("query-status")["status"]
            if status == "paused":
                self.qmp.cmd("cont")
            elif status == "running":
                return time.monotonic() - self.t_start
            elif status not in ("inmigrate", "prelaunch", "postmigrate"):
                raise TestFailure(f"{self.name}: unexpected run state {status!r} while restoring")
            if time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: restore did not finish in {MIGRATE_TIMEOUT}s")
            time.sleep(0.02)

    def save(self, path):
        """Pause the guest, write its state to PATH, quit QEMU."""
        t0 = time.monotonic()
        self.qmp.cmd("stop")
        self.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 33})
        self.qmp.cmd("migrate", uri=f"exec:cat > {q(path)}")
        deadline = t0 + MIGRATE_TIMEOUT
        while True:
            info = self.qmp.cmd("query-migrate")
            st = info.get("status")
            if st == "completed":
                break
            if st in ("failed", "cancelled"):
                raise TestFailure(f"{self.name}: migration {st}: {info}")
            if time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: migration not done in {MIGRATE_TIMEOUT}s: {info}")
            time.sleep(0.02)
        self.quit()
        return time.monotonic() - t0

    def command(self, cmd, timeout=None):
        """Clone mode: sends `cmd` on the command port and returns (rc,
        output) from its REPLY line."""
        timeout = timeout or GEN_TIMEOUT
        if self.cmd_sock is None:
            self.cmd_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.cmd_sock.connect(self.cmd_path)
        self.cmd_seq += 1
        n = self.cmd_seq
        self.cmd_sock.sendall(f"{n} {cmd}\n".encode())
        rest = self.wait_for("REPLY", timeout, lambda r: r.split(" ", 1)[0] == str(n),
                             f"SGTEST REPLY {n} {cmd}")
        m = re.match(r"^\S+ (\S+) rc=(\d+) ?(.*)$", rest)
        if not m or m.group(1) != cmd:
            raise TestFailure(f"{self.name}: unparsable reply to {cmd!r}: {rest!r}")
        return int(m.group(2)), m.group(3)

    def quit(self):
        if self.cmd_sock is not None:
            self.cmd_sock.close()
            self.cmd_sock = None
        try:
            self.qmp.cmd("quit")
        except (TestFailure, OSError):
            pass
        self.qmp.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def check_alive(self):
        if self.proc.poll() is not None:
            raise TestFailure(f"{self.name}: QEMU exited with rc {self.proc.returncode}\n"
                              + self.diagnostics())

    def lines(self):
        try:
            with open(self.serial, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        out = []
        # A line still being written is not a line yet (QEMU writes the
        # console as it comes; a long REPLY may be read half-written).
        if not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        for raw in text.splitlines():
            m = LINE_RE.search(raw)
            if m:
                out.append((m.group(1), m.group(2).strip()))
        return out

    def events(self, kind):
        return [rest for k, rest in self.lines() if k == kind]

    def kernel_forks(self):
        """Fork lines in the guest's dmesg, per its latest heartbeat (None
        before the first one). The line itself is a KERN_NOTICE, so `quiet`
        keeps it off the console."""
        alive = self.events("ALIVE")
        if not alive:
            return None
        k = field(alive[-1], "kforks")
        return int(k) if k and k.isdigit() else None

    def check_guest(self):
        for k, rest in self.lines():
            if k == "FAIL":
                raise TestFailure(f"{self.name}: guest init failed: {rest}\n" + self.diagnostics())
            if k == "WATCH-EXIT":
                raise TestFailure(f"{self.name}: `{WATCH_CMD}` exited ({rest})\n" + self.diagnostics())

    def wait_for(self, kind, timeout, pred=lambda rest: True, what=None):
        deadline = time.monotonic() + timeout
        while True:
            self.check_guest()
            for rest in self.events(kind):
                if pred(rest):
                    return rest
            self.check_alive()
            if time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: no {what or 'SGTEST ' + kind} line within "
                                  f"{timeout:.0f}s\n" + self.diagnostics())
            time.sleep(0.05)

    def diagnostics(self):
        out = []
        for label, path in (("serial", self.serial), ("qemu", self.stderr_path)):
            try:
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", "replace").splitlines()
            except FileNotFoundError:
                text = ["(missing)"]
            out.append(f"  --- {self.name} {label} log ({path}), last 40 lines ---")
            out += ["  | " + t for t in text[-40:]]
        return "\n".join(out)


def kill_all():
    for vm in ALL_VMS:
        try:
            vm.kill()
        except Exception:
            pass


def parse_gen(vm, rest):
    m = GEN_RE.match(rest)
    if not m:
        raise TestFailure(f"{vm.name}: unparsable GEN line {rest!r}")
    gen, epoch, statusgen = m.groups()
    if not HEX32.match(epoch):
        raise TestFailure(f"{vm.name}: epoch {epoch!r} from `{STATUS_JSON_CMD}` is not 32 hex digits")
    if statusgen is not None and statusgen != gen:
        raise TestFailure(f"{vm.name}: watcher said generation {gen} but `{STATUS_JSON_CMD}` "
                          f"says {statusgen}")
    return gen, epoch.lower()


def kernel_hint(vm):
    k = vm.kernel_forks()
    if k is None:
        return "no heartbeat from the guest either: is it running?"
    if k == 0:
        return (f"the guest kernel has NOT logged {KERNEL_FORK_LINE!r} "
                "(vmgenid notification not delivered?)")
    return (f"the guest kernel logged {KERNEL_FORK_LINE!r} {k} time(s): "
            "the daemon or the watcher did not act on it")


def field(rest, key):
    m = re.search(rf"\b{key}=(\S*)", rest)
    return m.group(1) if m else None


# ------------------------------------------------------------- harness

class Harness:
    def __init__(self):
        self.kernel = os.environ["SYSGENID_VM_KERNEL"]
        self.busybox = os.environ.get("SYSGENID_VM_BUSYBOX", "/bin/busybox")
        self.binaries = {"sysgenidd": os.environ["SYSGENIDD"],
                         "sysgenidctl": os.environ["SYSGENIDCTL"]}
        # Scenario (n)'s helper: SYSGENID_VM_RNG, else next to sysgenidctl.
        rng = os.environ.get("SYSGENID_VM_RNG") or os.path.join(
            os.path.dirname(os.environ["SYSGENIDCTL"]), RNG_TOOL)
        if os.path.isfile(rng):
            self.binaries[RNG_TOOL] = rng
        wd = os.environ.get("SYSGENID_VM_WORKDIR")
        if wd:
            os.makedirs(wd, exist_ok=True)
            self.workdir = wd
        else:
            self.workdir = tempfile.mkdtemp(prefix="sysgenid-vm.")
        self.initrd = os.path.join(self.workdir, "initrd.gz")
        self.timings = []
        self.results = []
        self.guid = {k: str(uuid.uuid4()) for k in "ABCDE"}
        self.windows = []  # (vm, generation, in-guest window µs or None, sources)
        self.t0 = time.monotonic()

    def timed(self, label, secs):
        self.timings.append((label, secs))
        log(f"  {label}: {secs:.2f}s")
        return secs

    def state(self, name):
        return os.path.join(self.workdir, f"{name}.state")

    def restore(self, name, state, guid):
        vm = VM(self, name, guid, incoming=state).start()
        self.timed(f"restore {name} (qemu start -> guest running)", vm.resume_after_incoming())
        return vm

    def wait_gen(self, vm, expect):
        try:
            rest = vm.wait_for("GEN", GEN_TIMEOUT, what=f"SGTEST GEN {expect}")
        except TestFailure as e:
            raise TestFailure(f"{e}\n  hint: {kernel_hint(vm)}") from None
        gen, epoch = parse_gen(vm, rest)
        if gen != str(expect):
            raise TestFailure(f"{vm.name}: expected generation {expect}, watcher reported {gen}\n"
                              + vm.diagnostics())
        self.timed(f"{vm.name}: restore -> SGTEST GEN {expect}",
                   time.monotonic() - vm.t_start)
        self.report_window(vm, expect)
        return epoch

    def statuses(self, vm):
        """Every `status --json` the guest printed, parsed, in order."""
        out = []
        for rest in vm.events("STATUSJSON"):
            try:
                st = json.loads(rest)
            except ValueError:
                continue
            if isinstance(st, dict):
                out.append(st)
        return out

    def status_where(self, vm, pred, timeout, what):
        """The first status the guest printed for which `pred` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for st in self.statuses(vm):
                if pred(st):
                    return st
            # A VM that has quit (the boot VM, after its snapshot) prints
            # nothing more.
            if vm.proc.poll() is not None or time.monotonic() > deadline:
                raise TestFailure(f"{vm.name}: no `{STATUS_JSON_CMD}` line with {what} within "
                                  f"{timeout:.0f}s\n" + vm.diagnostics())
            time.sleep(0.05)

    def report_window(self, vm, gen):
        """Reports (never asserts) the daemon's own figure for the restore:
        the kernel record's timestamp -> the page showing `gen`, in the guest
        (TCG makes it slow)."""
        try:
            st = self.status_where(vm, lambda st: st.get("generation") == gen, 10,
                                   f"generation {gen}")
        except TestFailure as e:
            log(f"  {vm.name}: no status to report the window from: {str(e).splitlines()[0]}")
            return None
        lag = st.get("last_kernel_lag_us")
        self.windows.append((vm.name, gen, lag, st.get("last_change_sources")))
        log(f"  {vm.name}: in-guest window, kernel record -> page shows {gen}: "
            + (f"{lag} µs" if lag is not None else "not reported by this daemon")
            + f" (sources {st.get('last_change_sources')})")
        return st

    def only_gen_lines(self, vm, expected):
        got = [parse_gen(vm, r)[0] for r in vm.events("GEN")]
        if got != [str(g) for g in expected]:
            raise TestFailure(f"{vm.name}: GEN lines {got}, expected {expected}\n" + vm.diagnostics())

    # -- steps ----------------------------------------------------------

    def prepare(self):
        t = time.monotonic()
        libs, size = build_initramfs(self.initrd, self.busybox, self.binaries)
        log(f"initramfs {self.initrd}: {size // 1024} KiB; binaries "
            f"{', '.join(f'{k}={v}' for k, v in self.binaries.items())}")
        log(f"  shared libraries: {', '.join(libs) or '(none)'}")
        self.timed("build initramfs", time.monotonic() - t)

    def boot(self):
        log(f"boot VM 'boot' with GUID A={self.guid['A']}")
        vm = VM(self, "boot", self.guid["A"]).start()
        self.vm_boot = vm
        rest = vm.wait_for("READY", BOOT_TIMEOUT)
        self.timed("boot -> SGTEST READY", time.monotonic() - vm.t_start)
        if field(rest, "gen") != "0":
            raise TestFailure(f"boot: expected generation 0 at start, READY says {rest!r}")
        self.epoch0 = (field(rest, "epoch") or "").lower()
        # A watcher that also reports the generation current when it starts
        # would print GEN 0 here: tolerated. Anything else is a bogus change.
        if [g for g in vm.events("GEN") if parse_gen(vm, g)[0] != "0"]:
            raise TestFailure("boot: a generation change was reported without any restore\n"
                              + vm.diagnostics())
        log(f"  READY {rest}")
        self.timed("save S0", vm.save(self.state("S0")))
        log(f"  S0: {os.path.getsize(self.state('S0')) // (1 << 20)} MiB")

    def scenario_a(self):
        vm = self.restore("restoreB", self.state("S0"), self.guid["B"])
        self.epochB = self.wait_gen(vm, 1)
        if self.epochB == self.epoch0:
            raise TestFailure("a: the epoch did not change with the generation")
        t = time.monotonic()
        vm.wait_for("ALIVE", 10, lambda r: field(r, "gen") == "1", "SGTEST ALIVE gen=1")
        self.timed("restoreB: GEN 1 -> `get` answers 1", time.monotonic() - t)
        self.only_gen_lines(vm, [1])
        self.vmB = vm
        return f"GEN 1 epoch {self.epochB}"

    def scenario_v(self):
        """The vmclock source against the guest's real /dev/vmclock0."""
        boot = self.vm_boot
        mods = boot.events("MODULE")
        if not any(m.startswith("ptp_vmclock rc=0") for m in mods):
            raise TestFailure(f"v: ptp_vmclock did not load: MODULE lines {mods}\n" + boot.diagnostics())
        dev = boot.events("VMCLOCK")
        if dev != ["dev=present"]:
            raise TestFailure(f"v: /dev/vmclock0 not found in the guest: VMCLOCK lines {dev}\n"
                              + boot.diagnostics())
        st0 = self.status_where(boot, lambda st: st.get("generation") == 0, 10, "generation 0")
        src = {s.get("name"): s for s in st0.get("sources", [])}.get("vmclock")
        if src is None:
            raise TestFailure(f"v: status lists no vmclock source: {st0.get('sources')}")
        detail = src.get("detail", "")
        if src.get("active"):
            # Bumps on restore: after restoreB, vmclock reported the restore
            # (merged with vmfork's, or first).
            st = self.status_where(
                self.vmB,
                lambda st: st.get("generation") == 1 and any(
                    s.get("name") == "vmclock" and s.get("events", 0) >= 1
                    for s in st.get("sources", [])),
                15, "a vmclock event at generation 1")
            return (f"vmclock live: {detail}; the restore was seen by vmclock "
                    f"(last change by {st.get('last_change_sources')})")
        # Not active: the daemon must say exactly why, after validating the
        # layout, and vmfork must have carried the restore.
        if "VMCLOCK_FLAG_VM_GEN_COUNTER_PRESENT not set" not in detail or \
                "valid vmclock_abi" not in detail:
            raise TestFailure(f"v: vmclock inactive for another reason than the missing flag: {detail!r}")
        stB = self.status_where(self.vmB, lambda st: st.get("generation") == 1, 10, "generation 1")
        if "vmfork" not in (stB.get("last_change_sources") or []):
            raise TestFailure(f"v: the restore was not carried by vmfork: {stB.get('last_change_sources')}")
        return (f"device found, layout valid, inactive: {detail}; "
                f"vmfork carried the restore ({stB.get('last_change_sources')})")

    def scenario_b(self):
        self.timed("save S1 (from restoreB)", self.vmB.save(self.state("S1")))
        vm = self.restore("restoreC", self.state("S1"), self.guid["C"])
        epochC = self.wait_gen(vm, 2)
        if epochC == self.epochB:
            raise TestFailure("b: the epoch did not change with the generation")
        self.only_gen_lines(vm, [2])
        vm.quit()
        return f"GEN 2 epoch {epochC}"

    def scenario_c(self):
        t = time.monotonic()
        d = VM(self, "cloneD", self.guid["D"], incoming=self.state("S0")).start()
        e = VM(self, "cloneE", self.guid["E"], incoming=self.state("S0")).start()
        d.resume_after_incoming()
        e.resume_after_incoming()
        self.timed("restore cloneD + cloneE (concurrently)", time.monotonic() - t)
        eD = self.wait_gen(d, 1)
        eE = self.wait_gen(e, 1)
        if eD == eE:
            raise TestFailure(f"c: both clones report the same epoch {eD}")
        if self.epoch0 in (eD, eE):
            raise TestFailure("c: a clone kept the snapshot's epoch")
        for vm in (d, e):
            self.only_gen_lines(vm, [1])
            vm.quit()
        return f"D epoch {eD} != E epoch {eE}"

    def clone_pair(self, names, state, change):
        """Restores two clones of `state` (clone mode: no vmgenid) at once;
        in each, reads 16 bytes of getrandom (`before`), calls `change(vm)`
        (which must make generation 1), then reads 16 bytes again
        (`after`) and the status. Asserts that both reached generation 1
        with different epochs and different `after` bytes. Returns one
        summary line. `before` is reported, never asserted: equal bytes
        show the clones shared one kernel random stream until the change
        (a scheduled kernel reseed in between makes them differ anyway)."""
        t = time.monotonic()
        vms = [VM(self, name, None, incoming=state).start() for name in names]
        for vm in vms:
            vm.resume_after_incoming()
        self.timed(f"restore {' + '.join(names)} (concurrently)", time.monotonic() - t)
        got = {}
        for vm in vms:
            rc, before = vm.command("rng")
            if rc != 0:
                raise TestFailure(f"{vm.name}: `{RNG_TOOL} get 16` failed: {before}")
            change(vm)
            rc, after = vm.command("rng")
            if rc != 0:
                raise TestFailure(f"{vm.name}: `{RNG_TOOL} get 16` failed: {after}")
            rc, out = vm.command("status")
            try:
                st = json.loads(out)
            except ValueError:
                raise TestFailure(f"{vm.name}: `{STATUS_JSON_CMD}` is not JSON: {out!r}") from None
            if st.get("generation") != 1:
                raise TestFailure(f"{vm.name}: expected generation 1 after the change, "
                                  f"status says {st.get('generation')}\n" + vm.diagnostics())
            got[vm.name] = (before, after, st.get("epoch"), st.get("last_change_rng"))
            log(f"  {vm.name}: getrandom before {before}, after {after}; epoch {st.get('epoch')}; "
                f"kernel RNG {st.get('last_change_rng')}")
        (b1, a1, e1, _), (b2, a2, e2, _) = got[names[0]], got[names[1]]
        shared = "shared one stream before the change" if b1 == b2 else \
            "already differed before the change (a kernel reseed came first)"
        if e1 == e2:
            raise TestFailure(f"both clones drew the same epoch {e1} (getrandom before: {shared})")
        if a1 == a2:
            raise TestFailure(f"both clones' getrandom returned {a1} after the change "
                              f"(and they {shared})")
        for vm in vms:
            vm.quit()
        return f"epochs {e1} != {e2}; getrandom after {a1} != {a2}; before: {shared}"

    def scenario_n(self):
        """Clones without vmgenid: the guest forces a kernel reseed, the
        host snapshots within seconds, and two clones each run a plain local
        `sysgenidctl bump`."""
        if RNG_TOOL not in self.binaries:
            raise TestFailure(f"n: no {RNG_TOOL} binary (set SYSGENID_VM_RNG, or build it next "
                              "to sysgenidctl: cargo build -p sysgenid-tests)")
        vm = VM(self, "novmgenid", None).start()
        rest = vm.wait_for("READY", BOOT_TIMEOUT)
        self.timed("novmgenid: boot -> SGTEST READY", time.monotonic() - vm.t_start)
        if field(rest, "gen") != "0":
            raise TestFailure(f"n: expected generation 0 at start, READY says {rest!r}")
        rc, out = vm.command("reseed")
        if rc != 0:
            raise TestFailure(f"n: the guest could not force a reseed: {out}")
        state = self.state("SN")
        self.timed("save SN right after the forced reseed", vm.save(state))

        def local_bump(clone):
            rc, out = clone.command("bump")
            if rc != 0 or out.strip() != "1":
                raise TestFailure(f"{clone.name}: `{BUMP_CMD}` exited {rc}: {out}\n"
                                  + clone.diagnostics())

        # The host channel's pair (`restored --clone`) goes next to this one.
        return "local bump: " + self.clone_pair(("cloneP", "cloneQ"), state, local_bump)

    def scenario_d(self):
        vm = self.restore("sameA", self.state("S0"), self.guid["A"])
        t = time.monotonic()
        deadline = t + QUIET_WINDOW
        while time.monotonic() < deadline:
            vm.check_guest()
            vm.check_alive()
            if vm.events("GEN"):
                raise TestFailure("d: a restore under the SAME GUID bumped the generation\n"
                                  + vm.diagnostics())
            time.sleep(0.1)
        alive = vm.events("ALIVE")
        gens = [field(r, "gen") for r in alive]
        if len(alive) < 2 or any(g != "0" for g in gens):
            raise TestFailure(f"d: expected >= 2 heartbeats with gen=0 in {QUIET_WINDOW:.0f}s, "
                              f"got gen={gens}\n" + vm.diagnostics())
        if vm.kernel_forks():
            raise TestFailure("d: the kernel logged a VM fork for the same GUID\n"
                              + vm.diagnostics())
        self.timed(f"sameA: quiet window (no GEN, {len(alive)} heartbeats gen=0)",
                   time.monotonic() - t)
        vm.quit()
        return f"no change in {QUIET_WINDOW:.0f}s, {len(alive)} heartbeats gen=0"

    def run(self):
        log(f"work dir {self.workdir}")
        log(f"GUIDs: " + " ".join(f"{k}={v}" for k, v in self.guid.items()))
        scenarios = [
            ("a", "restore S0 under a new GUID B -> generation 1", self.scenario_a, []),
        ]
        if VMCLOCK:
            scenarios.append(("v", "vmclock: /dev/vmclock0 found and validated; bumps on restore or "
                              "says why not while vmfork carries it", self.scenario_v, ["a"]))
        scenarios += [
            ("b", "save S1, restore under GUID C -> generation 2", self.scenario_b, ["a"]),
            ("c", "two clones of S0 (GUIDs D, E) -> generation 1, different epochs",
             self.scenario_c, []),
            ("d", "restore S0 under the SAME GUID A -> no change", self.scenario_d, []),
            ("n", "no vmgenid: reseed, snapshot, two clones each `bump` -> different epochs "
             "and getrandom", self.scenario_n, []),
        ]
        only = os.environ.get("SYSGENID_VM_SCENARIOS")
        if only:
            scenarios = [sc for sc in scenarios if sc[0] in only.split(",")]
        try:
            self.prepare()
            if any(sc[0] != "n" for sc in scenarios):  # (n) boots its own guest
                self.boot()
        except TestFailure as e:
            log(f"FAIL: {e}")
            first = str(e).splitlines()[0]
            for key, title, _, _ in scenarios:
                self.results.append((key, title, "FAIL", f"not run: boot failed: {first}", 0.0))
            kill_all()
            return self.summary()
        passed = set()
        for key, title, fn, needs in scenarios:
            log(f"scenario ({key}): {title}")
            if any(n not in passed for n in needs):
                self.results.append((key, title, "SKIP", "needs " + ",".join(needs), 0.0))
                log(f"  SKIP: needs scenario {','.join(needs)}")
                continue
            t = time.monotonic()
            try:
                detail = fn()
                status = "PASS"
                passed.add(key)
            except TestFailure as e:
                detail = str(e)
                status = "FAIL"
                log(f"  FAIL: {detail}")
            self.results.append((key, title, status, detail.splitlines()[0], time.monotonic() - t))
            log(f"  {status} ({time.monotonic() - t:.1f}s)")
            for vm in ALL_VMS:  # only (a)'s VM lives on, for (v) and (b)
                if vm is not getattr(self, "vmB", None) or key not in ("a", "v"):
                    vm.kill()
        kill_all()
        return self.summary()

    def summary(self):
        total = time.monotonic() - self.t0
        lane = f" ({LANE})" if LANE else ""
        print(f"\n================ sysgenid VM test summary{lane} ================")
        print("timings:")
        for label, secs in self.timings:
            print(f"  {secs:7.2f}s  {label}")
        if self.windows:
            print("in-guest restore window (kernel record timestamp -> page publication; TCG, not asserted):")
            for name, gen, lag, sources in self.windows:
                shown = f"{lag} µs" if lag is not None else "not reported by this daemon"
                print(f"  {name}: generation {gen}: {shown} (sources {sources})")
        print("scenarios:")
        for key, title, status, detail, secs in self.results:
            print(f"  ({key}) {status:4} {secs:5.1f}s  {title}")
            print(f"                   {detail}")
        npass = sum(1 for r in self.results if r[2] == "PASS")
        nfail = len(self.results) - npass  # a skipped scenario counts as failed
        print(f"total {total:.1f}s; work dir {self.workdir}")
        print(f"vm-e2e: {npass} passed, {nfail} failed")
        return nfail == 0


def main():
    for var in ("SYSGENIDD", "SYSGENIDCTL", "SYSGENID_VM_KERNEL"):
        if not os.environ.get(var):
            print(f"vmtest.py: {var} is not set (run tests/vm/run.sh)", file=sys.stderr)
            return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)
    h = Harness()
    ok = False
    try:
        ok = h.run()
    except TestFailure as e:
        log(f"FAIL: {e}")
        h.summary()
    finally:
        kill_all()
    keep = os.environ.get("SYSGENID_VM_KEEP") == "1" or not ok
    if not keep and not os.environ.get("SYSGENID_VM_WORKDIR"):
        shutil.rmtree(h.workdir, ignore_errors=True)
        log(f"removed {h.workdir} (SYSGENID_VM_KEEP=1 or --keep keeps it)")
    elif not ok:
        log(f"kept {h.workdir} for inspection")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
