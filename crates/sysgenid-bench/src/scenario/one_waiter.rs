//! (2) Bump request → one blocked watcher returns, against one hop of each
//! kernel primitive, interleaved round by round.

use std::time::Duration;

use sysgenid_bench::{now_ns, stats, Stats};

use crate::baseline::Echo;
use crate::daemon::Daemon;
use crate::table::{fmt, Unit};
use crate::wake::{Mech, WakeGroup};
use crate::Ctx;

/// (2) bump → one blocked watcher returns, vs eventfd / AF_UNIX / futex
/// with one waiter, interleaved round by round.
pub(crate) fn run(
    ctx: &mut Ctx,
    daemon: &Daemon,
    control: &mut sysgenid::Control,
) -> Result<(), String> {
    let rounds = ctx
        .args
        .wake_rounds
        .unwrap_or(if ctx.quick() { 100 } else { 2000 });
    // Round trips of the daemon itself, before any watcher exists.
    let k = if ctx.quick() { 50 } else { 300 };
    let echo = Echo::new();
    // A second daemon that never reseeds the kernel RNG: the bump round
    // trip with and without RNDRESEEDCRNG, interleaved in the same run.
    let mut extra = ctx.args.daemon_args.clone();
    extra.extend(["--reseed".into(), "never".into()]);
    let (plain, _) = Daemon::start(&ctx.bin, &ctx.tmp, &extra, false)?;
    let mut plain_control = plain.control();
    let (mut bump_rtt, mut status_rtt, mut sock_rtt) = (Vec::new(), Vec::new(), Vec::new());
    let mut plain_rtt = Vec::new();
    for _ in 0..k {
        std::thread::sleep(Duration::from_micros(1000));
        let t = now_ns();
        control.bump(0).map_err(|e| format!("bump: {e}"))?;
        bump_rtt.push((now_ns() - t) as f64);
        std::thread::sleep(Duration::from_micros(1000));
        let t = now_ns();
        plain_control
            .bump(0)
            .map_err(|e| format!("bump (--reseed never): {e}"))?;
        plain_rtt.push((now_ns() - t) as f64);
        std::thread::sleep(Duration::from_micros(1000));
        let t = now_ns();
        control.status().map_err(|e| format!("status: {e}"))?;
        status_rtt.push((now_ns() - t) as f64);
        std::thread::sleep(Duration::from_micros(1000));
        sock_rtt.push(echo.rtt());
    }
    drop(plain_control);
    drop(plain);
    let reseeded = control
        .status()
        .ok()
        .and_then(|s| s.last_change_rng)
        .map_or("unknown".to_string(), |r| {
            match (r.by, r.not_reseeded_because) {
                (Some(by), _) => format!("reseeded by {by}"),
                (None, why) => format!("not reseeded: {}", why.unwrap_or_default()),
            }
        });
    let (bump_rtt, status_rtt, sock_rtt, plain_rtt) = (
        stats(&mut bump_rtt),
        stats(&mut status_rtt),
        stats(&mut sock_rtt),
        stats(&mut plain_rtt),
    );
    let mechs = [Mech::Sysgenid, Mech::Eventfd, Mech::Unix, Mech::Futex];
    let mut groups = mechs
        .iter()
        .map(|&m| WakeGroup::new(m, 1, daemon.dir()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rtts = Vec::new();
    for _ in 0..rounds {
        for g in groups.iter_mut() {
            g.round(control)?;
        }
        std::thread::sleep(Duration::from_micros(1000));
        rtts.push(echo.rtt());
    }
    let s: Vec<Stats> = groups.iter_mut().map(|g| stats(&mut g.samples)).collect();
    let internal = stats(&mut groups[0].internal);
    let rtt = stats(&mut rtts);
    let (ours, efd, unix, futex) = (s[0], s[1], s[2], s[3]);
    let t = &mut ctx.table;
    t.ratio(
        "2",
        "bump request → 1 watcher returns, p50",
        ours.p50,
        "one AF_UNIX msg (one hop) p50",
        unix.p50,
        Unit::Ns,
        Some(3.0),
    )
    .why(format!(
        "request → the daemon's bump starts {} (one hop, the daemon's wake-up, the request's checks \
         and epoch draw: the daemon's own calls are the `split` rows), bump start → the watcher returns {} \
         (state save, page, Changed frame: the second hop); the bump round trip alone, no watcher, is {}",
        fmt((ours.p50 - internal.p50).max(0.0), Unit::Ns),
        fmt(internal.p50, Unit::Ns),
        fmt(bump_rtt.p50, Unit::Ns)
    ));
    t.ratio(
        "2",
        "bump → 1 watcher returns, p99",
        ours.p99,
        "AF_UNIX msg p99",
        unix.p99,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "bump → 1 watcher returns, p50",
        ours.p50,
        "eventfd p50",
        efd.p50,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "bump → 1 watcher returns, p99",
        ours.p99,
        "eventfd p99",
        efd.p99,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "bump → 1 watcher returns, p50",
        ours.p50,
        "futex wake p50",
        futex.p50,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "bump → 1 watcher returns, p50",
        ours.p50,
        "AF_UNIX round trip p50",
        rtt.p50,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "daemon's bump starts (page stamp) → 1 watcher returns, p50",
        internal.p50,
        "AF_UNIX msg p50",
        unix.p50,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "diagnostic: `Control::bump` round trip (no watcher), p50",
        bump_rtt.p50,
        "AF_UNIX round trip p50",
        sock_rtt.p50,
        Unit::Ns,
        None,
    );
    t.ratio(
        "2",
        "`Control::bump` round trip with the kernel RNG reseed (default `--reseed auto`), p50",
        bump_rtt.p50,
        "the same against a daemon with `--reseed never`, p50",
        plain_rtt.p50,
        Unit::Ns,
        None,
    )
    .why(format!(
        "the added cost of RNDRESEEDCRNG before the epoch draw (this daemon's last change: {reseeded}); p99 {} vs {}",
        fmt(bump_rtt.p99, Unit::Ns),
        fmt(plain_rtt.p99, Unit::Ns)
    ));
    t.ratio(
        "2",
        "diagnostic: `Control::status` round trip, p50",
        status_rtt.p50,
        "AF_UNIX round trip p50",
        sock_rtt.p50,
        Unit::Ns,
        None,
    );
    t.notes.push(format!(
        "(2) {rounds} rounds, mechanisms interleaved round by round, each after a 1 ms idle pause; \
         one-way AF_UNIX p50/p99 {}/{}, eventfd {}/{}, futex {}/{}, AF_UNIX round trip {}/{}. \
         Our path is bump request → daemon (state saved, page published) → Changed frame → the watcher's poll returns and it peeks the frame: \
         two socket hops where the baselines have one.",
        fmt(unix.p50, Unit::Ns), fmt(unix.p99, Unit::Ns), fmt(efd.p50, Unit::Ns), fmt(efd.p99, Unit::Ns),
        fmt(futex.p50, Unit::Ns), fmt(futex.p99, Unit::Ns), fmt(rtt.p50, Unit::Ns), fmt(rtt.p99, Unit::Ns)
    ));
    Ok(())
}
