#!/usr/bin/env python3
"""The host channel on a real virtio-vsock device: the driver behind
`tests/vm/run.sh --host-channel` (see tests/vm/README.md, "Host channel").

The guest has no vmgenid device (the hypervisors this is for do not give
one) and a vhost-user-vsock-pci device served on the host by
vhost-device-vsock (the rust-vmm backend), whose host side is the hybrid
vsock Unix socket of Firecracker and Cloud Hypervisor. The guest runs
`sysgenidd --source none --host-channel vsock:1024` and a lifecycle
participant that prints every event (with 16 bytes of getrandom) on the
serial console. The host drives it only with `sysgenidctl --host-channel
uds:PATH:1024`:
  get, status --json, wait-watchers, thaw      every command answers;
  (guest) vsock loopback CID 1 -> refused      a local process is not the host;
  freeze -> snapshot (QMP migrate) -> quit;
  two clones restored from the frozen snapshot, each with its own backend:
  status says frozen; `restored --clone` -> generation 1, the participant
  renews, the daemon thaws by itself; wait-watchers answers; the clones'
  epochs and getrandom output differ.

run.sh runs it once per lane: the stable kernel under the host's QEMU,
and the newest kernel under the development suite's QEMU from a chroot
(SYSGENID_VM_QEMU, SYSGENID_VM_MODULES_DIR, SYSGENID_VM_WORKDIR; the
backend's sockets live in the work dir, which the chroot sees at the same
path).

Standard library only; reuses vmtest.py's initramfs writer, QMP client and
VM runner, and guest_packages.py for the kernel modules.
"""

import sys

sys.dont_write_bytecode = True  # keep the source tree clean

import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import guest_packages  # noqa: E402
import vmtest  # noqa: E402
from vmtest import TestFailure, field, log  # noqa: E402

PORT = 1024
GUEST_CID = 3
DAEMON_CMD = f"sysgenidd --runtime-dir /run/sysgenid --source none --host-channel vsock:{PORT}"
# virtio_ring first: Debian 6.1's virtio.ko uses it without naming it.
# The newest lane's 7.x kernel has the first three built in
# (guest_packages skips what its modules.builtin lists).
MODULE_ROOTS = ["virtio_ring", "virtio", "virtio_pci", "vsock",
                "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport",
                "vsock_loopback"]
LIFE_WATCH_CMD = "sysgenidctl watch --lifecycle --exec /sgtest-life"
# `sysgenid-rng reseed` forces a kernel CRNG reseed (RNDRESEEDCRNG);
# `sysgenid-rng get 16` prints 16 bytes of getrandom in hex
# (crates/sysgenid-tests, built next to sysgenidctl).
RNG_TOOL = "sysgenid-rng"

LINE_RE = re.compile(r"SGTEST (BOOT|MODULES|LOOPBACK|READY|LIFE-EXIT|LIFE|ALIVE|FAIL)(?: (.*))?$")


def guest_init(modules):
    insmods = "\n".join(f"insmod /lib/modules/sgtest/{n}.ko || fail 'insmod {n} failed'"
                        for n, _ in modules)
    return vmtest.init_prologue("tests/vm/host_channel_vmtest.py") + f"""{insmods}
say "MODULES ok"
mkdir -p /run/sysgenid
{DAEMON_CMD} &
DPID=$!
i=0
until sysgenidctl get >/dev/null 2>&1; do
    kill -0 $DPID 2>/dev/null || fail "daemon exited"
    i=$((i + 1)); [ $i -le 600 ] || fail "daemon did not come up"
    sleep 0.1
done
( while :; do {LIFE_WATCH_CMD} >/dev/null; say "LIFE-EXIT"; sleep 1; done ) &
# A local process through vsock loopback (CID 1) is not the host.
out=$(sysgenidctl --host-channel vsock:1:{PORT} get 2>&1); rc=$?
say "LOOPBACK rc=$rc out=$(echo "$out" | head -n1)"
( while :; do
      sleep 2
      say "ALIVE gen=$(sysgenidctl get 2>&1 | head -n1) state=$(/sgtest-state)"
  done ) &
sleep 1
say "READY gen=$(sysgenidctl get 2>&1) state=$(/sgtest-state)"
while :; do sleep 3600; done
"""


