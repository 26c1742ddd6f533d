//! Wake groups: N forked waiters of one mechanism (sysgenid watchers, or a
//! kernel primitive as the baseline), woken together once per round; the
//! round's figure is the last waiter's wake-up time minus the trigger time.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sysgenid_bench::{
    close_from, count_up, fork_child, futex_wait, futex_wake, kill_all, now_ns, realtime_ns,
    wait_at_least, Shm,
};

use crate::rawfd::{
    eventfd, keep_only_as_3, raw_read, raw_recv, raw_send, raw_write, socketpair_seqpacket,
};

/// How a group of N waiting processes is woken.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mech {
    /// `sysgenid::Watcher::read` woken by a `Control::bump` (the daemon's
    /// fan-out: one `Changed` frame per watcher).
    Sysgenid,
    /// One `FUTEX_WAKE` of all on a word of a shared mapping.
    Futex,
    /// One eventfd per waiter, written by a bare loop.
    Eventfd,
    /// One AF_UNIX `SOCK_SEQPACKET` pair per waiter, one 5-byte message
    /// each sent by a bare loop (the daemon's own wire shape).
    Unix,
}

impl Mech {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mech::Sysgenid => "sysgenid",
            Mech::Futex => "futex wake-all",
            Mech::Eventfd => "eventfd",
            Mech::Unix => "AF_UNIX msg",
        }
    }
}

// Shared words of a wake group.
pub(crate) const W_READY: usize = 0;
pub(crate) const W_ARMED: usize = 1;
pub(crate) const W_DONE: usize = 2;
pub(crate) const W_FUTEX: usize = 3;
pub(crate) const W_RELEASE: usize = 4;
pub(crate) const W_FAILED: usize = 5;

/// N forked waiters of one mechanism. Each round: every child has armed
/// (about to block), the parent takes `t0` and triggers, each child stores
/// its wake-up time in its slot; the round's figure is `max(slot) - t0`.
pub(crate) struct WakeGroup {
    pub(crate) mech: Mech,
    pub(crate) n: usize,
    pub(crate) shm: Shm,
    pub(crate) pids: Vec<libc::pid_t>,
    /// Parent ends (eventfds / sockets), one per child.
    pub(crate) fds: Vec<OwnedFd>,
    pub(crate) round: u32,
    pub(crate) samples: Vec<f64>,
    /// Sysgenid only: from the daemon's own bump start (the page's
    /// `changed_unix_ns`, CLOCK_REALTIME) to the last wake-up.
    pub(crate) internal: Vec<f64>,
    pub(crate) probe: Option<sysgenid::Probe>,
}

impl WakeGroup {
    pub(crate) fn new(mech: Mech, n: usize, dir: &Path) -> Result<WakeGroup, String> {
        // Slots 0..n: CLOCK_MONOTONIC wake-ups; n..2n: CLOCK_REALTIME ones.
        let shm = Shm::new(2 * n);
        let probe = match mech {
            Mech::Sysgenid => Some(sysgenid::Probe::open(Some(dir)).map_err(|e| e.to_string())?),
            _ => None,
        };
        let mut g = WakeGroup {
            mech,
            n,
            shm,
            pids: Vec::with_capacity(n),
            fds: Vec::new(),
            round: 0,
            samples: Vec::new(),
            internal: Vec::new(),
            probe,
        };
        for i in 0..n {
            let pid = match mech {
                Mech::Sysgenid => {
                    let shm = &g.shm;
                    fork_child(|| {
                        close_from(3);
                        sysgenid_child(shm, i, n, dir)
                    })
                }
                Mech::Futex => {
                    let shm = &g.shm;
                    fork_child(|| {
                        close_from(3);
                        raw_child(shm, i, n, |_| {
                            let w = shm.word(W_FUTEX);
                            let seen = w.load(Ordering::Acquire);
                            move || {
                                while w.load(Ordering::Acquire) == seen {
                                    futex_wait(w, seen, None);
                                }
                            }
                        })
                    })
                }
                Mech::Eventfd => {
                    let efd = eventfd();
                    let shm = &g.shm;
                    let raw = efd.as_raw_fd();
                    let pid = fork_child(|| {
                        keep_only_as_3(raw);
                        raw_child(shm, i, n, |_| {
                            || {
                                let mut b = [0u8; 8];
                                raw_read(3, &mut b);
                            }
                        })
                    });
                    g.fds.push(efd);
                    pid
                }
                Mech::Unix => {
                    let (mine, theirs) = socketpair_seqpacket();
                    let shm = &g.shm;
                    let raw = theirs.as_raw_fd();
                    let pid = fork_child(|| {
                        keep_only_as_3(raw);
                        raw_child(shm, i, n, |_| {
                            || {
                                let mut b = [0u8; 64];
                                raw_recv(3, &mut b);
                            }
                        })
                    });
                    drop(theirs);
                    g.fds.push(mine);
                    pid
                }
            };
            g.pids.push(pid);
        }
        let limit = Duration::from_secs(60 + n as u64 / 50);
        wait_at_least(g.shm.word(W_READY), n as u32, limit, "waiters to start")?;
        let failed = g.shm.word(W_FAILED).load(Ordering::Acquire);
        if failed > 0 {
            return Err(format!(
                "{failed} of {n} {} waiters failed to start",
                mech.name()
            ));
        }
        Ok(g)
    }

