//! The privilege attacks of issue 14, each replayed as real unprivileged
//! processes against the real daemon: a user-namespace race, a
//! file-capability exec, a connection handed to someone else (fork + drop,
//! `SCM_RIGHTS`), a Hello claiming the future, a planted lock and a
//! writable runtime directory, and a forced update that would exhaust the
//! counter.
//!
//! The attackers are `tests/attack/attack.c`, compiled with `gcc`, speaking
//! the raw wire protocol. Needs root (to run them as uid 65534, to
//! `setcap`); each test prints SKIPPED and returns otherwise.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use sysgenid_tests::*;

const NOBODY: u32 = 65534;

/// The compiled attacker, built once per test process (renamed into place,
/// so a concurrent test process keeps running its own copy).
fn attacker() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = bin("sysgenidd").parent().expect("target dir").to_path_buf();
        let out = dir.join("sysgenid-test-attack");
        let tmp = dir.join(format!("sysgenid-test-attack.{}", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/attack/attack.c");
        let status = Command::new("gcc")
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("gcc is needed to build the attack client");
        assert!(status.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).expect("install the attack client");
        out
    })
}

fn attack(args: &[&str]) -> Command {
    let mut cmd = Command::new(attacker());
    clean_env(&mut cmd).args(args);
    cmd
}

fn as_nobody(mut cmd: Command) -> Command {
    cmd.uid(NOBODY).gid(NOBODY);
    cmd
}

fn run(mut cmd: Command) -> String {
    let out: Output = cmd.output().expect("run the attack client");
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "attack client failed ({}): {text}{}",
        out.status,
        stderr(&out)
    );
    text
}

fn sock(d: &Daemon) -> String {
    d.dir.join("sysgenid.sock").display().to_string()
}