def guest_life():
    return f"""#!/bin/sh
# One console line per lifecycle event, with 16 bytes of getrandom. On a
# freeze it first forces a kernel CRNG reseed: the snapshot that follows
# within seconds holds a freshly reseeded generator, so only a reseed after
# the restore can make the clones' streams differ (issue 17's setting).
reseed=
if [ "$SYSGENID_EVENT" = freeze ]; then {RNG_TOOL} reseed >/dev/null 2>&1; reseed=" reseed=$?"; fi
r=$({RNG_TOOL} get 16 2>&1)
echo "SGTEST LIFE ${{SYSGENID_EVENT:-unset}} gen=${{SYSGENID_GENERATION:-unset}} rand=$r$reseed" >/dev/console
"""


def guest_state():
    return """#!/bin/sh
v=$(sysgenidctl status --json 2>/dev/null | tr -d '\\n' | sed -n 's/.*"state"[[:space:]]*:[[:space:]]*"\\([a-z]*\\)".*/\\1/p')
echo "${v:-none}"
"""


def build_initramfs(path, busybox, binaries, modules):
    c = vmtest.Cpio()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "lib", "lib64",
              "etc", "proc", "sys", "dev", "run", "tmp", "root", "var"):
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
        c.file(f"usr/bin/{name}", vmtest.stripped(src))
        libs.update(vmtest.shared_libs(src))
    for lib in sorted(libs):
        with open(os.path.realpath(lib), "rb") as f:
            c.file(lib, f.read())
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
    return len(data)


class VsockVM(vmtest.VM):
    """A guest without vmgenid, with a vhost-user vsock device served by its
    own vhost-device-vsock process (hybrid socket: `<name>.vsock`)."""

    def __init__(self, h, name, incoming=None, attach=True):
        super().__init__(h, name, "unused", incoming)
        self.attach = attach
        self.vhu = os.path.join(h.workdir, f"{name}.vhu.sock")
        self.uds = os.path.join(h.workdir, f"{name}.vsock")
        self.target = f"uds:{self.uds}:{PORT}"
        self.backend = None

    def cmdline(self):
        cmd = super().cmdline()
        i = cmd.index("-device")
        assert cmd[i + 1].startswith("vmgenid"), cmd
        del cmd[i:i + 2]
        cmd += ["-object", f"memory-backend-memfd,id=mem,size={vmtest.MEM_MB}M,share=on",
                "-numa", "node,memdev=mem",
                # A hot-pluggable slot: neither QEMU 7.2 nor 11.1 can
                # migrate a vhost-user vsock device, so it is unplugged
                # before a snapshot and plugged in again after a restore.
                "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1",
                "-chardev", f"socket,id=vhu,path={self.vhu}"]
        if self.attach:
            cmd += ["-device", "vhost-user-vsock-pci,id=vsock0,chardev=vhu,bus=rp1"]
        return cmd

    def vsock_present(self):
        for bus in self.qmp.cmd("query-pci"):
            for dev in bus.get("devices", []):
                for sub in [dev] + dev.get("pci_bridge", {}).get("devices", []):
                    if sub.get("qdev_id") == "vsock0":
                        return True
        return False

    def unplug_vsock(self, timeout=60):
        """QMP device_del, then waits until the guest has let it go."""
        t = time.monotonic()
        self.qmp.cmd("device_del", id="vsock0")
        while self.vsock_present():
            if time.monotonic() - t > timeout:
                raise TestFailure(f"{self.name}: the guest did not release the vsock device "
                                  f"in {timeout}s\n" + self.diagnostics())
            time.sleep(0.2)
        self.h.timed(f"{self.name}: vsock device unplugged (device_del)", time.monotonic() - t)

    def plug_vsock(self):
        """QMP device_add of the vsock device (after a restore)."""
        self.qmp.cmd("device_add", driver="vhost-user-vsock-pci", id="vsock0",
                     chardev="vhu", bus="rp1")

    def start(self):
        for p in (self.vhu, self.uds):
            if os.path.exists(p):
                os.unlink(p)
        self.backend_log = open(os.path.join(self.h.workdir, f"{self.name}.backend.log"), "wb")
        self.backend = subprocess.Popen(
            [self.h.backend, "--vm", f"guest-cid={GUEST_CID},socket={self.vhu},uds-path={self.uds}"],
            stdin=subprocess.DEVNULL, stdout=self.backend_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.vhu):
            if self.backend.poll() is not None or time.monotonic() > deadline:
                raise TestFailure(f"{self.name}: vhost-device-vsock did not create {self.vhu}")
            time.sleep(0.05)
        return super().start()

    def kill(self):
        super().kill()
        self.stop_backend()

    def quit(self):
        super().quit()
        self.stop_backend()

    def stop_backend(self):
        if self.backend and self.backend.poll() is None:
            self.backend.terminate()
            try:
                self.backend.wait(5)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()

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
                raise TestFailure(f"{self.name}: the participant exited\n" + self.diagnostics())

    def life(self):
        return self.events("LIFE")

    def ctl(self, *args, timeout=60):
        """`sysgenidctl --host-channel uds:...:PORT ARGS` on the host."""
        t = time.monotonic()
        r = subprocess.run([self.h.ctl, "--host-channel", self.target, *args],
                           capture_output=True, text=True, timeout=timeout)
        self.h.timed(f"{self.name}: host {' '.join(args)} (exit {r.returncode})",
                     time.monotonic() - t)
        return r


