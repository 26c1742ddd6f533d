//! `sysgenid-bench`: multi-process benchmarks of sysgenidd against the
//! kernel's own primitives, measured in the same run and printed as one
//! table of ratios (see `docs/performance.md`).
//!
//! ```text
//! cargo build --release --bins && cargo run --release -p sysgenid-bench            # full run
//! cargo build --release --bins && cargo run --release -p sysgenid-bench -- --quick # CI smoke, < 30 s
//! ```
//!
//! The driver starts its own `sysgenidd --source none` (from the target
//! directory it was built into; scenario 7 a second one, `--source vmfork
//! --kmsg FIFO`) on a private runtime directory under
//! `/dev/shm` (tmpfs, like `/run` in production: the daemon `fsync`s its
//! state on every bump, which costs milliseconds on a disk and nothing on
//! tmpfs). Watchers, waiters and baseline peers are `fork`ed children: real
//! separate processes that report `CLOCK_MONOTONIC` timestamps through a
//! shared mapping, so no measurement includes the cost of reporting it.
//!
//! The process is single-threaded on purpose (it forks thousands of
//! children). It never asserts on a timing: the numbers are printed, that
//! is all: each goal of the issue is a ratio against a baseline measured in
//! the same run, printed with "holds" or the measured reason it does not.
//!
//! One module per scenario (`scenario/`); the table, the daemon, raw
//! descriptors, wake groups and shared baselines have one module each.

mod baseline;
mod daemon;
mod rawfd;
mod scenario;
mod table;
mod wake;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;
use sysgenid_bench::{raise_nofile, vm_rss};

use crate::daemon::Daemon;
use crate::table::Table;

/// Benchmarks sysgenidd against the kernel's own primitives (eventfd,
/// futex, AF_UNIX) in the same run and prints one table of ratios.
#[derive(Parser, Debug)]
#[command(verbatim_doc_comment)]
pub(crate) struct Args {
    /// Smoke mode for CI: small N, few rounds, finishes in well under 30 s.
    /// Its numbers are not meant to be quoted.
    #[arg(long)]
    pub(crate) quick: bool,

    /// The sysgenidd binary (default: next to this executable, i.e. the
    /// same target directory; build it with `cargo build --release --bins`).
    #[arg(long, value_name = "PATH")]
    pub(crate) daemon: Option<PathBuf>,

    /// Extra argument for sysgenidd (repeatable), e.g. a device option.
    #[arg(long = "daemon-arg", value_name = "ARG", allow_hyphen_values = true)]
    pub(crate) daemon_args: Vec<String>,

    /// Serve the FUSE device on a private path (`sysgenidd --device
    /// <runtime dir>.dev`, never `/dev/sysgenid`) and time it (scenario 5).
    /// The default when running as root with /dev/fuse present.
    #[arg(long, conflicts_with = "no_device")]
    pub(crate) device: bool,

    /// Do not serve or time the device (`--device off`).
    #[arg(long)]
    pub(crate) no_device: bool,

    /// Parent directory of the temporary runtime directory (default
    /// /dev/shm if it exists, else the system temp dir).
    #[arg(long, value_name = "DIR")]
    pub(crate) tmp: Option<PathBuf>,

    /// Fan-out sizes (default: 10,100,1000,10000; quick: 10,100).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub(crate) fanout: Option<Vec<usize>>,

    /// Barrier sizes (default: 1,100,1000; quick: 1,10).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub(crate) barrier: Option<Vec<usize>>,

    /// Rounds of the one-watcher wake-up (default 2000; quick 100).
    #[arg(long, value_name = "N")]
    pub(crate) wake_rounds: Option<usize>,

    /// The restore window's checkers (scenario 7; default all): how the
    /// program checking the page uses its CPU while it waits.
    #[arg(long, value_delimiter = ',', value_name = "KIND,...")]
    pub(crate) checkers: Option<Vec<scenario::window::Checker>>,

