//! Shared scaffolding for the process-level tests: find the built binaries,
//! start a daemon in a private runtime directory, run the CLI.
//!
//! The binaries come from the same target directory as the test executable
//! (`cargo build --workspace --bins` first; the README's test command does
//! that).
//!
//! Nothing the tests start may depend on the machine they run on, nor touch
//! a system daemon running there. So every daemon and client is built here,
//! in one place: [`sysgenidd_command`] pins each flag whose default follows
//! the machine ([`PINNED_FLAGS`]) and names its runtime directory;
//! [`ctl_command`] names the runtime directory; and both run in a clean
//! environment ([`clean_env`]), so a `SYSGENID_RUNTIME_DIR` or
//! `SYSGENID_DEVICE` of the caller's changes nothing. A test about a
//! default says so in its name, leaves that one flag unpinned
//! ([`Daemon::start_keeping_defaults`]) and sets up the state the default
//! follows in a mount namespace of its own ([`private_mounts`]).

pub mod private_mounts;

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary next to the running test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// Raises RLIMIT_NOFILE to `want` (soft and hard; raising the hard limit
/// needs CAP_SYS_RESOURCE) or, failing that, the soft limit to the hard
/// one; returns the new soft limit. A daemon started afterwards inherits
/// it (sysgenidd does not raise its own), and needs two descriptors per
/// connection (the socket and the peer's pidfd).
pub fn raise_nofile_to(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one live rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_max < want {
            let more = libc::rlimit {
                rlim_cur: want,
                rlim_max: want,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &more) == 0 {
                return want;
            }
        }
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; the new soft limit.
pub fn raise_nofile() -> u64 {
    raise_nofile_to(0)
}

/// The resident set (`VmRSS`) of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// A raw `SOCK_SEQPACKET` connection to `path` (std has none): a rustix
/// socket wrapped as a `UnixDatagram` for send/recv, which work on any
/// connected socket. Reads and writes give up after `timeout`.
pub fn seqpacket_connect(path: &Path, timeout: Duration) -> std::io::Result<UnixDatagram> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    let sock = UnixDatagram::from(fd);
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    Ok(sock)
}

/// The `Hello` frame of this protocol version for `role`.
pub fn hello_frame(role: sysgenid_proto::Role) -> Vec<u8> {
    sysgenid_proto::Request::Hello {
        version: sysgenid_proto::PROTOCOL_VERSION,
        role,
    }
    .encode()
}

/// A temporary runtime directory that other users can traverse (so tests
/// can run clients as `nobody`).
pub fn runtime_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sysgenid-test-")
        .tempdir()
        .expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// For tests that need root (setresuid, chown, mounts): prints a visible
/// `SKIPPED: needs root <what>` and returns true when not root.
pub fn skip_unless_root(what: &str) -> bool {
    let root = rustix::process::geteuid().is_root();
    if !root {
        eprintln!("SKIPPED: needs root {what}");
    }
    !root
}

/// Polls `cond` every 5 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// The environment variables a daemon, client or helper under test keeps
/// from the caller's; every other is dropped: `SYSGENID_RUNTIME_DIR`,
/// `SYSGENID_DEVICE`, `SYSGENIDD_DEVICE_NO_PASSTHROUGH`, `RUST_LOG`, and
/// systemd's `NOTIFY_SOCKET`, `WATCHDOG_*`, `LISTEN_*`, `JOURNAL_STREAM`
/// (a suite started from a unit) all change what they do.
pub const KEPT_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "LANG",
    "LC_ALL",
    "TZ",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "LLVM_PROFILE_FILE",
];

/// Clears `cmd`'s environment down to [`KEPT_ENV`]; add what the test
/// means to set afterwards.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    cmd.env_clear();
    for name in KEPT_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd
}

