//! `sysgenidctl`: the command-line face of the `sysgenid` client library.
//! Every subcommand is a few lines over the library; exit codes are part of
//! the interface (see `--help`).

#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sysgenid::{Control, Error, Event, LifecycleState, Watcher};
use sysgenidctl::cli::{Args, Cmd};

/// Prints one line to stdout. When the reader went away (`sysgenidctl
/// status | head -1`, a closed pipe from `watch`) the program ends quietly
/// with status 0, as it would by SIGPIPE, instead of panicking; a `watch`
/// then has not acknowledged what it could not report.
macro_rules! out {
    ($($arg:tt)*) => {
        print_line(format_args!($($arg)*))
    };
}

fn print_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("sysgenidctl: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match &args.host_channel {
        Some(target) => host_channel(target, &args.command),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sysgenidctl: {e}");
            ExitCode::from(match e {
                Error::TimedOut { .. } | Error::FreezeAborted { .. } => 3,
                Error::PermissionDenied(_) => 4,
                _ => 1,
            })
        }
    }
}

/// A usage error (exit 2), as clap reports its own.
fn usage(message: &str) -> ! {
    use clap::CommandFactory;
    Args::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

/// `--entropy-file`: 32 to 512 bytes from a file or stdin (`-`).
fn read_entropy(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    use sysgenid::host_channel::HOST_MIN_ENTROPY;
    const MAX: usize = 512;
    let mut bytes = Vec::new();
    let limit = MAX as u64 + 1;
    if path == std::path::Path::new("-") {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut bytes)?;
    } else {
        std::fs::File::open(path)
            .map_err(|e| {
                Error::Io(std::io::Error::new(
                    e.kind(),
                    format!("cannot read {}: {e}", path.display()),
                ))
            })?
            .take(limit)
            .read_to_end(&mut bytes)?;
    }
    if !(HOST_MIN_ENTROPY..=MAX).contains(&bytes.len()) {
        return Err(Error::Protocol(format!(
            "{}: {}{} bytes of entropy; it must hold {HOST_MIN_ENTROPY} to {MAX} (nothing was sent)",
            path.display(),
            if bytes.len() > MAX { "more than " } else { "" },
            bytes.len().min(MAX)
        )));
    }
    Ok(bytes)
}

