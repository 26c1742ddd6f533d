//! (3) Bump → the last of N watcher processes returns, against N bare
//! messages; and the daemon's memory with the largest N.

use sysgenid_bench::{proc_status_bytes, stats, vm_rss, Stats};

use crate::daemon::{wait_no_watchers, Daemon};
use crate::table::{fmt, Unit};
use crate::wake::{Mech, WakeGroup};
use crate::Ctx;

/// (3) fan-out to N watcher processes (and (6) the daemon's memory with
/// the largest N).
pub(crate) fn run(
    ctx: &mut Ctx,
    daemon: &Daemon,
    control: &mut sysgenid::Control,
    idle_rss: u64,
    nofile: u64,
) -> Result<(), String> {
    // The daemon holds one descriptor per watcher (its socket; the peer's
    // pidfd is asked for only on a bump) under the RLIMIT_NOFILE it
    // inherits from us, less its reserve; without CAP_SYS_RESOURCE the hard
    // limit cannot be raised, so a size above what fits is measured at the
    // largest size that does.
    let capacity = nofile.saturating_sub(400) as usize;
    let sizes: Vec<usize> = fanout_sizes(ctx)
        .into_iter()
        .map(|n| n.min(capacity))
        .collect();
    if fanout_sizes(ctx).iter().any(|&n| n > capacity) {
        ctx.table.notes.push(format!(
            "(3, 6) RLIMIT_NOFILE is {nofile} here (hard limit; raising it needs CAP_SYS_RESOURCE, which this \
             machine's root lacks) and sysgenidd holds one descriptor per watcher (its socket), so at most \
             {capacity} watchers fit: the largest fan-out ran with {capacity} watchers."
        ));
    }
    let max_n = sizes.iter().copied().max().unwrap_or(0);
    for &n in &sizes {
        let rounds = if ctx.quick() {
            3
        } else {
            match n {
                0..=100 => 30,
                101..=1000 => 10,
                _ => 5,
            }
        };
        let mechs = [Mech::Sysgenid, Mech::Futex, Mech::Unix];
        eprintln!("(3) fan-out N = {n}, {rounds} rounds");
        wait_no_watchers(control)?;
        let mut results: Vec<Stats> = Vec::new();
        let mut internal = Stats::default();
        let (mut rss, mut rss_anon, mut rss_file) = (None, None, None);
        if n * mechs.len() <= 4000 {
            // All alive at once, rounds interleaved.
            let mut groups = mechs
                .iter()
                .map(|&m| WakeGroup::new(m, n, daemon.dir()))
                .collect::<Result<Vec<_>, _>>()?;
            if n == max_n {
                rss = vm_rss(daemon.pid());
                rss_anon = proc_status_bytes(daemon.pid(), "RssAnon");
                rss_file = proc_status_bytes(daemon.pid(), "RssFile");
            }
            for _ in 0..rounds {
                for g in groups.iter_mut() {
                    g.round(control)?;
                }
            }
            for g in groups.iter_mut() {
                results.push(stats(&mut g.samples));
            }
            internal = stats(&mut groups[0].internal);
        } else {
            // Too many processes for all at once: one mechanism at a time.
            for &m in &mechs {
                wait_no_watchers(control)?;
                let mut g = WakeGroup::new(m, n, daemon.dir())?;
                if m == Mech::Sysgenid && n == max_n {
                    rss = vm_rss(daemon.pid());
                    rss_anon = proc_status_bytes(daemon.pid(), "RssAnon");
                    rss_file = proc_status_bytes(daemon.pid(), "RssFile");
                }
                for _ in 0..rounds {
                    g.round(control)?;
                }
                results.push(stats(&mut g.samples));
                if m == Mech::Sysgenid {
                    internal = stats(&mut g.internal);
                }
            }
        }
        let (ours, futex, unix) = (results[0], results[1], results[2]);
        let what = format!("bump → last of {n} watchers returns (median of {rounds})");
        let goal = match n {
            1000 => Some(1.3),
            10_000 => Some(1.2),
            _ => None,
        };
        let nf = n as f64;
        ctx.table
            .ratio(
                "3",
                &what,
                ours.p50,
                &format!("{n} AF_UNIX msgs, bare loop"),
                unix.p50,
                Unit::Ns,
                goal,
            )
            .why(format!(
                "request → bump start {}; bump start → last watcher {} = {} per watcher against {} per \
                 bare message (one thread writes every Changed frame, then each watcher's read needs its CPU)",
                fmt((ours.p50 - internal.p50).max(0.0), Unit::Ns),
                fmt(internal.p50, Unit::Ns),
                fmt(internal.p50 / nf, Unit::Ns),
                fmt(unix.p50 / nf, Unit::Ns)
            ));
        ctx.table.ratio(
            "3",
            &what,
            ours.p50,
            "one futex wake-all",
            futex.p50,
            Unit::Ns,
            None,
        );
        if let Some(rss) = rss {
            let per = rss.saturating_sub(idle_rss) as f64 / n as f64;
            ctx.table.value(
                "6",
                &format!("daemon VmRSS with {n} watchers"),
                fmt(rss as f64, Unit::Bytes),
                "—",
                None,
            );
            ctx.table
                .value(
                    "6",
                    &format!("daemon memory per watcher ((RSS@{n} − idle)/{n})"),
                    fmt(per, Unit::Bytes),
                    "≤ 256 B",
                    Some(per <= 256.0),
                )
                .why(format!(
                    "with {n} watchers RssAnon {} (heap: per-connection state, buffers, poll \
                     registrations), RssFile {}",
                    rss_anon.map_or("?".into(), |b| fmt(b as f64, Unit::Bytes)),
                    rss_file.map_or("?".into(), |b| fmt(b as f64, Unit::Bytes)),
                ));
        }
    }
    Ok(())
}

pub(crate) fn fanout_sizes(ctx: &Ctx) -> Vec<usize> {
    ctx.args.fanout.clone().unwrap_or(if ctx.quick() {
        vec![10, 100]
    } else {
        vec![10, 100, 1000, 10_000]
    })
}
