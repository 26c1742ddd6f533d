//! The snapshot lifecycle against the real daemon: freeze, thaw, the
//! participants (in this process and as `sysgenidctl watch --lifecycle`
//! children), restore while frozen, the freeze bound, the hooks directory,
//! privilege, and version 1 clients. The model is `docs/lifecycle.md`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use sysgenid::{Error, Event, LifecycleState, Watcher};
use sysgenid_tests::*;

const LONG: Duration = Duration::from_secs(20);

fn participant(dir: &Path) -> Watcher {
    Watcher::builder()
        .runtime_dir(dir)
        .lifecycle(true)
        .open()
        .expect("participant")
}

/// The next event within `limit` (panics otherwise).
fn next_event(w: &mut Watcher, limit: Duration) -> Event {
    let start = Instant::now();
    loop {
        if let Some(event) = w.try_read_event().unwrap() {
            return event;
        }
        let left = limit.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "no lifecycle event within {limit:?}");
        w.wait_readable(left).unwrap();
    }
}

/// `sysgenidctl freeze ARGS` started in the background.
fn start_freeze(dir: &Path, args: &[&str]) -> Child {
    ctl_command(dir)
        .arg("freeze")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_state(d: &Daemon, state: LifecycleState, pending: Option<u32>) {
    assert!(
        wait_until(LONG, || {
            let s = d.status();
            s.state == state && pending.is_none_or(|p| s.pending == p)
        }),
        "never reached {state:?} (pending {pending:?}); status {:?}",
        d.status()
    );
}

/// `sysgenidctl watch --lifecycle --exec sh -c SCRIPT` in its own process
/// group, printing to a pipe.
fn cli_participant(dir: &Path, script: &str) -> Child {
    ctl_command(dir)
        .args(["watch", "--lifecycle", "--exec", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap()
}

fn kill_group(child: &mut Child) {
    // SAFETY: kill(2) on a process group we created has no memory-safety
    // preconditions.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
    let _ = child.wait();
}

#[test]
fn a_slow_participant_makes_freeze_wait() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let marker = dir.path().join("quiesced");
    let script = format!(
        "if [ \"$SYSGENID_EVENT\" = freeze ]; then sleep 1; touch {}; fi",
        marker.display()
    );
    let mut p = cli_participant(dir.path(), &script);
    assert!(wait_until(LONG, || d.status().participants == 1));
    let freeze = start_freeze(dir.path(), &["--timeout-ms", "20000"]);
    // The freeze is held up while the participant quiesces.
    wait_state(&d, LifecycleState::Freezing, Some(1));
    let out = freeze.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        marker.exists(),
        "freeze returned before the participant confirmed"
    );
    let s = d.status();
    assert_eq!((s.state, s.pending), (LifecycleState::Frozen, 0));
    assert!(s.frozen_ms.is_some());
    assert_eq!(s.freeze, 1);
    kill_group(&mut p);
}

#[test]
fn a_stuck_participant_makes_freeze_exit_3_and_leaves_the_system_running() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    // An --exec command that fails on freeze: the freeze is never confirmed.
    let log = dir.path().join("events");
    let script = format!(
        "echo \"$SYSGENID_EVENT $SYSGENID_GENERATION\" >> {}; [ \"$SYSGENID_EVENT\" != freeze ]",
        log.display()
    );
    let mut stuck = cli_participant(dir.path(), &script);
    let mut quick = participant(dir.path());
    assert!(wait_until(LONG, || d.status().participants == 2));
    let freeze = start_freeze(dir.path(), &["--timeout-ms", "500"]);
    let Event::Freeze { freeze: id, .. } = next_event(&mut quick, LONG) else {
        panic!("expected a freeze")
    };
    quick.confirm(id).unwrap();
    let out = freeze.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 participant"),
        "names how many did not confirm: {}",
        stderr(&out)
    );
    assert_eq!(d.status().state, LifecycleState::Running);
    assert!(matches!(
        next_event(&mut quick, LONG),
        Event::Thaw { freeze: 1, .. }
    ));
    // The stuck one was thawed too (its command ran for the thaw).
    assert!(wait_until(LONG, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("thaw 0")));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "freeze 0\nthaw 0\n");
    kill_group(&mut stuck);
    let out = stuck.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "freeze\nthaw\n");
}

