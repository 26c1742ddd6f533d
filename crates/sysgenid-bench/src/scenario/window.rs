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
//! watched the same way, by this process checking `Probe::generation()` in
//! a loop, as a program checking the page on every random draw does (it
//! yields the CPU between checks, so on this 2-CPU machine it is never
//! preempted in favour of the thread it waits for).
//!
//! The record's `USEC` field is `CLOCK_MONOTONIC` at the write, as the
//! kernel's printk clock would be, so the daemon's own lag figure (status
//! `last_kernel_lag_us`: record timestamp → publication) is comparable.
//! With the page's `changed_unix_ns` (stamped by the daemon when its bump
//! starts) it splits our figure in three: record → bump starts (the
//! daemon's wake-up, the read, parse), bump start → published (epoch draw,
//! state save, publish), published → this process sees it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use sysgenid_bench::{
    count_up, fork_child, kill_all, now_ns, realtime_ns, stats, wait_at_least, write_page, Shm,
    Stats,
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

/// Checks `probe` (yielding the CPU between checks) until it shows
/// something other than `old`; returns when.
fn spin_until_changed(probe: &sysgenid::Probe, old: u32, what: &str) -> Result<u64, String> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        if probe.generation() != old {
            return Ok(now_ns());
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(4096) && start.elapsed() > ROUND_LIMIT {
            return Err(format!(
                "{what}: the page still shows {old} after {ROUND_LIMIT:?}"
            ));
        }
        // Yield between checks: on two shared CPUs a pure spin would be
        // preempted for the very thread it waits on.
        std::thread::yield_now();
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

type Measured = (Stats, Stats, Stats, Stats, Stats, Option<Stats>);

/// The rounds against a daemon with `--reseed reseed`: (window, record →
/// bump start, bump start → published, published → seen, baseline, the
/// daemon's own lag).
fn measure(ctx: &Ctx, rounds: u32, reseed: &str) -> Result<Measured, String> {
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
    let result = (|| -> Result<_, String> {
        wait_at_least(shm.word(0), 1, ROUND_LIMIT, "the baseline reader")?;
        let mut control = daemon.control();
        let (mut window, mut to_bump, mut in_bump, mut after, mut baseline, mut lags) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        for r in 1..=rounds {
            std::thread::sleep(Duration::from_millis(1));
            let old = ours.generation();
            let record = fork_record(1000 + r);
            let (t0, t0_real) = (now_ns(), realtime_ns());
            kmsg.write_all(record.as_bytes())
                .map_err(|e| format!("write into the FIFO: {e}"))?;
            let t1 = spin_until_changed(&ours, old, "the daemon's page")?;
            window.push((t1 - t0) as f64);
            let started = ours.record().changed_unix_ns.saturating_sub(t0_real) as f64;
            to_bump.push(started);
            if let Some(lag) = daemon_lag_ns(&mut control) {
                lags.push(lag);
                // The daemon's figure ends at publication (µs resolution).
                in_bump.push((lag - started).max(0.0));
                after.push(((t1 - t0) as f64 - lag).max(0.0));
            }

            std::thread::sleep(Duration::from_millis(1));
            let old = base.generation();
            let t0 = now_ns();
            raw_write(pipe_w.as_raw_fd(), b"x");
            let t1 = spin_until_changed(&base, old, "the baseline page")?;
            baseline.push((t1 - t0) as f64);
        }
        Ok((
            stats(&mut window),
            stats(&mut to_bump),
            stats(&mut in_bump),
            stats(&mut after),
            stats(&mut baseline),
            (!lags.is_empty()).then(|| stats(&mut lags)),
        ))
    })();
    drop(pipe_w);
    kill_all(&mut pids);
    drop(kmsg);
    result
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<(), String> {
    let rounds = if ctx.quick() { 50 } else { 1000 };
    // `auto`: a vmfork signal means the kernel reseeded already, so the
    // daemon does not; `always` adds RNDRESEEDCRNG to the window, which is
    // what every other source (and a manual bump) pays.
    let (window, to_bump, in_bump, after, baseline, lag) = measure(ctx, rounds, "auto")?;
    let (forced, _, forced_in_bump, _, _, _) = measure(ctx, rounds, "always")?;
    let t = &mut ctx.table;
    let split = format!(
        "record written → the daemon's bump starts {} (its wake-up, the read, parse), bump start → \
         page published {} (epoch draw, state save, publish), published → the checker sees it {} (the \
         daemon's work after publishing, its log line, keeps a shared CPU)",
        fmt(to_bump.p50, Unit::Ns),
        fmt(in_bump.p50, Unit::Ns),
        fmt(after.p50, Unit::Ns)
    );
    t.ratio(
        "7",
        &format!("restore window: kmsg record written → page shows it, p50 of {rounds}"),
        window.p50,
        "pipe wake → reader publishes its page, p50",
        baseline.p50,
        Unit::Ns,
        Some(2.0),
    )
    .why(format!("of the p50: {split}"));
    t.ratio(
        "7",
        "restore window with a forced kernel reseed (`--reseed always`; what a non-vmfork signal pays), p50",
        forced.p50,
        "the same window without it (vmfork, `--reseed auto`), p50",
        window.p50,
        Unit::Ns,
        None,
    )
    .why(format!(
        "bump start → page published {} with the reseed, {} without (same run)",
        fmt(forced_in_bump.p50, Unit::Ns),
        fmt(in_bump.p50, Unit::Ns)
    ));
    t.ratio(
        "7",
        "restore window, p99",
        window.p99,
        "pipe wake → page, p99",
        baseline.p99,
        Unit::Ns,
        None,
    );
    match lag {
        Some(lag) => {
            t.ratio(
                "7",
                "the daemon's own figure: record timestamp → publication (status `last_kernel_lag_us`), p50",
                lag.p50,
                "pipe wake → page, p50",
                baseline.p50,
                Unit::Ns,
                None,
            );
        }
        None => {
            t.value(
                "7",
                "the daemon's own figure (status `last_kernel_lag_us`)",
                "not reported by this daemon".into(),
                "—",
                None,
            );
        }
    }
    t.notes.push(format!(
        "(7) The real path: `sysgenidd --source vmfork --kmsg FIFO` on tmpfs; each round writes one \
         kernel-facility VM-fork record (its timestamp = CLOCK_MONOTONIC now) into the FIFO and checks \
         the page (sched_yield between checks) until it shows the next generation. Baseline, interleaved round by round after the same \
         1 ms pause: a forked process blocked in read() on a pipe, which publishes the next generation to \
         a page of the same layout with the same `PageWriter::publish`, watched the same way. Split of our \
         p50 by the page's own bump stamp: {split}."
    ));
    Ok(())
}
