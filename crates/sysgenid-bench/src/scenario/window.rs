//! (7) The restore window on the real path: a kernel-log record written
//! into the FIFO the daemon follows (`sysgenidd --source vmfork --kmsg
//! FIFO`) → the page shows the new generation.
//!
//! Between those two moments a restored VM runs with its clones' state and
//! every program that checks the page still believes it is unique: this is
//! the headline figure. The baseline, in the same run, is the least any
//! daemon could do: a process blocked in `read()` on a pipe wakes up and
//! publishes the next generation to a page of the same layout on the same
//! tmpfs (the same `PageWriter::publish` the daemon calls). Both pages are
//! watched the same way, by this process checking `Probe::generation()`,
//! with one of four [`Checker`]s: one that yields the CPU between checks
//! (it never keeps a CPU from the thread it waits for), a busy one that
//! spins pinned to the other CPU or to the daemon's own CPU
//! (`sched_setaffinity`; the daemon and the baseline's reader are pinned
//! alike), and a CPU-bound program that checks between units of work, as
//! an application that keeps the CPUs busy does.
//!
//! The record's `USEC` field is `CLOCK_MONOTONIC` at the write, as the
//! kernel's printk clock would be, so the daemon's own lag figure (status
//! `last_kernel_lag_us`: record timestamp → publication) is comparable.
//! With the page's `changed_unix_ns` (stamped by the daemon when its bump
//! starts, after its epoch draw) it splits our figure in three: record →
//! bump starts (the daemon's wake-up, the read, parse, the epoch draw),
//! bump start → published (state save, publish), published → this process
//! sees it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use sysgenid_bench::{
    allowed_cpus, count_up, fork_child, kill_all, now_ns, realtime_ns, set_affinity,
    set_process_affinity, stats, wait_at_least, write_page, Shm,
};

use crate::daemon::Daemon;
use crate::rawfd::{keep_only_as_3, pipe, raw_read, raw_write};
use crate::table::{fmt, Unit};
use crate::Ctx;

/// How long one round may take before the scenario gives up.
const ROUND_LIMIT: Duration = Duration::from_secs(10);

fn mkfifo(path: &Path) -> Result<(), String> {
    let c =
        std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: mkfifo(3) with a NUL-terminated path.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(format!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// How the program that checks the page uses its CPU while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Checker {
    /// Checks, then `sched_yield`s: never keeps a CPU from the daemon.
    Yielding,
    /// Spins on the page without yielding, pinned to the CPU the daemon
    /// (and the baseline's reader) is not pinned to.
    BusyOther,
    /// Spins on the page without yielding, pinned to the daemon's CPU:
    /// the daemon must preempt it.
    BusySame,
    /// A CPU-bound program (not pinned) that checks the page between units
    /// of work (`WORK_ITERS` multiply-adds, a few µs each).
    Worker,
}

impl Checker {
    const ALL: [Checker; 4] = [
        Checker::Yielding,
        Checker::BusyOther,
        Checker::BusySame,
        Checker::Worker,
    ];

    fn name(self) -> &'static str {
        match self {
            Checker::Yielding => "yielding checker",
            Checker::BusyOther => "busy checker on the other CPU",
            Checker::BusySame => "busy checker on the daemon's CPU",
            Checker::Worker => "CPU-bound program checking between units of work",
        }
    }

    /// The goal for the p50 ratio.
    fn goal(self) -> Option<f64> {
        match self {
            Checker::Yielding => Some(1.5),
            Checker::BusyOther | Checker::BusySame => Some(2.0),
            Checker::Worker => None,
        }
    }

    /// (checker CPU, daemon-and-baseline CPU) when pinned.
    fn placement(self, cpus: &[usize]) -> Option<(usize, usize)> {
        match (self, cpus) {
            (Checker::BusyOther, [a, b, ..]) => Some((*b, *a)),
            (Checker::BusySame, [a, ..]) => Some((*a, *a)),
            _ => None,
        }
    }
}

/// Multiply-adds in one unit of the CPU-bound program's work.
const WORK_ITERS: u32 = 1000;

