//! `sysgenidd`: flags (`cli`), logging, start-up, and the event loop.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sysgenid_proto::{SourceStatus, SYSTEM_RUNTIME_DIR};
use sysgenidd::cli::Args;
use sysgenidd::device::{Device, Setting, Started, WriteAccess};
use sysgenidd::event_loop::{Command, EventLoop};
use sysgenidd::hooks::{Hooks, Setting as HooksSetting};
use sysgenidd::runtime_dir::RuntimeDir;
use sysgenidd::service::Service;
use sysgenidd::supervisor;
use sysgenidd::watchers::Limits;

/// Logs go to stderr: coloured on a terminal, plain text otherwise (a file,
/// a pipe, the journal), and without our own timestamps under systemd,
/// whose journal stamps every line itself.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// The runtime directory: the flag (or `SYSGENID_RUNTIME_DIR`), else the
/// system daemon's, which only root may take: a per-user daemon must be
/// asked for, so it can never sit where clients look by default.
fn runtime_dir(args: &Args) -> Result<PathBuf, String> {
    if let Some(dir) = &args.runtime_dir {
        return Ok(dir.clone());
    }
    let uid = rustix::process::geteuid();
    if uid.is_root() {
        return Ok(SYSTEM_RUNTIME_DIR.into());
    }
    Err(format!(
        "{SYSTEM_RUNTIME_DIR} is the system daemon's runtime directory and this process runs as uid {}, not root: \
         run as root for the system daemon, or start a per-user daemon with --runtime-dir DIR \
         (and point its clients at it with SYSGENID_RUNTIME_DIR=DIR)",
        uid.as_raw()
    ))
}

