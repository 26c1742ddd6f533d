//! Who sent a request, and may they do a privileged thing (force a bump,
//! freeze, thaw)? [`privileged`] is the one place that decides.
//!
//! # The rule
//! The seed allows `SYSGENID_FORCE_GEN_UPDATE` to a caller with
//! `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`, checked at `ioctl` time. We
//! judge the process that *sent* each privileged request, as the kernel
//! recorded it with that request: on the socket, `SCM_CREDENTIALS` (pid and
//! real uid at `sendmsg` time) and `SCM_PIDFD` (a pidfd for that very
//! process); on the device, the FUSE header's thread id and uid, whose
//! thread is blocked in the request while we look. It is privileged iff
//! these facts, read in this order, all hold:
//! 1. its effective capabilities include `CAP_SYS_ADMIN` or
//!    `CAP_CHECKPOINT_RESTORE` (`capget`);
//! 2. it is in the daemon's user namespace;
//! 3. its real and effective uid both equal the uid recorded with the
//!    request (read through its pidfd, `PIDFD_GET_INFO`, where the kernel
//!    has it: Linux 6.13+; else from `/proc/<pid>/status`);
//! 4. its pidfd still names a process (thread, on the device) that has not
//!    exited.
//!
//! or, when the daemon is not root (developer mode), the recorded uid is
//! the daemon's own. A request without credentials, with pid 0 (a sender in
//! a pid namespace we cannot see) or without a pidfd is refused.
//!
//! # Why this order
//! An unprivileged process gains capabilities only by entering a new user
//! namespace (never our own again: a namespace cannot be left for its
//! parent) or by executing a set-user-ID or file-capability program.
//! Reading capabilities first means that a gain we see was made before the
//! namespace read, which then sees the new namespace; a set-user-ID gain
//! changes the effective uid, which the identity read sees. The liveness
//! read comes last: a pid is not reused while its process lives, so if the
//! pidfd's process is alive after every read, every read was of it. What
//! this cannot see is stated in `docs/design.md` ("Who may bump").
//!
//! # References
//! `unix(7)`, `capget(2)`, `user_namespaces(7)`, `pidfd_open(2)`,
//! `proc_pid_status(5)`, `PIDFD_GET_INFO` in `<linux/pidfd.h>`.

mod scm;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::io::Errno;
use rustix::process::{Pid, PidfdFlags};
use rustix::thread::CapabilitySet;

/// The connecting process, from `SO_PEERCRED`: for per-uid limits and logs
/// only, never for privilege (the connection can change hands).
#[derive(Debug)]
pub struct Peer {
    /// Effective uid at connect time.
    pub uid: u32,
    /// Pid at connect time (0 if in a pid namespace we cannot see).
    pub pid: i32,
    /// Effective gid at connect time.
    pub gid: u32,
}

impl Peer {
    /// Reads the peer of an accepted socket.
    pub fn of(sock: &impl AsFd) -> std::io::Result<Peer> {
        // By hand, not rustix's `socket_peercred`: its `UCred` cannot hold
        // the pid 0 the kernel reports for an invisible pid namespace.
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
        Ok(Peer {
            uid: cred.uid,
            pid: cred.pid,
            gid: cred.gid,
        })
    }
}

/// The process (or, on the device, thread) that made one request, as the
/// kernel recorded it with the request.
#[derive(Debug)]
pub struct Sender {
    /// Pid (thread id on the device) in our pid namespace; 0 if unknown.
    pid: i32,
    /// The uid recorded with the request (real uid on the socket, the
    /// caller's fsuid on the device).
    uid: u32,
    /// A pidfd for exactly that process.
    pidfd: Option<OwnedFd>,
}

impl Sender {
    /// The recorded pid (for messages).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The recorded uid (for messages).
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

/// Why a request was not found privileged (for the log and the reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The frame carried no sender credentials, or a pid we cannot see.
    #[error("the kernel recorded no usable sender for this request")]
    NoSender,
    /// No pidfd for the sender, so its pid could not be pinned.
    #[error("the sender could not be pinned with a pidfd")]
    NoPidfd,
    /// Neither capability is effective.
    #[error("it has neither CAP_SYS_ADMIN nor CAP_CHECKPOINT_RESTORE")]
    NotCapable,
    /// Its capabilities belong to another user namespace.
    #[error("it is not in sysgenidd's user namespace")]
    OtherUserNamespace,
    /// Its uids are not the one recorded with the request.
    #[error("its real and effective uid are not the uid it sent the request with")]
    IdentityChanged,
    /// It exited while we looked.
    #[error("it exited before the check completed")]
    Exited,
}

