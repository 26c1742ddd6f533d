#!/usr/bin/env bash
# End-to-end test of sysgenid in a QEMU guest: a restore from a snapshot under
# a new vmgenid GUID must bump the system generation, a restore under the
# same GUID must not, and two clones of one snapshot must get different
# epoch ids. See tests/vm/README.md.
#
#   SYSGENIDD=/path/sysgenidd SYSGENIDCTL=/path/sysgenidctl tests/vm/run.sh
#   tests/vm/run.sh --self-test      # harness check with the shell stand-ins
#   ... tests/vm/run.sh --lifecycle  # the freeze/thaw proof with the QEMU guest
#                                    # agent instead (lifecycle_vmtest.py, stable
#                                    # lane only; tests/vm/LIFECYCLE.md)
#   ... tests/vm/run.sh --host-channel  # the host channel on a real virtio-vsock
#                                    # device (vhost-device-vsock, hybrid vsock
#                                    # socket; host_channel_vmtest.py, both lanes)
#
# This script prepares the host (packages, cached Debian kernels, a cached
# chroot with the development suite's QEMU) and hands over to vmtest.py,
# once per lane, which builds the initramfs, drives QEMU over QMP and
# asserts the scenarios.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SYSGENID_VM_CACHE:-/var/cache/sysgenid-vm}

usage() {
    cat <<EOF
usage: SYSGENIDD=BIN SYSGENIDCTL=BIN $0 [--keep] [--lifecycle|--host-channel]
       $0 --self-test [--keep] [--lifecycle]

  --self-test  use the shell stand-ins in tests/vm/fake-sysgenid/ (tests the
               harness, not sysgenid)
  --keep       keep the work directory (serial logs, states) even on success
  --lifecycle  run the snapshot-lifecycle proof with the QEMU guest agent
               (lifecycle_vmtest.py, stable kernel and host QEMU) instead
  --host-channel
               run the host-channel proof on a vhost-user vsock device
               (host_channel_vmtest.py) instead, in the lanes of
               SYSGENID_VM_LANES like the default mode; last line
               "host-channel lanes: stable=PASS newest=PASS" (builds
               vhost-device-vsock with cargo install into
               \$SYSGENID_VSOCK_CACHE, default /var/cache/sysgenid-vsock)

environment: SYSGENIDD, SYSGENIDCTL, SYSGENID_VM_LANES (stable,newest),
             SYSGENID_VM_NEWEST_SUITE (sid), SYSGENID_VM_CACHE, SYSGENID_VM_KERNEL,
             SYSGENID_VM_WORKDIR, SYSGENID_VM_KEEP, SYSGENID_VM_RUST_LOG,
             SYSGENID_VM_BOOT_TIMEOUT, SYSGENID_VM_GEN_TIMEOUT,
             SYSGENID_VM_QUIET_WINDOW, SYSGENID_VM_ACCEL (see README.md)
EOF
}

SELF_TEST=0
LIFECYCLE=0
HOST_CHANNEL=0
while [ $# -gt 0 ]; do
    case $1 in
        --self-test) SELF_TEST=1 ;;
        --keep) export SYSGENID_VM_KEEP=1 ;;
        --lifecycle) LIFECYCLE=1 ;;
        --host-channel) HOST_CHANNEL=1 ;;
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

# ------------------------------------------------------------------ kernels
# Two lanes, each a whole run of vmtest.py:
#   stable  the host suite's kernel (linux-image-amd64's dependency, e.g.
#           Debian 12's 6.1) under the host's QEMU;
#   newest  the development suite's kernel (sid: 7.x, CONFIG_VMGENID=y,
#           ptp_vmclock as a module) under the development suite's QEMU
#           (11.x, which has the `vmclock` device), run from a debootstrap
#           chroot: scenario (v) proves the vmclock source on the guest's
#           real /dev/vmclock0.
# Everything downloaded is cached under $CACHE; nothing is installed into
# /boot or added to the host's apt sources. SYSGENID_VM_LANES picks lanes.
# (--self-test: the shell stand-ins know nothing of vmclock: stable only.)
if [ "$SELF_TEST" = 1 ]; then
    LANES=${SYSGENID_VM_LANES:-stable}
else
    LANES=${SYSGENID_VM_LANES:-stable,newest}
fi

# Unpacks PKG.deb's FILE (a path in the package, glob allowed) to DEST.
deb_extract() {
    local deb=$1 pattern=$2 dest=$3 tmp
    tmp=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards "$pattern" 2>/dev/null || true
    local found
    found=$(find "$tmp" -path "*${pattern#./}" -type f | head -n1)
    [ -n "$found" ] && cp "$found" "$dest"
    rm -rf "$tmp"
    [ -n "$found" ]
}

