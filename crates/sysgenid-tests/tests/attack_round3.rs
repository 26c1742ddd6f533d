//! Hardening, round 3 (issue 21), replayed by unprivileged processes (uid
//! 65534, the `sysgenid-attack-loop` helper) against a real daemon:
//!
//! 1. a connect/close flood used to keep the loop inside `accept` (no
//!    replies, bumps, freezes or watchdog pings for as long as it lasted);
//! 2. any uid could hold the lifecycle: a participant that never confirms
//!    failed every freeze, a watcher that never acknowledges kept a
//!    restored system frozen until `--max-frozen-ms`;
//! 3. a `FUTEX_WAKE` flood on the page's barrier word kept a waiter
//!    spinning;
//! 4. refusals were logged one line each, without a limit.
//!
//! Each of these tests failed against the daemon and client before the
//! fix (see docs/reliability.md for the figures). The bounds are generous
//! liveness and resource bounds, not performance claims. Needs root (to run
//! the attackers as nobody); each test prints SKIPPED and returns otherwise.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sysgenid_proto::LifecycleState;
use sysgenid_tests::*;

const NOBODY: u32 = 65534;

/// The attack helper, as nobody, once it printed `ready`.
struct Attacker {
    child: Child,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Attacker {
    fn start(target: &Path, args: &[&str]) -> Attacker {
        let mut child = Command::new(bin("sysgenid-attack-loop"))
            .arg(args[0])
            .arg(target)
            .args(&args[1..])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sysgenid-attack-loop");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "the attacker did not get ready");
        Attacker { child, stdout }
    }

    /// The next line it prints.
    fn next_line(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        line.trim().to_string()
    }

    /// Closes its stdin (it then stops and exits) and returns the rest of
    /// what it printed.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.stdout, &mut rest);
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the attacker failed: {status:?}");
        rest
    }
}

/// The number after `key ` in what an attacker printed at its end.
fn count(rest: &str, key: &str) -> u64 {
    rest.lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no `{key}` in {rest:?}"))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs the daemon at `SCHED_FIFO` priority 1, as `sysgenidd.service` does
/// (it also keeps the machine's other load out of the measurements).
fn realtime(pid: u32) {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: sched_setscheduler reads one live sched_param; the pid is our
    // own child's.
    let rc = unsafe { libc::sched_setscheduler(pid as i32, libc::SCHED_FIFO, &param) };
    assert_eq!(
        rc,
        0,
        "sched_setscheduler: {}",
        std::io::Error::last_os_error()
    );
}

/// Runs the calling thread at `SCHED_FIFO` priority 1 (not inherited by
/// the programs it starts), so that the round trips it measures are the
/// daemon's and not the wait for a CPU among the attackers' threads.
fn realtime_probe() {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: as in `realtime`; pid 0 is the calling thread.
    let rc = unsafe {
        libc::sched_setscheduler(0, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    assert_eq!(
        rc,
        0,
        "sched_setscheduler: {}",
        std::io::Error::last_os_error()
    );
}

/// A daemon that reports to a notify socket of ours with a 200 ms watchdog
/// (it pings every 100 ms), and the times of its pings.
struct Watched {
    daemon: Daemon,
    pings: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Watched {
    fn start(extra: &[&str]) -> Watched {
        let dir = runtime_dir();
        let notify_path = dir.path().with_extension("notify");
        let _ = std::fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        // Inherited by the daemon (each test is a process of its own
        // under nextest); taken away again at once.
        // SAFETY: no other thread of this test reads the environment now.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &notify_path);
            std::env::set_var("WATCHDOG_USEC", "200000");
        }
        let daemon = Daemon::start_with(dir.path(), extra);
        // SAFETY: as above.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
        }
        let pings = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (pings, stop) = (pings.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = notify.recv(&mut buf) {
                        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
                            pings.lock().unwrap().push(Instant::now());
                        }
                    }
                }
                let _ = std::fs::remove_file(notify_path);
            });
        }
        Watched {
            daemon,
            pings,
            stop,
            _dir: dir,
        }
    }

    /// The longest gap between pings from `from` to `to`.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let pings = self.pings.lock().unwrap();
        let mut last = from;
        let mut longest = Duration::ZERO;
        for &p in pings.iter().filter(|&&p| p >= from && p <= to) {
            longest = longest.max(p - last);
            last = p;
        }
        longest.max(to.saturating_duration_since(last))
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Status round trips (on a connection opened before the flood) at the
/// 99th percentile, allowed during the flood. This is a liveness bound,
/// not the speed goal: the old loop gave no answer at all for
/// 10 s and more; the measured p99 (25–31 ms against the goal of 50 ms,
/// unloaded ~0.2 ms) is printed and recorded in `docs/reliability.md`,
/// and a loaded CI machine must not turn a scheduling delay into a failure.
const ROUND_TRIP_BOUND: Duration = Duration::from_millis(500);
/// The longest the watchdog may go without a ping (it pings every 100 ms;
/// systemd would act after `WatchdogSec=`).
const WATCHDOG_GAP_BOUND: Duration = Duration::from_secs(1);