/// Makes the process `cmd` starts get SIGTERM when the thread that
/// started it ends: a test process killed outright (a nextest timeout, ^C)
/// cannot stop its daemons and clients, and a daemon so signalled stops
/// (and unmounts its device) by itself. Start such processes from the
/// test's own thread, not from a helper thread that ends first.
pub fn stop_with_test(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs between fork and exec and only calls
    // prctl(2), which is async-signal-safe. It runs after any uid change,
    // which would clear the setting.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd
}

/// `inner` run through a wrapper program (`setpriv ... --`, `unshare ...
/// --`): `wrapper ARGS... PROGRAM INNER_ARGS...` in a clean environment
/// with the variables `inner` sets, stopped with the test.
pub fn wrap_command(wrapper: &str, args: &[&str], inner: &Command) -> Command {
    let mut cmd = Command::new(wrapper);
    clean_env(&mut cmd);
    stop_with_test(&mut cmd);
    cmd.args(args)
        .arg(inner.get_program())
        .args(inner.get_args())
        .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
    cmd
}

/// For scripts that need the toolchain's environment (cargo, rustup,
/// proxies): drops only what changes sysgenid's behaviour, every variable
/// whose name starts with `SYSGENID` and systemd's service protocol.
pub fn without_sysgenid_env(cmd: &mut Command) -> &mut Command {
    const SYSTEMD: &[&str] = &[
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "JOURNAL_STREAM",
    ];
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("SYSGENID") || SYSTEMD.contains(&text.as_ref()) {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// The flags every daemon under test gets unless the test gives the flag
/// itself, each because its default follows the machine:
/// - `--source auto` follows every restore source the machine has
///   (`/dev/kmsg`, `/dev/vmclock0`, uevents);
/// - `--device` is `/dev/sysgenid` as root (the system daemon's);
/// - `--device-group` is `sysgenid` when that group exists (a machine with
///   the package installed);
/// - `--hooks-dir` is `/etc/sysgenid/hooks.d` when it exists;
/// - `--lifecycle-group` is `sysgenid` when that group exists.
///
/// `--runtime-dir` is always given ([`sysgenidd_command`]): its default is
/// the system daemon's `/run/sysgenid`.
pub const PINNED_FLAGS: &[(&str, &str)] = &[
    ("--source", "none"),
    ("--device", "off"),
    ("--device-group", "none"),
    ("--hooks-dir", "off"),
    ("--lifecycle-group", "none"),
];

/// Whether `args` give `flag` (as `--flag VALUE` or `--flag=VALUE`).
fn gives(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|v| v.starts_with('=')))
}

/// A `sysgenidd --runtime-dir DIR` command (not started) with every flag of
/// [`PINNED_FLAGS`] the caller did not give in `extra`, in a clean
/// environment, stopped with the test ([`stop_with_test`]). The one place
/// a daemon's command line is made.
pub fn sysgenidd_command(dir: &Path, extra: &[&str]) -> Command {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    sysgenidd_command_keeping(Some(dir), &extra, &[])
}

/// Like [`sysgenidd_command`], but leaving the flags named in `defaults`
/// to the daemon's default (`--runtime-dir` included: `dir` is then
/// `None`), for the tests about those defaults.
pub fn sysgenidd_command_keeping(
    dir: Option<&Path>,
    extra: &[String],
    defaults: &[&str],
) -> Command {
    for d in defaults {
        assert!(
            *d == "--runtime-dir" || PINNED_FLAGS.iter().any(|(f, _)| f == d),
            "{d} is not a pinned flag"
        );
    }
    assert_eq!(
        dir.is_none(),
        defaults.contains(&"--runtime-dir"),
        "a runtime directory, or --runtime-dir among the defaults"
    );
    let mut cmd = Command::new(bin("sysgenidd"));
    clean_env(&mut cmd);
    stop_with_test(&mut cmd);
    if let Some(dir) = dir {
        cmd.arg("--runtime-dir").arg(dir);
    }
    for (flag, value) in PINNED_FLAGS {
        if !gives(extra, flag) && !defaults.contains(flag) {
            cmd.args([flag, value]);
        }
    }
    cmd.args(extra);
    cmd
}

