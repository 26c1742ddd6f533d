//! The QEMU guest agent hook (`packaging/qemu-ga/sysgenid`) and the strict
//! dispatcher (`packaging/qemu-ga/fsfreeze-hook`) as shipped, run the way
//! the agent runs them, against a real daemon and real participants
//! (`sysgenidctl watch --lifecycle --exec ...`): the exit codes are the
//! contract the agent (and through it libvirt) acts on. The same files run
//! under the real agent in `tests/vm` (`run.sh --lifecycle`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use sysgenid::LifecycleState;
use sysgenid_tests::*;

fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging/qemu-ga")
        .join(name)
}

/// `packaging/qemu-ga/NAME`, to run in a clean environment.
fn script(name: &str) -> Command {
    let mut cmd = Command::new(packaging(name));
    clean_env(&mut cmd);
    cmd
}

/// The environment the hook gets: our client, our daemon, no settings file
/// of the machine's, and a freeze timeout.
fn hook_env(cmd: &mut Command, dir: &Path, timeout_ms: &str) {
    cmd.env("SYSGENIDCTL", bin("sysgenidctl"))
        .env("SYSGENID_RUNTIME_DIR", dir)
        .env("SYSGENID_QGA_CONF", "/nonexistent/sysgenid-qemu-ga")
        .env("SYSGENID_QGA_FREEZE_TIMEOUT_MS", timeout_ms);
}

fn hook(dir: &Path, event: &str, timeout_ms: &str) -> Output {
    let mut cmd = script("sysgenid");
    cmd.arg(event);
    hook_env(&mut cmd, dir, timeout_ms);
    cmd.output().expect("run packaging/qemu-ga/sysgenid")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

/// A participant: `sysgenidctl watch --lifecycle --exec CMD...`.
struct Participant(Child);

impl Participant {
    fn start(d: &Daemon, exec: &[&str]) -> Participant {
        let before = d.status().participants;
        let child = ctl_command(&d.dir)
            .args(["watch", "--lifecycle", "--exec"])
            .args(exec)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn a participant");
        assert!(
            wait_until(Duration::from_secs(10), || d.status().participants > before),
            "the participant did not register"
        );
        Participant(child)
    }
}

impl Drop for Participant {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn state(d: &Daemon) -> LifecycleState {
    d.status().state
}

#[test]
fn hook_freeze_and_thaw_drive_the_lifecycle() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let _p = Participant::start(&d, &["true"]);
    let o = hook(dir.path(), "freeze", "10000");
    assert_eq!(code(&o), 0, "freeze: {}", stderr(&o));
    assert_eq!(state(&d), LifecycleState::Frozen);
    let o = hook(dir.path(), "thaw", "10000");
    assert_eq!(code(&o), 0, "thaw: {}", stderr(&o));
    assert_eq!(state(&d), LifecycleState::Running);
    // The agent thaws after a failed freeze too: thawing when running is 0.
    let o = hook(dir.path(), "thaw", "10000");
    assert_eq!(code(&o), 0, "thaw when running: {}", stderr(&o));
    // Events a future agent may add are ignored.
    let o = hook(dir.path(), "suspend", "10000");
    assert_eq!(code(&o), 0, "unknown event: {}", stderr(&o));
    assert!(
        stderr(&o).contains("ignoring unknown event"),
        "{}",
        stderr(&o)
    );
    assert_eq!(state(&d), LifecycleState::Running);
}

#[test]
fn hook_failed_freeze_exits_3_and_leaves_everything_running() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let _ok = Participant::start(&d, &["true"]);
    let _stuck = Participant::start(&d, &["sleep", "60"]);
    let o = hook(dir.path(), "freeze", "300");
    assert_eq!(
        code(&o),
        3,
        "a participant that never confirms: {}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("freeze failed (sysgenidctl exit 3); thawing"),
        "{}",
        stderr(&o)
    );
    assert_eq!(state(&d), LifecycleState::Running);
}

#[test]
fn hook_without_daemon_fails_and_bad_settings_are_refused() {
    let dir = runtime_dir();
    let missing = dir.path().join("no-daemon-here");
    let o = hook(&missing, "freeze", "1000");
    assert_eq!(code(&o), 1, "no daemon: {}", stderr(&o));
    let o = hook(&missing, "thaw", "1000");
    assert_eq!(code(&o), 1, "no daemon: {}", stderr(&o));
    let o = hook(&missing, "freeze", "10s");
    assert_eq!(code(&o), 2, "bad timeout: {}", stderr(&o));
    assert!(
        stderr(&o).contains("is not a number of milliseconds"),
        "{}",
        stderr(&o)
    );
}

