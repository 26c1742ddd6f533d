//! Load and soak: thousands of watchers and many bumps.
//!
//! CI mode (default): 1 000 watchers, 30 bumps. `SYSGENID_FULL=1`: 10 000
//! watchers, 1 000 bumps (numbers in `docs/reliability.md`). The watchers
//! live in this process as non-blocking `sysgenid::Watcher`s; the daemon
//! inherits this process's raised `RLIMIT_NOFILE`.
//!
//! Checked after every bump: every watcher reads exactly the new
//! generation, `status().outdated` is exactly the number of tracked
//! watchers that have not acknowledged it, before and after a random
//! subset acknowledges. At the end: the daemon's memory returns near its
//! idle level once the watchers are gone, and a second wave of watchers
//! does not grow it (no per-connection leak). No timing assertions except
//! generous liveness bounds.

use std::time::{Duration, Instant};

use sysgenid::Watcher;
use sysgenid_tests::*;

fn full() -> bool {
    std::env::var_os("SYSGENID_FULL").is_some_and(|v| v != "0")
}

fn proc_field(pid: u32, file: &str, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/{file}"))
        .to_string()
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn open_watchers(dir: &std::path::Path, n: usize) -> Vec<Watcher> {
    (0..n)
        .map(|i| {
            Watcher::builder()
                .runtime_dir(dir)
                .nonblocking(true)
                .reconnect(false)
                .open()
                .unwrap_or_else(|e| panic!("watcher {i}: {e}"))
        })
        .collect()
}

#[test]
fn thousands_of_watchers_see_every_bump_with_exact_counts() {
    let (n, bumps, ack_percent) = if full() {
        (10_000usize, 1_000u32, 10u64)
    } else {
        (1_000, 30, 25)
    };
    let nofile = raise_nofile_to(n as u64 + 1024);
    // The daemon needs one descriptor per connection (plus a reserve of
    // 64), and so does this process; where the hard limit cannot be raised
    // (no CAP_SYS_RESOURCE) use as many watchers as it allows, and say so.
    let fit = nofile.saturating_sub(512) as usize;
    if fit < n {
        eprintln!("RLIMIT_NOFILE {nofile} allows {fit} watchers, not {n}: using {fit}");
    }
    let n = n.min(fit);
    assert!(n >= 500, "RLIMIT_NOFILE {nofile} is far too low");
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let daemon_nofile = proc_field(d.child.id(), "limits", "Max open files");
    eprintln!("daemon: {daemon_nofile}");
    // Let start-up allocations settle, then take the idle level.
    std::thread::sleep(Duration::from_millis(200));
    let idle = rss_kib(d.child.id());

    let t = Instant::now();
    let mut ws = open_watchers(dir.path(), n);
    d.wait_watchers_registered(n as u32);
    let open_time = t.elapsed();
    let mut control = d.control();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut acks = 0u64;
    let t = Instant::now();
    for round in 0..bumps {
        let g = control.bump(0).unwrap();
        let s = control.status().unwrap();
        assert_eq!(s.generation, g);
        assert_eq!(
            (s.watchers, s.tracked, s.outdated),
            (n as u32, n as u32, n as u32),
            "round {round}: right after bump {g}"
        );
        let last = round + 1 == bumps;
        let mut acked = 0u32;
        for (i, w) in ws.iter_mut().enumerate() {
            // Liveness bound only: the Changed frame is normally queued
            // before the bump's Done is sent.
            assert!(
                w.wait_readable(Duration::from_secs(10)).unwrap(),
                "round {round}: watcher {i} never notified of {g}"
            );
            assert_eq!(w.try_read().unwrap(), Some(g), "round {round}: watcher {i}");
            if last || rng.below(100) < ack_percent {
                w.ack(g).unwrap();
                acked += 1;
            }
        }
        acks += u64::from(acked);
        let s = control.status().unwrap();
        assert_eq!(
            s.outdated,
            n as u32 - acked,
            "round {round}: after {acked} acks of {g}"
        );
    }
    let bump_time = t.elapsed();
    control.wait_watchers(Some(Duration::from_secs(1))).unwrap();
    for w in ws.iter_mut() {
        assert_eq!(w.try_read().unwrap(), None, "up to date: nothing to read");
    }
    let peak = rss_kib(d.child.id());

    drop(ws);
    d.wait_watchers_registered(0);
    std::thread::sleep(Duration::from_millis(200));
    let after = rss_kib(d.child.id());
    // A second wave: same number of connections, then gone again.
    let ws = open_watchers(dir.path(), n);
    d.wait_watchers_registered(n as u32);
    let peak2 = rss_kib(d.child.id());
    drop(ws);
    d.wait_watchers_registered(0);
    std::thread::sleep(Duration::from_millis(200));
    let after2 = rss_kib(d.child.id());
    eprintln!(
        "load: {n} watchers opened in {open_time:.1?}; {bumps} bumps with {acks} acks in {bump_time:.1?} \
         ({:.1?}/bump incl. {n} reads); daemon VmRSS idle {idle} KiB, peak {peak} KiB, \
         after disconnect {after} KiB, second wave peak {peak2} KiB, after {after2} KiB",
        bump_time / bumps
    );
    let grown = peak.saturating_sub(idle);
    assert!(
        after <= idle + grown / 2 + 2048,
        "daemon memory did not come back down: idle {idle} KiB, peak {peak} KiB, after {after} KiB"
    );
    assert!(
        after2 <= after + 1024,
        "memory grew by a second wave of watchers: {after} KiB -> {after2} KiB"
    );
    // Still serving.
    assert_eq!(d.control().bump(0).unwrap(), bumps + 1);
    d.signal_and_wait(libc::SIGTERM);
}
