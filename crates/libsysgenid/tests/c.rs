//! The C library as C programs use it: build libsysgenid, install it into a
//! private prefix with `install.sh`, compile the examples and test programs
//! with gcc (through `pkg-config`), and run them as separate processes
//! against a live `sysgenidd`, driving changes with `sysgenidctl bump`.
//!
//! Needs gcc and pkg-config, and the workspace binaries
//! (`cargo build --workspace --bins`). The library itself is built here
//! (`cargo build -p sysgenid-c`): `cargo build --bins` and `cargo test`
//! compile no cdylib/staticlib for a package without an rlib.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sysgenid_tests::{clean_env, runtime_dir, stdout, Daemon};

const LONG: Duration = Duration::from_secs(20);

/// target/<profile>, next to the test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the shared and static library (same profile as these tests) and
/// installs them with the header and `sysgenid.pc` into
/// target/<profile>/libsysgenid-test-prefix-<pid>, once per test process.
fn prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let dir = profile_dir();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "-p", "sysgenid-c"])
            .current_dir(crate_dir());
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => {}
            Some("release") => {
                build.arg("--release");
            }
            Some(other) => {
                build.args(["--profile", other]);
            }
            None => panic!("odd target dir {}", dir.display()),
        }
        run(&mut build);
        // One prefix per test process: under cargo-nextest every test is
        // its own process, and a shared prefix would be reinstalled under
        // programs that are running from it.
        remove_dead_processes_dirs(&dir);
        let prefix = dir.join(format!("libsysgenid-test-prefix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&prefix);
        run(Command::new("sh")
            .arg(crate_dir().join("install.sh"))
            .arg(&prefix)
            .arg(&dir));
        prefix
    })
}

/// Removes the per-process prefixes and program directories of test
/// processes that have exited, so they do not pile up in target/.
fn remove_dead_processes_dirs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let pid = ["libsysgenid-test-prefix-", "libsysgenid-test-c-"]
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("sysgenid")
        .env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig"))
        .output()
        .expect("pkg-config not found: install it (apt-get install -y pkg-config)");
    assert!(
        out.status.success(),
        "pkg-config {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    Shared,
    Static,
}

/// Compiles one C file against the installed library.
fn compile(src: &Path, name: &str, link: Link) -> PathBuf {
    let out_dir = profile_dir().join(format!("libsysgenid-test-c-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(match link {
        Link::Shared => name.to_string(),
        Link::Static => format!("{name}-static"),
    });
    let mut gcc = Command::new("gcc");
    gcc.args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .args(pkg_config(&["--cflags"]))
        .arg(src)
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Shared => {
            let libdir = prefix().join("lib");
            gcc.args(pkg_config(&["--libs"]))
                .arg(format!("-Wl,-rpath,{}", libdir.display()));
        }
        Link::Static => {
            // `-lsysgenid` prefers the .so; name the archive instead.
            gcc.arg(prefix().join("lib/libsysgenid.a")).args(
                pkg_config(&["--static", "--libs-only-l"])
                    .into_iter()
                    .filter(|l| l != "-lsysgenid"),
            );
        }
    }
    run(&mut gcc);
    exe
}

/// Compiles `src` once per test run (tests run in parallel: a second gcc
/// writing the executable while another test runs it fails with ETXTBSY).
fn compile_once(src: PathBuf, name: &str, link: Link) -> PathBuf {
    type Built = Vec<(String, bool, PathBuf)>;
    static BUILT: Mutex<Built> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap();
    let shared = link == Link::Shared;
    if let Some((_, _, p)) = built.iter().find(|(n, s, _)| n == name && *s == shared) {
        return p.clone();
    }
    let exe = compile(&src, name, link);
    built.push((name.to_string(), shared, exe.clone()));
    exe
}

fn example(name: &str) -> PathBuf {
    let src = crate_dir()
        .join("../../examples/c")
        .join(format!("{name}.c"));
    compile_once(src, name, Link::Shared)
}

fn test_program(name: &str, link: Link) -> PathBuf {
    let src = crate_dir().join("tests/c").join(format!("{name}.c"));
    compile_once(src, name, link)
}

