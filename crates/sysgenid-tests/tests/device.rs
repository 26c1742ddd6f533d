//! `/dev/sysgenid` through FUSE: the seed's four example workflows and its
//! ABI, exercised by a C client (`tests/device/sgdev.c`, compiled with
//! `gcc`) as real processes against a daemon serving the device on a
//! temporary path.
//!
//! Needs root (mounting) and `/dev/fuse`; without `/dev/fuse` every test
//! prints a SKIPPED line and passes, as the daemon itself then runs without
//! the device.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sysgenid_tests::*;

/// Why the tests cannot run here, if they cannot.
fn unsupported() -> Option<&'static str> {
    if !Path::new("/dev/fuse").exists() {
        return Some("/dev/fuse is missing");
    }
    if !rustix::process::geteuid().is_root() {
        return Some("mounting the device needs root");
    }
    None
}

macro_rules! require_fuse {
    () => {
        if let Some(why) = unsupported() {
            eprintln!("SKIPPED: {why}; the device tests did not run");
            return;
        }
    };
}

/// The compiled test client, built once per test binary.
fn sgdev() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Next to the built binaries. Each test process compiles its own
        // copy and renames it into place: a rename never disturbs another
        // process that is running the previous copy.
        let dir = sysgenid_tests::bin("sysgenidd")
            .parent()
            .expect("target dir")
            .to_path_buf();
        let out = dir.join("sysgenid-test-sgdev");
        let tmp = dir.join(format!("sysgenid-test-sgdev.{}", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/device/sgdev.c");
        let status = Command::new("gcc")
            .args(["-O2", "-Wall", "-Werror", "-pthread", "-o"])
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("gcc is needed to build the device test client");
        assert!(status.success(), "compiling {}", src.display());
        std::fs::rename(&tmp, &out).expect("install the device test client");
        out
    })
}

