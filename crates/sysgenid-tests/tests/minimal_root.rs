//! The daemon starts with its defaults where sysgenid is needed most: a
//! minimal container or initramfs with no `/etc/group` or `/etc/passwd`,
//! no `/dev/fuse`, and no `CAP_SYS_ADMIN` (issue 21, item 5). It used to
//! exit at once ("cannot look up group sysgenid: ENOENT"), and with
//! `/dev/fuse` present but mounting refused it exited 1 and left an empty
//! `/dev/sysgenid` behind.
//!
//! Each case runs in a private mount namespace (`unshare -m`) with empty
//! file systems over `/etc`, `/dev` and `/run` (so the default runtime
//! directory `/run/sysgenid` is private), the daemon started with no flags
//! at all and without `CAP_SYS_ADMIN` (`setpriv`). Nothing leaks out of the
//! namespace. The busybox initramfs case runs under QEMU in `tests/vm`
//! (its guest has no `/etc/group` and starts the daemon with defaults).
//! Needs root (namespaces, mounts); prints SKIPPED otherwise.

use std::path::Path;
use std::process::Command;

use sysgenid_tests::*;

/// Runs `body` (a shell script) in a private mount namespace after
/// `setup`, with `$D` the daemon, `$C` the CLI and `$LOG` a log file, and
/// returns (what it printed, the daemon's log).
fn in_minimal_root(setup: &str, body: &str) -> (String, String) {
    let scratch = tempfile::tempdir().unwrap();
    let log = scratch.path().join("daemon.log");
    let script = format!(
        r#"set -u
S={scratch}
# The real /dev/fuse, kept reachable before /dev is emptied.
touch $S/fuse
[ -e /dev/fuse ] && mount --bind /dev/fuse $S/fuse
mount -t tmpfs -o mode=755 minimal-etc /etc
mount -t tmpfs -o mode=755 minimal-dev /dev
# Even an initramfs has /dev/null (devtmpfs); the shell needs it.
mknod -m 666 /dev/null c 1 3
mount -t tmpfs -o mode=755 minimal-run /run
{setup}
# Without CAP_SYS_ADMIN, as in an unprivileged container.
nocap() {{ exec setpriv --bounding-set -sys_admin --inh-caps -sys_admin -- "$@"; }}
wait_socket() {{
    i=0
    while [ ! -S /run/sysgenid/sysgenid.sock ]; do
        kill -0 $1 2>&1 || {{ wait $1; echo "daemon exited: $?"; return 1; }}
        i=$((i + 1)); [ $i -le 100 ] || {{ echo "no socket after 10 s"; return 1; }}
        sleep 0.1
    done
}}
{body}
"#,
        scratch = scratch.path().display(),
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("D", bin("sysgenidd"))
        .env("C", bin("sysgenidctl"))
        .env("LOG", &log)
        .env("RUST_LOG", "info")
        .output()
        .expect("run unshare");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let daemon_log = std::fs::read_to_string(&log).unwrap_or_default();
    (printed, daemon_log)
}

/// Starts the daemon with no flags, asks its status with no flags, stops
/// it, and lists what is left in /dev.
const DEFAULTS: &str = r#"
nocap "$D" 2>"$LOG" &
DP=$!
wait_socket $DP && "$C" status
kill -TERM $DP; wait $DP; echo "daemon exit: $?"
echo "left in /dev: [$(ls -A /dev | tr '\n' ' ')]"
"#;

#[test]
fn the_daemon_starts_with_defaults_without_etc_group_dev_fuse_or_cap_sys_admin() {
    if skip_unless_root("for mount namespaces") {
        return;
    }
    let (printed, log) = in_minimal_root("", DEFAULTS);
    let context = format!("printed:\n{printed}\ndaemon log:\n{log}");
    assert!(log.contains(" ready: "), "not ready; {context}");
    assert!(
        log.contains("device: off (/dev/fuse is missing"),
        "{context}"
    );
    assert!(printed.contains("generation:"), "no status; {context}");
    assert!(printed.contains("daemon exit: 0"), "{context}");
    assert!(printed.contains("left in /dev: [null ]"), "{context}");
    assert!(!log.contains("cannot look up group"), "{context}");
}

#[test]
fn a_refused_mount_turns_the_default_device_off_and_an_explicit_one_fails_loudly() {
    if skip_unless_root("for mount namespaces") {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: needs /dev/fuse");
        return;
    }
    let fuse = "touch /dev/fuse && mount --bind $S/fuse /dev/fuse";
    let (printed, log) = in_minimal_root(fuse, DEFAULTS);
    let context = format!("printed:\n{printed}\ndaemon log:\n{log}");
    assert!(log.contains(" ready: "), "not ready; {context}");
    assert!(
        log.contains("device: off (mounting /dev/sysgenid was refused"),
        "{context}"
    );
    assert!(printed.contains("generation:"), "no status; {context}");
    assert!(printed.contains("daemon exit: 0"), "{context}");
    assert!(
        printed.contains("left in /dev: [fuse null ]"),
        "the mount point was left behind; {context}"
    );

    let explicit = r#"
(nocap "$D" --device /dev/sysgenid 2>"$LOG")
echo "daemon exit: $?"
echo "left in /dev: [$(ls -A /dev | tr '\n' ' ')]"
"#;
    let (printed, log) = in_minimal_root(fuse, explicit);
    let context = format!("printed:\n{printed}\ndaemon log:\n{log}");
    assert!(printed.contains("daemon exit: 1"), "{context}");
    assert!(
        log.contains("cannot serve the device /dev/sysgenid: mount"),
        "{context}"
    );
    assert!(
        printed.contains("left in /dev: [fuse null ]"),
        "the mount point was left behind; {context}"
    );
}
