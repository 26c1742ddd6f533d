//! The hooks directory: programs the administrator drops into
//! `/etc/sysgenid/hooks.d` (`--hooks-dir`) that run on every lifecycle
//! event, for software that will never link a client library.
//!
//! Every executable regular file in the directory, in name order, runs as
//! `HOOK freeze`, `HOOK thaw` or `HOOK change` with `SYSGENID_GENERATION`,
//! `SYSGENID_EPOCH` (and `SYSGENID_EVENT`) in its environment, and for a
//! change also `SYSGENID_KIND` (`clone`, `restore` or `unknown`) and, when
//! the change carried one, `SYSGENID_HOSTNAME`; one at a time,
//! each bounded by a timeout after which its process group is killed. The
//! directory is read again for every event, so hooks can be added and removed
//! while the daemon runs.
//!
//! Hooks run as root, so a file anyone but root (or the daemon's own user)
//! could have written, a directory others can write into, a directory that
//! others could swap for another (an ancestor they own or can write
//! without the sticky bit, or the directory replaced by a symlink), or a
//! symlink that leads through a directory others can write is refused and
//! logged, never run. A symlink out of the directory is how a shipped hook
//! (`/usr/share/sysgenid/hooks/NAME`, see `sysgenidctl hooks enable`) is
//! turned on: it runs when every directory down to its target is root's
//! alone (not even a sticky shared directory such as `/tmp` will do), and
//! it is the target's canonical path that runs, so no link on the way can
//! be swapped after the check. A hook whose `change` run fails holds the
//! change unacknowledged (see `event_loop`). Names
//! starting with `.` and package-manager leftovers (`~`, `.dpkg-*`,
//! `.rpm*`) are skipped, as `run-parts` does.
//!
//! The runner is a thread of its own fed through a channel: the event loop
//! only submits a [`Job`] and later receives its [`Finished`] report
//! through the callback given at start, so a hook never blocks the loop.
//! What the loop makes of a report (confirming a freeze, releasing the
//! watchers a change counted) is decided there.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};
use sysgenid_proto::HooksStatus;

/// The directory used unless `--hooks-dir` says otherwise; if it does not
/// exist there are no hooks.
pub const DEFAULT_HOOKS_DIR: &str = "/etc/sysgenid/hooks.d";

/// The default per-hook timeout.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// What `--hooks-dir` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// No hooks.
    Off,
    /// The default directory, if it exists.
    Default,
    /// This directory, which must exist.
    Dir(PathBuf),
}

impl Setting {
    /// Parses `--hooks-dir`: absent → the default, `off`, or a path.
    pub fn parse(arg: Option<&str>) -> Setting {
        match arg {
            None => Setting::Default,
            Some("off") => Setting::Off,
            Some(path) => Setting::Dir(path.into()),
        }
    }
}

/// Why the hooks could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    /// An explicitly named directory is missing or unreadable.
    #[error("hooks directory {}: {source}. Create it, or pass --hooks-dir off", dir.display())]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The runner thread could not start.
    #[error("cannot start the hooks runner: {0}")]
    Thread(std::io::Error),
}

/// The event hooks are run for; its name is the hook's argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEvent {
    /// Quiesce: the freeze completes once every hook exited.
    Freeze {
        /// The freeze number.
        freeze: u32,
    },
    /// Resume.
    Thaw,
    /// The generation changed: renew.
    Change,
}

impl HookEvent {
    /// `freeze`, `thaw` or `change`.
    pub fn name(self) -> &'static str {
        match self {
            HookEvent::Freeze { .. } => "freeze",
            HookEvent::Thaw => "thaw",
            HookEvent::Change => "change",
        }
    }
}

/// One event to run every hook for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// The loop's number for this job, echoed in [`Finished`].
    pub ticket: u64,
    /// The event.
    pub event: HookEvent,
    /// `SYSGENID_GENERATION`.
    pub generation: u32,
    /// `SYSGENID_EPOCH`, 32 hex digits.
    pub epoch: String,
    /// `SYSGENID_KIND` (for `change`): the kind of the last change.
    pub kind: sysgenid_proto::ChangeKind,
    /// `SYSGENID_HOSTNAME` (for `change`), when the change carried one.
    pub hostname: Option<String>,
}

/// How one hook ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exited 0.
    Succeeded,
    /// Exited non-zero or was killed by a signal.
    Failed(String),
    /// Still running at the timeout; its process group was killed.
    TimedOut,
    /// Could not be started.
    NotStarted(String),
    /// Refused as unsafe; not run.
    Refused(String),
}

