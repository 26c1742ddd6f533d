#!/usr/bin/env bash
# The Debian package under a real systemd: builds the .deb with
# `cargo deb -p sysgenidd`, boots a fresh Debian bookworm with systemd as
# PID 1 in systemd-nspawn (throwaway overlay on a cached debootstrap),
# installs the package with dpkg and checks from outside, with nsenter:
# install enables and starts the service; Type=notify reached READY (with
# its STATUS line) and the watchdog restarts a wedged loop; nobody (uid
# 65534, no environment) reads the generation; root bumps, nobody cannot;
# the generation survives `systemctl restart`, `systemctl kill -s KILL`
# and a package upgrade; /dev/sysgenid is served and a member of the group
# sysgenid acknowledges through it while others cannot open it for
# writing; the journal has the ready line, the changes and the refusals,
# without colour codes; man pages, completions and the C library are in
# place; `systemd-analyze security` exposure (must be <= 4.0, and equal to
# the figure in docs/service.md); clone identity: the shipped hooks enabled
# with `sysgenidctl hooks enable`, then `bump --kind clone --hostname`
# renews the machine-id (journalctl --list-boots still works), the SSH host
# keys that sshd serves and the hostname, `bump --kind restore` keeps them
# all, and a failing hook holds the change so wait-watchers times out
# naming it; removal stops the service and leaves no mount.
#
# Needs root. Installs debootstrap and systemd-container with apt-get and
# cargo-deb with `cargo install` when missing. The rootfs (with
# openssh-server; systemd-networkd, the network manager, is part of
# systemd) is cached under /var/cache/sysgenid-systemd/bookworm-ssh; the
# container runs on a volatile overlay with a private network (sshd's port
# and networkd's links are its own), so the cache is never modified, and
# nothing is left running or mounted.
#
# usage: tests/systemd/run.sh        (exit 0: passed, 77: skipped, else failed)
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=/var/cache/sysgenid-systemd
# bookworm-ssh: openssh-server added for the clone-identity proof (a new
# name, so an older cache without it is left as it is, not rebuilt in
# place under a run that may be using it).
rootfs=$cache/bookworm-ssh

if [ "$(id -u)" != 0 ]; then
	echo "SKIPPED: tests/systemd/run.sh needs root (debootstrap, systemd-nspawn, dpkg)"
	exit 77
fi

step() { echo "== $*"; }
ok() { echo "ok - $*"; }
fail() {
	echo "FAILED: $*" >&2
	exit 1
}

