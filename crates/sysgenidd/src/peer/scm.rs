//! Receiving one frame together with what the kernel recorded about its
//! sender when it was sent: `SCM_CREDENTIALS` (pid, uid, gid) and, on Linux
//! 6.5+, `SCM_PIDFD` (a pidfd for exactly that sender, so its pid cannot be
//! confused with a later process that reuses the number).
//!
//! Written by hand with `libc`, in this one module, because rustix cannot
//! do it soundly today: its `UCred` holds a non-zero `Pid`, but the kernel
//! reports pid 0 for a sender in a pid namespace we cannot see and for a
//! frame that carries no credentials (reading that into a `UCred` would be
//! undefined behaviour), and its ancillary parser skips `SCM_PIDFD`, whose
//! descriptor would then leak. Descriptors a client pushes with
//! `SCM_RIGHTS` are refused by the kernel where it can (`SO_PASSRIGHTS`,
//! Linux 6.16) and closed at once otherwise.
//!
//! # References
//! `unix(7)` (`SO_PASSCRED`, `SO_PASSPIDFD`, `SCM_CREDENTIALS`,
//! `SCM_PIDFD`), `cmsg(3)`, `recvmsg(2)`.

use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::io::Errno;

/// `SO_PASSPIDFD` and `SCM_PIDFD` from `<asm-generic/socket.h>` (Linux 6.5).
const SO_PASSPIDFD: libc::c_int = 76;
const SCM_PIDFD: libc::c_int = 0x04;
/// `SO_PASSRIGHTS` (Linux 6.16): 0 makes the kernel refuse `SCM_RIGHTS`
/// sent to us (the sender gets `EPERM`).
const SO_PASSRIGHTS: libc::c_int = 83;

/// Room for one `SCM_CREDENTIALS` (`CMSG_SPACE(12)` = 32) and one
/// `SCM_PIDFD` (`CMSG_SPACE(4)` = 24), 8-byte aligned for `cmsghdr`. The
/// kernel writes credentials first and the pidfd last; on kernels that
/// still accept descriptors sent to us (before 6.16), those come in between
/// and may crowd the pidfd out (`MSG_CTRUNC`), which can only make the
/// pushing client's own request fail.
#[repr(C, align(8))]
struct Control([u8; 64]);

/// The kernel's record of one frame's sender.
pub(super) struct SentBy {
    /// `SCM_CREDENTIALS`, when present.
    pub cred: Option<libc::ucred>,
    /// `SCM_PIDFD`, when present.
    pub pidfd: Option<OwnedFd>,
}

/// Asks the kernel to attach the sender's credentials (and, where it can, a
/// pidfd) to every frame on `listener`'s connections. Set on the listening
/// socket before `listen`: accepted sockets inherit both options, and
/// frames sent before `accept` carry credentials too, so no frame is ever
/// without them. Where the kernel can (6.16+), descriptors sent to us are
/// refused outright (`SO_PASSRIGHTS` 0), so none can crowd a pidfd out or
/// cost us a descriptor. Returns whether `SO_PASSPIDFD` is supported.
pub(super) fn pass_credentials(listener: BorrowedFd<'_>) -> std::io::Result<bool> {
    rustix::net::sockopt::set_socket_passcred(listener, true)?;
    let _ = set_int_option(listener, SO_PASSRIGHTS, 0);
    Ok(set_int_option(listener, SO_PASSPIDFD, 1))
}

/// `setsockopt(SOL_SOCKET, option, value)`; false if the kernel refused.
fn set_int_option(sock: BorrowedFd<'_>, option: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `value`,
    // which lives for the call; the descriptor is valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// `recvmsg` of one datagram into `buf` (non-blocking, `MSG_TRUNC`), with
/// its sender. Returns (bytes copied, datagram length, sender).
pub(super) fn recv_with_sender(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> Result<(usize, usize, SentBy), Errno> {
    let mut control = Control([0; 64]);
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = control.0.len() as _;
    // SAFETY: `msg` points at `iov` (which covers `buf`) and at `control`,
    // all alive and exclusively borrowed for the call; the kernel writes at
    // most `iov_len` and `msg_controllen` bytes into them.
    let n = unsafe {
        libc::recvmsg(
            sock.as_raw_fd(),
            &mut msg,
            libc::MSG_DONTWAIT | libc::MSG_TRUNC | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    let len = n as usize;
    let mut sent_by = SentBy {
        cred: None,
        pidfd: None,
    };
    // SAFETY: `msg` was filled by recvmsg: msg_control/msg_controllen
    // describe the control bytes the kernel wrote, which is what
    // CMSG_FIRSTHDR/CMSG_NXTHDR walk (they return null past the end).
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies inside
        // `control`, aligned (the buffer is 8-aligned and the kernel aligns
        // each header), and its data is `cmsg_len - CMSG_LEN(0)` bytes long.
        let (level, kind, data, data_len) = unsafe {
            let h = &*cmsg;
            let header = libc::CMSG_LEN(0) as usize;
            (
                h.cmsg_level,
                h.cmsg_type,
                libc::CMSG_DATA(cmsg),
                (h.cmsg_len as usize).saturating_sub(header),
            )
        };
        if level == libc::SOL_SOCKET {
            match kind {
                libc::SCM_CREDENTIALS if data_len >= size_of::<libc::ucred>() => {
                    // SAFETY: at least size_of::<ucred>() bytes of data,
                    // read unaligned into a plain-data struct.
                    sent_by.cred = Some(unsafe { data.cast::<libc::ucred>().read_unaligned() });
                }
                SCM_PIDFD | libc::SCM_RIGHTS => {
                    for i in 0..data_len / size_of::<libc::c_int>() {
                        // SAFETY: reading the i-th whole c_int of the payload.
                        let raw = unsafe { data.cast::<libc::c_int>().add(i).read_unaligned() };
                        if raw < 0 {
                            // The kernel could not make the pidfd (it
                            // reports -errno, e.g. EMFILE): none.
                            continue;
                        }
                        // SAFETY: a non-negative entry is a new descriptor
                        // the kernel installed for us; nothing else owns it.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        if kind == SCM_PIDFD && sent_by.pidfd.is_none() {
                            sent_by.pidfd = Some(fd);
                        }
                        // Anything else (pushed descriptors) is closed here.
                    }
                }
                _ => {}
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR; `cmsg` is a valid header of `msg`.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok((len.min(buf.len()), len, sent_by))
}