/// `--host-channel TARGET COMMAND`: the same commands, to a guest's daemon.
fn host_channel(target: &sysgenid::host_channel::Target, command: &Cmd) -> Result<(), Error> {
    use sysgenid::host_channel::{HostChannel, RestoreKind};
    // Checked before connecting: bad input never reaches the guest.
    let entropy = match command {
        Cmd::Restored {
            entropy_file: Some(path),
            ..
        } => Some(read_entropy(path)?),
        Cmd::Watch { .. } | Cmd::Bump { .. } => usage(
            "watch and bump are local commands; over --host-channel use restored, freeze, thaw, wait-watchers, status or get",
        ),
        _ => None,
    };
    let mut guest = HostChannel::connect(target)?;
    match command {
        Cmd::Restored {
            clone, hostname, ..
        } => {
            let kind = if *clone {
                RestoreKind::Clone
            } else {
                RestoreKind::Restore
            };
            let restored = guest.restored(kind, entropy.as_deref(), hostname.as_deref())?;
            if let Some(why) = &restored.report.kernel_reseed_error {
                eprintln!("sysgenidctl: warning: the guest's kernel was not fully reseeded: {why}");
            }
            out!("{}", restored.generation);
        }
        Cmd::Get => out!("{}", guest.get()?),
        Cmd::Freeze { timeout_ms } => {
            let timeout = timeout_ms
                .filter(|&ms| ms > 0)
                .map(|ms| Duration::from_millis(u64::from(ms)));
            guest.freeze(timeout)?;
        }
        Cmd::Thaw => {
            guest.thaw()?;
        }
        Cmd::WaitWatchers { timeout_ms } => {
            let timeout = (*timeout_ms > 0).then(|| Duration::from_millis(u64::from(*timeout_ms)));
            guest.wait_watchers(timeout)?;
        }
        Cmd::Status { json } => {
            let s = guest.status()?;
            if *json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| Error::Protocol(e.to_string()))?
                );
            } else {
                print_status(&s);
            }
        }
        Cmd::Watch { .. } | Cmd::Bump { .. } => unreachable!("refused above"),
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), Error> {
    let dir = args.runtime_dir.as_deref();
    match &args.command {
        Cmd::Restored { .. } => usage(
            "restored is the hypervisor host's command: give --host-channel TARGET (in the guest itself, use bump)",
        ),
        Cmd::Get => {
            let control = Control::connect(dir)?;
            out!("{}", control.generation_at_connect());
        }
        Cmd::Watch {
            count,
            untracked,
            lifecycle,
            exec,
        } => {
            let mut builder = Watcher::builder()
                .untracked(*untracked)
                .lifecycle(*lifecycle);
            if let Some(dir) = dir {
                builder = builder.runtime_dir(dir);
            }
            let mut watcher = builder.open()?;
            if *lifecycle {
                return watch_lifecycle(watcher, *count, exec);
            }
            let mut seen = 0u64;
            while count.is_none_or(|n| seen < n) {
                let generation = watcher.read()?;
                let mut out = std::io::stdout().lock();
                writeln!(out, "{generation}")?;
                out.flush()?;
                drop(out);
                if let Some((program, rest)) = exec.split_first() {
                    match std::process::Command::new(program)
                        .args(rest)
                        .env("SYSGENID_GENERATION", generation.to_string())
                        .status()
                    {
                        Ok(status) if !status.success() => {
                            eprintln!(
                                "sysgenidctl: {program} exited with {status}; acknowledging anyway"
                            )
                        }
                        Ok(_) => {}
                        Err(e) => eprintln!("sysgenidctl: cannot run {program}: {e}"),
                    }
                }
                match watcher.ack(generation) {
                    // A newer change arrived meanwhile: the next read returns it.
                    Ok(()) | Err(Error::WrongGeneration { .. }) => {}
                    Err(e) => return Err(e),
                }
                seen += 1;
            }
        }
        Cmd::Freeze { timeout_ms } => {
            let timeout = timeout_ms
                .filter(|&ms| ms > 0)
                .map(|ms| Duration::from_millis(u64::from(ms)));
            Control::connect(dir)?.freeze(timeout)?;
        }
        Cmd::Thaw => {
            Control::connect(dir)?.thaw()?;
        }
        Cmd::Bump {
            min,
            allow_exhaustion,
        } => {
            let mut control = Control::connect(dir)?;
            let generation = if *allow_exhaustion {
                control.bump_allowing_exhaustion(*min)?
            } else {
                control.bump(*min)?
            };
            out!("{generation}");
        }
        Cmd::WaitWatchers { timeout_ms } => {
            let timeout = (*timeout_ms > 0).then(|| Duration::from_millis(u64::from(*timeout_ms)));
            Control::connect(dir)?.wait_watchers(timeout)?;
        }
        Cmd::Status { json } => {
            let s = Control::connect(dir)?.status()?;
            if *json {
                out!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| Error::Protocol(e.to_string()))?
                );
            } else {
                print_status(&s);
            }
        }
    }
    Ok(())
}