/// The result of one hook for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookResult {
    /// The file name in the directory.
    pub name: String,
    /// How it ended.
    pub outcome: Outcome,
}

/// A job whose every hook has exited (or was refused, or timed out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    /// The job.
    pub job: Job,
    /// One entry per file considered, in name order.
    pub results: Vec<HookResult>,
    /// A problem with the directory itself (unreadable, unsafe).
    pub dir_problem: Option<String>,
}

impl Finished {
    /// The hooks that ran and failed, timed out or could not start, each
    /// with why: for a `change`, those holding it unacknowledged.
    pub fn failed(&self) -> Vec<String> {
        self.results
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Failed(why) | Outcome::NotStarted(why) => {
                    Some(format!("{} ({why})", r.name))
                }
                Outcome::TimedOut => Some(format!("{} (timed out and killed)", r.name)),
                Outcome::Succeeded | Outcome::Refused(_) => None,
            })
            .collect()
    }
}

/// The loop's handle on the runner.
pub struct Hooks {
    dir: PathBuf,
    tx: Sender<Job>,
    /// Hooks found at the latest scan (refused files not counted).
    known: Arc<AtomicU32>,
    status: HooksStatus,
}

impl Hooks {
    /// Starts the runner for `setting`; `Ok(None)` when hooks are off or the
    /// default directory does not exist. `finished` is called on the
    /// runner's thread after each job.
    pub fn start(
        setting: &Setting,
        timeout: Duration,
        finished: impl FnMut(Finished) + Send + 'static,
    ) -> Result<Option<Hooks>, HooksError> {
        let dir = match setting {
            Setting::Off => return Ok(None),
            Setting::Default if !Path::new(DEFAULT_HOOKS_DIR).exists() => {
                tracing::info!("no hooks: {DEFAULT_HOOKS_DIR} does not exist");
                return Ok(None);
            }
            Setting::Default => PathBuf::from(DEFAULT_HOOKS_DIR),
            Setting::Dir(dir) => dir.clone(),
        };
        let dir = std::fs::canonicalize(&dir)
            .and_then(|d| std::fs::read_dir(&d).map(|_| d))
            .map_err(|source| HooksError::Dir {
                dir: dir.clone(),
                source,
            })?;
        let known = Arc::new(AtomicU32::new(scan(&dir).0.len() as u32));
        let (tx, rx) = std::sync::mpsc::channel();
        let runner = Runner {
            dir: dir.clone(),
            timeout,
            known: known.clone(),
        };
        std::thread::Builder::new()
            .name("hooks".into())
            .spawn(move || runner.run(rx, finished))
            .map_err(HooksError::Thread)?;
        let status = HooksStatus {
            dir: dir.display().to_string(),
            hooks: known.load(Ordering::Relaxed),
            ..HooksStatus::default()
        };
        Ok(Some(Hooks {
            dir,
            tx,
            known,
            status,
        }))
    }

    /// The directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Queues a job; jobs run one after the other, in order.
    pub fn submit(&self, job: Job) {
        if self.tx.send(job).is_err() {
            tracing::error!("the hooks runner has stopped; hooks will not run");
        }
    }

    /// Hooks found at the latest scan.
    pub fn known(&self) -> u32 {
        self.known.load(Ordering::Relaxed)
    }

    /// Reads the directory now and returns how many hooks it holds: what a
    /// change counts as tracked watchers until its run finishes. Counted
    /// at the change, not taken from the previous event's scan, so that a
    /// hook enabled since (`sysgenidctl hooks enable`) is waited for by
    /// the very next change. A directory read and a few `stat`s.
    pub fn rescan(&self) -> u32 {
        let n = scan(&self.dir).0.len() as u32;
        self.known.store(n, Ordering::Relaxed);
        n
    }

    /// Takes a finished job into the status counters. After a `change`
    /// run, the hooks that failed (or timed out) are the ones now holding
    /// the change unacknowledged, until the next change's run.
    pub fn record(&mut self, finished: &Finished) {
        let s = &mut self.status;
        s.hooks = self.known.load(Ordering::Relaxed);
        if let Some(problem) = &finished.dir_problem {
            s.last_problem = Some(problem.clone());
        }
        if finished.job.event == HookEvent::Change {
            s.holding = finished.failed();
        }
        for r in &finished.results {
            let problem = match &r.outcome {
                Outcome::Succeeded => {
                    s.runs += 1;
                    None
                }
                Outcome::Failed(why) | Outcome::NotStarted(why) => {
                    s.runs += 1;
                    s.failures += 1;
                    Some(format!("{} {}: {why}", r.name, finished.job.event.name()))
                }
                Outcome::TimedOut => {
                    s.runs += 1;
                    s.timeouts += 1;
                    Some(format!(
                        "{} {}: timed out and killed",
                        r.name,
                        finished.job.event.name()
                    ))
                }
                Outcome::Refused(why) => {
                    s.refused += 1;
                    Some(format!("{} refused: {why}", r.name))
                }
            };
            if problem.is_some() {
                s.last_problem = problem;
            }
        }
    }

