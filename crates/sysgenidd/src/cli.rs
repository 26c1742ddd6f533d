//! The daemon's command line, as a library module so that the man page
//! (`sysgenidd(8)`) and the shell completions are generated from the same
//! definitions the binary parses (`crates/sysgenid-packaging`).

use std::path::PathBuf;

use clap::Parser;

use crate::watchers::Limits;

/// The System Generation ID daemon.
///
/// Owns the system generation counter: a u32 that increases every time this
/// machine (VM or container) is restored from a snapshot or cloned, so that
/// programs holding random seeds, UUID state, keys or leases know to renew
/// them. Clients watch it through the socket (the `sysgenid` library,
/// `sysgenidctl watch`) or map the page file for zero-syscall checks.
///
/// Runs in the foreground and logs to stderr (set RUST_LOG=debug for more;
/// plain text without colour when stderr is not a terminal, as under
/// systemd). SIGTERM or SIGINT stops it cleanly; the generation is saved
/// after every change and survives restarts and crashes. Under systemd
/// (sysgenidd.service, Type=notify) it reports readiness and pings the
/// watchdog from its event loop.
///
/// Every client of every uid finds the system daemon at /run/sysgenid with
/// no configuration. A per-user daemon needs an explicit --runtime-dir, and
/// its clients SYSGENID_RUNTIME_DIR; clients accept only a daemon run by
/// root or by their own uid.
///
/// Examples:
///   sysgenidd                              # as root: /run/sysgenid, every source found
///   sysgenidd --runtime-dir /tmp/sg --source none   # development, manual bumps only
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
pub struct Args {
    /// Directory holding the socket (sysgenid.sock), the page (generation),
    /// the saved state and a lock. Default: /run/sysgenid, the system
    /// daemon's, which only root may use; any other uid must name its own
    /// directory (clients then need SYSGENID_RUNTIME_DIR=DIR).
    #[arg(long, env = "SYSGENID_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// Restore-signal sources: `auto` (every source whose device exists),
    /// `none`, or a comma-separated list of vmfork, vmclock, uevent.
    /// Privileged bump requests (`sysgenidctl bump`) are always accepted.
    #[arg(long, default_value = "auto", value_name = "LIST")]
    pub source: String,

    /// Kernel log device followed by the vmfork source (from its end). A
    /// FIFO or other stream (tests, benchmarks) is read from its start.
    #[arg(long, default_value = "/dev/kmsg", value_name = "PATH")]
    pub kmsg: PathBuf,

    /// vmclock device read by the vmclock source.
    #[arg(long, default_value = "/dev/vmclock0", value_name = "PATH")]
    pub vmclock: PathBuf,

    /// Signals from different sources within this window are one restore
    /// and cause one bump.
    #[arg(long, default_value_t = 2000, value_name = "MS")]
    pub coalesce_ms: u64,

    /// Most watchers in total; further watchers are refused with EUSERS.
    #[arg(long, default_value_t = Limits::default().max_watchers, value_name = "N")]
    pub max_watchers: u32,

    /// Most watchers per user id.
    #[arg(long, default_value_t = Limits::default().max_watchers_per_uid, value_name = "N")]
    pub max_watchers_per_uid: u32,

    /// Most socket connections per non-root user id (watchers or not);
    /// further connections get a clear error and are closed.
    #[arg(long, default_value_t = Limits::default().max_connections_per_uid, value_name = "N")]
    pub max_connections_per_uid: u32,

    /// Bytes of unread replies all socket clients together may leave
    /// queued in the daemon; a client whose reply would pass it is dropped.
    #[arg(long, default_value_t = Limits::default().max_queued_bytes, value_name = "BYTES")]
    pub max_queued_bytes: usize,

    /// Bytes of unread replies the socket clients of one non-root user id
    /// may leave queued in the daemon; a client whose reply would pass it
    /// is dropped.
    #[arg(long, default_value_t = Limits::default().max_queued_bytes_per_uid, value_name = "BYTES")]
    pub max_queued_bytes_per_uid: usize,

    /// A client that connects must send its Hello within this time, or it
    /// gets an error and is dropped.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub hello_timeout_ms: u64,