/// `watch --lifecycle`: one line per event, CMD once per event, confirm or
/// acknowledge when it succeeded.
fn watch_lifecycle(mut watcher: Watcher, count: Option<u64>, exec: &[String]) -> Result<(), Error> {
    let mut seen = 0u64;
    let mut last_change = None;
    while count.is_none_or(|n| seen < n) {
        let event = watcher.read_event()?;
        if let Event::Change { generation } = event {
            // Reported again until acknowledged: handle each change once.
            if last_change == Some(generation) {
                watcher.skip(generation);
                continue;
            }
            last_change = Some(generation);
        }
        let mut out = std::io::stdout().lock();
        match event {
            Event::Change { generation } => writeln!(out, "{generation}")?,
            other => writeln!(out, "{}", other.name())?,
        }
        out.flush()?;
        drop(out);
        let succeeded = match exec.split_first() {
            None => true,
            Some((program, rest)) => match std::process::Command::new(program)
                .args(rest)
                .env("SYSGENID_EVENT", event.name())
                .env("SYSGENID_GENERATION", event.generation().to_string())
                .status()
            {
                Ok(status) if status.success() => true,
                Ok(status) => {
                    eprintln!(
                        "sysgenidctl: {program} exited with {status} on {}; not {}",
                        event.name(),
                        match event {
                            Event::Freeze { .. } => "confirming the freeze",
                            Event::Change { .. } => "acknowledging the change",
                            Event::Thaw { .. } => "stopping (thaw needs no answer)",
                        }
                    );
                    false
                }
                Err(e) => {
                    eprintln!("sysgenidctl: cannot run {program}: {e}");
                    false
                }
            },
        };
        match event {
            Event::Freeze { freeze, .. } if succeeded => watcher.confirm(freeze)?,
            Event::Change { generation } if succeeded => match watcher.ack(generation) {
                // A newer change arrived meanwhile: the next read returns it.
                Ok(()) | Err(Error::WrongGeneration { .. }) => {}
                Err(e) => return Err(e),
            },
            Event::Change { generation } => watcher.skip(generation),
            _ => {}
        }
        seen += 1;
    }
    Ok(())
}

fn ago(unix_ms: Option<u64>) -> String {
    let Some(ms) = unix_ms else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(ms);
    format!("{:.1} s ago", now.saturating_sub(ms) as f64 / 1000.0)
}

fn print_status(s: &sysgenid::StatusReport) {
    out!("generation:   {}", s.generation);
    out!("epoch:        {}", s.epoch);
    out!(
        "last change:  {}{}",
        ago(s.last_change_unix_ms),
        if s.last_change_sources.is_empty() {
            String::new()
        } else {
            format!(" (by {})", s.last_change_sources.join(" + "))
        }
    );
    out!(
        "watchers:     {} ({} tracked, {} outdated, {} untracked outdated; counts are advisory)",
        s.watchers,
        s.tracked,
        s.outdated,
        s.outdated_untracked
    );
    let state = match s.state {
        LifecycleState::Running => "running".to_string(),
        LifecycleState::Freezing => format!(
            "freezing (freeze {}, {} participant(s) or hooks still to confirm)",
            s.freeze, s.pending
        ),
        LifecycleState::Frozen => format!(
            "frozen for {:.1} s (freeze {}){}",
            s.frozen_ms.unwrap_or(0) as f64 / 1000.0,
            s.freeze,
            if s.thaw_after_acks {
                "; restored, thawing once every tracked watcher acknowledges"
            } else {
                ""
            }
        ),
    };
    out!("state:        {state}");
    match &s.trust {
        Some(t) => {
            out!(
                "participants: {} ({} trusted, {} untrusted: a freeze waits only for trusted ones)",
                s.participants,
                t.participants_trusted,
                t.participants_untrusted
            );
            out!(
                "trust:        {} trusted, {} untrusted tracked watchers (the thaw after a restore waits only for trusted ones; wait-watchers for all)",
                t.tracked_trusted,
                t.tracked_untrusted
            );
        }
        None => out!("participants: {}", s.participants),
    }
    if let Some(h) = &s.hooks {
        out!(
            "hooks:        {} in {} ({} runs, {} failed, {} timed out, {} refused){}",
            h.hooks,
            h.dir,
            h.runs,
            h.failures,
            h.timeouts,
            h.refused,
            h.last_problem
                .as_deref()
                .map(|p| format!("; latest: {p}"))
                .unwrap_or_default()
        );
    }
    out!("uptime:       {:.1} s", s.uptime_ms as f64 / 1000.0);
    out!("runtime dir:  {}", s.runtime_dir);
    out!("device:       {}", s.device.as_deref().unwrap_or("off"));
    out!("sources:");
    for src in &s.sources {
        out!(
            "  {:<8} {:<8} events {:<4} last {:<14} {}",
            src.name,
            if src.active { "active" } else { "inactive" },
            src.events,
            ago(src.last_event_unix_ms),
            src.detail
        );
    }
}