#[test]
fn a_participant_killed_mid_freeze_releases_it() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut p = cli_participant(dir.path(), "sleep 1000");
    assert!(wait_until(LONG, || d.status().participants == 1));
    let freeze = start_freeze(dir.path(), &["--timeout-ms", "20000"]);
    wait_state(&d, LifecycleState::Freezing, Some(1));
    kill_group(&mut p);
    let out = freeze.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s = d.status();
    assert_eq!((s.state, s.participants), (LifecycleState::Frozen, 0));
}

#[test]
fn a_participant_that_connects_while_frozen_is_frozen() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let out = d.ctl(&["freeze"]);
    assert_eq!(out.status.code(), Some(0), "nobody to wait for");
    let mut late = participant(dir.path());
    assert!(matches!(
        next_event(&mut late, LONG),
        Event::Freeze {
            freeze: 1,
            generation: 0
        }
    ));
    // It counts as frozen already: nothing is pending, confirming is harmless.
    let s = d.status();
    assert_eq!((s.state, s.pending), (LifecycleState::Frozen, 0));
    late.confirm(1).unwrap();
    assert!(matches!(
        late.confirm(2),
        Err(Error::Refused {
            code: sysgenid::ErrorCode::WrongFreeze,
            ..
        })
    ));
    // The CLI sees it the same way.
    let out = ctl_command(dir.path())
        .args(["watch", "--lifecycle", "--count", "1"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "freeze");
    assert_eq!(d.ctl(&["freeze"]).status.code(), Some(0), "frozen already");
    assert_eq!(d.ctl(&["thaw"]).status.code(), Some(0));
    assert!(matches!(next_event(&mut late, LONG), Event::Thaw { .. }));
    assert_eq!(d.status().state, LifecycleState::Running);
    assert_eq!(
        d.ctl(&["thaw"]).status.code(),
        Some(0),
        "thaw is idempotent"
    );
    assert!(late.try_read_event().unwrap().is_none(), "no second thaw");
}

#[test]
fn restore_while_frozen_thaws_after_the_acknowledgements() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut p = participant(dir.path());
    let mut plain = d.watcher();
    let freeze = start_freeze(dir.path(), &[]);
    let Event::Freeze { freeze: id, .. } = next_event(&mut p, LONG) else {
        panic!("expected a freeze")
    };
    p.confirm(id).unwrap();
    assert!(freeze.wait_with_output().unwrap().status.success());
    // A clone restored from the frozen snapshot: a privileged bump.
    assert_eq!(stdout(&d.ctl(&["bump"])), "1");
    assert_eq!(
        next_event(&mut p, LONG),
        Event::Change { generation: 1 },
        "the participant renews first"
    );
    let s = d.status();
    assert_eq!(s.state, LifecycleState::Frozen);
    assert!(s.thaw_after_acks);
    assert_eq!(plain.read().unwrap(), 1);
    plain.ack(1).unwrap();
    assert_eq!(
        d.status().state,
        LifecycleState::Frozen,
        "still waiting for the participant's acknowledgement"
    );
    p.ack(1).unwrap();
    assert!(matches!(
        next_event(&mut p, LONG),
        Event::Thaw {
            freeze: 1,
            generation: 1
        }
    ));
    wait_state(&d, LifecycleState::Running, None);
}

#[test]
fn restore_while_frozen_can_leave_thawing_to_the_orchestrator() {
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--restore-thaw", "manual"]);
    let mut p = participant(dir.path());
    let freeze = start_freeze(dir.path(), &[]);
    let Event::Freeze { freeze: id, .. } = next_event(&mut p, LONG) else {
        panic!("expected a freeze")
    };
    p.confirm(id).unwrap();
    assert!(freeze.wait_with_output().unwrap().status.success());
    d.ctl(&["bump"]);
    assert_eq!(next_event(&mut p, LONG), Event::Change { generation: 1 });
    p.ack(1).unwrap();
    assert_eq!(d.ctl(&["wait-watchers"]).status.code(), Some(0));
    let s = d.status();
    assert_eq!(
        (s.state, s.thaw_after_acks),
        (LifecycleState::Frozen, false)
    );
    assert!(p.try_read_event().unwrap().is_none());
    d.ctl(&["thaw"]);
    assert!(matches!(next_event(&mut p, LONG), Event::Thaw { .. }));
}

