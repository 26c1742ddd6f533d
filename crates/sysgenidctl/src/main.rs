//! `sysgenidctl`: the command-line face of the `sysgenid` client library.
//! Every subcommand is a few lines over the library; exit codes are part of
//! the interface (see `--help`).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sysgenid::{Control, Error, Event, LifecycleState, Watcher};

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  error (for example the daemon is not running: the message names the socket;
     or a bump refused because it would exhaust the counter, see bump --help)
  2  usage error
  3  timeout (wait-watchers; freeze: the freeze was aborted and everything thawed)
  4  permission denied (bump, freeze, thaw without CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)

Examples:
  sysgenidctl get                       # print the generation
  sysgenidctl watch --exec ./reseed.sh  # run a command on every restore, then acknowledge
  sysgenidctl bump                      # as root: force a new generation (CRIU post-restore hook)
  sysgenidctl wait-watchers --timeout-ms 5000   # wait until every tracked watcher caught up
  sysgenidctl freeze --timeout-ms 5000  # as root: quiesce every participant before a snapshot
  sysgenidctl thaw                      # as root: resume them
  sysgenidctl watch --lifecycle --exec ./quiesce.sh   # a participant: SYSGENID_EVENT=freeze|thaw|change
  sysgenidctl status --json";

/// Watch and control the system generation (sysgenidd).
///
/// The system generation is a number that increases every time this machine
/// is restored from a snapshot or cloned. Programs watch it, renew what must
/// be unique (seeds, ids, keys), and acknowledge the new value.
#[derive(Parser, Debug)]
#[command(version, after_help = AFTER_HELP)]
struct Args {
    /// The daemon's runtime directory (socket and page). Default: /run/sysgenid
    /// as root, else $XDG_RUNTIME_DIR/sysgenid.
    #[arg(long, global = true, env = "SYSGENID_RUNTIME_DIR", value_name = "DIR")]
    runtime_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Print the current generation.
    Get,
    /// Register a watcher; on each change print the new generation (one per
    /// line), run CMD if given with SYSGENID_GENERATION set, then acknowledge.
    ///
    /// With --lifecycle, a snapshot-lifecycle participant: prints one line
    /// per event (`freeze`, `thaw`, or the new generation), runs CMD once
    /// per event with SYSGENID_EVENT=freeze|thaw|change and
    /// SYSGENID_GENERATION set, and confirms the freeze or acknowledges the
    /// change when CMD exits 0 (without CMD, at once).
    Watch {
        /// Exit after N changes (with --lifecycle: N events; default: run
        /// until killed).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// Do not hold up wait-watchers (nor, with --lifecycle, a freeze).
        #[arg(long)]
        untracked: bool,
        /// Take part in the snapshot lifecycle: be told to freeze and thaw.
        #[arg(long)]
        lifecycle: bool,
        /// Command (and arguments) to run on each change (each event with
        /// --lifecycle) before acknowledging (confirming).
        #[arg(long, num_args = 1.., value_name = "CMD", allow_hyphen_values = true, trailing_var_arg = true)]
        exec: Vec<String>,
    },
    /// Freeze every lifecycle participant before a snapshot (as root). Exit 0
    /// once frozen; 3 if not frozen within the timeout (the freeze is then
    /// aborted and everything thawed); 4 if not privileged.
    Freeze {
        /// Give up after MS milliseconds (default and 0: 30000).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u32>,
    },
    /// Thaw after a snapshot (as root). Exit 0, also when not frozen; 4 if
    /// not privileged.
    Thaw,
    /// Force a new generation: max(MIN, current + 1). Needs CAP_SYS_ADMIN or
    /// CAP_CHECKPOINT_RESTORE (root). Prints the new generation.
    ///
    /// A MIN above 4293918719 (the counter's last 2^20 values) that jumps
    /// past current + 1 is refused (exit 1, nothing changes) unless
    /// --allow-exhaustion is given: the counter ends at 4294967295, and once
    /// there no later restore can ever be signalled.
    Bump {
        /// The minimum value for the new generation.
        #[arg(long, default_value_t = 0, value_name = "N")]
        min: u32,
        /// Accept a MIN in the counter's last 2^20 values (ends the
        /// mechanism for good if MIN is 4294967295).
        #[arg(long)]
        allow_exhaustion: bool,
    },
    /// Wait until no tracked watcher is outdated.
    WaitWatchers {
        /// Give up after MS milliseconds (exit 3); 0 waits forever.
        #[arg(long, default_value_t = 0, value_name = "MS")]
        timeout_ms: u32,
    },
    /// Show the generation, watchers, sources and last change.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
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

fn run(args: &Args) -> Result<(), Error> {
    let dir = args.runtime_dir.as_deref();
    match &args.command {
        Cmd::Get => {
            let control = Control::connect(dir)?;
            println!("{}", control.generation_at_connect());
        }
        Cmd::Watch {
            count,
            untracked,
            lifecycle: true,
            exec,
        } => {
            let mut builder = Watcher::builder().untracked(*untracked).lifecycle(true);
            if let Some(dir) = dir {
                builder = builder.runtime_dir(dir);
            }
            watch_lifecycle(builder.open()?, *count, exec)?;
        }
        Cmd::Watch {
            count,
            untracked,
            lifecycle: false,
            exec,
        } => {
            let mut builder = Watcher::builder().untracked(*untracked);
            if let Some(dir) = dir {
                builder = builder.runtime_dir(dir);
            }
            let mut watcher = builder.open()?;
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
            println!("{generation}");
        }
        Cmd::WaitWatchers { timeout_ms } => {
            let timeout = (*timeout_ms > 0).then(|| Duration::from_millis(u64::from(*timeout_ms)));
            Control::connect(dir)?.wait_watchers(timeout)?;
        }
        Cmd::Status { json } => {
            let s = Control::connect(dir)?.status()?;
            if *json {
                println!(
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
    println!("generation:   {}", s.generation);
    println!("epoch:        {}", s.epoch);
    println!(
        "last change:  {}{}",
        ago(s.last_change_unix_ms),
        if s.last_change_sources.is_empty() {
            String::new()
        } else {
            format!(" (by {})", s.last_change_sources.join(" + "))
        }
    );
    println!(
        "watchers:     {} ({} tracked, {} outdated, {} untracked outdated; counts are advisory)",
        s.watchers, s.tracked, s.outdated, s.outdated_untracked
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
    println!("state:        {state}");
    println!("participants: {}", s.participants);
    if let Some(h) = &s.hooks {
        println!(
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
    println!("uptime:       {:.1} s", s.uptime_ms as f64 / 1000.0);
    println!("runtime dir:  {}", s.runtime_dir);
    println!("device:       {}", s.device.as_deref().unwrap_or("off"));
    println!("sources:");
    for src in &s.sources {
        println!(
            "  {:<8} {:<8} events {:<4} last {:<14} {}",
            src.name,
            if src.active { "active" } else { "inactive" },
            src.events,
            ago(src.last_event_unix_ms),
            src.detail
        );
    }
}