/// Whether the kernel gives `SCM_PIDFD` (set when the listener is set up).
static KERNEL_PASSES_PIDFD: AtomicBool = AtomicBool::new(false);

/// Makes the kernel attach sender credentials to every frame received on
/// `listener`'s connections. Call on the listening socket before `listen`.
pub fn pass_credentials(listener: BorrowedFd<'_>) -> std::io::Result<()> {
    let pidfd = scm::pass_credentials(listener)?;
    KERNEL_PASSES_PIDFD.store(pidfd, Ordering::Relaxed);
    if !pidfd {
        tracing::warn!(
            "this kernel has no SO_PASSPIDFD (Linux 6.5+): bump senders are pinned with pidfd_open on receipt, which leaves a pid-reuse window (docs/design.md)"
        );
    }
    Ok(())
}

/// Receives one frame from a client connection: (bytes copied, datagram
/// length, sender). Frames of a privileged kind are received with their
/// sender's credentials; others with plain `recv` (no pidfd is made for
/// them). A datagram of length 0 means the peer hung up.
pub fn recv_frame(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, usize, Option<Sender>), Errno> {
    use rustix::net::RecvFlags;
    let mut kind = [0u8; 1];
    let (peeked, _) = rustix::net::recv(
        sock,
        &mut kind,
        RecvFlags::PEEK | RecvFlags::DONTWAIT | RecvFlags::TRUNC,
    )?;
    if peeked == 0 || !sysgenid_proto::is_privileged_kind(kind[0]) {
        let (n, len) = rustix::net::recv(sock, buf, RecvFlags::DONTWAIT | RecvFlags::TRUNC)?;
        return Ok((n, len, None));
    }
    let (n, len, sent_by) = scm::recv_with_sender(sock, buf)?;
    Ok((n, len, Some(sender_of(sent_by))))
}

fn sender_of(sent_by: scm::SentBy) -> Sender {
    let Some(cred) = sent_by.cred else {
        return Sender {
            pid: 0,
            uid: u32::MAX,
            pidfd: None,
        };
    };
    let pidfd = match sent_by.pidfd {
        Some(fd) => Some(fd),
        // Only where the kernel cannot pass one: pin the pid now. If the
        // kernel can and did not (descriptors crowded it out), refuse.
        None if !KERNEL_PASSES_PIDFD.load(Ordering::Relaxed) => Pid::from_raw(cred.pid)
            .and_then(|pid| rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok()),
        None => None,
    };
    Sender {
        pid: cred.pid,
        uid: cred.uid,
        pidfd,
    }
}

/// The caller of a FUSE device request (`fuse_in_header` thread id and
/// uid). It is blocked in that request while we check: the thread cannot
/// exit, exec or change its credentials meanwhile.
pub fn device_caller(tid: u32, uid: u32) -> Sender {
    // 0 (a caller in a pid namespace we cannot see) or out of range: never.
    let pid = i32::try_from(tid).unwrap_or(0);
    // PIDFD_THREAD (Linux 6.9) is O_EXCL: FUSE reports thread ids. Before
    // 6.9 only a thread-group leader can be pinned.
    let thread = PidfdFlags::from_bits_retain(libc::O_EXCL as _);
    let pidfd = Pid::from_raw(pid).and_then(|p| {
        rustix::process::pidfd_open(p, thread)
            .or_else(|_| rustix::process::pidfd_open(p, PidfdFlags::empty()))
            .ok()
    });
    Sender { pid, uid, pidfd }
}

/// The one privilege check (see the module docs for the rule and its
/// order). `None`: the kernel recorded no sender.
pub fn privileged(sender: Option<&Sender>) -> Result<(), Refusal> {
    let sender = sender.ok_or(Refusal::NoSender)?;
    let pid = Pid::from_raw(sender.pid).ok_or(Refusal::NoSender)?;
    if same_uid_as_unprivileged_daemon(sender.uid) {
        return Ok(());
    }
    let pidfd = sender.pidfd.as_ref().ok_or(Refusal::NoPidfd)?;
    // 1. Capabilities.
    let caps = rustix::thread::capabilities(Some(pid)).map_err(|_| Refusal::Exited)?;
    if !caps
        .effective
        .intersects(CapabilitySet::SYS_ADMIN | CapabilitySet::CHECKPOINT_RESTORE)
    {
        return Err(Refusal::NotCapable);
    }
    // 2. User namespace.
    if own_user_ns().is_none() || user_ns(pid) != own_user_ns() {
        return Err(Refusal::OtherUserNamespace);
    }
    // 3. Identity: from the pidfd where the kernel can say (one ioctl),
    // else from /proc (open, read ~1.5 KiB of formatted text, close).
    let uids = match pidfd_uids(pidfd.as_fd()) {
        Ok(uids) => Some(uids),
        Err(Errno::SRCH) => return Err(Refusal::Exited),
        Err(_) => current_uids(pid),
    };
    if uids != Some((sender.uid, sender.uid)) {
        return Err(Refusal::IdentityChanged);
    }
    // 4. Liveness.
    if !pidfd_alive(pidfd.as_fd()) {
        return Err(Refusal::Exited);
    }
    Ok(())
}

