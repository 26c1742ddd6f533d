//! `SnapSafe<T>` and `SnapSafeRng` against the real daemon: a bump through
//! the socket moves the page they check, and what they hold is renewed —
//! also across a daemon restart, and in two processes that were one before
//! the bump (a clone simulated by `fork`).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::Rng;
use rand::SeedableRng;
use sysgenid::{Probe, SnapSafe, SnapSafeRng};
use sysgenid_tests::*;

#[test]
fn a_value_built_before_a_bump_is_rebuilt_after_it() {
    let dir = runtime_dir();
    let mut d = Daemon::start(dir.path());
    let probe = Probe::shared(Some(dir.path())).unwrap();
    let builds = Arc::new(AtomicUsize::new(0));
    let counter = builds.clone();
    let secret = SnapSafe::with_probe(probe, move || {
        (counter.fetch_add(1, Ordering::SeqCst), probe.generation())
    });
    assert_eq!(*secret.get(), (0, 0));
    assert_eq!(*secret.get(), (0, 0), "no rebuild without a change");

    assert_eq!(d.control().bump(0).unwrap(), 1);
    assert_eq!(*secret.get(), (1, 1), "rebuilt under the new generation");
    assert_eq!(*secret.get(), (1, 1));

    // The page is rewritten in place, so the mapping survives a crash and
    // restart of the daemon.
    d.kill9();
    d.restart();
    assert_eq!(*secret.get(), (1, 1), "a restart is not a change");
    assert_eq!(d.control().bump(10).unwrap(), 10);
    assert_eq!(*secret.get(), (2, 10));
    assert_eq!(builds.load(Ordering::SeqCst), 3);
}

fn pipe() -> (OwnedFd, OwnedFd) {
    rustix::pipe::pipe().unwrap()
}

fn write_u64(fd: &OwnedFd, v: u64) {
    assert_eq!(rustix::io::write(fd, &v.to_ne_bytes()).unwrap(), 8);
}

fn read_u64(fd: &OwnedFd) -> u64 {
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::read(fd, &mut buf).unwrap(), 8);
    u64::from_ne_bytes(buf)
}

#[test]
fn two_processes_forked_from_one_seeded_rng_diverge_after_a_bump() {
    let dir = runtime_dir();
    let d = Daemon::start(dir.path());
    let mut rng = SnapSafeRng::in_runtime_dir(dir.path(), SmallRng::seed_from_u64(42)).unwrap();
    rng.next_u64();
    let (to_child_r, to_child_w) = pipe();
    let (from_child_r, from_child_w) = pipe();

    // SAFETY: the child only draws from the generator (no allocation: the
    // reseed reads getrandom into a stack seed), reads and writes pipes and
    // calls _exit, all async-signal-safe enough for a forked copy of a
    // multi-threaded process.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let before = rng.next_u64();
        write_u64(&from_child_w, before);
        // Wait for the parent to have bumped.
        read_u64(&to_child_r);
        write_u64(&from_child_w, rng.next_u64());
        // SAFETY: ends the forked child without running the parent's
        // destructors or test harness.
        unsafe { libc::_exit(0) };
    }

    let before = rng.next_u64();
    assert_eq!(
        before,
        read_u64(&from_child_r),
        "before the bump both processes continue the same stream (a clone)"
    );
    assert_eq!(d.control().bump(0).unwrap(), 1);
    write_u64(&to_child_w, 1);
    let parent_after = rng.next_u64();
    let child_after = read_u64(&from_child_r);
    let mut status = 0;
    // SAFETY: waitpid on our own child with a valid status pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);

    // Without the reseed both would draw this value next.
    let mut unprotected = SmallRng::seed_from_u64(42);
    for _ in 0..2 {
        unprotected.next_u64();
    }
    let shared_next = unprotected.next_u64();
    assert_ne!(parent_after, child_after, "the clones diverged");
    assert_ne!(parent_after, shared_next, "the parent reseeded");
    assert_ne!(child_after, shared_next, "the child reseeded");
    assert_eq!(rng.seeded_under(), 1);
}