# Unpacks the directory DIR of PKG.deb (a path in the package, glob
# allowed) into DEST/<basename of DIR>.
deb_extract_tree() {
    local deb=$1 pattern=$2 dest=$3 tmp found
    tmp=$(mktemp -d)
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards "$pattern" 2>/dev/null || true
    found=$(find "$tmp" -path "*${pattern#./}" -type d | head -n1)
    if [ -n "$found" ]; then mkdir -p "$dest" && cp -r "$found" "$dest/"; fi
    rm -rf "$tmp"
    [ -n "$found" ]
}

stable_kernel() {
    if [ -n "${SYSGENID_VM_KERNEL:-}" ]; then
        KERNEL=$SYSGENID_VM_KERNEL
        [ -f "$KERNEL" ] || die "SYSGENID_VM_KERNEL=$KERNEL does not exist"
        return
    fi
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
    log "stable kernel: $KERNEL ($(cat "$CACHE/kernel/PACKAGE" 2>/dev/null || echo '?')), $(qemu-system-x86_64 --version | head -n1)"
}

# The archive the host's apt sources name (not its security archive).
debian_mirror() {
    local uri
    uri=$(grep -rhoE '(deb\s+|URIs:\s*)https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
        grep -oE 'https?://[^ ]+' | grep -v -- '-security' | grep -E '/debian/?$' | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

NEWEST_SUITE=${SYSGENID_VM_NEWEST_SUITE:-sid}
NEWEST_ROOT=$CACHE/$NEWEST_SUITE-root
NEWEST_KDIR=$CACHE/kernel-$NEWEST_SUITE

# The development suite's QEMU in a debootstrap chroot (cached).
newest_qemu() {
    if [ ! -x "$NEWEST_ROOT/usr/bin/qemu-system-x86_64" ]; then
        command -v debootstrap >/dev/null 2>&1 || apt_install debootstrap
        local mirror tmp=$NEWEST_ROOT.tmp
        mirror=$(debian_mirror)
        rm -rf "$tmp"
        log "debootstrap $NEWEST_SUITE from $mirror into $tmp (cached for later runs)"
        debootstrap --variant=minbase "$NEWEST_SUITE" "$tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
            die "debootstrap failed, see $CACHE/debootstrap.log"
        log "installing qemu-system-x86 in the chroot"
        chroot "$tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            qemu-system-x86 >"$CACHE/chroot-apt.log" 2>&1 ||
            die "apt-get install qemu-system-x86 in the chroot failed, see $CACHE/chroot-apt.log"
        chroot "$tmp" apt-get clean
        mv "$tmp" "$NEWEST_ROOT"
    fi
    chroot "$NEWEST_ROOT" qemu-system-x86_64 -device help 2>/dev/null | grep -q '"vmclock"' ||
        die "the $NEWEST_SUITE QEMU has no vmclock device"
}

# The development suite's newest kernel: vmlinuz, its config and the
# ptp_vmclock module (decompressed), downloaded inside the chroot with apt.
newest_kernel() {
    if [ ! -f "$NEWEST_KDIR/vmlinuz" ] || [ ! -f "$NEWEST_KDIR/ptp_vmclock.ko" ] ||
        [ ! -f "$NEWEST_KDIR/modules/modules.builtin" ]; then
        local pkg ver dl=/var/tmp/sgdl
        resolve() {
            chroot "$NEWEST_ROOT" apt-cache depends "$1" 2>/dev/null |
                awk -v re="$2" '$1 == "Depends:" && $2 ~ re { print $2; exit }'
        }
        pkg=$(resolve linux-image-amd64 '^linux-image-[0-9].*-amd64$')
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 in the $NEWEST_SUITE chroot"
        ver=${pkg#linux-image-}
        log "downloading $pkg (and its linux-binary/-modules/-base parts) in the chroot"
        rm -rf "$NEWEST_ROOT$dl"; mkdir -p "$NEWEST_ROOT$dl"; chmod 777 "$NEWEST_ROOT$dl"
        # Debian 7.x splits the image: linux-binary-* (vmlinuz),
        # linux-modules-*, linux-base-* (config). Older ones are one package.
        local want="$pkg"
        for part in binary modules base; do
            chroot "$NEWEST_ROOT" apt-cache show "linux-$part-$ver" >/dev/null 2>&1 && want="$want linux-$part-$ver"
        done
        chroot "$NEWEST_ROOT" sh -c "cd $dl && apt-get download -qq $want" >/dev/null 2>&1 ||
            die "apt-get download $want in the chroot failed"
        rm -rf "$NEWEST_KDIR.tmp"; mkdir -p "$NEWEST_KDIR.tmp/modules"
        local d=$NEWEST_ROOT$dl found=0
        for deb in "$d"/*.deb; do
            deb_extract "$deb" './usr/lib/modules/*/vmlinuz' "$NEWEST_KDIR.tmp/vmlinuz" && found=1
            deb_extract "$deb" './boot/vmlinuz-*' "$NEWEST_KDIR.tmp/vmlinuz" && found=1
            deb_extract "$deb" './usr/lib/modules/*/config' "$NEWEST_KDIR.tmp/config" || true
            deb_extract "$deb" './boot/config-*' "$NEWEST_KDIR.tmp/config" || true
            deb_extract "$deb" './usr/lib/modules/*/kernel/drivers/ptp/ptp_vmclock.ko*' \
                "$NEWEST_KDIR.tmp/ptp_vmclock.ko.packed" || true
            # The host-channel lane's vsock modules (virtio and virtio_pci
            # are built in: modules.builtin says which roots need no .ko).
            deb_extract_tree "$deb" './usr/lib/modules/*/kernel/net/vmw_vsock' "$NEWEST_KDIR.tmp/modules" || true
            deb_extract "$deb" './usr/lib/modules/*/modules.builtin' "$NEWEST_KDIR.tmp/modules/modules.builtin" || true
        done
        [ "$found" = 1 ] || die "no vmlinuz in $want"
        [ -f "$NEWEST_KDIR.tmp/modules/modules.builtin" ] && [ -d "$NEWEST_KDIR.tmp/modules/vmw_vsock" ] ||
            die "no vsock modules (net/vmw_vsock) or modules.builtin in $want"
        [ -f "$NEWEST_KDIR.tmp/ptp_vmclock.ko.packed" ] || die "no ptp_vmclock module in $want"
        # busybox insmod wants the plain ELF module.
        python3 - "$NEWEST_KDIR.tmp/ptp_vmclock.ko.packed" "$NEWEST_KDIR.tmp/ptp_vmclock.ko" <<'PY'
import gzip, lzma, sys
data = open(sys.argv[1], "rb").read()
if data[:6] == b"\xfd7zXZ\x00":
    data = lzma.decompress(data)
elif data[:2] == b"\x1f\x8b":
    data = gzip.decompress(data)
elif data[:4] != b"\x7fELF":
    sys.exit("ptp_vmclock: unsupported module compression (zstd?)")
open(sys.argv[2], "wb").write(data)
PY
        rm -f "$NEWEST_KDIR.tmp/ptp_vmclock.ko.packed"
        grep -q '^CONFIG_VMGENID=y' "$NEWEST_KDIR.tmp/config" 2>/dev/null ||
            log "WARNING: $pkg does not have CONFIG_VMGENID=y built in"
        echo "$pkg" > "$NEWEST_KDIR.tmp/PACKAGE"
        rm -rf "$NEWEST_ROOT$dl" "$NEWEST_KDIR"
        mv "$NEWEST_KDIR.tmp" "$NEWEST_KDIR"
    fi
    log "newest kernel: $NEWEST_KDIR/vmlinuz ($(cat "$NEWEST_KDIR/PACKAGE")), $(chroot "$NEWEST_ROOT" qemu-system-x86_64 --version | head -n1) from the $NEWEST_SUITE chroot"
}

export SYSGENID_VM_BUSYBOX=$BUSYBOX
if [ "$LIFECYCLE" = 1 ]; then
    stable_kernel
    SYSGENID_VM_KERNEL=$KERNEL SYSGENID_VM_CACHE=$CACHE exec python3 "$HERE/lifecycle_vmtest.py"
fi
if [ "$HOST_CHANNEL" = 1 ]; then
    [ "$SELF_TEST" = 0 ] || die "--host-channel needs the real binaries"
    VSOCK_CACHE=${SYSGENID_VSOCK_CACHE:-/var/cache/sysgenid-vsock}
    BACKEND=$VSOCK_CACHE/bin/vhost-device-vsock
    if [ ! -x "$BACKEND" ]; then
        command -v cargo >/dev/null 2>&1 || die "cargo is needed to build vhost-device-vsock"
        log "cargo install vhost-device-vsock into $VSOCK_CACHE (cached for later runs)"
        cargo install --locked --root "$VSOCK_CACHE" vhost-device-vsock >"$VSOCK_CACHE.install.log" 2>&1 ||
            die "cargo install vhost-device-vsock failed, see $VSOCK_CACHE.install.log"
    fi
    rc=0
    verdicts=()
    for lane in ${LANES//,/ }; do
        t0=$(date +%s)
        case $lane in
            stable)
                stable_kernel
                SYSGENID_VM_LANE="stable: $(cat "$CACHE/kernel/PACKAGE" 2>/dev/null || basename "$KERNEL"), host QEMU" \
                    SYSGENID_VM_KERNEL=$KERNEL SYSGENID_VSOCK_CACHE=$VSOCK_CACHE \
                    SYSGENID_VSOCK_BACKEND=$BACKEND python3 "$HERE/host_channel_vmtest.py" && v=PASS || v=FAIL
                ;;
            newest)
                newest_qemu
                newest_kernel
                # The chroot's QEMU reaches the backend's vhost-user socket
                # in the work dir, bind-mounted at the same path (the
                # memfd guest memory is passed over that socket). The
                # guest's vsock modules come from the kernel's own package
                # (virtio and virtio_pci are built in).
                workdir=$(mktemp -d /tmp/sysgenid-vm-hostch-newest.XXXXXX)
                SYSGENID_VM_LANE="newest: $(cat "$NEWEST_KDIR/PACKAGE"), $NEWEST_SUITE QEMU" \
                    SYSGENID_VM_KERNEL=$NEWEST_KDIR/vmlinuz \
                    SYSGENID_VM_MODULES_DIR=$NEWEST_KDIR/modules \
                    SYSGENID_VM_WORKDIR=$workdir \
                    SYSGENID_VM_QEMU="$HERE/qemu-chroot.sh $NEWEST_ROOT $workdir:$NEWEST_KDIR" \
                    SYSGENID_VSOCK_CACHE=$VSOCK_CACHE SYSGENID_VSOCK_BACKEND=$BACKEND \
                    python3 "$HERE/host_channel_vmtest.py" && v=PASS || v=FAIL
                if [ "$v" = PASS ]; then
                    [ "${SYSGENID_VM_KEEP:-}" = 1 ] || rm -rf "$workdir"
                else
                    log "kept $workdir for inspection"
                fi
                ;;
            *) die "unknown lane $lane in SYSGENID_VM_LANES (stable, newest)" ;;
        esac
        log "host-channel lane $lane: $v ($(( $(date +%s) - t0 )) s)"
        verdicts+=("$lane=$v")
        [ "$v" = PASS ] || rc=1
    done
    echo "host-channel lanes: ${verdicts[*]}"
    exit $rc
fi
rc=0
verdicts=()
for lane in ${LANES//,/ }; do
    case $lane in
        stable)
            stable_kernel
            if SYSGENID_VM_LANE="stable: $(cat "$CACHE/kernel/PACKAGE" 2>/dev/null || basename "$KERNEL"), host QEMU" \
                SYSGENID_VM_KERNEL=$KERNEL python3 "$HERE/vmtest.py"; then
                verdicts+=("stable=PASS")
            else
                verdicts+=("stable=FAIL"); rc=1
            fi
            ;;
        newest)
            newest_qemu
            newest_kernel
            # The guest's files live in the work dir and the kernel cache:
            # both are bind-mounted at the same paths inside the chroot.
            workdir=$(mktemp -d /tmp/sysgenid-vm-newest.XXXXXX)
            if SYSGENID_VM_LANE="newest: $(cat "$NEWEST_KDIR/PACKAGE"), $NEWEST_SUITE QEMU + vmclock" \
                SYSGENID_VM_KERNEL=$NEWEST_KDIR/vmlinuz \
                SYSGENID_VM_MODULES=$NEWEST_KDIR/ptp_vmclock.ko \
                SYSGENID_VM_VMCLOCK=1 \
                SYSGENID_VM_WORKDIR=$workdir \
                SYSGENID_VM_QEMU="$HERE/qemu-chroot.sh $NEWEST_ROOT $workdir:$NEWEST_KDIR" \
                python3 "$HERE/vmtest.py"; then
                verdicts+=("newest=PASS")
                [ "${SYSGENID_VM_KEEP:-}" = 1 ] || rm -rf "$workdir"
            else
                verdicts+=("newest=FAIL"); rc=1
                log "kept $workdir for inspection"
            fi
            ;;
        *) die "unknown lane $lane in SYSGENID_VM_LANES (stable, newest)" ;;
    esac
done
echo "vm-e2e lanes: ${verdicts[*]}"
exit $rc
