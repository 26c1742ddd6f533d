//! `uevent` source: the `NEW_VMGENID=1` kobject uevent of Linux 6.8.
//!
//! Why this exists: Linux 6.8.0 – 6.8.7 made the `vmgenid` driver send a
//! `KOBJ_CHANGE` uevent with `NEW_VMGENID=1` on the ACPI VMGenID device when
//! the VM is forked/restored (reverted in 6.8.8 / 6.9). On those kernels it is
//! a second, structured signal next to the `vmfork` log record; on every
//! other kernel this source never fires (it is harmless to run).
//!
//! What the kernel sends (`kobject_uevent_env()`): one datagram on
//! `NETLINK_KOBJECT_UEVENT` multicast group 1, from netlink port id 0:
//!
//! ```text
//! change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0ACTION=change\0
//! DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0SUBSYSTEM=acpi\0
//! NEW_VMGENID=1\0DRIVER=vmgenid\0MODALIAS=...\0SEQNUM=1234\0
//! ```
//!
//! (caller keys come right after `SUBSYSTEM`, then the bus/driver keys,
//! `SEQNUM` last; the parser does not depend on the order).
//!
//! Filtering: any process in the network namespace may multicast to group 1
//! as root, and udev re-broadcasts in its own `libudev\0` format on group 2.
//! We accept only datagrams whose source address has `nl_pid == 0` and whose
//! `SCM_CREDENTIALS` pid is 0 (the kernel), and ignore `libudev` messages.
//! If the socket overflows (`ENOBUFS`) on a 6.8 kernel, a `NEW_VMGENID`
//! event may have been lost, so one conservative event is emitted (as for
//! the kernel log: a spurious bump is safe, a missed one is not); on other
//! kernels it is only logged, since they never send the event.

use std::io;
use std::mem::{self, MaybeUninit};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use crate::{Source, SourceError, SourceEvent};

/// Source name.
pub const NAME: &str = "uevent";
/// Multicast group the kernel sends uevents to.
pub const KERNEL_GROUP: u32 = 1;
/// Receive buffer: kernel uevents are at most a few KiB.
const RECV_BUF: usize = 16 * 1024;
/// Requested socket receive buffer, to make `ENOBUFS` unlikely.
const SOCKET_RCVBUF: usize = 1024 * 1024;

/// A parsed kernel uevent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    /// Action from the `ACTION@DEVPATH` header, e.g. "change".
    pub action: String,
    /// Devpath from the header, e.g. "/devices/LNXSYSTM:00/...".
    pub devpath: String,
    /// `KEY=VALUE` pairs in message order.
    pub env: Vec<(String, String)>,
}

impl Uevent {
    /// First value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parse a kernel uevent datagram. `None` for libudev-format messages and
/// for anything without an `ACTION@DEVPATH` header. Never panics; entries
/// that are not UTF-8 `KEY=VALUE` are skipped.
pub fn parse_uevent(bytes: &[u8]) -> Option<Uevent> {
    if bytes.starts_with(b"libudev\0") {
        return None;
    }
    let mut parts = bytes.split(|&b| b == 0);
    let header = std::str::from_utf8(parts.next()?).ok()?;
    let (action, devpath) = header.split_once('@')?;
    if action.is_empty() || devpath.is_empty() {
        return None;
    }
    let env = parts
        .filter_map(|p| std::str::from_utf8(p).ok())
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some(Uevent {
        action: action.to_owned(),
        devpath: devpath.to_owned(),
        env,
    })
}

/// The vmgenid "VM was forked/restored" uevent: `change` with
/// `NEW_VMGENID=1` from the vmgenid driver (`DRIVER=vmgenid`) or the ACPI
/// subsystem (`SUBSYSTEM=acpi`).
pub fn is_new_vmgenid(ev: &Uevent) -> bool {
    ev.action == "change"
        && ev.get("ACTION").map_or(true, |a| a == "change")
        && ev.get("NEW_VMGENID") == Some("1")
        && (ev.get("DRIVER") == Some("vmgenid") || ev.get("SUBSYSTEM") == Some("acpi"))
}

/// Why a datagram was not a restore signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ignored {
    /// Sent by a process, not the kernel (non-zero netlink port id or
    /// credentials pid, or no source address at all).
    NotFromKernel {
        /// Sender's netlink port id, if known.
        nl_pid: Option<u32>,
        /// `SCM_CREDENTIALS` pid, if present.
        cred_pid: Option<i32>,
    },
    /// udev's re-broadcast format.
    Libudev,
    /// Not a parseable uevent, or truncated.
    Malformed,
    /// A kernel uevent, but not `NEW_VMGENID`.
    Unrelated,
}

