//! The command line of `sysgenidctl`, as a library module so that the man
//! page (`sysgenidctl(1)`) and the shell completions are generated from the
//! same definitions the binary parses (`crates/sysgenid-packaging`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sysgenid::{ChangeKind, Hostname};

fn parse_kind(value: &str) -> Result<ChangeKind, String> {
    value.parse()
}

fn parse_hostname(value: &str) -> Result<Hostname, String> {
    Hostname::new(value).map_err(|e| e.to_string())
}

const AFTER_HELP: &str = "\
Exit codes:
  0  success
  1  error (for example the daemon is not running or runs as another user:
     the message names the socket;
     or a bump refused because it would exhaust the counter, see bump --help)
  2  usage error
  3  timeout (wait-watchers; freeze: the freeze was aborted and everything thawed)
  4  permission denied (bump, freeze, thaw without CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE)

Examples:
  sysgenidctl get                       # print the generation
  sysgenidctl watch --exec ./reseed.sh  # run a command on every restore, then acknowledge
  sysgenidctl bump                      # as root: force a new generation (CRIU post-restore hook)
  head -c 64 /dev/urandom | sysgenidctl bump --kind clone --entropy-file -   # a clone, with host entropy
  sysgenidctl wait-watchers --timeout-ms 5000   # wait until every tracked watcher caught up
  sysgenidctl freeze --timeout-ms 5000  # as root: quiesce every participant before a snapshot
  sysgenidctl thaw                      # as root: resume them
  sysgenidctl watch --lifecycle --exec ./quiesce.sh   # a participant: SYSGENID_EVENT=freeze|thaw|change
  sysgenidctl status --json
  sysgenidctl hooks enable machine-id   # as root: a clone gets a new /etc/machine-id
  CRIU: action-script /usr/libexec/sysgenid/criu-action   # runs `sysgenidctl criu-hook`

From the hypervisor host, to a guest whose sysgenidd runs with
--host-channel vsock:1024 (exit codes as above):
  sysgenidctl --host-channel vsock:3:1024 freeze --timeout-ms 5000
  sysgenidctl --host-channel uds:/run/fc/v.sock:1024 restored --clone
  sysgenidctl --host-channel uds:/run/fc/v.sock:1024 wait-watchers --timeout-ms 5000";

/// Watch and control the system generation (sysgenidd).
///
/// The system generation is a number that increases every time this machine
/// is restored from a snapshot or cloned. Programs watch it, renew what must
/// be unique (seeds, ids, keys), and acknowledge the new value.
#[derive(Parser, Debug)]
#[command(version, after_help = AFTER_HELP)]
pub struct Args {
    /// The daemon's runtime directory (socket and page). Default:
    /// /run/sysgenid, the system daemon's, for every user. A per-user
    /// daemon's directory is used only when named here or in
    /// SYSGENID_RUNTIME_DIR, and only if that daemon runs as root or as
    /// the caller.
    #[arg(long, global = true, env = "SYSGENID_RUNTIME_DIR", value_name = "DIR")]
    pub runtime_dir: Option<PathBuf>,