/// Item 1. Four processes of nobody `connect()` and `close()` in a loop.
/// The loop used to stay in `accept` until the backlog emptied, which it
/// never did once the connections whose close it had not yet seen reached
/// the per-user limit: from then on every refusal cost a formatted WARN
/// line, slower than a connect. Root's status, bump and freeze failed
/// after 10 s ("no Hello"), and the watchdog went 13 s without a ping.
/// The daemon runs at normal priority here: on this shared 2-core machine
/// a `SCHED_FIFO` daemon outpaces these attackers (the were
/// faster), and a daemon started outside its unit has no such priority.
/// The probe runs at `SCHED_FIFO`, so what it measures is the daemon.
#[test]
fn a_connect_close_flood_does_not_stall_the_loop() {
    if skip_unless_root("to run the attackers as nobody") {
        return;
    }
    let w = Watched::start(&[]);
    let d = &w.daemon;
    let socket = d.dir.join("sysgenid.sock");
    let mut control = d.control();
    let g0 = d.generation();
    let attackers: Vec<Attacker> = (0..4)
        .map(|_| Attacker::start(&socket, &["connflood", "1"]))
        .collect();
    let from = Instant::now();
    // The probe, in a thread: a stalled loop fails the test instead of
    // hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = d.dir.clone();
    std::thread::spawn(move || {
        realtime_probe();
        let mut trips = Vec::new();
        let mut fresh = Vec::new();
        for round in 0..4 {
            for _ in 0..50 {
                let start = Instant::now();
                control.status().expect("status during the flood");
                trips.push(start.elapsed());
                std::thread::sleep(Duration::from_millis(10));
            }
            // New connections, through the flooded backlog.
            let start = Instant::now();
            let bump = ctl(&dir, &["bump"]);
            fresh.push(start.elapsed());
            assert!(bump.status.success(), "bump {round}: {}", stderr(&bump));
            let start = Instant::now();
            let freeze = ctl(&dir, &["freeze", "--timeout-ms", "5000"]);
            fresh.push(start.elapsed());
            assert!(
                freeze.status.success(),
                "freeze {round}: {}",
                stderr(&freeze)
            );
            let thaw = ctl(&dir, &["thaw"]);
            assert!(thaw.status.success(), "thaw {round}: {}", stderr(&thaw));
        }
        let _ = tx.send((trips, fresh));
    });
    let (mut trips, mut fresh) = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(results) => results,
        Err(e) => panic!(
            "the probe did not finish under the flood ({e}): the loop stalled; log tail:\n{}",
            tail(&d.log())
        ),
    };
    let bumps = 4;
    let to = Instant::now();
    let connects: u64 = attackers
        .into_iter()
        .map(|a| count(&a.finish(), "connects "))
        .sum();
    trips.sort();
    fresh.sort();
    let p99 = trips[trips.len() * 99 / 100];
    let gap = w.longest_gap(from, to);
    eprintln!(
        "under a flood of {connects} connects in {:?}: status round trip median {:?}, p99 {p99:?}, max {:?}; \
         sysgenidctl bump/freeze median {:?}, max {:?}; longest watchdog gap {gap:?}",
        to - from,
        trips[trips.len() / 2],
        trips[trips.len() - 1],
        fresh[fresh.len() / 2],
        fresh[fresh.len() - 1],
    );
    assert!(
        connects > 10_000,
        "the flood was not real: {connects} connects"
    );
    assert!(
        p99 < ROUND_TRIP_BOUND,
        "99th percentile status round trip {p99:?} (bound {ROUND_TRIP_BOUND:?})"
    );
    assert!(
        gap < WATCHDOG_GAP_BOUND,
        "the watchdog went {gap:?} without a ping"
    );
    assert_eq!(d.generation(), g0 + bumps, "every bump was made");
}

