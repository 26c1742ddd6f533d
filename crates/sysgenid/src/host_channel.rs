//! The host side of the host channel: for orchestrators on the hypervisor
//! host that drive a guest's `sysgenidd --host-channel vsock:PORT`
//! (`sysgenidctl --host-channel TARGET COMMAND` is a thin layer over it).
//!
//! A [`Target`] is where the guest is reached:
//! * `vsock:CID:PORT`: through the host kernel's vsock (QEMU vhost-vsock);
//! * `uds:PATH:PORT`: the hybrid vsock of Firecracker and Cloud Hypervisor
//!   (and vhost-device-vsock): a Unix socket on the host, on which the
//!   client sends `CONNECT PORT\n` and reads `OK <port>\n` before the
//!   guest's stream starts;
//! * `test-unix:PATH`: the daemon's test-only Unix listener.
//!
//! Errors are the local client's [`Error`]s, so a program (or
//! `sysgenidctl`'s exit code) treats a timed-out `wait-watchers` or an
//! aborted freeze the same way on both channels.
//!
//! ```no_run
//! use sysgenid::host_channel::{HostChannel, Target};
//! let target: Target = "uds:/run/vm1/vsock.sock:1024".parse()?;
//! let mut guest = HostChannel::connect(&target)?;
//! guest.freeze(Some(std::time::Duration::from_secs(5)))?;
//! // ... snapshot, then restore a clone ...
//! let restored = guest.restored(sysgenid::host_channel::RestoreKind::Clone, None, None)?;
//! println!("clone at generation {}", restored.generation);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use sysgenid_proto::host::{HostReply, HostRequest, HOST_MAX_LINE};
pub use sysgenid_proto::host::{RestoreKind, RestoredReport};
use sysgenid_proto::{Entropy, Hostname, MIN_ENTROPY};
use sysgenid_proto::{ErrorReply, StatusReport};

use crate::Error;

/// How long connecting (and the hybrid handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the guest's host channel is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// AF_VSOCK through the host kernel.
    Vsock {
        /// The guest's context id.
        cid: u32,
        /// The port `sysgenidd --host-channel vsock:PORT` listens on.
        port: u32,
    },
    /// Hybrid vsock (Firecracker, Cloud Hypervisor, vhost-device-vsock).
    Hybrid {
        /// The hypervisor's vsock Unix socket on the host.
        path: PathBuf,
        /// The guest port.
        port: u32,
    },
    /// The daemon's test-only Unix listener (`--host-channel test-unix:PATH`).
    TestUnix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Target::Hybrid { path, port } => write!(f, "uds:{}:{port}", path.display()),
            Target::TestUnix(path) => write!(f, "test-unix:{}", path.display()),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Target, String> {
        let port = |p: &str| {
            p.parse::<u32>()
                .map_err(|_| format!("{s:?}: the port must be a number"))
        };
        if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, p) = rest
                .split_once(':')
                .ok_or_else(|| format!("{s:?}: expected vsock:CID:PORT"))?;
            let cid = cid
                .parse::<u32>()
                .map_err(|_| format!("{s:?}: the CID must be a number"))?;
            return Ok(Target::Vsock {
                cid,
                port: port(p)?,
            });
        }
        if let Some(rest) = s.strip_prefix("uds:") {
            // The path may hold colons; the port is after the last one.
            let (path, p) = rest
                .rsplit_once(':')
                .filter(|(path, _)| !path.is_empty())
                .ok_or_else(|| format!("{s:?}: expected uds:PATH:PORT"))?;
            return Ok(Target::Hybrid {
                path: path.into(),
                port: port(p)?,
            });
        }
        if let Some(path) = s.strip_prefix("test-unix:").filter(|p| !p.is_empty()) {
            return Ok(Target::TestUnix(path.into()));
        }
        Err(format!(
            "{s:?}: expected vsock:CID:PORT or uds:PATH:PORT (or test-unix:PATH)"
        ))
    }
}

/// What a `restored` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The guest's generation after it.
    pub generation: u32,
    /// The daemon's account: coalesced, entropy mixed, kernel reseeded.
    pub report: RestoredReport,
}