    /// Talk to a guest's daemon from the hypervisor host instead of the
    /// local daemon: `vsock:CID:PORT` (host kernel vsock, QEMU
    /// vhost-vsock) or `uds:PATH:PORT` (the hybrid vsock Unix socket of
    /// Firecracker, Cloud Hypervisor or vhost-device-vsock). The guest's
    /// sysgenidd must run with --host-channel vsock:PORT. Commands:
    /// restored, freeze, thaw, wait-watchers, status, get.
    #[arg(long, global = true, value_name = "TARGET")]
    pub host_channel: Option<sysgenid::host_channel::Target>,

    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Print the current generation.
    Get,
    /// Register a watcher; on each change print the new generation (one per
    /// line), run CMD if given with SYSGENID_GENERATION and SYSGENID_KIND
    /// (clone, restore or unknown: the kind of that change, as status
    /// reports it; unknown if another change came first) set, then
    /// acknowledge.
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
        /// Entropy to mix into the kernel's pool (credited) before the
        /// daemon reseeds it and draws the new epoch: 32 to 512 bytes read
        /// from FILE, `-` for stdin (for example 64 bytes of the host's own
        /// getrandom, sent along by an orchestrator). Anything else is
        /// refused (exit 2) and nothing changes.
        #[arg(long, value_name = "FILE")]
        entropy_file: Option<PathBuf>,
        /// What this change is: `clone` (one of possibly several copies of
        /// a snapshot: hooks renew machine identity), `restore` (the same
        /// machine put back in time: identity is kept) or `unknown`.
        /// Hooks and `watch --exec` get it as SYSGENID_KIND.
        #[arg(long, default_value = "unknown", value_name = "clone|restore|unknown",
              value_parser = parse_kind)]
        kind: ChangeKind,
        /// The hostname this change should give the machine, exported to
        /// the hooks as SYSGENID_HOSTNAME for this change (a valid hostname
        /// of at most 64 bytes).
        #[arg(long, value_name = "NAME", value_parser = parse_hostname)]
        hostname: Option<Hostname>,
    },
    /// Wait until no tracked watcher is outdated.
    WaitWatchers {
        /// Give up after MS milliseconds (exit 3); 0 waits forever.
        #[arg(long, default_value_t = 0, value_name = "MS")]
        timeout_ms: u32,
    },
    /// With --host-channel only: tell the guest it was restored (or, with
    /// --clone, cloned). Its daemon mixes the entropy into its kernel,
    /// forces a reseed, and bumps the generation (source `host`; one bump
    /// with a kernel signal for the same restore; hooks get SYSGENID_KIND
    /// and SYSGENID_HOSTNAME). Prints the guest's new generation.
    Restored {
        /// This guest is one of possibly many clones of one snapshot.
        #[arg(long)]
        clone: bool,
        /// Host entropy for the guest's kernel, 32 to 512 bytes (`-`:
        /// stdin). Default: 32 bytes of this host's getrandom.
        #[arg(long, value_name = "FILE")]
        entropy_file: Option<PathBuf>,
        /// The host name this change gives the guest (a clone's own
        /// name), for its hooks as SYSGENID_HOSTNAME.
        #[arg(long, value_name = "NAME", value_parser = parse_hostname)]
        hostname: Option<Hostname>,
    },
    /// Show the generation, watchers, sources and last change.
    Status {
        /// Machine-readable JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the shipped hooks (machine-id, ssh-host-keys, hostname, network,
    /// clock) and the enabled ones; enable or disable a shipped hook (as
    /// root).
    ///
    /// A shipped hook is turned on by a symlink in the daemon's hooks
    /// directory named with its order (10-machine-id, 20-ssh-host-keys,
    /// 30-hostname, 40-network, 50-clock: hooks run in name order, and
    /// the machine-id comes first because others derive from it). The
    /// daemon reads the directory again at every event, so a hook enabled
    /// or disabled here counts from the next one. Exit 1 on an error
    /// (nothing changed), 4 when enable or disable is not run as root.
    Hooks {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<HooksAction>,
        /// Where the package installs its hooks.
        #[arg(
            long,
            global = true,
            default_value = "/usr/share/sysgenid/hooks",
            value_name = "DIR"
        )]
        shipped_dir: PathBuf,
        /// The daemon's hooks directory (sysgenidd --hooks-dir).
        #[arg(
            long,
            global = true,
            default_value = "/etc/sysgenid/hooks.d",
            value_name = "DIR"
        )]
        hooks_dir: PathBuf,
    },
    /// CRIU's action script for a container running its own sysgenidd (run
    /// by /usr/libexec/sysgenid/criu-action; see docs/containers.md).
    ///
    /// CRIU runs it on the host with no arguments: the action is in
    /// CRTOOLS_SCRIPT_ACTION and the container's init in CRTOOLS_INIT_PID.
    /// It enters the container's pid namespace (and its user namespace, when
    /// it has one) and asks the daemon found at /proc/PID/root/run/sysgenid:
    /// pre-dump: freeze every participant (exit 3 when one did not confirm
    /// in time: CRIU aborts the dump and the container runs on, thawed);
    /// post-dump, and network-unlock after a failed dump: thaw, answered
    /// once CRIU lets the container run again; post-resume: a new
    /// generation (a restore by CRIU), so the clone's watchers renew; every
    /// other action: nothing. A container without a daemon: nothing, exit 0.
    ///
    /// Environment: SYSGENID_CRIU_FREEZE_TIMEOUT_MS (default 10000),
    /// SYSGENID_CRIU_STRICT (1, the default: a failed freeze or restore
    /// report fails CRIU's operation; 0: log it and go on),
    /// SYSGENID_CRIU_RUNTIME_DIR (the runtime directory inside the
    /// container, default /run/sysgenid).
    CriuHook {
        /// Internal: the step run inside the container's pid namespace.
        #[arg(long, hide = true, value_name = "STEP")]
        inside: Option<String>,
        /// Internal: the CRIU action, for messages.
        #[arg(long, hide = true, default_value = "")]
        action: String,
        /// Internal: the freeze timeout.
        #[arg(long, hide = true, default_value_t = 10_000)]
        timeout_ms: u64,
        /// Internal: when the inside step gives up.
        #[arg(long, hide = true, default_value_t = 30_000)]
        deadline_ms: u64,
    },
}

/// `sysgenidctl hooks` subcommands.
#[derive(Subcommand, Debug)]
pub enum HooksAction {
    /// List the shipped hooks, whether each is enabled (and as which link),
    /// and the other hooks in the hooks directory.
    List,
    /// Link a shipped hook into the hooks directory (as root). Enabling one
    /// that is enabled changes nothing.
    Enable {
        /// The shipped hook's name (as `list` shows it).
        name: String,
    },
    /// Remove the links to a shipped hook from the hooks directory (as
    /// root). Disabling one that is not enabled changes nothing.
    Disable {
        /// The shipped hook's name (as `list` shows it).
        name: String,
    },
}
