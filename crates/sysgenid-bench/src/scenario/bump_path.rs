//! (2) What the daemon does for one bump request, piece by piece, timed
//! in this process against a forked stand-in for the requester: the
//! privilege check's reads (`sysgenidd::peer::privileged`: `capget`, the
//! user namespace, the uids, the pidfd's liveness), the state save and the
//! reply. The multi-process figures (scenario 2) say how long a bump takes;
//! these say which part of it is the daemon's own system calls.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use sysgenid_bench::{fork_child, kill_all, now_ns, stats};

use crate::rawfd::{raw_recv, raw_send, socketpair_seqpacket};
use crate::table::{fmt, Unit};
use crate::Ctx;

/// The median cost of `f` over `n` calls, in ns.
fn median(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = now_ns();
        f();
        v.push((now_ns() - t) as f64);
    }
    stats(&mut v).p50
}

fn capget(pid: libc::pid_t) {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid,
    };
    let mut data = [0u32; 6];
    // SAFETY: capget(2) reads the header and writes two 12-byte data
    // structs (24 bytes) into `data`, which we own.
    unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    std::hint::black_box(data);
}

fn pidfd_get_info(pidfd: &OwnedFd) -> bool {
    let mut info = [0u64; 8];
    info[0] = 1 << 1; // PIDFD_INFO_CREDS
    const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;
    // SAFETY: the ioctl writes at most 64 bytes into `info` (64 bytes).
    unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, info.as_mut_ptr()) == 0 }
}

fn poll_pidfd(pidfd: &OwnedFd) {
    let mut fds = [libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll(2) on one pollfd we own, no wait.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
}

pub(crate) fn run(ctx: &mut Ctx) -> Result<(), String> {
    let n = if ctx.quick() { 200 } else { 5000 };
    let mut pids = vec![fork_child(|| loop {
        std::thread::sleep(Duration::from_secs(1));
    })];
    let pid = pids[0];
    // SAFETY: pidfd_open(2) on our own child; checked below.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as libc::c_int;
    if raw < 0 {
        kill_all(&mut pids);
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw) };
    let ns = format!("/proc/{pid}/ns/user");
    let status = format!("/proc/{pid}/status");
    let cap = median(n, || capget(pid));
    let userns = median(n, || {
        std::hint::black_box(std::fs::metadata(&ns).ok());
    });
    let proc_status = median(n, || {
        std::hint::black_box(std::fs::read_to_string(&status).ok());
    });
    let has_info = pidfd_get_info(&pidfd);
    let info = median(n, || {
        pidfd_get_info(&pidfd);
    });
    let alive = median(n, || poll_pidfd(&pidfd));
    kill_all(&mut pids);

    // The save: one 64-byte slot, pwrite + fdatasync, in the runtime
    // directory's file system.
    let state = tempfile::tempfile_in(&ctx.tmp).map_err(|e| e.to_string())?;
    let slot = [7u8; 64];
    let save = median(n, || {
        // SAFETY: pwrite(2) of a buffer we own; fdatasync(2).
        unsafe {
            libc::pwrite(state.as_raw_fd(), slot.as_ptr().cast(), slot.len(), 0);
            libc::fdatasync(state.as_raw_fd());
        }
    });
    // The reply: one frame on a SOCK_SEQPACKET pair (the sender's side).
    let (a, b) = socketpair_seqpacket();
    let mut buf = [0u8; 64];
    let mut sends = Vec::with_capacity(n);
    for _ in 0..n {
        let t = now_ns();
        raw_send(a.as_raw_fd(), &[0x81, 1, 0, 0, 0, 0, 0, 0, 0]);
        sends.push((now_ns() - t) as f64);
        raw_recv(b.as_raw_fd(), &mut buf);
    }
    let reply = stats(&mut sends).p50;
    let before = cap + userns + proc_status + alive;
    let after = cap + userns + if has_info { info } else { proc_status } + alive;
    let t = &mut ctx.table;
    t.value(
        "2",
        "split: privilege check, p50 per call (capget + user namespace stat + uids + pidfd poll)",
        format!(
            "{} with the uids from `PIDFD_GET_INFO`{}; {} with `/proc/PID/status`",
            fmt(after, Unit::Ns),
            if has_info {
                ""
            } else {
                " (not on this kernel)"
            },
            fmt(before, Unit::Ns)
        ),
        "—",
        None,
    );
    t.value(
        "2",
        "split: each read, p50",
        format!(
            "capget {}, stat /proc/PID/ns/user {}, read /proc/PID/status {}, PIDFD_GET_INFO {}, poll(pidfd) {}",
            fmt(cap, Unit::Ns),
            fmt(userns, Unit::Ns),
            fmt(proc_status, Unit::Ns),
            if has_info { fmt(info, Unit::Ns) } else { "unsupported".into() },
            fmt(alive, Unit::Ns)
        ),
        "—",
        None,
    );
    t.value(
        "2",
        "split: state save (pwrite 64 B + fdatasync), reply (send one frame), p50",
        format!("{}; {}", fmt(save, Unit::Ns), fmt(reply, Unit::Ns)),
        "—",
        None,
    );
    Ok(())
}
