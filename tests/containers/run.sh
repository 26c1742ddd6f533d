#!/usr/bin/env bash
# End-to-end proof of sysgenid in containers checkpointed, restored and
# cloned by CRIU: podman with crun, podman with runc, and runc on its own
# with a hand-made bundle. See tests/containers/README.md and
# docs/containers.md.
#
#   SYSGENIDD=BIN SYSGENIDCTL=BIN tests/containers/run.sh [--keep]
#   SYSGENIDD=BIN SYSGENIDCTL=BIN tests/containers/run.sh --shell [CMD...]
#
# The development suite's criu (4.2+), podman, crun and runc are
# debootstrapped once into $SYSGENID_CRIU_CACHE (default
# /var/cache/sysgenid-criu; never added to the machine's apt sources) and
# run from there: this script re-executes itself in private mount and pid
# namespaces, mounts a throwaway overlay over the cached root (the cache is
# never modified), pivots into it and runs the scenarios
# (tests/containers/scenarios.sh). Everything it starts dies with its pid
# namespace; every mount vanishes with its mount namespace.
#
# Exit status: 0 every scenario passed, 77 skipped (not root), else failed.
# The last lines are a summary (`containers: N passed, M failed`) with the
# measured window from resume to the page showing the new generation.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TOP=$(cd "$HERE/../.." && pwd)
CACHE=${SYSGENID_CRIU_CACHE:-/var/cache/sysgenid-criu}
SUITE=${SYSGENID_CRIU_SUITE:-sid}
ROOT=$CACHE/$SUITE-root
PACKAGES="criu libcriu2 iproute2 iptables nftables podman crun runc conmon catatonit"

log() { echo "[containers] $*"; }
die() {
    echo "[containers] ERROR: $*" >&2
    exit 1
}

# ------------------------------------------------------------------ inside
# Second stage: in the private namespaces, as their pid 1.
if [ "${1:-}" = --inside ]; then
    shift
    WORK=$SYSGENID_CRIU_WORK
    NEW=$WORK/root
    mkdir -p "$WORK/upper" "$WORK/ovl" "$NEW"
    # The cached root, read-only below a throwaway upper layer.
    mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$WORK/upper,workdir=$WORK/ovl" "$NEW"
    mount -t proc proc "$NEW/proc"
    mount --rbind /sys "$NEW/sys"
    # crun refuses the cgroup hybrid mode (v1 hierarchies plus the v2 one
    # at unified/): hide the v2 one, in this namespace only.
    if mountpoint -q "$NEW/sys/fs/cgroup/unified"; then
        umount -l "$NEW/sys/fs/cgroup/unified"
    fi
    mount --rbind /dev "$NEW/dev"
    mount -t tmpfs -o mode=0755 tmpfs "$NEW/run"
    mount -t tmpfs -o mode=1777 tmpfs "$NEW/tmp"
    # Container storage and checkpoint archives on the disk, not in the
    # overlay (podman's vfs driver copies layers; small either way).
    mkdir -p "$WORK/storage" "$WORK/share" "$NEW/var/lib/containers" "$NEW/work"
    mount --bind "$WORK/storage" "$NEW/var/lib/containers"
    mount --bind "$WORK/share" "$NEW/work"
    cd "$NEW"
    mkdir -p .oldroot
    pivot_root . .oldroot
    cd /
    umount -l /.oldroot
    rmdir /.oldroot
    export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    if [ "${1:-}" = --shell ]; then
        shift
        [ $# -gt 0 ] || set -- bash
        exec "$@"
    fi
    exec bash /work/scenarios.sh
fi

# -------------------------------------------------------------------- host
KEEP=${SYSGENID_CRIU_KEEP:-0}
SHELL_MODE=0
while [ $# -gt 0 ]; do
    case $1 in
        --keep) KEEP=1 ;;
        --shell)
            SHELL_MODE=1
            shift
            break
            ;;
        -h | --help)
            sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *) die "unknown argument: $1" ;;
    esac
    shift
done

if [ "$(id -u)" != 0 ]; then
    echo "SKIPPED: tests/containers/run.sh needs root (debootstrap, namespaces, CRIU)"
    exit 77
fi
[ -n "${SYSGENIDD:-}" ] && [ -n "${SYSGENIDCTL:-}" ] || die "set SYSGENIDD and SYSGENIDCTL"
for b in "$SYSGENIDD" "$SYSGENIDCTL"; do
    [ -f "$b" ] && [ -x "$b" ] || die "not an executable file: $b"
done

# The archive the host's apt sources name (not its security archive).
debian_mirror() {
    local uri
    uri=$(grep -rhoE '(deb\s+|URIs:\s*)https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
        grep -oE 'https?://[^ ]+' | grep -v -- '-security' | grep -E '/debian/?$' | head -n1)
    echo "${uri:-http://deb.debian.org/debian}"
}

apt_install_host() {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@" >/dev/null; } ||
        die "apt-get install $* failed"
}

# The development suite's userland, debootstrapped once (a few minutes)
# and cached. Checked by its tools, not by a marker file; a cached root
# from an older version of this list gets what it lacks.
root_complete() {
    chroot "$ROOT" criu --version >/dev/null 2>&1 && [ -x "$ROOT/usr/bin/podman" ] &&
        [ -e "$ROOT/usr/lib/x86_64-linux-gnu/libcriu.so.2" ] && [ -x "$ROOT/usr/bin/ip" ]
}
if [ -d "$ROOT" ] && ! root_complete; then
    log "completing the cached $SUITE root: $PACKAGES"
    # shellcheck disable=SC2086
    chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $PACKAGES >>"$CACHE/chroot-apt.log" 2>&1 || die "apt-get install in $ROOT failed, see $CACHE/chroot-apt.log"
    chroot "$ROOT" apt-get clean