/// One unit of work: a dependent chain the compiler cannot skip.
#[inline(never)]
fn work_unit(seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..WORK_ITERS {
        x = std::hint::black_box(x)
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
    }
    x
}

/// Checks `probe` the way `checker` does until it shows something other
/// than `old`; returns when.
fn wait_changed(
    checker: Checker,
    probe: &sysgenid::Probe,
    old: u32,
    what: &str,
) -> Result<u64, String> {
    let start = Instant::now();
    let mut spins = 0u32;
    let mut acc = 1u64;
    loop {
        if probe.generation() != old {
            std::hint::black_box(acc);
            return Ok(now_ns());
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && start.elapsed() > ROUND_LIMIT {
            return Err(format!(
                "{what}: the page still shows {old} after {ROUND_LIMIT:?}"
            ));
        }
        match checker {
            // On two shared CPUs a pure spin would be preempted for the
            // very thread it waits on: the condition this one avoids.
            Checker::Yielding => std::thread::yield_now(),
            Checker::BusyOther | Checker::BusySame => std::hint::spin_loop(),
            Checker::Worker => acc = work_unit(acc),
        }
    }
}

/// One kernel VM-fork record, stamped with `CLOCK_MONOTONIC` now.
fn fork_record(seq: u32) -> String {
    format!(
        "5,{seq},{},-;random: {}\n",
        now_ns() / 1000,
        sysgenid_sources::kmsg::VMFORK_TEXT
    )
}

/// The daemon's own figure for the last bump, when it reports one.
fn daemon_lag_ns(control: &mut sysgenid::Control) -> Option<f64> {
    let lag_us = control.status().ok()?.last_kernel_lag_us?;
    Some(lag_us as f64 * 1000.0)
}

/// One checker's figures, each in ns.
#[derive(Default)]
struct Series {
    window: Vec<f64>,
    to_bump: Vec<f64>,
    in_bump: Vec<f64>,
    after: Vec<f64>,
    baseline: Vec<f64>,
    lags: Vec<f64>,
}

/// What the rounds need.
struct Rig<'a> {
    kmsg: &'a mut std::fs::File,
    ours: &'a sysgenid::Probe,
    base: &'a sysgenid::Probe,
    pipe_w: std::os::fd::RawFd,
    control: &'a mut sysgenid::Control,
    seq: u32,
}

/// `rounds` rounds with `checker`, ours and the baseline interleaved.
fn measure(rig: &mut Rig<'_>, checker: Checker, rounds: usize) -> Result<Series, String> {
    let mut s = Series::default();
    for _ in 0..rounds {
        std::thread::sleep(Duration::from_millis(1));
        let old = rig.ours.generation();
        rig.seq += 1;
        let record = fork_record(rig.seq);
        let (t0, t0_real) = (now_ns(), realtime_ns());
        rig.kmsg
            .write_all(record.as_bytes())
            .map_err(|e| format!("write into the FIFO: {e}"))?;
        let t1 = wait_changed(checker, rig.ours, old, "the daemon's page")?;
        s.window.push((t1 - t0) as f64);
        let started = rig.ours.record().changed_unix_ns.saturating_sub(t0_real) as f64;
        s.to_bump.push(started);
        if let Some(lag) = daemon_lag_ns(rig.control) {
            s.lags.push(lag);
            // The daemon's figure ends at publication (µs resolution).
            s.in_bump.push((lag - started).max(0.0));
            s.after.push(((t1 - t0) as f64 - lag).max(0.0));
        }

        std::thread::sleep(Duration::from_millis(1));
        let old = rig.base.generation();
        let t0 = now_ns();
        raw_write(rig.pipe_w, b"x");
        let t1 = wait_changed(checker, rig.base, old, "the baseline page")?;
        s.baseline.push((t1 - t0) as f64);
    }
    Ok(s)
}