#[test]
fn the_freeze_bound_thaws_by_itself() {
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--max-frozen-ms", "300"]);
    let mut p = participant(dir.path());
    let freeze = start_freeze(dir.path(), &[]);
    let Event::Freeze { freeze: id, .. } = next_event(&mut p, LONG) else {
        panic!("expected a freeze")
    };
    p.confirm(id).unwrap();
    assert!(freeze.wait_with_output().unwrap().status.success());
    // Nobody thaws: the daemon does, at the bound.
    assert!(matches!(next_event(&mut p, LONG), Event::Thaw { .. }));
    assert_eq!(d.status().state, LifecycleState::Running);
    assert!(d.log().contains("thawed by itself"), "{}", d.log());
}

#[test]
fn a_thaw_aborts_a_freeze_in_progress_and_a_second_freeze_is_refused() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut p = participant(dir.path());
    let freeze = start_freeze(dir.path(), &["--timeout-ms", "20000"]);
    assert!(matches!(next_event(&mut p, LONG), Event::Freeze { .. }));
    let second = d.ctl(&["freeze", "--timeout-ms", "100"]);
    assert_eq!(second.status.code(), Some(1), "{}", stderr(&second));
    assert!(stderr(&second).contains("already in progress"));
    assert_eq!(d.ctl(&["thaw"]).status.code(), Some(0));
    let out = freeze.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3), "aborted: {}", stderr(&out));
    assert!(matches!(next_event(&mut p, LONG), Event::Thaw { .. }));
}

#[test]
fn watch_lifecycle_prints_every_event_and_runs_the_command_with_its_environment() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let log = dir.path().join("events");
    let script = format!(
        "echo \"$SYSGENID_EVENT $SYSGENID_GENERATION\" >> {}",
        log.display()
    );
    let child = ctl_command(dir.path())
        .args(["watch", "--lifecycle", "--count", "3", "--exec", "sh", "-c"])
        .arg(&script)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(LONG, || d.status().participants == 1));
    assert_eq!(d.ctl(&["freeze"]).status.code(), Some(0), "confirmed");
    assert_eq!(d.ctl(&["thaw"]).status.code(), Some(0));
    d.ctl(&["bump"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "freeze\nthaw\n1");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "freeze 0\nthaw 0\nchange 1\n"
    );
    assert_eq!(
        d.ctl(&["wait-watchers", "--timeout-ms", "5000"])
            .status
            .code(),
        Some(0),
        "the change was acknowledged"
    );
}