/// A hook directory: `10-first` and `90-last` record their calls in
/// `trace`, `50-sysgenid` is the shipped hook; plus files the stock
/// dispatcher skips too.
fn hook_dir(root: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let hooks = root.join("fsfreeze-hook.d");
    std::fs::create_dir(&hooks).unwrap();
    let trace = root.join("trace");
    for name in ["10-first", "90-last", "95-backup.bak", "96-old.dpkg-old"] {
        let path = hooks.join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\necho \"{name} $1\" >> '{}'\n", trace.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(hooks.join("20-not-executable"), "#!/bin/sh\nexit 1\n").unwrap();
    std::fs::copy(packaging("sysgenid"), hooks.join("50-sysgenid")).unwrap();
    hooks
}

fn dispatch(root: &Path, d: &Daemon, event: &str, timeout_ms: &str) -> (i32, String) {
    let mut cmd = script("fsfreeze-hook");
    cmd.arg(event)
        .env("FSFREEZE_HOOK_DIR", root.join("fsfreeze-hook.d"))
        .env("FSFREEZE_HOOK_LOG", root.join("log"));
    hook_env(&mut cmd, &d.dir, timeout_ms);
    let o = cmd.output().expect("run packaging/qemu-ga/fsfreeze-hook");
    let trace = std::fs::read_to_string(root.join("trace")).unwrap_or_default();
    let _ = std::fs::remove_file(root.join("trace"));
    (code(&o), trace)
}

#[test]
fn strict_dispatcher_fails_the_freeze_and_thaws_the_scripts_it_froze() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let root = tempfile::tempdir().unwrap();
    hook_dir(root.path());
    let _ok = Participant::start(&d, &["true"]);

    let (rc, trace) = dispatch(root.path(), &d, "freeze", "10000");
    assert_eq!(rc, 0, "{trace}");
    assert_eq!(trace, "10-first freeze\n90-last freeze\n");
    assert_eq!(state(&d), LifecycleState::Frozen);
    let (rc, trace) = dispatch(root.path(), &d, "thaw", "10000");
    assert_eq!(rc, 0);
    assert_eq!(
        trace, "90-last thaw\n10-first thaw\n",
        "thaw runs in reverse order"
    );
    assert_eq!(state(&d), LifecycleState::Running);

    let stuck = Participant::start(&d, &["sleep", "60"]);
    let (rc, trace) = dispatch(root.path(), &d, "freeze", "300");
    assert_eq!(rc, 3, "the failed script's status: {trace}");
    assert_eq!(
        trace, "10-first freeze\n10-first thaw\n",
        "stops at the failure, thaws what it froze, never runs the rest"
    );
    assert_eq!(state(&d), LifecycleState::Running);
    let log = std::fs::read_to_string(root.path().join("log")).unwrap();
    assert!(log.contains("freeze failed in"), "{log}");
    drop(stuck);

    // A thaw that fails somewhere still runs every script, and says so.
    let (rc, _) = dispatch(root.path(), &d, "freeze", "10000");
    assert_eq!(rc, 0);
    let mut cmd = script("fsfreeze-hook");
    cmd.arg("thaw")
        .env("FSFREEZE_HOOK_DIR", root.path().join("fsfreeze-hook.d"))
        .env("FSFREEZE_HOOK_LOG", root.path().join("log"));
    hook_env(&mut cmd, &d.dir, "10000");
    cmd.env("SYSGENID_RUNTIME_DIR", root.path().join("no-daemon-here"));
    let o = cmd.output().unwrap();
    let trace = std::fs::read_to_string(root.path().join("trace")).unwrap();
    assert_eq!(code(&o), 1, "{trace}");
    assert_eq!(trace, "90-last thaw\n10-first thaw\n");
    assert_eq!(
        state(&d),
        LifecycleState::Frozen,
        "that thaw could not reach the daemon"
    );
    assert_eq!(dispatch(root.path(), &d, "thaw", "10000").0, 0);
    assert_eq!(state(&d), LifecycleState::Running);
}

#[test]
fn hook_reads_its_settings_file_only_when_only_root_can_write_it() {
    use std::os::unix::fs::PermissionsExt;
    if skip_unless_root("(the settings file must be owned by root)") {
        return;
    }
    let dir = runtime_dir();
    let conf = dir.path().join("sysgenid-qemu-ga");
    // A value the hook refuses (exit 2) shows the file was read.
    std::fs::write(&conf, "SYSGENID_QGA_FREEZE_TIMEOUT_MS=soon\n").unwrap();
    let run = |conf: &Path| {
        let mut cmd = script("sysgenid");
        cmd.arg("freeze");
        hook_env(&mut cmd, &dir.path().join("no-daemon-here"), "1000");
        cmd.env("SYSGENID_QGA_CONF", conf);
        cmd.output().unwrap()
    };
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = run(&conf);
    assert_eq!(code(&o), 2, "root-owned 0644 file read: {}", stderr(&o));
    assert!(
        stderr(&o).contains("SYSGENID_QGA_FREEZE_TIMEOUT_MS=soon"),
        "{}",
        stderr(&o)
    );
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = run(&conf);
    assert_eq!(
        code(&o),
        1,
        "world-writable file ignored, no daemon: {}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("ignoring"), "{}", stderr(&o));
}