/// Item 2, freeze. A participant of nobody's that never confirms used to
/// fail every freeze (exit 3 after the timeout). It is still told about
/// the freeze and the thaw, and status counts it as untrusted.
#[test]
fn an_untrusted_participant_cannot_fail_a_freeze_nor_keep_a_restore_frozen() {
    if skip_unless_root("to run the holder as nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut holder = Attacker::start(&dir.path().join("sysgenid.sock"), &["holder"]);
    let t = d.status().trust.expect("status reports trust");
    assert_eq!(
        (t.participants_untrusted, t.tracked_untrusted),
        (1, 1),
        "{t:?}"
    );
    let text = stdout(&d.ctl(&["status"]));
    assert!(
        text.contains("0 trusted, 1 untrusted"),
        "status text: {text}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&d.ctl(&["status", "--json"]))).unwrap();
    assert_eq!(json["trust"]["participants_untrusted"], 1, "{json}");

    let freeze = d.ctl(&["freeze", "--timeout-ms", "5000"]);
    assert!(
        freeze.status.success(),
        "a freeze waited for nobody's participant: {}",
        stderr(&freeze)
    );
    assert_eq!(holder.next_line(), "freeze 1", "the holder was told");
    assert_eq!(d.status().state, LifecycleState::Frozen);

    // A restore while frozen: the thaw waits for trusted tracked watchers
    // only (there are none), not for nobody's, which never acknowledges.
    let bump = d.ctl(&["bump"]);
    assert!(bump.status.success(), "{}", stderr(&bump));
    assert!(
        wait_until(Duration::from_secs(10), || d.status().state
            == LifecycleState::Running),
        "still frozen after the restore: {:?}",
        d.status()
    );
    let mut told = vec![holder.next_line(), holder.next_line()];
    told.sort();
    assert_eq!(told, ["changed 1", "thaw 1"], "the holder was told");
    // The seed's barrier still counts nobody's tracked watcher.
    let s = d.status();
    assert_eq!(s.outdated, 1, "{s:?}");
    let wait = d.ctl(&["wait-watchers", "--timeout-ms", "300"]);
    assert_eq!(
        wait.status.code(),
        Some(3),
        "wait-watchers must still wait for every tracked watcher: {}",
        stderr(&wait)
    );
    holder.finish();
}

/// The name of gid 65534 here (`nogroup` on Debian), nobody's group.
fn nobodys_group() -> Option<String> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)? == "65534").then(|| name.to_string())
        })
}

/// Item 2, the other side: a member of `--lifecycle-group` is trusted, so
/// its participant holds the freeze (which then times out, exit 3).
#[test]
fn a_lifecycle_group_member_holds_the_lifecycle() {
    if skip_unless_root("to run the holder as nobody") {
        return;
    }
    let Some(group) = nobodys_group() else {
        eprintln!("SKIPPED: no group with gid 65534 in /etc/group");
        return;
    };
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--lifecycle-group", &group]);
    let mut holder = Attacker::start(&dir.path().join("sysgenid.sock"), &["holder"]);
    let t = d.status().trust.expect("status reports trust");
    assert_eq!((t.participants_trusted, t.tracked_trusted), (1, 1), "{t:?}");
    let freeze = d.ctl(&["freeze", "--timeout-ms", "500"]);
    assert_eq!(
        freeze.status.code(),
        Some(3),
        "the group member's participant did not hold the freeze: {}",
        stderr(&freeze)
    );
    assert_eq!(holder.next_line(), "freeze 1");
    holder.finish();
}

/// CPU time (user + system) of a child that has exited, waited for here.
fn wait_with_cpu(child: Child) -> (std::process::ExitStatus, Duration) {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it and the status
    // for our own child, which `Child` has not reaped.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let rc = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(rc, child.id() as i32, "wait4");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        std::process::ExitStatus::from_raw(status),
        tv(usage.ru_utime) + tv(usage.ru_stime),
    )
}

/// The most CPU a 5 s `wait-watchers` may use under the wake flood
/// (unloaded: a few milliseconds, most of it starting the program).
const WAITER_CPU_BOUND: Duration = Duration::from_millis(100);

