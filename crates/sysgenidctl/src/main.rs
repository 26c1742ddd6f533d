//! `sysgenidctl`: the command-line face of the `sysgenid` client library.
//! Every subcommand is a few lines over the library; exit codes are part of
//! the interface (see `--help`).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sysgenid::{
    BumpDetails, ChangeKind, Control, Entropy, Error, Event, LifecycleState, Watcher, MAX_ENTROPY,
    MIN_ENTROPY,
};
use sysgenidctl::cli::{Args, Cmd, HooksAction};

mod criu_hook;

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
    let result = match (&args.host_channel, &args.command) {
        // Refuses the local-only commands (watch, bump, hooks, criu-hook).
        (Some(target), command) => host_channel(target, command),
        (
            None,
            Cmd::Hooks {
                action,
                shipped_dir,
                hooks_dir,
            },
        ) => return hooks(action.as_ref(), shipped_dir, hooks_dir),
        (
            None,
            Cmd::CriuHook {
                inside,
                action,
                timeout_ms,
                deadline_ms,
            },
        ) => {
            return match (inside, &args.runtime_dir) {
                (None, _) => criu_hook::run(),
                (Some(step), Some(dir)) => criu_hook::inside(
                    step,
                    action,
                    dir,
                    Duration::from_millis(*timeout_ms),
                    Duration::from_millis(*deadline_ms),
                ),
                (Some(_), None) => {
                    eprintln!("sysgenidctl: criu-hook --inside needs --runtime-dir");
                    ExitCode::from(2)
                }
            }
        }
        (None, _) => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sysgenidctl: {e}");
            ExitCode::from(criu_hook::exit_code(&e))
        }
    }
}

/// `status`: the report as pretty JSON with `--json`, else as lines.
fn show_status(s: &sysgenid::StatusReport, json: bool) -> Result<(), Error> {
    if json {
        out!(
            "{}",
            serde_json::to_string_pretty(s).map_err(|e| Error::Protocol(e.to_string()))?
        );
    } else {
        print_status(s);
    }
    Ok(())
}

/// A usage error (exit 2), as clap reports its own.
fn usage(message: &str) -> ! {
    use clap::CommandFactory;
    Args::command()
        .error(clap::error::ErrorKind::ArgumentConflict, message)
        .exit()
}

/// `--host-channel TARGET COMMAND`: the same commands, to a guest's daemon.
fn host_channel(target: &sysgenid::host_channel::Target, command: &Cmd) -> Result<(), Error> {
    use sysgenid::host_channel::{HostChannel, RestoreKind};
    // Checked before connecting: bad input never reaches the guest.
    let entropy = match command {
        Cmd::Restored {
            entropy_file: Some(path),
            ..
        } => match read_entropy(path) {
            Ok(entropy) => Some(entropy),
            Err(message) => {
                eprintln!("sysgenidctl: --entropy-file {}: {message}", path.display());
                std::process::exit(2);
            }
        },
        Cmd::Watch { .. } | Cmd::Bump { .. } | Cmd::Hooks { .. } | Cmd::CriuHook { .. } => usage(
            "watch, bump, hooks and criu-hook are local commands; over --host-channel use restored, freeze, thaw, wait-watchers, status or get",
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
            let restored = guest.restored(kind, entropy.as_ref(), hostname.as_ref())?;
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
        Cmd::Status { json } => show_status(&guest.status()?, *json)?,
        Cmd::Watch { .. } | Cmd::Bump { .. } | Cmd::Hooks { .. } | Cmd::CriuHook { .. } => {
            unreachable!("refused above")
        }
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
                    let kind = kind_of(&mut watcher, generation);
                    match std::process::Command::new(program)
                        .args(rest)
                        .env("SYSGENID_GENERATION", generation.to_string())
                        .env("SYSGENID_KIND", kind.name())
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
            entropy_file,
            kind,
            hostname,
        } => {
            // Checked before connecting: bad input changes nothing.
            let entropy = match entropy_file {
                Some(path) => match read_entropy(path) {
                    Ok(entropy) => Some(entropy),
                    Err(message) => {
                        eprintln!("sysgenidctl: --entropy-file {}: {message}", path.display());
                        std::process::exit(2);
                    }
                },
                None => None,
            };
            let details = BumpDetails {
                kind: *kind,
                entropy,
                hostname: hostname.clone(),
            };
            let generation = Control::connect(dir)?.bump_with(*min, *allow_exhaustion, details)?;
            out!("{generation}");
        }
        Cmd::WaitWatchers { timeout_ms } => {
            let timeout = (*timeout_ms > 0).then(|| Duration::from_millis(u64::from(*timeout_ms)));
            Control::connect(dir)?.wait_watchers(timeout)?;
        }
        // Handled before any connection (see `hooks`).
        Cmd::Hooks { .. } => {}
        Cmd::Status { json } => show_status(&Control::connect(dir)?.status()?, *json)?,
        Cmd::CriuHook { .. } => unreachable!("handled in main"),
    }
    Ok(())
}