    /// One round; returns the latency of the last waiter in ns.
    pub(crate) fn round(&mut self, control: &mut sysgenid::Control) -> Result<f64, String> {
        let n = self.n as u32;
        self.round += 1;
        let r = self.round;
        let limit = Duration::from_secs(60 + self.n as u64 / 50);
        wait_at_least(self.shm.word(W_ARMED), r * n, limit, "waiters to arm")?;
        // Armed means "about to block": give them time to get there.
        std::thread::sleep(Duration::from_micros(1000 + 20 * self.n as u64));
        self.shm.clear_slots();
        let t0 = now_ns();
        match self.mech {
            Mech::Sysgenid => {
                control.bump(0).map_err(|e| format!("bump: {e}"))?;
            }
            Mech::Futex => {
                self.shm.word(W_FUTEX).fetch_add(1, Ordering::AcqRel);
                futex_wake(self.shm.word(W_FUTEX), i32::MAX);
            }
            Mech::Eventfd => {
                for fd in &self.fds {
                    raw_write(fd.as_raw_fd(), &1u64.to_ne_bytes());
                }
            }
            Mech::Unix => {
                let frame = [0x82u8, 1, 0, 0, 0];
                for fd in &self.fds {
                    raw_send(fd.as_raw_fd(), &frame);
                }
            }
        }
        wait_at_least(self.shm.word(W_DONE), r * n, limit, "waiters to wake")?;
        let last = self.shm.max_slot(0..self.n);
        if let Some(probe) = &self.probe {
            let started = probe.record().changed_unix_ns;
            let woke = self.shm.max_slot(self.n..2 * self.n);
            self.internal.push(woke.saturating_sub(started) as f64);
        }
        // Let them ack (sysgenid) and re-arm.
        self.shm.word(W_RELEASE).store(r, Ordering::Release);
        futex_wake(self.shm.word(W_RELEASE), i32::MAX);
        let v = last.saturating_sub(t0) as f64;
        self.samples.push(v);
        Ok(v)
    }
}

impl Drop for WakeGroup {
    fn drop(&mut self) {
        kill_all(&mut self.pids);
    }
}

pub(crate) fn wait_release(shm: &Shm, r: u32) {
    let w = shm.word(W_RELEASE);
    loop {
        let v = w.load(Ordering::Acquire);
        if v >= r {
            return;
        }
        futex_wait(w, v, None);
    }
}

/// A baseline waiter: `arm` builds the blocking call for the next round.
pub(crate) fn raw_child<B: FnOnce()>(shm: &Shm, i: usize, n: usize, arm: impl Fn(u32) -> B) -> i32 {
    let n = n as u32;
    count_up(shm.word(W_READY), n);
    let mut r = 1u32;
    loop {
        let block = arm(r);
        count_up(shm.word(W_ARMED), r * n);
        block();
        shm.slot(i).store(now_ns(), Ordering::Release);
        count_up(shm.word(W_DONE), r * n);
        wait_release(shm, r);
        r += 1;
    }
}

/// A sysgenid watcher: blocks in `Watcher::read`, reports, acks when told.
pub(crate) fn sysgenid_child(shm: &Shm, i: usize, n: usize, dir: &Path) -> i32 {
    let n = n as u32;
    let mut w = match sysgenid::Watcher::builder()
        .runtime_dir(dir)
        .reconnect(false)
        .open()
    {
        Ok(w) => w,
        Err(e) => {
            eprintln!("watcher {i}: {e}");
            shm.word(W_FAILED).fetch_add(1, Ordering::AcqRel);
            count_up(shm.word(W_READY), n);
            return 1;
        }
    };
    count_up(shm.word(W_READY), n);
    let mut r = 1u32;
    loop {
        count_up(shm.word(W_ARMED), r * n);
        let g = match w.read() {
            Ok(g) => g,
            Err(_) => return 1,
        };
        shm.slot(i).store(now_ns(), Ordering::Release);
        shm.slot(n as usize + i)
            .store(realtime_ns(), Ordering::Release);
        count_up(shm.word(W_DONE), r * n);
        wait_release(shm, r);
        if w.ack(g).is_err() {
            return 1;
        }
        r += 1;
    }
}

pub(crate) fn wait_word(w: &std::sync::atomic::AtomicU32, r: u32) {
    loop {
        let v = w.load(Ordering::Acquire);
        if v >= r {
            return;
        }
        futex_wait(w, v, None);
    }
}