/// Whether the device caller may force an update or open the device for
/// writing: [`privileged`] for [`device_caller`].
pub fn process_may_bump(tid: u32, uid: u32) -> bool {
    privileged(Some(&device_caller(tid, uid))).is_ok()
}

/// Developer mode: an unprivileged daemon trusts its own uid.
fn same_uid_as_unprivileged_daemon(uid: u32) -> bool {
    // The daemon never changes its uids: read once, not on every bump.
    static EUID: std::sync::OnceLock<rustix::process::Uid> = std::sync::OnceLock::new();
    let daemon_euid = *EUID.get_or_init(rustix::process::geteuid);
    !daemon_euid.is_root() && uid == daemon_euid.as_raw()
}

/// `struct pidfd_info` of `<linux/pidfd.h>`, its first version (64 bytes,
/// Linux 6.13): what `PIDFD_GET_INFO` fills.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    spare: u32,
}

/// `PIDFD_INFO_CREDS`: the uids and gids are filled.
const PIDFD_INFO_CREDS: u64 = 1 << 1;
/// `PIDFD_GET_INFO` = `_IOWR(0xFF, 11, struct pidfd_info)` at 64 bytes.
const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;

/// Real and effective uid of the pidfd's process now, as seen from our user
/// namespace (`PIDFD_GET_INFO`, Linux 6.13+). `SRCH` once it has been
/// reaped; `NOTTY`/`INVAL` where the kernel has no such ioctl.
fn pidfd_uids(pidfd: BorrowedFd<'_>) -> Result<(u32, u32), Errno> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_CREDS,
        ..PidfdInfo::default()
    };
    // SAFETY: PIDFD_GET_INFO writes at most the 64 bytes its number
    // encodes into `info`, a repr(C) struct of exactly that size we own.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    if rc != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    if info.mask & PIDFD_INFO_CREDS == 0 {
        return Err(Errno::INVAL);
    }
    Ok((info.ruid, info.euid))
}

/// Whether the process behind `pidfd` has not exited (a pidfd polls
/// readable once it has).
fn pidfd_alive(pidfd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    let zero = rustix::time::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(0))
}

/// A user namespace as (device, inode) of its `/proc` link.
fn ns_id(path: &str) -> Option<(u64, u64)> {
    let st = rustix::fs::stat(path).ok()?;
    Some((st.st_dev, st.st_ino))
}

fn user_ns(pid: Pid) -> Option<(u64, u64)> {
    ns_id(&format!("/proc/{}/ns/user", pid.as_raw_nonzero()))
}

fn own_user_ns() -> Option<(u64, u64)> {
    static OWN: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| ns_id("/proc/self/ns/user"))
}