fn write_hook(dir: &Path, name: &str, body: &str, mode: u32) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn hooks_run_in_order_with_timeouts_and_unsafe_ones_are_refused() {
    let dir = runtime_dir();
    let hooks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(hooks.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.path().join("hooks.log");
    let l = log.display();
    write_hook(
        hooks.path(),
        "10-first",
        &format!("echo \"first $1 $SYSGENID_GENERATION ${{#SYSGENID_EPOCH}}\" >> {l}"),
        0o755,
    );
    write_hook(hooks.path(), "20-hangs", "sleep 30", 0o755);
    write_hook(
        hooks.path(),
        "30-last",
        &format!("echo \"last $1\" >> {l}"),
        0o755,
    );
    write_hook(
        hooks.path(),
        "40-world-writable",
        &format!("echo evil >> {l}"),
        0o757,
    );
    let outside = tempfile::tempdir().unwrap();
    write_hook(outside.path(), "evil", &format!("echo evil >> {l}"), 0o755);
    std::os::unix::fs::symlink(
        outside.path().join("evil"),
        hooks.path().join("50-link-out"),
    )
    .unwrap();
    let hooks_dir = hooks.path().to_str().unwrap();
    let d = Daemon::start_with(
        dir.path(),
        &["--hooks-dir", hooks_dir, "--hook-timeout-ms", "300"],
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // A freeze completes only after every hook exited (the hanging one is
    // killed at its timeout, the last one still runs).
    let out = d.ctl(&["freeze", "--timeout-ms", "20000"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(read_log(), "first freeze 0 32\nlast freeze\n");
    d.ctl(&["thaw"]);
    assert!(wait_until(LONG, || read_log().contains("last thaw")));

    // A change counts the hooks as tracked watchers; the one killed at
    // its timeout failed to renew, so it holds the change unacknowledged
    // and wait-watchers, timing out, names it.
    d.ctl(&["bump"]);
    let out = d.ctl(&["wait-watchers", "--timeout-ms", "5000"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("20-hangs (timed out and killed)"),
        "{}",
        stderr(&out)
    );
    assert!(
        read_log().ends_with("first change 1 32\nlast change\n"),
        "the other hooks ran: {}",
        read_log()
    );
    assert_eq!(
        d.status().outdated,
        1,
        "only the failed hook holds the change"
    );
    assert!(!read_log().contains("evil"), "unsafe hooks never run");
    let status = d.status();
    let h = status.hooks.expect("hooks in status");
    assert_eq!(h.hooks, 3);
    assert_eq!(h.timeouts, 3, "the hanging hook, once per event");
    assert_eq!(h.refused, 6, "two files, three events");
    assert_eq!(h.runs, 9);
    let log = d.log();
    assert!(log.contains("hook refused"), "{log}");
    assert!(log.contains("a symlink out of the directory"), "{log}");
    assert!(log.contains("writable by everyone"), "{log}");
    assert!(log.contains("killed"), "{log}");
}

#[test]
fn a_missing_hooks_directory_named_explicitly_stops_the_daemon() {
    let dir = runtime_dir();
    let out = daemon_command(dir.path())
        .args(["--device", "off", "--hooks-dir", "/nonexistent/hooks.d"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--hooks-dir off"), "{}", stderr(&out));
}

#[test]
fn unprivileged_freeze_and_thaw_are_refused() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    if skip_unless_root("to run a client as nobody") {
        return;
    }
    for command in ["freeze", "thaw"] {
        let out = ctl_command(dir.path())
            .arg(command)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(4), "{command}: {}", stderr(&out));
        assert!(stderr(&out).contains("CAP_SYS_ADMIN"), "{}", stderr(&out));
    }
    assert_eq!(d.status().state, LifecycleState::Running);
    // Frozen by root: nobody still cannot thaw.
    assert_eq!(d.ctl(&["freeze"]).status.code(), Some(0));
    let out = ctl_command(dir.path())
        .arg("thaw")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(d.status().state, LifecycleState::Frozen);
    // But may take part.
    let out = ctl_command(dir.path())
        .args(["watch", "--lifecycle", "--count", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "freeze", "{}", stderr(&out));
}

/// A version 1 client, speaking raw frames: it is served as before and
/// never sees a lifecycle frame; lifecycle requests do not exist for it.
#[test]
fn version_1_clients_keep_working_and_see_no_lifecycle() {
    use std::os::unix::net::UnixDatagram;
    use sysgenid_proto::{ErrorCode, Reply, Request, Role, MAX_FRAME};
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let connect =
        || seqpacket_connect(&dir.path().join("sysgenid.sock"), Duration::from_secs(5)).unwrap();
    let recv = |sock: &UnixDatagram| {
        let mut buf = [0u8; MAX_FRAME];
        let n = sock.recv(&mut buf).unwrap();
        Reply::decode(&buf[..n]).unwrap()
    };
    let old = connect();
    let hello = Request::Hello {
        version: 1,
        role: Role::Watcher {
            untracked: false,
            acked: None,
            lifecycle: false,
        },
    };
    old.send(&hello.encode()).unwrap();
    assert_eq!(
        recv(&old),
        Reply::Welcome {
            version: 1,
            generation: 0
        }
    );
    assert_eq!(d.ctl(&["freeze"]).status.code(), Some(0));
    assert_eq!(d.ctl(&["thaw"]).status.code(), Some(0));
    d.ctl(&["bump"]);
    assert_eq!(
        recv(&old),
        Reply::Changed { generation: 1 },
        "no Freeze or Thaw frame before the change"
    );
    old.send(&Request::Status.encode()).unwrap();
    assert!(matches!(recv(&old), Reply::Status(s) if s.generation == 1));
    // A version 1 Hello cannot carry the lifecycle flag...
    let bad = connect();
    bad.send(&[0x01, 1, 0, 1, 0b100, 0, 0, 0, 0]).unwrap();
    assert!(matches!(recv(&bad), Reply::Error(e) if e.code == ErrorCode::ProtocolViolation));
    // ...nor send lifecycle requests.
    let control = connect();
    control
        .send(
            &Request::Hello {
                version: 1,
                role: Role::Control,
            }
            .encode(),
        )
        .unwrap();
    assert!(matches!(recv(&control), Reply::Welcome { version: 1, .. }));
    control.send(&Request::Thaw.encode()).unwrap();
    assert!(matches!(recv(&control), Reply::Error(e) if e.code == ErrorCode::ProtocolViolation));
    assert_eq!(d.status().state, LifecycleState::Running);
}

#[test]
fn the_async_participant_reads_events_and_confirms() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut p = Watcher::builder()
            .runtime_dir(dir.path())
            .lifecycle(true)
            .open_async()
            .await
            .unwrap();
        let freeze = start_freeze(dir.path(), &[]);
        let event = tokio::time::timeout(LONG, p.read_event())
            .await
            .unwrap()
            .unwrap();
        let Event::Freeze { freeze: id, .. } = event else {
            panic!("expected a freeze, got {event:?}")
        };
        p.confirm(id).await.unwrap();
        assert!(freeze.wait_with_output().unwrap().status.success());
        d.ctl(&["thaw"]);
        let event = tokio::time::timeout(LONG, p.read_event())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(event, Event::Thaw { .. }));
        d.ctl(&["bump"]);
        let event = tokio::time::timeout(LONG, p.read_event())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event, Event::Change { generation: 1 });
        p.ack(1).await.unwrap();
    });
}

#[test]
fn a_frozen_participant_is_thawed_when_the_daemon_restarts() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let mut p = participant(dir.path());
    let freeze = start_freeze(dir.path(), &[]);
    let Event::Freeze { freeze: id, .. } = next_event(&mut p, LONG) else {
        panic!("expected a freeze")
    };
    p.confirm(id).unwrap();
    assert!(freeze.wait_with_output().unwrap().status.success());
    // The lifecycle is not saved: a restarted daemon is running.
    d.stop();
    d.restart();
    assert_eq!(d.status().state, LifecycleState::Running);
    assert!(matches!(
        next_event(&mut p, LONG),
        Event::Thaw { freeze: 1, .. }
    ));
    p.confirm(id).unwrap();
    assert!(wait_until(LONG, || d.status().participants == 1));
}

