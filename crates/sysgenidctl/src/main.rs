//! `sysgenidctl`: the command-line face of the `sysgenid` client library.
//! Every subcommand is a few lines over the library; exit codes are part of
//! the interface (see `--help`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sysgenid::{Control, Error, Watcher};
use sysgenidctl::cli::{Args, Cmd};

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sysgenidctl: {e}");
            ExitCode::from(match e {
                Error::TimedOut { .. } => 3,
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
        Cmd::Bump { min } => {
            let generation = Control::connect(dir)?.bump(*min)?;
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