step "tools"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
if [ ${#need[@]} -gt 0 ]; then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
if ! command -v cargo-deb >/dev/null; then
	cargo install cargo-deb --locked --quiet
fi

step "cargo deb -p sysgenidd"
(cd "$root" && cargo deb -p sysgenidd --quiet) >/tmp/sysgenid-deb.$$.log 2>&1 ||
	{ cat /tmp/sysgenid-deb.$$.log; fail "cargo deb"; }
rm -f /tmp/sysgenid-deb.$$.log
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)
deb=$root/target/debian/sysgenid_${version}_amd64.deb
[ -f "$deb" ] || fail "$deb was not built"
ok "built $(basename "$deb")"

step "bookworm rootfs ($rootfs)"
if [ ! -x "$rootfs/usr/lib/systemd/systemd" ]; then
	# The archive the machine's apt sources name.
	mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1)
	[ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $2 ~ /debian$/ { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
	[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
	mkdir -p "$cache"
	rm -rf "$rootfs.tmp"
	debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,openssh-server bookworm "$rootfs.tmp" "$mirror" >"$rootfs.debootstrap.log" 2>&1 ||
		{ tail -20 "$rootfs.debootstrap.log"; fail "debootstrap"; }
	mv "$rootfs.tmp" "$rootfs"
fi
ok "rootfs ready"

step "boot"
debdir=$(dirname "$deb")
systemd-nspawn --register=no --keep-unit --volatile=overlay --private-network -D "$rootfs" \
	--bind=/dev/fuse --bind-ro="$debdir:/mnt/deb" --console=passive \
	--boot -- systemd.firstboot=off >/tmp/sysgenid-nspawn.$$.log 2>&1 &
nspawn=$!
cleanup() {
	if kill -0 "$nspawn" 2>/dev/null; then
		kill -TERM "$nspawn" 2>/dev/null || true
		for _ in $(seq 100); do
			kill -0 "$nspawn" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$nspawn" 2>/dev/null || true
	fi
	wait "$nspawn" 2>/dev/null || true
	rm -f /tmp/sysgenid-nspawn.$$.log
}
trap cleanup EXIT
pid1=
for _ in $(seq 300); do
	pid1=$(ps -o pid= --ppid "$nspawn" | tr -d " " | head -n 1) || true
	if [ -n "$pid1" ]; then
		state=$(nsenter -t "$pid1" -a systemctl is-system-running 2>/dev/null || true)
		case $state in running | degraded) break ;; esac
	fi
	sleep 0.1
done
[ -n "$pid1" ] || { cat /tmp/sysgenid-nspawn.$$.log; fail "the container did not start"; }
inside() { nsenter -t "$pid1" -a "$@"; }
ok "systemd is PID 1 in the container ($(inside systemctl is-system-running || true))"

nobody() { inside setpriv --reuid 65534 --regid 65534 --clear-groups env -i "$@"; }
show() { inside systemctl show -p "$1" --value sysgenidd.service; }
ctl() { inside env -i /usr/bin/sysgenidctl "$@"; }
generation() { ctl get; }
expect_eq() { # what actual expected
	[ "$2" = "$3" ] || fail "$1: got '$2', expected '$3'"
	ok "$1: $2"
}

step "install"
inside dpkg -i /mnt/deb/"$(basename "$deb")" >/dev/null
expect_eq "enabled on install" "$(inside systemctl is-enabled sysgenidd.service)" enabled
expect_eq "started on install" "$(inside systemctl is-active sysgenidd.service)" active
expect_eq "Type" "$(show Type)" notify
status=$(show StatusText)
case $status in "generation 0, serving /run/sysgenid"*) ;; *) fail "no STATUS= from READY: '$status'" ;; esac
ok "READY=1 with STATUS: $status"
# SCHED_FIFO from the unit (the kernel log reader keeps ahead of floods);
# policy 1 in /proc/PID/stat's 41st field.
policy=$(inside awk '{print $41}' "/proc/$(show MainPID)/stat")
expect_eq "the daemon's scheduling policy (1 = SCHED_FIFO)" "$policy" 1
expect_eq "WatchdogUSec" "$(show WatchdogUSec)" 30s
expect_eq "Restart" "$(show Restart)" on-failure
before=$(show Before)
case " $before " in *" sysinit.target "*) ;; *) fail "not ordered before sysinit.target: $before" ;; esac
expect_eq "WantedBy" "$(show WantedBy)" sysinit.target
ok "ordered before sysinit.target"

step "every uid reaches the system daemon"
expect_eq "nobody, no environment, reads the generation" "$(nobody /usr/bin/sysgenidctl get)" 0
expect_eq "root bumps" "$(ctl bump)" 1
expect_eq "STATUS follows the generation" "$(show StatusText)" "generation 1, last changed by manual"
set +e
out=$(nobody /usr/bin/sysgenidctl bump 2>&1)
rc=$?
set -e
expect_eq "nobody's bump exit code" "$rc" 4
case $out in *"permission denied"*) ;; *) fail "nobody's bump: $out" ;; esac
expect_eq "the generation after nobody's attempt" "$(generation)" 1

