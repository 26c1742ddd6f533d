//! (4) The last watcher's ack → `wait_watchers` returns in another
//! process, against a socket round trip.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sysgenid_bench::{
    close_from, count_up, fork_child, futex_wake, kill_all, now_ns, stats, wait_at_least, Shm,
};

use crate::baseline::Echo;
use crate::daemon::{wait_no_watchers, Daemon};
use crate::table::Unit;
use crate::wake::wait_word;
use crate::Ctx;

pub(crate) const B_READY: usize = 0;
pub(crate) const B_ARMED: usize = 1;
pub(crate) const B_GOT: usize = 2;
pub(crate) const B_WAIT_REQ: usize = 3;
pub(crate) const B_RELEASE_FIRST: usize = 4;
pub(crate) const B_RELEASE_LAST: usize = 5;
pub(crate) const B_ACKED: usize = 6;
pub(crate) const B_WAITED: usize = 7;
pub(crate) const B_FAILED: usize = 8;

/// One barrier round per call: bump, every watcher reads, a waiter process
/// sends `WaitWatchers`, N-1 watchers ack, then the last one alone; the
/// figure is the waiter's return time minus the time the last watcher
/// started its ack.
pub(crate) struct BarrierGroup {
    n: usize,
    shm: Shm,
    pids: Vec<libc::pid_t>,
    round: u32,
    samples: Vec<f64>,
}

impl BarrierGroup {
    pub(crate) fn new(n: usize, dir: &Path) -> Result<BarrierGroup, String> {
        let shm = Shm::new(n + 1);
        let mut g = BarrierGroup {
            n,
            shm,
            pids: Vec::new(),
            round: 0,
            samples: Vec::new(),
        };
        let total = n as u32 + 1;
        for i in 0..n {
            let shm = &g.shm;
            let pid = fork_child(|| {
                close_from(3);
                barrier_watcher(shm, i, n, dir)
            });
            g.pids.push(pid);
        }
        let shm = &g.shm;
        let pid = fork_child(|| {
            close_from(3);
            let mut control = match sysgenid::Control::connect(Some(dir)) {
                Ok(c) => c,
                Err(_) => {
                    shm.word(B_FAILED).fetch_add(1, Ordering::AcqRel);
                    count_up(shm.word(B_READY), total);
                    return 1;
                }
            };
            count_up(shm.word(B_READY), total);
            let mut r = 1;
            loop {
                wait_word(shm.word(B_WAIT_REQ), r);
                if control.wait_watchers(None).is_err() {
                    return 1;
                }
                shm.slot(n).store(now_ns(), Ordering::Release);
                count_up(shm.word(B_WAITED), r);
                r += 1;
            }
        });
        g.pids.push(pid);
        let limit = Duration::from_secs(60 + n as u64 / 50);
        wait_at_least(
            g.shm.word(B_READY),
            total,
            limit,
            "barrier processes to start",
        )?;
        if g.shm.word(B_FAILED).load(Ordering::Acquire) > 0 {
            return Err("barrier processes failed to start".into());
        }
        Ok(g)
    }

    pub(crate) fn round(&mut self, control: &mut sysgenid::Control) -> Result<f64, String> {
        let n = self.n as u32;
        self.round += 1;
        let r = self.round;
        let limit = Duration::from_secs(60 + self.n as u64 / 50);
        let w = |i| self.shm.word(i);
        wait_at_least(w(B_ARMED), r * n, limit, "barrier watchers to arm")?;
        std::thread::sleep(Duration::from_micros(1000 + 20 * self.n as u64));
        control.bump(0).map_err(|e| format!("bump: {e}"))?;
        wait_at_least(w(B_GOT), r * n, limit, "barrier watchers to read")?;
        // The waiter sends WaitWatchers; give the daemon time to park it.
        w(B_WAIT_REQ).store(r, Ordering::Release);
        futex_wake(w(B_WAIT_REQ), i32::MAX);
        std::thread::sleep(Duration::from_millis(3));
        w(B_RELEASE_FIRST).store(r, Ordering::Release);
        futex_wake(w(B_RELEASE_FIRST), i32::MAX);
        wait_at_least(w(B_ACKED), (r - 1) * n + (n - 1), limit, "first acks")?;
        std::thread::sleep(Duration::from_millis(1));
        if w(B_WAITED).load(Ordering::Acquire) >= r {
            return Err("the barrier returned before the last ack".into());
        }
        w(B_RELEASE_LAST).store(r, Ordering::Release);
        futex_wake(w(B_RELEASE_LAST), i32::MAX);
        wait_at_least(w(B_WAITED), r, limit, "the barrier to return")?;
        wait_at_least(w(B_ACKED), r * n, limit, "the last ack")?;
        let last_ack = self.shm.slot(self.n - 1).load(Ordering::Acquire);
        let done = self.shm.slot(self.n).load(Ordering::Acquire);
        let v = done.saturating_sub(last_ack) as f64;
        self.samples.push(v);
        Ok(v)
    }
}

