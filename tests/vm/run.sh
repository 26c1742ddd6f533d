#!/usr/bin/env bash
# End-to-end test of sysgenid in a QEMU guest: a restore from a snapshot under
# a new vmgenid GUID must bump the system generation, a restore under the
# same GUID must not, and two clones of one snapshot must get different
# epoch ids. See tests/vm/README.md.
#
#   SYSGENIDD=/path/sysgenidd SYSGENIDCTL=/path/sysgenidctl tests/vm/run.sh
#   tests/vm/run.sh --self-test      # harness check with the shell stand-ins
#   ... tests/vm/run.sh --lifecycle  # the freeze/thaw proof with the QEMU guest
#                                    # agent instead (lifecycle_vmtest.py)
#
# This script prepares the host (packages, a cached Debian kernel) and hands
# over to vmtest.py, which builds the initramfs, drives QEMU over QMP and
# asserts the scenarios.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SYSGENID_VM_CACHE:-/var/cache/sysgenid-vm}

usage() {
    cat <<EOF
usage: SYSGENIDD=BIN SYSGENIDCTL=BIN $0 [--keep] [--lifecycle]
       $0 --self-test [--keep] [--lifecycle]

  --self-test  use the shell stand-ins in tests/vm/fake-sysgenid/ (tests the
               harness, not sysgenid)
  --keep       keep the work directory (serial logs, states) even on success
  --lifecycle  run the snapshot-lifecycle proof with the QEMU guest agent
               (lifecycle_vmtest.py) instead of the generation proof

environment: SYSGENIDD, SYSGENIDCTL, SYSGENID_VM_CACHE, SYSGENID_VM_KERNEL,
             SYSGENID_VM_WORKDIR, SYSGENID_VM_KEEP, SYSGENID_VM_RUST_LOG,
             SYSGENID_VM_BOOT_TIMEOUT, SYSGENID_VM_GEN_TIMEOUT,
             SYSGENID_VM_QUIET_WINDOW, SYSGENID_VM_ACCEL (see README.md)
EOF
}

SELF_TEST=0
DRIVER=vmtest.py
while [ $# -gt 0 ]; do
    case $1 in
        --self-test) SELF_TEST=1 ;;
        --keep) export SYSGENID_VM_KEEP=1 ;;
        --lifecycle) DRIVER=lifecycle_vmtest.py ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

log() { echo "[vm] $*"; }
die() { echo "[vm] ERROR: $*" >&2; exit 1; }

if [ "$SELF_TEST" = 1 ]; then
    export SYSGENIDD=$HERE/fake-sysgenid/sysgenidd
    export SYSGENIDCTL=$HERE/fake-sysgenid/sysgenidctl
    log "self-test: using the shell stand-ins in $HERE/fake-sysgenid (NOT the real binaries)"
fi
[ -n "${SYSGENIDD:-}" ] && [ -n "${SYSGENIDCTL:-}" ] ||
    { usage >&2; die "set SYSGENIDD and SYSGENIDCTL (or use --self-test)"; }
for b in "$SYSGENIDD" "$SYSGENIDCTL"; do
    [ -f "$b" ] && [ -x "$b" ] || die "not an executable file: $b"
done

# ---------------------------------------------------------------- packages
APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
apt_install() {
    log "installing: $*"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; then
        apt_update_once
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
            die "apt-get install $* failed"
    fi
}

missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
    missing+=(busybox-static)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v ldd >/dev/null 2>&1 || missing+=(libc-bin)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing packages (${missing[*]}) and not root"
    apt_install "${missing[@]}"
fi
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing after installing busybox-static"

# ------------------------------------------------------------------ kernel
# The guest kernel is Debian's own linux-image-amd64 (CONFIG_VMGENID=y),
# downloaded with apt-get download and unpacked into the cache: never
# installed into /boot.
if [ -n "${SYSGENID_VM_KERNEL:-}" ]; then
    KERNEL=$SYSGENID_VM_KERNEL
    [ -f "$KERNEL" ] || die "SYSGENID_VM_KERNEL=$KERNEL does not exist"
else
    KERNEL=$CACHE/kernel/vmlinuz
    if [ ! -f "$KERNEL" ]; then
        resolve_pkg() {
            apt-cache depends linux-image-amd64 2>/dev/null |
                awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }'
        }
        pkg=$(resolve_pkg)
        if [ -z "$pkg" ]; then apt_update_once; pkg=$(resolve_pkg); fi
        [ -n "$pkg" ] || die "cannot resolve the package behind linux-image-amd64"
        log "downloading kernel package $pkg into $CACHE"
        mkdir -p "$CACHE"
        dl=$(mktemp -d "$CACHE/dl.XXXXXX")
        trap 'rm -rf "$dl"' EXIT
        # _apt cannot write into a root-owned mktemp dir: let it, or apt
        # falls back to an unsandboxed download with a warning.
        chmod 755 "$dl"; chown _apt "$dl" 2>/dev/null || true
        if ! (cd "$dl" && apt-get download -qq "$pkg" >/dev/null); then
            apt_update_once
            (cd "$dl" && apt-get download -qq "$pkg" >/dev/null) || die "apt-get download $pkg failed"
        fi
        dpkg-deb -x "$dl"/"$pkg"_*.deb "$dl/x" || die "dpkg-deb -x failed"
        vmlinuz=$(ls "$dl"/x/boot/vmlinuz-* | head -n1)
        [ -f "$vmlinuz" ] || die "no vmlinuz in $pkg"
        grep -q '^CONFIG_VMGENID=y' "$dl"/x/boot/config-* ||
            log "WARNING: $pkg does not have CONFIG_VMGENID=y built in"
        mkdir -p "$CACHE/kernel"
        cp "$dl"/x/boot/config-* "$CACHE/kernel/config"
        echo "$pkg" > "$CACHE/kernel/PACKAGE"
        cp "$vmlinuz" "$KERNEL.tmp" && mv "$KERNEL.tmp" "$KERNEL"
        rm -rf "$dl"
        trap - EXIT
    fi
    log "kernel: $KERNEL ($(cat "$CACHE/kernel/PACKAGE" 2>/dev/null || echo '?'))"
fi

export SYSGENID_VM_KERNEL=$KERNEL SYSGENID_VM_BUSYBOX=$BUSYBOX SYSGENID_VM_CACHE=$CACHE
exec python3 "$HERE/$DRIVER"