/// Outcome of receiving one datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// The kernel's `NEW_VMGENID=1` uevent.
    NewVmgenid(Uevent),
    /// `ENOBUFS`: the socket overflowed and datagrams were dropped.
    Overrun,
    /// Not a restore signal.
    Ignored(Ignored),
}

/// Classify one datagram given its sender (pure; used by the receive path).
pub fn classify(bytes: &[u8], sender_nl_pid: Option<u32>, cred_pid: Option<i32>) -> Received {
    if sender_nl_pid != Some(0) || cred_pid.is_some_and(|p| p != 0) {
        return Received::Ignored(Ignored::NotFromKernel {
            nl_pid: sender_nl_pid,
            cred_pid,
        });
    }
    if bytes.starts_with(b"libudev\0") {
        return Received::Ignored(Ignored::Libudev);
    }
    match parse_uevent(bytes) {
        None => Received::Ignored(Ignored::Malformed),
        Some(ev) if is_new_vmgenid(&ev) => Received::NewVmgenid(ev),
        Some(_) => Received::Ignored(Ignored::Unrelated),
    }
}

/// Whether this kernel can send `NEW_VMGENID` (any 6.8.x: distributions
/// keep `6.8.0-NN` version strings whatever stable release they carry).
fn kernel_may_send_new_vmgenid() -> bool {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy();
    release.starts_with("6.8.") || release == "6.8"
}

/// The `uevent` source: a bound `NETLINK_KOBJECT_UEVENT` socket.
#[derive(Debug)]
pub struct UeventSource {
    fd: OwnedFd,
    port_id: u32,
    buf: Vec<u8>,
}