step "the generation survives restarts"
inside systemctl restart sysgenidd.service
expect_eq "after systemctl restart" "$(generation)" 1
expect_eq "bump" "$(ctl bump)" 2
oldpid=$(show MainPID)
inside systemctl kill -s KILL sysgenidd.service
for _ in $(seq 100); do
	[ "$(show MainPID)" != "$oldpid" ] && [ "$(show MainPID)" != 0 ] &&
		[ "$(inside systemctl is-active sysgenidd.service || true)" = active ] && break
	sleep 0.1
done
expect_eq "restarted by systemd after SIGKILL (NRestarts)" "$(show NRestarts)" 1
expect_eq "after systemctl kill -s KILL" "$(generation)" 2
inside dpkg -i /mnt/deb/"$(basename "$deb")" >/dev/null
expect_eq "active after a package upgrade" "$(inside systemctl is-active sysgenidd.service)" active
expect_eq "after a package upgrade (reinstall)" "$(generation)" 2

step "the watchdog"
inside mkdir -p /run/systemd/system/sysgenidd.service.d
# A stopped process takes SIGABRT only once continued: SIGKILL follows
# after TimeoutAbortSec.
inside sh -c 'printf "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=1s\n" >/run/systemd/system/sysgenidd.service.d/watchdog.conf'
inside systemctl daemon-reload
inside systemctl restart sysgenidd.service
restarts=$(show NRestarts)
sleep 5
expect_eq "pinged by the loop: alive after 5 s with WatchdogSec=2s (NRestarts)" "$(show NRestarts)" "$restarts"
wedged=$(show MainPID)
inside systemctl kill --kill-whom=main -s STOP sysgenidd.service
for _ in $(seq 150); do
	[ "$(show MainPID)" != "$wedged" ] && [ "$(inside systemctl is-active sysgenidd.service || true)" = active ] && break
	sleep 0.1
done
[ "$(show MainPID)" != "$wedged" ] || fail "a stopped event loop was not restarted by the watchdog"
inside journalctl -u sysgenidd.service -o cat --no-pager | grep -q "Watchdog timeout" ||
	fail "no watchdog timeout in the journal"
ok "a wedged loop (SIGSTOP) is killed by the watchdog and restarted"
expect_eq "after the watchdog restart" "$(generation)" 2
inside rm /run/systemd/system/sysgenidd.service.d/watchdog.conf
inside systemctl daemon-reload
inside systemctl restart sysgenidd.service

step "/dev/sysgenid and the group sysgenid"
inside findmnt -n -t fuse.sysgenid /dev/sysgenid >/dev/null || fail "/dev/sysgenid is not a sysgenid FUSE mount"
expect_eq "device mode and group" "$(inside stat -c '%A %U:%G' /dev/sysgenid)" "-rw-rw-r-- root:sysgenid"
gid=$(inside getent group sysgenid | cut -d: -f3)
set +e
out=$(nobody sh -c 'exec 3<>/dev/sysgenid' 2>&1)
rc=$?
set -e
[ "$rc" != 0 ] || fail "a non-member opened /dev/sysgenid for writing"
ok "a non-member cannot open it for writing ($out)"
expect_eq "a non-member opens it read-only" "$(nobody sh -c 'exec 3</dev/sysgenid && echo opened')" opened
# A member: open O_RDWR, announce it, block in read(2) for the next
# generation, acknowledge it with write(2), then hold the handle open.
inside rm -f /run/member.done
inside setpriv --reuid 65534 --regid 65534 --groups "$gid" env -i sh -c '
	exec 3<>/dev/sysgenid || exit 1
	echo opened
	gen=$(dd bs=4 count=1 status=none <&3 | od -An -tu4 | tr -d " ")
	echo "read $gen"
	printf "\\$(printf %03o $((gen & 255)))\\$(printf %03o $((gen >> 8 & 255)))\\000\\000" >&3 && echo acked
	while [ ! -e /run/member.done ]; do sleep 0.1; done
