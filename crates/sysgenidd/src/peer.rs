//! Who is on the other end of a socket, and may they force a bump?
//!
//! The seed allows `SYSGENID_FORCE_GEN_UPDATE` to processes with
//! `CAP_CHECKPOINT_RESTORE` or `CAP_SYS_ADMIN`. We apply the same rule to the
//! socket peer, in the daemon's own user namespace (a process that is root
//! only inside a user namespace it created is not privileged here).
//!
//! Identity comes from the kernel, never from the client: `SO_PEERCRED`
//! (uid, pid at `connect()` time) and, on Linux 6.5+, `SO_PEERPIDFD`, a
//! pidfd for exactly that process. Capabilities are read from
//! `/proc/<pid>/status` when a bump is requested, and the pidfd is checked
//! *afterwards* to still name a live process with that pid: a pid cannot be
//! reused while its process is alive, so what we read belonged to the peer.
//! Without `SO_PEERPIDFD` (older kernels) the pidfd is opened with
//! `pidfd_open` at accept time, which leaves a small window documented in
//! `docs/design.md`.
//!
//! When the daemon itself is not root (developer mode), peers with the
//! daemon's uid are privileged too.
//!
//! # References
//! `unix(7)` (`SO_PEERCRED`, `SO_PEERPIDFD`), `pidfd_open(2)`,
//! `proc_pid_status(5)` (`CapEff`), `capabilities(7)`.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// `SO_PEERPIDFD` from `<asm-generic/socket.h>` (Linux 6.5).
const SO_PEERPIDFD: libc::c_int = 77;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// A connected peer's identity.
#[derive(Debug)]
pub struct Peer {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Pid at connect time.
    pub pid: i32,
    pidfd: Option<OwnedFd>,
}

fn peer_pidfd(sock: &impl AsFd) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a c_int we
    // own; the socket descriptor is valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // SAFETY: on success the kernel returned a new descriptor that nothing
    // else owns.
    (rc == 0 && fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_pid(pidfd: &OwnedFd) -> Option<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn user_ns(pid: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()
}

fn effective_caps(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

impl Peer {
    /// Reads the peer of an accepted socket.
    pub fn of(sock: &impl AsFd) -> std::io::Result<Peer> {
        let cred = rustix::net::sockopt::socket_peercred(sock)?;
        let pid = cred.pid.as_raw_nonzero().get();
        let pidfd = peer_pidfd(sock).or_else(|| {
            rustix::process::pidfd_open(cred.pid, rustix::process::PidfdFlags::empty()).ok()
        });
        Ok(Peer {
            uid: cred.uid.as_raw(),
            pid,
            pidfd,
        })
    }

    /// A process (or thread) named by the kernel rather than by a socket:
    /// the caller of a request on the FUSE device (`fuse_in_header` pid
    /// and uid). The caller is blocked in that request while we check, so
    /// its id cannot be reused meanwhile; the pidfd (opened for the thread,
    /// as FUSE names threads) makes [`Peer::may_bump`] check that again.
    pub fn of_process(pid: i32, uid: u32) -> Peer {
        // PIDFD_THREAD (Linux 6.9) is O_EXCL: FUSE reports thread ids.
        let thread = rustix::process::PidfdFlags::from_bits_retain(libc::O_EXCL as _);
        let pidfd = rustix::process::Pid::from_raw(pid).and_then(|p| {
            rustix::process::pidfd_open(p, thread)
                .or_else(|_| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()))
                .ok()
        });
        Peer { uid, pid, pidfd }
    }

    /// Whether the peer may force a generation update (see module docs).
    pub fn may_bump(&self) -> bool {
        let daemon_euid = rustix::process::geteuid();
        if !daemon_euid.is_root() && self.uid == daemon_euid.as_raw() {
            return true;
        }
        let Some(pidfd) = &self.pidfd else {
            return false;
        };
        let same_ns = user_ns(&self.pid.to_string()) == user_ns("self");
        let caps = effective_caps(self.pid).unwrap_or(0);
        let capable = caps & (1 << CAP_SYS_ADMIN | 1 << CAP_CHECKPOINT_RESTORE) != 0;
        // Checked last: the process we read about is still the peer.
        let still_peer = pidfd_pid(pidfd) == Some(self.pid);
        same_ns && capable && still_peer
    }
}
