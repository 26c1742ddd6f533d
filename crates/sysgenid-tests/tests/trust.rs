//! Clients believe only a daemon run by root or by themselves (issue:
//! squatted runtime directories). A real `sysgenidd` runs as uid 65534 in a
//! directory it owns, as a user squatting a path would; clients of other
//! uids refuse its socket and its page with an error naming the path and
//! the owner, and its own uid may still use it (a per-user daemon).

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use sysgenid::{Control, Error, Probe, Watcher};
use sysgenid_tests::{
    bin, clean_env, private_mounts, runtime_dir, skip_unless_root, stderr, stdout,
    sysgenidd_command_keeping, Daemon, Squatter,
};

const NOBODY: u32 = 65534;
/// Another unprivileged uid, neither root nor the squatter.
const OTHER: u32 = 65533;

fn expect_untrusted(e: Error, path_end: &str, owner: u32) {
    let text = e.to_string();
    match &e {
        Error::Untrusted {
            path, owner: found, ..
        } => {
            assert!(path.ends_with(path_end), "{text}");
            assert_eq!(*found, owner, "{text}");
        }
        other => panic!("expected Untrusted, got {other:?}"),
    }
    assert_eq!(e.errno(), libc::EPERM);
    assert!(text.contains(path_end), "{text}");
    assert!(text.contains(&format!("uid {owner}")), "{text}");
}

#[test]
fn root_refuses_a_daemon_and_a_page_run_by_another_user() {
    if skip_unless_root("to run a daemon as nobody") {
        return;
    }
    let squat = Squatter::start(NOBODY);
    let dir = squat.path();
    let err = Control::connect(Some(&dir)).err().expect("refused");
    expect_untrusted(err, "sysgenid.sock", NOBODY);
    let err = Watcher::builder()
        .runtime_dir(&dir)
        .open()
        .err()
        .expect("refused");
    expect_untrusted(err, "sysgenid.sock", NOBODY);
    let err = Probe::open(Some(&dir)).err().expect("refused");
    expect_untrusted(err, "generation", NOBODY);
}

#[test]
fn the_cli_of_another_uid_refuses_the_squatter_and_its_own_uid_may_use_it() {
    if skip_unless_root("to run a daemon and clients as other uids") {
        return;
    }
    let squat = Squatter::start(NOBODY);
    let ctl = |uid: u32| {
        let mut c = Command::new(bin("sysgenidctl"));
        clean_env(&mut c)
            .arg("get")
            .env("SYSGENID_RUNTIME_DIR", squat.path())
            .uid(uid)
            .gid(uid);
        c.output().unwrap()
    };
    let out = ctl(OTHER);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("sysgenid.sock"), "{err}");
    assert!(err.contains("uid 65534"), "{err}");
    assert!(err.contains("refusing"), "{err}");
    assert_eq!(stdout(&out), "", "nothing read from an untrusted daemon");
    // Its own uid: a per-user daemon, asked for by name.
    let out = ctl(NOBODY);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "0");
}

#[test]
fn a_page_writable_by_others_is_refused() {
    let dir = runtime_dir();
    let _d = Daemon::start(dir.path());
    let page = dir.path().join("generation");
    Probe::open(Some(dir.path())).expect("the daemon's own page is trusted");
    std::fs::set_permissions(&page, std::fs::Permissions::from_mode(0o666)).unwrap();
    let err = Probe::open(Some(dir.path())).err().expect("refused");
    let text = err.to_string();
    assert!(matches!(err, Error::Untrusted { .. }), "{text}");
    assert!(text.contains("writable by others"), "{text}");
    assert!(text.contains("generation"), "{text}");
}

/// The defaults, in a mount namespace of the test's own where `/run` is an
/// empty tmpfs: a root daemon given no `--runtime-dir` serves
/// `/run/sysgenid`, and a client of any uid given no directory and no
/// environment finds it there. The machine's `/run/sysgenid` (a system
/// daemon's, if one runs) is never seen nor touched.
#[test]
fn with_no_environment_every_uid_finds_the_daemon_at_the_default_run_sysgenid() {
    if skip_unless_root("to mount /run privately and run a client as nobody") {
        return;
    }
    let mut ns = private_mounts::enter();
    ns.tmpfs(Path::new("/run"));
    let default_dir = Path::new("/run/sysgenid");
    let d = Daemon::start_keeping_defaults(default_dir, &[], &["--runtime-dir"]);
    assert!(
        d.log().contains("ready: runtime dir /run/sysgenid"),
        "{}",
        d.log()
    );
    assert_eq!(d.control().bump(7).unwrap(), 7);
    let nobody_get = || {
        let mut c = Command::new(bin("sysgenidctl"));
        c.arg("get").env_clear().uid(NOBODY).gid(NOBODY);
        c.output().unwrap()
    };
    let out = nobody_get();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "7");
    // Without the daemon, the error names where it was looked for: never a
    // per-user path.
    drop(d);
    let out = nobody_get();
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("/run/sysgenid/sysgenid.sock"), "{err}");
}

#[test]
fn a_daemon_not_run_by_root_must_be_given_its_runtime_directory() {
    if skip_unless_root("to run the daemon as nobody") {
        return;
    }
    let out = sysgenidd_command_keeping(None, &[], &["--runtime-dir"])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("--runtime-dir") && err.contains("/run/sysgenid"),
        "a non-root daemon must be given its directory: {err}"
    );
}
