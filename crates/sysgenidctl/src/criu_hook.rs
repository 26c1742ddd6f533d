//! `sysgenidctl criu-hook`: CRIU's action script for containers that run
//! their own sysgenidd (`docs/containers.md`).
//!
//! CRIU runs the script on the host. The container's daemon judges every
//! privileged request by its sender as the kernel recorded it, and a
//! sender outside the daemon's pid namespace arrives as pid 0 and is
//! refused. So the hook enters the container's user namespace (when it has
//! one of its own, becoming its root) and its pid namespace, and, because
//! entering a pid namespace only places the caller's *children* in it,
//! runs itself again (`criu-hook --inside STEP`) as a child, which then
//! talks to the daemon through the container's root, `/proc/PID/root`.
//! The daemon then sees what it sees of a privileged local orchestrator.
//!
//! The pure part (actions, settings) is `sysgenidctl::criu`.

use std::io::ErrorKind;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use rustix::fs::{Mode, OFlags};
use rustix::thread::LinkNameSpaceType;
use sysgenid::{BumpDetails, ChangeKind, Control, Error};
use sysgenidctl::criu::{plan, Plan, Settings};

/// How long the detached thaw waits for CRIU to let the container run (or
/// end) before it gives up; the daemon's own freeze bound covers the rest.
const THAW_DEADLINE: Duration = Duration::from_secs(120);
/// How long a restore report may take.
const RESTORE_DEADLINE: Duration = Duration::from_secs(30);
/// Where the hook notes, on the host, which CRIU process is dumping which
/// container (see [`DumpMark`]).
const MARK_DIR: &str = "/run/sysgenid-criu";

fn say(action: &str, message: impl std::fmt::Display) {
    eprintln!("sysgenid criu-hook: {action}: {message}");
}

/// The exit status of a failed request, as `sysgenidctl`'s (see `--help`).
pub fn exit_code(e: &Error) -> u8 {
    match e {
        Error::TimedOut { .. } | Error::FreezeAborted { .. } => 3,
        Error::PermissionDenied(_) => 4,
        _ => 1,
    }
}