fi
if ! [ -d "$ROOT" ]; then
    command -v debootstrap >/dev/null 2>&1 || { log "installing debootstrap"; apt_install_host debootstrap; }
    mirror=$(debian_mirror)
    mkdir -p "$CACHE"
    rm -rf "$ROOT.tmp"
    log "debootstrap $SUITE from $mirror into $ROOT.tmp (cached for later runs)"
    debootstrap --variant=minbase "$SUITE" "$ROOT.tmp" "$mirror" >"$CACHE/debootstrap.log" 2>&1 ||
        die "debootstrap failed, see $CACHE/debootstrap.log"
    log "installing $PACKAGES in the $SUITE root"
    # shellcheck disable=SC2086
    chroot "$ROOT.tmp" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $PACKAGES >"$CACHE/chroot-apt.log" 2>&1 ||
        die "apt-get install in the $SUITE root failed, see $CACHE/chroot-apt.log"
    chroot "$ROOT.tmp" apt-get clean
    mv "$ROOT.tmp" "$ROOT"
fi
root_complete || die "the cached root $ROOT lacks criu, podman, libcriu or ip"
CRIU_VERSION=$(chroot "$ROOT" criu --version | sed -n 's/^Version: *//p')
case $CRIU_VERSION in
    4.[2-9]* | 4.[1-9][0-9]* | [5-9].*) ;;
    *) die "criu $CRIU_VERSION in $ROOT: 4.2 or newer is needed (older ones fail on this kernel's vDSO)" ;;
esac
log "userland: $SUITE root $ROOT, criu $CRIU_VERSION, $(chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}, ' podman crun runc | sed 's/, $//')"

WORK=$(mktemp -d /tmp/sysgenid-criu.XXXXXX)
# The containers' cgroups outlive them (podman's cgroupfs manager leaves
# libpod_parent/libpod-ID behind), and each CRIU restore recreates every
# cgroup found below the dumped container's: left in place, one run's
# cgroups are copied by the next, doubling run after run (331 775
# directories after a dozen runs, and a dump spending minutes listing
# them). Everything made since the stamp goes at the end, deepest first;
# rmdir refuses a cgroup that still has tasks, so nothing running is
# touched.
CGROUP_STAMP=$WORK/cgroup-stamp
touch "$CGROUP_STAMP"
remove_cgroups() {
    local parent
    for parent in /sys/fs/cgroup/*/libpod_parent /sys/fs/cgroup/libpod_parent; do
        [ -d "$parent" ] || continue
        find "$parent" -mindepth 1 -depth -type d -newer "$CGROUP_STAMP" -exec rmdir {} + 2>/dev/null || true
    done
}
cleanup() {
    remove_cgroups
    if [ "$KEEP" = 1 ]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# What the scenarios need, in the directory that becomes /work inside.
SHARE=$WORK/share
mkdir -p "$SHARE/bin"
install -m 0755 "$SYSGENIDD" "$SHARE/bin/sysgenidd"
install -m 0755 "$SYSGENIDCTL" "$SHARE/bin/sysgenidctl"
install -m 0755 "$TOP/packaging/criu/criu-action" "$SHARE/bin/criu-action"
install -m 0644 "$HERE/scenarios.sh" "$SHARE/scenarios.sh"
cp -r "$HERE/image" "$SHARE/image"
BUSYBOX=${SYSGENID_CRIU_BUSYBOX:-/bin/busybox}
if [ -z "${SYSGENID_CRIU_BUSYBOX:-}" ] &&
    ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed'; then
    log "installing busybox-static (the image's shell)"
    apt_install_host busybox-static
fi
[ -x "$BUSYBOX" ] || die "no busybox at $BUSYBOX"
install -m 0755 "$BUSYBOX" "$SHARE/bin/busybox"
# The binaries' shared libraries, as this host built them, at their paths.
mkdir -p "$SHARE/lib"
for lib in $(ldd "$SYSGENIDD" "$SYSGENIDCTL" | awk '/=> \// { print $3 } /^[ \t]*\/.*ld-linux/ { print $1 }' | sort -u); do
    cp -L --parents "$lib" "$SHARE/lib/"
done
echo "$CRIU_VERSION" >"$SHARE/criu-version"

export SYSGENID_CRIU_WORK=$WORK
# Private mount and pid namespaces; this script is the pid namespace's
# init, so every process the scenarios leave dies with it. Descriptors
# above 2 are closed: CRIU refuses to dump a task holding a descriptor
# on a mount it cannot see.
inside=(unshare --mount --propagation private --pid --fork --kill-child -- bash "$0" --inside)
[ "$SHELL_MODE" = 1 ] && inside+=(--shell "$@")
# If this script is stopped, the pid namespace's init goes with it (and so
# everything in the namespace).
NS_PARENT=
stop_namespace() {
    local child
    [ -n "$NS_PARENT" ] || return 0
    for child in $(cat "/proc/$NS_PARENT/task/$NS_PARENT/children" 2>/dev/null); do
        kill -KILL "$child" 2>/dev/null
    done
}
trap 'stop_namespace; cleanup' EXIT
trap 'exit 130' INT TERM
(
    for fd in /proc/self/fd/*; do
        fd=${fd##*/}
        [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
    done
    exec "${inside[@]}"
) &
NS_PARENT=$!
set +e
wait "$NS_PARENT"
rc=$?
set -e
exit $rc
