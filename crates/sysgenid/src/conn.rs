//! One non-blocking `SOCK_SEQPACKET` connection to the daemon and the frame
//! operations both the blocking and the async API are built from.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use std::collections::VecDeque;

use sysgenid_proto::{Reply, Request, Role, MAX_FRAME};

use crate::{Error, Event};

pub(crate) struct Conn {
    fd: OwnedFd,
}

/// Result of a non-blocking attempt.
pub(crate) enum Try<T> {
    Ready(T),
    WouldBlock,
}

impl Conn {
    /// Connects and sends `Hello` announcing `version` (the `Welcome` is
    /// read by the caller).
    pub(crate) fn connect(socket: &Path, role: Role, version: u16) -> Result<Conn, Error> {
        let not_running = |e: rustix::io::Errno| Error::NotRunning {
            socket: socket.to_path_buf(),
            source: e.into(),
        };
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(not_running)?;
        let addr = SocketAddrUnix::new(socket).map_err(not_running)?;
        // A non-blocking AF_UNIX connect fails with EAGAIN when the
        // daemon's listen backlog is full; the connection is then *not*
        // queued (sending would fail with ENOTCONN), so retry with backoff.
        let mut delay = std::time::Duration::from_millis(1);
        loop {
            match rustix::net::connect(&fd, &addr) {
                Ok(()) => break,
                Err(rustix::io::Errno::AGAIN) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(std::time::Duration::from_millis(100));
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::INPROGRESS) => {
                    wait_fd(fd.as_fd(), PollFlags::OUT, None)?;
                    break;
                }
                Err(e) => return Err(not_running(e)),
            }
        }
        // Nothing is sent, not even Hello, to a daemon we do not trust.
        crate::trust::check_daemon(&fd, socket)?;
        let conn = Conn { fd };
        let hello = conn.send(&Request::Hello { version, role });
        if let Err(Error::Disconnected) = hello {
            // The daemon may have refused us (a limit) and hung up before
            // our Hello: its reason is still queued for us.
            if let Ok(Try::Ready(Reply::Error(e))) = conn.try_recv() {
                return Err(Error::from_reply(e));
            }
        }
        hello.map(|()| conn)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn send(&self, request: &Request) -> Result<(), Error> {
        let frame = request.encode();
        loop {
            match rustix::net::send(&self.fd, &frame, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => {
                    wait_fd(self.fd(), PollFlags::OUT, None)?;
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::from_io(e)),
            }
        }
    }

    /// Receives one frame without blocking.
    pub(crate) fn try_recv(&self) -> Result<Try<Reply>, Error> {
        self.try_recv_flags(RecvFlags::empty())
    }

    /// Peeks at the first frame without consuming it.
    pub(crate) fn try_peek(&self) -> Result<Try<Reply>, Error> {
        self.try_recv_flags(RecvFlags::PEEK)
    }

    fn try_recv_flags(&self, flags: RecvFlags) -> Result<Try<Reply>, Error> {
        let mut buf = [0u8; MAX_FRAME];
        let mut reset_seen = false;
        loop {
            match rustix::net::recv(
                &self.fd,
                &mut buf,
                flags | RecvFlags::DONTWAIT | RecvFlags::TRUNC,
            ) {
                Ok((0, _)) => return Err(Error::Disconnected),
                Ok((_, len)) if len > MAX_FRAME => {
                    return Err(Error::Protocol(format!(
                        "a {len}-byte frame from the daemon exceeds the {MAX_FRAME}-byte limit"
                    )))
                }
                Ok((n, _)) => {
                    return Reply::decode(&buf[..n])
                        .map(Try::Ready)
                        .map_err(|e| Error::Protocol(e.to_string()))
                }
                Err(rustix::io::Errno::AGAIN) => return Ok(Try::WouldBlock),
                Err(rustix::io::Errno::INTR) => continue,
                // The kernel reports a reset once, ahead of frames still
                // queued (a daemon that refused us and closed with our Hello
                // unread): read on, so its last error frame is not lost.
                Err(rustix::io::Errno::CONNRESET) if !reset_seen => reset_seen = true,
                Err(e) => return Err(Error::from_io(e)),
            }
        }
    }

    /// Bytes queued for reading (all frames).
    pub(crate) fn queued_bytes(&self) -> usize {
        rustix::io::ioctl_fionread(&self.fd).unwrap_or(0) as usize
    }