class Harness:
    def __init__(self):
        self.kernel = os.environ["SYSGENID_VM_KERNEL"]
        self.busybox = os.environ.get("SYSGENID_VM_BUSYBOX", "/bin/busybox")
        self.cache = os.environ.get("SYSGENID_VSOCK_CACHE", "/var/cache/sysgenid-vsock")
        self.backend = os.environ["SYSGENID_VSOCK_BACKEND"]
        self.ctl = os.environ["SYSGENIDCTL"]
        rng = os.environ.get("SYSGENID_VM_RNG") or os.path.join(os.path.dirname(self.ctl), RNG_TOOL)
        self.binaries = {"sysgenidd": os.environ["SYSGENIDD"], "sysgenidctl": self.ctl,
                         RNG_TOOL: rng}
        wd = os.environ.get("SYSGENID_VM_WORKDIR")
        # Removed after a pass unless given or SYSGENID_VM_KEEP=1 (~150 MB
        # of state); always kept after a failure.
        self.keep = bool(wd) or os.environ.get("SYSGENID_VM_KEEP") == "1"
        if wd:
            os.makedirs(wd, exist_ok=True)
            self.workdir = wd
        else:
            self.workdir = vmtest.tempfile.mkdtemp(prefix="sysgenid-vm-hostch.")
        self.initrd = os.path.join(self.workdir, "initrd.gz")
        self.timings = []
        self.results = []

    def timed(self, label, secs):
        self.timings.append((label, secs))
        log(f"  {label}: {secs:.2f}s")
        return secs

    def expect(self, vm, r, code, what):
        if r.returncode != code:
            raise TestFailure(f"{vm.name}: host `{what}` exited {r.returncode}, expected {code}: "
                              f"{r.stdout}{r.stderr}\n" + vm.diagnostics())
        return r.stdout.strip()

    def status(self, vm):
        r = vm.ctl("status", "--json")
        return json.loads(self.expect(vm, r, 0, "status --json"))

    def prepare(self):
        release, modules = guest_packages.kernel_modules(self.cache, self.kernel, MODULE_ROOTS)
        log(f"kernel {release}, modules: {' '.join(n for n, _ in modules)}")
        size = build_initramfs(self.initrd, self.busybox, self.binaries, modules)
        log(f"initramfs {self.initrd}: {size // 1024} KiB; backend {self.backend}")

    def boot(self):
        vm = VsockVM(self, "boot").start()
        rest = vm.wait_for("READY", vmtest.BOOT_TIMEOUT)
        self.timed("boot -> SGTEST READY", time.monotonic() - vm.t_start)
        if field(rest, "gen") != "0":
            raise TestFailure(f"boot: READY says {rest!r}")
        self.vm = vm

    def scenario_commands(self):
        """Every host command over uds:PATH:PORT; loopback refused."""
        vm = self.vm
        lb = vm.events("LOOPBACK")[0]
        # Exit 4 is PermissionDenied, the host channel's refusal of CID 1.
        if field(lb, "rc") != "4" or "CID 1" not in lb:
            raise TestFailure(f"guest-local vsock loopback was not refused as expected: {lb!r}")
        log(f"  guest loopback: {lb}")
        if self.expect(vm, vm.ctl("get"), 0, "get") != "0":
            raise TestFailure("get over uds did not answer 0")
        st = self.status(vm)
        if st.get("state") != "running" or not any(s.get("name") == "host" for s in st["sources"]):
            raise TestFailure(f"status over uds: {st}")
        self.expect(vm, vm.ctl("wait-watchers", "--timeout-ms", "20000"), 0, "wait-watchers")
        self.expect(vm, vm.ctl("thaw"), 0, "thaw")
        self.epoch0 = st["epoch"]

    def scenario_freeze_snapshot(self):
        vm = self.vm
        self.expect(vm, vm.ctl("freeze", "--timeout-ms", "30000"), 0, "freeze")
        frz = vm.wait_for("LIFE", 30, lambda r: r.startswith("freeze"), "participant freeze")
        if field(frz, "reseed") != "0":
            raise TestFailure(f"the guest could not force a kernel reseed before the snapshot: {frz!r}")
        if self.status(vm).get("state") != "frozen":
            raise TestFailure("not frozen after freeze")
        self.state = os.path.join(self.workdir, "S.state")
        vm.unplug_vsock()
        self.timed("snapshot (QMP migrate) of the frozen guest", vm.save(self.state))

    def restore(self, name):
        vm = VsockVM(self, name, incoming=self.state, attach=False).start()
        self.timed(f"restore {name} (qemu start -> guest running)", vm.resume_after_incoming())
        vm.plug_vsock()
        t = time.monotonic()
        while True:
            r = subprocess.run([self.ctl, "--host-channel", vm.target, "get"],
                               capture_output=True, text=True, timeout=60)
            if r.returncode == 0:
                break
            vm.check_alive()
            vm.check_guest()
            if time.monotonic() - t > 120:
                raise TestFailure(f"{name}: the host channel did not answer after device_add: "
                                  f"{r.stderr}\n" + vm.diagnostics())
            time.sleep(0.5)
        self.timed(f"{name}: device_add -> host channel answers", time.monotonic() - t)
        return vm

    def scenario_clones(self):
        clones = [self.restore("clone1"), self.restore("clone2")]
        out = []
        for vm in clones:
            # The restored guest is still frozen until the host says so.
            st = self.status(vm)
            if st.get("state") != "frozen" or st.get("generation") != 0:
                raise TestFailure(f"{vm.name}: expected frozen at 0 after restore, got {st}")
            r = vm.ctl("restored", "--clone")
            if self.expect(vm, r, 0, "restored --clone") != "1":
                raise TestFailure(f"{vm.name}: restored answered {r.stdout!r}")
            change = vm.wait_for("LIFE", 30, lambda x: x.startswith("change gen=1"),
                                 "participant change gen=1")
            vm.wait_for("LIFE", 30, lambda x: x.startswith("thaw"), "participant thaw")
            self.expect(vm, vm.ctl("wait-watchers", "--timeout-ms", "30000"), 0, "wait-watchers")
            st = self.status(vm)
            if st.get("state") != "running" or st.get("last_change_sources") != ["host"]:
                raise TestFailure(f"{vm.name}: after restored: {st}")
            rng = st.get("last_change_rng") or {}
            if (st.get("last_change_kind") != "clone" or not rng.get("reseeded")
                    or rng.get("entropy_mixed", 0) < 32):
                raise TestFailure(f"{vm.name}: the change is not a clone with the kernel reseeded "
                                  f"and host entropy mixed in: kind {st.get('last_change_kind')}, "
                                  f"rng {rng}")
            out.append((vm.name, st["epoch"], field(change, "rand")))
            log(f"  {vm.name}: generation {st['generation']}, epoch {st['epoch']}, "
                f"kind {st['last_change_kind']}, rng {rng}, "
                f"getrandom after the change {field(change, 'rand')}")
        (_, e1, r1), (_, e2, r2) = out
        if e1 == e2 or self.epoch0 in (e1, e2):
            raise TestFailure(f"clone epochs not distinct: {e1} {e2} (boot {self.epoch0})")
        if not r1 or r1 == r2:
            raise TestFailure(f"clone getrandom output not distinct: {r1} {r2}")
        for vm in clones:
            vm.quit()

    def run(self):
        steps = [("prepare", self.prepare), ("boot", self.boot),
                 ("host commands over uds; loopback refused", self.scenario_commands),
                 ("freeze, snapshot", self.scenario_freeze_snapshot),
                 ("two clones: restored --clone thaws them, distinct epochs and getrandom",
                  self.scenario_clones)]
        ok = True
        if vmtest.LANE:
            log(f"lane {vmtest.LANE}")
        for name, fn in steps:
            log(f"== {name}")
            try:
                fn()
                self.results.append((name, "PASS", ""))
            except TestFailure as e:
                self.results.append((name, "FAIL", str(e)))
                log(f"FAIL {name}: {e}")
                ok = False
                break
        vmtest.kill_all()
        if vmtest.LANE:
            print(f"==== host-channel lane {vmtest.LANE}")
        for name, verdict, _ in self.results:
            print(f"  {verdict}  {name}")
        print(f"host-channel vm: {sum(v == 'PASS' for _, v, _ in self.results)} passed, "
              f"{sum(v == 'FAIL' for _, v, _ in self.results)} failed; work dir {self.workdir}"
              + ("" if self.keep or not ok else " (removed)"))
        if ok and not self.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return ok


if __name__ == "__main__":
    sys.exit(0 if Harness().run() else 1)
