#!/usr/bin/env python3
"""The snapshot lifecycle under QEMU with the real QEMU guest agent: the
driver behind `tests/vm/run.sh --lifecycle` (see tests/vm/README.md).

The guest runs Debian's qemu-guest-agent on a virtio-serial port named
org.qemu.guest_agent.0, with sysgenid's hook in /etc/qemu/fsfreeze-hook.d/
(packaging/qemu-ga/sysgenid), sysgenidd, and a lifecycle participant
(`sysgenidctl watch --lifecycle --exec`) that prints every event on the
serial console. The host, through the agent:
  guest-fsfreeze-freeze -> the hook freezes the participant (it logs
  `freeze`), the agent freezes the guest's ext4 disk -> the host saves the
  VM (and copies the disk) -> guest-fsfreeze-thaw -> the participant logs
  `thaw`;
then restores a clone from that saved, frozen state under a new vmgenid
GUID: the kernel reports the VM fork, the daemon bumps to generation 1, the
participant renews and the daemon thaws by itself: the clone runs again
with no thaw sent to it. Before that, with a participant that never
confirms, it checks what a failed freeze does to the agent's freeze under
Debian's stock hook dispatcher and under ours (packaging/qemu-ga/fsfreeze-hook).

The guest's root is the initramfs (rootfs), which cannot be frozen
(FIFREEZE: EOPNOTSUPP, the agent skips it), so the guest gets a 16 MiB ext4
disk (virtio-blk) mounted on /mnt/data for the agent to freeze.

Standard library only; reuses vmtest.py's initramfs writer, QMP client and
VM runner.
"""

import sys

sys.dont_write_bytecode = True  # keep the source tree clean

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import guest_packages  # noqa: E402
import vmtest  # noqa: E402
from qga import QGA, QGAError  # noqa: E402
from vmtest import TestFailure, field, log, q  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# =========================================================================
# GUEST-SIDE INTERFACE ASSUMED FROM sysgenidd / sysgenidctl (issue 13)
# * `watch --lifecycle --exec PROG` is a participant: on every event it runs
#   PROG with SYSGENID_EVENT=freeze|thaw|change and SYSGENID_GENERATION, and
#   confirms (freeze) or acknowledges (change) when PROG exits 0. It also
#   prints one line per event on stdout.
LIFE_WATCH_CMD = "sysgenidctl watch --lifecycle --exec /sgtest-life"
# * A participant that never confirms: its command never exits.
STUCK_WATCH_CMD = "sysgenidctl watch --lifecycle --exec sleep 3600"
# * `status --json` has "state": "running" | "freezing" | "frozen".
# * The hook runs `sysgenidctl freeze --timeout-ms N` (exit 3 on timeout)
#   and `sysgenidctl thaw`.
FREEZE_TIMEOUT_MS = 4000
# =========================================================================

AGENT_PORT = "org.qemu.guest_agent.0"           # Debian's dispatcher hook
STRICT_PORT = "org.sysgenid.strict_agent.0"     # packaging/qemu-ga/fsfreeze-hook
DISK_MB = 16
DATA_MNT = "/mnt/data"
STOCK_HOOK_LOG = "/var/log/qga-fsfreeze-hook.log"
STRICT_HOOK_LOG = "/var/log/sysgenid-strict-fsfreeze-hook.log"

# Lines the guest prints on the serial console (host parses these):
#   SGTEST BOOT ...                     init started
#   SGTEST MODULES ok | SGTEST DISK ... kernel modules loaded, disk mounted
#   SGTEST READY gen=<n> state=<s>      daemon, participant and agents up
#   SGTEST LIFE <event> gen=<n>         the participant's command ran
#   SGTEST LIFE-OUT <line>              the participant's stdout
#   SGTEST LIFE-EXIT                    the participant exited
#   SGTEST ALIVE gen=<n> state=<s> up=<secs>   heartbeat every 2 s
#   SGTEST FAIL <why>                   init gave up
LINE_RE = re.compile(r"SGTEST (BOOT|MODULES|DISK|READY|LIFE-OUT|LIFE-EXIT|LIFE|ALIVE|FAIL|WARN)(?: (.*))?$")