/// The first stage, as CRIU runs it (no arguments, the environment).
pub fn run() -> ExitCode {
    let settings = match Settings::from_env(|k| std::env::var(k).ok()) {
        Ok(Some(settings)) => settings,
        Ok(None) => {
            eprintln!(
                "sysgenidctl criu-hook: CRTOOLS_SCRIPT_ACTION is not set: this is CRIU's action script \
                 (`action-script /usr/libexec/sysgenid/criu-action` in a CRIU configuration file), not a command to run by hand"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("sysgenidctl criu-hook: {e}; nothing was done");
            return ExitCode::from(2);
        }
    };
    let action = settings.action.as_str();
    let Some(init_pid) = settings.init_pid else {
        // pre-restore: no container yet, and nothing to do.
        return ExitCode::SUCCESS;
    };
    let mark = DumpMark::new(init_pid);
    let dumping = mark.as_ref().is_some_and(DumpMark::exists);
    let plan = plan(action, dumping);
    if plan == Plan::Nothing {
        return ExitCode::SUCCESS;
    }
    let dir = settings.host_runtime_dir(init_pid);
    let socket = dir.join(sysgenid_proto::SOCKET_NAME);
    if std::fs::symlink_metadata(&socket).is_err() {
        // Not a sysgenid container: configured globally, the hook must
        // never get in the way.
        say(
            action,
            format!(
                "no sysgenid daemon in container {init_pid} (no {} inside it): nothing to do",
                settings
                    .runtime_dir
                    .join(sysgenid_proto::SOCKET_NAME)
                    .display()
            ),
        );
        return ExitCode::SUCCESS;
    }
    match (plan, &mark) {
        (Plan::Freeze, Some(mark)) => mark.create(action),
        (Plan::Thaw, Some(mark)) => mark.remove(),
        _ => {}
    }
    let failed = |what: String, code: u8| -> ExitCode {
        if settings.strict && plan != Plan::Thaw {
            say(action, &what);
            return ExitCode::from(code);
        }
        let why = if plan == Plan::Thaw {
            "a thaw never fails the checkpoint: the daemon thaws by itself at its --max-frozen-ms bound"
        } else {
            "SYSGENID_CRIU_STRICT=0"
        };
        say(action, format!("{what}; going on ({why})"));
        ExitCode::SUCCESS
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return failed(format!("cannot find this program: {e}"), 1),
    };
    if let Err(e) = enter_namespaces(init_pid) {
        return failed(
            format!("cannot enter the namespaces of container {init_pid}: {e}"),
            1,
        );
    }
    let (step, deadline) = match plan {
        Plan::Freeze => ("freeze", settings.freeze_timeout + Duration::from_secs(5)),
        Plan::Thaw => ("thaw", THAW_DEADLINE),
        Plan::Restore => ("restore", RESTORE_DEADLINE),
        Plan::Nothing => unreachable!(),
    };
    let mut child = Command::new(&exe);
    child
        .arg("--runtime-dir")
        .arg(&dir)
        .args(["criu-hook", "--inside", step, "--action", action])
        .arg("--timeout-ms")
        .arg(settings.freeze_timeout.as_millis().to_string())
        .arg("--deadline-ms")
        .arg(deadline.as_millis().to_string())
        .stdin(Stdio::null());
    let mut child = match child.spawn() {
        Ok(child) => child,
        Err(e) => return failed(format!("cannot run {}: {e}", exe.display()), 1),
    };
    if plan == Plan::Thaw {
        // CRIU holds the container's tasks frozen until this script has
        // exited: the daemon answers once they run again (or they end).
        // The child waits for that on its own; reaped by whoever adopts it.
        say(
            action,
            format!("thaw sent for when CRIU lets container {init_pid} run again (pid {} waits for the answer)", child.id()),
        );
        return ExitCode::SUCCESS;
    }
    match child.wait() {
        Ok(status) if status.success() => ExitCode::SUCCESS,
        Ok(status) => {
            let code = status.code().unwrap_or(1).clamp(1, 255) as u8;
            failed(format!("{step} failed (exit {code})"), code)
        }
        Err(e) => failed(format!("waiting for the {step}: {e}"), 1),
    }
}

/// Enters the container's user namespace (when it is not ours), as its
/// root, then its pid namespace (for the children made from now on).
fn enter_namespaces(init_pid: i32) -> std::io::Result<()> {
    let open = |kind: &str| -> std::io::Result<OwnedFd> {
        let path = format!("/proc/{init_pid}/ns/{kind}");
        rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| std::io::Error::new(e.kind(), format!("opening {path}: {e}")))
    };
    let same = |kind: &str| -> bool {
        let theirs = std::fs::metadata(format!("/proc/{init_pid}/ns/{kind}"));
        let ours = std::fs::metadata(format!("/proc/self/ns/{kind}"));
        use std::os::unix::fs::MetadataExt;
        matches!((theirs, ours), (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino())
    };
    // Both opened before either is entered: once in the container's user
    // namespace, its /proc may no longer be ours to read.
    let user = (!same("user")).then(|| open("user")).transpose()?;
    let pid = (!same("pid")).then(|| open("pid")).transpose()?;
    if let Some(user) = user {
        rustix::thread::move_into_link_name_space(
            rustix::fd::AsFd::as_fd(&user),
            Some(LinkNameSpaceType::User),
        )
        .map_err(|e| std::io::Error::new(e.kind(), format!("entering its user namespace: {e}")))?;
        // Its root: this process is single-threaded, so the thread's ids
        // are the process's, and the child inherits them.
        let root_gid = rustix::process::Gid::ROOT;
        let root_uid = rustix::process::Uid::ROOT;
        let _ = rustix::thread::set_thread_groups(&[]);
        rustix::thread::set_thread_res_gid(root_gid, root_gid, root_gid)
            .and_then(|()| rustix::thread::set_thread_res_uid(root_uid, root_uid, root_uid))
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("becoming root of its user namespace: {e}"),
                )
            })?;
    }
    if let Some(pid) = pid {
        rustix::thread::move_into_link_name_space(
            rustix::fd::AsFd::as_fd(&pid),
            Some(LinkNameSpaceType::ProcessID),
        )
        .map_err(|e| std::io::Error::new(e.kind(), format!("entering its pid namespace: {e}")))?;
    }
    Ok(())
}

/// "This CRIU process is dumping this container": made at `pre-dump`,
/// removed at the thaw. CRIU runs `network-unlock` in a restore too, where
/// a thaw would let the clone's participants run before they renewed; a
/// dump's `network-unlock` (after a failed dump) finds its mark. Named by
/// the CRIU process (with its start time, so a reused pid never matches)
/// and the container's init pid.
struct DumpMark {
    path: PathBuf,
}