/// One connection to a guest's host channel; one request at a time.
pub struct HostChannel {
    target: Target,
    reader: BufReader<std::fs::File>,
    writer: std::fs::File,
}

impl HostChannel {
    /// Connects to `target` (with the hybrid handshake for `uds:`).
    pub fn connect(target: &Target) -> Result<HostChannel, Error> {
        let unreachable = |source: std::io::Error| Error::HostUnreachable {
            target: target.to_string(),
            source,
        };
        let fd: OwnedFd = match target {
            Target::Vsock { cid, port } => vsock_connect(*cid, *port).map_err(unreachable)?,
            Target::Hybrid { path, .. } | Target::TestUnix(path) => {
                std::os::unix::net::UnixStream::connect(path)
                    .map_err(unreachable)?
                    .into()
            }
        };
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(CONNECT_TIMEOUT),
        )
        .map_err(|e| unreachable(e.into()))?;
        let file = std::fs::File::from(fd);
        let writer = file.try_clone().map_err(unreachable)?;
        let mut channel = HostChannel {
            target: target.clone(),
            reader: BufReader::with_capacity(HOST_MAX_LINE * 2, file),
            writer,
        };
        if let Target::Hybrid { port, .. } = target {
            channel
                .writer
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .map_err(unreachable)?;
            let line = channel.read_line().map_err(|e| match e {
                Error::Io(source) => unreachable(source),
                Error::Disconnected => unreachable(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    format!("the hybrid vsock socket hung up after CONNECT {port} (nothing listens on that port in the guest?)"),
                )),
                other => other,
            })?;
            if !line.starts_with("OK ") {
                return Err(unreachable(std::io::Error::other(format!(
                    "the hybrid vsock socket answered {:?} to CONNECT {port} (is sysgenidd --host-channel vsock:{port} running in the guest?)",
                    line.trim_end()
                ))));
            }
        }
        // Requests (freeze, wait-watchers) may take as long as they ask.
        rustix::net::sockopt::set_socket_timeout(
            channel.reader.get_ref(),
            rustix::net::sockopt::Timeout::Recv,
            None,
        )
        .map_err(|e| unreachable(e.into()))?;
        Ok(channel)
    }

    /// Where this channel goes.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn read_line(&mut self) -> Result<String, Error> {
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(HOST_MAX_LINE as u64 * 64)
            .read_line(&mut line)?;
        if n == 0 {
            return Err(Error::Disconnected);
        }
        if !line.ends_with('\n') {
            return Err(Error::Protocol(format!(
                "the reply line was cut off after {n} bytes"
            )));
        }
        Ok(line)
    }

    /// Sends one request and returns its reply line, success or not.
    pub fn request(&mut self, request: &HostRequest) -> Result<HostReply, Error> {
        self.writer
            .write_all(&request.encode())
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => {
                    Error::Disconnected
                }
                _ => Error::Io(e),
            })?;
        let line = self.read_line()?;
        HostReply::decode(line.trim_end().as_bytes())
            .map_err(|e| Error::Protocol(format!("unreadable reply {:?}: {e}", line.trim_end())))
    }

    /// Sends a request and turns a refusal into the local client's error.
    fn call(&mut self, request: &HostRequest) -> Result<HostReply, Error> {
        let reply = self.request(request)?;
        if reply.ok {
            return Ok(reply);
        }
        let code = reply
            .error
            .ok_or_else(|| Error::Protocol("a refusal without an error name".into()))?;
        Err(Error::from_reply(ErrorReply {
            code,
            value: reply.value.unwrap_or(0),
            message: reply.message.unwrap_or_default(),
        }))
    }

    fn generation(reply: &HostReply) -> Result<u32, Error> {
        reply
            .generation
            .ok_or_else(|| Error::Protocol("a success without a generation".into()))
    }

    /// Tells the guest it was restored (or cloned): it mixes `entropy`
    /// (`None`: 32 bytes of this host's getrandom) into its kernel,
    /// reseeds it, and bumps (source `host`); `hostname` goes to its
    /// hooks as `SYSGENID_HOSTNAME`. ([`Entropy`] and [`Hostname`] are
    /// checked when made: bad input never leaves this host.)
    pub fn restored(
        &mut self,
        kind: RestoreKind,
        entropy: Option<&Entropy>,
        hostname: Option<&Hostname>,
    ) -> Result<Restored, Error> {
        let mut own = [0u8; MIN_ENTROPY];
        let bytes = match entropy {
            Some(entropy) => entropy.bytes(),
            None => {
                rustix::rand::getrandom(&mut own, rustix::rand::GetRandomFlags::empty())
                    .map_err(|e| Error::Io(e.into()))?;
                &own[..]
            }
        };
        let request = HostRequest::Restored {
            kind,
            entropy_hex: Some(sysgenid_proto::host::encode_hex(bytes)),
            entropy_base64: None,
            hostname: hostname.map(|h| h.as_str().to_string()),
        };
        let reply = self.call(&request)?;
        Ok(Restored {
            generation: Self::generation(&reply)?,
            report: reply.restored.unwrap_or_default(),
        })
    }

    /// Freezes every participant in the guest; `None`: the daemon's
    /// default timeout. [`Error::FreezeAborted`] if it was aborted.
    pub fn freeze(&mut self, timeout: Option<Duration>) -> Result<u32, Error> {
        let reply = self.call(&HostRequest::Freeze {
            timeout_ms: timeout.map_or(0, millis),
        })?;
        Self::generation(&reply)
    }

    /// Thaws the guest (also when not frozen).
    pub fn thaw(&mut self) -> Result<u32, Error> {
        let reply = self.call(&HostRequest::Thaw {})?;
        Self::generation(&reply)
    }

    /// Waits until every tracked watcher in the guest has acknowledged
    /// and its hooks' change run finished; `None` waits forever.
    pub fn wait_watchers(&mut self, timeout: Option<Duration>) -> Result<u32, Error> {
        let reply = self.call(&HostRequest::WaitWatchers {
            timeout_ms: timeout.map_or(0, millis),
        })?;
        Self::generation(&reply)
    }

    /// The guest daemon's status.
    pub fn status(&mut self) -> Result<StatusReport, Error> {
        let reply = self.call(&HostRequest::Status {})?;
        reply
            .status
            .map(|s| *s)
            .ok_or_else(|| Error::Protocol("a status reply without a report".into()))
    }

    /// The guest's generation.
    pub fn get(&mut self) -> Result<u32, Error> {
        let reply = self.call(&HostRequest::Get {})?;
        Self::generation(&reply)
    }
}