impl Drop for BarrierGroup {
    fn drop(&mut self) {
        kill_all(&mut self.pids);
    }
}

pub(crate) fn barrier_watcher(shm: &Shm, i: usize, n: usize, dir: &Path) -> i32 {
    let total = n as u32 + 1;
    let n32 = n as u32;
    let mut w = match sysgenid::Watcher::builder()
        .runtime_dir(dir)
        .reconnect(false)
        .open()
    {
        Ok(w) => w,
        Err(_) => {
            shm.word(B_FAILED).fetch_add(1, Ordering::AcqRel);
            count_up(shm.word(B_READY), total);
            return 1;
        }
    };
    count_up(shm.word(B_READY), total);
    let last = i == n - 1;
    let mut r = 1u32;
    loop {
        count_up(shm.word(B_ARMED), r * n32);
        let Ok(g) = w.read() else { return 1 };
        count_up(shm.word(B_GOT), r * n32);
        wait_word(
            shm.word(if last {
                B_RELEASE_LAST
            } else {
                B_RELEASE_FIRST
            }),
            r,
        );
        if last {
            shm.slot(i).store(now_ns(), Ordering::Release);
        }
        if w.ack(g).is_err() {
            return 1;
        }
        let target = if last {
            r * n32
        } else {
            (r - 1) * n32 + n32 - 1
        };
        count_up(shm.word(B_ACKED), target);
        r += 1;
    }
}

/// (4) last ack → wait-watchers returns.
pub(crate) fn run(
    ctx: &mut Ctx,
    daemon: &Daemon,
    control: &mut sysgenid::Control,
) -> Result<(), String> {
    let sizes = ctx.args.barrier.clone().unwrap_or(if ctx.quick() {
        vec![1, 10]
    } else {
        vec![1, 100, 1000]
    });
    let echo = Echo::new();
    for &n in &sizes {
        let rounds = if ctx.quick() {
            5
        } else {
            match n {
                0..=100 => 50,
                _ => 20,
            }
        };
        eprintln!("(4) barrier N = {n}, {rounds} rounds");
        wait_no_watchers(control)?;
        let mut g = BarrierGroup::new(n, daemon.dir())?;
        let mut rtts = Vec::new();
        for _ in 0..rounds {
            g.round(control)?;
            std::thread::sleep(Duration::from_millis(1));
            echo.rtts(5, &mut rtts);
        }
        let ours = stats(&mut g.samples);
        let rtt = stats(&mut rtts);
        ctx.table
            .ratio(
                "4",
                &format!("last ack → wait-watchers returns, {n} watcher(s), p50 of {rounds}"),
                ours.p50,
                "AF_UNIX round trip p50",
                rtt.p50,
                Unit::Ns,
                Some(2.0),
            )
            .why(format!(
                "{:.1} round trips: the ack goes to the daemon, which then answers the parked \
                 WaitWatchers; the waiter cannot see the barrier on the page, so it needs both hops and \
                 the daemon's wake-up between them",
                ours.p50 / rtt.p50.max(1.0)
            ));
    }
    ctx.table.notes.push(
        "(4) Measured from the moment the last watcher calls `ack` (the other N−1 have acked and the \
         daemon has answered them; the waiter's `WaitWatchers` has been parked for 3 ms) to the moment \
         the waiting process's `wait_watchers` returns. The baseline is one SOCK_SEQPACKET ping-pong \
         with a forked echo process after the same idle pause."
            .to_string(),
    );
    Ok(())
}