impl UeventSource {
    /// Open the socket and join the kernel's multicast group.
    pub fn open() -> Result<Self, SourceError> {
        let unavailable = |what: &str, e: rustix::io::Errno| SourceError::Unavailable {
            name: NAME,
            reason: format!("cannot {what} NETLINK_KOBJECT_UEVENT socket: {e}"),
        };
        let fd = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(netlink::KOBJECT_UEVENT),
        )
        .map_err(|e| unavailable("create", e))?;
        rustix::net::sockopt::set_socket_passcred(&fd, true)
            .map_err(|e| unavailable("set SO_PASSCRED on", e))?;
        // Best effort; the default is usually enough.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size_force(&fd, SOCKET_RCVBUF)
            .or_else(|_| rustix::net::sockopt::set_socket_recv_buffer_size(&fd, SOCKET_RCVBUF));
        rustix::net::bind(&fd, &SocketAddrNetlink::new(0, KERNEL_GROUP))
            .map_err(|e| unavailable("bind", e))?;
        let port_id = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|a| SocketAddrNetlink::try_from(a).ok())
            .map_or(0, |a| a.pid());
        Ok(UeventSource {
            fd,
            port_id,
            buf: vec![0; RECV_BUF],
        })
    }

    /// Netlink port id the kernel assigned to this socket.
    pub fn port_id(&self) -> u32 {
        self.port_id
    }

    /// Block for one datagram and classify it.
    pub fn receive(&mut self) -> Result<Received, SourceError> {
        loop {
            match self.recv_raw() {
                Ok(r) => return Ok(r),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(Received::Overrun),
                Err(e) => return Err(SourceError::io("receiving uevent", e)),
            }
        }
    }

    /// Like [`receive`](Self::receive) but gives up after `timeout`
    /// (returns `Ok(None)`).
    pub fn receive_timeout(&mut self, timeout: Duration) -> Result<Option<Received>, SourceError> {
        use rustix::event::{poll, PollFd, PollFlags, Timespec};
        let ts = Timespec {
            tv_sec: timeout.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: timeout.subsec_nanos().into(),
        };
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        match poll(&mut fds, Some(&ts)) {
            Ok(0) => Ok(None),
            Ok(_) => self.receive().map(Some),
            Err(rustix::io::Errno::INTR) => Ok(None),
            Err(e) => Err(SourceError::io("polling uevent socket", e.into())),
        }
    }

    /// `recvmsg()` with the sender address and `SCM_CREDENTIALS`.
    ///
    /// Done with libc rather than `rustix::net::recvmsg` because rustix
    /// decodes credentials into a non-zero `Pid`, and the kernel's pid is 0.
    fn recv_raw(&mut self) -> io::Result<Received> {
        // SAFETY: sockaddr_nl is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { mem::zeroed() };
        // u64 array: aligned for cmsghdr; 64 bytes > CMSG_SPACE(sizeof(ucred)).
        let mut control = [MaybeUninit::<u64>::uninit(); 8];
        let mut iov = libc::iovec {
            iov_base: self.buf.as_mut_ptr().cast(),
            iov_len: self.buf.len(),
        };
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = std::ptr::addr_of_mut!(addr).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
        msg.msg_iov = std::ptr::addr_of_mut!(iov);
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` refers to a live local buffer of the
        // stated length (name, iovec -> self.buf, control) for the whole call.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), std::ptr::addr_of_mut!(msg), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = n as usize;

        let mut cred_pid = None;
        // SAFETY: `msg` was filled in by a successful recvmsg(); the control
        // buffer it points to is still alive. CMSG_* only walk within
        // msg_controllen, and the ucred is read unaligned after checking
        // that the message is long enough to hold one.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(std::ptr::addr_of!(msg));
            while !cmsg.is_null() {
                let hdr = cmsg.read_unaligned();
                if hdr.cmsg_level == libc::SOL_SOCKET
                    && hdr.cmsg_type == libc::SCM_CREDENTIALS
                    && hdr.cmsg_len as usize
                        >= libc::CMSG_LEN(mem::size_of::<libc::ucred>() as u32) as usize
                {
                    let cred = libc::CMSG_DATA(cmsg).cast::<libc::ucred>().read_unaligned();
                    cred_pid = Some(cred.pid);
                }
                cmsg = libc::CMSG_NXTHDR(std::ptr::addr_of!(msg), cmsg);
            }
        }

        let nl_pid = (msg.msg_namelen as usize >= mem::size_of::<libc::sockaddr_nl>()
            && i32::from(addr.nl_family) == libc::AF_NETLINK)
            .then_some(addr.nl_pid);
        if msg.msg_flags & libc::MSG_TRUNC != 0 {
            return Ok(Received::Ignored(Ignored::Malformed));
        }
        Ok(classify(&self.buf[..len], nl_pid, cred_pid))
    }
}

impl Source for UeventSource {
    fn name(&self) -> &'static str {
        NAME
    }

    fn describe(&self) -> String {
        "NETLINK_KOBJECT_UEVENT group 1, NEW_VMGENID=1 from the kernel (sent by Linux 6.8.0-6.8.7)"
            .to_owned()
    }

    fn into_poll_source(self: Box<Self>) -> Result<Box<dyn crate::PollSource>, Box<dyn Source>> {
        Err(self) // waits in its own thread
    }

    fn run(mut self: Box<Self>, emit: &mut dyn FnMut(SourceEvent)) -> Result<(), SourceError> {
        let may_send = kernel_may_send_new_vmgenid();
        loop {
            match self.receive()? {
                Received::NewVmgenid(ev) => {
                    tracing::info!(source = NAME, devpath = %ev.devpath, "NEW_VMGENID uevent");
                    emit(SourceEvent {
                        source: NAME,
                        detail: format!(
                            "NEW_VMGENID uevent for {} (SEQNUM {})",
                            ev.devpath,
                            ev.get("SEQNUM").unwrap_or("?")
                        ),
                        kernel_time_us: None,
                    });
                }
                Received::Overrun if may_send => {
                    tracing::warn!(
                        source = NAME,
                        "uevent socket overflowed (ENOBUFS); emitting a conservative restore signal"
                    );
                    emit(SourceEvent {
                        source: NAME,
                        detail: "uevents were lost (socket overflow, ENOBUFS); bumping \
                                 conservatively: a spurious bump is safe, a missed one is not"
                            .to_owned(),
                        kernel_time_us: None,
                    });
                }
                Received::Overrun => {
                    tracing::warn!(source = NAME, "uevent socket overflowed (ENOBUFS)");
                }
                Received::Ignored(Ignored::NotFromKernel { nl_pid, cred_pid }) => {
                    tracing::debug!(
                        source = NAME,
                        ?nl_pid,
                        ?cred_pid,
                        "ignoring uevent not sent by the kernel"
                    );
                }
                Received::Ignored(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    /// The bytes from the brief (order as given there).
    const KERNEL_68: &[u8] = b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0ACTION=change\0DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0SUBSYSTEM=acpi\0NEW_VMGENID=1\0SEQNUM=1234\0DRIVER=vmgenid\0";

    /// Order produced by kobject_uevent_env() in 6.8: ACTION, DEVPATH,
    /// SUBSYSTEM, caller envp (NEW_VMGENID=1), dev_uevent (DRIVER), bus
    /// uevent (MODALIAS), SEQNUM last.
    const KERNEL_68_ORDERED: &[u8] = b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0ACTION=change\0DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0SUBSYSTEM=acpi\0NEW_VMGENID=1\0DRIVER=vmgenid\0MODALIAS=acpi:QEMUVGID:\0SEQNUM=1234\0";

    #[test]
    fn parses_kernel_68_uevent() {
        let ev = parse_uevent(KERNEL_68).unwrap();
        assert_eq!(ev.action, "change");
        assert_eq!(ev.devpath, "/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00");
        assert_eq!(ev.get("SUBSYSTEM"), Some("acpi"));
        assert_eq!(ev.get("SEQNUM"), Some("1234"));
        assert_eq!(ev.get("DRIVER"), Some("vmgenid"));
        assert_eq!(ev.env.len(), 6);
        assert!(is_new_vmgenid(&ev));
        assert!(is_new_vmgenid(&parse_uevent(KERNEL_68_ORDERED).unwrap()));
        assert!(matches!(
            classify(KERNEL_68, Some(0), Some(0)),
            Received::NewVmgenid(_)
        ));
        assert!(matches!(
            classify(KERNEL_68_ORDERED, Some(0), None),
            Received::NewVmgenid(_)
        ));
    }

    #[test]
    fn not_new_vmgenid() {
        let cases: &[&[u8]] = &[
            b"add@/devices/x\0ACTION=add\0SUBSYSTEM=acpi\0NEW_VMGENID=1\0DRIVER=vmgenid\0",
            b"change@/devices/x\0ACTION=change\0SUBSYSTEM=acpi\0NEW_VMGENID=0\0",
            b"change@/devices/x\0ACTION=change\0SUBSYSTEM=acpi\0",
            b"change@/devices/x\0ACTION=change\0SUBSYSTEM=net\0NEW_VMGENID=1\0",
            b"change@/devices/x\0ACTION=add\0SUBSYSTEM=acpi\0NEW_VMGENID=1\0",
        ];
        for c in cases {
            let ev = parse_uevent(c).unwrap();
            assert!(!is_new_vmgenid(&ev), "{ev:?}");
            assert_eq!(
                classify(c, Some(0), Some(0)),
                Received::Ignored(Ignored::Unrelated)
            );
        }
    }

    #[test]
    fn libudev_and_malformed() {
        let udev = b"libudev\0\xfe\xed\xca\xfe(payload)\0NEW_VMGENID=1\0";
        assert_eq!(parse_uevent(udev), None);
        assert_eq!(
            classify(udev, Some(0), Some(0)),
            Received::Ignored(Ignored::Libudev)
        );
        for bad in [
            &b""[..],
            b"\0",
            b"noheader\0A=B\0",
            b"@/dev\0",
            b"change@\0",
            b"\xff@x\0",
        ] {
            assert_eq!(parse_uevent(bad), None, "{bad:?}");
            assert_eq!(
                classify(bad, Some(0), Some(0)),
                Received::Ignored(Ignored::Malformed)
            );
        }
        // junk entries are skipped, not fatal
        let ev = parse_uevent(b"change@/d\0junk\0=x\0\xff=1\0K=V=W\0").unwrap();
        assert_eq!(ev.env, vec![("K".to_owned(), "V=W".to_owned())]);
    }

    #[test]
    fn userspace_senders_are_ignored() {
        for (pid, cred) in [
            (Some(1234), Some(1234)),
            (Some(1234), None),
            (Some(0), Some(77)),
            (None, Some(0)),
        ] {
            assert_eq!(
                classify(KERNEL_68, pid, cred),
                Received::Ignored(Ignored::NotFromKernel {
                    nl_pid: pid,
                    cred_pid: cred
                }),
            );
        }
    }

    /// Real sockets: a userspace process multicasting a forged NEW_VMGENID
    /// uevent to group 1 must not produce an event.
    #[test]
    fn spoofed_uevent_from_userspace_is_ignored() {
        let mut src = match UeventSource::open() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        assert_ne!(src.port_id(), 0);
        let spoof = rustix::net::socket_with(
            AddressFamily::NETLINK,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC,
            Some(netlink::KOBJECT_UEVENT),
        )
        .unwrap();
        rustix::net::bind(&spoof, &SocketAddrNetlink::new(0, 0)).unwrap();
        let spoof_port = SocketAddrNetlink::try_from(rustix::net::getsockname(&spoof).unwrap())
            .unwrap()
            .pid();
        assert_ne!(spoof_port, 0);
        let mut payload = KERNEL_68.to_vec();
        payload.extend_from_slice(format!("SYSGENID_TEST={}\0", std::process::id()).as_bytes());
        let sent = match rustix::net::sendto(
            &spoof,
            &payload,
            rustix::net::SendFlags::empty(),
            &SocketAddrNetlink::new(0, KERNEL_GROUP),
        ) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("kernel refused userspace multicast: {e}");
                false
            }
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut saw_spoof = false;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match src.receive_timeout(left).unwrap() {
                None => break,
                Some(Received::NewVmgenid(ev)) => panic!("forged uevent accepted: {ev:?}"),
                Some(Received::Ignored(Ignored::NotFromKernel { nl_pid, cred_pid })) => {
                    assert_eq!(nl_pid, Some(spoof_port));
                    assert_eq!(cred_pid, Some(std::process::id() as i32));
                    saw_spoof = true;
                    break;
                }
                Some(other) => eprintln!("unrelated: {other:?}"),
            }
        }
        if sent {
            assert!(
                saw_spoof,
                "the forged datagram never reached the source socket"
            );
        }
    }

    proptest! {
        #[test]
        fn parse_uevent_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_uevent(&bytes);
            let _ = classify(&bytes, Some(0), Some(0));
        }

        #[test]
        fn parse_uevent_structured(
            action in "[a-z@]{0,8}", devpath in "[/a-zA-Z0-9:@]{0,20}",
            env in proptest::collection::vec(("[A-Z_=]{0,8}", "[ -~]{0,12}"), 0..6),
        ) {
            let mut bytes = format!("{action}@{devpath}").into_bytes();
            for (k, v) in &env {
                bytes.push(0);
                bytes.extend_from_slice(format!("{k}={v}").as_bytes());
            }
            if let Some(ev) = parse_uevent(&bytes) {
                prop_assert!(!ev.action.is_empty() && !ev.devpath.is_empty());
                prop_assert!(ev.env.len() <= env.len());
            }
        }
    }
}