#[test]
fn an_orchestrator_that_goes_away_mid_freeze_aborts_it() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut p = participant(dir.path());
    let mut freeze = start_freeze(dir.path(), &["--timeout-ms", "20000"]);
    assert!(matches!(next_event(&mut p, LONG), Event::Freeze { .. }));
    freeze.kill().unwrap();
    freeze.wait().unwrap();
    assert!(matches!(next_event(&mut p, LONG), Event::Thaw { .. }));
    assert_eq!(d.status().state, LifecycleState::Running);
}

#[test]
fn status_json_names_the_state() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let json = |d: &Daemon| -> serde_json::Value {
        serde_json::from_str(&stdout(&d.ctl(&["status", "--json"]))).unwrap()
    };
    let s = json(&d);
    assert_eq!(s["state"], "running");
    assert_eq!(s["pending"], 0);
    assert!(s["frozen_ms"].is_null());
    d.ctl(&["freeze"]);
    let s = json(&d);
    assert_eq!(s["state"], "frozen");
    assert!(s["frozen_ms"].is_u64());
    let text = stdout(&d.ctl(&["status"]));
    assert!(text.contains("state:        frozen for"), "{text}");
}

#[test]
fn a_failing_exec_leaves_the_event_unanswered_and_runs_once_per_event() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let log = dir.path().join("events");
    let script = format!(
        "echo \"$SYSGENID_EVENT $SYSGENID_GENERATION\" >> {}; exit 1",
        log.display()
    );
    let mut p = cli_participant(dir.path(), &script);
    assert!(wait_until(LONG, || d.status().participants == 1));
    d.ctl(&["bump"]);
    assert!(wait_until(LONG, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("change 1")));
    let out = d.ctl(&["wait-watchers", "--timeout-ms", "300"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "the change was not acknowledged"
    );
    let out = d.ctl(&["freeze", "--timeout-ms", "300"]);
    assert_eq!(out.status.code(), Some(3), "the freeze was not confirmed");
    assert!(wait_until(LONG, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("thaw 1")));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "change 1\nfreeze 1\nthaw 1\n",
        "CMD ran once per event (a failed change is not retried in a loop)"
    );
    kill_group(&mut p);
}

#[test]
fn confirming_on_a_plain_watcher_is_refused_locally_and_keeps_the_connection() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut plain = d.watcher();
    match plain.confirm(1) {
        Err(Error::Refused { code, .. }) => assert_eq!(code, sysgenid::ErrorCode::NotAParticipant),
        other => panic!("expected NotAParticipant, got {other:?}"),
    }
    // Nothing was sent: the daemon did not hang up on a protocol violation,
    // so the same connection still acknowledges the next generation.
    let generation = d.control().bump(0).unwrap();
    assert_eq!(plain.read().unwrap(), generation);
    plain.ack(generation).unwrap();
    assert_eq!(d.status().outdated, 0);
}