    /// For status.
    pub fn status(&self) -> HooksStatus {
        self.status.clone()
    }
}

struct Runner {
    dir: PathBuf,
    timeout: Duration,
    known: Arc<AtomicU32>,
}

impl Runner {
    fn run(self, jobs: Receiver<Job>, mut finished: impl FnMut(Finished)) {
        for job in jobs {
            let (hooks, mut results, dir_problem) = scan(&self.dir);
            self.known.store(hooks.len() as u32, Ordering::Relaxed);
            if let Some(problem) = &dir_problem {
                tracing::warn!("hooks: {problem}");
            }
            for r in &results {
                if let Outcome::Refused(why) = &r.outcome {
                    tracing::warn!(hook = r.name, "hook refused, not run: {why}");
                }
            }
            for (name, path) in hooks {
                let outcome = self.run_one(&path, &job);
                match &outcome {
                    Outcome::Succeeded => {
                        tracing::info!(hook = name, event = job.event.name(), "hook succeeded")
                    }
                    Outcome::TimedOut => tracing::warn!(
                        hook = name,
                        event = job.event.name(),
                        "hook still running after {} ms: killed",
                        self.timeout.as_millis()
                    ),
                    Outcome::Failed(why) | Outcome::NotStarted(why) => {
                        tracing::warn!(hook = name, event = job.event.name(), "hook failed: {why}")
                    }
                    Outcome::Refused(_) => {}
                }
                results.push(HookResult { name, outcome });
            }
            results.sort_by(|a, b| a.name.cmp(&b.name));
            finished(Finished {
                job,
                results,
                dir_problem,
            });
        }
    }

    fn run_one(&self, path: &Path, job: &Job) -> Outcome {
        // A hook's output goes to the daemon's log (stderr).
        let stdout = match std::io::stderr().as_fd().try_clone_to_owned() {
            Ok(fd) => std::process::Stdio::from(fd),
            Err(_) => std::process::Stdio::null(),
        };
        let mut command = std::process::Command::new(path);
        if job.event == HookEvent::Change {
            command.env("SYSGENID_KIND", job.kind.name());
            match &job.hostname {
                Some(name) => command.env("SYSGENID_HOSTNAME", name),
                None => command.env_remove("SYSGENID_HOSTNAME"),
            };
        }
        let mut child = match command
            .arg(job.event.name())
            .env("SYSGENID_EVENT", job.event.name())
            .env("SYSGENID_GENERATION", job.generation.to_string())
            .env("SYSGENID_EPOCH", &job.epoch)
            // The service manager's channel is the daemon's alone: a hook
            // must not be able to report readiness or feed the watchdog.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(stdout)
            .process_group(0)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => return Outcome::NotStarted(e.to_string()),
        };
        let pid = rustix::process::Pid::from_child(&child);
        let exited = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(pidfd) => wait_readable(&pidfd, self.timeout),
            // No pidfd (very old kernel): poll the child instead.
            Err(_) => poll_exit(&mut child, self.timeout),
        };
        if !exited {
            // The whole group: a hook's own children must not outlive it.
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            let _ = child.wait();
            return Outcome::TimedOut;
        }
        match child.wait() {
            Ok(status) if status.success() => Outcome::Succeeded,
            Ok(status) => Outcome::Failed(status.to_string()),
            Err(e) => Outcome::Failed(e.to_string()),
        }
    }
}

/// Waits until the pidfd is readable (the process exited) or `timeout`.
fn wait_readable(pidfd: &std::os::fd::OwnedFd, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ts = rustix::time::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&ts)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