/// A running `sysgenidd` on a private runtime directory.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
    spec: Spec,
}

/// How a [`Daemon`] was started, for its restarts.
struct Spec {
    extra: Vec<String>,
    /// Pinned flags left to the daemon's defaults.
    defaults: Vec<&'static str>,
    /// Variables set in its otherwise clean environment.
    env: Vec<(String, OsString)>,
}

impl Daemon {
    /// Starts `sysgenidd` ([`sysgenidd_command`]) on `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// Starts with extra flags; a flag of [`PINNED_FLAGS`] given here
    /// replaces the pinned value (`--source uevent` for `--source none`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_keeping_defaults(dir, extra, &[])
    }

    /// Starts with extra flags, leaving the flags named in `defaults` to
    /// the daemon (`--runtime-dir` among them: `dir` must then be the
    /// default directory). For the tests about those defaults; they set
    /// up the state the default follows in [`private_mounts`].
    pub fn start_keeping_defaults(dir: &Path, extra: &[&str], defaults: &[&'static str]) -> Daemon {
        Daemon::launch(
            dir,
            Spec {
                extra: extra.iter().map(|s| s.to_string()).collect(),
                defaults: defaults.to_vec(),
                env: Vec::new(),
            },
        )
    }

    /// Starts with extra flags and `env` set in its clean environment
    /// (systemd's `NOTIFY_SOCKET`, `WATCHDOG_USEC` for a test of the
    /// watchdog).
    pub fn start_with_env<V: AsRef<OsStr>>(
        dir: &Path,
        extra: &[&str],
        env: &[(&str, V)],
    ) -> Daemon {
        Daemon::launch(
            dir,
            Spec {
                extra: extra.iter().map(|s| s.to_string()).collect(),
                defaults: Vec::new(),
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.as_ref().to_os_string()))
                    .collect(),
            },
        )
    }

    fn launch(dir: &Path, spec: Spec) -> Daemon {
        let child = Daemon::spawn(dir, &spec);
        let mut d = Daemon {
            child,
            dir: dir.to_path_buf(),
            log: dir.with_extension("log"),
            spec,
        };
        d.wait_ready();
        d
    }

    fn spawn(dir: &Path, spec: &Spec) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        let dir = (!spec.defaults.contains(&"--runtime-dir")).then_some(dir);
        sysgenidd_command_keeping(dir, &spec.extra, &spec.defaults)
            .env("RUST_LOG", "debug")
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sysgenidd")
    }

    fn wait_ready(&mut self) {
        let dir = self.dir.clone();
        let ok = wait_until(Duration::from_secs(10), || {
            sysgenid::Control::connect(Some(&dir)).is_ok()
        });
        if !ok {
            let status = self.child.try_wait().unwrap();
            panic!(
                "sysgenidd did not come up ({status:?}); log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }

    /// A control connection.
    pub fn control(&self) -> sysgenid::Control {
        sysgenid::Control::connect(Some(&self.dir)).expect("control connection")
    }

    /// `wait_watchers(None)` on a control connection of its own, in a
    /// thread: an orchestrator blocked in the barrier. The connection is
    /// made here, before the thread starts, so a test that stops the
    /// daemon next cannot stop it before the waiter connected (the waiter
    /// then gets `ShuttingDown` whenever its wait begins).
    pub fn spawn_barrier_waiter(&self) -> std::thread::JoinHandle<Result<(), sysgenid::Error>> {
        let mut control = self.control();
        std::thread::spawn(move || control.wait_watchers(None))
    }

    /// A tracked, blocking watcher.
    pub fn watcher(&self) -> sysgenid::Watcher {
        sysgenid::Watcher::builder()
            .runtime_dir(&self.dir)
            .open()
            .expect("watcher")
    }

    /// The current generation (via status).
    pub fn generation(&self) -> u32 {
        self.control().status().unwrap().generation
    }

    /// The status report.
    pub fn status(&self) -> sysgenid::StatusReport {
        self.control().status().unwrap()
    }

    /// Waits until the daemon reports `n` watchers.
    pub fn wait_watchers_registered(&self, n: u32) {
        assert!(
            wait_until(Duration::from_secs(10), || self.status().watchers == n),
            "daemon never reached {n} watchers (has {})",
            self.status().watchers
        );
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid has no memory-safety
        // preconditions.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.child.wait().unwrap()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        self.signal_and_wait(libc::SIGKILL);
    }

    /// Starts the daemon again on the same directory (after a stop/kill).
    pub fn restart(&mut self) {
        self.child = Daemon::spawn(&self.dir, &self.spec);
        self.wait_ready();
    }

    /// Starts again with different extra flags.
    pub fn extra_restart(&mut self, extra: &[&str]) {
        self.spec.extra = extra.iter().map(|s| s.to_string()).collect();
        self.restart();
    }

    /// Runs `sysgenidctl` against this daemon.
    pub fn ctl(&self, args: &[&str]) -> Output {
        ctl(&self.dir, args)
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    /// Stops the daemon; its log is kept only when the test failed.
    fn drop(&mut self) {
        self.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

impl Daemon {
    /// SIGTERM first, so a daemon serving a device unmounts it (a SIGKILL
    /// would leave a stale FUSE mount behind every test); SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child's pid has no memory-safety
            // preconditions.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let exited = wait_until(Duration::from_secs(5), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            });
            if !exited {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

/// A `sysgenidctl --runtime-dir dir` command to add arguments to, in a
/// clean environment (never the system daemon's `/run/sysgenid`), stopped
/// with the test ([`stop_with_test`]).
pub fn ctl_command(dir: &Path) -> Command {
    let mut c = Command::new(bin("sysgenidctl"));
    clean_env(&mut c);
    stop_with_test(&mut c);
    c.arg("--runtime-dir").arg(dir);
    c
}

/// A `sysgenidd` command on `dir` (not started), for tests about start-up
/// refusals: [`sysgenidd_command`] with no extra flags.
pub fn daemon_command(dir: &Path) -> Command {
    sysgenidd_command(dir, &[])
}

/// Runs `sysgenidctl --runtime-dir dir ARGS`.
pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    ctl_command(dir)
        .args(args)
        .output()
        .expect("run sysgenidctl")
}

/// Stdout as a trimmed string.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Stderr as a string.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A `sysgenidd` run by another uid in a directory that uid owns: what a
/// user squatting a runtime directory would start. Clients must refuse it
/// unless they run as that uid. Needs root (to run as `uid`).
pub struct Squatter {
    /// The squatted runtime directory.
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Squatter {
    /// Starts `sysgenidd` ([`sysgenidd_command`]) as `uid` and waits
    /// until its socket and page exist (a client cannot be used to wait:
    /// it would rightly refuse the daemon).
    pub fn start(uid: u32) -> Squatter {
        use std::os::unix::process::CommandExt;
        let dir = runtime_dir();
        let rundir = dir.path().join("run");
        std::fs::create_dir(&rundir).unwrap();
        std::os::unix::fs::chown(&rundir, Some(uid), Some(uid)).unwrap();
        let child = sysgenidd_command(&rundir, &[])
            .uid(uid)
            .gid(uid)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn sysgenidd");
        let mut s = Squatter { dir, child };
        let ready = wait_until(Duration::from_secs(10), || {
            rundir.join("sysgenid.sock").exists() && rundir.join("generation").exists()
        });
        assert!(
            ready,
            "the squatting daemon did not come up: {:?}",
            s.child.try_wait()
        );
        s
    }

    /// Its runtime directory.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("run")
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety
        // preconditions.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
