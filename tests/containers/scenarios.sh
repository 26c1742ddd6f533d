#!/usr/bin/env bash
# The container scenarios, run by tests/containers/run.sh inside its
# private namespaces, pivoted into the development suite's userland. /work
# holds the project's binaries (bin/), their libraries (lib/), the image's
# scripts (image/) and receives the checkpoints and logs.
#
# For each of podman+crun and podman+runc:
#   clones      checkpoint --export, restore --import twice: each clone's
#               watcher logs generation 1 (kind restore), their epochs
#               differ, the participant logged freeze before the dump and
#               each clone thaw after its restore
#   leave       checkpoint --leave-running: freeze, then thaw, generation kept
#   inplace     checkpoint and restore of one container: generation + 1
#   plain       a container without sysgenid checkpoints and restores with
#               the hook configured globally
#   stuck       a participant that never confirms fails the checkpoint in
#               strict mode; the container keeps running
# and runc on its own with a hand-made bundle (checkpoint, restore: + 1).
set -uo pipefail
export PODMAN_IGNORE_CGROUPSV1_WARNING=1
# The harness's own variables must not reach the hook through CRIU.
unset SYSGENIDD SYSGENIDCTL

SCENARIOS=${SYSGENID_CRIU_SCENARIOS:-clones,leave,inplace,plain,stuck}
RUNTIMES=${SYSGENID_CRIU_RUNTIMES:-crun,runc}
IMAGE=localhost/sysgenid-criu:test
# The source a restore by the hook is reported with (see report_restore in
# crates/sysgenidctl/src/criu_hook.rs): `manual` until the Bump request
# can carry a source, then `criu`. Its kind is `restore`.
RESTORE_SOURCE=${SYSGENID_CRIU_RESTORE_SOURCE:-manual}
W=/work
PASS=0
FAIL=0
FAILED=()
WINDOWS=()

log() { echo "[containers] $*"; }
pass() {
    PASS=$((PASS + 1))
    echo "ok - $*"
}
fail() {
    FAIL=$((FAIL + 1))
    FAILED+=("$*")
    echo "FAILED - $*"
}
# check DESCRIPTION COMMAND...: passes when COMMAND succeeds.
check() {
    local what=$1
    shift
    if "$@"; then pass "$what"; else fail "$what"; fi
}
wanted() { case ",$SCENARIOS," in *",$1,"*) return 0 ;; *) return 1 ;; esac }

# ------------------------------------------------------------------ set-up
# Container storage and engine settings for this private world: vfs
# storage, cgroupfs (no systemd here), events to a file, no network (the
# bridge would change the host's nftables and ip_forward).
mkdir -p /etc/containers /etc/criu /usr/libexec/sysgenid /usr/local/lib/sysgenid-test
cat >/etc/containers/storage.conf <<'EOF'
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
cat >/etc/containers/containers.conf <<'EOF'
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
install -m 0755 $W/bin/sysgenidctl /usr/bin/sysgenidctl
install -m 0755 $W/bin/sysgenidd /usr/sbin/sysgenidd
install -m 0755 $W/bin/criu-action /usr/libexec/sysgenid/criu-action
# The hook, globally, for both runtimes: one line each (docs/containers.md).
# Here through a wrapper that notes when each action starts and ends, for
# the resume-to-page measurement.
cat >/usr/local/lib/sysgenid-test/criu-action <<'EOF'
#!/bin/sh
echo "$(date +%s%N) start $CRTOOLS_SCRIPT_ACTION ${CRTOOLS_INIT_PID:-}" >>/work/actions.log
/usr/libexec/sysgenid/criu-action
rc=$?
echo "$(date +%s%N) end $CRTOOLS_SCRIPT_ACTION ${CRTOOLS_INIT_PID:-} $rc" >>/work/actions.log
exit $rc
EOF
chmod 0755 /usr/local/lib/sysgenid-test/criu-action
# `file-locks`: sysgenidd holds a lock on its runtime directory, which CRIU
# dumps only when asked to.
CRIU_CONF="action-script /usr/local/lib/sysgenid-test/criu-action
file-locks"
for rt in crun runc; do
    echo "$CRIU_CONF" >/etc/criu/$rt.conf
done
# A short freeze bound, so the stuck participant fails the dump quickly.
echo "SYSGENID_CRIU_FREEZE_TIMEOUT_MS=3000" >/etc/default/sysgenid-criu
chmod 0644 /etc/default/sysgenid-criu

