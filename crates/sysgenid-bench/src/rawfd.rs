//! Raw descriptors for the baselines: socket pairs, eventfds, pipes and
//! their read/write calls, with no library in between (a baseline must not
//! carry overhead our path does not have).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use sysgenid_bench::close_from;

pub(crate) fn socketpair_seqpacket() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair(2) writes two descriptors into a valid array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptors owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

pub(crate) fn eventfd() -> OwnedFd {
    // SAFETY: eventfd(2); checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

pub(crate) fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) writes two descriptors into a valid array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptors.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// In a fresh child: moves `fd` to descriptor 3 and closes everything above.
pub(crate) fn keep_only_as_3(fd: RawFd) {
    if fd != 3 {
        // SAFETY: dup2(2) onto descriptor 3 of this (child) process.
        unsafe { libc::dup2(fd, 3) };
    }
    close_from(4);
}

pub(crate) fn raw_send(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: send(2) from a valid buffer.
    unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    }
}

pub(crate) fn raw_recv(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: recv(2) into a valid buffer.
    unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) }
}

pub(crate) fn raw_write(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: write(2) from a valid buffer.
    unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) }
}

pub(crate) fn raw_read(fd: RawFd, buf: &mut [u8]) -> isize {
    // SAFETY: read(2) into a valid buffer.
    unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) }
}