/// Item 3. Nobody maps the page and `FUTEX_WAKE`s its barrier word in a
/// loop while root's `wait-watchers --timeout-ms 5000` is pending. The
/// waiter went back to sleep on every wake-up: 2.33 s of CPU in 5 s.
#[test]
fn a_wake_flood_does_not_burn_a_barrier_waiters_cpu() {
    if skip_unless_root("to run the attacker as nobody") {
        return;
    }
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let _slow = d.watcher();
    let g = d.control().bump(0).unwrap();
    assert_eq!(d.status().outdated, 1);
    let flood = Attacker::start(&dir.path().join("generation"), &["wakeflood"]);
    let waiter = ctl_command(dir.path())
        .args(["wait-watchers", "--timeout-ms", "5000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (status, cpu) = wait_with_cpu(waiter);
    let wakes = count(&flood.finish(), "wakes ");
    eprintln!("wait-watchers --timeout-ms 5000 under {wakes} FUTEX_WAKEs: {cpu:?} of CPU");
    assert_eq!(status.code(), Some(3), "the wait times out");
    assert!(wakes > 10_000, "the flood was not real: {wakes} wakes");
    assert!(
        cpu < WAITER_CPU_BOUND,
        "the waiter used {cpu:?} of CPU (bound {WAITER_CPU_BOUND:?})"
    );
    assert_eq!(d.generation(), g);
}

/// Lines of one kind the log may hold per second of flood (5 a second are
/// let through, plus one "suppressed" line) and a margin for the windows
/// at both ends.
fn log_bound(secs: u64) -> usize {
    (6 * (secs + 2)) as usize
}

/// Item 4. Nobody pipelines Bump frames (each refused), sends malformed
/// frames and floods connections past its per-user limit. Each refusal
/// used to be a WARN line (224 358 lines, 62.8 MB in 5 s). The log keeps
/// the ready line, every change and every hook's output.
#[test]
fn refusal_floods_are_rate_limited_and_the_log_keeps_what_matters() {
    if skip_unless_root("to run the attackers as nobody") {
        return;
    }
    let dir = runtime_dir();
    let hooks = tempfile::tempdir().unwrap();
    std::fs::set_permissions(hooks.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let hook = hooks.path().join("10-say");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho \"HOOK-OUTPUT $1 $SYSGENID_GENERATION\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hooks_arg = hooks.path().display().to_string();
    let d = Daemon::start_with(
        dir.path(),
        &["--hooks-dir", &hooks_arg, "--max-connections-per-uid", "4"],
    );
    realtime(d.child.id());
    let socket = dir.path().join("sysgenid.sock");
    let start = Instant::now();
    let logflood = Attacker::start(&socket, &["logflood", "2"]);
    let connflood = Attacker::start(&socket, &["connflood", "2"]);
    let mut generations = Vec::new();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        generations.push(d.control().bump(0).expect("bump during the flood"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let refusals = count(&logflood.finish(), "refusals ");
    let connects = count(&connflood.finish(), "connects ");
    let secs = start.elapsed().as_secs() + 1;
    // Let the last window's "suppressed" line out.
    std::thread::sleep(Duration::from_millis(1500));
    let _ = d.status();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let log = d.log();
            generations
                .iter()
                .all(|g| log.contains(&format!("HOOK-OUTPUT change {g}")))
        }),
        "a hook's output is missing; log tail:\n{}",
        tail(&d.log())
    );
    let log = d.log();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    eprintln!(
        "{refusals} refused bumps and {connects} connects in {secs} s: the log has {} lines ({} bytes): \
         {} permission refusals, {} closed connections, {} refused connections, {} suppressed-lines reports",
        log.lines().count(),
        log.len(),
        lines("permission denied"),
        lines("closing connection"),
        lines("refusing a connection"),
        lines("suppressed"),
    );
    assert!(refusals > 1_000, "the bump flood was not real: {refusals}");
    assert!(
        log.contains(" ready: "),
        "the ready line is missing:\n{}",
        tail(&log)
    );
    for g in &generations {
        assert!(
            log.lines()
                .any(|l| l.contains("generation changed") && l.contains(&format!("generation={g}"))),
            "the change to {g} is missing from the log"
        );
    }
    for kind in [
        "permission denied",
        "closing connection",
        "refusing a connection",
    ] {
        assert!(lines(kind) > 0, "no `{kind}` line at all");
        assert!(
            lines(kind) <= log_bound(secs),
            "{} `{kind}` lines in {secs} s (bound {})",
            lines(kind),
            log_bound(secs)
        );
    }
    assert!(
        lines("more permission refusal line(s) suppressed") > 0,
        "no suppressed-lines report; log tail:\n{}",
        tail(&log)
    );
}