/// A C program running against a daemon, its stdout collected line by line.
struct Prog {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Prog {
    fn start(exe: &Path, args: &[&str], dir: &Path) -> Prog {
        let mut child = clean_env(&mut Command::new(exe))
            .args(args)
            .env("SYSGENID_RUNTIME_DIR", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Prog {
            name: exe.file_name().unwrap().to_string_lossy().into_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            reader: Some(reader),
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for a line containing `needle`; returns it.
    fn expect(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < LONG,
                "{}: no line with {needle:?} after {LONG:?}; output:\n{}",
                self.name,
                self.output()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        // One write, so the program reads the line whole.
        stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid has no memory-safety
        // preconditions.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for exit (bounded) and returns the status and all output.
    fn finish(mut self) -> (ExitStatus, String) {
        drop(self.stdin.take());
        let start = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if start.elapsed() > LONG {
                let _ = self.child.kill();
                panic!("{} did not exit; output:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.reader.take().unwrap().join().unwrap();
        (status, self.output())
    }
}

impl Drop for Prog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bump(d: &Daemon) -> u32 {
    let out = d.ctl(&["bump"]);
    assert!(out.status.success(), "bump: {out:?}");
    stdout(&out).parse().unwrap()
}

/// The millisecond count in "... after N ms ...".
fn after_ms(line: &str) -> u64 {
    let rest = &line[line.find("after ").expect("after N ms") + 6..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn api_every_function_and_errno() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let (status, out) =
        Prog::start(&test_program("api", Link::Shared), &["up"], dir.path()).finish();
    assert!(status.success(), "api failed:\n{out}");
    assert!(out.contains("api: all"), "{out}");
    assert_eq!(d.status().watchers, 0);
}

#[test]
fn lifecycle_participants_freeze_thaw_change_and_abort() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let (status, out) =
        Prog::start(&test_program("lifecycle", Link::Shared), &[], dir.path()).finish();
    assert!(status.success(), "lifecycle failed:\n{out}");
    assert!(out.contains("lifecycle: all"), "{out}");
    let st = d.status();
    assert_eq!(st.state, sysgenid_client::LifecycleState::Running, "{st:?}");
    assert_eq!(st.watchers, 0, "{st:?}");
}

#[test]
fn api_without_daemon() {
    let dir = runtime_dir();
    let missing = dir.path().join("nothing-here");
    let (status, out) =
        Prog::start(&test_program("api", Link::Shared), &["down"], &missing).finish();
    assert!(status.success(), "api down failed:\n{out}");
}

#[test]
fn api_refuses_a_daemon_of_another_uid() {
    if sysgenid_tests::skip_unless_root("to run a daemon as nobody") {
        return;
    }
    let squat = sysgenid_tests::Squatter::start(65534);
    let (status, out) = Prog::start(
        &test_program("api", Link::Shared),
        &["untrusted"],
        &squat.path(),
    )
    .finish();
    assert!(status.success(), "api untrusted failed:\n{out}");
    assert!(out.contains("api: all"), "{out}");
}

#[test]
fn static_library_links_and_works() {
    let exe = test_program("api", Link::Static);
    let ldd = run(Command::new("ldd").arg(&exe));
    assert!(
        !String::from_utf8_lossy(&ldd.stdout).contains("libsysgenid"),
        "static build still needs libsysgenid.so"
    );
    let dir = runtime_dir();
    let _d = Daemon::start(dir.path());
    let (status, out) = Prog::start(&exe, &["up"], dir.path()).finish();
    assert!(status.success(), "static api failed:\n{out}");
}

#[test]
fn installed_layout_pkg_config_and_soname() {
    let p = prefix();
    for f in [
        "include/sysgenid.h",
        "lib/libsysgenid.a",
        "lib/libsysgenid.so",
        "lib/libsysgenid.so.0",
        "lib/pkgconfig/sysgenid.pc",
    ] {
        assert!(p.join(f).exists(), "{f} not installed");
    }
    let libs = pkg_config(&["--libs"]);
    assert!(libs.contains(&"-lsysgenid".to_string()), "{libs:?}");
    let cflags = pkg_config(&["--cflags"]);
    assert_eq!(cflags, vec![format!("-I{}", p.join("include").display())]);
    // Programs record the SONAME, so they keep loading any 0.x.
    let exe = example("watchdog");
    let ldd = String::from_utf8(run(Command::new("ldd").arg(&exe)).stdout).unwrap();
    assert!(ldd.contains("libsysgenid.so.0 =>"), "{ldd}");
    // The header is also valid C++.
    run(Command::new("g++")
        .args(["-fsyntax-only", "-x", "c++"])
        .arg(p.join("include/sysgenid.h")));
}

#[test]
fn watchdog_thread_reads_rebuilds_acks_and_is_interrupted() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let prog = Prog::start(&example("watchdog"), &[], dir.path());
    prog.expect("watchdog: ready");
    d.wait_watchers_registered(1);
    for _ in 0..2 {
        let g = bump(&d);
        prog.expect(&format!("watchdog: generation {g}"));
        prog.expect(&format!("watchdog: rebuilt {g}"));
        prog.expect(&format!("watchdog: acked {g}"));
        let wait = d.ctl(&["wait-watchers", "--timeout-ms", "5000"]);
        assert!(wait.status.success(), "{wait:?}");
    }
    // The watchdog is blocked in sysgenid_read; a signal makes it return
    // -EINTR, and the thread sees it should stop.
    prog.signal(libc::SIGTERM);
    let (status, out) = prog.finish();
    assert!(status.success(), "{out}");
    assert!(out.contains("watchdog: interrupted"), "{out}");
    assert!(out.contains("watchdog: done 2"), "{out}");
}

#[test]
fn event_loop_with_timer_stdin_and_daemon_restart() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let mut prog = Prog::start(&example("event_loop"), &[], dir.path());
    prog.expect("event_loop: ready");
    d.wait_watchers_registered(1);
    let g1 = bump(&d);
    prog.expect(&format!("event_loop: acked {g1}"));
    prog.send("hello");
    prog.expect("event_loop: stdin hello");

    // The descriptor in the epoll set stays valid across a daemon restart.
    d.signal_and_wait(libc::SIGTERM);
    d.restart();
    d.wait_watchers_registered(1);
    let g2 = bump(&d);
    assert!(g2 > g1);
    prog.expect(&format!("event_loop: acked {g2}"));
    // ... and a crash.
    d.kill9();
    d.restart();
    d.wait_watchers_registered(1);
    let g3 = bump(&d);
    prog.expect(&format!("event_loop: acked {g3}"));

    // Let the 100 ms timer fire a few times before quitting.
    std::thread::sleep(Duration::from_millis(350));
    prog.send("quit");
    let (status, out) = prog.finish();
    assert!(status.success(), "{out}");
    let last = out.lines().last().unwrap();
    assert!(last.ends_with("ticks, 3 generations"), "{out}");
    let ticks: u64 = last.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(ticks > 0, "the timer never fired: {out}");
}

#[test]
fn cached_secret_hot_path_rebuilds_and_acks() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let prog = Prog::start(&example("cached_secret"), &["2", "20"], dir.path());
    prog.expect("cached_secret: ready generation 0");
    d.wait_watchers_registered(1);
    for _ in 0..2 {
        let g = bump(&d);
        prog.expect(&format!("cached_secret: rebuilt secret for {g}"));
        prog.expect(&format!("cached_secret: acked {g}"));
        // Its watcher is tracked: the barrier passes once the hot path acked.
        let wait = d.ctl(&["wait-watchers", "--timeout-ms", "5000"]);
        assert!(wait.status.success(), "{wait:?}");
    }
    let (status, out) = prog.finish();
    assert!(status.success(), "{out}");
    let line = out.lines().find(|l| l.contains("ns/call")).unwrap();
    eprintln!("{line}");
}

#[test]
fn orchestrator_waits_for_a_slow_watcher() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    // A watchdog that takes 1 s to rebuild.
    let slow = Prog::start(&example("watchdog"), &["1", "1000"], dir.path());
    let orch = Prog::start(&example("orchestrator"), &["1"], dir.path());
    slow.expect("watchdog: ready");
    orch.expect("orchestrator: ready");
    d.wait_watchers_registered(2);
    let g = bump(&d);
    orch.expect(&format!("orchestrator: generation {g}: pausing service"));
    orch.expect(&format!("orchestrator: acked {g}, waiting up to 5000 ms"));
    let done = orch.expect(&format!("orchestrator: all watchers caught up with {g}"));
    // The daemon answers the watchdog's ack before it releases the
    // orchestrator, but the two processes print in whatever order they are
    // scheduled: the watchdog's line may trail by a moment. That the
    // orchestrator really waited is the timing check below.
    slow.expect(&format!("watchdog: acked {g}"));
    let waited = after_ms(&done);
    assert!(
        (700..5000).contains(&waited),
        "waited {waited} ms for a 1000 ms rebuild"
    );
    let (status, out) = orch.finish();
    assert!(status.success(), "{out}");
    assert!(slow.finish().0.success());
}

#[test]
fn orchestrator_times_out_on_a_stuck_watcher() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let _stuck = d.watcher(); // never acknowledges
    let orch = Prog::start(&example("orchestrator"), &["1"], dir.path());
    orch.expect("orchestrator: ready");
    d.wait_watchers_registered(2);
    let g = bump(&d);
    orch.expect(&format!("orchestrator: acked {g}, waiting up to 5000 ms"));
    let (status, out) = orch.finish();
    assert_eq!(status.code(), Some(3), "{out}");
    let line = out
        .lines()
        .find(|l| l.contains("timed out (-ETIMEDOUT)"))
        .unwrap_or_else(|| panic!("no timeout line:\n{out}"));
    assert!(
        line.contains(": 1 tracked watchers still outdated"),
        "{line}"
    );
    let waited = after_ms(line);
    assert!(
        (4900..8000).contains(&waited),
        "timed out after {waited} ms, want 5000"
    );
}

#[test]
fn orchestrator_is_interrupted_by_a_new_change_mid_wait() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut other = d.watcher();
    let orch = Prog::start(&example("orchestrator"), &["1"], dir.path());
    orch.expect("orchestrator: ready");
    d.wait_watchers_registered(2);
    let g1 = bump(&d);
    orch.expect(&format!("orchestrator: acked {g1}, waiting up to 5000 ms"));
    // `other` has not caught up; a second restore lands during the wait.
    let g2 = bump(&d);
    orch.expect("orchestrator: interrupted (-EINTR): a newer generation arrived during the wait");
    orch.expect(&format!(
        "orchestrator: generation {g2}: service still paused"
    ));
    orch.expect(&format!("orchestrator: acked {g2}, waiting up to 5000 ms"));
    assert_eq!(other.read().unwrap(), g2);
    other.ack(g2).unwrap();
    orch.expect(&format!("orchestrator: all watchers caught up with {g2}"));
    let (status, out) = orch.finish();
    assert!(status.success(), "{out}");
    assert!(!out.contains("timed out"), "{out}");
}

#[test]
fn awslc_access_pattern_across_bumps_and_restarts() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let page = dir.path().join("generation");
    let exe = test_program("awslc_pattern", Link::Shared);
    // Start at a generation AWS-LC would see as "changed" later on.
    let start = bump(&d);
    let prog = Prog::start(
        &exe,
        &[page.to_str().unwrap(), &(start + 4).to_string(), "20"],
        dir.path(),
    );
    prog.expect(&format!("awslc: generation {start} probe {start}"));
    let g = bump(&d);
    prog.expect(&format!("awslc: generation {g} probe {g}"));
    d.signal_and_wait(libc::SIGTERM);
    d.restart();
    let g = bump(&d);
    prog.expect(&format!("awslc: generation {g} probe {g}"));
    d.kill9();
    d.restart();
    let g = bump(&d);
    prog.expect(&format!("awslc: generation {g} probe {g}"));
    let g = bump(&d);
    assert_eq!(g, start + 4);
    let (status, out) = prog.finish();
    assert!(status.success(), "{out}");
    // Every value was seen, in order, and the two mappings always agreed.
    let seen: Vec<&str> = out.lines().collect();
    assert_eq!(seen.len(), 5, "{out}");
}