fn main() -> ExitCode {
    init_logging();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            tracing::error!("{message}");
            eprintln!("sysgenidd: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Each watcher is a descriptor: raise the soft open-file limit to the hard
/// limit so the daemon serves as many watchers as the system allows.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the open-file limit: {e}");
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    raise_nofile_limit();
    let dir_path = runtime_dir(&args)?;
    let dir = RuntimeDir::prepare(&dir_path).map_err(|e| e.to_string())?;
    let listener = dir.bind_socket().map_err(|e| e.to_string())?;
    let mut service = Service::start(dir, args.recover).map_err(|e| e.to_string())?;
    let container = sysgenidd::container::detect();
    // In a container too: the reseed is harmless there (the CRNG is the
    // host's), and refused without CAP_SYS_ADMIN, which status then says.
    let reseed = sysgenidd::reseed::Policy::parse(&args.reseed)
        .ok_or_else(|| format!("--reseed {}: expected auto, always or never", args.reseed))?;
    service.set_reseed(reseed);
    let limits = Limits {
        max_watchers: args.max_watchers,
        max_watchers_per_uid: args.max_watchers_per_uid,
        max_connections_per_uid: args.max_connections_per_uid,
        hello_timeout: Duration::from_millis(args.hello_timeout_ms),
        max_queued_bytes: args.max_queued_bytes,
        max_queued_bytes_per_uid: args.max_queued_bytes_per_uid,
    };
    let coalescer = sysgenid_sources::Coalescer::new(Duration::from_millis(args.coalesce_ms));
    let mut server = EventLoop::new(service, listener, limits, coalescer)
        .map_err(|e| format!("cannot start the event loop: {e}"))?;
    server.configure_lifecycle(sysgenid_core::lifecycle::Config {
        thaw_on_restore: args.restore_thaw == "auto",
        max_frozen_ms: Some(args.max_frozen_ms),
    });
    let trust = sysgenidd::trust::TrustRule::resolve(args.lifecycle_group.as_deref())?;
    let trust_description = trust.describe();
    server.configure_trust(trust);
    let handle = server.handle();
    let hooks = Hooks::start(
        &HooksSetting::parse(args.hooks_dir.as_deref()),
        Duration::from_millis(args.hook_timeout_ms),
        move |finished| {
            handle.send(Command::Hooks(finished));
        },
    )
    .map_err(|e| e.to_string())?;
    let hooks_description = match hooks {
        Some(hooks) => {
            let description = format!("{} ({} found)", hooks.dir().display(), hooks.known());
            server.attach_hooks(hooks);
            description
        }
        None => "off".to_string(),
    };

    let config = sysgenid_sources::SourceConfig {
        kmsg_path: args.kmsg.clone(),
        vmclock_path: args.vmclock.clone(),
        ..sysgenid_sources::SourceConfig::default()
    };
    let in_container = container.filter(|_| args.source == "auto");
    let selection = match &in_container {
        Some(evidence) => {
            tracing::info!(
                "running in a container ({evidence}): no kernel source applies (--source auto); \
                 restores come from the CRIU action script, `sysgenidctl criu-hook` (docs/containers.md)"
            );
            sysgenid_sources::Selection {
                active: Vec::new(),
                inactive: sysgenid_sources::SOURCE_NAMES
                    .iter()
                    .map(|name| (*name, sysgenidd::container::inactive_reason(evidence)))
                    .collect(),
            }
        }
        None => sysgenid_sources::select(&args.source, &config).map_err(|e| e.to_string())?,
    };
    let mut active_names = Vec::new();
    for (name, why) in &selection.inactive {
        server.add_source_status(SourceStatus {
            name: name.to_string(),
            active: false,
            detail: why.clone(),
            ..SourceStatus::default()
        });
    }
    for source in selection.active {
        let name = source.name();
        active_names.push(name);
        server.add_source_status(SourceStatus {
            name: name.to_string(),
            active: true,
            detail: source.describe(),
            ..SourceStatus::default()
        });
        // The kernel log is read by the event loop itself: no thread, no
        // hand-over, one wake-up less in the restore window.
        let source = match source.into_poll_source() {
            Ok(source) => {
                server
                    .add_poll_source(source)
                    .map_err(|e| format!("cannot start source {name}: {e}"))?;
                continue;
            }
            Err(source) => source,
        };
        let handle = server.handle();
        std::thread::Builder::new()
            .name(format!("source-{name}"))
            .spawn(move || {
                let mut emit = |ev| {
                    let _ = handle.send(Command::SourceEvent(ev));
                };
                let error = match source.run(&mut emit) {
                    Ok(()) => "ended".to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = handle.send(Command::SourceStopped { name, error });
            })
            .map_err(|e| format!("cannot start source {name}: {e}"))?;
    }

    let access = WriteAccess::resolve(args.device_group.as_deref())?;
    let device = match Device::start(
        &Setting::parse(args.device.as_deref()),
        server.service().dir(),
        server.service().record(),
        server.handle().device_forward(),
        access,
    )
    .map_err(|e| e.to_string())?
    {
        Started::Serving(device) => {
            let description = device.describe();
            server
                .attach_device(device)
                .map_err(|e| format!("serving the device from the event loop: {e}"))?;
            description
        }
        Started::Disabled(why) => {
            tracing::info!("device turned off: {why}");
            why.to_string()
        }
    };

    if let Some(listen) = args.host_channel.clone() {
        server
            .attach_host_channel(listen, Duration::from_millis(args.host_channel_idle_ms))
            .map_err(|e| {
                format!(
                    "cannot serve the host channel ({}): {e}",
                    args.host_channel
                        .as_ref()
                        .map_or(String::new(), |l| format!("{l:?}"))
                )
            })?;
    }

    let record = server.service().record();
    let sources = if in_container.is_some() {
        "none in a container (restores from the CRIU action script)".to_string()
    } else if active_names.is_empty() {
        "none (manual bumps only)".to_string()
    } else {
        active_names.join(", ")
    };
    tracing::info!("lifecycle held by: {trust_description}");
    tracing::info!(
        "sysgenidd {} ready: runtime dir {}, generation {}, epoch {}, device: {}, hooks: {}, sources: {}, kernel RNG reseed before a change: {}",
        env!("CARGO_PKG_VERSION"),
        dir_path.display(),
        record.generation,
        sysgenidd::state::epoch_hex(&record.epoch),
        device,
        hooks_description,
        sources,
        args.reseed
    );
    supervisor::ready(&format!(
        "generation {}, serving {}; sources: {sources}",
        record.generation,
        dir_path.display()
    ));
    // On this thread only: the threads started above keep the default.
    match sysgenidd::sched::short_slice() {
        sysgenidd::sched::Outcome::Applied => tracing::debug!(
            "event loop thread: {} µs scheduler slice",
            sysgenidd::sched::SLICE_NS / 1000
        ),
        other => tracing::debug!("event loop thread: default scheduler slice ({other:?})"),
    }
    let result = server.run().map_err(|e| format!("event loop failed: {e}"));
    supervisor::stopping();
    result
}