' >/tmp/sysgenid-member.$$.log 2>&1 &
member=$!
for _ in $(seq 100); do grep -q opened /tmp/sysgenid-member.$$.log && break; sleep 0.1; done
grep -q opened /tmp/sysgenid-member.$$.log || { cat /tmp/sysgenid-member.$$.log; fail "the member could not open /dev/sysgenid O_RDWR"; }
ok "a member opens /dev/sysgenid O_RDWR"
expect_eq "bump with the member watching" "$(ctl bump)" 3
for _ in $(seq 100); do grep -q acked /tmp/sysgenid-member.$$.log && break; sleep 0.1; done
grep -q "read 3" /tmp/sysgenid-member.$$.log || { cat /tmp/sysgenid-member.$$.log; fail "the member did not read generation 3"; }
grep -q acked /tmp/sysgenid-member.$$.log || { cat /tmp/sysgenid-member.$$.log; fail "the member could not write its ack"; }
ctl wait-watchers --timeout-ms 5000 || fail "wait-watchers: the member's ack did not count"
tracked=$(ctl status --json | sed -n 's/.*"tracked": *\([0-9]*\).*/\1/p')
expect_eq "the member's handle is a tracked watcher" "$tracked" 1
ok "a member acknowledged through the device (wait-watchers returned)"
inside touch /run/member.done
wait "$member" || true
rm -f /tmp/sysgenid-member.$$.log

step "the journal"
journal=$(inside journalctl -u sysgenidd.service -o cat --no-pager)
# Extended regular expressions: the change line reads "generation changed
# generation=3 source=... kernel_rng=...".
for needle in "ready: runtime dir /run/sysgenid" "generation changed.* generation=3( |$)" "permission denied" "device: /dev/sysgenid"; do
	grep -qE "$needle" <<<"$journal" || fail "the journal lacks '$needle'"
	ok "journal: $needle"
done
if grep -q $'\x1b\[' <<<"$journal"; then fail "ANSI colour codes in the journal"; fi
ok "journal: no colour codes"

step "files"
for f in /usr/sbin/sysgenidd /usr/bin/sysgenidctl \
	/usr/lib/systemd/system/sysgenidd.service \
	/usr/share/man/man8/sysgenidd.8.gz /usr/share/man/man1/sysgenidctl.1.gz /usr/share/man/man7/sysgenid.7.gz \
	/usr/share/bash-completion/completions/sysgenidctl /usr/share/zsh/vendor-completions/_sysgenidctl \
	/usr/share/fish/vendor_completions.d/sysgenidctl.fish \
	/usr/share/sysgenid/qemu-ga/sysgenid \
	/usr/include/sysgenid.h /usr/include/sysgenid-device.h \
	/usr/lib/x86_64-linux-gnu/libsysgenid.a /usr/lib/x86_64-linux-gnu/pkgconfig/sysgenid.pc; do
	inside test -s "$f" || fail "$f missing"
done
inside test -e /usr/lib/x86_64-linux-gnu/libsysgenid.so || fail "libsysgenid.so does not resolve"
inside sh -c 'ldconfig -p | grep -q "libsysgenid.so.0 "' || fail "libsysgenid.so.0 not in the linker cache"
ok "binaries, unit, man pages, completions, header, libraries, pkg-config"

step "systemd-analyze security"
exposure=$(inside systemd-analyze security sysgenidd.service --no-pager 2>/dev/null |
	sed -n 's/.*Overall exposure level for sysgenidd.service: \([0-9.]*\).*/\1/p')
[ -n "$exposure" ] || fail "no exposure figure"
echo "exposure: $exposure"
awk -v e="$exposure" 'BEGIN { exit !(e <= 4.0) }' || fail "exposure $exposure is above 4.0"
grep -qF "exposure $exposure" "$root/docs/service.md" ||
	fail "docs/service.md does not state the measured exposure $exposure"
ok "exposure $exposure (<= 4.0; stated in docs/service.md)"