/// Item 1: Bump, then `unshare(CLONE_NEWUSER)` at once, in a fresh process
/// per try with a different delay each time. Before the fix 2 000 tries as
/// nobody got 92 bumps; now the capabilities are read before the namespace,
/// so the new namespace is always seen.
#[test]
fn a_bump_followed_by_unshare_of_a_user_namespace_is_never_granted() {
    if skip_unless_root("to run the attacker as nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    const TRIES: u32 = 1500;
    let line = run(as_nobody(attack(&["race", &sock(&d), &TRIES.to_string()])));
    eprintln!("race: {line}");
    let field = |name: &str| -> u32 {
        let mut words = line.split_whitespace();
        words.find(|w| *w == name).expect(name);
        words.next().and_then(|v| v.parse().ok()).expect(name)
    };
    assert_eq!(field("tries"), TRIES, "{line}");
    assert_eq!(
        field("unshared"),
        TRIES,
        "every try must really create a user namespace: {line}"
    );
    assert_eq!(field("granted"), 0, "{line}");
    assert_eq!(field("denied"), TRIES, "{line}");
    assert_eq!(d.generation(), 0, "the generation did not move");
}

/// Item 3: nobody connects, a child keeps the socket, the parent execs a
/// binary with `cap_checkpoint_restore+ep`. The child, which sends the
/// bump, has no capability: refused.
#[test]
fn a_file_capability_exec_by_the_connector_gives_no_privilege_to_the_sender() {
    if skip_unless_root("to setcap and run the attacker as nobody") {
        return;
    }
    let Ok(setcap) = which("setcap") else {
        panic!("setcap is needed (Debian package libcap2-bin; .ci/run installs it)");
    };
    let dir = runtime_dir();
    let capable = dir.path().join("sysgenid-capable");
    std::fs::copy(which("sleep").expect("sleep"), &capable).unwrap();
    let st = Command::new(setcap)
        .arg("cap_checkpoint_restore+ep")
        .arg(&capable)
        .status()
        .unwrap();
    assert!(st.success(), "setcap on {}", capable.display());
    let rt = dir.path().join("rt");
    let d = Daemon::start(&rt);
    let out = run(as_nobody(attack(&[
        "filecap",
        &sock(&d),
        capable.to_str().unwrap(),
    ])));
    assert!(
        out.contains("parent-capable"),
        "the exec must really confer the capability, else this proves nothing: {out}"
    );
    assert!(out.contains("child-bump denied"), "{out}");
    assert_eq!(d.generation(), 0);
}

/// Item 4: root connects and forks; the child drops to nobody without
/// capabilities and bumps on the inherited connection: refused. Root's own
/// bump on the same connection afterwards: granted.
#[test]
fn a_connection_inherited_by_a_process_that_dropped_privilege_cannot_bump() {
    if skip_unless_root("to connect as root and drop to nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let out = run(attack(&["fork-drop", &sock(&d)]));
    assert!(out.contains("dropped-child denied"), "{out}");
    assert!(out.contains("root granted"), "{out}");
    assert_eq!(d.generation(), 1, "exactly root's bump");
}

/// Item 4 with `SCM_RIGHTS`: root's connection is passed to an unprivileged
/// process, which bumps: refused; root then bumps: granted.
#[test]
fn a_connection_passed_by_scm_rights_to_an_unprivileged_process_cannot_bump() {
    if skip_unless_root("to connect as root and pass the socket to nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let out = run(attack(&["pass-fd", &sock(&d)]));
    assert!(out.contains("receiver denied"), "{out}");
    assert!(out.contains("root granted"), "{out}");
    assert_eq!(d.generation(), 1, "exactly root's bump");
}

/// Item 6: a nobody watcher claiming a future acknowledged generation is
/// outdated (its client must renew) but does not hold root's barrier.
#[test]
fn a_hello_claiming_the_future_does_not_hold_the_barrier() {
    if skip_unless_root("to run the watcher as nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    d.control().bump(0).unwrap();
    let mut liar = as_nobody(attack(&["future-claim", &sock(&d), "1000"]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(liar.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(
        line.trim(),
        "outdated 1",
        "the liar still sees itself outdated"
    );
    d.wait_watchers_registered(1);
    // Exit 3 would be the timeout: the claim held the barrier.
    let o = d.ctl(&["wait-watchers", "--timeout-ms", "5000"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let s = d.status();
    assert_eq!((s.tracked, s.outdated, s.outdated_untracked), (0, 0, 1));
    drop(liar.stdin.take());
    liar.wait().unwrap();
}

/// Starts the daemon on `rt` and returns its error output; fails the test
/// if it is still running after 10 s (it accepted the directory).
fn refused(rt: &Path) -> String {
    let mut child = daemon_command(rt)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().unwrap().is_some()
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        exited && !out.status.success(),
        "the daemon started on an unsafe directory: {}",
        stderr(&out)
    );
    stderr(&out)
}

/// Item 9: a group- or world-writable runtime directory is refused with
/// what to do, and left as it was (not tightened, nothing created).
#[test]
fn a_group_or_world_writable_runtime_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    for mode in [0o777, 0o775, 0o1777] {
        let dir = runtime_dir();
        let rt = dir.path().join("rt");
        std::fs::create_dir(&rt).unwrap();
        std::fs::set_permissions(&rt, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = refused(&rt);
        assert!(err.contains("group- or world-writable"), "{mode:o}: {err}");
        assert!(err.contains("remove it"), "says what to do: {err}");
        let now = std::fs::metadata(&rt).unwrap().permissions().mode() & 0o7777;
        assert_eq!(now, mode, "not tightened");
        assert_eq!(
            std::fs::read_dir(&rt).unwrap().count(),
            0,
            "nothing created"
        );
    }
}

/// Item 9: a `lock` planted by another user (and held by it) is refused
/// with a message naming it, not reported as another daemon running.
#[test]
fn a_planted_lock_file_is_refused_with_a_clear_error() {
    if skip_unless_root("to plant a file as nobody") {
        return;
    }
    let dir = runtime_dir();
    let rt = dir.path().join("rt");
    std::fs::create_dir(&rt).unwrap();
    let lock = rt.join("lock");
    std::fs::write(&lock, b"").unwrap();
    std::os::unix::fs::chown(&lock, Some(NOBODY), Some(NOBODY)).unwrap();
    // The planter holds it, as the attack did.
    let mut holder = as_nobody({
        let mut c = Command::new("flock");
        c.arg(&lock).args(["sleep", "30"]);
        c.process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    })
    .spawn()
    .expect("flock(1) from util-linux");
    std::thread::sleep(Duration::from_millis(200));
    let err = refused(&rt);
    // flock and its sleep, as one process group.
    // SAFETY: kill(2) on the group this test created; no memory involved.
    unsafe { libc::kill(-(holder.id() as i32), libc::SIGKILL) };
    let _ = holder.wait();
    assert!(err.contains("lock"), "{err}");
    assert!(err.contains("owner uid 65534"), "{err}");
    assert!(err.contains("remove it"), "{err}");
    assert!(!err.contains("already running"), "{err}");
}

/// Exhaustion: a forced update to u32::MAX is refused without the explicit
/// flag (nothing changes) and done with it; on the device, whose ABI has no
/// flag, it is EOVERFLOW.
#[test]
fn a_forced_update_that_would_exhaust_the_counter_needs_the_explicit_flag() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let o = d.ctl(&["bump", "--min", "4294967295"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--allow-exhaustion"), "{}", stderr(&o));
    assert_eq!(d.generation(), 0, "nothing changed");
    let o = d.ctl(&["bump", "--min", "4293918719"]);
    assert!(
        o.status.success(),
        "the last value below the reserve is allowed"
    );
    let o = d.ctl(&["bump", "--min", "4294967295", "--allow-exhaustion"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "4294967295");
    assert_eq!(d.generation(), u32::MAX);
}

#[test]
fn the_device_refuses_an_exhausting_forced_update_with_eoverflow() {
    if skip_unless_root("to mount the device") {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: /dev/fuse is missing");
        return;
    }
    let tmp = runtime_dir();
    let dev = tmp.path().join("sysgenid");
    let mut d = Daemon::start_with(&tmp.path().join("rt"), &["--device", dev.to_str().unwrap()]);
    let dev_s = dev.to_str().unwrap();
    let out = run(attack(&["ioctl-force", dev_s, "4294967295"]));
    let out2 = run(attack(&["ioctl-force", dev_s, "5"]));
    let generation = d.generation();
    d.stop();
    if let Ok(path) = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 reads a NUL-terminated path we own; failure
        // (already unmounted) is ignored.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
    assert_eq!(out.trim(), "force-error EOVERFLOW");
    assert_eq!(out2.trim(), "force ok", "an ordinary minimum still works");
    assert_eq!(generation, 5);
}

fn which(name: &str) -> Result<PathBuf, ()> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(())
}
