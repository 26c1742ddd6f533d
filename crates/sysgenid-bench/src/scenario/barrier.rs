//! (4) The last watcher's ack → `wait_watchers` returns in another
//! process, against a socket round trip.
//!
//! Rounds alternate between the client's `Control::wait_watchers` (which
//! waits on the page's futex word when the daemon publishes the barrier's
//! count) and a raw `WaitWatchers` request parked at the daemon (the
//! socket path), so both are measured in the same run under the same load.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sysgenid_bench::{
    close_from, count_up, fork_child, futex_wake, kill_all, now_ns, stats, wait_at_least, Shm,
};

use std::os::fd::AsRawFd;

use crate::baseline::Echo;
use crate::daemon::{wait_no_watchers, Daemon};
use crate::rawfd::{raw_recv, raw_send};
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
    /// Odd rounds: the client library (page futex when available).
    samples: Vec<f64>,
    /// Even rounds: a raw `WaitWatchers` parked at the daemon.
    socket_samples: Vec<f64>,
}

/// A raw `Control` connection to the daemon: `Hello`, then `WaitWatchers`
/// frames answered by the daemon itself (the socket path, no page).
fn raw_control(dir: &Path) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let path = dir.join("sysgenid.sock");
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.len() >= addr.sun_path.len() {
        return None;
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: connect(2) with a valid, initialised sockaddr_un and its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return None;
    }
    let hello = sysgenid_proto::Request::Hello {
        version: sysgenid_proto::MIN_PROTOCOL_VERSION,
        role: sysgenid_proto::Role::Control,
    }
    .encode();
    raw_send(fd.as_raw_fd(), &hello);
    let mut buf = [0u8; 4096];
    let n = raw_recv(fd.as_raw_fd(), &mut buf);
    match sysgenid_proto::Reply::decode(&buf[..n.max(0) as usize]) {
        Ok(sysgenid_proto::Reply::Welcome { .. }) => Some(fd),
        _ => None,
    }
}

/// One `WaitWatchers` (no timeout) on a raw connection: true on `Done`.
fn raw_wait(fd: &std::os::fd::OwnedFd) -> bool {
    let frame = sysgenid_proto::Request::WaitWatchers { timeout_ms: 0 }.encode();
    raw_send(fd.as_raw_fd(), &frame);
    let mut buf = [0u8; 4096];
    let n = raw_recv(fd.as_raw_fd(), &mut buf);
    matches!(
        sysgenid_proto::Reply::decode(&buf[..n.max(0) as usize]),
        Ok(sysgenid_proto::Reply::Done { .. })
    )
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
            socket_samples: Vec::new(),
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
            let raw = raw_control(dir);
            let mut control = match sysgenid::Control::connect(Some(dir)) {
                Ok(c) if raw.is_some() => c,
                _ => {
                    shm.word(B_FAILED).fetch_add(1, Ordering::AcqRel);
                    count_up(shm.word(B_READY), total);
                    return 1;
                }
            };
            count_up(shm.word(B_READY), total);
            let mut r = 1;
            loop {
                wait_word(shm.word(B_WAIT_REQ), r);
                let ok = if r % 2 == 1 {
                    control.wait_watchers(None).is_ok()
                } else {
                    raw.as_ref().is_some_and(raw_wait)
                };
                if !ok {
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
        if r % 2 == 1 {
            self.samples.push(v);
        } else {
            self.socket_samples.push(v);
        }
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
            6
        } else {
            // Two interleaved series (page, socket) of 50 or 20 each.
            match n {
                0..=100 => 100,
                _ => 40,
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
        let socket = stats(&mut g.socket_samples);
        let rtt = stats(&mut rtts);
        let half = g.samples.len();
        ctx.table
            .ratio(
                "4",
                &format!("last ack → wait-watchers returns, {n} watcher(s), p50 of {half}"),
                ours.p50,
                "AF_UNIX round trip p50",
                rtt.p50,
                Unit::Ns,
                Some(2.0),
            )
            .why(format!(
                "{:.1} round trips: the ack's hop to the daemon, its wake-up and the futex wake of the \
                 waiter (the page carries the count); the waiter woken on a busy CPU waits for it",
                ours.p50 / rtt.p50.max(1.0)
            ));
        ctx.table.ratio(
            "4",
            &format!(
                "diagnostic: the same, WaitWatchers parked at the daemon (socket path), {n} watcher(s), p50 of {}",
                g.socket_samples.len()
            ),
            socket.p50,
            "AF_UNIX round trip p50",
            rtt.p50,
            Unit::Ns,
            None,
        );
    }
    ctx.table.notes.push(
        "(4) Measured from the moment the last watcher calls `ack` (the other N−1 have acked and the \
         daemon has answered them; the waiter's `WaitWatchers` has been parked for 3 ms) to the moment \
         the waiting process's `wait_watchers` returns. Rounds alternate between the client library \
         (a futex wait on the page's `outdated_tracked`) and a raw `WaitWatchers` parked at the daemon \
         (the diagnostic row: the socket path). The baseline is one SOCK_SEQPACKET ping-pong \
         with a forked echo process after the same idle pause."
            .to_string(),
    );
    Ok(())
}
