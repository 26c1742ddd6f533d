//! The findings of the security review of the daemon after the snapshot
//! lifecycle, the hooks directory and the kernel log FIFO arrived, each
//! replayed by real unprivileged processes (uid 65534, its own user
//! namespaces) against the real daemon. A finding that is fixed is a plain
//! test; one whose fix belongs elsewhere is `#[ignore]`d with the reason
//! (it fails on today's code: run it with `--run-ignored only`).
//!
//! Needs root (to run the attackers as nobody and to set up directories
//! owned by others); each test prints SKIPPED and returns otherwise.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use sysgenid_proto::LifecycleState;
use sysgenid_tests::*;

const NOBODY: u32 = 65534;

fn as_nobody(mut cmd: Command) -> Command {
    cmd.uid(NOBODY).gid(NOBODY);
    cmd
}

/// Runs `cmd` to its end; panics with its output if it failed.
fn run_ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("run the attacker");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "attacker failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// `tests/attack/klogflood.c`, compiled once per test process.
fn klogflood() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = bin("sysgenidd").parent().expect("target dir").to_path_buf();
        let out = dir.join("sysgenid-test-klogflood");
        let tmp = dir.join(format!("sysgenid-test-klogflood.{}", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/attack/klogflood.c");
        let status = Command::new("gcc")
            .args(["-O2", "-Wall", "-Werror", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("gcc is needed to build the kernel log flooder");
        assert!(status.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).expect("install the kernel log flooder");
        out
    })
}

/// Whether nobody may create a user namespace here (Debian's default).
fn nobody_has_user_namespaces() -> bool {
    let mut cmd = Command::new("unshare");
    cmd.args(["-U", "true"]);
    as_nobody(cmd)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Finding 1 (high). `/dev/kmsg` reports lost records (`EPIPE`) when the
/// kernel's ring buffer overran the reader, and the `vmfork` source then
/// bumps "conservatively" (a fork record may have been lost). Anyone who
/// can make the kernel log fast enough can cause that: an unprivileged
/// user in a user namespace of its own gets unrated facility-0 records
/// from every failed mount. Measured on Linux 6.18 (128 KiB ring, 2 cores):
/// 4 flooding processes for 5 s made 16 bumps, aborted nothing only
/// because no freeze was in progress, and thawed a frozen system by itself
/// (a restore while frozen thaws once everyone acknowledged). With the
/// daemon at `SCHED_FIFO` priority 10 the same flood made 0 bumps. Whether
/// it reproduces depends on the kernel's console: these records are
/// `KERN_ERR`, printed to a serial console at the usual console level, and
/// once that console throttled the writers (~110 records/s) the same flood
/// made 0 bumps; level-6 records (overlayfs' "useless option" notes, not
/// printed to the console) came at ~24 000/s but, ~90 bytes each, never
/// overran the 128 KiB ring.
#[test]
#[ignore = "finding 1 of the review, not fixed here: the conservative bump on EPIPE lives in sysgenid-sources' kmsg.rs (see the review's write-up)"]
fn a_kernel_log_flood_by_nobody_neither_bumps_nor_thaws() {
    if skip_unless_root("(runs the flood as uid 65534)") {
        return;
    }
    if !nobody_has_user_namespaces() {
        eprintln!("SKIPPED: unprivileged user namespaces are off here");
        return;
    }
    if std::fs::File::open("/dev/kmsg").is_err() {
        eprintln!("SKIPPED: no readable /dev/kmsg");
        return;
    }
    let flooder = klogflood();
    let dir = runtime_dir();
    let daemon = Daemon::start_with(dir.path(), &["--source", "vmfork"]);
    let before = daemon.status();
    // Root freezes (no participants: frozen at once).
    daemon
        .control()
        .freeze(Some(Duration::from_secs(5)))
        .expect("root may freeze");
    assert_eq!(daemon.status().state, LifecycleState::Frozen);

    let mut flood = Command::new(flooder);
    flood.args(["4", "5"]);
    let calls = run_ok(as_nobody(flood));
    eprintln!("mount calls per flooding process: {}", calls.trim());

    let after = daemon.status();
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    let lost = log.matches("records were lost").count();
    assert_eq!(
        (after.generation, after.state),
        (before.generation, LifecycleState::Frozen),
        "nobody's kernel log flood bumped the generation {} time(s) ({lost} lost-record signals) and left the system {:?}",
        after.generation.wrapping_sub(before.generation),
        after.state
    );
}

/// Finding 2 (medium). The hooks directory was checked for its own owner
/// and mode, never for its parents: a user who can write a parent (here:
/// owns it) renames the directory away and puts a symlink to any directory
/// of root's in its place. Every executable in that directory then ran as
/// root, as a hook (`/usr/sbin/... change`). Now the scan refuses a hooks
/// directory that became a symlink or whose parents others could write,
/// and nothing runs.
#[test]
fn a_hooks_directory_swapped_by_the_owner_of_its_parent_runs_nothing() {
    if skip_unless_root("(chowns a parent to uid 65534)") {
        return;
    }
    let base = runtime_dir();
    let b = std::fs::canonicalize(base.path()).unwrap();
    let parent = b.join("parent");
    let hooks = parent.join("hooks.d");
    let decoy = b.join("roots-programs");
    let out = b.join("out");
    for d in [&parent, &hooks, &decoy, &out] {
        std::fs::create_dir(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = |path: &Path, marker: &str| {
        std::fs::write(
            path,
            format!("#!/bin/sh\necho \"$1\" >> {}\n", out.join(marker).display()),
        )
        .unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    // Root's own hook, and a root-owned program that is no hook.
    script(&hooks.join("10-installed"), "installed");
    script(&decoy.join("not-a-hook"), "not-a-hook");

    let dir = runtime_dir();
    let hooks_arg = hooks.display().to_string();
    let daemon = Daemon::start_with(
        dir.path(),
        &["--hooks-dir", &hooks_arg, "--hook-timeout-ms", "5000"],
    );

    // While every parent is root's, the installed hook runs.
    daemon.control().bump(0).expect("root bumps");
    assert!(
        wait_until(Duration::from_secs(10), || out.join("installed").exists()),
        "the installed hook never ran"
    );
    // The parent is handed to nobody (a service user's directory, say).
    std::os::unix::fs::chown(&parent, Some(NOBODY), Some(NOBODY)).unwrap();

    // Nobody swaps the directory for a link to root's programs.
    let mut swap = Command::new("sh");
    swap.arg("-c")
        .arg("mv \"$1/hooks.d\" \"$1/old\" && ln -s \"$2\" \"$1/hooks.d\"")
        .arg("sh")
        .arg(&parent)
        .arg(&decoy);
    run_ok(as_nobody(swap));

    let runs_before = daemon.status().hooks.expect("hooks status").runs;
    daemon.control().bump(0).expect("root bumps");
    // The change's hooks job has finished once status counts it: a run or
    // a problem reported.
    let finished = wait_until(Duration::from_secs(10), || {
        let h = daemon.status().hooks.expect("hooks status");
        h.runs > runs_before
            || h.last_problem
                .as_deref()
                .is_some_and(|p| p.contains("no hook runs"))
    });
    assert!(finished, "the hooks job of the second bump never finished");
    assert!(
        !out.join("not-a-hook").exists(),
        "a program root never installed as a hook ran as root: {}",
        std::fs::read_to_string(out.join("not-a-hook")).unwrap_or_default()
    );
    let problem = daemon.status().hooks.unwrap().last_problem.unwrap();
    assert!(problem.contains("replaced by a link"), "{problem}");
}

/// Finding 3 (low; needs privileged orchestrators). The socket kept one
/// slot for "the connection whose freeze is in progress" and answered
/// whoever held it when a freeze's outcome was announced. When a freeze
/// completed, a thaw ended it and another freeze started, all in one loop
/// turn, the new freeze's orchestrator took the slot before the first
/// freeze's outcome was announced: it was told `Done` (frozen) while its
/// own freeze still waited for a participant (it would snapshot programs
/// that never quiesced), and the first orchestrator was never answered.
/// Replayed deterministically by one root connection that is a participant
/// and pipelines `Confirm`, `Thaw`, `Freeze` (read in one turn). Outcomes
/// now go to the orchestrator of that very freeze.
#[test]
fn a_freeze_outcome_goes_to_the_orchestrator_of_that_freeze() {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketType};
    use std::sync::mpsc;
    use sysgenid_proto::{Reply, Request, Role};

    let dir = runtime_dir();
    let daemon = Daemon::start(dir.path());
    let sock = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None).unwrap();
    let addr = SocketAddrUnix::new(dir.path().join("sysgenid.sock")).unwrap();
    rustix::net::connect(&sock, &addr).unwrap();
    let send = |r: Request| {
        rustix::net::send(&sock, &r.encode(), SendFlags::empty()).unwrap();
    };
    let recv = |timeout: Duration| -> Option<Reply> {
        let mut fds = [rustix::event::PollFd::new(
            &sock,
            rustix::event::PollFlags::IN,
        )];
        let ts = rustix::time::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: 0,
        };
        if rustix::event::poll(&mut fds, Some(&ts)).unwrap() == 0 {
            return None;
        }
        let mut buf = [0u8; 4096];
        let (n, _) = rustix::net::recv(&sock, &mut buf, RecvFlags::empty()).unwrap();
        Some(Reply::decode(&buf[..n]).expect("a valid frame"))
    };
    send(Request::Hello {
        version: 2,
        role: Role::Watcher {
            untracked: false,
            acked: None,
            lifecycle: true,
        },
    });
    assert!(matches!(
        recv(Duration::from_secs(5)),
        Some(Reply::Welcome { .. })
    ));

    // Orchestrator A freezes; the participant is told.
    let (tx, a) = mpsc::channel();
    let mut control = daemon.control();
    std::thread::spawn(move || {
        let _ = tx.send(control.freeze(Some(Duration::from_secs(20))));
    });
    let freeze = loop {
        match recv(Duration::from_secs(5)) {
            Some(Reply::Freeze { freeze, .. }) => break freeze,
            Some(Reply::Changed { .. }) => continue,
            other => panic!("expected the freeze event, got {other:?}"),
        }
    };
    // One turn: confirm freeze 1 (A's freeze completes), thaw, freeze again.
    send(Request::Confirm { freeze });
    send(Request::Thaw);
    send(Request::Freeze { timeout_ms: 2000 });
    let mut replies = Vec::new();
    while replies.len() < 3 {
        match recv(Duration::from_secs(10)) {
            Some(Reply::Freeze { .. } | Reply::Thaw { .. } | Reply::Changed { .. }) => {}
            Some(reply) => replies.push(reply),
            None => break,
        }
    }
    let a_result = a.recv_timeout(Duration::from_secs(10));
    assert!(
        matches!(a_result, Ok(Ok(_))),
        "orchestrator A's freeze completed (its participant confirmed), but A was told {a_result:?}"
    );
    // Freeze 2 waits for this participant, which is busy with it and never
    // confirms: aborted at its 2 s timeout, never `Done`.
    assert!(
        matches!(replies.as_slice(), [Reply::Done { .. }, Reply::Done { .. }, Reply::Error(e)]
            if e.code == sysgenid_proto::ErrorCode::FreezeAborted),
        "replies to Confirm, Thaw, Freeze: {replies:?}"
    );
}