def guest_init(modules):
    insmods = "\n".join(f"insmod /lib/modules/sgtest/{n}.ko || fail 'insmod {n} failed'"
                        for n, _ in modules)
    return vmtest.init_prologue("tests/vm/lifecycle_vmtest.py") + f"""{insmods}
say "MODULES ok"

# The agent's ports, by name (udev would make these links).
mkdir -p /dev/virtio-ports
i=0
until [ -e /dev/virtio-ports/{AGENT_PORT} ] && [ -e /dev/virtio-ports/{STRICT_PORT} ]; do
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] || continue
        ln -sf "/dev/${{p##*/}}" "/dev/virtio-ports/$(cat "$p/name")" 2>/dev/null
    done
    i=$((i + 1)); [ $i -le 100 ] || fail "virtio-serial ports did not appear: $(ls /sys/class/virtio-ports 2>&1)"
    sleep 0.1
done
i=0
until [ -b /dev/vda ]; do
    i=$((i + 1)); [ $i -le 100 ] || fail "no /dev/vda"
    sleep 0.1
done
mkdir -p {DATA_MNT}
mount -t ext4 /dev/vda {DATA_MNT} || fail "mount /dev/vda failed"
echo booted > {DATA_MNT}/boot-marker && sync
say "DISK $(grep ' {DATA_MNT} ' /proc/mounts)"

mkdir -p /run/sysgenid
{vmtest.DAEMON_CMD} &
DPID=$!
i=0
until [ -e {q(vmtest.SOCKET)} ] && {vmtest.GET_CMD} >/dev/null 2>&1; do
    kill -0 $DPID 2>/dev/null || fail "daemon exited before serving {vmtest.SOCKET}"
    i=$((i + 1)); [ $i -le 600 ] || fail "daemon did not serve {vmtest.SOCKET} within 60 s"
    sleep 0.1
done

( while :; do
      {LIFE_WATCH_CMD} | while read -r line; do say "LIFE-OUT $line"; done
      say "LIFE-EXIT"; sleep 1
  done ) &

# Two agents: Debian's stock dispatcher (-F: /etc/qemu/fsfreeze-hook) on the
# standard port, ours on a second port. They share the hook directory.
mkdir -p /run/qga0 /run/qga1
qemu-ga -m virtio-serial -p /dev/virtio-ports/{AGENT_PORT} -F -t /run/qga0 -f /run/qga0/pid \\
    -l /run/qga0/log &
FSFREEZE_HOOK_LOG={STRICT_HOOK_LOG} \\
qemu-ga -m virtio-serial -p /dev/virtio-ports/{STRICT_PORT} -F/usr/lib/sysgenid/qemu-ga-fsfreeze-hook \\
    -t /run/qga1 -f /run/qga1/pid -l /run/qga1/log &

( while :; do
      sleep 2
      say "ALIVE gen=$(timeout 5 {vmtest.GET_CMD} 2>&1 | head -n1) state=$(/sgtest-state) up=$(cut -d' ' -f1 /proc/uptime)"
  done ) &

sleep 1
kill -0 $DPID 2>/dev/null || fail "daemon died"
say "READY gen=$({vmtest.GET_CMD} 2>&1 | head -n1) state=$(/sgtest-state)"
while :; do sleep 3600; done
"""


def guest_life():
    return """#!/bin/sh
# The participant's command: one console line per lifecycle event.
echo "SGTEST LIFE ${SYSGENID_EVENT:-unset} gen=${SYSGENID_GENERATION:-unset}" >/dev/console
"""


def guest_state():
    return f"""#!/bin/sh
# Prints the "state" field of `{vmtest.STATUS_JSON_CMD}`.
v=$({vmtest.STATUS_JSON_CMD} 2>/dev/null | tr -d '\\n' | sed -n 's/.*"state"[[:space:]]*:[[:space:]]*"\\([a-z]*\\)".*/\\1/p')
echo "${{v:-none}}"
"""