    /// Blocking: the reply to the request just sent. `Changed` frames
    /// before it are consumed: the daemon re-sends one after the reply while
    /// the watcher is still outdated.
    pub(crate) fn reply(&self) -> Result<Reply, Error> {
        self.reply_noting_changes(&mut VecDeque::new())
            .map(|(reply, _)| reply)
    }

    /// Like [`reply`](Self::reply), also returning the newest generation
    /// announced by the `Changed` frames consumed on the way. Lifecycle
    /// events met on the way are kept, in order, in `events`.
    pub(crate) fn reply_noting_changes(
        &self,
        events: &mut VecDeque<Event>,
    ) -> Result<(Reply, Option<u32>), Error> {
        let mut newest = None;
        loop {
            match self.try_recv()? {
                Try::Ready(Reply::Changed { generation }) => {
                    newest = Some(newest.map_or(generation, |n: u32| n.max(generation)));
                }
                Try::Ready(reply) if reply.is_lifecycle_event() => {
                    events.extend(Event::from_reply(&reply));
                }
                Try::Ready(reply) => return Ok((reply, newest)),
                Try::WouldBlock => {
                    wait_fd(self.fd(), PollFlags::IN, None)?;
                }
            }
        }
    }

    /// After a reply to a watcher that is still outdated, the daemon sends a
    /// `Changed` right behind it; wait for it so the descriptor is readable
    /// again before the caller looks (bounded, in case the daemon died).
    pub(crate) fn await_trailing_changed(&self) -> Result<(), Error> {
        wait_fd(
            self.fd(),
            PollFlags::IN,
            Some(std::time::Duration::from_secs(1)),
        )
        .map(drop)
    }

    /// Non-blocking read of the newest pending change, leaving one `Changed`
    /// frame queued so the socket stays readable.
    pub(crate) fn try_changed(&self) -> Result<Try<u32>, Error> {
        loop {
            match self.try_peek()? {
                Try::WouldBlock => return Ok(Try::WouldBlock),
                Try::Ready(Reply::Changed { generation }) => {
                    // Older Changed frames ahead of the newest are redundant.
                    if self.queued_bytes() > (Reply::Changed { generation }).encode().len() {
                        let _ = self.try_recv()?;
                        continue;
                    }
                    return Ok(Try::Ready(generation));
                }
                Try::Ready(Reply::Error(e)) => {
                    let _ = self.try_recv();
                    return Err(Error::from_reply(e));
                }
                Try::Ready(other) => {
                    return Err(Error::Protocol(format!("unexpected frame {other:?}")))
                }
            }
        }
    }
}

impl Conn {
    /// Non-blocking read of the next event of a lifecycle participant: a
    /// `Freeze` or `Thaw` frame is consumed; a `Changed` frame is left
    /// queued (the socket stays readable while outdated) unless more frames
    /// follow it, or it announces `skip`, a generation the caller chose not
    /// to acknowledge yet (then it is consumed, so the caller blocks until
    /// something new arrives).
    pub(crate) fn try_event(&self, skip: Option<u32>) -> Result<Try<Event>, Error> {
        loop {
            match self.try_peek()? {
                Try::WouldBlock => return Ok(Try::WouldBlock),
                Try::Ready(Reply::Changed { generation }) => {
                    let more = self.queued_bytes() > (Reply::Changed { generation }).encode().len();
                    if more || skip == Some(generation) {
                        let _ = self.try_recv()?;
                        continue;
                    }
                    return Ok(Try::Ready(Event::Change { generation }));
                }
                Try::Ready(reply) if reply.is_lifecycle_event() => {
                    let _ = self.try_recv()?;
                    if let Some(event) = Event::from_reply(&reply) {
                        return Ok(Try::Ready(event));
                    }
                }
                Try::Ready(Reply::Error(e)) => {
                    let _ = self.try_recv();
                    return Err(Error::from_reply(e));
                }
                Try::Ready(other) => {
                    return Err(Error::Protocol(format!("unexpected frame {other:?}")))
                }
            }
        }
    }
}

/// Waits until `fd` has `flags` (or hangs up). `timeout` None = forever.
pub(crate) fn wait_fd(
    fd: BorrowedFd<'_>,
    flags: PollFlags,
    timeout: Option<std::time::Duration>,
) -> Result<bool, Error> {
    let mut fds = [PollFd::new(&fd, flags)];
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    loop {
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(Error::from_io(e)),
        }
    }
}

impl std::os::fd::AsRawFd for Conn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }
}