/// Real and effective uid of `pid` now (`/proc/<pid>/status`, `Uid:`, as
/// seen from our user namespace).
fn current_uids(pid: Pid) -> Option<(u32, u32)> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_nonzero())).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    let mut ids = line.split_whitespace().map(|v| v.parse::<u32>().ok());
    Some((ids.next()??, ids.next()??))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Sender {
        let pid = rustix::process::getpid();
        Sender {
            pid: pid.as_raw_nonzero().get(),
            uid: rustix::process::getuid().as_raw(),
            pidfd: rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok(),
        }
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[test]
    fn a_bump_frame_arrives_with_its_senders_credentials_and_pushed_fds_are_not_kept() {
        use rustix::net::{
            socketpair, AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
            SocketFlags, SocketType,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        pass_credentials(ours.as_fd()).unwrap();
        let bump = sysgenid_proto::Request::Bump {
            min_generation: 3,
            allow_exhaustion: false,
            details: sysgenid_proto::BumpDetails::default(),
        }
        .encode();
        let status = sysgenid_proto::Request::Status.encode();
        let before = open_fds();
        // A Bump with two descriptors pushed along: refused by the kernel
        // (6.16+), else delivered and closed by us.
        {
            let pushed = [
                std::fs::File::open("/dev/null").unwrap(),
                std::fs::File::open("/dev/null").unwrap(),
            ];
            let fds = [pushed[0].as_fd(), pushed[1].as_fd()];
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
            match rustix::net::sendmsg(
                &theirs,
                &[std::io::IoSlice::new(&bump)],
                &mut control,
                SendFlags::empty(),
            ) {
                Err(Errno::PERM) => {}
                Ok(_) => {
                    drop(pushed);
                    let mut buf = [0u8; 64];
                    let (n, _, sender) = recv_frame(ours.as_fd(), &mut buf).unwrap();
                    assert_eq!(&buf[..n], &bump[..]);
                    drop(sender);
                    assert_eq!(open_fds(), before, "the pushed descriptors were closed");
                }
                Err(e) => panic!("sendmsg: {e}"),
            }
        }
        // A plain Bump, then a Status.
        rustix::net::send(&theirs, &bump, SendFlags::empty()).unwrap();
        rustix::net::send(&theirs, &status, SendFlags::empty()).unwrap();
        let mut buf = [0u8; 64];
        let (n, len, sender) = recv_frame(ours.as_fd(), &mut buf).unwrap();
        assert_eq!((n, len), (bump.len(), bump.len()));
        assert_eq!(&buf[..n], &bump[..]);
        let sender = sender.expect("a Bump is received with its sender");
        assert_eq!(
            sender.pid(),
            rustix::process::getpid().as_raw_nonzero().get()
        );
        assert_eq!(sender.uid(), rustix::process::getuid().as_raw());
        assert!(sender.pidfd.is_some(), "SCM_PIDFD, or pinned on receipt");
        assert_eq!(open_fds(), before + 1, "the pidfd, nothing else");
        drop(sender);
        let (n, _, sender) = recv_frame(ours.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], &status[..]);
        assert!(
            sender.is_none(),
            "no credentials are taken for other frames"
        );
        assert_eq!(open_fds(), before);
    }

    #[test]
    fn the_pidfd_names_the_uids_proc_shows_and_says_when_its_process_was_reaped() {
        let me = me();
        let pidfd = me.pidfd.as_ref().unwrap();
        let pid = Pid::from_raw(me.pid).unwrap();
        match pidfd_uids(pidfd.as_fd()) {
            Ok(uids) => assert_eq!(Some(uids), current_uids(pid)),
            // A kernel before 6.13: the /proc read is used instead.
            Err(e) => assert!(matches!(e, Errno::NOTTY | Errno::INVAL), "{e}"),
        }
        // A child that exits and is reaped: its pidfd says so.
        let child = std::process::Command::new("true").spawn().unwrap();
        let child_pid = Pid::from_raw(child.id() as i32).unwrap();
        let child_fd = rustix::process::pidfd_open(child_pid, PidfdFlags::empty()).unwrap();
        let mut child = child;
        child.wait().unwrap();
        if pidfd_uids(pidfd.as_fd()).is_ok() {
            assert_eq!(pidfd_uids(child_fd.as_fd()), Err(Errno::SRCH));
        }
    }

    #[test]
    fn missing_credentials_are_refused() {
        assert_eq!(privileged(None), Err(Refusal::NoSender));
        let no_pid = Sender {
            pid: 0,
            uid: rustix::process::geteuid().as_raw(),
            pidfd: None,
        };
        assert_eq!(
            privileged(Some(&no_pid)),
            Err(Refusal::NoSender),
            "pid 0 is never privileged, not even with the daemon's uid"
        );
    }

    #[test]
    fn a_sender_with_another_recorded_uid_is_refused() {
        let mut req = me();
        req.uid = req.uid.wrapping_add(12345);
        if rustix::process::geteuid().is_root() {
            assert_eq!(privileged(Some(&req)), Err(Refusal::IdentityChanged));
        } else {
            assert!(privileged(Some(&req)).is_err());
        }
    }

    #[test]
    fn this_process_is_judged_as_it_is() {
        let req = me();
        let expect_ok = rustix::process::geteuid().is_root()
            || !rustix::process::geteuid().is_root()
                && req.uid == rustix::process::geteuid().as_raw();
        assert_eq!(privileged(Some(&req)).is_ok(), expect_ok);
    }
}
