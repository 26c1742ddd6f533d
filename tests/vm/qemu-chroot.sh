#!/bin/sh
# Runs the QEMU of a debootstrap chroot (a newer Debian suite's, with the
# `vmclock` device) on this host's paths: in a private mount namespace it
# bind-mounts each DIR at the same path inside ROOT, plus /dev and /proc,
# then execs ROOT's qemu-system-x86_64 with ARGS. Same PID all the way
# (unshare and chroot exec), so the caller can signal QEMU directly; the
# mounts vanish with the process.
#
#   qemu-chroot.sh ROOT DIR[:DIR...] ARGS...
set -eu
if [ "${SYSGENID_QEMU_CHROOT_INNER:-}" != 1 ]; then
    export SYSGENID_QEMU_CHROOT_INNER=1
    exec unshare --mount --propagation private -- /bin/sh "$0" "$@"
fi
root=$1 dirs=$2
shift 2
mount --rbind /dev "$root/dev"
mount -t proc proc "$root/proc"
old_ifs=$IFS IFS=:
for d in $dirs; do
    mkdir -p "$root$d"
    mount --bind "$d" "$root$d"
done
IFS=$old_ifs
unset SYSGENID_QEMU_CHROOT_INNER
exec chroot "$root" /usr/bin/qemu-system-x86_64 "$@"