step "clone identity: the shipped hooks"
# systemd-networkd is the network manager (in the systemd package; nspawn
# gives it CAP_NET_ADMIN only with a private network); sshd runs from
# openssh-server, whose install made host keys in the cached rootfs.
inside systemctl enable --now systemd-networkd.service >/dev/null 2>&1
expect_eq "systemd-networkd runs" "$(inside systemctl is-active systemd-networkd.service)" active
expect_eq "sshd runs" "$(inside systemctl is-active ssh.service)" active
# The /etc/hosts the Debian installer writes (debootstrap writes none).
inside sh -c 'printf "127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n" "$(hostname)" >/etc/hosts'
inside test -d /etc/sysgenid/hooks.d || fail "install did not create /etc/sysgenid/hooks.d"
for hook in machine-id ssh-host-keys hostname network clock; do
	inside sysgenidctl hooks enable "$hook" >/dev/null || fail "sysgenidctl hooks enable $hook"
done
expect_eq "enabled, in run order" "$(inside ls /etc/sysgenid/hooks.d | tr '\n' ' ')" \
	"10-machine-id 20-ssh-host-keys 30-hostname 40-network 50-clock "
inside sysgenidctl hooks | grep -q "machine-id *enabled as 10-machine-id" ||
	fail "sysgenidctl hooks does not list machine-id as enabled: $(inside sysgenidctl hooks)"
keys() { inside sh -c 'cat /etc/ssh/ssh_host_*_key.pub' | awk '{ print $2 }' | sort; }
served() { inside ssh-keyscan -T 5 localhost 2>/dev/null | awk '{ print $3 }' | sort; }
# sshd re-executes itself on a reload: give it a moment to listen again.
served_is() {
	for _ in $(seq 50); do
		[ "$(served)" = "$1" ] && return 0
		sleep 0.1
	done
	return 1
}
# The daemon's journal since a time (one second on, so nothing of the
# step before is counted).
since() { sleep 1; date +%s; }
hook_log() { inside journalctl -u sysgenidd.service --since "@$1" -o cat --no-pager | grep "sysgenid hook" || true; }
expect_line() { # log needle
	grep -qF "$2" <<<"$1" || fail "the journal lacks '$2'; the hooks said:
$1"
	ok "journal: $2"
}
old_id=$(inside cat /etc/machine-id)
old_keys=$(keys)
served_is "$old_keys" || fail "sshd does not serve its own host keys before the clone: $(served)"
old_host=$(inside hostname)
boot_ids() { inside journalctl --list-boots --no-pager | awk 'length($2) == 32 { print $2 }'; }
boots_before=$(boot_ids)
[ -n "$boots_before" ] || fail "journalctl --list-boots lists no boot before the clone"

t=$(since)
ctl bump --kind clone --hostname clone-1 >/dev/null
ctl wait-watchers --timeout-ms 60000 || fail "the clone's hooks did not all succeed: $(ctl status)"
new_id=$(inside cat /etc/machine-id)
[ "$new_id" != "$old_id" ] || fail "the machine-id was not renewed; the daemon said:
$(inside journalctl -u sysgenidd.service --since "@$t" -o cat --no-pager)"
ok "clone: a new machine-id $new_id (was $old_id)"
inside journalctl --list-boots --no-pager >/dev/null || fail "journalctl --list-boots fails after the clone"
boots=$(boot_ids)
for boot in $boots_before; do
	grep -qx "$boot" <<<"$boots" || fail "journalctl --list-boots lost boot $boot: $boots"
done
ok "journalctl --list-boots still works and lists every boot it did ($(echo $boots))"
# (Read whole, then searched: grep -q ending the pipe early would fail
# journalctl with SIGPIPE under pipefail.)
history=$(inside journalctl -u sysgenidd.service -o cat --no-pager)
grep -q "ready: runtime dir /run/sysgenid" <<<"$history" ||
	fail "the journal from before the clone is no longer shown under the new machine-id"
ok "the journal from before the clone is still shown"
new_keys=$(keys)
[ -n "$new_keys" ] && [ "$(comm -12 <(echo "$old_keys") <(echo "$new_keys"))" = "" ] ||
	fail "the host keys were not all renewed"