# The image: the project's binaries, their libraries, a static busybox and
# the test scripts; no /etc at all (no /etc/group, no /etc/passwd).
R=$W/rootfs
rm -rf "$R"
mkdir -p "$R/bin" "$R/usr/bin" "$R/usr/sbin" "$R/run" "$R/tmp" "$R/dev" "$R/proc" "$R/sys"
cp -a $W/lib/. "$R/"
install -m 0755 $W/bin/busybox "$R/bin/busybox"
for applet in $("$R/bin/busybox" --list); do
    [ -e "$R/bin/$applet" ] || ln -s busybox "$R/bin/$applet"
done
install -m 0755 $W/bin/sysgenidd "$R/usr/sbin/sysgenidd"
install -m 0755 $W/bin/sysgenidctl "$R/usr/bin/sysgenidctl"
install -m 0755 $W/image/entrypoint $W/image/watch-log $W/image/participant "$R/"
[ ! -e "$R/etc" ] || { fail "image has an /etc"; }
podman rmi -f "$IMAGE" >/dev/null 2>&1
if ! tar -C "$R" -c . | podman import --change 'ENTRYPOINT ["/entrypoint"]' - "$IMAGE" >/dev/null; then
    fail "podman import of the image"
    exit 1
fi
log "image $IMAGE imported ($(du -sh "$R" | cut -f1), no /etc)"

# ----------------------------------------------------------------- helpers
# p RUNTIME ARGS...: podman with that OCI runtime.
p() {
    local rt=$1
    shift
    podman --runtime "$rt" "$@"
}

# start RUNTIME NAME [MODE]: a container of the image, as minimal as the
# issue asks: read-only root (/run, /tmp, /dev writable tmpfs), podman's
# default capabilities (no CAP_SYS_ADMIN), no /dev/fuse, no network.
start() {
    local rt=$1 name=$2 mode=${3:-sysgenid}
    p "$rt" rm -f -t 0 "$name" >/dev/null 2>&1
    p "$rt" run -d --name "$name" --network none --read-only \
        -e SYSGENID_TEST_MODE="$mode" "$IMAGE" >/dev/null || return 1
    wait_file "$rt" "$name" /run/log/ready 10 || [ "$mode" = plain ]
}

# in RUNTIME NAME CMD...: a command in the container.
cx() {
    local rt=$1 name=$2
    shift 2
    p "$rt" exec "$name" "$@"
}

