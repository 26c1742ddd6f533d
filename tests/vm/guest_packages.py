"""What the lifecycle guest needs beyond busybox, from Debian's archive.

The QEMU guest agent proof (lifecycle_vmtest.py) runs Debian's own
`qemu-guest-agent` package in the guest, which talks over a virtio-serial
port and freezes an ext4 filesystem on a virtio disk. Debian's kernel builds
all of that as modules, so the guest also needs the modules of the very
kernel it boots: virtio_pci, virtio_console, virtio_blk, ext4 and what they
depend on. Both come from `apt-get download` + `dpkg-deb -x`, are never
installed on the host, and are cached under $SYSGENID_VM_CACHE.

Standard library only.
"""

import lzma
import os
import re
import shutil
import subprocess
import tempfile

# The modules the guest loads (their dependencies are added), in this order
# of roots. crc32c_generic is requested by ext4 through the crypto API at
# mount time (metadata_csum), which would need a working modprobe.
MODULE_ROOTS = ["virtio_pci", "virtio_console", "virtio_blk", "crc32c_generic", "ext4"]


class PackageError(Exception):
    pass


def log(msg):
    print(f"[vm] {msg}", flush=True)


def _run(cmd, cwd=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise PackageError(f"{' '.join(cmd)} failed (rc {out.returncode}):\n{out.stderr.strip()}")
    return out.stdout


_apt_updated = False


def _download(pkg, into):
    """`apt-get download PKG` into the directory INTO; the .deb's path."""
    global _apt_updated
    os.chmod(into, 0o755)
    try:  # let apt's sandbox user write there (no warning, no fallback)
        shutil.chown(into, user="_apt")
    except (LookupError, OSError):
        pass
    try:
        _run(["apt-get", "download", "-qq", pkg], cwd=into)
    except PackageError:
        if _apt_updated:
            raise
        log("apt-get update")
        _run(["apt-get", "update", "-qq"])
        _apt_updated = True
        _run(["apt-get", "download", "-qq", pkg], cwd=into)
    debs = [f for f in os.listdir(into) if f.endswith(".deb")]
    if len(debs) != 1:
        raise PackageError(f"apt-get download {pkg}: expected one .deb, found {debs}")
    return os.path.join(into, debs[0])


def kernel_release(bzimage):
    """The release string (`uname -r`) of an x86 bzImage, from its setup
    header (the `kernel_version` pointer at 0x20e)."""
    with open(bzimage, "rb") as f:
        head = f.read(0x8000)
    if head[0x202:0x206] != b"HdrS":
        raise PackageError(f"{bzimage} is not an x86 bzImage")
    off = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    text = head[off:off + 256].split(b"\0")[0].decode("ascii", "replace")
    return text.split(" ")[0]


# ---------------------------------------------------------------- qemu-ga

def qemu_guest_agent(cache):
    """Debian's qemu-guest-agent, unpacked under CACHE/qemu-ga: the path of
    the unpacked tree (usr/sbin/qemu-ga, etc/qemu/fsfreeze-hook). The host
    gets the agent's shared libraries installed (apt) when it lacks them, so
    `ldd` can resolve them for the initramfs."""
    root = os.path.join(cache, "qemu-ga")
    tree = os.path.join(root, "x")
    if not os.path.exists(os.path.join(tree, "usr/sbin/qemu-ga")):
        os.makedirs(root, exist_ok=True)
        dl = tempfile.mkdtemp(prefix="dl.", dir=root)
        try:
            deb = _download("qemu-guest-agent", dl)
            log(f"unpacking {os.path.basename(deb)} into {root}")
            _run(["dpkg-deb", "-x", deb, os.path.join(dl, "x")])
            depends = _run(["dpkg-deb", "-f", deb, "Depends"]).strip()
            with open(os.path.join(dl, "x", "DEPENDS"), "w") as f:
                f.write(depends + "\n")
            with open(os.path.join(dl, "x", "PACKAGE"), "w") as f:
                f.write(os.path.basename(deb) + "\n")
            shutil.rmtree(tree, ignore_errors=True)
            os.rename(os.path.join(dl, "x"), tree)
        finally:
            shutil.rmtree(dl, ignore_errors=True)
    _install_missing_libraries(tree)
    return tree


def _install_missing_libraries(tree):
    out = subprocess.run(["ldd", os.path.join(tree, "usr/sbin/qemu-ga")],
                         capture_output=True, text=True)
    if "not found" not in out.stdout:
        return
    with open(os.path.join(tree, "DEPENDS")) as f:
        names = [re.split(r"[\s(]", d.strip().split("|")[0].strip())[0]
                 for d in f.read().split(",") if d.strip()]
    log(f"installing the agent's libraries on the host: {' '.join(names)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + names
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        _run(["apt-get", "update", "-qq"])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise PackageError(f"apt-get install {' '.join(names)} failed:\n{out.stderr}")


# ---------------------------------------------------------------- modules

def _modinfo_depends(data):
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", data)
    if not m or not m.group(1):
        return []
    return m.group(1).decode().split(",")


def _read_module(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".zst"):
        out = subprocess.run(["zstd", "-dc", path], capture_output=True)
        if out.returncode != 0:
            raise PackageError(f"cannot decompress {path} (is zstd installed?)")
        return out.stdout
    return data


def _module_index(moddir):
    """Module name (with `_`) -> file, for every module under MODDIR."""
    index = {}
    for dirpath, _, files in os.walk(moddir):
        for f in files:
            m = re.match(r"^(.*)\.ko(\.xz|\.zst)?$", f)
            if m:
                index[m.group(1).replace("-", "_")] = os.path.join(dirpath, f)
    return index


def _builtin(moddir):
    """Names (with `_`) of the modules MODDIR's modules.builtin lists."""
    try:
        with open(os.path.join(moddir, "modules.builtin")) as f:
            lines = f.read().split()
    except FileNotFoundError:
        return set()
    return {re.sub(r"\.ko$", "", os.path.basename(p)).replace("-", "_") for p in lines}


def _closure(index, roots):
    """(name, uncompressed bytes) in load order: dependencies first."""
    order, seen, blobs = [], set(), {}

    def visit(name, chain):
        if name in seen:
            return
        if name in chain:
            raise PackageError(f"module dependency cycle: {' -> '.join(chain + [name])}")
        path = index.get(name)
        if path is None:
            raise PackageError(f"module {name} not found (built in? then drop it from MODULE_ROOTS)")
        data = _read_module(path)
        for dep in _modinfo_depends(data):
            visit(dep.replace("-", "_"), chain + [name])
        seen.add(name)
        blobs[name] = data
        order.append(name)

    for r in roots:
        visit(r, [])
    return [(n, blobs[n]) for n in order]


def kernel_modules(cache, kernel, roots=None):
    """The modules ROOTS (default MODULE_ROOTS) need for KERNEL (a bzImage),
    dependencies first, as (name, bytes). From $SYSGENID_VM_MODULES_DIR (a
    lib/modules/<release> tree) if set, else from Debian's
    linux-image-<release> package, whose module tree is cached under
    CACHE/modules/<release> (only the modules used here are kept; give
    another CACHE for another set of roots)."""
    roots = roots or MODULE_ROOTS
    release = kernel_release(kernel)
    given = os.environ.get("SYSGENID_VM_MODULES_DIR")
    if given:
        # A root the kernel has built in (its modules.builtin, when the
        # tree has one) needs no .ko: the newest lane's 7.x kernel has
        # virtio and virtio_pci built in, Debian 12's 6.1 has them as modules.
        builtin = _builtin(given)
        skipped = [r for r in roots if r in builtin]
        if skipped:
            log(f"built into {release}: {' '.join(skipped)}")
        return release, _closure(_module_index(given), [r for r in roots if r not in builtin])
    keep = os.path.join(cache, "modules", release)
    done = os.path.join(keep, "COMPLETE")
    stamp = " ".join(roots) + "\n"
    try:
        with open(done) as f:
            fresh = f.read() == stamp
    except FileNotFoundError:
        fresh = False
    if not fresh:
        pkg = f"linux-image-{release}"
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        dl = tempfile.mkdtemp(prefix="dl.", dir=os.path.dirname(keep))
        try:
            try:
                deb = _download(pkg, dl)
            except PackageError as e:
                raise PackageError(
                    f"the guest kernel is {release}, but {pkg} cannot be downloaded ({e}); "
                    "set SYSGENID_VM_MODULES_DIR to its lib/modules/<release> directory") from None
            log(f"unpacking the modules the guest needs from {os.path.basename(deb)}")
            _run(["dpkg-deb", "-x", deb, os.path.join(dl, "x")])
            tree = os.path.join(dl, "x", "lib", "modules", release)
            if not os.path.isdir(tree):
                tree = os.path.join(dl, "x", "usr", "lib", "modules", release)
            needed = _closure(_module_index(tree), roots)
            shutil.rmtree(keep, ignore_errors=True)
            os.makedirs(keep)
            for name, data in needed:
                with open(os.path.join(keep, name + ".ko"), "wb") as f:
                    f.write(data)
            with open(done, "w") as f:
                f.write(stamp)
        finally:
            shutil.rmtree(dl, ignore_errors=True)
    return release, _closure(_module_index(keep), roots)