fn poll_exit(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Names `run-parts` skips: hidden files and package-manager leftovers.
fn skipped_name(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with('~')
        || [".dpkg-old", ".dpkg-new", ".dpkg-dist", ".dpkg-tmp"]
            .iter()
            .any(|s| name.ends_with(s))
        || [".rpmsave", ".rpmnew", ".rpmorig"]
            .iter()
            .any(|s| name.ends_with(s))
}

/// Who may own (and so write) a hook: root and the daemon's own user.
fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

/// Why `meta` (a file or the directory) could have been written by someone
/// untrusted, if it could.
fn unsafe_because(meta: &std::fs::Metadata) -> Option<String> {
    let mode = meta.permissions().mode();
    if !trusted_owner(meta.uid()) {
        return Some(format!("owned by uid {}, not root", meta.uid()));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "writable by {} (mode {:o})",
            if mode & 0o002 != 0 {
                "everyone"
            } else {
                "its group"
            },
            mode & 0o7777
        ));
    }
    None
}

/// Why someone untrusted could put another directory at `dir`'s path, if
/// they could: `dir` (canonical at start) is now a symlink, or one of its
/// ancestors is owned by someone untrusted or writable by its group or
/// others without the sticky bit (whoever can write a directory can rename
/// its entries, and so swap the hooks directory for a link to any
/// directory of root's, whose programs would then run as hooks).
fn path_unsafe_because(dir: &Path) -> Option<String> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_dir() => {}
        Ok(_) => return Some("no longer a directory (it was replaced by a link)".to_string()),
        Err(e) => return Some(format!("unreadable: {e}")),
    }
    for ancestor in dir.ancestors().skip(1) {
        let meta = match std::fs::symlink_metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) => return Some(format!("under {}, unreadable: {e}", ancestor.display())),
        };
        let mode = meta.permissions().mode();
        let why = if meta.file_type().is_symlink() {
            Some("a symlink".to_string())
        } else if !trusted_owner(meta.uid()) {
            Some(format!("owned by uid {}, not root", meta.uid()))
        } else if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            Some(format!(
                "writable by others without the sticky bit (mode {:o})",
                mode & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Some(format!("under {}, which is {why}", ancestor.display()));
        }
    }
    None
}

/// Why a hook linked from outside the hooks directory (a shipped hook in
/// `/usr/share/sysgenid/hooks`, enabled by a symlink) could have been
/// written or swapped by someone untrusted, if it could: every directory
/// from the root down to the (canonical) target must be owned by root (or
/// the daemon's user) and writable by no one else, the sticky bit not
/// excepted (a program root keeps in a shared directory such as `/tmp` is
/// not one it installed). The file itself is checked like any hook.
fn outside_target_unsafe_because(target: &Path) -> Option<String> {
    for ancestor in target.ancestors().skip(1) {
        let meta = match std::fs::metadata(ancestor) {
            Ok(meta) => meta,
            Err(e) => return Some(format!("under {}, unreadable: {e}", ancestor.display())),
        };
        if let Some(why) = unsafe_because(&meta) {
            return Some(format!("under {}, which is {why}", ancestor.display()));
        }
    }
    None
}