def build_initramfs(path, busybox, binaries, agent_tree, modules):
    c = vmtest.Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64",
              "etc", "proc", "sys", "dev", "run", "tmp", "root", "var",
              "var/lib", "var/tmp", "var/log", "mnt"):
        c.dir(d)
    c.symlink("var/run", "/run")
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
        c.file(f"usr/bin/{name}", vmtest.stripped(src))
        libs.update(vmtest.shared_libs(src))
    agent = os.path.join(agent_tree, "usr/sbin/qemu-ga")
    with open(agent, "rb") as f:
        c.file("usr/sbin/qemu-ga", f.read())
    libs.update(vmtest.shared_libs(agent))
    for lib in sorted(libs):
        with open(os.path.realpath(lib), "rb") as f:
            c.file(lib, f.read())
    # Debian's own dispatcher, unchanged, and sysgenid's files as shipped.
    with open(os.path.join(agent_tree, "etc/qemu/fsfreeze-hook"), "rb") as f:
        c.file("etc/qemu/fsfreeze-hook", f.read())
    with open(os.path.join(REPO, "packaging/qemu-ga/sysgenid"), "rb") as f:
        c.file("etc/qemu/fsfreeze-hook.d/sysgenid", f.read())
    with open(os.path.join(REPO, "packaging/qemu-ga/fsfreeze-hook"), "rb") as f:
        c.file("usr/lib/sysgenid/qemu-ga-fsfreeze-hook", f.read())
    c.file("etc/default/sysgenid-qemu-ga",
           f"SYSGENID_QGA_FREEZE_TIMEOUT_MS={FREEZE_TIMEOUT_MS}\n".encode(), 0o644)
    for name, data in modules:
        c.file(f"lib/modules/sgtest/{name}.ko", data, 0o644)
    c.file("init", guest_init(modules).encode())
    c.file("sgtest-life", guest_life().encode())
    c.file("sgtest-state", guest_state().encode())
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)
    c.file("etc/group", b"root:x:0:\n", 0o644)
    data = vmtest.gzip.compress(c.finish(), compresslevel=6, mtime=0)
    with open(path, "wb") as f:
        f.write(data)
    return sorted(libs), len(data)