wait_file() {
    local rt=$1 name=$2 file=$3 secs=$4 i=0
    while [ $i -lt $((secs * 10)) ]; do
        cx "$rt" "$name" test -e "$file" 2>/dev/null && return 0
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

# wait_line RUNTIME NAME FILE PATTERN SECS: FILE in the container has a
# line matching PATTERN (grep -E).
wait_line() {
    local rt=$1 name=$2 file=$3 pat=$4 secs=$5 i=0
    while [ $i -lt $((secs * 10)) ]; do
        cx "$rt" "$name" cat "$file" 2>/dev/null | grep -Eq "$pat" && return 0
        sleep 0.1
        i=$((i + 1))
    done
    return 1
}

generation() { cx "$1" "$2" sysgenidctl get 2>/dev/null; }
epoch() { cx "$1" "$2" sysgenidctl status --json 2>/dev/null | sed -n 's/^ *"epoch": *"\([0-9a-f]*\)".*/\1/p'; }

show_logs() {
    local rt=$1 name=$2 f
    for f in daemon watcher participant watcher.err participant.err; do
        echo "--- $name:/run/log/$f"
        cx "$rt" "$name" cat /run/log/$f 2>/dev/null | tail -n 20
    done
}

# The CRIU log of the last checkpoint or restore of NAME, as podman kept it.
criu_log() {
    local rt=$1 name=$2 kind=$3 dir
    dir=$(p "$rt" inspect -f '{{.StaticDir}}' "$name" 2>/dev/null)
    [ -n "$dir" ] && cat "$dir/$kind.log" 2>/dev/null | tail -n 40
}

# The resume-to-page window of the latest post-resume of init PID, in ms:
# the post-resume action starts once CRIU has resumed the tasks, and the
# hook returns once the daemon has published the new generation on the
# page (it publishes before it answers). Recorded in WINDOWS.
measure_window() {
    local label=$1 pid=$2 start end
    start=$(awk -v p="$pid" '$2 == "start" && $3 == "post-resume" && $4 == p { t = $1 } END { print t }' $W/actions.log)
    end=$(awk -v p="$pid" '$2 == "end" && $3 == "post-resume" && $4 == p { t = $1 } END { print t }' $W/actions.log)
    if [ -n "$start" ] && [ -n "$end" ]; then
        WINDOWS+=("$label $(((end - start) / 1000))us")
    fi
}

init_pid() { p "$1" inspect -f '{{.State.Pid}}' "$2"; }

# Wait until a pid is gone (this machine reaps orphans late; an in-place
# restore needs the old pid free).
wait_gone() {
    local pid=$1 i=0
    while [ -e "/proc/$pid" ] && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
}

# --------------------------------------------------------------- scenarios
scenario_clones() {
    local rt=$1 c=orig-$1 tar=$W/$1-export.tar.gz
    start "$rt" "$c" || { fail "$rt clones: start"; return; }
    check "$rt clones: the daemon started in the minimal image (generation 0)" \
        test "$(generation "$rt" "$c")" = 0
    if ! p "$rt" container checkpoint --export "$tar" "$c" >/dev/null 2>$W/err; then
        fail "$rt clones: checkpoint --export ($(tail -n 3 $W/err))"
        show_logs "$rt" "$c"
        return
    fi
    pass "$rt clones: checkpoint --export"
    p "$rt" rm -f -t 0 "$c" >/dev/null 2>&1
    local n epochs=()
    for n in 1 2; do
        local clone=clone$n-$rt
        p "$rt" rm -f -t 0 "$clone" >/dev/null 2>&1
        if ! p "$rt" container restore --import "$tar" --name "$clone" >/dev/null 2>$W/err; then
            fail "$rt clones: restore --import as $clone ($(tail -n 3 $W/err))"
            continue
        fi
        measure_window "$rt clone$n" "$(init_pid "$rt" "$clone")"
        check "$rt clones: $clone's watcher logs generation 1, kind restore, from source $RESTORE_SOURCE" \
            wait_line "$rt" "$clone" /run/log/watcher "^generation=1 kind=restore .*sources=$RESTORE_SOURCE" 10
        check "$rt clones: $clone's participant logged freeze before the dump, then thaw after the restore" \
            wait_line "$rt" "$clone" /run/log/participant '^thaw' 10
        cx "$rt" "$clone" cat /run/log/participant | tr '\n' ' ' | grep -Eq '^freeze 0 .*1 thaw' ||
            { fail "$rt clones: $clone's participant log is $(cx "$rt" "$clone" cat /run/log/participant | tr '\n' ' ')"; }
        epochs+=("$(epoch "$rt" "$clone")")
    done
    check "$rt clones: two clones run side by side" \
        test "$(p "$rt" ps --filter name=clone --format '{{.Names}}' | grep -c -- "-$rt\$")" = 2
    check "$rt clones: the clones' epochs differ (${epochs[*]})" \
        test "${#epochs[@]}" = 2 -a -n "${epochs[0]:-}" -a "${epochs[0]:-}" != "${epochs[1]:-}"
    [ "$FAIL" = 0 ] || { show_logs "$rt" clone1-$rt; }
    p "$rt" rm -f -t 0 clone1-$rt clone2-$rt >/dev/null 2>&1
}

scenario_leave() {
    local rt=$1 c=leave-$1
    start "$rt" "$c" || { fail "$rt leave-running: start"; return; }
    local before
    before=$(generation "$rt" "$c")
    if ! p "$rt" container checkpoint --leave-running --export $W/$rt-leave.tar.gz "$c" >/dev/null 2>$W/err; then
        fail "$rt leave-running: checkpoint ($(tail -n 3 $W/err))"
        return
    fi
    check "$rt leave-running: the original logs freeze, then thaw" \
        wait_line "$rt" "$c" /run/log/participant '^thaw' 10
    check "$rt leave-running: freeze came first" \
        sh -c "podman --runtime $rt exec $c cat /run/log/participant | tr '\n' ' ' | grep -Eq '^freeze [0-9]+ thaw'"
    check "$rt leave-running: the original keeps its generation ($before)" \
        test "$(generation "$rt" "$c")" = "$before"
    check "$rt leave-running: it runs on" test "$(p "$rt" inspect -f '{{.State.Status}}' "$c")" = running
    p "$rt" rm -f -t 0 "$c" >/dev/null 2>&1
}

scenario_inplace() {
    local rt=$1 c=inplace-$1
    start "$rt" "$c" || { fail "$rt in place: start"; return; }
    local before pid
    before=$(generation "$rt" "$c")
    pid=$(init_pid "$rt" "$c")
    if ! p "$rt" container checkpoint "$c" >/dev/null 2>$W/err; then
        fail "$rt in place: checkpoint ($(tail -n 3 $W/err))"
        return
    fi
    wait_gone "$pid"
    if ! p "$rt" container restore "$c" >/dev/null 2>$W/err; then
        fail "$rt in place: restore ($(tail -n 3 $W/err))"
        return
    fi
    measure_window "$rt in-place" "$(init_pid "$rt" "$c")"
    check "$rt in place: checkpoint and restore add one to the generation ($before -> $((before + 1)))" \
        wait_line "$rt" "$c" /run/log/watcher "^generation=$((before + 1)) " 10
    test "$(generation "$rt" "$c")" = $((before + 1)) || fail "$rt in place: generation is $(generation "$rt" "$c")"
    p "$rt" rm -f -t 0 "$c" >/dev/null 2>&1
}

scenario_plain() {
    local rt=$1 c=plain-$1 pid
    start "$rt" "$c" plain || { fail "$rt without sysgenid: start"; return; }
    pid=$(init_pid "$rt" "$c")
    if p "$rt" container checkpoint "$c" >/dev/null 2>$W/err; then
        pass "$rt without sysgenid: checkpoint with the hook configured globally"
    else
        fail "$rt without sysgenid: checkpoint ($(tail -n 3 $W/err))"
        return
    fi
    wait_gone "$pid"
    if p "$rt" container restore "$c" >/dev/null 2>$W/err; then
        pass "$rt without sysgenid: restore with the hook configured globally"
    else
        fail "$rt without sysgenid: restore ($(tail -n 3 $W/err))"
    fi
    check "$rt without sysgenid: it runs" test "$(p "$rt" inspect -f '{{.State.Status}}' "$c")" = running
    p "$rt" rm -f -t 0 "$c" >/dev/null 2>&1
}

scenario_stuck() {
    local rt=$1 c=stuck-$1
    start "$rt" "$c" stuck || { fail "$rt stuck participant: start"; return; }
    if p "$rt" container checkpoint "$c" >/dev/null 2>$W/err; then
        fail "$rt stuck participant: the checkpoint succeeded"
    else
        pass "$rt stuck participant: the checkpoint fails in strict mode"
        grep -q "freeze failed" $W/err || criu_log "$rt" "$c" dump | grep -q "freeze failed" ||
            log "($rt stuck: podman said: $(tail -n 2 $W/err))"
    fi
    check "$rt stuck participant: the container keeps running" \
        test "$(p "$rt" inspect -f '{{.State.Status}}' "$c")" = running
    check "$rt stuck participant: its participant was told to freeze, then to thaw" \
        wait_line "$rt" "$c" /run/log/participant '^thaw' 10
    check "$rt stuck participant: the daemon is running, not frozen" \
        sh -c "podman --runtime $rt exec $c sysgenidctl status | grep -q 'state: *running'"
    # SYSGENID_CRIU_STRICT=0: the hook logs the failed freeze and the dump
    # goes ahead.
    echo "SYSGENID_CRIU_STRICT=0" >>/etc/default/sysgenid-criu
    if p "$rt" container checkpoint --leave-running "$c" >/dev/null 2>$W/err; then
        pass "$rt stuck participant: with SYSGENID_CRIU_STRICT=0 the checkpoint goes ahead"
    else
        fail "$rt stuck participant: with SYSGENID_CRIU_STRICT=0 the checkpoint failed ($(tail -n 3 $W/err))"
    fi
    sed -i '/^SYSGENID_CRIU_STRICT=/d' /etc/default/sysgenid-criu
    p "$rt" rm -f -t 0 "$c" >/dev/null 2>&1
}

# runc on its own: a hand-made OCI bundle (config.json written here), checkpoint
# and restore with runc's own commands.
scenario_runc_bundle() {
    local b=$W/bundle id=sg-bundle
    rm -rf "$b"
    mkdir -p "$b/rootfs"
    cp -a "$R/." "$b/rootfs/"
    # By hand: detached, no terminal, read-only root with a tmpfs /run,
    # the image's init, podman's default capabilities (no CAP_SYS_ADMIN),
    # its own namespaces (network too: no network), and the action script
    # by annotation instead of /etc/criu/runc.conf.
    echo "$CRIU_CONF" >$W/criu-annotation.conf
    local caps='"CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_FOWNER","CAP_FSETID","CAP_KILL","CAP_NET_BIND_SERVICE","CAP_SETFCAP","CAP_SETGID","CAP_SETPCAP","CAP_SETUID","CAP_SYS_CHROOT"'
    cat >"$b/config.json" <<EOF
{
  "ociVersion": "1.0.2",
  "process": {
    "terminal": false,
    "user": {"uid": 0, "gid": 0},
    "args": ["/bin/sh", "-c", "exec /entrypoint </dev/null >/dev/null 2>&1"],
    "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
    "cwd": "/",
    "capabilities": {"bounding": [$caps], "effective": [$caps], "permitted": [$caps]},
    "noNewPrivileges": true
  },
  "root": {"path": "rootfs", "readonly": true},
  "hostname": "sg-bundle",
  "annotations": {"org.criu.config": "$W/criu-annotation.conf"},
  "mounts": [
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
    {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
    {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
    {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
    {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}
  ],
  "linux": {
    "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
    "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
    "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
  }
}
EOF
    rm -f /etc/criu/runc.conf
    runc delete -f $id >/dev/null 2>&1
    # Its descriptors are the container's own /dev/null (see args): one on a
    # host file would fail the dump (CRIU cannot find its mount).
    (cd "$b" && runc run -d $id </dev/null >/dev/null 2>$W/err) || { fail "runc bundle: run ($(tail -n 2 $W/err))"; return; }
    local i=0
    while ! runc exec $id test -e /run/log/ready 2>/dev/null && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    check "runc bundle: the daemon runs (generation 0)" test "$(runc exec $id sysgenidctl get 2>/dev/null)" = 0
    local pid
    pid=$(runc state $id | sed -n 's/^ *"pid": *\([0-9]*\).*/\1/p')
    if ! runc checkpoint --image-path $W/bundle-img $id >$W/err 2>&1; then
        fail "runc bundle: checkpoint ($(tail -n 3 $W/err))"
        return
    fi
    pass "runc bundle: checkpoint (action script from the org.criu.config annotation)"
    wait_gone "$pid"
    runc delete -f $id >/dev/null 2>&1
    if ! (cd "$b" && runc restore -d --image-path $W/bundle-img $id </dev/null >$W/err 2>&1); then
        fail "runc bundle: restore ($(tail -n 3 $W/err))"
        return
    fi
    pass "runc bundle: restore"
    pid=$(runc state $id | sed -n 's/^ *"pid": *\([0-9]*\).*/\1/p')
    measure_window "runc-bundle" "$pid"
    i=0
    while ! runc exec $id cat /run/log/watcher 2>/dev/null | grep -q "^generation=1 kind=restore .*sources=$RESTORE_SOURCE" && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    check "runc bundle: the restored container's watcher logs generation 1, kind restore, from source $RESTORE_SOURCE" \
        grep -q "^generation=1 kind=restore .*sources=$RESTORE_SOURCE" <(runc exec $id cat /run/log/watcher)
    check "runc bundle: its participant logged freeze, then thaw" \
        sh -c "runc exec $id cat /run/log/participant | tr '\n' ' ' | grep -Eq '^freeze 0 .*thaw'"
    runc delete -f $id >/dev/null 2>&1
    echo "$CRIU_CONF" >/etc/criu/runc.conf
}

# The daemon in the minimal image: one line for each thing it turned off,
# and no kernel source in a container.
check_startup() {
    local rt=$1 c=startup-$1 log
    start "$rt" "$c" || { fail "$rt start-up: start"; show_logs "$rt" "$c"; return; }
    log=$(cx "$rt" "$c" cat /run/log/daemon)
    echo "$log" | sed 's/^/    daemon: /'
    check "$rt start-up: the daemon says it runs in a container and that restores come from the CRIU hook" \
        grep -q "container.*CRIU" <<<"$log"
    check "$rt start-up: ready" grep -q "ready" <<<"$log"
    p "$rt" rm -f -t 0 "$c" >/dev/null 2>&1
}

IFS=, read -r -a rts <<<"$RUNTIMES"
for rt in "${rts[@]}"; do
    [ "$rt" != none ] || continue
    log "== podman + $rt"
    check_startup "$rt"
    for s in clones leave inplace plain stuck; do
        wanted "$s" || continue
        log "-- $rt: $s"
        "scenario_$s" "$rt"
    done
done
if wanted bundle || [ "$SCENARIOS" = "clones,leave,inplace,plain,stuck" ]; then
    log "== runc on its own, hand-made bundle"
    scenario_runc_bundle
fi

echo
echo "==== sysgenid container test summary"
echo "criu $(cat $W/criu-version), $(dpkg-query -W -f '${Package} ${Version}, ' podman crun runc | sed 's/, $//')"
echo "resume -> page shows the new generation (post-resume action start -> hook done): ${WINDOWS[*]:-none measured}"
for f in "${FAILED[@]}"; do echo "failed: $f"; done
echo "containers: $PASS passed, $FAIL failed"
[ "$FAIL" = 0 ]