/// The hooks to run, in name order, plus one result per refused file and
/// a problem with the directory itself (then nothing runs).
fn scan(dir: &Path) -> (Vec<(String, PathBuf)>, Vec<HookResult>, Option<String>) {
    let mut refused = Vec::new();
    if let Some(why) = path_unsafe_because(dir) {
        return (
            Vec::new(),
            refused,
            Some(format!(
                "the directory {} is {why}: no hook runs",
                dir.display()
            )),
        );
    }
    match std::fs::metadata(dir) {
        Ok(meta) => {
            if let Some(why) = unsafe_because(&meta) {
                return (
                    Vec::new(),
                    refused,
                    Some(format!(
                        "the directory {} is {why}: no hook runs",
                        dir.display()
                    )),
                );
            }
        }
        Err(e) => {
            return (
                Vec::new(),
                refused,
                Some(format!("cannot read {}: {e}", dir.display())),
            )
        }
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            return (
                Vec::new(),
                refused,
                Some(format!("cannot read {}: {e}", dir.display())),
            )
        }
    };
    let mut names: Vec<OsString> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    let mut hooks = Vec::new();
    for name in names {
        let Some(text) = name.to_str().map(str::to_string) else {
            continue;
        };
        if skipped_name(&text) {
            continue;
        }
        let path = dir.join(&name);
        let Ok(link_meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let (path, meta) = if link_meta.file_type().is_symlink() {
            // A dangling link is not a hook.
            let Ok(target) = std::fs::canonicalize(&path) else {
                continue;
            };
            // The canonical path is what runs, so no link along the way
            // can be swapped after this check; what must be safe is every
            // directory on that path.
            let why = if target.starts_with(dir) {
                // The directories between the hooks directory and the
                // target must be as safe as the directory itself.
                target
                    .ancestors()
                    .skip(1)
                    .take_while(|a| *a != dir)
                    .find_map(|a| {
                        std::fs::metadata(a)
                            .ok()
                            .and_then(|m| unsafe_because(&m))
                            .map(|why| {
                                format!(
                                    "a symlink into an unsafe directory: {} ({why})",
                                    a.display()
                                )
                            })
                    })
            } else {
                outside_target_unsafe_because(&target).map(|why| {
                    format!(
                        "a symlink out of the directory (to {}), {why}",
                        target.display()
                    )
                })
            };
            if let Some(why) = why {
                refused.push(HookResult {
                    name: text,
                    outcome: Outcome::Refused(why),
                });
                continue;
            }
            match std::fs::metadata(&target) {
                Ok(meta) => (target, meta),
                Err(_) => continue,
            }
        } else {
            (path, link_meta)
        };
        if !meta.file_type().is_file() || meta.permissions().mode() & 0o111 == 0 {
            continue;
        }
        if let Some(why) = unsafe_because(&meta) {
            refused.push(HookResult {
                name: text,
                outcome: Outcome::Refused(why),
            });
            continue;
        }
        hooks.push((text, path));
    }
    (hooks, refused, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn hook(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn private_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn scan_keeps_executables_in_name_order_and_refuses_the_unsafe() {
        let dir = private_dir();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        hook(&d, "20-b", "true", 0o755);
        hook(&d, "10-a", "true", 0o700);
        hook(&d, "30-not-executable", "true", 0o644);
        hook(&d, "40-group-writable", "true", 0o775);
        hook(&d, "50-world-writable", "true", 0o757);
        hook(&d, ".hidden", "true", 0o755);
        hook(&d, "60-old~", "true", 0o755);
        std::fs::create_dir(d.join("70-a-directory")).unwrap();
        symlink(d.join("10-a"), d.join("80-link-inside")).unwrap();
        let outside = private_dir();
        let target = hook(outside.path(), "evil", "true", 0o755);
        symlink(&target, d.join("90-link-outside")).unwrap();
        let (hooks, refused, problem) = scan(&d);
        assert_eq!(problem, None);
        let names: Vec<&str> = hooks.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["10-a", "20-b", "80-link-inside"]);
        let refused: Vec<&str> = refused.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            refused,
            ["40-group-writable", "50-world-writable", "90-link-outside"]
        );
    }

    #[test]
    fn a_link_through_a_subdirectory_others_can_write_is_refused() {
        let dir = private_dir();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        let open = d.join("spool");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let target = hook(&open, "x", "true", 0o755);
        symlink(&target, d.join("10-through-spool")).unwrap();
        let (hooks, refused, problem) = scan(&d);
        assert_eq!(problem, None);
        assert!(hooks.is_empty(), "{hooks:?}");
        assert_eq!(refused.len(), 1);
        assert!(
            matches!(&refused[0].outcome, Outcome::Refused(why) if why.contains("spool")),
            "{refused:?}"
        );
    }

    #[test]
    fn a_link_out_runs_its_target_only_when_every_directory_down_to_it_is_roots_alone() {
        let dir = private_dir();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        // A program root installed (as a shipped hook is, in
        // /usr/share/sysgenid/hooks): every directory on its path is root's.
        let installed = std::fs::canonicalize("/bin/true").unwrap();
        symlink("/bin/true", d.join("10-installed")).unwrap();
        // A root-owned program in a root-owned directory, under the sticky,
        // world-writable /tmp: not one root installed.
        let shared = private_dir();
        let in_tmp = hook(shared.path(), "x", "true", 0o755);
        symlink(&in_tmp, d.join("20-under-tmp")).unwrap();
        // A root-owned directory others may write.
        let open = private_dir();
        let open_target = hook(open.path(), "y", "true", 0o755);
        std::fs::set_permissions(open.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        symlink(&open_target, d.join("30-group-writable-dir")).unwrap();
        let (hooks, refused, problem) = scan(&d);
        assert_eq!(problem, None);
        assert_eq!(hooks, [("10-installed".to_string(), installed)]);
        let refused: Vec<(&str, &Outcome)> = refused
            .iter()
            .map(|r| (r.name.as_str(), &r.outcome))
            .collect();
        assert!(
            matches!(refused[0], ("20-under-tmp", Outcome::Refused(why))
                if why.contains("a symlink out of the directory") && why.contains("writable by everyone")),
            "{refused:?}"
        );
        assert!(
            matches!(refused[1], ("30-group-writable-dir", Outcome::Refused(why))
                if why.contains("writable by its group")),
            "{refused:?}"
        );
        assert_eq!(refused.len(), 2);
    }

    #[test]
    fn a_directory_replaced_by_a_link_runs_nothing() {
        let dir = private_dir();
        let d = std::fs::canonicalize(dir.path()).unwrap();
        let hooks_dir = d.join("hooks.d");
        let other = d.join("other");
        std::fs::create_dir(&hooks_dir).unwrap();
        std::fs::create_dir(&other).unwrap();
        hook(&other, "10-not-a-hook", "true", 0o755);
        assert_eq!(scan(&hooks_dir).2, None);
        std::fs::remove_dir(&hooks_dir).unwrap();
        symlink(&other, &hooks_dir).unwrap();
        let (hooks, _, problem) = scan(&hooks_dir);
        assert!(hooks.is_empty(), "{hooks:?}");
        assert!(problem.unwrap().contains("replaced by a link"));
    }

    #[test]
    fn a_directory_others_can_write_runs_nothing() {
        let dir = private_dir();
        hook(dir.path(), "10-a", "true", 0o755);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let (hooks, _, problem) = scan(dir.path());
        assert!(hooks.is_empty());
        assert!(problem.unwrap().contains("writable by everyone"));
    }

    #[test]
    fn hooks_run_in_order_with_the_environment_and_a_timeout() {
        let dir = private_dir();
        let log = dir.path().join("log");
        let log_s = log.display();
        hook(
            dir.path(),
            "10-first",
            &format!(
                "echo \"first $1 $SYSGENID_GENERATION $SYSGENID_EPOCH $SYSGENID_KIND ${{SYSGENID_HOSTNAME-none}}\" >> {log_s}"
            ),
            0o755,
        );
        hook(dir.path(), "20-fails", "exit 3", 0o755);
        hook(
            dir.path(),
            "30-hangs",
            &format!("echo hang >> {log_s}; sleep 30"),
            0o755,
        );
        hook(
            dir.path(),
            "40-last",
            &format!("echo \"last $1\" >> {log_s}"),
            0o755,
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let hooks = Hooks::start(
            &Setting::Dir(dir.path().into()),
            Duration::from_millis(300),
            move |f| {
                let _ = tx.send(f);
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(hooks.known(), 4);
        hooks.submit(Job {
            ticket: 7,
            event: HookEvent::Change,
            generation: 5,
            epoch: "ab".repeat(16),
            kind: sysgenid_proto::ChangeKind::Clone,
            hostname: Some("web-3".into()),
        });
        let finished = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(finished.job.ticket, 7);
        let outcomes: Vec<(&str, &Outcome)> = finished
            .results
            .iter()
            .map(|r| (r.name.as_str(), &r.outcome))
            .collect();
        assert_eq!(outcomes[0], ("10-first", &Outcome::Succeeded));
        assert!(matches!(outcomes[1], ("20-fails", Outcome::Failed(_))));
        assert_eq!(outcomes[2], ("30-hangs", &Outcome::TimedOut));
        assert_eq!(outcomes[3], ("40-last", &Outcome::Succeeded));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text,
            format!(
                "first change 5 {} clone web-3\nhang\nlast change\n",
                "ab".repeat(16)
            )
        );
        let mut hooks = hooks;
        hooks.record(&finished);
        let s = hooks.status();
        assert_eq!((s.runs, s.failures, s.timeouts, s.refused), (4, 1, 1, 0));
        assert!(s.last_problem.unwrap().contains("30-hangs"));
        assert_eq!(
            s.holding,
            [
                "20-fails (exit status: 3)",
                "30-hangs (timed out and killed)"
            ],
            "the hooks holding the change"
        );
    }

    #[test]
    fn settings_parse_and_a_missing_named_directory_is_an_error() {
        assert_eq!(Setting::parse(None), Setting::Default);
        assert_eq!(Setting::parse(Some("off")), Setting::Off);
        assert!(Hooks::start(&Setting::Off, DEFAULT_HOOK_TIMEOUT, |_| {})
            .unwrap()
            .is_none());
        let err = Hooks::start(
            &Setting::Dir("/nonexistent/hooks.d".into()),
            DEFAULT_HOOK_TIMEOUT,
            |_| {},
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("--hooks-dir off"), "{err}");
    }
}
