//! `sysgenidd`: flags, logging, start-up, and the event loop.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sysgenid_proto::SourceStatus;
use sysgenidd::device::{Device, Setting, Started};
use sysgenidd::event_loop::{Command, EventLoop};
use sysgenidd::hooks::{Hooks, Setting as HooksSetting};
use sysgenidd::runtime_dir::{default_runtime_dir, RuntimeDir};
use sysgenidd::service::Service;
use sysgenidd::watchers::Limits;

/// The System Generation ID daemon.
///
/// Owns the system generation counter: a u32 that increases every time this
/// machine (VM or container) is restored from a snapshot or cloned, so that
/// programs holding random seeds, UUID state, keys or leases know to renew
/// them. Clients watch it through the socket (the `sysgenid` library,
/// `sysgenidctl watch`) or map the page file for zero-syscall checks.
///
/// Runs in the foreground and logs to stderr (set RUST_LOG=debug for more).
/// SIGTERM or SIGINT stops it cleanly; the generation is saved after every
/// change and survives restarts and crashes.
///
/// Examples:
///   sysgenidd                              # defaults: /run/sysgenid, every source found
///   sysgenidd --runtime-dir /tmp/sg --source none   # development, manual bumps only
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Directory holding the socket (sysgenid.sock), the page (generation),
    /// the saved state and a lock. Default: /run/sysgenid as root, else
    /// $XDG_RUNTIME_DIR/sysgenid.
    #[arg(long, env = "SYSGENID_RUNTIME_DIR", value_name = "DIR")]
    runtime_dir: Option<PathBuf>,

    /// Restore-signal sources: `auto` (every source whose device exists),
    /// `none`, or a comma-separated list of vmfork, vmclock, uevent.
    /// Privileged bump requests (`sysgenidctl bump`) are always accepted.
    #[arg(long, default_value = "auto", value_name = "LIST")]
    source: String,

    /// Kernel log device followed by the vmfork source (from its end). A
    /// FIFO or other stream (tests, benchmarks) is read from its start.
    #[arg(long, default_value = "/dev/kmsg", value_name = "PATH")]
    kmsg: PathBuf,

    /// vmclock device read by the vmclock source.
    #[arg(long, default_value = "/dev/vmclock0", value_name = "PATH")]
    vmclock: PathBuf,

    /// Signals from different sources within this window are one restore
    /// and cause one bump.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    coalesce_ms: u64,

    /// Most watchers in total; further watchers are refused with EUSERS.
    #[arg(long, default_value_t = Limits::default().max_watchers, value_name = "N")]
    max_watchers: u32,

    /// Most watchers per user id.
    #[arg(long, default_value_t = Limits::default().max_watchers_per_uid, value_name = "N")]
    max_watchers_per_uid: u32,

    /// Most socket connections per non-root user id (watchers or not);
    /// further connections get a clear error and are closed.
    #[arg(long, default_value_t = Limits::default().max_connections_per_uid, value_name = "N")]
    max_connections_per_uid: u32,

    /// Bytes of unread replies all socket clients together may leave
    /// queued in the daemon; a client whose reply would pass it is dropped.
    #[arg(long, default_value_t = Limits::default().max_queued_bytes, value_name = "BYTES")]
    max_queued_bytes: usize,

    /// Bytes of unread replies the socket clients of one non-root user id
    /// may leave queued in the daemon; a client whose reply would pass it
    /// is dropped.
    #[arg(long, default_value_t = Limits::default().max_queued_bytes_per_uid, value_name = "BYTES")]
    max_queued_bytes_per_uid: usize,

    /// A client that connects must send its Hello within this time, or it
    /// gets an error and is dropped.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    hello_timeout_ms: u64,

    /// Continue from the generation shown in the page file when the saved
    /// state is missing or corrupt (the daemon refuses to start otherwise).
    #[arg(long)]
    recover: bool,

    /// Serve the seed's device ABI at PATH through FUSE (an empty regular
    /// file, created if missing and removed on exit), or `off`. Default:
    /// /dev/sysgenid when running as root and that path is free, else off.
    #[arg(long, env = "SYSGENID_DEVICE", value_name = "PATH|off")]
    device: Option<String>,

    /// Run every executable file in DIR, in name order, on each lifecycle
    /// event (`HOOK freeze|thaw|change`), or `off`. Default:
    /// /etc/sysgenid/hooks.d, if it exists.
    #[arg(long, value_name = "DIR|off")]
    hooks_dir: Option<String>,

    /// A hook still running after this long is killed (with its process
    /// group) and counted as timed out.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    hook_timeout_ms: u64,

    /// The longest the system stays frozen: after this the daemon thaws by
    /// itself and logs it, so an orchestrator that died between freeze and
    /// thaw cannot leave every program quiesced.
    #[arg(long, default_value_t = sysgenid_core::lifecycle::DEFAULT_MAX_FROZEN_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    max_frozen_ms: u64,

    /// After a restore while frozen: `auto` thaws once every tracked watcher
    /// has acknowledged the new generation; `manual` leaves thawing to the
    /// orchestrator (or the freeze bound).
    #[arg(long, default_value = "auto", value_name = "auto|manual",
          value_parser = ["auto", "manual"])]
    restore_thaw: String,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
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
    let dir_path = args.runtime_dir.clone().unwrap_or_else(default_runtime_dir);
    let dir = RuntimeDir::prepare(&dir_path).map_err(|e| e.to_string())?;
    let listener = dir.bind_socket().map_err(|e| e.to_string())?;
    let service = Service::start(dir, args.recover).map_err(|e| e.to_string())?;
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
    let selection = sysgenid_sources::select(&args.source, &config).map_err(|e| e.to_string())?;
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

    let device = match Device::start(
        &Setting::parse(args.device.as_deref()),
        server.service().dir(),
        server.service().record(),
        server.handle().device_forward(),
    )
    .map_err(|e| e.to_string())?
    {
        Started::Serving(device) => {
            let description = device.describe();
            server.attach_device(device);
            description
        }
        Started::Disabled(why) => why.to_string(),
    };

    let record = server.service().record();
    tracing::info!(
        "sysgenidd {} ready: runtime dir {}, generation {}, epoch {}, device: {}, hooks: {}, sources: {}",
        env!("CARGO_PKG_VERSION"),
        dir_path.display(),
        record.generation,
        sysgenidd::state::epoch_hex(&record.epoch),
        device,
        hooks_description,
        if active_names.is_empty() {
            "none (manual bumps only)".to_string()
        } else {
            active_names.join(", ")
        }
    );
    server.run().map_err(|e| format!("event loop failed: {e}"))
}