/// `sysgenidctl hooks`: list (anyone), enable and disable (root).
fn hooks(action: Option<&HooksAction>, shipped_dir: &Path, hooks_dir: &Path) -> ExitCode {
    use sysgenidctl::hooks::{self, Enabled};
    let fail = |e: hooks::HooksError| {
        eprintln!("sysgenidctl hooks: {e}");
        ExitCode::from(1)
    };
    let change = match action {
        None | Some(HooksAction::List) => None,
        Some(HooksAction::Enable { name }) => Some(("enable", name)),
        Some(HooksAction::Disable { name }) => Some(("disable", name)),
    };
    let Some((verb, name)) = change else {
        let listing = match hooks::list(shipped_dir, hooks_dir) {
            Ok(listing) => listing,
            Err(e) => return fail(e),
        };
        out!("shipped in {}:", shipped_dir.display());
        if listing.shipped.is_empty() {
            out!("  (none)");
        }
        for s in &listing.shipped {
            let state = if s.enabled_as.is_empty() {
                "disabled".to_string()
            } else {
                format!("enabled as {}", s.enabled_as.join(", "))
            };
            out!("  {:<16} {state}", s.name);
        }
        if !listing.hooks_dir_exists {
            out!("{} does not exist: no hook runs", hooks_dir.display());
        } else if !listing.others.is_empty() {
            out!("other hooks in {}:", hooks_dir.display());
            for other in &listing.others {
                out!("  {other}");
            }
        }
        return ExitCode::SUCCESS;
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!(
            "sysgenidctl hooks {verb}: permission denied: only root may {verb} hooks (they run as root from {})",
            hooks_dir.display()
        );
        return ExitCode::from(4);
    }
    if verb == "enable" {
        match hooks::enable(shipped_dir, hooks_dir, name) {
            Ok(Enabled::Linked {
                link,
                target,
                created_dir,
            }) => {
                out!("enabled {name}: {} -> {}", link.display(), target.display());
                if created_dir {
                    out!(
                        "created {}: sysgenidd looks for its hooks directory when it starts; restart it (systemctl restart sysgenidd)",
                        hooks_dir.display()
                    );
                }
            }
            Ok(Enabled::Already(links)) => {
                out!("{name} is already enabled as {}", links.join(", "))
            }
            Err(e) => return fail(e),
        }
    } else {
        match hooks::disable(shipped_dir, hooks_dir, name) {
            Ok(links) if links.is_empty() => out!("{name} is not enabled: nothing to do"),
            Ok(links) => out!(
                "disabled {name}: removed {} from {}",
                links.join(", "),
                hooks_dir.display()
            ),
            Err(e) => return fail(e),
        }
    }
    ExitCode::SUCCESS
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
                .envs(match event {
                    Event::Change { generation } => {
                        Some(("SYSGENID_KIND", kind_of(&mut watcher, generation).name()))
                    }
                    _ => None,
                })
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

/// The kind of the change to `generation`, as status reports it: the
/// daemon keeps the kind of its last change only, so `unknown` when a
/// newer change already came (the next read reports that one) or status
/// fails.
fn kind_of(watcher: &mut Watcher, generation: u32) -> ChangeKind {
    match watcher.status() {
        Ok(s) if s.generation == generation => s.last_change_kind,
        _ => ChangeKind::Unknown,
    }
}

/// Reads 32 to 512 bytes of entropy from `path` (`-`: stdin), never more
/// than one byte past the limit.
fn read_entropy(path: &std::path::Path) -> Result<Entropy, String> {
    use std::io::Read;
    let limit = MAX_ENTROPY as u64 + 1;
    let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(MAX_ENTROPY + 1));
    let read = if path.as_os_str() == "-" {
        std::io::stdin().lock().take(limit).read_to_end(&mut bytes)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut bytes))
    };
    read.map_err(|e| e.to_string())?;
    if bytes.len() > MAX_ENTROPY {
        return Err(format!(
            "entropy must be {MIN_ENTROPY} to {MAX_ENTROPY} bytes, and this is more than {MAX_ENTROPY} bytes; nothing changed"
        ));
    }
    Entropy::new(std::mem::take(&mut *bytes)).map_err(|e| format!("{e}; nothing changed"))
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
    out!("change kind:  {}", s.last_change_kind.name());
    if let Some(rng) = &s.last_change_rng {
        let mut line = match (&rng.by, &rng.not_reseeded_because) {
            (Some(by), _) => format!("reseeded by {by}"),
            (None, Some(why)) => format!("NOT reseeded: {why}"),
            (None, None) => "NOT reseeded".to_string(),
        };
        if rng.entropy_mixed > 0 {
            line.push_str(&format!(
                "; {} bytes of host entropy mixed in",
                rng.entropy_mixed
            ));
        } else if let Some(e) = &rng.entropy_error {
            line.push_str(&format!("; host entropy NOT mixed in: {e}"));
        } else {
            line.push_str("; no host entropy");
        }
        out!("kernel RNG:   {line}");
    }
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
        if !h.holding.is_empty() {
            out!(
                "              failed the latest change, holding it unacknowledged: {}",
                h.holding.join(", ")
            );
        }
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