/// One daemon with `--reseed reseed` and its baseline reader: the rounds
/// of each checker in turn.
fn with_daemon(
    ctx: &Ctx,
    rounds: usize,
    reseed: &str,
    checkers: &[Checker],
    cpus: &[usize],
) -> Result<Vec<(Checker, Series)>, String> {
    let work = tempfile::Builder::new()
        .prefix("sysgenid-bench-window-")
        .tempdir_in(&ctx.tmp)
        .map_err(|e| format!("temp dir in {}: {e}", ctx.tmp.display()))?;
    let fifo = work.path().join("kmsg.fifo");
    mkfifo(&fifo)?;
    let mut extra = ctx.args.daemon_args.clone();
    extra.extend(["--reseed".into(), reseed.into()]);
    extra.extend(["--source".into(), "vmfork".into(), "--kmsg".into()]);
    extra.push(fifo.display().to_string());
    let (daemon, _) = Daemon::start(&ctx.bin, &ctx.tmp, &extra, false)?;
    // The daemon holds the read end since before it answered: this open
    // does not wait.
    let mut kmsg = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .map_err(|e| format!("open {} for writing: {e}", fifo.display()))?;
    let ours = sysgenid::Probe::open(Some(daemon.dir())).map_err(|e| e.to_string())?;

    // The baseline: a pipe reader publishing to its own page.
    let base_dir = work.path().join("baseline");
    std::fs::create_dir(&base_dir).map_err(|e| e.to_string())?;
    let base_page = write_page(&base_dir, 0);
    let base = sysgenid::Probe::open(Some(&base_dir)).map_err(|e| e.to_string())?;
    let (pipe_r, pipe_w) = pipe();
    let shm = Shm::new(0);
    let raw = pipe_r.as_raw_fd();
    let mut pids = vec![fork_child(|| {
        keep_only_as_3(raw);
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&base_page)
        else {
            return 1;
        };
        let Ok(mut page) = sysgenid_page::PageWriter::new(file, &base_page) else {
            return 1;
        };
        count_up(shm.word(0), 1);
        let mut generation = 0u32;
        let mut b = [0u8; 256];
        while raw_read(3, &mut b) > 0 {
            generation += 1;
            page.publish(&sysgenid_page::PageRecord {
                generation,
                epoch: [1; 16],
                changed_unix_ns: 0,
            });
        }
        0
    })];
    drop(pipe_r);
    let base_pid = pids[0];
    let result = (|| -> Result<Vec<(Checker, Series)>, String> {
        wait_at_least(shm.word(0), 1, ROUND_LIMIT, "the baseline reader")?;
        let mut control = daemon.control();
        let mut rig = Rig {
            kmsg: &mut kmsg,
            ours: &ours,
            base: &base,
            pipe_w: pipe_w.as_raw_fd(),
            control: &mut control,
            seq: 1000,
        };
        let mut out = Vec::new();
        for &checker in checkers {
            eprintln!("(7) … {} (--reseed {reseed})", checker.name());
            let placement = checker.placement(cpus);
            if let Some((mine, theirs)) = placement {
                set_process_affinity(daemon.pid(), &[theirs])
                    .and_then(|()| set_affinity(base_pid, &[theirs]))
                    .and_then(|()| set_affinity(0, &[mine]))
                    .map_err(|e| format!("sched_setaffinity: {e}"))?;
            }
            let series = measure(&mut rig, checker, rounds);
            if placement.is_some() {
                let _ = set_process_affinity(daemon.pid(), cpus);
                let _ = set_affinity(base_pid, cpus);
                let _ = set_affinity(0, cpus);
            }
            out.push((checker, series?));
        }
        Ok(out)
    })();
    drop(pipe_w);
    kill_all(&mut pids);
    drop(kmsg);
    result
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<(), String> {
    let rounds = if ctx.quick() { 50 } else { 1000 };
    let cpus = allowed_cpus();
    let checkers: Vec<Checker> = ctx
        .args
        .checkers
        .clone()
        .unwrap_or(Checker::ALL.to_vec())
        .into_iter()
        .filter(|c| *c != Checker::BusyOther || cpus.len() >= 2)
        .collect();
    let unit_ns = {
        let t = Instant::now();
        let mut acc = 1;
        for _ in 0..1000 {
            acc = work_unit(acc);
        }
        std::hint::black_box(acc);
        t.elapsed().as_nanos() as f64 / 1000.0
    };
    // `auto`: a vmfork signal means the kernel reseeded already, so the
    // daemon does not; `always` adds RNDRESEEDCRNG to the window, which is
    // what every other source (and a manual bump) pays: measured with the
    // yielding checker, next to the same checker without it.
    let results = with_daemon(ctx, rounds, "auto", &checkers, &cpus)?;
    let mut forced = with_daemon(ctx, rounds, "always", &[Checker::Yielding], &cpus)?;
    let t = &mut ctx.table;
    if let (Some((_, f)), Some((_, plain))) = (
        forced.first_mut(),
        results.iter().find(|(c, _)| *c == Checker::Yielding),
    ) {
        let (fw, fin) = (stats(&mut f.window), stats(&mut f.in_bump));
        let (pw, pin) = (
            stats(&mut plain.window.clone()),
            stats(&mut plain.in_bump.clone()),
        );
        t.ratio(
            "7",
            "restore window with a forced kernel reseed (`--reseed always`; what a non-vmfork signal pays), yielding checker, p50",
            fw.p50,
            "the same window without it (vmfork, `--reseed auto`), p50",
            pw.p50,
            Unit::Ns,
            None,
        )
        .why(format!(
            "bump start → page published {} with the reseed, {} without (same run)",
            fmt(fin.p50, Unit::Ns),
            fmt(pin.p50, Unit::Ns)
        ));
    }
    for (checker, mut s) in results {
        let name = checker.name();
        let (window, to_bump, in_bump, after, baseline) = (
            stats(&mut s.window),
            stats(&mut s.to_bump),
            stats(&mut s.in_bump),
            stats(&mut s.after),
            stats(&mut s.baseline),
        );
        let lag = (!s.lags.is_empty()).then(|| stats(&mut s.lags));
        let split = format!(
            "record written → the daemon's bump starts {} (its wake-up, the read, parse, the epoch \
             draw), bump start → page published {} (state save, publish), published → the checker sees it {}; \
             the daemon's own figure (status `last_kernel_lag_us`, record → publication) {}",
            fmt(to_bump.p50, Unit::Ns),
            fmt(in_bump.p50, Unit::Ns),
            fmt(after.p50, Unit::Ns),
            lag.map_or("not reported".into(), |l| fmt(l.p50, Unit::Ns)),
        );
        t.ratio(
            "7",
            &format!(
                "restore window: kmsg record written → page shows it, {name}, p50 of {rounds}"
            ),
            window.p50,
            "pipe wake → reader publishes its page, same checker, p50",
            baseline.p50,
            Unit::Ns,
            checker.goal(),
        )
        .why(format!("of the p50: {split}"));
        t.ratio(
            "7",
            &format!("restore window, {name}, p99"),
            window.p99,
            "pipe wake → page, same checker, p99",
            baseline.p99,
            Unit::Ns,
            None,
        );
        t.notes
            .push(format!("(7, {name}) split of our p50: {split}."));
    }
    t.notes.push(format!(
        "(7) The real path: `sysgenidd --source vmfork --kmsg FIFO` on tmpfs; each round writes one \
         kernel-facility VM-fork record (its timestamp = CLOCK_MONOTONIC now) into the FIFO and checks \
         the page until it shows the next generation. Baseline, interleaved round by round after the same \
         1 ms pause: a forked process blocked in read() on a pipe, which publishes the next generation to \
         a page of the same layout with the same `PageWriter::publish`, watched the same way. Checkers: \
         yielding (sched_yield between checks, not pinned); busy (a spin without yielding), pinned with \
         sched_setaffinity to CPU {} while the daemon's threads and the baseline reader are pinned to CPU {} \
         (the other CPU), or all three to CPU {} (the same CPU); a CPU-bound program (not pinned) that \
         checks between units of work of {} each. Allowed CPUs: {:?}.",
        cpus.get(1).copied().unwrap_or(0),
        cpus.first().copied().unwrap_or(0),
        cpus.first().copied().unwrap_or(0),
        fmt(unit_ns, Unit::Ns),
        cpus,
    ));
    Ok(())
}