/// At least 1 ms for a non-zero timeout (0 means "default" or "forever").
fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

/// A blocking AF_VSOCK stream to `cid:port` (the kernel gives up after its
/// connect timeout, 2 s by default).
fn vsock_connect(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::from_raw(libc::AF_VSOCK as _),
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    // SAFETY: sockaddr_vm is plain old data for which all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    loop {
        // SAFETY: `addr` is an initialised sockaddr_vm alive across the
        // call, its size passed with it; `fd` is an open socket.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                std::ptr::from_ref(&addr).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(fd);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_why_not() {
        assert_eq!(
            "vsock:3:1024".parse(),
            Ok(Target::Vsock { cid: 3, port: 1024 })
        );
        assert_eq!(
            "uds:/run/a:b/v.sock:1024".parse(),
            Ok(Target::Hybrid {
                path: "/run/a:b/v.sock".into(),
                port: 1024
            })
        );
        assert_eq!(
            "test-unix:/tmp/h".parse(),
            Ok(Target::TestUnix("/tmp/h".into()))
        );
        for bad in [
            "vsock:3",
            "vsock:x:1",
            "uds:/p",
            "uds::1",
            "uds:/p:x",
            "tcp:1:2",
            "test-unix:",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
        let t: Target = "uds:/run/v.sock:52".parse().unwrap();
        assert_eq!(t.to_string(), "uds:/run/v.sock:52");
    }
}
