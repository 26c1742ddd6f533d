//! Where the host channel listens: an `AF_VSOCK` stream socket (the real
//! thing, `vsock:PORT`) or, for tests only, a Unix stream socket
//! (`test-unix:PATH`) whose every peer is taken for the host. rustix has no
//! vsock addresses, so the few vsock calls are made through libc here.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use rustix::net::{AddressFamily, SocketFlags, SocketType};

/// `--host-channel`'s value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// AF_VSOCK, any local CID, this port; only CID 2 (the host) is served.
    Vsock {
        /// The vsock port.
        port: u32,
    },
    /// FOR TESTS ONLY: a Unix stream socket at this path (created 0600),
    /// every peer of which is treated as the host. It exists so the line
    /// protocol can be tested on machines without vsock; never use it in
    /// production (anyone who can connect may bump and freeze).
    TestUnix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(s: &str) -> Result<Listen, String> {
        if let Some(port) = s.strip_prefix("vsock:") {
            let port: u32 = port
                .parse()
                .map_err(|_| format!("{s:?}: the vsock port must be a number (vsock:PORT)"))?;
            if port == u32::MAX {
                return Err(format!("{s:?}: VMADDR_PORT_ANY is not a port to listen on"));
            }
            return Ok(Listen::Vsock { port });
        }
        if let Some(path) = s.strip_prefix("test-unix:") {
            if path.is_empty() {
                return Err(format!("{s:?}: test-unix:PATH needs a path"));
            }
            return Ok(Listen::TestUnix(path.into()));
        }
        Err(format!(
            "{s:?}: expected vsock:PORT (or test-unix:PATH, for tests only)"
        ))
    }
}

/// Who connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddr {
    /// A vsock peer.
    Vsock {
        /// Its context id (2: the host).
        cid: u32,
        /// Its port.
        port: u32,
    },
    /// A test-unix peer (treated as the host).
    TestUnix,
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddr::Vsock { cid, port } => write!(f, "vsock CID {cid} port {port}"),
            PeerAddr::TestUnix => f.write_str("test-unix peer"),
        }
    }
}

/// Binds and listens, non-blocking, close-on-exec.
pub fn bind(listen: &Listen) -> std::io::Result<OwnedFd> {
    match listen {
        Listen::Vsock { port } => {
            let fd = rustix::net::socket_with(
                AddressFamily::from_raw(libc::AF_VSOCK as _),
                SocketType::STREAM,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                None,
            )?;
            let addr = sockaddr_vm(libc::VMADDR_CID_ANY, *port);
            // SAFETY: `addr` is a fully initialised sockaddr_vm that lives
            // across the call, and its size is passed with it; `fd` is an
            // open socket.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&addr).cast(),
                    std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            rustix::net::listen(&fd, 16)?;
            Ok(fd)
        }
        Listen::TestUnix(path) => {
            let _ = std::fs::remove_file(path);
            let fd = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::STREAM,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
                None,
            )?;
            rustix::net::bind(&fd, &rustix::net::SocketAddrUnix::new(path)?)?;
            rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600))?;
            rustix::net::listen(&fd, 16)?;
            Ok(fd)
        }
    }
}

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data for which all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// Accepts one connection, non-blocking, with its peer's address.
pub fn accept(listener: &OwnedFd, listen: &Listen) -> rustix::io::Result<(OwnedFd, PeerAddr)> {
    match listen {
        Listen::TestUnix(_) => {
            let fd =
                rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)?;
            Ok((fd, PeerAddr::TestUnix))
        }
        Listen::Vsock { .. } => {
            let mut addr = sockaddr_vm(0, 0);
            let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            // SAFETY: `addr` and `len` are valid for writes and describe a
            // buffer of `len` bytes; the kernel writes at most that much.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::from_mut(&mut addr).cast(),
                    &mut len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(
                    rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
                        .unwrap_or(rustix::io::Errno::IO),
                );
            }
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Ok((
                fd,
                PeerAddr::Vsock {
                    cid: addr.svm_cid,
                    port: addr.svm_port,
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_values_parse_or_say_why_not() {
        assert_eq!("vsock:1024".parse(), Ok(Listen::Vsock { port: 1024 }));
        assert_eq!(
            "test-unix:/tmp/x".parse(),
            Ok(Listen::TestUnix("/tmp/x".into()))
        );
        for bad in [
            "vsock:",
            "vsock:x",
            "vsock:4294967295",
            "tcp:1",
            "test-unix:",
        ] {
            assert!(bad.parse::<Listen>().is_err(), "{bad}");
        }
    }
}
