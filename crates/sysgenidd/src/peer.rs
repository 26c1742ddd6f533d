//! Who is on the other end of a socket, and may they force a bump?
//!
//! The seed allows `SYSGENID_FORCE_GEN_UPDATE` to processes with
//! `CAP_CHECKPOINT_RESTORE` or `CAP_SYS_ADMIN`. We apply the same rule to the
//! socket peer, in the daemon's own user namespace (a process that is root
//! only inside a user namespace it created is not privileged here).
//!
//! Identity comes from the kernel, never from the client: `SO_PEERCRED`
//! (uid, pid at `connect()` time) and, on Linux 6.5+, `SO_PEERPIDFD`, a
//! pidfd for exactly that process, asked of the socket when a bump is
//! requested (so a watcher holds no extra descriptor). Capabilities are read
//! with `capget(2)`, and the pidfd is checked *afterwards* to still name a
//! live process: a pid cannot be reused while its process is alive, so what
//! we read belonged to the peer. Without `SO_PEERPIDFD` (kernels before 6.5)
//! a pidfd is opened with `pidfd_open` at accept time instead, which leaves
//! the small window between `connect` and `accept` documented in
//! `docs/design.md`.
//!
//! When the daemon itself is not root (developer mode), peers with the
//! daemon's uid are privileged too.
//!
//! # References
//! `unix(7)` (`SO_PEERCRED`, `SO_PEERPIDFD`), `pidfd_open(2)`,
//! `capget(2)`, `capabilities(7)`, `pidfd_send_signal(2)`.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `SO_PEERPIDFD` from `<asm-generic/socket.h>` (Linux 6.5).
const SO_PEERPIDFD: libc::c_int = 77;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_CHECKPOINT_RESTORE: u32 = 40;

/// A connected peer's identity. Holds no descriptor: the peer's pidfd is
/// asked of the socket only when the peer requests a bump (the socket keeps
/// a reference to the process that connected), so a watcher costs the
/// daemon one descriptor, not two.
#[derive(Debug)]
pub struct Peer {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Pid at connect time.
    pub pid: i32,
    /// Only on kernels without `SO_PEERPIDFD`: a pidfd opened at accept.
    fallback_pidfd: Option<OwnedFd>,
}

/// Whether this kernel has `SO_PEERPIDFD` (learned at the first accept).
fn kernel_has_peerpidfd(sock: BorrowedFd<'_>) -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| peer_pidfd(sock).is_some())
}

fn peer_pidfd(sock: BorrowedFd<'_>) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `fd`, a c_int we
    // own; the socket descriptor is valid for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
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

/// Whether the process behind `pidfd` is still alive (signal 0 through the
/// pidfd: `EPERM` still means it exists).
fn pidfd_alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: pidfd_send_signal with signal 0 and a null siginfo only
    // checks that the target exists; the descriptor is valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The user namespace of `pid` ("self" for ours) as (device, inode).
fn user_ns(pid: &str) -> Option<(u64, u64)> {
    let st = rustix::fs::stat(format!("/proc/{pid}/ns/user")).ok()?;
    Some((st.st_dev, st.st_ino))
}

fn own_user_ns() -> Option<(u64, u64)> {
    static OWN: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| user_ns("self"))
}

/// Effective capabilities of `pid` through capget(2) (no /proc parsing).
fn effective_caps(pid: i32) -> Option<u64> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads `header` and writes two `Data` structs (the
    // version 3 layout) into `data`, both owned by this frame.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut Header,
            data.as_mut_ptr(),
        )
    };
    (rc == 0).then(|| u64::from(data[0].effective) | u64::from(data[1].effective) << 32)
}

/// Real and effective uid of `pid` now (`/proc/<pid>/status`, `Uid:`).
fn current_uids(pid: i32) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

/// The rule itself, for a process we hold a pidfd of: capable, in our user
/// namespace, and still the same live process after we looked.
///
/// `connect_uid` is set for socket peers: the effective uid the kernel
/// recorded when the process connected. A socket outlives an `execve`, so
/// an unprivileged process could connect, let a child keep the socket, and
/// exec a set-user-ID program: its capabilities now would be root's. So
/// the process must still have that uid as both real and effective uid.
/// The order matters: capabilities are read *before* the uids, so an exec
/// between the two reads is seen either way (caps read before it are the
/// old ones; uids read after it are the new ones).
fn capable(pid: i32, pidfd: Option<&OwnedFd>, connect_uid: Option<u32>) -> bool {
    let Some(pidfd) = pidfd else {
        return false;
    };
    let same_ns = own_user_ns().is_some() && user_ns(&pid.to_string()) == own_user_ns();
    let caps = effective_caps(pid).unwrap_or(0);
    let capable = caps & (1 << CAP_SYS_ADMIN | 1 << CAP_CHECKPOINT_RESTORE) != 0;
    let same_uid = match connect_uid {
        None => true,
        Some(uid) => current_uids(pid) == Some((uid, uid)),
    };
    // Checked last: a pid cannot be reused while its process lives, so if
    // it is alive now, what we read belonged to it.
    same_ns && capable && same_uid && pidfd_alive(pidfd)
}

/// Developer mode: an unprivileged daemon trusts its own uid.
fn same_uid_as_unprivileged_daemon(uid: u32) -> bool {
    let daemon_euid = rustix::process::geteuid();
    !daemon_euid.is_root() && uid == daemon_euid.as_raw()
}

impl Peer {
    /// Reads the peer of an accepted socket.
    pub fn of(sock: &impl AsFd) -> std::io::Result<Peer> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: u32::MAX,
            gid: u32::MAX,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, a
        // ucred we own; the socket descriptor is valid for the call.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // pid 0: the peer is in a pid namespace we cannot see. It may still
        // watch; it can never be found privileged (no pidfd, no /proc).
        let fallback_pidfd = match rustix::process::Pid::from_raw(cred.pid) {
            Some(pid) if !kernel_has_peerpidfd(sock.as_fd()) => {
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
            }
            _ => None,
        };
        Ok(Peer {
            uid: cred.uid,
            pid: cred.pid,
            fallback_pidfd,
        })
    }

    /// Whether the peer on `sock` may force a generation update (see the
    /// module docs).
    pub fn may_bump(&self, sock: &impl AsFd) -> bool {
        if same_uid_as_unprivileged_daemon(self.uid) {
            return true;
        }
        if self.pid <= 0 {
            return false;
        }
        match &self.fallback_pidfd {
            Some(pidfd) => capable(self.pid, Some(pidfd), Some(self.uid)),
            None => capable(self.pid, peer_pidfd(sock.as_fd()).as_ref(), Some(self.uid)),
        }
    }
}

/// Whether the caller of a FUSE device request (`fuse_in_header` pid and
/// uid, a thread id) may force an update or open the device for writing.
/// The caller is blocked in that request while we check, so its id cannot
/// be reused meanwhile; the thread pidfd makes the check hold afterwards too.
pub fn process_may_bump(pid: u32, uid: u32) -> bool {
    if same_uid_as_unprivileged_daemon(uid) {
        return true;
    }
    // 0 (a caller in a pid namespace we cannot see) or out of range: never.
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // PIDFD_THREAD (Linux 6.9) is O_EXCL: FUSE reports thread ids.
    let thread = rustix::process::PidfdFlags::from_bits_retain(libc::O_EXCL as _);
    let pidfd = rustix::process::Pid::from_raw(pid).and_then(|p| {
        rustix::process::pidfd_open(p, thread)
            .or_else(|_| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()))
            .ok()
    });
    // The caller is blocked in its own request: it is checked as it is now.
    capable(pid, pidfd.as_ref(), None)
}