class LifeVM(vmtest.VM):
    """A guest with the data disk and the two agents' virtio-serial ports."""

    def __init__(self, h, name, guid, disk, incoming=None):
        super().__init__(h, name, guid, incoming)
        self.disk = disk
        self.sockets = [os.path.join(h.workdir, f"{name}.qga{i}.sock") for i in (0, 1)]
        self._agents = {}

    def cmdline(self):
        cmd = super().cmdline()
        cmd += ["-drive", f"file={self.disk},if=none,id=data,format=raw,cache=writeback",
                "-device", "virtio-blk-pci,drive=data",
                "-device", "virtio-serial-pci,id=vser0"]
        for i, port in enumerate((AGENT_PORT, STRICT_PORT)):
            cmd += ["-chardev", f"socket,id=qga{i},path={self.sockets[i]},server=on,wait=off",
                    "-device", f"virtserialport,bus=vser0.0,chardev=qga{i},name={port}"]
        return cmd

    def agent(self, i=0, sync_timeout=120):
        """The agent on port i (0: stock dispatcher, 1: strict), synchronized."""
        if i not in self._agents:
            a = QGA(self.sockets[i])
            t = time.monotonic()
            a.sync(sync_timeout)
            self.h.timed(f"{self.name}: agent {i} answers guest-sync", time.monotonic() - t)
            self._agents[i] = a
        return self._agents[i]

    def guest_exec(self, script, timeout=30):
        """Runs `sh -c SCRIPT` in the guest through the agent (not while
        frozen: the agent refuses guest-exec then); (exit code, output)."""
        a = self.agent(0)
        pid = a.cmd("guest-exec", path="/bin/sh", arg=["-c", script],
                    **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            st = a.cmd("guest-exec-status", pid=pid)
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace")
                err = base64.b64decode(st.get("err-data", "")).decode("utf-8", "replace")
                return st.get("exitcode"), out + err
            if time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: guest-exec {script!r} did not finish in {timeout}s")
            time.sleep(0.1)

    def quit(self):
        for a in self._agents.values():
            a.close()
        super().quit()

    def lines(self):
        try:
            with open(self.serial, "rb") as f:
                text = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return []
        out = []
        for raw in text.splitlines():
            m = LINE_RE.search(raw)
            if m:
                out.append((m.group(1), (m.group(2) or "").strip()))
        return out

    def check_guest(self):
        for k, rest in self.lines():
            if k == "FAIL":
                raise TestFailure(f"{self.name}: guest init failed: {rest}\n" + self.diagnostics())
            if k == "LIFE-EXIT":
                raise TestFailure(f"{self.name}: `{LIFE_WATCH_CMD}` exited\n" + self.diagnostics())

    def life(self):
        """The participant's events so far: [(event, generation)]."""
        out = []
        for rest in self.events("LIFE"):
            ev, _, g = rest.partition(" ")
            out.append((ev, field(g, "gen")))
        return out

    def wait_life(self, start, want, timeout=30):
        """Waits until the participant's events after index START begin with
        WANT (a list of (event, generation)); returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_guest()
            got = self.life()[start:]
            if got[:len(want)] == want:
                return got
            if len(got) >= len(want) or time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: participant events {got}, expected {want} first\n"
                                  + self.diagnostics())
            self.check_alive()
            time.sleep(0.05)

    def wait_alive(self, pred, what, timeout=20, fresh_only=True):
        """Waits for a heartbeat for which PRED holds; with FRESH_ONLY, one
        printed after this call (those already seen are skipped)."""
        skip = len(self.events("ALIVE")) if fresh_only else 0
        deadline = time.monotonic() + timeout
        while True:
            self.check_guest()
            fresh = self.events("ALIVE")[skip:]
            for r in fresh:
                if pred(r):
                    return r
            self.check_alive()
            if time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: no heartbeat with {what} in {timeout:.0f}s "
                                  f"(fresh: {fresh})\n" + self.diagnostics())
            time.sleep(0.1)


class Harness:
    def __init__(self):
        self.kernel = os.environ["SYSGENID_VM_KERNEL"]
        self.busybox = os.environ.get("SYSGENID_VM_BUSYBOX", "/bin/busybox")
        self.cache = os.environ.get("SYSGENID_VM_CACHE", "/var/cache/sysgenid-vm")
        self.binaries = {"sysgenidd": os.environ["SYSGENIDD"],
                         "sysgenidctl": os.environ["SYSGENIDCTL"]}
        wd = os.environ.get("SYSGENID_VM_WORKDIR")
        if wd:
            os.makedirs(wd, exist_ok=True)
            self.workdir = wd
        else:
            self.workdir = vmtest.tempfile.mkdtemp(prefix="sysgenid-vm-life.")
        self.initrd = os.path.join(self.workdir, "initrd.gz")
        self.timings = []
        self.results = []
        self.guid = {k: str(uuid.uuid4()) for k in "AB"}
        self.t0 = time.monotonic()

    def timed(self, label, secs):
        self.timings.append((label, secs))
        log(f"  {label}: {secs:.2f}s")
        return secs

    def path(self, name):
        return os.path.join(self.workdir, name)

    # -- steps ----------------------------------------------------------

    def prepare(self):
        t = time.monotonic()
        try:
            agent_tree = guest_packages.qemu_guest_agent(self.cache)
            release, modules = guest_packages.kernel_modules(self.cache, self.kernel)
        except guest_packages.PackageError as e:
            raise TestFailure(str(e)) from None
        with open(os.path.join(agent_tree, "PACKAGE")) as f:
            self.agent_pkg = f.read().strip()
        log(f"guest agent: {self.agent_pkg}; kernel {release}, modules: "
            f"{' '.join(n for n, _ in modules)}")
        if shutil.which("mkfs.ext4") is None:
            log("installing e2fsprogs (mkfs.ext4, for the guest's disk)")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "e2fsprogs"]
            if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                subprocess.run(cmd, env=env, capture_output=True)
            if shutil.which("mkfs.ext4") is None:
                raise TestFailure("mkfs.ext4 missing and apt-get install e2fsprogs failed")
        self.disk = self.path("data.img")
        with open(self.disk, "wb") as f:
            f.truncate(DISK_MB << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "sgdata", self.disk], check=True)
        libs, size = build_initramfs(self.initrd, self.busybox, self.binaries, agent_tree, modules)
        log(f"initramfs {self.initrd}: {size // 1024} KiB; shared libraries: {', '.join(libs)}")
        self.timed("prepare (packages, disk, initramfs)", time.monotonic() - t)

    def boot(self):
        log(f"boot VM 'boot' with GUID A={self.guid['A']}")
        vm = LifeVM(self, "boot", self.guid["A"], self.disk).start()
        rest = vm.wait_for("READY", vmtest.BOOT_TIMEOUT)
        self.timed("boot -> SGTEST READY", time.monotonic() - vm.t_start)
        if field(rest, "gen") != "0" or field(rest, "state") != "running":
            raise TestFailure(f"boot: expected gen=0 state=running, READY says {rest!r}")
        info = vm.agent(0).cmd("guest-info")
        vm.agent(1)
        log(f"  READY {rest}; agent {info.get('version')}")
        self.vm = vm

    def guest_state(self, vm):
        rc, out = vm.guest_exec("/sgtest-state")
        if rc != 0:
            raise TestFailure(f"{vm.name}: /sgtest-state failed ({rc}): {out}")
        return out.strip()

    def wait_participants(self, vm, n, timeout=30):
        """Waits until `status --json` counts N participants."""
        deadline = time.monotonic() + timeout
        while True:
            rc, out = vm.guest_exec(vmtest.STATUS_JSON_CMD)
            try:
                got = json.loads(out).get("participants") if rc == 0 else None
            except ValueError:
                got = None
            if got == n:
                return
            if time.monotonic() > deadline:
                raise TestFailure(f"{vm.name}: expected {n} participants, status says {got} ({rc}): {out}")
            time.sleep(0.2)

    def scenario_strict(self):
        """Our dispatcher: a participant that never confirms makes the
        agent's freeze fail, and nothing stays frozen."""
        vm = self.vm
        rc, out = vm.guest_exec(f"{STUCK_WATCH_CMD} </dev/null >/dev/null 2>&1 & echo $! >/run/stuck.pid")
        if rc != 0:
            raise TestFailure(f"starting the stuck participant failed ({rc}): {out}")
        self.wait_participants(vm, 2)
        n0 = len(vm.life())
        t = time.monotonic()
        try:
            got = vm.agent(1).cmd("guest-fsfreeze-freeze", timeout=60)
            raise TestFailure(f"strict: guest-fsfreeze-freeze succeeded ({got}) with a "
                              "participant that never confirms")
        except QGAError as e:
            err = e
        secs = self.timed("strict agent: freeze with a stuck participant -> error",
                          time.monotonic() - t)
        if "status 3" not in err.desc:
            raise TestFailure(f"strict: expected the hook to fail with status 3, agent said: {err}")
        if secs < FREEZE_TIMEOUT_MS / 1000 * 0.9:
            raise TestFailure(f"strict: the freeze failed after {secs:.1f}s, before its "
                              f"{FREEZE_TIMEOUT_MS} ms timeout: {err}")
        # Far from the hook's 10 s default: /etc/default/sysgenid-qemu-ga was read.
        if secs > 9:
            raise TestFailure(f"strict: the freeze failed only after {secs:.1f}s: the hook did "
                              f"not apply SYSGENID_QGA_FREEZE_TIMEOUT_MS={FREEZE_TIMEOUT_MS} "
                              "from /etc/default/sysgenid-qemu-ga")
        st = vm.agent(1).cmd("guest-fsfreeze-status")
        if st != "thawed":
            raise TestFailure(f"strict: agent's filesystems are {st!r} after the failed freeze")
        # The participant that did confirm was thawed by the abort.
        events = vm.wait_life(n0, [("freeze", "0"), ("thaw", "0")])
        state = self.guest_state(vm)
        if state != "running":
            raise TestFailure(f"strict: sysgenid state {state!r} after the aborted freeze")
        return f"agent error {err.desc!r}; fs thawed; participant {events}; state {state}"

    def scenario_stock(self):
        """Debian's dispatcher ignores the hook's status: the agent's freeze
        succeeds although ours failed (what docs/lifecycle.md warns about)."""
        vm = self.vm
        n0 = len(vm.life())
        frozen = vm.agent(0).cmd("guest-fsfreeze-freeze", timeout=60)
        st = vm.agent(0).cmd("guest-fsfreeze-status")
        thawed = vm.agent(0).cmd("guest-fsfreeze-thaw", timeout=60)
        events = vm.wait_life(n0, [("freeze", "0"), ("thaw", "0")])
        rc, log_text = vm.guest_exec(f"cat {STOCK_HOOK_LOG}")
        if not re.search(r"fsfreeze-hook\.d/sysgenid finished with status=3", log_text):
            raise TestFailure(f"stock: the hook's failure is not in {STOCK_HOOK_LOG}:\n{log_text}")
        if not isinstance(frozen, int) or frozen < 1 or st != "frozen":
            raise TestFailure(f"stock: expected the agent to freeze anyway, got {frozen!r}, {st!r}")
        rc, out = vm.guest_exec("kill -KILL $(cat /run/stuck.pid)")
        if rc != 0:
            raise TestFailure(f"stopping the stuck participant failed ({rc}): {out}")
        self.wait_participants(vm, 1)
        return (f"freeze returned {frozen} (status {st}) although the hook exited 3; "
                f"thaw {thawed}; participant {events[:2]}")

    def scenario_freeze_save_thaw(self):
        vm = self.vm
        n0 = len(vm.life())
        t = time.monotonic()
        frozen = vm.agent(0).cmd("guest-fsfreeze-freeze", timeout=60)
        self.timed("guest-fsfreeze-freeze (hook + filesystems)", time.monotonic() - t)
        if frozen != 1:
            raise TestFailure(f"freeze: the agent froze {frozen!r} filesystems, expected 1 ({DATA_MNT})")
        vm.wait_life(n0, [("freeze", "0")], timeout=5)
        if vm.agent(0).cmd("guest-fsfreeze-status") != "frozen":
            raise TestFailure("freeze: the agent does not report frozen")
        vm.wait_alive(lambda r: field(r, "state") == "frozen", "state=frozen")

        # Save while frozen: pause, write the state, copy the (frozen, so
        # consistent) disk, resume.
        t = time.monotonic()
        vm.qmp.cmd("stop")
        vm.qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 33})
        vm.qmp.cmd("migrate", uri=f"exec:cat > {q(self.path('F.state'))}")
        deadline = t + vmtest.MIGRATE_TIMEOUT
        while True:
            info = vm.qmp.cmd("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise TestFailure(f"save: migration {info}")
            time.sleep(0.02)
        shutil.copyfile(self.disk, self.path("F.disk"))
        vm.qmp.cmd("cont")
        self.timed("save F while frozen (state + disk copy), resume", time.monotonic() - t)

        t = time.monotonic()
        thawed = vm.agent(0).cmd("guest-fsfreeze-thaw", timeout=60)
        self.timed("guest-fsfreeze-thaw", time.monotonic() - t)
        events = vm.wait_life(n0, [("freeze", "0"), ("thaw", "0")])
        vm.wait_alive(lambda r: field(r, "state") == "running" and field(r, "gen") == "0",
                      "gen=0 state=running")
        rc, out = vm.guest_exec(f"echo thawed > {DATA_MNT}/after-thaw && sync && cat {DATA_MNT}/after-thaw")
        if rc != 0 or out.strip() != "thawed":
            raise TestFailure(f"thaw: {DATA_MNT} is not writable again ({rc}): {out}")
        if len(events) != 2:
            raise TestFailure(f"freeze/thaw: participant events {events}, expected exactly 2")
        vm.quit()
        return (f"froze {frozen} fs, participant {events}, saved "
                f"{os.path.getsize(self.path('F.state')) >> 20} MiB, thawed {thawed}")

    def scenario_clone(self):
        shutil.copyfile(self.path("F.disk"), self.path("clone.disk"))
        vm = LifeVM(self, "clone", self.guid["B"], self.path("clone.disk"),
                    incoming=self.path("F.state")).start()
        self.timed("restore clone (qemu start -> guest running)", vm.resume_after_incoming())
        # Frozen at the snapshot: its participant already had (freeze, 0).
        n0 = len(vm.life())
        vm.wait_life(n0, [("change", "1")], timeout=vmtest.GEN_TIMEOUT)
        self.timed("clone: restore -> participant renews (change 1)", time.monotonic() - vm.t_start)
        # Renewed and acknowledged: the daemon thaws by itself and tells it.
        vm.wait_life(n0, [("change", "1"), ("thaw", "1")], timeout=vmtest.GEN_TIMEOUT)
        self.timed("clone: restore -> participant told to thaw", time.monotonic() - vm.t_start)
        beat = vm.wait_alive(lambda r: field(r, "gen") == "1" and field(r, "state") == "running",
                             "gen=1 state=running", timeout=vmtest.GEN_TIMEOUT, fresh_only=False)
        self.timed("clone: restore -> running again, no thaw sent", time.monotonic() - vm.t_start)
        events = vm.life()[n0:]
        if ("thaw", "0") in events:
            raise TestFailure(f"clone: participant saw a thaw for the old generation: {events}")
        # The filesystems are the kernel's: still frozen in the clone, until
        # its own agent is told to thaw them.
        fs = vm.agent(0).cmd("guest-fsfreeze-status")
        thawed = vm.agent(0).cmd("guest-fsfreeze-thaw", timeout=60)
        rc, out = vm.guest_exec("/sgtest-state")
        vm.quit()
        return (f"participant {events}; heartbeat {beat}; clone's filesystems were {fs} "
                f"(agent thaw: {thawed}), state after it {out.strip()}")

    def run(self):
        log(f"work dir {self.workdir}")
        log(f"GUIDs: " + " ".join(f"{k}={v}" for k, v in self.guid.items()))
        scenarios = [
            ("s", "strict hook: stuck participant -> guest-fsfreeze-freeze fails, all thawed",
             self.scenario_strict, []),
            ("t", "stock hook: the same failure is only logged, the agent freezes anyway",
             self.scenario_stock, ["s"]),
            ("f", "guest-fsfreeze-freeze -> participant freezes; save; guest-fsfreeze-thaw -> thaws",
             self.scenario_freeze_save_thaw, []),
            ("c", "clone of the frozen save under GUID B -> generation 1, running, no thaw sent",
             self.scenario_clone, ["f"]),
        ]
        try:
            self.prepare()
            self.boot()
        except (TestFailure, OSError, subprocess.CalledProcessError) as e:
            log(f"FAIL: {e}")
            first = str(e).splitlines()[0]
            for key, title, _, _ in scenarios:
                self.results.append((key, title, "FAIL", f"not run: boot failed: {first}", 0.0))
            vmtest.kill_all()
            return self.summary()
        passed = set()
        for key, title, fn, needs in scenarios:
            log(f"scenario ({key}): {title}")
            if any(n not in passed for n in needs):
                self.results.append((key, title, "SKIP", "needs " + ",".join(needs), 0.0))
                continue
            t = time.monotonic()
            try:
                detail = fn()
                status = "PASS"
                passed.add(key)
            except (TestFailure, QGAError, OSError) as e:
                detail = str(e)
                status = "FAIL"
                log(f"  FAIL: {detail}")
            self.results.append((key, title, status, detail.splitlines()[0], time.monotonic() - t))
            log(f"  {status} ({time.monotonic() - t:.1f}s): {detail.splitlines()[0]}")
        vmtest.kill_all()
        return self.summary()

    def summary(self):
        total = time.monotonic() - self.t0
        print("\n================ sysgenid lifecycle VM test summary ================")
        print("timings:")
        for label, secs in self.timings:
            print(f"  {secs:7.2f}s  {label}")
        print("scenarios:")
        for key, title, status, detail, secs in self.results:
            print(f"  ({key}) {status:4} {secs:5.1f}s  {title}")
            print(f"                   {detail}")
        npass = sum(1 for r in self.results if r[2] == "PASS")
        nfail = len(self.results) - npass
        print(f"total {total:.1f}s; work dir {self.workdir}")
        print(f"vm-lifecycle: {npass} passed, {nfail} failed")
        return nfail == 0


def main():
    for var in ("SYSGENIDD", "SYSGENIDCTL", "SYSGENID_VM_KERNEL"):
        if not os.environ.get(var):
            print(f"lifecycle_vmtest.py: {var} is not set (run tests/vm/run.sh --lifecycle)",
                  file=sys.stderr)
            return 2

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    for s in (vmtest.signal.SIGINT, vmtest.signal.SIGTERM, vmtest.signal.SIGHUP):
        vmtest.signal.signal(s, on_signal)
    h = Harness()
    ok = False
    try:
        ok = h.run()
    except TestFailure as e:
        log(f"FAIL: {e}")
        h.summary()
    finally:
        vmtest.kill_all()
    keep = os.environ.get("SYSGENID_VM_KEEP") == "1" or not ok
    if not keep and not os.environ.get("SYSGENID_VM_WORKDIR"):
        shutil.rmtree(h.workdir, ignore_errors=True)
        log(f"removed {h.workdir} (SYSGENID_VM_KEEP=1 or --keep keeps it)")
    elif not ok:
        log(f"kept {h.workdir} for inspection")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
