//! The event loop thread's place in the scheduler: a short time slice, so
//! that a restore signal preempts the programs that keep the CPUs busy.
//!
//! Why this exists: the restore window (a restored system running → the
//! page showing the new generation) is spent mostly waiting for a CPU
//! when applications keep both busy. Under the kernel's EEVDF scheduler
//! (Linux 6.6+) a woken task preempts the running one only if its virtual
//! deadline is earlier, and the running task is otherwise protected until
//! the end of its slice (`RUN_TO_PARITY`, a few milliseconds). Measured
//! with a program spinning on the page on the daemon's CPU
//! (`sysgenid-bench --only 7`): 70–86 µs at the default slice, 23–29 µs
//! with a 100 µs one (docs/performance.md, "The restore window on a busy
//! machine").
//!
//! So the loop thread asks for the shortest slice (`sched_setattr(2)`,
//! `sched_runtime` of a `SCHED_OTHER` task, Linux 6.12+; no privilege is
//! needed and nothing else changes: same policy, same nice value, same
//! share of the CPU). Under a realtime policy (the systemd unit's
//! `SCHED_FIFO` 1) the slice does not apply and nothing is changed; on an
//! older kernel the request is refused and the daemon runs as before.

/// The slice asked for: the kernel's minimum.
pub const SLICE_NS: u64 = 100_000;

/// `struct sched_attr` (`sched_setattr(2)`), the first version's 48 bytes.
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// What [`short_slice`] did.
#[derive(Debug)]
pub enum Outcome {
    /// The calling thread now runs with [`SLICE_NS`].
    Applied,
    /// Not a `SCHED_OTHER` thread (e.g. `SCHED_FIFO`): left alone.
    NotFair(u32),
    /// The kernel refused (before Linux 6.12, or a seccomp filter).
    Refused(std::io::Error),
}

/// Asks for a [`SLICE_NS`] slice for the calling thread, keeping its
/// policy, nice value and flags. Call it on the event loop thread after
/// the other threads were started (they keep the default).
pub fn short_slice() -> Outcome {
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: sched_getattr(2) writes at most `size` bytes into `attr`, a
    // repr(C) struct of exactly that size that we own.
    let rc = unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
    if rc != 0 {
        return Outcome::Refused(std::io::Error::last_os_error());
    }
    if attr.policy != libc::SCHED_OTHER as u32 {
        return Outcome::NotFair(attr.policy);
    }
    attr.size = size;
    attr.runtime = SLICE_NS;
    // SAFETY: sched_setattr(2) reads `attr.size` bytes from `attr`, which
    // we own and which lives for the call.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr, 0) };
    if rc != 0 {
        return Outcome::Refused(std::io::Error::last_os_error());
    }
    Outcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fair_thread_gets_the_short_slice_and_keeps_its_nice_value() {
        std::thread::spawn(|| {
            // SAFETY: setpriority(2) on the calling thread (who = 0).
            assert_eq!(unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 3) }, 0);
            match short_slice() {
                Outcome::Applied => {
                    let mut attr = SchedAttr::default();
                    let size = std::mem::size_of::<SchedAttr>() as u32;
                    // SAFETY: as in `short_slice`.
                    let rc =
                        unsafe { libc::syscall(libc::SYS_sched_getattr, 0, &mut attr, size, 0) };
                    assert_eq!(rc, 0);
                    assert_eq!(attr.runtime, SLICE_NS);
                    assert_eq!(attr.nice, 3, "nice value kept");
                    assert_eq!(attr.policy, libc::SCHED_OTHER as u32);
                }
                // An older kernel: nothing changed.
                Outcome::Refused(e) => eprintln!("refused here: {e}"),
                Outcome::NotFair(p) => panic!("a fresh thread is SCHED_OTHER, not {p}"),
            }
        })
        .join()
        .unwrap();
    }
}
