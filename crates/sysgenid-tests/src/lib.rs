//! Shared scaffolding for the process-level tests: find the built binaries,
//! start a daemon in a private runtime directory, run the CLI.
//!
//! The binaries come from the same target directory as the test executable
//! (`cargo build --workspace --bins` first; the README's test command does
//! that).

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

/// A running `sysgenidd` on a private runtime directory.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    /// Starts `sysgenidd --source none` on `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Daemon {
        Daemon::start_with(dir, &[])
    }

    /// Starts with extra flags (`--source LIST` replaces the default
    /// `--source none`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(dir, extra, &[])
    }

    /// Starts with extra flags and extra environment variables (which the
    /// daemon's hooks inherit).
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut child = Daemon::spawn_command(dir, &extra);
        child.envs(env.iter().copied());
        let child = child.spawn().expect("spawn sysgenidd");
        let mut d = Daemon {
            child,
            dir: dir.to_path_buf(),
            log: dir.with_extension("log"),
            extra,
        };
        d.wait_ready();
        d
    }

    fn spawn(dir: &Path, extra: &[String]) -> Child {
        Daemon::spawn_command(dir, extra)
            .spawn()
            .expect("spawn sysgenidd")
    }

    fn spawn_command(dir: &Path, extra: &[String]) -> Command {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        // `--source none` unless the caller chose sources (`start_with(dir,
        // &["--source", "uevent"])`): clap refuses the flag twice.
        let chose_sources = extra
            .iter()
            .any(|a| a == "--source" || a.starts_with("--source="));
        let default_sources: &[&str] = if chose_sources {
            &[]
        } else {
            &["--source", "none"]
        };
        // `--device off` unless the caller asked for a device: tests run
        // as root, where the default would mount /dev/sysgenid.
        let device_default: &[&str] = if extra.iter().any(|a| a.starts_with("--device")) {
            &[]
        } else {
            &["--device", "off"]
        };
        // `--hooks-dir off` unless the caller gave one: the machine's own
        // /etc/sysgenid/hooks.d is no business of the tests.
        let hooks_default: &[&str] = if extra.iter().any(|a| a.starts_with("--hooks-dir")) {
            &[]
        } else {
            &["--hooks-dir", "off"]
        };
        // `--lifecycle-group none` unless the caller gave one: a machine's
        // own `sysgenid` group is no business of the tests.
        let lifecycle_group_default: &[&str] =
            if extra.iter().any(|a| a.starts_with("--lifecycle-group")) {
                &[]
            } else {
                &["--lifecycle-group", "none"]
            };
        let mut c = Command::new(bin("sysgenidd"));
        c.arg("--runtime-dir")
            .arg(dir)
            .args(default_sources)
            .args(device_default)
            .args(hooks_default)
            .args(lifecycle_group_default)
            .args(extra)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log);
        c
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
    /// thread: an orchestrator blocked in the barrier.
    pub fn spawn_barrier_waiter(&self) -> std::thread::JoinHandle<Result<(), sysgenid::Error>> {
        let dir = self.dir.clone();
        std::thread::spawn(move || {
            sysgenid::Control::connect(Some(&dir))
                .unwrap()
                .wait_watchers(None)
        })
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
        self.child = Daemon::spawn(&self.dir, &self.extra);
        self.wait_ready();
    }

    /// Starts again with different extra flags.
    pub fn extra_restart(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
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

/// A `sysgenidctl --runtime-dir dir` command to add arguments to.
pub fn ctl_command(dir: &Path) -> Command {
    let mut c = Command::new(bin("sysgenidctl"));
    c.arg("--runtime-dir").arg(dir);
    c
}

/// A `sysgenidd --runtime-dir dir --source none` command (not started), for
/// tests about start-up refusals.
pub fn daemon_command(dir: &Path) -> Command {
    let mut c = Command::new(bin("sysgenidd"));
    c.arg("--runtime-dir").arg(dir).args(["--source", "none"]);
    c
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
    /// Starts `sysgenidd --source none --device off` as `uid` and waits
    /// until its socket and page exist (a client cannot be used to wait:
    /// it would rightly refuse the daemon).
    pub fn start(uid: u32) -> Squatter {
        use std::os::unix::process::CommandExt;
        let dir = runtime_dir();
        let rundir = dir.path().join("run");
        std::fs::create_dir(&rundir).unwrap();
        std::os::unix::fs::chown(&rundir, Some(uid), Some(uid)).unwrap();
        let child = Command::new(bin("sysgenidd"))
            .arg("--runtime-dir")
            .arg(&rundir)
            .args(["--source", "none", "--device", "off"])
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