/// The CRIU process running this script: named in `CRTOOLS_IMAGE_DIR`
/// (`/proc/PID/fd/N`, CRIU's descriptor of the images directory), so that
/// a wrapper script between CRIU and the hook changes nothing; else the
/// parent.
fn criu_pid() -> Option<i32> {
    std::env::var("CRTOOLS_IMAGE_DIR")
        .ok()
        .and_then(|dir| {
            dir.strip_prefix("/proc/")?
                .split('/')
                .next()?
                .parse::<i32>()
                .ok()
        })
        .or_else(|| Some(rustix::process::getppid()?.as_raw_nonzero().get()))
}

impl DumpMark {
    fn new(init_pid: i32) -> Option<DumpMark> {
        let criu = criu_pid()?;
        let start = start_time(criu)?;
        Some(DumpMark {
            path: Path::new(MARK_DIR).join(format!("dump-{criu}-{start}-{init_pid}")),
        })
    }

    fn exists(&self) -> bool {
        self.path.exists()
    }

    fn create(&self, action: &str) {
        let made = std::fs::DirBuilder::new()
            .mode(0o700)
            .create(MARK_DIR)
            .or_else(|e| match e.kind() {
                ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })
            .and_then(|()| std::fs::write(&self.path, b""));
        if let Err(e) = made {
            say(
                action,
                format!(
                    "cannot write {}: {e}; a failed dump will not thaw here (the daemon's --max-frozen-ms will)",
                    self.path.display()
                ),
            );
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A process's start time (`/proc/PID/stat` field 22).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The second stage, in the container's pid namespace: one request to
/// the daemon. A watchdog ends it at `deadline`.
pub fn inside(
    step: &str,
    action: &str,
    dir: &Path,
    timeout: Duration,
    deadline: Duration,
) -> ExitCode {
    let action = action.to_string();
    let watchdog_action = action.clone();
    let watchdog_step = step.to_string();
    let _ = std::thread::Builder::new()
        .name("deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline);
            say(
                &watchdog_action,
                format!(
                    "{watchdog_step}: no answer from the container's sysgenidd within {} ms; giving up",
                    deadline.as_millis()
                ),
            );
            std::process::exit(1);
        });
    let started = Instant::now();
    let mut control = match Control::connect(Some(dir)) {
        Ok(control) => control,
        Err(Error::NotRunning { source, .. })
            if matches!(
                source.kind(),
                ErrorKind::ConnectionRefused | ErrorKind::NotFound
            ) =>
        {
            say(
                &action,
                format!("no sysgenid daemon answers in the container ({source}): nothing to do"),
            );
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            say(&action, format!("{step}: {e}"));
            return ExitCode::from(exit_code(&e));
        }
    };
    let result = match step {
        "freeze" => control.freeze(Some(timeout)).map(|_| {
            format!(
                "froze every participant in {} ms",
                started.elapsed().as_millis()
            )
        }),
        "thaw" => control.thaw().map(|_| "thawed".to_string()),
        "restore" => report_restore(&mut control).map(|generation| {
            format!(
                "restored: generation {generation} published in {} ms",
                started.elapsed().as_millis()
            )
        }),
        other => {
            say(&action, format!("unknown step {other:?}"));
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(done) => {
            say(&action, done);
            // CRIU seizes the container's tasks right after pre-dump: the
            // daemon's end of this connection, made outside the container,
            // must be gone by then or the dump fails on it (and so for the
            // next checkpoint after a thaw or a restore).
            if !control.close_and_wait(Duration::from_secs(5)) {
                say(
                    &action,
                    "the daemon did not close its end of the hook's connection within 5 s; a dump now may fail on it",
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            say(&action, format!("{step} failed: {e}"));
            if step == "freeze" {
                // A failed freeze must never leave anything frozen (one that
                // timed out was aborted and thawed by the daemon already).
                if let Err(thaw) = control.thaw() {
                    say(&action, format!("thaw after the failed freeze: {thaw}"));
                }
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Reports a restore by CRIU to the container's daemon: a new generation
/// of kind `restore`, so the copy's watchers renew (each daemon draws its
/// own epoch, so clones get distinct ones). The hook cannot tell a clone
/// (`restore --import` under a new name) from a restore in place: CRIU
/// says neither, so it reports what both are, a restore.
///
/// ADAPTATION POINT: the Bump request carries no source; the daemon
/// records it as `manual`. Once it can carry one, this names `criu`.
fn report_restore(control: &mut Control) -> Result<u32, Error> {
    control.bump_with(
        0,
        false,
        BumpDetails {
            kind: ChangeKind::Restore,
            entropy: None,
            hostname: None,
        },
    )
}
