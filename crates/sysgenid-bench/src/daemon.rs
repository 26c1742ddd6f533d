//! The `sysgenidd` under test: started from the same target directory on
//! a private runtime directory on tmpfs, stopped with SIGTERM.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub(crate) struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    pub(crate) fn start(
        bin: &Path,
        parent: &Path,
        extra: &[String],
        device: bool,
    ) -> Result<(Daemon, Duration), String> {
        let dir = tempfile::Builder::new()
            .prefix("sysgenid-bench-")
            .tempdir_in(parent)
            .map_err(|e| format!("temp dir in {}: {e}", parent.display()))?;
        let log = File::create(dir.path().with_extension("log")).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let mut cmd = Command::new(bin);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl(2), which is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        // The flags whose defaults follow the machine (restore sources, the
        // device's and the lifecycle's group, the hooks directory), unless
        // given in `extra`, and none of the caller's environment but PATH:
        // a benchmark measures this daemon, not the machine's settings.
        let given = |flag: &str| {
            extra
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        for (flag, value) in [
            ("--source", "none"),
            ("--device-group", "none"),
            ("--hooks-dir", "off"),
            ("--lifecycle-group", "none"),
        ] {
            if !given(flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let child = cmd
            .arg("--runtime-dir")
            .arg(dir.path())
            .arg("--device")
            .arg(if device {
                dir.path().with_extension("dev").into_os_string()
            } else {
                "off".into()
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let mut d = Daemon { child, dir };
        loop {
            if sysgenid::Control::connect(Some(d.dir.path())).is_ok() {
                break;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(format!(
                    "sysgenidd exited ({status}): {}",
                    std::fs::read_to_string(d.dir.path().with_extension("log")).unwrap_or_default()
                ));
            }
            if start.elapsed() > Duration::from_secs(20) {
                return Err("sysgenidd did not become ready in 20 s".into());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let ready = start.elapsed();
        Ok((d, ready))
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn control(&self) -> sysgenid::Control {
        sysgenid::Control::connect(Some(self.dir())).expect("control connection")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM first: the daemon then unmounts its device and removes its
        // socket; SIGKILL only if it does not stop within 2 s.
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.path().with_extension("log"));
        let _ = std::fs::remove_file(self.dir.path().with_extension("dev"));
    }
}

/// Waits until the daemon has closed every watcher of earlier groups (their
/// descriptors count against its limit).
pub(crate) fn wait_no_watchers(control: &mut sysgenid::Control) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let status = control.status().map_err(|e| format!("status: {e}"))?;
        if status.watchers == 0 {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("the daemon still has {} watchers", status.watchers));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
