//! (6) The daemon's idle memory and its start-up time.

use std::process::{Command, Stdio};
use std::time::Instant;

use sysgenid_bench::{proc_status_bytes, stats};

use crate::daemon::Daemon;
use crate::table::{fmt, Unit};
use crate::Ctx;

/// (6) idle RSS and start-up time.
pub(crate) fn run(ctx: &mut Ctx, idle_rss: u64) -> Result<(), String> {
    // The parts of an idle daemon's RSS, from a fresh one (the reason, if
    // the goal does not hold).
    let (d, _) = Daemon::start(&ctx.bin, &ctx.tmp, &ctx.args.daemon_args, ctx.device)?;
    std::thread::sleep(std::time::Duration::from_millis(50));
    let part = |f| proc_status_bytes(d.pid(), f).map_or("?".into(), |b| fmt(b as f64, Unit::Bytes));
    let why = format!(
        "RssAnon {} (heap, thread stacks in use), RssFile {} (the binary and libc pages touched), \
         RssShmem {} (the page); {} threads",
        part("RssAnon"),
        part("RssFile"),
        part("RssShmem"),
        std::fs::read_dir(format!("/proc/{}/task", d.pid())).map_or(0, |r| r.count())
    );
    drop(d);
    ctx.table
        .value(
            "6",
            "daemon VmRSS idle (after start, no client)",
            fmt(idle_rss as f64, Unit::Bytes),
            "≤ 4 MiB",
            Some(idle_rss <= 4 * 1024 * 1024),
        )
        .why(why);
    let k = if ctx.quick() { 3 } else { 20 };
    let mut ready = Vec::new();
    let mut version = Vec::new();
    for _ in 0..k {
        let (d, t) = Daemon::start(&ctx.bin, &ctx.tmp, &ctx.args.daemon_args, ctx.device)?;
        drop(d);
        ready.push(t.as_nanos() as f64);
        let t = Instant::now();
        Command::new(&ctx.bin)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| e.to_string())?;
        version.push(t.elapsed().as_nanos() as f64);
    }
    let (r, v) = (stats(&mut ready), stats(&mut version));
    ctx.table.ratio(
        "6",
        &format!("start-up: spawn → first client connects, p50 of {k}"),
        r.p50,
        "spawn → exit of `sysgenidd --version`",
        v.p50,
        Unit::Ns,
        None,
    );
    Ok(())
}