    /// When to force the kernel's CRNG to reseed (RNDRESEEDCRNG) before a
    /// change is published, so clones of one snapshot stop sharing a
    /// random stream: `auto`, for every change but those the kernel's own
    /// VM-fork reseed covered (the vmfork source); `always`, for those
    /// too; `never`, only to measure its cost (entropy sent with a bump is
    /// still mixed in). Needs CAP_SYS_ADMIN; where the kernel refuses, the
    /// change still happens and status says why.
    #[arg(long, default_value = "auto", value_name = "auto|always|never",
          value_parser = ["auto", "always", "never"])]
    pub reseed: String,

    /// Continue from the generation shown in the page file when the saved
    /// state is missing or corrupt (the daemon refuses to start otherwise).
    #[arg(long)]
    pub recover: bool,

    /// Serve the seed's device ABI at PATH through FUSE (an empty regular
    /// file, created if missing and removed on exit), or `off`. Default:
    /// /dev/sysgenid when running as root and that path is free, else off.
    #[arg(long, env = "SYSGENID_DEVICE", value_name = "PATH|off")]
    pub device: Option<String>,

    /// Members of this group may open the device for writing (read,
    /// acknowledge with write, poll, ioctl, mmap: the seed's full watcher);
    /// everyone else opens it read-only; forced updates still need
    /// CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE. A member can map the device
    /// page writable, so grant it only to trusted programs. `none`: write
    /// opens need those capabilities. Default: `sysgenid` when that group
    /// exists, else none.
    #[arg(long, value_name = "NAME|none")]
    pub device_group: Option<String>,

    /// Who holds the snapshot lifecycle: a freeze waits only for trusted
    /// tracked participants, and the automatic thaw after a restore only
    /// for trusted tracked watchers. Trusted: uid 0, the daemon's own uid,
    /// callers with CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE, and members of
    /// this group. Everyone else is still told about freezes, thaws and
    /// changes, and still counts for wait-watchers. `none`: no group.
    /// Default: `sysgenid` when that group exists, else none.
    #[arg(long, value_name = "NAME|none")]
    pub lifecycle_group: Option<String>,

    /// Run every executable file in DIR, in name order, on each lifecycle
    /// event (`HOOK freeze|thaw|change`), or `off`. Default:
    /// /etc/sysgenid/hooks.d, if it exists.
    #[arg(long, value_name = "DIR|off")]
    pub hooks_dir: Option<String>,

    /// A hook still running after this long is killed (with its process
    /// group) and counted as timed out.
    #[arg(long, default_value_t = 10_000, value_name = "MS")]
    pub hook_timeout_ms: u64,

    /// The longest the system stays frozen: after this the daemon thaws by
    /// itself and logs it, so an orchestrator that died between freeze and
    /// thaw cannot leave every program quiesced.
    #[arg(long, default_value_t = sysgenid_core::lifecycle::DEFAULT_MAX_FROZEN_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_frozen_ms: u64,

    /// After a restore while frozen: `auto` thaws once every tracked watcher
    /// has acknowledged the new generation; `manual` leaves thawing to the
    /// orchestrator (or the freeze bound).
    #[arg(long, default_value = "auto", value_name = "auto|manual",
          value_parser = ["auto", "manual"])]
    pub restore_thaw: String,

    /// Serve the hypervisor host over vsock on PORT (off by default): one
    /// JSON request per line (docs/protocol.md, "The host channel"). Only
    /// the host (CID 2) is served; any other peer, such as a local process
    /// through vsock loopback, is refused and logged. The host may report a
    /// restore or clone (with entropy), freeze, thaw, wait for the
    /// watchers and read status: what a privileged local orchestrator may.
    /// `test-unix:PATH` serves the same protocol on a Unix socket whose
    /// every peer counts as the host: for tests only, never in production.
    #[arg(long, value_name = "vsock:PORT")]
    pub host_channel: Option<crate::host_channel::Listen>,

    /// A host channel connection with no request in progress that sends
    /// nothing (or reads nothing) for this long is closed.
    #[arg(long, default_value_t = crate::host_channel::DEFAULT_IDLE_MS, value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub host_channel_idle_ms: u64,
}