/// A daemon serving the device at `<tmp>/sysgenid`. Fields drop in order:
/// the daemon stops (and unmounts) before its directory is removed.
struct Setup {
    daemon: Daemon,
    dev: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Drop for Setup {
    /// Stops the daemon (SIGTERM, then SIGKILL after 5 s); one that had to
    /// be SIGKILLed leaves its mount: detach it, so no stale FUSE mount
    /// outlives the test.
    fn drop(&mut self) {
        self.daemon.stop();
        if let Ok(path) = std::ffi::CString::new(self.dev.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads a NUL-terminated path we own; failure
            // (nothing mounted there) is ignored.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

fn setup() -> Setup {
    let tmp = runtime_dir();
    let dev = tmp.path().join("sysgenid");
    let daemon = Daemon::start_with(&tmp.path().join("rt"), &["--device", dev.to_str().unwrap()]);
    assert!(
        daemon.log().contains("device: ") && daemon.log().contains("(FUSE"),
        "{}",
        daemon.log()
    );
    Setup {
        _tmp: tmp,
        daemon,
        dev,
    }
}

/// One running client process and its output lines.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Client {
    fn spawn(cmd: &str, dev: &Path, arg: &str) -> Client {
        Client::spawn_with(Command::new(sgdev()).args([cmd]).arg(dev).arg(arg))
    }

    fn spawn_with(command: &mut Command) -> Client {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn sgdev");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Client {
            stdin: child.stdin.take(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line, which must start with `prefix` (liveness bound 10 s).
    fn expect(&mut self, prefix: &str) -> String {
        self.expect_within(prefix, Duration::from_secs(10))
    }

    /// [`expect`](Self::expect) with another liveness bound.
    fn expect_within(&mut self, prefix: &str, limit: Duration) -> String {
        match self.lines.recv_timeout(limit) {
            Ok(line) => {
                self.seen.push(line.clone());
                assert!(
                    line.starts_with(prefix),
                    "expected {prefix:?}, got {line:?} (so far: {:?})",
                    self.seen
                );
                line
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("no {prefix:?} within {limit:?} (so far: {:?})", self.seen)
            }
            Err(RecvTimeoutError::Disconnected) => panic!(
                "client exited ({:?}) before {prefix:?} (so far: {:?})",
                self.child.try_wait(),
                self.seen
            ),
        }
    }

    /// Nothing printed for `d` (the client is blocked).
    fn quiet_for(&mut self, d: Duration) {
        if let Ok(line) = self.lines.recv_timeout(d) {
            panic!("expected the client to block, got {line:?}");
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    fn wait_success(&mut self) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        assert!(status.success(), "{status:?} (output: {:?})", self.seen);
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(line: &str) -> u64 {
    let after = line.split(" after ").nth(1).expect("an elapsed time");
    after.trim_end_matches(" ms").parse().expect("ms")
}

#[test]
fn example_1_watchdog_thread() {
    require_fuse!();
    let s = setup();
    let mut c = Client::spawn("watchdog", &s.dev, "2");
    c.expect("ready");
    s.daemon.wait_watchers_registered(1);
    c.quiet_for(Duration::from_millis(200));
    s.daemon.control().bump(0).unwrap();
    assert_eq!(c.expect("generation"), "generation 1");
    assert_eq!(c.expect("acked"), "acked 1");
    s.daemon.control().bump(7).unwrap();
    assert_eq!(c.expect("generation"), "generation 7");
    c.expect("acked 7");
    c.wait_success();
    let status = s.daemon.status();
    assert_eq!((status.watchers, status.outdated), (0, 0));
}

#[test]
fn example_2_epoll() {
    require_fuse!();
    let s = setup();
    let mut c = Client::spawn("epoll", &s.dev, "2");
    c.expect("ready");
    s.daemon.wait_watchers_registered(1);
    for expected in [1, 2] {
        s.daemon.control().bump(0).unwrap();
        assert_eq!(c.expect("generation"), format!("generation {expected}"));
        c.expect("acked");
    }
    c.expect("done");
    c.wait_success();
}

#[test]
fn example_3_mapped_memory_polling() {
    require_fuse!();
    let s = setup();
    let mut c = Client::spawn("mapped", &s.dev, "");
    assert_eq!(c.expect("ready"), "ready 0");
    s.daemon.wait_watchers_registered(1);
    s.daemon.control().bump(0).unwrap();
    assert_eq!(c.expect("changed"), "changed 1");
    c.expect("acked 1");
    c.wait_success();
}

#[test]
fn example_4_orchestrator_waits_for_socket_and_device_watchers() {
    require_fuse!();
    let s = setup();
    let mut orchestrator = Client::spawn("orchestrator", &s.dev, "5000");
    orchestrator.expect("ready");
    let mut other_device = Client::spawn("watchdog", &s.dev, "1");
    other_device.expect("ready");
    s.daemon.wait_watchers_registered(2);
    let mut socket = s.daemon.watcher();
    s.daemon.wait_watchers_registered(3);
    let status = s.daemon.status();
    assert_eq!(
        (status.watchers, status.tracked),
        (3, 3),
        "one core for both"
    );

    s.daemon.control().bump(0).unwrap();
    orchestrator.expect("generation 1");
    other_device.expect("generation 1");
    other_device.expect("acked 1");
    // The socket watcher is the last one outdated: the orchestrator waits
    // for it.
    orchestrator.quiet_for(Duration::from_millis(300));
    assert_eq!(s.daemon.status().outdated, 1);
    let g = socket.read().unwrap();
    socket.ack(g).unwrap();
    let line = orchestrator.expect("wait ok");
    assert!(ms(&line) >= 250, "{line}");
    orchestrator.wait_success();
}

#[test]
fn barrier_wait_times_out_with_etimedout_and_is_interrupted_by_a_bump() {
    require_fuse!();
    let s = setup();
    let _laggard = s.daemon.watcher();
    s.daemon.wait_watchers_registered(1);
    s.daemon.control().bump(0).unwrap();

    let mut timed = Client::spawn("wait", &s.dev, "200");
    timed.expect("ready");
    let line = timed.expect("wait ETIMEDOUT");
    assert!((150..3000).contains(&ms(&line)), "{line}");

    let mut forever = Client::spawn("wait", &s.dev, "0");
    forever.expect("ready");
    s.daemon.wait_watchers_registered(2);
    forever.quiet_for(Duration::from_millis(200));
    // A new generation makes the waiter itself outdated: EINTR.
    s.daemon.control().bump(0).unwrap();
    forever.expect("wait EINTR");
}

#[test]
fn signals_interrupt_a_blocked_read_and_a_blocked_wait() {
    require_fuse!();
    let s = setup();
    let mut reader = Client::spawn("read", &s.dev, "");
    reader.expect("ready");
    s.daemon.wait_watchers_registered(1);
    reader.quiet_for(Duration::from_millis(200));
    let t = Instant::now();
    reader.signal(libc::SIGUSR1);
    reader.expect("read-error EINTR");
    assert!(t.elapsed() < Duration::from_secs(1));
    reader.wait_success();

    let _laggard = s.daemon.watcher();
    s.daemon.wait_watchers_registered(1);
    s.daemon.control().bump(0).unwrap();
    let mut waiter = Client::spawn("wait", &s.dev, "0");
    waiter.expect("ready");
    s.daemon.wait_watchers_registered(2);
    waiter.quiet_for(Duration::from_millis(200));
    waiter.signal(libc::SIGUSR1);
    waiter.expect("wait EINTR");
    waiter.wait_success();
    // The daemon is unharmed: the next bump is still delivered.
    let mut watchdog = Client::spawn("watchdog", &s.dev, "1");
    watchdog.expect("ready");
    s.daemon.wait_watchers_registered(2);
    s.daemon.control().bump(0).unwrap();
    watchdog.expect("generation 2");
}

#[test]
fn sigkill_of_a_blocked_reader_reaps_it_and_releases_its_watcher() {
    require_fuse!();
    let s = setup();
    let mut reader = Client::spawn("read", &s.dev, "");
    reader.expect("ready");
    s.daemon.wait_watchers_registered(1);
    reader.quiet_for(Duration::from_millis(100));
    let t = Instant::now();
    reader.signal(libc::SIGKILL);
    let status = reader.child.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    s.daemon.wait_watchers_registered(0);
}

#[test]
fn abi_edge_cases() {
    require_fuse!();
    let s = setup();
    let mut c = Client::spawn("probe", &s.dev, "");
    c.expect("short-read -1 EINVAL");
    c.expect("nonblocking-read -1 EAGAIN");
    c.expect("long-write -1 EINVAL");
    c.expect("wrong-ack -1 EINVAL");
    c.expect("unknown-ioctl -1 ENOTTY");
    c.expect("outdated 0");
    c.expect("poll 0 0");
    // See docs/device.md: passthrough maps the device page for read-write
    // handles even with PROT_WRITE; the runtime page is never exposed.
    c.expect("rw-mmap-on-rdwr");
    c.expect("rw-mmap-on-rdonly EACCES");
    c.expect("ro-mmap mapped");
    c.expect("mprotect-write -1 EACCES");
    c.expect("write-on-rdonly -1 EBADF");
    c.wait_success();
    let md = std::fs::metadata(&s.dev).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert!(md.file_type().is_file() && !md.file_type().is_char_device());
    assert_eq!(md.len(), 4096);
    assert_eq!(md.mode() & 0o777, 0o666);
}

#[test]
fn outdated_count_and_poll_follow_the_core() {
    require_fuse!();
    let s = setup();
    let mut watchdog = Client::spawn("watchdog", &s.dev, "1");
    watchdog.expect("ready");
    let _socket = s.daemon.watcher();
    s.daemon.wait_watchers_registered(2);
    // A device forced update by root wakes socket and device watchers.
    let mut force = Client::spawn("force", &s.dev, "5");
    force.expect("force ok");
    force.expect("read 5");
    force.wait_success();
    watchdog.expect("generation 5");
    watchdog.expect("acked 5");
    // The force client's handle is released asynchronously after it exits
    // (FUSE sends RELEASE later), so its watcher may linger a moment.
    assert!(
        sysgenid_tests::wait_until(Duration::from_secs(5), || {
            let status = s.daemon.status();
            (status.generation, status.outdated) == (5, 1)
        }),
        "only the socket watcher stays outdated: {:?}",
        s.daemon.status()
    );
}

#[test]
fn a_non_root_process_watches_read_only_but_may_not_write_open_or_force_an_update() {
    require_fuse!();
    let s = setup();
    use std::os::unix::process::CommandExt;
    let mut c = Client::spawn_with(
        Command::new(sgdev())
            .arg("force")
            .arg(&s.dev)
            .arg("100")
            .uid(65534)
            .gid(65534),
    );
    c.expect("open-rdwr-error EACCES");
    c.expect("force-error EACCES");
    c.expect("read-error EAGAIN");
    c.wait_success();
    assert_eq!(s.daemon.generation(), 0);
    // The read-only handle still watches: it sees the next change.
    let mut watcher = Client::spawn_with(
        Command::new(sgdev())
            .arg("read")
            .arg(&s.dev)
            .arg("")
            .uid(65534)
            .gid(65534),
    );
    watcher.expect("ready");
    s.daemon.wait_watchers_registered(1);
    s.daemon.control().bump(0).unwrap();
    watcher.expect("generation 1");
}

#[test]
fn daemon_killed_under_blocked_readers_and_a_mapping_then_remounted() {
    require_fuse!();
    let mut s = setup();
    let mut reader = Client::spawn("read", &s.dev, "");
    reader.expect("ready");
    s.daemon.wait_watchers_registered(1);
    // AWS-LC's pattern: open O_RDONLY, map, close. With passthrough the
    // mapping holds the page file, not the device handle, so its watcher
    // is gone with the close.
    let mut mapped = Client::spawn("awslc", &s.dev, "60");
    assert_eq!(mapped.expect("ready"), "ready 0");
    s.daemon.wait_watchers_registered(1);
    s.daemon.control().bump(0).unwrap();
    reader.expect("generation 1");
    mapped.expect("seen 1");
    let mut blocked = Client::spawn("read", &s.dev, "");
    blocked.expect("ready");
    s.daemon.wait_watchers_registered(1);

    s.daemon.kill9();
    // The blocked reader gets an error at once instead of hanging.
    let line = blocked.expect("read-error");
    assert!(
        line.contains("ENOTCONN") || line.contains("ECONNABORTED"),
        "{line}"
    );
    // The mapping survives the daemon (no SIGBUS) ...
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        mapped.child.try_wait().unwrap().is_none(),
        "mapped reader died"
    );

    // ... and stays current across the restart, which replaces the stale
    // mount.
    s.daemon.restart();
    assert!(
        s.daemon.log().contains("stale device mount"),
        "{}",
        s.daemon.log()
    );
    s.daemon.control().bump(0).unwrap();
    mapped.expect("seen 2");
    mapped.wait_success();
    let mut watchdog = Client::spawn("watchdog", &s.dev, "1");
    watchdog.expect("ready");
    s.daemon.wait_watchers_registered(1);
    s.daemon.control().bump(0).unwrap();
    watchdog.expect("generation 3");
}

#[test]
fn status_names_the_device_and_a_clean_exit_removes_it() {
    require_fuse!();
    let mut s = setup();
    let device = s.daemon.status().device.expect("device in status");
    assert!(device.starts_with(s.dev.to_str().unwrap()), "{device}");
    let out = s.daemon.ctl(&["status"]);
    assert!(
        stdout(&out).contains(s.dev.to_str().unwrap()),
        "{}",
        stdout(&out)
    );
    assert!(s.daemon.signal_and_wait(libc::SIGTERM).success());
    assert!(!s.dev.exists(), "mount point left behind");
}

#[test]
fn device_off_by_flag() {
    let dir = runtime_dir();
    let d = Daemon::start_with(dir.path(), &["--device", "off"]);
    assert_eq!(d.status().device, None);
    assert!(d.log().contains("device: off"), "{}", d.log());
}

/// Round trips and wake-up latency; prints numbers, asserts only sanity.
#[test]
fn measure_round_trips() {
    // Prints the figures quoted in docs/device.md (`--nocapture`); asserts
    // only that a woken reader always finds the mapping current. Few rounds
    // and a generous bound: the suite runs it beside the VM test on 2 CPUs.
    require_fuse!();
    let s = setup();
    let long = Duration::from_secs(120);
    let mut c = Client::spawn("bench", &s.dev, "500");
    eprintln!("{}", c.expect_within("bench", long));
    c.wait_success();
    let mut c = Client::spawn("latency", &s.dev, "40");
    let line = c.expect_within("latency", long);
    eprintln!("{line}");
    assert!(line.ends_with("stale-at-wake 0"), "{line}");
    c.wait_success();
}

/// The default `--device-group` (the flag left out), on a machine with the
/// package's group `sysgenid` and on one without; each state is made in a
/// mount namespace of the test's own (a copy of `/etc/group` bound over
/// it), so no other process sees the group, nor a mount.
#[test]
fn the_device_group_defaults_to_sysgenid_when_that_group_exists_and_to_none_otherwise() {
    require_fuse!();
    use std::os::unix::fs::MetadataExt;
    let mut ns = private_mounts::enter();
    let tmp = runtime_dir();
    let dev = tmp.path().join("sysgenid");
    let start = |rt: &str| {
        Daemon::start_keeping_defaults(
            &tmp.path().join(rt),
            &["--device", dev.to_str().unwrap()],
            &["--device-group"],
        )
    };

    ns.without_group("sysgenid");
    let mut daemon = start("without");
    assert!(
        daemon
            .log()
            .contains("write opens need CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE"),
        "{}",
        daemon.log()
    );
    let meta = std::fs::metadata(&dev).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o666, 0));
    assert!(daemon.signal_and_wait(libc::SIGTERM).success());

    let gid = ns.with_group("sysgenid");
    let mut daemon = start("with");
    assert!(
        daemon
            .log()
            .contains(&format!("write opens for group sysgenid (gid {gid})")),
        "{}",
        daemon.log()
    );
    let meta = std::fs::metadata(&dev).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o664, gid));
    assert!(daemon.signal_and_wait(libc::SIGTERM).success());
    assert!(!dev.exists(), "mount point left behind");
}

/// `--device-group`: the kernel lets a member of the group (here through a
/// supplementary group) open the device `O_RDWR` and run the seed's
/// example 1 (read, acknowledge with write); a non-member of the same uid
/// still gets `EACCES` on a write open, and neither may force an update.
#[test]
fn a_device_group_member_opens_for_writing_and_acknowledges() {
    require_fuse!();
    // `users` (gid 100) exists on Debian; uid 65534 is not in it.
    let Some(group) = std::fs::read_to_string("/etc/group").ok().and_then(|g| {
        g.lines()
            .find(|l| l.starts_with("users:"))
            .map(str::to_owned)
    }) else {
        eprintln!("SKIPPED: no group `users` here");
        return;
    };
    let gid: u32 = group.split(':').nth(2).unwrap().parse().unwrap();
    let tmp = runtime_dir();
    let dev = tmp.path().join("sysgenid");
    let mut daemon = Daemon::start_with(
        &tmp.path().join("rt"),
        &["--device", dev.to_str().unwrap(), "--device-group", "users"],
    );
    assert!(
        daemon.log().contains("write opens for group users"),
        "{}",
        daemon.log()
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&dev).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o664, gid));
    let as_nobody = |groups: &str, cmd: &str, arg: &str| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", "65534", "--regid", "65534"]);
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            c.args(["--groups", groups]);
        }
        c.arg(sgdev()).arg(cmd).arg(&dev).arg(arg);
        Client::spawn_with(&mut c)
    };
    let mut outsider = as_nobody("", "force", "100");
    outsider.expect("open-rdwr-error EACCES");
    let mut member = as_nobody(&gid.to_string(), "watchdog", "1");
    member.expect("ready");
    daemon.wait_watchers_registered(1);
    assert_eq!(daemon.control().bump(0).unwrap(), 1);
    member.expect("generation 1");
    member.expect("acked 1");
    member.wait_success();
    daemon
        .control()
        .wait_watchers(Some(Duration::from_secs(5)))
        .unwrap();
    let mut forcer = as_nobody(&gid.to_string(), "force", "100");
    forcer.expect("force-error EACCES");
    assert_eq!(daemon.generation(), 1, "a member may not force an update");
    daemon.stop();
    if let Ok(path) = std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 reads a NUL-terminated path we own; failure
        // (nothing mounted there) is ignored.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}