served_is "$new_keys" || fail "ssh-keyscan localhost does not serve the new keys: $(served)"
ok "ssh-keyscan localhost serves the new keys"
expect_eq "clone: the hostname from --hostname" "$(inside hostname)" clone-1
expect_eq "clone: /etc/hostname" "$(inside cat /etc/hostname)" clone-1
expect_eq "clone: /etc/hosts names it" "$(inside awk '$1 == "127.0.1.1" { print $2 }' /etc/hosts)" clone-1
log=$(hook_log "$t")
expect_line "$log" "sysgenid hook machine-id: new machine-id $new_id"
expect_line "$log" "sysgenid hook machine-id: journald restarted"
expect_line "$log" "sysgenid hook ssh-host-keys: new ed25519 host key"
expect_line "$log" "sysgenid hook ssh-host-keys: ssh.service reloaded"
expect_line "$log" "sysgenid hook hostname: hostname set to clone-1"
expect_line "$log" "sysgenid hook network: systemd-networkd restarted"
expect_line "$log" "sysgenid hook clock: kind clone"

t=$(since)
ctl bump --kind restore >/dev/null
ctl wait-watchers --timeout-ms 60000 || fail "the restore's hooks did not all succeed: $(ctl status)"
expect_eq "restore: the machine-id is kept" "$(inside cat /etc/machine-id)" "$new_id"
[ "$(keys)" = "$new_keys" ] || fail "restore: the host keys changed"
ok "restore: the $(wc -l <<<"$new_keys") host keys are kept"
served_is "$new_keys" || fail "after the restore sshd does not serve the kept keys: $(served)"
ok "restore: sshd serves them"
expect_eq "restore: the hostname is kept" "$(inside hostname)" clone-1
log=$(hook_log "$t")
for hook in machine-id ssh-host-keys hostname network; do
	expect_line "$log" "sysgenid hook $hook: kind restore, not a clone"
done
expect_line "$log" "sysgenid hook clock: kind restore"
acted=$(grep -v -e "not a clone" -e "sysgenid hook clock:" <<<"$log" || true)
[ -z "$acted" ] || fail "on a restore, hooks other than clock acted: $acted"
ok "restore: only the clock hook acted"

inside sh -c 'printf "#!/bin/sh\n[ \"\$1\" = change ] || exit 0\necho \"sysgenid hook 60-fails: FAILED: on purpose\"\nexit 1\n" >/etc/sysgenid/hooks.d/60-fails && chmod 755 /etc/sysgenid/hooks.d/60-fails'
ctl bump --kind restore >/dev/null
set +e
out=$(ctl wait-watchers --timeout-ms 5000 2>&1)
rc=$?
set -e
expect_eq "a failing hook: wait-watchers exit code" "$rc" 3
grep -qF "60-fails (exit status: 1)" <<<"$out" || fail "wait-watchers does not name the failing hook: $out"
ok "wait-watchers names it: $out"
inside rm /etc/sysgenid/hooks.d/60-fails
for hook in machine-id ssh-host-keys hostname network clock; do
	inside sysgenidctl hooks disable "$hook" >/dev/null
done
ctl bump --kind restore >/dev/null
ctl wait-watchers --timeout-ms 60000 || fail "the next change still held after the failing hook went"
ok "the next change, without it, is acknowledged"

step "removal"
inside dpkg -r sysgenid >/dev/null
expect_eq "stopped on removal" "$(inside systemctl is-active sysgenidd.service || true)" inactive
if inside findmnt /dev/sysgenid >/dev/null; then fail "a mount is left on /dev/sysgenid"; fi
if inside test -e /dev/sysgenid; then fail "/dev/sysgenid is left behind"; fi
ok "no mount left on /dev/sysgenid"

echo "PASS: the Debian package under systemd (exposure $exposure)"