    /// Only these scenarios (comma-separated numbers 1..7; default all).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub(crate) only: Option<Vec<u32>>,
}

/// What every scenario gets: the options, the daemon binary, where to put
/// runtime directories, and the table to write into.
pub(crate) struct Ctx {
    pub(crate) args: Args,
    pub(crate) bin: PathBuf,
    pub(crate) tmp: PathBuf,
    pub(crate) table: Table,
    /// Whether the daemons serve the FUSE device (scenario 5).
    pub(crate) device: bool,
}

impl Ctx {
    /// `--quick`: smoke mode.
    pub(crate) fn quick(&self) -> bool {
        self.args.quick
    }

    /// Whether scenario `n` was asked for (`--only`).
    pub(crate) fn wants(&self, n: u32) -> bool {
        self.args.only.as_ref().is_none_or(|o| o.contains(&n))
    }
}

fn main() {
    let args = Args::parse();
    let bin = args.daemon.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("sysgenidd")))
            .unwrap_or_else(|| PathBuf::from("sysgenidd"))
    });
    if !bin.exists() {
        eprintln!(
            "sysgenid-bench: {} not found: build the daemon first (`cargo build --release --bins`) or pass --daemon PATH",
            bin.display()
        );
        std::process::exit(2);
    }
    let tmp = args.tmp.clone().unwrap_or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        }
    });
    let nofile = raise_nofile(65_536);
    // SAFETY: geteuid(2) cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let device = args.device || (!args.no_device && root && Path::new("/dev/fuse").exists());
    let mut ctx = Ctx {
        device,
        args,
        bin,
        tmp,
        table: Table::default(),
    };
    let started = Instant::now();
    let load_before = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    if let Err(e) = run(&mut ctx, nofile) {
        eprintln!("sysgenid-bench: {e}");
        ctx.table.print();
        std::process::exit(1);
    }
    let (goals, hold) = ctx.table.goals();
    ctx.table.notes.push(format!(
        "Goals: {hold} of {goals} hold. Mode: {}. Daemon: {}. Runtime dir under {}. RLIMIT_NOFILE {nofile}. {} CPUs; load average before: {}. Wall time {:.1} s.",
        if ctx.quick() { "--quick (smoke; not for quoting)" } else { "full" },
        ctx.bin.display(),
        ctx.tmp.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_before,
        started.elapsed().as_secs_f64()
    ));
    ctx.table.print();
    let _ = std::io::stdout().flush();
}

fn run(ctx: &mut Ctx, nofile: u64) -> Result<(), String> {
    let (daemon, _) = Daemon::start(&ctx.bin, &ctx.tmp, &ctx.args.daemon_args, ctx.device)?;
    std::thread::sleep(Duration::from_millis(50));
    let idle_rss = vm_rss(daemon.pid()).unwrap_or(0);
    let mut control = daemon.control();
    if ctx.wants(1) {
        eprintln!("(1) probe");
        scenario::probe::run(ctx, &daemon)?;
    }
    if ctx.wants(2) {
        eprintln!("(2) one waiter");
        scenario::one_waiter::run(ctx, &daemon, &mut control)?;
        scenario::bump_path::run(ctx)?;
    }
    if ctx.wants(3) || ctx.wants(6) {
        scenario::fanout::run(ctx, &daemon, &mut control, idle_rss, nofile)?;
    }
    if ctx.wants(4) {
        scenario::barrier::run(ctx, &daemon, &mut control)?;
    }
    if ctx.wants(5) {
        scenario::device::run(ctx, &daemon, &mut control)?;
    }
    if ctx.wants(7) {
        eprintln!("(7) kernel record → page (the restore window)");
        scenario::window::run(ctx)?;
    }
    if ctx.wants(6) {
        eprintln!("(6) start-up and memory");
        scenario::memory::run(ctx, idle_rss)?;
    }
    Ok(())
}
