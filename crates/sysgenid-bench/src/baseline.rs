//! Same-run baselines shared by several scenarios: a socket round trip to a
//! forked echo process.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use sysgenid_bench::{fork_child, kill_all, now_ns};

use crate::rawfd::{keep_only_as_3, raw_recv, raw_send, socketpair_seqpacket};

/// Round trips on a SOCK_SEQPACKET pair with a forked echo process, one per
/// call after an idle pause (the same conditions as a barrier round).
pub(crate) struct Echo {
    fd: OwnedFd,
    pid: Vec<libc::pid_t>,
}

impl Echo {
    pub(crate) fn new() -> Echo {
        let (mine, theirs) = socketpair_seqpacket();
        let raw = theirs.as_raw_fd();
        let pid = fork_child(|| {
            keep_only_as_3(raw);
            let mut b = [0u8; 64];
            loop {
                let n = raw_recv(3, &mut b);
                if n <= 0 {
                    return 0;
                }
                raw_send(3, &b[..n as usize]);
            }
        });
        Echo {
            fd: mine,
            pid: vec![pid],
        }
    }

    pub(crate) fn rtt(&self) -> f64 {
        let mut b = [0u8; 64];
        let t0 = now_ns();
        raw_send(self.fd.as_raw_fd(), &[2, 1, 0, 0, 0]);
        raw_recv(self.fd.as_raw_fd(), &mut b);
        (now_ns() - t0) as f64
    }

    /// `k` round trips, each after a 4 ms idle pause: as long as the
    /// barrier's waiter is parked before the last ack (3 ms + 1 ms), so both
    /// wake equally idle CPUs. More than one sample per round: the
    /// distribution is bimodal (same CPU or not).
    pub(crate) fn rtts(&self, k: usize, into: &mut Vec<f64>) {
        for _ in 0..k {
            std::thread::sleep(Duration::from_millis(4));
            into.push(self.rtt());
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        kill_all(&mut self.pid);
    }
}
